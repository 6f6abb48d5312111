"""Text classification (API.md "More tasks"): ``/classify_text``, TEI's ``/predict`` and ``POST /``,
Infinity's ``/classify``, each against the whole app in-process and compared with ``transformers``'
own model on the same weights."""

from __future__ import annotations

import numpy as np
import pytest

import service

TEXTS = ["I loved this film, every minute of it", "terrible", "the weather is a bit cloudy today"]


def transformers_scores(name: str, texts: list[str], multi_label: bool) -> tuple[np.ndarray, list[str]]:
    """The library's own answer: ``AutoModelForSequenceClassification`` on the tokenizer's batch,
    softmax (sigmoid for a multi-label model) of its logits."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name)
    model = AutoModelForSequenceClassification.from_pretrained(name).eval()
    with torch.no_grad():
        logits = model(**tokenizer(texts, padding=True, truncation=True, return_tensors="pt")).logits
    scores = torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=-1)
    return scores.numpy(), [model.config.id2label[i] for i in range(model.config.num_labels)]


@pytest.fixture(autouse=True)
def classifiers(client, hub_models):
    """Both classifiers resident, loaded as any sentence-transformers model is."""
    for model in ("classifier", "multilabel"):
        response = client.post("/load_model", json={"name": hub_models[model], "library": "sentence_transformers"})
        assert response.status_code == 200, response.text


def by_label(predictions: list[dict]) -> dict[str, float]:
    return {p["label"]: p["score"] for p in predictions}


@pytest.mark.parametrize(("model", "multi_label"), [("classifier", False), ("multilabel", True)])
def test_classify_text_scores_equal_transformers(client, hub_models, model, multi_label):
    name = hub_models[model]
    response = client.post("/classify_text", json={"name": name, "text": TEXTS})
    assert response.status_code == 200, response.text
    body = response.json()
    expected, labels = transformers_scores(name, TEXTS, multi_label)
    assert len(body["predictions"]) == len(TEXTS) and body["processingTimeMs"] > 0
    for row, scores in zip(body["predictions"], expected, strict=True):
        assert [p["score"] for p in row] == sorted((p["score"] for p in row), reverse=True)  # best first
        got = by_label(row)
        assert set(got) == set(labels)
        np.testing.assert_allclose([got[label] for label in labels], scores, atol=1e-5)
    assert abs(sum(by_label(body["predictions"][0]).values()) - 1.0) < 1e-5 or multi_label


def test_both_backends_give_the_same_scores(client, hub_models):
    """Loaded on ONNX Runtime (``auto`` on a CPU) and on torch, equal to transformers either way."""
    name = hub_models["classifier"]
    expected, labels = transformers_scores(name, TEXTS, False)
    for backend in ("onnx", "torch"):
        assert client.post("/unload_model", json={"name": name}).status_code == 200
        loaded = client.post("/load_model", json={"name": name, "library": "sentence_transformers", "backend": backend})
        assert loaded.status_code == 200, loaded.text
        listed = next(m for m in client.get("/loaded_models").json()["models"] if m["name"] == name)
        assert listed["backend"] == backend and listed["fallback"] is None
        rows = client.post("/classify_text", json={"name": name, "text": TEXTS}).json()["predictions"]
        got = [[by_label(row)[label] for label in labels] for row in rows]
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_the_model_lists_its_task_and_labels(client, hub_models):
    name = hub_models["classifier"]
    listed = next(m for m in client.get("/loaded_models").json()["models"] if m["name"] == name)
    assert listed["capabilities"] == ["classify_text"]
    labels = client.get("/model_classification_labels", params={"name": name}).json()["labels"]
    assert labels == ["negative", "neutral", "positive"]


def test_top_k_and_raw_scores(client, hub_models):
    name = hub_models["classifier"]
    best = client.post("/classify_text", json={"name": name, "text": TEXTS[0], "top_k": 1}).json()["predictions"]
    full = client.post("/classify_text", json={"name": name, "text": TEXTS[0]}).json()["predictions"]
    assert best == [full[0][:1]]
    raw = client.post("/classify_text", json={"name": name, "text": TEXTS[0], "raw_scores": True}).json()
    logits = np.array([by_label(raw["predictions"][0])[label] for label in ("negative", "neutral", "positive")])
    probabilities = np.exp(logits) / np.exp(logits).sum()
    np.testing.assert_allclose([by_label(full[0])[label] for label in ("negative", "neutral", "positive")],
                               probabilities, atol=1e-5)


def same_predictions(got: list, expected: list) -> bool:
    """The same labels in the same order, scores equal within float noise (a text alone and in a
    batch of three pads differently)."""
    return [p["label"] for p in got] == [p["label"] for p in expected] and np.allclose(
        [p["score"] for p in got], [p["score"] for p in expected], atol=1e-6)


def test_teis_predict_and_infinitys_classify(client, hub_models, monkeypatch):
    name = hub_models["classifier"]
    monkeypatch.setattr(service.SETTINGS, "default_model", name)
    native = client.post("/classify_text", json={"name": name, "text": TEXTS}).json()["predictions"]
    one = client.post("/predict", json={"inputs": TEXTS[0]})
    assert one.status_code == 200, one.text
    assert same_predictions(one.json(), native[0])  # one text: one list
    several = client.post("/predict", json={"inputs": TEXTS}).json()
    assert len(several) == len(TEXTS) and all(map(same_predictions, several, native))
    root = client.post("/", json={"inputs": TEXTS[0], "parameters": {"top_k": 2}})
    assert root.status_code == 200 and len(root.json()) == 1  # huggingface_hub's text_classification
    assert same_predictions(root.json()[0], native[0][:2])
    infinity = client.post("/classify", json={"model": name, "input": TEXTS})
    assert infinity.status_code == 200, infinity.text
    assert infinity.json()["object"] == "classify" and all(map(same_predictions, infinity.json()["data"], native))


def test_a_plain_reranker_stays_a_reranker(client, hub_models):
    name = hub_models["reranker_hf"]
    assert client.post("/load_model", json={"name": name, "library": "sentence_transformers"}).status_code == 200
    response = client.post("/classify_text", json={"name": name, "text": "hello"})
    assert response.status_code == 400 and "/rerank" in response.json()["message"]


def test_bad_input_says_what_to_fix(client, hub_models):
    name = hub_models["classifier"]
    assert client.post("/classify_text", json={"name": name, "text": []}).status_code in (400, 422)
    embedder = client.post("/embed_text", json={"name": name, "text": "hello"})
    assert embedder.status_code == 400 and "/classify_text" in embedder.json()["message"]
    client.post("/load_model", json={"name": hub_models["st"], "library": "sentence_transformers"})
    on_embedder = client.post("/classify_text", json={"name": hub_models["st"], "text": "hello"})
    assert on_embedder.status_code == 400 and "/embed_text" in on_embedder.json()["message"]
    assert client.post("/classify_text", json={"name": name, "text": "ok"}).status_code == 200  # still serving
