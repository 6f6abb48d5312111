"""The BentoML model store: one complete entry per model, nothing half-written, restart-safe."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import bentoml
import pytest

from ingrain_bento.errors import BadRequest, Conflict, ModelNotFound, UpstreamFailed
from ingrain_bento.families import parse_ref
from ingrain_bento.store import COMPLETE_MARKER, ModelStore, custom_store_name, store_name

from fixtures.hub import hub_that_knows_no_model, point_hub_at


def test_pull_writes_a_labelled_local_dir_folder_once():
    store = ModelStore()
    ref = parse_ref("timm", "test_efficientnet.r160_in1k", False)
    entry = store.pull(ref)
    assert (entry.path / "config.json").is_file() and (entry.path / "model.safetensors").is_file()
    assert (entry.path / COMPLETE_MARKER).is_file()
    labels = bentoml.models.get(entry.tag).info.labels
    assert labels["library"] == "timm" and labels["name"] == ref.name and labels["pretrained"] == "false"
    assert store.pull(ref).tag == entry.tag, "a second pull must not download again"
    assert ModelStore().find(ref) == entry, "a new process sees the same entry"
    import timm

    assert timm.create_model(f"local-dir:{entry.path}", pretrained=True).num_classes == 1000
    store.delete(ref)
    assert store.find(ref) is None


def test_concurrent_pulls_of_one_model_write_one_entry():
    store = ModelStore()
    ref = parse_ref("timm", "test_byobnet.r160_in1k", False)
    tags: list[str] = []
    threads = [threading.Thread(target=lambda: tags.append(store.pull(ref).tag)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(tags)) == 1
    assert len(bentoml.models.list(store_name(ref))) == 1
    store.delete(ref)


def test_a_failed_fetch_leaves_nothing_in_the_store():
    store = ModelStore()
    ref = parse_ref("timm", "no_such_architecture_at_all")
    with pytest.raises(ModelNotFound):
        store.pull(ref)
    assert store.find(ref) is None
    with pytest.raises(bentoml.exceptions.NotFound):
        bentoml.models.list(store_name(ref))


def test_a_write_that_fails_midway_leaves_nothing(tmp_path: Path):
    store = ModelStore()

    def half_written(folder: Path) -> dict:
        (folder / "custom.safetensors").write_bytes(b"partial")
        raise BadRequest("interrupted")

    with pytest.raises(BadRequest):
        store.import_custom("timm", "interrupted-model", half_written, {})
    tag = custom_store_name("timm", "interrupted-model")
    with pytest.raises(bentoml.exceptions.NotFound):
        bentoml.models.get(tag)
    folder = Path(os.environ["BENTOML_HOME"]) / "models" / tag
    assert not folder.exists() or not any(p.is_dir() for p in folder.iterdir()), "a half-written entry was left"


def test_custom_names_are_unique_per_library():
    store = ModelStore()
    store.import_custom("timm", "unique-name", lambda folder: {}, {"num_classes": 3})
    with pytest.raises(Conflict):
        store.import_custom("timm", "unique-name", lambda folder: {}, {"num_classes": 3})
    entry = store.find_unbound("timm", "unique-name")
    assert entry is not None and entry.ref is None and entry.name == entry.pretrained == "unique-name"
    store.delete_tag(entry.tag)


def test_two_processes_sharing_one_store_write_one_entry():
    """Two processes (two servers on one BENTOML_HOME, or the CLI beside a server) pulling the same
    model at once: the file lock makes one download, the other finds it."""
    import os
    import subprocess
    import sys

    ref = parse_ref("timm", "test_convnext2.r160_in1k", False)
    code = ("import sys; from ingrain_bento.store import ModelStore; from ingrain_bento.families import parse_ref; "
            "print(ModelStore().pull(parse_ref('timm', 'test_convnext2.r160_in1k', False)).tag)")
    processes = [subprocess.Popen([sys.executable, "-c", code], env=os.environ.copy(), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
    tags = [process.communicate(timeout=300)[0].strip().splitlines()[-1] for process in processes]
    assert all(process.returncode == 0 for process in processes)
    assert tags[0] == tags[1]
    versions = [p for p in (Path(os.environ["BENTOML_HOME"]) / "models" / store_name(ref)).iterdir() if p.is_dir()]
    assert len(versions) == 1 and (versions[0] / COMPLETE_MARKER).is_file()


RACE = """
import sys, threading
from ingrain_bento.families import parse_ref
from ingrain_bento.store import ModelStore

store = ModelStore()
store.pull(parse_ref("timm", "test_efficientnet.r160_in1k", False))
assert "sentence_transformers" not in sys.modules
importing = threading.Thread(target=lambda: __import__("sentence_transformers"))
importing.start()
reads = 0
while importing.is_alive():
    store.entries()  # raised AttributeError (a half-imported scipy.sparse) before the fix
    reads += 1
importing.join()
print(reads)
"""


def test_the_store_reads_while_another_thread_imports_a_model_library(tmp_path):
    """A first load imports its library (sentence-transformers imports scipy) on a worker thread
    while listings read the store on others; BentoML's metadata check looks scipy.sparse up in
    sys.modules and failed on the half-imported module (a listing during a restart's restore was
    a 500). Run in a fresh interpreter, where nothing is imported yet."""
    import subprocess
    import sys

    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home")}
    result = subprocess.run([sys.executable, "-c", RACE], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.split()[-1]) > 0, "the store was read while the import ran"


@pytest.fixture
def no_model_hub(tmp_path: Path) -> Iterator[str]:
    """huggingface_hub online, pointed at a loopback stand-in that knows no model (fixtures/hub.py)."""
    with hub_that_knows_no_model(tmp_path / "hub-cache") as url:
        yield url


@pytest.mark.parametrize(("library", "name"), [("sentence_transformers", "someone/no-such-model"),
                                               ("timm", "hf-hub:someone/no-such-model")])
def test_a_model_the_hub_says_does_not_exist_is_a_404(no_model_hub, tmp_path, library, name):
    with pytest.raises(ModelNotFound, match="is not on the Hugging Face Hub") as error:
        ModelStore._fetch(parse_ref(library, name), tmp_path)
    assert str(tmp_path) not in error.value.message


def test_the_hub_unreachable_is_a_502_not_a_404(no_model_hub, monkeypatch, tmp_path):
    """A load the Hub never answered is upstream's failure, not an unknown model."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{sock.getsockname()[1]}"  # nothing listens there
    point_hub_at(monkeypatch, nowhere)
    with pytest.raises(UpstreamFailed, match="could not be fetched") as error:
        ModelStore._fetch(parse_ref("sentence_transformers", "someone/some-model"), tmp_path)
    assert error.value.status_code == 502
