"""``ModelMetrics``: what ``/ingrain_metrics`` (and Prometheus) report about inference.

Ingrain's JSON counts items inferred (``inferenceCount``) and forward passes
(``executionCount``) per model, with one ``batchStats`` entry per batch size seen.
Tokenization runs through a batcher too, and is not counted as inference.
"""

from __future__ import annotations


def _stats(client, model_id: str) -> dict:
    entries = client.get("/ingrain_metrics").json()["modelStats"]
    return next((entry for entry in entries if entry["name"] == model_id),
                {"inferenceCount": "0", "executionCount": "0"})


def test_each_text_is_counted_once_and_each_forward_once(client, hub_models):
    name = hub_models["st"]
    assert client.post("/load_sentence_transformer_model", json={"name": name}).status_code == 200
    before = _stats(client, name)
    for texts in (["one", "two", "three"], ["four", "five"]):
        assert client.post("/embed_text", json={"name": name, "text": texts}).status_code == 200
    after = _stats(client, name)
    assert int(after["inferenceCount"]) - int(before["inferenceCount"]) == 5
    assert int(after["executionCount"]) - int(before["executionCount"]) == 2  # sequential requests: a forward each
    assert {"3", "2"} <= {entry["batchSize"] for entry in after["batchStats"]}


def test_requests_are_written_at_once_after_a_quiet_second_and_then_once_a_second():
    """``RequestMetrics``: under load, one write per model and route a second; nothing is lost."""
    import asyncio

    from prometheus_client import REGISTRY

    from ingrain_bento.metrics import RequestMetrics

    labels = {"model": "flush-test", "route": "embed_text", "status": "ok"}

    def counted() -> float:
        return REGISTRY.get_sample_value("ingrain_requests_total", labels) or 0.0

    def observed() -> float:
        return REGISTRY.get_sample_value("ingrain_request_latency_seconds_count",
                                         {"model": "flush-test", "route": "embed_text"}) or 0.0

    async def main() -> None:
        metrics = RequestMetrics()
        metrics.requests.FLUSH_S = 0.3
        start, start_observed = counted(), observed()
        metrics.record_request("flush-test", "embed_text", True, 0.01)
        assert counted() == start + 1, "the first request after a quiet spell is written at once"
        for _ in range(5):
            metrics.record_request("flush-test", "embed_text", True, 0.02)
        assert counted() == start + 1, "the next ones wait for the flush"
        await asyncio.sleep(0.5)
        assert counted() == start + 6 and observed() == start_observed + 6
        metrics.record_request("flush-test", "embed_text", True, 0.01)
        metrics.flush()  # what the gateway does when the worker stops
        assert counted() == start + 7

    asyncio.run(main())


def test_forwards_are_written_at_once_after_a_quiet_second_and_then_once_a_second():
    """``ModelMetrics.record_batch``: Ingrain's statistics at once, the Prometheus series of the
    forwards by the same ``Deferred``; nothing is lost, ``flush`` (at the runner's close) writes the rest."""
    import asyncio

    from prometheus_client import REGISTRY

    from ingrain_bento.batching import BatchStats
    from ingrain_bento.metrics import ModelMetrics
    from ingrain_bento.refs import ModelRef

    ref = ModelRef("sentence_transformers", "flush-forwards", None)
    labels = {"model": ref.display_id, "task": "embed_text", "backend": "torch"}

    def items() -> float:
        return REGISTRY.get_sample_value("ingrain_items_total", labels) or 0.0

    def forwards() -> float:
        return REGISTRY.get_sample_value("ingrain_batch_size_count", labels) or 0.0

    def padded() -> float:
        return REGISTRY.get_sample_value("ingrain_padded_tokens_total",
                                         {"model": ref.display_id, "task": "embed_text"}) or 0.0

    async def main() -> None:
        metrics = ModelMetrics()
        metrics.forwards.FLUSH_S = 0.3
        start_items, start_forwards, start_padded = items(), forwards(), padded()
        metrics.record_batch(ref, "embed_text", "torch", BatchStats(3, 1_000_000, 12, 15))
        assert (items(), forwards()) == (start_items + 3, start_forwards + 1), "the first one at once"
        for size in (1, 2, 4):
            metrics.record_batch(ref, "embed_text", "torch", BatchStats(size, 2_000_000, size * 5, size * 6))
        assert items() == start_items + 3, "the next ones wait for the flush"
        assert metrics.ingrain_json()["modelStats"][0]["executionCount"] == "4", "Ingrain's statistics do not"
        await asyncio.sleep(0.5)
        assert (items(), forwards(), padded()) == (start_items + 10, start_forwards + 4, start_padded + 15 + 42)
        metrics.record_batch(ref, "embed_text", "torch", BatchStats(2, 1_000_000))
        metrics.flush()
        assert (items(), forwards()) == (start_items + 12, start_forwards + 5)

    asyncio.run(main())
