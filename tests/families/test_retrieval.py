"""Rerankers (``CrossEncoder``) and sparse encoders (``SparseEncoder``) through the server equal the
library's own ``predict`` / ``rank`` / ``encode`` (run once per engine: tests/families/conftest.py).

The models: a tiny CrossEncoder saved by the library (``reranker``), a plain Hugging Face
sequence-classification repo that ``CrossEncoder`` opens (``reranker_hf``, raw logits as
ms-marco-MiniLM gives them), and a tiny SPLADE ``SparseEncoder`` (``sparse``); all offline.
"""

from __future__ import annotations

import numpy as np
import pytest

from fixtures.compare import MAX_ABS_DIFF, max_abs_diff

QUERY = "what is the capital of France?"
DOCUMENTS = ["Paris is the capital of France.", "Berlin is a city in Germany.", "France borders Spain.",
             "The capital of France is a large city on the Seine " * 12, "x", "Paris, France."]
TEXTS = ["a short text", "sparse embeddings for search " * 10, "x"]


def _load(client, name: str) -> None:
    response = client.post("/load_model", json={"name": name, "library": "sentence_transformers"})
    assert response.status_code == 200, response.text


def _cross_encoder(name: str):
    from sentence_transformers import CrossEncoder

    return CrossEncoder(name, device="cpu")


@pytest.mark.parametrize("key", ["reranker", "reranker_hf"])
def test_scores_equal_predict_sorted_and_cut_to_top_n(client, hub_models, key):
    name = hub_models[key]
    _load(client, name)
    library = _cross_encoder(name)
    expected = library.predict([(QUERY, d) for d in DOCUMENTS])
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        body = client.post(path, json={"model": name, "query": QUERY, "documents": DOCUMENTS}).json()
        assert [r["index"] for r in body["results"]] == [int(i) for i in np.argsort(-expected, kind="stable")]
        got = [r["relevance_score"] for r in sorted(body["results"], key=lambda r: r["index"])]
        assert max_abs_diff(got, expected, "reranker scores") <= MAX_ABS_DIFF
        assert "document" not in body["results"][0] and body["meta"]["billed_units"]["search_units"] == 1
    ranked = library.rank(QUERY, DOCUMENTS, top_k=2, return_documents=True)
    top = client.post("/rerank", json={"name": name, "query": QUERY, "documents": [{"text": d} for d in DOCUMENTS],
                                       "top_n": 2, "return_documents": True}).json()["results"]
    assert [r["index"] for r in top] == [r["corpus_id"] for r in ranked]
    assert [r["document"]["text"] for r in top] == [r["text"] for r in ranked]


def test_max_tokens_per_doc_cuts_each_document_with_the_models_own_tokenizer(client, hub_models):
    name = hub_models["reranker"]
    _load(client, name)
    library = _cross_encoder(name)
    tokenizer = library.tokenizer
    limit = len(tokenizer(QUERY, add_special_tokens=False)["input_ids"]) + 5 + tokenizer.num_special_tokens_to_add(
        pair=True)
    expected = library.predict([(QUERY, d) for d in DOCUMENTS],
                               processing_kwargs={"text": {"truncation": "only_second", "max_length": limit}})
    body = client.post("/rerank", json={"model": name, "query": QUERY, "documents": DOCUMENTS,
                                        "max_tokens_per_doc": 5}).json()
    got = [r["relevance_score"] for r in sorted(body["results"], key=lambda r: r["index"])]
    assert max_abs_diff(got, expected, "reranker scores (max_tokens_per_doc)") <= MAX_ABS_DIFF
    uncut = library.predict([(QUERY, d) for d in DOCUMENTS])
    assert abs(got[3] - float(uncut[3])) > 1e-6, "the long document was cut"


def test_sparse_vectors_are_the_non_zeros_of_encode_indices_ascending(client, hub_models):
    from sentence_transformers import SparseEncoder

    name = hub_models["sparse"]
    _load(client, name)
    library = SparseEncoder(name, device="cpu")
    dense = library.encode(TEXTS, convert_to_sparse_tensor=False).numpy()
    body = client.post("/embed_sparse", json={"name": name, "text": TEXTS}).json()
    for vector, row in zip(body["embeddings"], dense, strict=True):
        assert vector["indices"] == sorted(vector["indices"]) == np.flatnonzero(row).tolist()
        assert max_abs_diff(vector["values"], row[vector["indices"]], "sparse values") <= MAX_ABS_DIFF
    top = client.post("/embed_sparse", json={"name": name, "text": TEXTS[1], "top_k": 5}).json()["embeddings"][0]
    largest = np.sort(np.argsort(-dense[1], kind="stable")[:5])
    assert top["indices"] == largest.tolist()
    size = client.get("/model_embedding_size", params={"name": name}).json()["embeddingSize"]
    assert size == dense.shape[1] == library.tokenizer.vocab_size


def test_each_kind_answers_only_its_own_route_and_says_what_it_can_do(client, hub_models):
    reranker, sparse, embedder = hub_models["reranker"], hub_models["sparse"], hub_models["st"]
    for name in (reranker, sparse, embedder):
        _load(client, name)
    cases = [("/rerank", {"model": embedder, "query": "q", "documents": ["d"]}, "/embed_text"),
             ("/embed_sparse", {"name": embedder, "text": "t"}, "/embed_text"),
             ("/embed_text", {"name": reranker, "text": "t"}, "/rerank"),
             ("/rerank", {"model": sparse, "query": "q", "documents": ["d"]}, "/embed_sparse")]
    for path, body, offered in cases:
        response = client.post(path, json=body)
        assert response.status_code == 400 and offered in response.json()["message"], (path, response.text)
    listed = {m["name"]: m for m in client.get("/repository_models").json()["models"]}
    assert listed[reranker]["modalities"] == listed[sparse]["modalities"] == ["text"]
    assert (listed[reranker]["capabilities"], listed[sparse]["capabilities"], listed[embedder]["capabilities"]) == \
        (["rerank"], ["embed_sparse"], ["embed_text"])
    size = client.get("/model_embedding_size", params={"name": reranker})
    assert size.status_code == 400 and "reranker" in size.json()["message"]


@pytest.mark.parametrize("body, status, field", [
    ({"query": "", "documents": ["d"]}, 400, "query"),
    ({"query": "  ", "documents": ["d"]}, 400, "query"),
    ({"query": "q", "documents": []}, 400, "documents"),
    ({"query": "q", "documents": [3]}, 400, "documents"),
    ({"query": "q", "documents": [{"txt": "d"}]}, 400, "documents"),
    ({"query": "q", "documents": ["d"], "top_n": 0}, 400, "top_n"),
    ({"query": "q", "documents": ["d"], "max_tokens_per_doc": 0}, 400, "max_tokens_per_doc"),
    ({"query": "q", "documents": ["d"] * 2049}, 413, "documents"),
])
def test_bad_rerank_requests_are_refused_naming_the_field(client, hub_models, body, status, field):
    response = client.post("/rerank", json={"model": hub_models["reranker"], **body})
    assert response.status_code == status and field in response.json()["message"], response.text
    assert client.get("/health").status_code == 200
