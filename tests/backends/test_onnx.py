"""The ONNX engine: exported once per store entry and kept in the BentoML store, checked against
torch, chosen per load; a model without an export loads with torch and says why.

(The correctness of every family and task on both engines: tests/families, run once per engine.)
"""

from __future__ import annotations

import asyncio
import logging
import time

import bentoml
import numpy as np
import pytest
import torch

from ingrain_bento import schemas as s
from ingrain_bento.backends import Graph, choose_backend
from ingrain_bento.backends.onnx import export_graphs
from ingrain_bento.errors import Conflict
from ingrain_bento.runner.engine import RunnerEngine

from fixtures.engine import run_engine

VIT = s.ModelRequest(name="test_vit.r160_in1k", pretrained=False, library="timm")
CONVNEXT = s.ModelRequest(name="test_convnext.r160_in1k", pretrained=False, library="timm")


def _pixels(count: int) -> list[np.ndarray]:
    return list(np.random.default_rng(1).integers(0, 256, (count, 160, 160, 3), dtype=np.uint8))


def run(scenario, **settings):
    return run_engine(scenario, **settings)


async def _infer(engine: RunnerEngine, request: s.ModelRequest, task: str, items: list) -> np.ndarray:
    handle = await engine.describe(request.name, request.pretrained, request.library)
    (rows,) = (await engine.infer(handle.ref, task, handle.tag, [items])).results
    assert isinstance(rows, np.ndarray), rows
    return rows


def _info(infos: list[s.ModelInfo], request: s.ModelRequest) -> s.ModelInfo:
    return next(info for info in infos if info.name == request.name)


def test_the_first_load_exports_into_the_store_and_later_loads_open_it_without_exporting(caplog):
    caplog.set_level(logging.INFO)

    async def scenario(engine: RunnerEngine) -> None:
        started = time.perf_counter()
        await engine.load(VIT.model_copy(update={"backend": "onnx"}))
        first = time.perf_counter() - started
        assert "backend.export" in caplog.text
        info = _info(await engine.loaded_models(), VIT)
        assert (info.backend, info.fallback, info.exports) == ("onnx", None, ["onnx"])
        entry = engine.pool.get(engine.resolve(VIT.name, VIT.pretrained, "timm")).stored
        (export,) = engine.store.exports_of(entry.tag)
        assert info.memory_bytes == sum(p.stat().st_size for p in export.path.glob("*.onnx")), "the session's weights"
        assert str(bentoml.models.get(export.tag).tag) == export.tag, "bentoml models list shows it"
        onnx_rows = await _infer(engine, VIT, "embed_image", _pixels(3))

        await engine.unload(VIT)
        caplog.clear()
        started = time.perf_counter()
        await engine.load(VIT.model_copy(update={"backend": "onnx"}))
        again = time.perf_counter() - started
        assert "backend.export" not in caplog.text and again < first, (again, first)
        await engine.unload(VIT)
        await engine.load(VIT.model_copy(update={"backend": "torch"}))
        torch_rows = await _infer(engine, VIT, "embed_image", _pixels(3))
        assert np.abs(onnx_rows - torch_rows).max() <= 1e-5

    run(scenario)


def test_deleting_a_model_deletes_its_exports():
    async def scenario(engine: RunnerEngine) -> None:
        await engine.load(CONVNEXT.model_copy(update={"backend": "onnx-int8"}))
        entry = engine.pool.get(engine.resolve(CONVNEXT.name, CONVNEXT.pretrained, "timm")).stored
        assert sorted(e.backend for e in engine.store.exports_of(entry.tag)) == ["onnx", "onnx-int8"]
        await engine.delete(CONVNEXT)
        assert engine.store.exports_of(entry.tag) == []
        assert not [m for m in bentoml.models.list() if m.info.labels.get("export_of") == entry.tag]

    run(scenario)


def test_int8_is_close_to_fp32_and_says_what_it_runs():
    async def scenario(engine: RunnerEngine) -> tuple[np.ndarray, np.ndarray]:
        request = s.ModelRequest(name="test_efficientnet.r160_in1k", pretrained=False, library="timm")
        await engine.load(request.model_copy(update={"backend": "onnx"}))
        exact = await _infer(engine, request, "embed_image", _pixels(4))
        await engine.unload(request)
        await engine.load(request.model_copy(update={"backend": "onnx-int8"}))
        info = _info(await engine.loaded_models(), request)
        assert (info.backend, info.dtype) == ("onnx-int8", "int8")
        return exact, await _infer(engine, request, "embed_image", _pixels(4))

    exact, quantized = run(scenario)
    cosines = (exact * quantized).sum(1) / (np.linalg.norm(exact, axis=1) * np.linalg.norm(quantized, axis=1))
    assert cosines.min() > 0.9, cosines


def test_a_model_resident_with_one_engine_and_loaded_with_another_is_a_409():
    async def scenario(engine: RunnerEngine) -> None:
        await engine.load(VIT.model_copy(update={"backend": "torch"}))
        assert not (await engine.load(VIT)).loaded, "no backend: already loaded, whatever the engine"
        assert not (await engine.load(VIT.model_copy(update={"backend": "torch"}))).loaded
        with pytest.raises(Conflict, match="unload it first"):
            await engine.load(VIT.model_copy(update={"backend": "onnx"}))

    run(scenario)


def test_a_model_that_does_not_export_loads_with_torch_says_why_and_is_not_tried_again(caplog):
    """Here the export cannot finish in time (INGRAIN_EXPORT_TIMEOUT_S): the reason is recorded in
    the store, so the next load falls back at once."""
    caplog.set_level(logging.INFO)
    request = s.ModelRequest(name="test_nfnet.r160_in1k", pretrained=False, library="timm", backend="onnx")

    async def scenario(engine: RunnerEngine) -> None:
        await engine.load(request)
        info = _info(await engine.loaded_models(), request)
        assert info.backend == "torch" and "longer than" in (info.fallback or ""), info
        assert "pool.fallback" in caplog.text and "INGRAIN_EXPORT_TIMEOUT_S" in caplog.text
        await engine.unload(request)
        caplog.clear()
        started = time.perf_counter()
        await engine.load(request)
        assert time.perf_counter() - started < 2.0 and "backend.export" not in caplog.text
        assert _info(await engine.loaded_models(), request).fallback == info.fallback

    run(scenario, export_timeout_s=0.01)


def test_export_refuses_an_op_the_exporter_lacks_and_a_graph_whose_outputs_differ(tmp_path):
    class Eigen(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.linalg.eigvalsh(x @ x.transpose(-1, -2))

    class BakedBatch(torch.nn.Module):  # the batch size becomes a constant when traced
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * int(x.shape[0])

    x = np.ones((2, 3, 3), dtype=np.float32)
    with pytest.raises(RuntimeError, match="torch.onnx.export failed"):
        export_graphs({"g": Graph(Eigen(), {"x": x}, ["y"], {"x": {0: "batch"}, "y": {0: "batch"}})}, tmp_path)
    with pytest.raises(RuntimeError, match="differs from torch"):
        export_graphs({"g": Graph(BakedBatch(), {"x": x}, ["y"], {"x": {0: "batch"}, "y": {0: "batch"}})}, tmp_path)


@pytest.mark.parametrize("requested, default, device, library, chosen", [
    (None, "auto", "cpu", "sentence_transformers", "onnx"),
    (None, "auto", "cpu", "timm", "onnx"),
    (None, "auto", "cuda", "open_clip", "torch"),  # no GPU run measured ONNX Runtime faster there
    (None, "torch", "cpu", "timm", "torch"),
    ("onnx-int8", "auto", "cpu", "timm", "onnx-int8"),
    ("torch", "onnx", "cpu", "timm", "torch"),
])
def test_what_auto_picks(requested, default, device, library, chosen):
    assert choose_backend(requested, default, device, library) == chosen


def test_an_unknown_backend_is_a_400_naming_the_valid_ones(client):
    response = client.post("/load_model", json={"name": "test_vit.r160_in1k", "library": "timm", "pretrained": False,
                                                "backend": "tensorrt"})
    assert response.status_code == 400
    assert all(name in response.json()["message"] for name in ("'torch'", "'onnx'", "'onnx-int8'")), response.text


def test_an_export_never_stalls_the_models_already_serving():
    """The export runs in a child process: while one model exports, another keeps answering."""
    exporting = s.ModelRequest(name="test_byobnet.r160_in1k", pretrained=False, library="timm", backend="onnx")

    async def scenario(engine: RunnerEngine) -> None:
        await engine.load(VIT.model_copy(update={"backend": "torch"}))
        await _infer(engine, VIT, "embed_image", _pixels(1))
        load = asyncio.create_task(engine.load(exporting))
        await asyncio.sleep(1.0)  # the exporter is running
        slowest = 0.0
        served = 0
        while not load.done():
            started = time.perf_counter()
            await _infer(engine, VIT, "embed_image", _pixels(1))
            slowest, served = max(slowest, time.perf_counter() - started), served + 1
            await asyncio.sleep(0.05)
        await load
        assert served >= 5 and slowest < 1.0, (served, slowest)
        assert _info(await engine.loaded_models(), exporting).backend == "onnx"

    run(scenario)


def test_ten_loads_and_unloads_free_their_sessions(hub_models):
    from pathlib import Path

    def rss_mb() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    request = s.ModelRequest(name=hub_models["minilm"], library="sentence_transformers", backend="onnx")

    async def scenario(engine: RunnerEngine) -> list[float]:
        sizes = []
        for _ in range(11):
            await engine.load(request)
            await engine.unload(request)
            sizes.append(rss_mb())
        return sizes

    sizes = run(scenario)
    assert sizes[-1] - sizes[0] < 50, sizes  # the first cycle exports and imports ONNX Runtime
