"""Multi-vector (late-interaction) embeddings (API.md "More tasks"): ``/embed_multi_vector`` and a
MaxSim ``/rerank`` on a sentence-transformers ``MultiVectorEncoder``, against the whole app
in-process, equal to the library's ``encode_query`` / ``encode_document`` and ``similarity``."""

from __future__ import annotations

import numpy as np
import pytest

QUERIES = ["what is the capital of france?", "hi"]
DOCUMENTS = ["Paris is the capital of France.", "Berlin is in Germany, and it is large.", "cats"]


@pytest.fixture(scope="module")
def colbert(client, hub_models):
    from sentence_transformers import MultiVectorEncoder

    name = hub_models["colbert"]
    assert client.post("/load_model", json={"name": name, "library": "sentence_transformers"}).status_code == 200
    return name, MultiVectorEncoder(name, device="cpu")


@pytest.mark.parametrize(("input_type", "texts"), [("query", QUERIES), ("document", DOCUMENTS), (None, DOCUMENTS)])
def test_each_text_is_its_token_matrix_as_the_library_encodes_it(client, colbert, input_type, texts):
    name, model = colbert
    body = {"name": name, "text": texts, **({"input_type": input_type} if input_type else {})}
    response = client.post("/embed_multi_vector", json=body)
    assert response.status_code == 200, response.text
    encode = model.encode_query if input_type == "query" else model.encode_document
    expected = encode(texts, convert_to_numpy=True)
    got = response.json()["embeddings"]
    assert [len(matrix) for matrix in got] == [len(matrix) for matrix in expected]
    for matrix, library in zip(got, expected, strict=True):
        np.testing.assert_allclose(matrix, library, atol=1e-5)


def test_a_request_over_one_forward_of_texts_of_many_lengths_equals_the_library(client, colbert):
    """More texts than one forward takes (MAX_BATCH_SIZE 64), of 1 to 60 words: the batcher groups
    them by their token counts into several forwards, each packed only as wide as its longest text,
    and the request's rows are joined again."""
    name, model = colbert
    texts = [" ".join(["word"] * (1 + (i * 7) % 60)) + f" {i}" for i in range(80)]
    response = client.post("/embed_multi_vector", json={"name": name, "text": texts})
    assert response.status_code == 200, response.text
    expected = model.encode_document(texts, convert_to_numpy=True)
    got = response.json()["embeddings"]
    assert [len(matrix) for matrix in got] == [len(matrix) for matrix in expected]
    for matrix, library in zip(got, expected, strict=True):
        np.testing.assert_allclose(matrix, library, atol=1e-5)


def test_rows_are_as_wide_as_the_forwards_longest_text_and_join_across_forwards():
    from ingrain_bento.boundary import join_rows
    from ingrain_bento.tasks.multi_vector import pack, unpack

    rng = np.random.default_rng(0)
    short, long = ([rng.standard_normal((n, 4)).astype(np.float32) for n in counts] for counts in ([1, 3], [7]))
    first, second = pack(short, max_tokens=512), pack(long, max_tokens=512)
    assert first.shape == (2, 1 + 3 * 4) and second.shape == (1, 1 + 7 * 4)
    for matrix, back in zip([*short, *long], unpack(join_rows([first, second]), 4), strict=True):
        np.testing.assert_array_equal(matrix, back)
    with pytest.raises(RuntimeError, match="over the model's 5"):
        pack(long, max_tokens=5)


def test_queries_and_documents_differ(client, colbert):
    name, _ = colbert
    as_query = client.post("/embed_multi_vector", json={"name": name, "text": "hi", "input_type": "query"}).json()
    as_document = client.post("/embed_multi_vector", json={"name": name, "text": "hi"}).json()
    assert as_query["embeddings"] != as_document["embeddings"]


def test_rerank_scores_by_maxsim_equal_to_the_librarys_similarity(client, colbert):
    name, model = colbert
    response = client.post("/rerank", json={"model": name, "query": QUERIES[0], "documents": DOCUMENTS})
    assert response.status_code == 200, response.text
    expected = model.similarity(model.encode_query([QUERIES[0]]), model.encode_document(DOCUMENTS))[0].numpy()
    results = response.json()["results"]
    assert [r["index"] for r in results] == list(np.argsort(-expected, kind="stable"))
    np.testing.assert_allclose([r["relevance_score"] for r in results], np.sort(expected)[::-1], atol=1e-5)


def test_the_listing_names_both_tasks_and_why_onnx_falls_back_to_torch(client, colbert):
    name, _ = colbert
    assert client.post("/unload_model", json={"name": name}).status_code == 200
    loaded = client.post("/load_model", json={"name": name, "library": "sentence_transformers", "backend": "onnx"})
    assert loaded.status_code == 200, loaded.text
    listed = next(m for m in client.get("/loaded_models").json()["models"] if m["name"] == name)
    assert set(listed["capabilities"]) == {"embed_multi_vector", "rerank"}
    assert listed["backend"] == "torch" and "encode_query" in listed["fallback"]
    assert client.post("/embed_multi_vector", json={"name": name, "text": "hi"}).status_code == 200


def test_bad_input_says_what_to_fix(client, colbert, hub_models):
    name, _ = colbert
    wrong_side = client.post("/embed_multi_vector", json={"name": name, "text": "hi", "input_type": "passage"})
    assert wrong_side.status_code in (400, 422) and "query" in wrong_side.text
    dense = hub_models["st"]
    client.post("/load_model", json={"name": dense, "library": "sentence_transformers"})
    on_dense = client.post("/embed_multi_vector", json={"name": dense, "text": "hi"})
    assert on_dense.status_code == 400 and "/embed_text" in on_dense.json()["message"]
    embed = client.post("/embed_text", json={"name": name, "text": "hi"})
    assert embed.status_code == 400 and "/embed_multi_vector" in embed.json()["message"]
    cut = client.post("/rerank", json={"model": name, "query": "q", "documents": ["d"], "max_tokens_per_doc": 4})
    assert cut.status_code == 400 and "document length" in cut.json()["message"]
