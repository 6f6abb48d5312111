"""Store entries in the shared bucket: the local BentoML store becomes a cache of it.

An entry written on one replica (a Hub download, a custom checkpoint, a bound custom model) is
exported with BentoML's own ``bentoml.models.export_model`` (an uncompressed ``tar``: no CPU
spent compressing weights that do not compress) and uploaded to
``s3://bucket/prefix/entries/<tag name>/<version>.tar``. Another replica that needs it (a load,
or its reconciler following the desired state's ``entries``) downloads it and imports it with
``bentoml.models.import_model``: the same tag, name and version, everywhere, and never a second
download from the Hub. A deleted entry's objects are removed.

boto3, as for the desired state (``s3.py``): one client, the standard ``AWS_*`` variables, and a
multipart transfer for large checkpoints (``upload_file``/``download_file``). Exports of an entry
for another engine (ONNX) are not shared: each replica makes its own from the shared entry.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from ingrain_bento.model_state.home import StateHome, StoreUnreachable, update
from ingrain_bento.model_state.s3 import s3_client, split_s3_url
from ingrain_bento.refs import ModelRef

__all__ = ["S3EntryMirror", "SharedEntries"]

log = logging.getLogger("ingrain_bento.model_state")

ENTRIES = "entries"


class S3EntryMirror:
    """The store entries in ``s3://bucket/prefix/entries/`` (see the module docstring)."""

    def __init__(self, url: str, client: Any = None) -> None:
        self.bucket, prefix = split_s3_url(url)
        self.prefix = f"{prefix}/{ENTRIES}/" if prefix else f"{ENTRIES}/"
        self.location = url
        self.client = client if client is not None else s3_client()

    def _key(self, tag: str) -> str:
        name, _, version = tag.partition(":")
        return f"{self.prefix}{name}/{version}.tar"

    def _failed(self, action: str, tag: str, exc: Exception) -> StoreUnreachable:
        return StoreUnreachable(f"The shared store {self.location} could not {action} {tag} "
                              f"({type(exc).__name__}: {exc}).")

    def version_of(self, tag_name: str) -> str | None:
        """The full tag (``name:version``) the bucket holds under ``tag_name``, newest first; None if none."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            reply = self.client.list_objects_v2(Bucket=self.bucket, Prefix=f"{self.prefix}{tag_name}/")
        except (BotoCoreError, ClientError) as exc:
            raise self._failed("list", tag_name, exc) from None
        found = sorted(reply.get("Contents", []), key=lambda item: item["LastModified"], reverse=True)
        for item in found:
            version = item["Key"].rsplit("/", 1)[-1].removesuffix(".tar")
            return f"{tag_name}:{version}"
        return None

    def push(self, tag: str) -> None:
        """Export the local entry ``tag`` (``name:version``) and upload it."""
        import bentoml
        from botocore.exceptions import BotoCoreError, ClientError

        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="ingrain-export-") as scratch:
            archive = Path(scratch) / "entry.tar"
            bentoml.models.export_model(tag, str(archive), output_format="tar")
            try:
                self.client.upload_file(str(archive), self.bucket, self._key(tag))
            except (BotoCoreError, ClientError) as exc:
                raise self._failed("take", tag, exc) from None
            size = archive.stat().st_size
        log.info("shared_store.push tag=%s bytes=%d seconds=%.2f", tag, size, time.perf_counter() - started)

    def fetch(self, tag: str) -> bool:
        """Download ``tag`` and import it into the local store; False when the bucket has no such entry."""
        import bentoml
        from botocore.exceptions import BotoCoreError, ClientError

        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="ingrain-import-") as scratch:
            archive = Path(scratch) / "entry.tar"
            try:
                self.client.download_file(self.bucket, self._key(tag), str(archive))
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                    return False
                raise self._failed("give", tag, exc) from None
            except BotoCoreError as exc:
                raise self._failed("give", tag, exc) from None
            try:
                bentoml.models.import_model(str(archive), input_format="tar")
            except bentoml.exceptions.BentoMLException as exc:
                if "already exists" not in str(exc):
                    raise
            size = archive.stat().st_size
        log.info("shared_store.fetch tag=%s bytes=%d seconds=%.2f", tag, size, time.perf_counter() - started)
        return True

    def remove(self, tag: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(tag))
        except (BotoCoreError, ClientError) as exc:
            raise self._failed("remove", tag, exc) from None


class SharedEntries:
    """What the store tells the model state about its entries (``ModelStore`` calls it): each
    entry written is recorded in the desired state (and, with a bucket, copied there first), each
    one deleted is recorded as deleted (and removed from the bucket). With a bucket, an entry
    another replica wrote is found and fetched from there. Calls block: the store runs on threads."""

    def __init__(self, home: StateHome, mirror: S3EntryMirror | None = None) -> None:
        self.home = home
        self.mirror = mirror

    def added(self, tag: str, ref: ModelRef) -> None:
        if self.mirror is not None:
            self.mirror.push(tag)
        update(self.home, lambda state: state.with_entry(tag, ref))

    def removed(self, tag: str) -> None:
        update(self.home, lambda state: state.without_entry(tag))
        if self.mirror is not None:
            self.mirror.remove(tag)

    def shared_tag(self, tag_name: str) -> str | None:
        """The full tag another replica stored under ``tag_name``, if the bucket has one."""
        return self.mirror.version_of(tag_name) if self.mirror is not None else None

    def fetch(self, tag: str) -> bool:
        """Bring ``tag`` from the bucket into the local store; False without a bucket or such an entry."""
        return self.mirror.fetch(tag) if self.mirror is not None else False
