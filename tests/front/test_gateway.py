"""``ModelGateway``: a front worker's caches follow the engine's one model state.

Handles and preprocessors are cached per front worker; when another worker unloads or deletes
a model, the engine's state version moves, every reply carries it, and this worker drops its
caches and asks again. Two gateways over one engine stand for two front workers over one runner.
"""

from __future__ import annotations

import asyncio
import base64
import io

import numpy as np
from PIL import Image

from ingrain_bento import schemas as s
from ingrain_bento.front.gateway import ModelGateway
from ingrain_bento.front.remote_engine import RemoteEngine
from ingrain_bento.runner.engine import RunnerEngine
from ingrain_bento.settings import Settings

from fixtures.transport import GateTransport

VIT = s.ModelRequest(name="test_vit.r160_in1k", pretrained=False)


def _png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_an_unload_through_another_worker_clears_this_workers_caches():
    async def scenario() -> None:
        engine = RunnerEngine(Settings())
        mine, other = ModelGateway(engine, Settings()), ModelGateway(engine, Settings())
        request = s.ImageRequest(name="test_vit.r160_in1k::false", image=_png())
        await mine.load(VIT, "timm")
        first = await mine.embed_image(request, output="features")
        opened = await mine.inputs.preprocessor(next(iter(mine._handles.values())))

        await other.unload(s.ModelRequest(name="test_vit.r160_in1k::false"))
        again = await mine.embed_image(request, output="features")  # auto-loads; its reply carries the new version
        assert np.array_equal(again.embeddings, first.embeddings)
        await mine.embed_image(request, output="features")
        reopened = await mine.inputs.preprocessor(next(iter(mine._handles.values())))
        assert reopened is not opened, "the preprocessor was opened again after the state moved"
        for gateway in (mine, other):
            await gateway.close()
        await engine.close()

    asyncio.run(asyncio.wait_for(scenario(), 120))


def test_a_model_stored_again_through_another_worker_is_prepared_again_here(hub_models):
    """Worker A caches a handle (a store entry); worker B deletes the model and stores it again (a
    new entry). A's next request was prepared for the old entry: the runner refuses it with
    ``StaleModel``, which crosses the wire as that class, and A asks for a fresh handle and
    serves it. (When errors crossed by status only, A answered 409 until another reply moved
    the state version.)"""
    name = hub_models["st"]

    async def scenario() -> None:
        # One backend: the entry stored again is timed again, and ``auto`` could pick the other one.
        engine = RunnerEngine(Settings(backend="torch"))
        mine, other = (ModelGateway(RemoteEngine(GateTransport(engine), max_requests_per_call=8), Settings())
                       for _ in range(2))
        request = s.TextRequest(name=name, text="stored twice")
        await mine.load(s.ModelRequest(name=name), "sentence_transformers")
        first = await mine.embed_text(request)
        old_tag = next(iter(mine._handles.values())).tag

        await other.delete(s.ModelRequest(name=name))
        await other.load(s.ModelRequest(name=name), "sentence_transformers")
        mine._version = engine.version  # A has not seen the delete: only the stale entry tells it
        again = await mine.embed_text(request)
        assert np.array_equal(again.embeddings, first.embeddings)
        assert next(iter(mine._handles.values())).tag != old_tag, "A asked for the new store entry"
        for gateway in (mine, other):
            await gateway.close()
            await gateway.engine.close()  # type: ignore[attr-defined]
        await engine.close()

    asyncio.run(asyncio.wait_for(scenario(), 120))


def test_a_front_that_had_to_load_a_models_weights_says_so_in_its_listing_and_metrics(hub_models, monkeypatch):
    """A front opens each model without its weights. When that open fails (here: a ``device_map``
    naming no device), the front loads the weights on the CPU and still serves the model's
    embeddings, and says so: ``front_weights`` in the listings, and the
    ``ingrain_front_weights_loaded_total`` count, not only a log line."""
    import prometheus_client
    import torch.nn.functional as F
    from sentence_transformers import SentenceTransformer

    from ingrain_bento.families import sentence_transformers
    from ingrain_bento.metrics import RequestMetrics

    from fixtures.compare import MAX_ABS_DIFF, max_abs_diff

    name = hub_models["minilm"]
    texts = ["a front that holds weights", "still serves"]
    monkeypatch.setattr(sentence_transformers, "WEIGHTLESS", {"device_map": {"": "no-such-device"}})

    def fallbacks() -> float:
        return prometheus_client.REGISTRY.get_sample_value("ingrain_front_weights_loaded_total") or 0.0

    def listed(models: list[s.ModelInfo]) -> s.ModelInfo:
        return next(model for model in models if model.name == name)

    async def scenario() -> None:
        engine = RunnerEngine(Settings())
        gateway = ModelGateway(engine, Settings(), RequestMetrics())
        before = fallbacks()
        await gateway.load(s.ModelRequest(name=name), "sentence_transformers")
        assert listed((await gateway.loaded_models()).models).front_weights is None, "not opened by this front yet"
        reply = await gateway.embed_text(s.TextRequest(name=name, text=texts))
        expected = F.normalize(SentenceTransformer(name, device="cpu").encode(texts, convert_to_tensor=True), dim=-1)
        assert max_abs_diff(reply.embeddings, expected, "front holding weights") <= MAX_ABS_DIFF
        for listing in (await gateway.loaded_models(), await gateway.repository_models()):
            reason = listed(listing.models).front_weights
            assert reason is not None and "weightless load failed" in reason, reason
        assert fallbacks() == before + 1
        await gateway.close()
        await engine.close()

    asyncio.run(asyncio.wait_for(scenario(), 180))
