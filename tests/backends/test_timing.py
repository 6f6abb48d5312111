"""``auto`` measured on the machine (``backends.timing``): a model's first export times torch against
ONNX Runtime, the figures stay with the export in the store, ``auto`` loads the faster one and the
listings say which and why; an explicit backend still wins.

Which backend is faster on this machine is whatever was measured: the tests read the recorded
figures (or change them, from the measured ones) and check that ``auto`` follows them."""

from __future__ import annotations

import asyncio
import copy
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ingrain_bento import schemas as s
from ingrain_bento.backends import choose_backend, pick_auto
from ingrain_bento.backends.onnx import export_graphs
from ingrain_bento.backends.timing import BUDGET_S, CASES, IMAGE_BATCH, MARGIN, TEXT_BATCH, TEXT_TOKENS, time_backends
from ingrain_bento.errors import Conflict
from ingrain_bento.families import family, parse_ref
from ingrain_bento.runner.engine import RunnerEngine
from ingrain_bento.store import ModelStore, StoredModel

from fixtures.engine import run_engine


def run(scenario: Callable[[RunnerEngine], Any], **settings: Any) -> Any:
    return run_engine(scenario, **settings)


@pytest.fixture
def st(hub_models: dict[str, str]) -> s.ModelRequest:
    """The tiny sentence-transformers model (a 2-layer BERT with all-MiniLM-L6-v2's tokenizer)."""
    return s.ModelRequest(name=hub_models["st"], library="sentence_transformers")


def _info(infos: list[s.ModelInfo], request: s.ModelRequest) -> s.ModelInfo:
    return next(info for info in infos if info.name == request.name)


async def _stored_without_exports(engine: RunnerEngine, request: s.ModelRequest) -> StoredModel:
    """The model's store entry, with no export yet (another test may have made one)."""
    entry = await asyncio.to_thread(engine.store.pull, engine.resolve(request.name, request.pretrained,
                                                                      request.library))
    for export in engine.store.exports_of(entry.tag):
        engine.store.delete_tag(export.tag, shared=False)
    return entry


def _timing(store: ModelStore, entry: StoredModel) -> dict[str, Any]:
    export = store.find_export(entry, "onnx")
    assert export is not None
    return copy.deepcopy(dict(export.metadata["report"]["timing"]))


def _record_figures(store: ModelStore, entry: StoredModel, ms: dict[str, dict[str, float]]) -> None:
    """Store the model's onnx export again, its graphs as they are, with these figures (per case)."""
    export = store.find_export(entry, "onnx")
    assert export is not None
    report = copy.deepcopy(dict(export.metadata["report"]))
    for case, figures in ms.items():
        report["timing"]["cases"][case]["ms"] = figures
    with tempfile.TemporaryDirectory() as scratch:
        for graph in export.path.glob("*.onnx"):
            shutil.copy2(graph, scratch)
        store.delete_tag(export.tag, shared=False)
        store.write_export(entry, "onnx", Path(scratch), report)


def _totals(timing: dict[str, Any]) -> dict[str, float]:
    """Per backend, what auto compares: a batch plus one item."""
    return {backend: sum(timing["cases"][case]["ms"][backend] for case in CASES) for backend in ("torch", "onnx")}


def _picked(totals: dict[str, float]) -> str:
    """torch only when it is more than MARGIN faster than onnx (the table's pick on a CPU)."""
    return "torch" if totals["torch"] < totals["onnx"] * (1 - MARGIN) else "onnx"


def _favouring(faster: str, timing: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The measured figures, changed so that ``faster`` is clearly faster in every case."""
    slower = "onnx" if faster == "torch" else "torch"
    out = {}
    for case in CASES:
        ms = timing["cases"][case]["ms"]
        out[case] = {faster: round(min(ms.values()) / 2, 3), slower: max(ms.values())}
    return out


def test_a_first_auto_load_times_both_backends_keeps_the_figures_and_loads_the_faster(st, caplog):
    caplog.set_level(logging.INFO)

    async def scenario(engine: RunnerEngine) -> None:
        entry = await _stored_without_exports(engine, st)
        await engine.load(st)  # no backend: the server's default, auto
        timing = _timing(engine.store, entry)
        assert timing["device"] == "cpu" and timing["threads"] >= 1 and 0 < timing["seconds"] < 20, timing
        batch, one = timing["cases"]["batch"], timing["cases"]["one"]
        items = batch["graphs"]["forward"]["items"]
        assert batch["graphs"] == {"forward": {"items": items, "item": f"{TEXT_TOKENS} tokens"}}, batch
        assert one["graphs"] == {"forward": {"items": 1, "item": f"{TEXT_TOKENS} tokens"}}, one
        # a full batch, unless one item was slow enough (a busy machine) that it would not fit the budget
        room = BUDGET_S * 3 / 4 * 1000 / (2 * 3 * max(one["ms"].values()))
        assert (items == TEXT_BATCH) if room >= TEXT_BATCH + 1 else (2 <= items <= TEXT_BATCH), (items, one)
        assert set(batch["ms"]) == set(one["ms"]) == {"torch", "onnx"}
        assert all(value > 0 for case in (batch, one) for value in case["ms"].values())
        totals = _totals(timing)
        faster = _picked(totals)

        info = _info(await engine.loaded_models(), st)
        assert (info.backend, info.fallback) == (faster, None), info
        assert info.auto_pick is not None and info.auto_pick.backend == faster and info.auto_pick.device == "cpu"
        assert info.auto_pick.ms == pytest.approx(totals)
        assert f"{faster} {totals[faster]:.1f} ms vs" in info.auto_pick.why, info.auto_pick.why
        assert f"batch {batch['ms'][faster]:.1f} vs" in info.auto_pick.why
        assert f"{items} x {TEXT_TOKENS} tokens" in info.auto_pick.why
        assert f"pool.auto model={entry.tag} picks {faster}" in caplog.text
        wire = s.ModelListResponse(models=[info]).model_dump(mode="json", by_alias=True)["models"][0]
        assert wire["autoPick"]["backend"] == faster, wire

        await engine.unload(st)
        listed = _info(await engine.repository_models(), st)
        assert listed.auto_pick == info.auto_pick, "the figures stay with the store entry"

    run(scenario)


def test_auto_follows_the_recorded_figures_and_an_explicit_backend_still_wins(st):
    async def scenario(engine: RunnerEngine) -> None:
        entry = await _stored_without_exports(engine, st)
        await engine.load(st)
        await engine.unload(st)
        measured = _timing(engine.store, entry)
        for faster, slower in (("torch", "onnx"), ("onnx", "torch")):
            figures = _favouring(faster, measured)
            _record_figures(engine.store, entry, figures)
            await engine.load(st)
            info = _info(await engine.loaded_models(), st)
            assert (info.backend, info.fallback) == (faster, None), (figures, info)
            assert info.auto_pick is not None and info.auto_pick.backend == faster
            assert info.auto_pick.ms == pytest.approx({b: sum(figures[c][b] for c in CASES) for b in figures["one"]})
            assert not (await engine.load(st)).loaded, "no backend: resident as it is"
            with pytest.raises(Conflict, match="unload it first"):
                await engine.load(st.model_copy(update={"backend": slower}))
            await engine.unload(st)

            await engine.load(st.model_copy(update={"backend": slower}))  # the load's own backend wins
            info = _info(await engine.loaded_models(), st)
            assert info.backend == slower and info.auto_pick is not None and info.auto_pick.backend == faster
            await engine.unload(st)

    run(scenario)


def test_a_server_default_other_than_auto_wins_over_the_figures(st):
    async def scenario(engine: RunnerEngine) -> None:
        entry = await _stored_without_exports(engine, st)
        await engine.load(st.model_copy(update={"backend": "onnx"}))
        await engine.unload(st)
        _record_figures(engine.store, entry, _favouring("torch", _timing(engine.store, entry)))
        await engine.load(st)
        info = _info(await engine.loaded_models(), st)
        assert info.backend == "onnx" and info.auto_pick is not None and info.auto_pick.backend == "torch"
        await engine.unload(st)

    run(scenario, backend="onnx")


def test_the_timing_of_an_image_model_is_bounded_and_sized_to_its_input(tmp_path):
    ref = parse_ref("timm", "test_vit.r160_in1k", False)
    entry = ModelStore().pull(ref)
    graphs = family("timm").graphs(entry.path)
    export_graphs(graphs, tmp_path)
    timing = time_backends(graphs, "onnx", tmp_path, None, budget_s=1.0)
    assert timing["seconds"] < 5.0, timing  # soft: one warm and one timed run each, at least
    (graph,) = timing["cases"]["batch"]["graphs"].values()
    assert 2 <= graph["items"] <= IMAGE_BATCH and graph["item"] == "160x160x3", graph
    assert timing["cases"]["one"]["graphs"]["image"]["items"] == 1
    assert all(value > 0 for value in timing["cases"]["batch"]["ms"].values())


MEASURED = {"device": "cpu", "threads": 2, "seconds": 1.0, "cases": {
    "batch": {"ms": {"torch": 3.0, "onnx": 2.0}, "graphs": {"forward": {"items": 32, "item": "32 tokens"}}},
    "one": {"ms": {"torch": 1.0, "onnx": 0.5}, "graphs": {"forward": {"items": 1, "item": "32 tokens"}}}}}


def test_torch_must_be_clearly_faster_to_overturn_the_table():
    def timed(torch_ms: float) -> dict[str, Any]:
        timing = copy.deepcopy(MEASURED)
        timing["cases"]["batch"]["ms"]["torch"] = torch_ms - 1.0  # the one item: torch 1.0 ms
        return {"graphs": {}, "timing": timing}

    onnx_total = 2.5
    clearly, barely = onnx_total * (1 - MARGIN) * 0.99, onnx_total * (1 - MARGIN) * 1.01
    assert pick_auto("onnx", "cpu", timed(clearly)).backend == "torch"
    close = pick_auto("onnx", "cpu", timed(barely))
    assert close.backend == "onnx" and "the table's pick stays" in close.why, close
    assert close.ms == pytest.approx({"torch": barely, "onnx": onnx_total}, rel=1e-3)


def test_without_figures_for_its_device_auto_keeps_the_table_and_without_an_export_it_is_torch():
    report = {"graphs": {}, "timing": MEASURED}
    assert pick_auto("onnx", "cpu", report).ms == {"torch": 4.0, "onnx": 2.5}
    cuda = pick_auto("onnx", "cuda", report)  # measured on the CPU only: the table's pick there
    assert (cuda.backend, cuda.ms) == ("onnx", {}) and "measured on cpu only" in cuda.why
    assert choose_backend(None, "auto", "cuda", "timm", report) == "torch"  # the table: torch on CUDA
    untimed = pick_auto("onnx", "cpu", {"graphs": {}})  # an export made before exports were timed
    assert (untimed.backend, untimed.ms) == ("onnx", {}) and "backends.AUTO" in untimed.why
    failed = pick_auto("onnx", "cpu", {"failure": "an op the exporter lacks", "graphs": {}})
    assert failed.backend == "torch" and "an op the exporter lacks" in failed.why
    timing_failed = pick_auto("onnx", "cpu", {"graphs": {}, "timing": {"device": "cpu", "failure": "it broke"}})
    assert timing_failed.backend == "onnx" and "it broke" in timing_failed.why
    assert choose_backend("torch", "auto", "cpu", "timm", report) == "torch"
    assert choose_backend(None, "auto", "cpu", "timm", report) == "onnx"
