"""Several runners, one model state: two ``RunnerEngine``s in this process over one
``LocalStateHome`` and one store, as two runner workers of one machine are.

A load, unload or delete made on one is recorded and followed by the other at its next step;
listings on either show both runners; a pinned model evicted by a load is an unload everywhere;
a runner that cannot fit the desired models says so (``FAILED`` with the reason, and the
``ingrain_desired_models_failed`` gauge); a home that does not answer refuses management with a
503 that names it, while inference keeps serving, and the runners catch up once it answers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest

from ingrain_bento import schemas as s
from ingrain_bento.errors import ModelNotFound
from ingrain_bento.model_state import LocalStateHome, StoreUnreachable
from ingrain_bento.runner.engine import RunnerEngine
from ingrain_bento.settings import Settings

VIT = s.ModelRequest(name="test_vit.r160_in1k", pretrained=False)
RESNET = s.ModelRequest(name="test_resnet.r160_in1k", pretrained=False)


def _pixels(count: int) -> list[np.ndarray]:
    return [np.full((160, 160, 3), i * 40, dtype=np.uint8) for i in range(count)]


Scenario = Callable[[RunnerEngine, RunnerEngine, LocalStateHome], Awaitable[None]]


def two_runners(folder: Path, scenario: Scenario, *, second: dict | None = None, **settings) -> None:
    """Runners ``r/0`` and ``r/1`` (``second``: settings only the second one has), started."""
    settings = {"backend": "torch", "sync_s": 60, **settings}  # steps are taken by hand here

    async def main() -> None:
        home = LocalStateHome(folder)
        a = RunnerEngine(Settings(**settings), home=home, runner_id="r/0")
        b = RunnerEngine(Settings(**{**settings, **(second or {})}), home=home, runner_id="r/1", runner_index=1)
        try:
            await a.start([])
            await b.start([])
            await asyncio.wait_for(scenario(a, b, home), 180)
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def _runners(infos: list[s.ModelInfo], model_id: str) -> dict[str, str]:
    (info,) = [info for info in infos if info.id == model_id]
    return {runner.id: runner.state for runner in info.runners}


def test_a_load_on_one_runner_is_followed_by_the_other_and_both_list_it(tmp_path: Path):
    async def scenario(a: RunnerEngine, b: RunnerEngine, home: LocalStateHome) -> None:
        await a.load(VIT, "timm")
        assert b.pool.resident() == []
        listed = await b.loaded_models()
        assert [info.state for info in listed] == ["LOADING"]  # r/0 holds it, r/1 not yet
        assert _runners(listed, "test_vit.r160_in1k::false") == {"r/0": "READY"}
        await b.sync.step()
        assert [r.model.ref.display_id for r in b.pool.resident()] == ["test_vit.r160_in1k::false"]
        for engine in (a, b):
            listed = await engine.loaded_models()
            assert [info.state for info in listed] == ["READY"]
            assert _runners(listed, "test_vit.r160_in1k::false") == {"r/0": "READY", "r/1": "READY"}
        assert a.sync.generation == b.sync.generation == home.read().state.generation

        handles = [await engine.describe(VIT.name, VIT.pretrained, "timm") for engine in (a, b)]
        assert handles[0].tag == handles[1].tag  # one store entry
        rows = [(await engine.infer(h.ref, "embed_image", h.tag, [_pixels(2)])).results[0]
                for engine, h in zip((a, b), handles, strict=True)]
        np.testing.assert_array_equal(rows[0], rows[1])

    two_runners(tmp_path, scenario)


def test_an_unload_and_a_delete_on_one_runner_reach_the_other(tmp_path: Path):
    async def scenario(a: RunnerEngine, b: RunnerEngine, home: LocalStateHome) -> None:
        await a.load(VIT, "timm")
        await a.load(RESNET, "timm")
        await b.sync.step()
        assert len(b.pool.resident()) == 2
        await b.unload(VIT)  # made on the other runner this time
        await a.sync.step()
        assert [r.model.ref.name for r in a.pool.resident()] == [RESNET.name]
        await a.delete(RESNET)
        await b.sync.step()
        assert b.pool.resident() == []
        for engine in (a, b):
            stored = [info.id for info in await engine.repository_models()]  # the store is this session's
            assert "test_vit.r160_in1k::false" in stored and "test_resnet.r160_in1k::false" not in stored
            with pytest.raises(ModelNotFound):
                await engine.describe(RESNET.name, RESNET.pretrained, "timm")
        with pytest.raises(ModelNotFound):  # unloaded everywhere: not resident on any runner, not recorded
            await a.unload(VIT)

    two_runners(tmp_path, scenario)


def test_a_pinned_model_evicted_by_a_load_is_unloaded_everywhere(tmp_path: Path):
    async def scenario(a: RunnerEngine, b: RunnerEngine, home: LocalStateHome) -> None:
        await a.load(VIT, "timm")
        await b.sync.step()
        await a.load(RESNET, "timm")  # MAX_LOADED_MODELS=1: VIT makes room
        assert [m.name for m in home.read().state.models.values()] == [RESNET.name]
        await b.sync.step()
        assert [r.model.ref.name for r in b.pool.resident()] == [RESNET.name]

    two_runners(tmp_path, scenario, max_loaded_models=1)


class SyncRecorder:
    """The runner's metrics hooks for the sync loop, keeping what each step reported (the gauge
    itself is one per process, which the in-process app's own sync loop also sets)."""

    def __init__(self) -> None:
        self.failed: list[int] = []

    def record_sync(self, generation: int, failed: int) -> None:
        self.failed.append(failed)

    def record_sync_unreachable(self) -> None:
        pass


def test_a_runner_that_cannot_fit_the_desired_models_says_so(tmp_path: Path):
    async def scenario(a: RunnerEngine, b: RunnerEngine, home: LocalStateHome) -> None:
        recorder = SyncRecorder()
        b.sync.metrics = recorder  # type: ignore[assignment]  # what ingrain_desired_models_failed is set to
        await a.load(VIT, "timm")
        await a.load(RESNET, "timm")
        await b.sync.step()  # room for one: the other is refused, never evicting a pinned model
        assert len(b.pool.resident()) == 1
        listed = {info.id: info for info in await a.loaded_models()}
        failed = [runner for info in listed.values() for runner in info.runners if runner.state == "FAILED"]
        assert [runner.id for runner in failed] == ["r/1"]
        assert "does not fit beside the pinned models" in (failed[0].message or "")
        assert {info.state for info in listed.values()} == {"READY", "LOADING"}
        assert recorder.failed == [1]

    two_runners(tmp_path, scenario, second={"max_loaded_models": 1})


def test_an_unreachable_home_refuses_management_keeps_inference_and_is_caught_up_with(tmp_path: Path):
    async def scenario(a: RunnerEngine, b: RunnerEngine, home: LocalStateHome) -> None:
        await a.load(VIT, "timm")
        await b.sync.step()
        handle = await b.describe(VIT.name, VIT.pretrained, "timm")
        record = home.path.read_bytes()
        home.path.write_text("{the home answers nonsense")  # as an unreachable bucket: nothing to read
        with pytest.raises(StoreUnreachable) as refused:
            await a.load(RESNET, "timm")
        assert refused.value.status_code == 503 and str(tmp_path) in refused.value.message
        assert [r.model.ref.name for r in a.pool.resident()] == [VIT.name], "nothing changed"
        with pytest.raises(StoreUnreachable):
            await b.sync.step()
        (rows,) = (await b.infer(handle.ref, "embed_image", handle.tag, [_pixels(1)])).results
        assert isinstance(rows, np.ndarray) and rows.shape[0] == 1
        home.path.write_bytes(record)  # back
        await a.load(RESNET, "timm")
        await b.sync.step()
        assert sorted(r.model.ref.name for r in b.pool.resident()) == sorted([VIT.name, RESNET.name])

    two_runners(tmp_path, scenario)
