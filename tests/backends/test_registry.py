"""One list of compute backends (``backends.BACKENDS``): what the API, the settings and the CLI
accept, and how a load opens one, all follow it."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from ingrain_bento import schemas as s
from ingrain_bento.backends import BACKENDS, BackendChoice, BackendSpec, choose_backend
from ingrain_bento.errors import BadRequest
from ingrain_bento.settings import Settings


@pytest.fixture
def third_backend(monkeypatch):
    """A third backend: its module (``open_executor``) and one line in ``BACKENDS``."""
    module = types.ModuleType("fake_backend")
    opened = []

    def open_executor(choice, graphs):
        opened.append((choice.backend, sorted(graphs)))
        return types.SimpleNamespace(backend=choice.backend, device="cpu", dtype="float32", memory_bytes=0)

    module.open_executor = open_executor  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_backend", module)
    monkeypatch.setitem(BACKENDS, "fake", BackendSpec("fake", "fake_backend", server_default=True))
    return opened


def test_a_load_request_takes_the_listed_backends_and_names_them_when_refused():
    for name in BACKENDS:
        assert s.build(s.ModelRequest, name="m", backend=name).backend == name
    with pytest.raises(BadRequest) as refused:
        s.build(s.ModelRequest, name="m", backend="tensorrt")
    assert all(repr(name) in refused.value.message for name in BACKENDS)


def test_a_new_backend_is_one_module_and_one_line(third_backend):
    assert s.build(s.ModelRequest, name="m", backend="fake").backend == "fake"
    assert Settings(INGRAIN_BACKEND="fake").backend == "fake"
    assert choose_backend("fake", "auto", "cpu", "timm") == "fake"
    executor = BackendChoice("fake", torch.device("cpu"), False, None).executor({"forward": object()})
    assert executor.backend == "fake" and third_backend == [("fake", ["forward"])]


def test_the_server_default_takes_only_backends_that_may_be_one():
    assert Settings(INGRAIN_BACKEND="onnx").backend == "onnx"
    with pytest.raises(ValueError, match="INGRAIN_BACKEND"):
        Settings(INGRAIN_BACKEND="onnx-int8")


def test_auto_picks_only_a_backend_that_allows_it(monkeypatch):
    assert choose_backend(None, "auto", "cpu", "timm") == "onnx"
    monkeypatch.setitem(BACKENDS, "onnx", BackendSpec("onnx", "ingrain_bento.backends.onnx", exports=True))
    assert choose_backend(None, "auto", "cpu", "timm") == "torch"


def test_a_backend_that_runs_an_export_needs_one():
    with pytest.raises(ValueError, match="export"):
        BackendChoice("onnx", torch.device("cpu"), False, None).executor({})
