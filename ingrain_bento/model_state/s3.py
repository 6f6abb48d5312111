"""The desired state in an S3-compatible bucket: ``s3://bucket/prefix/desired-state.json``.

The swap is S3's conditional write: the first record is created with ``If-None-Match: *`` and
each later one with ``If-Match: <the ETag read>``; a store that finds another record there
answers 412 (or 409 while two such writes race), which is a ``WriteConflict``. AWS S3 has these
since 2024, and MinIO and moto do too.

The client is boto3: the reference S3 client, the one every S3-compatible store documents. It
reads the standard ``AWS_*`` variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``, and ``AWS_ENDPOINT_URL`` for a store other than AWS) and takes the conditional
headers as plain arguments. Its calls block: they are few and small (one record every few
seconds), and an async caller runs them on a thread. Timeouts are short and retries few: an
unreachable bucket must turn into a prompt 503, not a hung management call.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from ingrain_bento.model_state.desired import DesiredState
from ingrain_bento.model_state.home import REPORTS, STATE_FILE, StoreUnreachable, Versioned, WriteConflict, parse_state
from ingrain_bento.model_state.reports import RunnerReport, report_name

__all__ = ["S3StateHome", "split_s3_url"]

CONFLICT_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}


def split_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix")``."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"{url!r} is not an s3://bucket/prefix URL")
    return parts.netloc, parts.path.strip("/")


def s3_client() -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client("s3", config=Config(connect_timeout=3, read_timeout=10,
                                            retries={"max_attempts": 2, "mode": "standard"}))


class S3StateHome:
    """The desired state as one object in a bucket (see the module docstring)."""

    def __init__(self, url: str, client: Any = None) -> None:
        self.bucket, prefix = split_s3_url(url)
        self.prefix = f"{prefix}/" if prefix else ""
        self.key = f"{self.prefix}{STATE_FILE}"
        self.location = url
        self.remote = True
        self.client = client if client is not None else s3_client()

    def _unreachable(self, exc: Exception) -> StoreUnreachable:
        return StoreUnreachable(f"The shared store {self.location} is unreachable ({type(exc).__name__}: {exc}); "
                                "models already resident keep serving.")

    def read(self) -> Versioned:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            reply = self.client.get_object(Bucket=self.bucket, Key=self.key)
            data = reply["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return Versioned(DesiredState(), None)
            raise self._unreachable(exc) from None
        except BotoCoreError as exc:
            raise self._unreachable(exc) from None
        return Versioned(parse_state(data, self.location), str(reply["ETag"]))

    def write(self, state: DesiredState, token: str | None) -> str:
        from botocore.exceptions import BotoCoreError, ClientError

        condition = {"IfNoneMatch": "*"} if token is None else {"IfMatch": token}
        try:
            reply = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=state.model_dump_json(indent=1),
                                           ContentType="application/json", **condition)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            if error.get("Code") in CONFLICT_CODES or status in CONFLICT_CODES:
                raise WriteConflict(self.location) from None
            raise self._unreachable(exc) from None
        except BotoCoreError as exc:
            raise self._unreachable(exc) from None
        return str(reply["ETag"])

    def write_report(self, report: RunnerReport) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=f"{self.prefix}{REPORTS}/{report_name(report.id)}",
                                   Body=report.model_dump_json(), ContentType="application/json")
        except (BotoCoreError, ClientError) as exc:
            raise self._unreachable(exc) from None

    def remove_report(self, runner_id: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=f"{self.prefix}{REPORTS}/{report_name(runner_id)}")
        except (BotoCoreError, ClientError) as exc:
            raise self._unreachable(exc) from None

    def read_reports(self) -> list[RunnerReport]:
        from botocore.exceptions import BotoCoreError, ClientError
        from pydantic import ValidationError

        reports = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                          Prefix=f"{self.prefix}{REPORTS}/")
            keys = [item["Key"] for page in pages for item in page.get("Contents", [])]
            for key in keys:
                try:
                    body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
                    reports.append(RunnerReport.model_validate_json(body))
                except ValidationError:
                    continue
                except ClientError as exc:
                    if exc.response.get("Error", {}).get("Code") not in ("NoSuchKey", "404"):
                        raise
        except (BotoCoreError, ClientError) as exc:
            raise self._unreachable(exc) from None
        return reports
