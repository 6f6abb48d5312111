"""``RunnerEngine``: the one model state, and inference on prepared items.

Requests queued before an unload are served first, and a request after it loads the model
again (or is refused with a 400 when auto-loading is off); one that meets the unload is sent
again; inputs prepared for another store entry are refused; what is resident is recorded in the
desired model state and loaded again by the next engine (with the engine its
load named, or the next engine's default); the state version is the desired state's
its count of removals: it moves when a model stops being resident or stored, not when one arrives.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from ingrain_bento import schemas as s
from ingrain_bento.batching import BatcherClosed
from ingrain_bento.errors import BadRequest, ModelNotFound, StaleModel
from ingrain_bento.model_state import LocalStateHome, StateHome, StoreUnreachable
from ingrain_bento.runner.engine import RunnerEngine

from fixtures.engine import run_engine

VIT = s.ModelRequest(name="test_vit.r160_in1k", pretrained=False)


def _pixels(count: int) -> list[np.ndarray]:
    return [np.full((160, 160, 3), i, dtype=np.uint8) for i in range(count)]


def run(scenario, home: StateHome | None = None, **settings):
    settings.setdefault("backend", "torch")  # these are about the model state, not an engine
    return run_engine(scenario, home, timeout_s=120, **settings)


def test_requests_queued_before_an_unload_are_served_and_the_next_one_loads_it_again():
    async def scenario(engine: RunnerEngine) -> None:
        await engine.load(VIT, "timm")
        handle = await engine.describe(VIT.name, VIT.pretrained, "timm")
        calls = [asyncio.create_task(engine.infer(handle.ref, "embed_image", handle.tag, [_pixels(3)]))
                 for _ in range(6)]
        await asyncio.sleep(0)  # each call has queued its items
        await engine.pool.unload(handle.ref)  # the pool's unload itself, at once (the route first records it)
        replies = await asyncio.gather(*calls)
        results = [result for reply in replies for result in reply.results]
        assert all(isinstance(r, np.ndarray) and r.shape[0] == 3 for r in results), results
        assert engine.pool.get(handle.ref) is None, "released once they were answered"
        (after,) = (await engine.infer(handle.ref, "embed_image", handle.tag, [_pixels(1)])).results
        assert isinstance(after, np.ndarray) and after.shape[0] == 1, after
        assert engine.pool.get(handle.ref) is not None, "the next request loaded it again"

    run(scenario, max_batch_size=2)


def test_a_request_that_meets_an_unload_is_sent_again_and_served():
    """The model was unloaded between the request taking it and queueing on it (the batcher it
    found is closed): the request uses the model again."""

    async def scenario(engine: RunnerEngine) -> None:
        await engine.load(VIT, "timm")
        handle = await engine.describe(VIT.name, VIT.pretrained, "timm")
        batcher, met = engine.pool.batcher, []

        def closed_once(resident, task):
            if not met:
                met.append(task)
                raise BatcherClosed("The model was unloaded while this request waited: send it again.")
            return batcher(resident, task)

        engine.pool.batcher = closed_once  # type: ignore[method-assign]  # the unload's race, once
        (result,) = (await engine.infer(handle.ref, "embed_image", handle.tag, [_pixels(3)])).results
        assert met == ["embed_image"] and isinstance(result, np.ndarray) and result.shape[0] == 3, result

    run(scenario)


def test_without_auto_loading_an_unloaded_model_is_a_400():
    async def scenario(engine: RunnerEngine) -> None:
        await engine.load(VIT, "timm")
        handle = await engine.describe(VIT.name, VIT.pretrained, "timm")
        await engine.unload(VIT)
        (result,) = (await engine.infer(handle.ref, "embed_image", handle.tag, [_pixels(1)])).results
        assert isinstance(result, BadRequest) and "auto-loading is off" in result.message

    run(scenario, autoload=False)


def test_inputs_prepared_for_another_store_entry_are_refused():
    async def scenario(engine: RunnerEngine) -> None:
        await engine.load(VIT, "timm")
        handle = await engine.describe(VIT.name, VIT.pretrained, "timm")
        (result,) = (await engine.infer(handle.ref, "embed_image", handle.tag + "-old", [_pixels(1)])).results
        assert isinstance(result, StaleModel) and result.status_code == 409

    run(scenario)


def test_describe_gives_the_store_entry_and_capabilities_and_404_for_a_stranger():
    async def scenario(engine: RunnerEngine) -> None:
        await engine.load(VIT, "timm")
        handle = await engine.describe(f"{VIT.name}::false", None, None)
        assert handle.tag == engine.pool.get(handle.ref).stored.tag
        assert set(handle.capabilities) == {"embed_image", "classify"} and handle.embedding_size
        with pytest.raises(ModelNotFound):
            await engine.describe("never-seen", None, None)

    run(scenario)


def test_the_version_moves_when_a_model_leaves_not_when_one_arrives():
    async def scenario(engine: RunnerEngine) -> None:
        await engine.start(preload=[])
        loaded = engine.version
        await engine.load(VIT, "timm")
        assert engine.version == loaded
        handle = await engine.describe(VIT.name, VIT.pretrained, "timm")
        await engine.pool.unload(handle.ref)  # an eviction of a model loaded on demand: no change recorded
        await engine.infer(handle.ref, "embed_image", handle.tag, [_pixels(1)])  # loads it on demand
        assert engine.version == loaded
        await engine.unload(VIT)
        assert engine.version > loaded

    run(scenario)


def _recorded(home: StateHome) -> list[tuple[str, str | None]]:
    return [(model.ref.display_id, model.backend) for model in home.read().state.models.values()]


def _restored(home: StateHome, **settings) -> list[tuple[str, str | None]]:
    async def second(engine: RunnerEngine) -> list[tuple[str, str | None]]:
        await engine.start(preload=[])
        return [(info.id, info.backend) for info in await engine.loaded_models()]

    return run(second, home=home, **settings)


def test_what_is_resident_is_kept_in_the_desired_state_and_restored_by_the_next_runner(tmp_path):
    home = LocalStateHome(tmp_path)

    async def first(engine: RunnerEngine) -> None:
        await engine.load(VIT, "timm")

    run(first, home=home)  # closing the engine (a clean shutdown) keeps the record
    assert _recorded(home) == [("test_vit.r160_in1k::false", None)]
    assert _restored(home) == [("test_vit.r160_in1k::false", "torch")]


def test_a_model_loaded_with_the_default_engine_is_restored_with_the_new_default(tmp_path):
    home = LocalStateHome(tmp_path)

    async def first(engine: RunnerEngine) -> None:
        await engine.load(VIT, "timm")

    run(first, home=home, backend="torch")
    assert _restored(home, backend="onnx") == [("test_vit.r160_in1k::false", "onnx")]


def test_a_model_loaded_with_an_engine_it_named_keeps_it_across_a_restart(tmp_path):
    home = LocalStateHome(tmp_path)

    async def first(engine: RunnerEngine) -> None:
        await engine.load(VIT.model_copy(update={"backend": "torch"}), "timm")

    run(first, home=home, backend="onnx")
    assert _recorded(home) == [("test_vit.r160_in1k::false", "torch")]
    assert _restored(home, backend="onnx") == [("test_vit.r160_in1k::false", "torch")]


def test_an_unreadable_record_restores_nothing_and_management_says_where_it_is(tmp_path):
    home = LocalStateHome(tmp_path)
    home.path.write_text("{not json")

    async def scenario(engine: RunnerEngine) -> None:
        await engine.start(preload=[])
        assert await engine.loaded_models() == []
        with pytest.raises(StoreUnreachable, match="does not parse") as refused:
            await engine.load(VIT, "timm")
        assert refused.value.status_code == 503 and str(tmp_path) in refused.value.message
        assert engine.pool.resident() == []

    run(scenario, home=home)


class BatchRecorder:
    """The engine's metrics hooks, keeping each forward's size."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def record_batch(self, ref, task, backend, stats) -> None:
        self.sizes.append(stats.items)

    def record_outcome(self, ref, ok, seconds) -> None:
        pass

    def record_resident(self, sizes) -> None:
        pass


def test_a_rerank_of_200_documents_runs_as_forwards_of_max_batch_pairs_and_concurrent_ones_share_them(hub_models):
    from ingrain_bento.families import family

    request = s.ModelRequest(name=hub_models["reranker"], library="sentence_transformers")
    recorder = BatchRecorder()

    async def scenario(engine: RunnerEngine) -> None:
        engine.pool.metrics = recorder  # type: ignore[assignment]
        await engine.load(request)
        handle = await engine.describe(request.name, None, request.library)
        entry = engine.store.by_tag(handle.tag)
        preprocessor = family("sentence_transformers").load_preprocessor(entry.path, handle.ref)
        pairs = preprocessor.prepare_pairs("a query", [f"document number {i}" for i in range(200)], None)
        (scores,) = (await engine.infer(handle.ref, "rerank", handle.tag, [pairs])).results
        assert scores.shape == (200, 1)
        assert max(recorder.sizes) <= 64 and sum(recorder.sizes) == 200
        recorder.sizes.clear()
        tens = [preprocessor.prepare_pairs(f"query {q}", [f"doc {q} {i}" for i in range(10)], None) for q in range(10)]
        replies = await asyncio.gather(*(engine.infer(handle.ref, "rerank", handle.tag, [items]) for items in tens))
        assert all(reply.results[0].shape == (10, 1) for reply in replies)
        assert sum(recorder.sizes) == 100 and len(recorder.sizes) < 10, recorder.sizes  # shared forwards

    run(scenario, max_batch_size=64)
