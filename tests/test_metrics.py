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
