"""End to end: one real ``bentoml serve``, driven by both published ingrain clients
(0.0.7 and 0.2.3, unmodified), the openai client and plain HTTP."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import httpx
import pytest
import torch

from fixtures.compare import MAX_ABS_DIFF, b64, max_abs_diff

REPO_ROOT = Path(__file__).resolve().parent.parent
INGRAIN_023 = REPO_ROOT / ".test-target" / "ingrain-0.2.3"


def _import_ingrain_023() -> ModuleType:
    """Import ingrain 0.2.3 beside the installed 0.0.7 (from its own --target folder)."""
    if not (INGRAIN_023 / "ingrain").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(INGRAIN_023),
                        "ingrain==0.2.3"], check=True)
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "ingrain" or k.startswith("ingrain.")}
    sys.path.insert(0, str(INGRAIN_023))
    try:
        module = importlib.import_module("ingrain")
    finally:
        sys.path.remove(str(INGRAIN_023))
        for key in [k for k in sys.modules if k == "ingrain" or k.startswith("ingrain.")]:
            sys.modules.pop(key)
        sys.modules.update(saved)
    assert "embed_text" in dir(module.Client), "not the 0.2.3 client"
    return module


@pytest.fixture(scope="module")
def server(real_server_factory, session_dir):
    return real_server_factory(session_dir / "bentoml-e2e").start()


@pytest.fixture(scope="module")
def seed(server):
    import ingrain

    assert hasattr(ingrain.Client, "infer_text"), "ingrain 0.0.7 is not installed"
    return ingrain.Client(inference_server_url=server.url, model_server_url=server.url)


@pytest.fixture(scope="module")
def current(server):
    module = _import_ingrain_023()
    return module.Client(inference_server_url=server.url, model_server_url=server.url)


def _st_reference(name: str, texts: list[str]) -> torch.Tensor:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(name, device="cpu").encode(texts, convert_to_tensor=True, normalize_embeddings=True)


def test_health_answers_both_clients(seed, current):
    assert seed.health()[1] == {"message": "The model server is running."}
    assert current.health()[1].message == "The model server is running."


def test_seed_client_loads_every_library_and_infers(seed, hub_models, files_dir):
    clip = seed.load_clip_model(name=hub_models["clip_hub"])
    st = seed.load_sentence_transformer_model(name=hub_models["st"])
    timm_model = seed.load_timm_model(name=hub_models["timm"])
    image = b64(files_dir / "red.png")

    texts = ["first text", "second text"]
    got = st.infer_text(text=texts)["embeddings"]
    assert max_abs_diff(got, _st_reference(hub_models["st"], texts), "sentence_transformers text (served)") \
        <= MAX_ABS_DIFF
    both = clip.infer(text="a cat", image=image)
    assert len(both["textEmbeddings"]) == 1 and len(both["imageEmbeddings"]) == 1
    probs = timm_model.infer_image(image=[image, image])["embeddings"]
    assert len(probs) == 2 and abs(sum(probs[0]) - 1) < 1e-4
    assert seed.infer_text(name=hub_models["clip_hub"], text="x")["embeddings"][0]

    loaded = seed.loaded_models()["models"]
    assert {m["name"] for m in loaded} >= {hub_models["clip_hub"], hub_models["st"], hub_models["timm"]}
    states = {m["name"]: m["state"] for m in seed.repository_models()["models"]}
    assert states[hub_models["st"]] == "READY"


def test_current_client_covers_its_calls(current, hub_models, files_dir):
    name = hub_models["minilm"]
    model = current.load_model(name=name, library="sentence_transformers")
    texts = ["a query about cats", "an answer about dogs"]
    response = model.embed_text(text=texts)
    assert max_abs_diff(response.embeddings, _st_reference(name, texts), "sentence_transformers text (served)") \
        <= MAX_ABS_DIFF
    cut = current.embed_text(name=name, text=texts, n_dims=32).embeddings
    assert len(cut[0]) == 32 and abs(sum(v * v for v in cut[0]) - 1) < 1e-4
    assert current.model_embedding_dims(name=name).embedding_size == 384

    timm_name = hub_models["timm"]
    current.load_model(name=timm_name, library="timm")
    image = b64(files_dir / "red.png")
    probs = current.classify_image(name=timm_name, image=[image]).probabilities
    labels = current.model_classification_labels(name=timm_name).labels
    assert len(probs[0]) == len(labels) == 1000
    features = current.embed_image(name=timm_name, image=image).embeddings
    assert len(features[0]) == current.model_embedding_dims(name=timm_name).embedding_size

    clip = hub_models["clip_hub"]
    current.load_model(name=clip, library="open_clip")
    both = current.embed(name=clip, text=["a"], image=[image])
    assert len(both.text_embeddings) == 1 and len(both.image_embeddings) == 1
    assert {m.library for m in current.loaded_models().models} >= {"timm", "open_clip", "sentence_transformers"}
    assert all(m.state in ("READY", "UNAVAILABLE") for m in current.repository_models().models)


def test_both_clients_parse_metrics(seed, current, server):
    stats = current.metrics().model_stats
    assert stats and all(int(s.inference_count) >= 1 for s in stats)
    assert seed.metrics()["modelStats"]
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server.url}/metrics", headers={"Accept": "text/plain"}).text
    names = {family.name for family in text_string_to_metric_families(text)}
    assert {"ingrain_requests", "ingrain_batch_size", "ingrain_resident_models"} <= names


def test_openai_client_embeds_and_lists(server, hub_models):
    from openai import OpenAI

    name = hub_models["minilm"]
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    texts = ["hello world", "goodbye moon"]
    response = client.embeddings.create(model=name, input=texts)  # the client asks for base64
    assert [d.index for d in response.data] == [0, 1]
    expected = _st_reference(name, texts)
    assert max_abs_diff([d.embedding for d in response.data], expected, "sentence_transformers text (served)") \
        <= MAX_ABS_DIFF
    floats = client.embeddings.create(model=name, input="hello world", encoding_format="float", dimensions=8)
    assert len(floats.data[0].embedding) == 8
    assert name in {m.id for m in client.models.list().data}
    with pytest.raises(Exception) as error:
        client.embeddings.create(model="no-such-model", input="x")
    assert getattr(error.value, "status_code", None) == 404


def test_unload_and_delete_through_both_clients(seed, current, hub_models):
    seed.unload_model(name=hub_models["timm"])
    with pytest.raises(Exception) as error:
        seed.unload_model(name=hub_models["timm"])
    assert error.value.status_code == 404
    assert current.unload_model(name=hub_models["minilm"]).message.endswith("unloaded successfully.")
    assert current.delete_model(name=hub_models["minilm"]).message.endswith("deleted successfully.")
    names = {m.name for m in current.repository_models().models}
    assert hub_models["minilm"] not in names and hub_models["timm"] in names


BAD_REQUESTS = [
    ("POST", "/load_sentence_transformer_model", {"name": "../x"}, 400),
    ("POST", "/load_sentence_transformer_model", {"name": ""}, 400),
    ("POST", "/load_sentence_transformer_model", {"name": "a\x00b"}, 400),
    ("POST", "/load_sentence_transformer_model", {"name": "/etc/passwd"}, 400),
    ("POST", "/load_clip_model", {"name": "x" * 201, "pretrained": "y"}, 400),
    ("POST", "/load_model", {"name": "x", "library": "keras"}, 400),
    ("POST", "/load_model", {"library": "timm"}, 400),
    ("POST", "/load_timm_model", {"name": "no_such_architecture"}, 404),
    ("POST", "/unload_model", {"name": "never-loaded"}, 404),
    ("DELETE", "/delete_model", {"name": "never-stored"}, 404),
    ("POST", "/embed_text", {"name": "never-loaded", "text": "x"}, 404),
    ("GET", "/model_embedding_size?name=never-loaded", None, 404),
]


@pytest.mark.parametrize("method,path,body,status", BAD_REQUESTS)
def test_bad_requests_get_a_message_and_the_server_keeps_serving(server, method, path, body, status):
    response = httpx.request(method, f"{server.url}{path}", json=body, timeout=60)
    assert response.status_code == status, response.text
    assert isinstance(response.json()["message"], str) and response.json()["message"]
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert not any(p.name == "x" for p in (server.home.parent).iterdir())


def test_restart_keeps_the_store_and_serves_without_downloading(server, real_server_factory, hub_models,
                                                                 session_dir, seed):
    before = {(m["name"], m["pretrained"]) for m in seed.repository_models()["models"]}
    server.stop()
    empty_cache = session_dir / "empty-hf-cache"
    empty_cache.mkdir(exist_ok=True)
    again = real_server_factory(server.home, env={"HF_HUB_CACHE": str(empty_cache)}).start()
    models = httpx.get(f"{again.url}/repository_models").json()["models"]
    assert {(m["name"], m["pretrained"]) for m in models} == before
    assert all(m["state"] == "UNAVAILABLE" for m in models)
    response = httpx.post(f"{again.url}/embed_text", json={"name": hub_models["st"], "text": "x"}, timeout=120)
    assert response.status_code == 200, response.text
    again.stop()
