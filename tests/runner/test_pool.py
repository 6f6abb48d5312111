"""Resident models: one load per storm, capacity that rejects or evicts, unloads that never hang."""

from __future__ import annotations

import asyncio

import pytest

from ingrain_bento.errors import AtCapacity, ModelNotFound
from ingrain_bento.families import parse_ref
from ingrain_bento.families.base import LIBRARY_IMPORTS
from ingrain_bento.refs import ModelRef
from ingrain_bento.runner.pool import ModelPool
from ingrain_bento.settings import Settings
from ingrain_bento.store import ModelStore
from ingrain_bento.tasks import EMBED_IMAGE

A = parse_ref("timm", "test_vit.r160_in1k", False)
B = parse_ref("timm", "test_convnext.r160_in1k", False)
C = parse_ref("timm", "test_nfnet.r160_in1k", False)


def _pool(**settings: object) -> ModelPool:
    settings.setdefault("backend", "torch")  # the pool's own logic; the engines have tests/engines
    return ModelPool(ModelStore(), Settings(**settings))


def _pixels(count: int) -> list:
    """Pixel items as the front sends them: uint8 HWC arrays (test_vit's 160x160 input)."""
    import numpy as np

    return [np.zeros((160, 160, 3), dtype=np.uint8) for _ in range(count)]


def test_a_storm_of_loads_loads_once():
    async def scenario() -> list[bool]:
        pool = _pool()
        results = await asyncio.gather(*(pool.load(A) for _ in range(8)))
        assert len(pool.resident()) == 1
        await pool.close()
        return results

    assert sorted(asyncio.run(scenario())) == [False] * 7 + [True]


def test_a_model_is_opened_only_while_no_other_thread_imports_the_libraries():
    """transformers' lazy module hands a second importing thread a half-built namespace: the pool
    opens a model under ``LIBRARY_IMPORTS``, the lock the front holds while it imports the libraries
    in the background and opens preprocessors (a restore beside a front's first imports)."""
    import threading

    async def scenario() -> None:
        pool = _pool()
        await pool.load(A)  # stored now: the load below is the open alone
        await pool.unload(A)
        importing, done = threading.Event(), threading.Event()

        def import_in_the_background() -> None:
            with LIBRARY_IMPORTS:
                importing.set()
                done.wait(30)

        holder = threading.Thread(target=import_in_the_background)
        holder.start()
        importing.wait(5)
        load = asyncio.create_task(pool.load(A))
        await asyncio.sleep(3)
        opened_meanwhile = load.done()
        done.set()
        assert await asyncio.wait_for(load, 60)
        holder.join()
        await pool.close()
        assert not opened_meanwhile, "the model was opened while another thread imported the libraries"

    asyncio.run(scenario())


def test_reject_policy_answers_503_at_capacity():
    async def scenario() -> None:
        pool = _pool(max_loaded_models=1, eviction="reject")
        await pool.load(A)
        with pytest.raises(AtCapacity) as error:
            await pool.load(B)
        assert "MAX_LOADED_MODELS=1" in error.value.message
        await pool.close()

    asyncio.run(scenario())


def test_evict_policy_unloads_the_least_recently_used_idle_model():
    async def scenario() -> None:
        pool = _pool(max_loaded_models=2, eviction="evict")
        await pool.load(A)
        await pool.load(B)
        async with pool.use(A):
            pass  # A is now more recently used than B
        await pool.load(C)
        assert {r.model.ref for r in pool.resident()} == {A, C}
        await pool.close()

    asyncio.run(scenario())


def test_a_model_loaded_on_demand_is_evicted_before_a_pinned_one_and_a_pinned_eviction_is_told():
    evicted: list[ModelRef] = []

    async def told(ref: ModelRef) -> None:
        evicted.append(ref)

    async def scenario() -> None:
        pool = ModelPool(ModelStore(), Settings(backend="torch", max_loaded_models=2), on_evict=told)
        await pool.load(A)  # pinned (the API's load)
        await pool.wait_resident(B, None)  # on demand (a request's)
        async with pool.use(A):
            pass  # A is now more recently used than B, and B the least recently used anyway
        await pool.load(C)
        assert {r.model.ref for r in pool.resident()} == {A, C} and evicted == []
        await pool.load(B)  # only pinned models left: the least recently used one goes, and it is told
        assert evicted == [A]
        await pool.close()

    asyncio.run(scenario())


def test_a_restore_never_evicts_a_pinned_model_it_says_why_instead():
    async def scenario() -> None:
        pool = _pool(max_loaded_models=1)
        await pool.load(A)
        failed = await pool.restore([(B, None)])
        assert list(failed) == [B] and "does not fit beside the pinned models" in str(failed[B])
        assert [r.model.ref for r in pool.resident()] == [A]
        await pool.close()

    asyncio.run(scenario())


def test_a_busy_model_is_never_evicted_under_its_requests():
    async def scenario() -> None:
        pool = _pool(max_loaded_models=1, eviction="evict")
        await pool.load(A)
        async with pool.use(A):
            with pytest.raises(AtCapacity):
                await pool.load(B)
            assert pool.get(A) is not None
        await pool.load(B)
        assert pool.get(A) is None and pool.get(B) is not None
        await pool.close()

    asyncio.run(scenario())


def test_unload_lets_queued_requests_finish_and_later_ones_get_a_clean_error():
    async def scenario() -> None:
        pool = _pool(max_batch_size=2)
        await pool.load(A)

        async def infer() -> int:
            async with pool.use(A) as resident:
                rows = await pool.batcher(resident, EMBED_IMAGE).submit(_pixels(3))
                return rows.shape[0]

        requests = [asyncio.create_task(infer()) for _ in range(6)]
        await asyncio.sleep(0)
        await asyncio.wait_for(pool.unload(A), 60)
        finished = await asyncio.wait_for(asyncio.gather(*requests, return_exceptions=True), 60)
        assert all(r == 3 or isinstance(r, AtCapacity) for r in finished), finished
        assert any(r == 3 for r in finished)
        with pytest.raises(ModelNotFound):
            await pool.unload(A)
        await pool.close()

    asyncio.run(scenario())


def test_memory_budget_counts_measured_bytes():
    async def scenario() -> None:
        pool = _pool(max_model_memory=10**12)
        await pool.load(A)
        resident = pool.get(A)
        assert resident is not None and resident.model.memory_bytes > 0
        b_weights = int(ModelStore().pull(B).metadata["weights_bytes"])
        tight = _pool(max_model_memory=resident.model.memory_bytes + b_weights - 1, eviction="reject")
        await tight.load(A)
        with pytest.raises(AtCapacity):
            await tight.load(B)
        await tight.close()
        await pool.close()

    asyncio.run(scenario())


def test_a_load_freezes_the_heap_out_of_full_collections_and_unload_still_frees_the_model():
    """Full collections skip what was alive after a load (a pause of ~0.36 s otherwise), and an
    unloaded model is still freed."""
    import gc
    import weakref

    async def scenario() -> weakref.ref:
        pool = _pool()
        await pool.load(A)
        module = pool.get(A).model.executor.graphs["image"].module
        tracked = {id(obj) for obj in gc.get_objects()}  # the permanent generation is not listed
        assert id(module) not in tracked and gc.get_freeze_count() > 0
        unloaded = weakref.ref(module)
        del module, tracked
        await pool.unload(A)
        await pool.close()
        return unloaded

    assert asyncio.run(scenario())() is None


def test_an_onnx_text_forward_on_a_cpu_defaults_to_a_smaller_token_budget():
    """Under ONNX Runtime on a CPU long texts run a few at a time (their forwards cost less per token
    when small, README "Texts of mixed lengths"); torch on a CPU and a GPU keep MAX_BATCH_SIZE x half
    the context; the setting wins."""
    from types import SimpleNamespace

    def minilm(device: str, backend: str, context_length: int = 256) -> SimpleNamespace:
        return SimpleNamespace(device=device, backend=backend, context_length=context_length)

    pool = _pool()
    assert pool.max_batch_tokens(minilm("cpu", "onnx")) == 64 * 32
    assert pool.max_batch_tokens(minilm("cpu", "torch")) == 64 * 128
    assert pool.max_batch_tokens(minilm("cuda:0", "onnx")) == 64 * 128
    assert pool.max_batch_tokens(minilm("cpu", "onnx", context_length=32)) == 64 * 16
    assert _pool(max_batch_tokens=9000).max_batch_tokens(minilm("cpu", "onnx")) == 9000
