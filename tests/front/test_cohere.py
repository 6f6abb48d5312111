"""Cohere's embed (API.md "Cohere embed") against the whole app in-process: its bodies, each
vector compared with the library's own call on the same weights. (The published ``cohere``
clients, unmodified, are in tests/test_e2e_clients.py: they need a real server.)"""

from __future__ import annotations

import base64

import numpy as np
import pytest

from ingrain_bento.front.outputs import int8_ranges

from fixtures.compare import MAX_ABS_DIFF, b64, max_abs_diff

TEXTS = ["what is the capital of france?", "paris is the capital of france"]


@pytest.fixture(scope="module")
def named(client, hub_models):
    from sentence_transformers import SentenceTransformer

    name = hub_models["st_prompts"]
    assert client.post("/load_model", json={"name": name, "library": "sentence_transformers"}).status_code == 200
    return name, SentenceTransformer(name, device="cpu")


def test_v2_gives_each_embedding_type_as_quantize_embeddings_computes_it(client, named):
    from sentence_transformers.util.quantization import quantize_embeddings

    name, model = named
    response = client.post("/v2/embed", json={"model": name, "texts": TEXTS, "input_type": "search_document",
                                              "output_dimension": 16,
                                              "embedding_types": ["float", "int8", "ubinary", "base64"]})
    assert response.status_code == 200, response.text
    embeddings = response.json()["embeddings"]
    floats = np.asarray(embeddings["float"], dtype=np.float32)
    library = model.encode(TEXTS, prompt_name="document", convert_to_numpy=True)[:, :16]
    library /= np.linalg.norm(library, axis=-1, keepdims=True)
    assert max_abs_diff(floats, library, "sentence_transformers text (cohere v2)") < MAX_ABS_DIFF
    assert np.array_equal(embeddings["int8"], quantize_embeddings(floats, "int8", ranges=int8_ranges(16)))
    assert np.array_equal(embeddings["ubinary"], quantize_embeddings(floats, "ubinary"))
    decoded = [np.frombuffer(base64.b64decode(row), dtype="<f4") for row in embeddings["base64"]]
    assert np.array_equal(np.stack(decoded), floats)


@pytest.mark.parametrize("input_type, prompt_name", [("search_query", "query"), ("clustering", None)])
def test_the_input_type_picks_the_models_prompt_or_none(client, named, input_type, prompt_name):
    name, model = named
    response = client.post("/v1/embed", json={"model": name, "texts": TEXTS, "input_type": input_type})
    assert response.status_code == 200 and response.json()["response_type"] == "embeddings_floats"
    expected = model.encode(TEXTS, prompt_name=prompt_name, normalize_embeddings=True)
    assert max_abs_diff(response.json()["embeddings"], expected, "sentence_transformers text (cohere v1)") \
        < MAX_ABS_DIFF


def test_images_go_to_a_clip_models_image_tower(client, hub_models, files_dir):
    clip = hub_models["clip_hub"]
    assert client.post("/load_model", json={"name": clip, "library": "open_clip"}).status_code == 200
    data_uri = "data:image/png;base64," + b64(files_dir / "red.png")
    native = client.post("/embed_image", json={"name": clip, "image": [data_uri]}).json()["embeddings"]
    answer = client.post("/v2/embed", json={"model": clip, "images": [data_uri], "input_type": "image",
                                            "embedding_types": ["float"]}).json()
    assert max_abs_diff(answer["embeddings"]["float"], native, "open_clip image (cohere v2)") < MAX_ABS_DIFF
    inputs = [{"content": [{"type": "text", "text": "a red square"}]},
              {"content": [{"type": "image_url", "image_url": {"url": data_uri}}]}]
    mixed = client.post("/v2/embed", json={"model": clip, "inputs": inputs, "embedding_types": ["float"],
                                           "input_type": "search_document"})
    assert mixed.status_code == 200, mixed.text
    text = client.post("/embed_text", json={"name": clip, "text": ["a red square"]}).json()["embeddings"]
    assert max_abs_diff(mixed.json()["embeddings"]["float"], [text[0], native[0]], "open_clip (cohere inputs)") \
        < MAX_ABS_DIFF


@pytest.mark.parametrize("body, says", [
    ({"texts": ["a"], "images": ["data:image/png;base64,AAAA"]}, "one of 'texts', 'images' and 'inputs'"),
    ({"texts": ["a"], "embedding_types": ["float16"]}, "embedding_types"),
    ({"inputs": [{"content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}, "2 parts"),
])
def test_a_bad_body_is_a_400_that_says_what_to_send(client, named, body, says):
    name, _ = named
    response = client.post("/v2/embed", json={"model": name, **body})
    assert response.status_code == 400 and says in response.json()["message"], response.text
