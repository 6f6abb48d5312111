"""Prompts, truncation and output precision on the text routes (API.md "Prompts, truncation and
output precision"), through the whole app in-process, each compared with the library's own call
on the same weights.

The fixture model ``st_prompts`` names two prompts (``query: ``, ``passage: ``) that its pooling
keeps, and has no default prompt; its context is 128 tokens.
"""

from __future__ import annotations

import numpy as np
import pytest

from ingrain_bento.front.outputs import int8_ranges

from fixtures.compare import MAX_ABS_DIFF, max_abs_diff

TEXTS = ["what is a prompt?", "prompts prefix the text before it is tokenized", "x"]
# Far over the 128-token context, in the tiny vocabulary (letters and digits), its two ends unlike.
LONG = " ".join(f"{chr(97 + i % 26)}{i % 7}" for i in range(300))


@pytest.fixture(scope="module")
def named(client, hub_models):
    """The model with named prompts, loaded; and the library's own model of it."""
    from sentence_transformers import SentenceTransformer

    name = hub_models["st_prompts"]
    response = client.post("/load_model", json={"name": name, "library": "sentence_transformers"})
    assert response.status_code == 200, response.text
    return name, SentenceTransformer(name, device="cpu")


def embed(client, name: str, texts: list[str], **options) -> tuple[int, dict]:
    response = client.post("/embed_text", json={"name": name, "text": texts, **options})
    return response.status_code, response.json()


def test_the_listing_names_the_models_prompts(client, named):
    name, _ = named
    (info,) = [m for m in client.get("/loaded_models").json()["models"] if m["id"] == name]
    assert info["prompts"] == ["document", "query"]


@pytest.mark.parametrize("options, library", [
    ({"prompt_name": "query"}, {"prompt_name": "query"}),
    ({"prompt_name": "document"}, {"prompt_name": "document"}),
    ({"prompt": "Represent this sentence: "}, {"prompt": "Represent this sentence: "}),
    ({}, {}),
])
def test_each_prompt_equals_the_librarys_encode_with_it(client, named, options, library):
    name, model = named
    status, body = embed(client, name, TEXTS, **options)
    assert status == 200, body
    expected = model.encode(TEXTS, normalize_embeddings=True, **library)
    assert max_abs_diff(body["embeddings"], expected, "sentence_transformers text (prompt per request)") < MAX_ABS_DIFF
    if options:
        plain = model.encode(TEXTS, normalize_embeddings=True)
        assert np.abs(np.asarray(body["embeddings"]) - plain).max() > 1e-3, "the prompt changed the embedding"


def test_the_openai_route_takes_a_prompt_name_in_extra_body(client, named):
    import openai

    name, model = named
    api = openai.OpenAI(api_key="unused", base_url=f"{client.base_url}/v1", http_client=client)
    answer = api.embeddings.create(model=name, input=TEXTS, extra_body={"prompt_name": "query"})
    expected = model.encode(TEXTS, normalize_embeddings=True, prompt_name="query")
    assert max_abs_diff([d.embedding for d in answer.data], expected, "sentence_transformers text (openai prompt)") \
        < MAX_ABS_DIFF


@pytest.mark.parametrize("options, says", [
    ({"prompt_name": "query", "prompt": "q: "}, "not both"),
    ({"prompt_name": "title"}, "its prompts are 'query', 'document'"),
    ({"precision": "int4"}, "precision"),
    ({"truncation_direction": "middle"}, "truncation_direction"),
])
def test_a_bad_option_is_a_400_that_says_what_to_send_and_the_server_keeps_serving(client, named, options, says):
    name, _ = named
    status, body = embed(client, name, TEXTS, **options)
    assert status == 400 and says in body["message"], body
    assert embed(client, name, TEXTS)[0] == 200


def test_left_truncation_keeps_the_end_as_the_tokenizer_does_with_that_side(client, named):
    name, model = named
    status, body = embed(client, name, [LONG, "short"], truncation_direction="left")
    assert status == 200, body
    model.tokenizer.truncation_side = "left"
    try:
        expected = model.encode([LONG, "short"], normalize_embeddings=True)
    finally:
        model.tokenizer.truncation_side = "right"
    assert max_abs_diff(body["embeddings"], expected, "sentence_transformers text (left truncation)") < MAX_ABS_DIFF
    right = model.encode([LONG], normalize_embeddings=True)
    assert np.abs(np.asarray(body["embeddings"][0]) - right[0]).max() > 1e-3, "the cut kept another part"


def test_truncate_false_over_the_context_is_a_413_naming_the_text_its_tokens_and_the_limit(client, named):
    name, model = named
    status, body = embed(client, name, ["short", LONG], truncate=False)
    tokens = len(model.tokenizer(LONG)["input_ids"])
    assert status == 413, body
    assert f"Text 1 is {tokens} tokens" in body["message"] and "limit of 128" in body["message"], body
    status, body = embed(client, name, TEXTS, truncate=False)  # within the context: as truncate true
    assert status == 200
    assert max_abs_diff(body["embeddings"], model.encode(TEXTS, normalize_embeddings=True),
                        "sentence_transformers text (truncate false)") < MAX_ABS_DIFF


@pytest.mark.parametrize("precision", ["int8", "uint8", "binary", "ubinary"])
def test_each_precision_equals_quantize_embeddings_of_the_float_rows(client, named, precision):
    from sentence_transformers.util.quantization import quantize_embeddings

    name, model = named
    floats = np.asarray(embed(client, name, TEXTS, n_dims=24)[1]["embeddings"], dtype=np.float32)
    status, body = embed(client, name, TEXTS, n_dims=24, precision=precision)
    assert status == 200, body
    ranges = int8_ranges(24) if precision.endswith("int8") else None
    expected = quantize_embeddings(floats, precision=precision, ranges=ranges)
    assert np.array_equal(np.asarray(body["embeddings"]), expected.astype(np.int64))
    assert len(body["embeddings"][0]) == (24 if precision.endswith("int8") else 3)
    library = model.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)[:, :24]
    library /= np.linalg.norm(library, axis=-1, keepdims=True)
    assert max_abs_diff(floats, library, "sentence_transformers text (n_dims 24)") < MAX_ABS_DIFF


def test_int8_ranges_are_fixed_not_taken_from_what_shares_the_request(client, named):
    name, _ = named
    alone = embed(client, name, TEXTS[:1], precision="int8")[1]["embeddings"][0]
    beside = embed(client, name, [TEXTS[0], LONG, "!!!"], precision="int8")[1]["embeddings"][0]
    assert np.abs(np.asarray(alone) - np.asarray(beside)).max() <= 1  # a float ulp may cross one level, no more


def test_int8_needs_unit_rows_and_precision_is_for_dense_rows(client, named, hub_models):
    name, _ = named
    status, body = embed(client, name, TEXTS, precision="int8", normalize=False)
    assert status == 400 and "normalize: true" in body["message"]
    sparse = client.post("/load_model", json={"name": hub_models["sparse"], "library": "sentence_transformers"})
    assert sparse.status_code == 200, sparse.text
    response = client.post("/embed_sparse", json={"name": hub_models["sparse"], "text": TEXTS, "precision": "binary"})
    assert response.status_code == 400 and "sparse" in response.json()["message"]
