"""The TEI protocol (API.md "The TEI protocol") against the whole app in-process: TEI's bodies
name no model, so each uses ``INGRAIN_DEFAULT_MODEL`` (set here) or the only resident model able
to do the task; every answer compared with the library's own call. (The published
``huggingface_hub.InferenceClient``, unmodified, is in tests/test_e2e_clients.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from ingrain_bento.settings import Settings

import service
from fixtures.compare import MAX_ABS_DIFF, max_abs_diff

TEXTS = ["a cat sat on the mat", "the dog barked"]


@pytest.fixture
def named(client, hub_models, monkeypatch):
    """The model with named prompts, loaded, and the default model of TEI's bodies; the library's model."""
    from sentence_transformers import SentenceTransformer

    name = hub_models["st_prompts"]
    assert client.post("/load_model", json={"name": name, "library": "sentence_transformers"}).status_code == 200
    monkeypatch.setattr(service.SETTINGS, "default_model", name)
    return name, SentenceTransformer(name, device="cpu")


@pytest.mark.parametrize("path", ["/", "/embed"])
def test_teis_embed_body_gives_rows_equal_to_the_library(client, named, path):
    name, model = named
    response = client.post(path, json={"inputs": TEXTS, "prompt_name": "query", "truncation_direction": "Left"})
    assert response.status_code == 200, response.text
    expected = model.encode(TEXTS, prompt_name="query", normalize_embeddings=True)
    assert max_abs_diff(response.json(), expected, "sentence_transformers text (TEI)") < MAX_ABS_DIFF
    one = client.post(path, json={"inputs": TEXTS[0], "dimensions": 8, "normalize": False}).json()
    assert len(one) == 1 and len(one[0]) == 8


def test_the_native_embed_body_is_unchanged_beside_teis(client, named):
    name, model = named
    native = client.post("/embed", json={"name": name, "text": TEXTS})
    assert native.status_code == 200 and "textEmbeddings" in native.json()


def test_similarity_is_the_cosine_of_the_source_with_each_sentence(client, named):
    name, model = named
    body = {"inputs": {"source_sentence": TEXTS[0], "sentences": TEXTS}}
    for path in ("/similarity", "/"):
        response = client.post(path, json=body)
        assert response.status_code == 200, response.text
        rows = model.encode(TEXTS, normalize_embeddings=True)
        np.testing.assert_allclose(response.json(), rows @ rows[0], atol=1e-5)


def test_tokenize_and_decode_use_the_models_tokenizer(client, named):
    name, model = named
    tokens = client.post("/tokenize", json={"inputs": "a cat"}).json()
    expected = model.tokenizer("a cat")["input_ids"]
    assert [t["id"] for t in tokens[0]] == expected
    assert tokens[0][0]["special"] and tokens[0][0]["start"] is None
    assert [(t["text"], t["start"], t["stop"]) for t in tokens[0][1:-1]] == [("a", 0, 1), ("cat", 2, 5)]
    decoded = client.post("/decode", json={"ids": expected}).json()
    assert decoded == [model.tokenizer.decode(expected, skip_special_tokens=True)]


def test_teis_rerank_and_sparse_bodies(client, hub_models, monkeypatch):
    from sentence_transformers import CrossEncoder

    reranker = hub_models["reranker"]
    assert client.post("/load_model", json={"name": reranker, "library": "sentence_transformers"}).status_code == 200
    monkeypatch.setattr(service.SETTINGS, "default_model", reranker)
    response = client.post("/rerank", json={"query": "a cat", "texts": TEXTS, "return_text": True})
    assert response.status_code == 200, response.text
    scores = CrossEncoder(reranker, device="cpu").predict([("a cat", t) for t in TEXTS])
    got = {item["index"]: item["score"] for item in response.json()}
    np.testing.assert_allclose([got[0], got[1]], scores, atol=1e-5)
    assert response.json()[0]["text"] == TEXTS[response.json()[0]["index"]]
    sparse = hub_models["sparse"]
    assert client.post("/load_model", json={"name": sparse, "library": "sentence_transformers"}).status_code == 200
    monkeypatch.setattr(service.SETTINGS, "default_model", sparse)
    vectors = client.post("/embed_sparse", json={"inputs": TEXTS}).json()
    native = client.post("/embed_sparse", json={"name": sparse, "text": TEXTS}).json()["embeddings"]
    assert [[v["index"] for v in vector] for vector in vectors] == [n["indices"] for n in native]


def test_a_tei_body_with_no_model_to_use_is_a_400_naming_the_setting(client, hub_models, monkeypatch):
    monkeypatch.setattr(service.SETTINGS, "default_model", None)
    for name in (hub_models["st"], hub_models["st_prompts"]):  # two text embedders resident
        assert client.post("/load_model", json={"name": name, "library": "sentence_transformers"}).status_code == 200
    response = client.post("/embed", json={"inputs": "hello"})
    assert response.status_code == 400 and "INGRAIN_DEFAULT_MODEL" in response.json()["message"]
    assert client.post("/", json={"nothing": 1}).status_code == 400


def test_info_names_the_model(client, named):
    name, _ = named
    info = client.get("/info").json()
    assert info["model_id"] == name and info["prompts"] == ["document", "query"]


def test_the_default_model_is_a_setting():
    assert Settings(INGRAIN_DEFAULT_MODEL="x").default_model == "x"
