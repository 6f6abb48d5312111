"""End to end: one real ``bentoml serve``, driven by both published ingrain clients
(0.0.7 and 0.2.3, unmodified), the openai client and plain HTTP."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from fixtures.bad_requests import LIMITS, png
from fixtures.bad_requests import failures as bad_input_failures
from fixtures.clients import ingrain_007, ingrain_023
from fixtures.compare import MAX_ABS_DIFF, b64, max_abs_diff
from fixtures.dashboard import assert_dashboard_metrics_exist

# TEI's bodies name no model: this server's TEI routes use the model with named prompts.
TEI_MODEL = "ingrain-test/tiny-st-prompts"


@pytest.fixture(scope="module")
def server(real_server_factory, session_dir):
    return real_server_factory(session_dir / "bentoml-e2e", env={**LIMITS, "INGRAIN_DEFAULT_MODEL": TEI_MODEL}).start()


@pytest.fixture(scope="module")
def seed(server):
    return ingrain_007().Client(inference_server_url=server.url, model_server_url=server.url)


@pytest.fixture(scope="module")
def current(server):
    return ingrain_023().Client(inference_server_url=server.url, model_server_url=server.url)


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


def test_both_clients_parse_metrics(seed, current, server, hub_models):
    stats = current.metrics().model_stats
    assert stats and all(int(s.inference_count) >= 1 for s in stats)
    assert seed.metrics()["modelStats"]
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server.url}/metrics", headers={"Accept": "text/plain"}).text
    assert_dashboard_metrics_exist(text)  # every series deploy/grafana/ingrain-bento.json queries
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert {"ingrain_requests", "ingrain_items", "ingrain_batch_size", "ingrain_request_latency_seconds",
            "ingrain_resident_models", "ingrain_resident_bytes", "bentoml_service_request"} <= set(families)
    per_model = {sample.labels.get("model") for sample in families["ingrain_items"].samples}
    assert hub_models["minilm"] in per_model and hub_models["timm"] in per_model


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
    # Token ids (LangChain's OpenAIEmbeddings sends them by default): a 400 that says what to do.
    from openai import BadRequestError

    for token_ids in ([[101, 7592, 2088, 102]], [101, 7592, 2088, 102]):
        with pytest.raises(BadRequestError, match="check_embedding_ctx_length=False"):
            client.embeddings.create(model=name, input=token_ids)
    assert len(client.embeddings.create(model=name, input="still serving").data) == 1


def test_both_cohere_clients_embed_texts_and_images_unmodified(server, hub_models, files_dir):
    """``Client.embed`` (v1: floats, or by type) and ``ClientV2.embed`` (by type), texts with an
    input_type that picks the model's prompt, and images (data URIs) through a CLIP image tower."""
    import cohere
    from sentence_transformers import SentenceTransformer

    name, texts = hub_models["st_prompts"], ["what is a prompt?", "a prefix before the text"]
    httpx.post(f"{server.url}/load_model", json={"name": name, "library": "sentence_transformers"},
               timeout=120).raise_for_status()
    model = SentenceTransformer(name, device="cpu")
    v1 = cohere.Client(base_url=server.url, api_key="unused").embed(model=name, texts=texts, input_type="search_query")
    expected = model.encode(texts, prompt_name="query", normalize_embeddings=True)
    assert max_abs_diff(v1.embeddings, expected, "sentence_transformers text (cohere v1)") < MAX_ABS_DIFF
    v2 = cohere.ClientV2(base_url=server.url, api_key="unused").embed(
        model=name, texts=texts, input_type="search_document", embedding_types=["float", "ubinary"])
    expected = model.encode(texts, prompt_name="document", normalize_embeddings=True)
    assert max_abs_diff(v2.embeddings.float_, expected, "sentence_transformers text (cohere v2)") < MAX_ABS_DIFF
    assert len(v2.embeddings.ubinary[0]) == len(expected[0]) // 8

    clip = hub_models["clip_hub"]
    httpx.post(f"{server.url}/load_model", json={"name": clip, "library": "open_clip"}, timeout=120).raise_for_status()
    data_uri = "data:image/png;base64," + b64(files_dir / "red.png")
    native = httpx.post(f"{server.url}/embed_image", json={"name": clip, "image": [data_uri]}, timeout=60)
    images = cohere.ClientV2(base_url=server.url, api_key="unused").embed(
        model=clip, images=[data_uri], input_type="image", embedding_types=["float"])
    assert max_abs_diff(images.embeddings.float_, native.json()["embeddings"], "open_clip image (cohere v2)") \
        < MAX_ABS_DIFF


def test_huggingface_inference_client_speaks_tei_unmodified(server, hub_models, monkeypatch):
    """``InferenceClient(base_url=...)``: ``feature_extraction`` and ``sentence_similarity`` on the
    server's ``INGRAIN_DEFAULT_MODEL``, equal to the library."""
    from huggingface_hub import InferenceClient, constants
    from sentence_transformers import SentenceTransformer

    httpx.post(f"{server.url}/load_model", json={"name": TEI_MODEL, "library": "sentence_transformers"},
               timeout=120).raise_for_status()
    model = SentenceTransformer(TEI_MODEL, device="cpu")
    # This process runs with HF_HUB_OFFLINE=1 (its library loads read the offline cache), which the
    # client takes as "refuse every request", the loopback server's included: off for its calls.
    monkeypatch.setattr(constants, "is_offline_mode", lambda: False)
    hf = InferenceClient(base_url=server.url)
    texts = ["the first text", "and the second"]
    rows = hf.feature_extraction(texts, prompt_name="query")
    expected = model.encode(texts, prompt_name="query", normalize_embeddings=True)
    assert max_abs_diff(rows, expected, "sentence_transformers text (TEI client)") < MAX_ABS_DIFF
    scores = hf.sentence_similarity(texts[0], other_sentences=texts)
    unit = model.encode(texts, normalize_embeddings=True)
    np.testing.assert_allclose(scores, unit @ unit[0], atol=1e-5)


def test_the_three_task_modules_through_a_real_serve(server, hub_models, monkeypatch):
    """Text classification (also ``InferenceClient.text_classification`` unmodified, beside the TEI
    default embedder), zero-shot CLIP and multi-vector, each equal to its library on the same weights."""
    import io

    from huggingface_hub import InferenceClient, constants
    from PIL import Image
    from sentence_transformers import MultiVectorEncoder
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    names = {key: hub_models[key] for key in ("classifier", "colbert", "clip_hub")}
    for key, name in names.items():
        library = "open_clip" if key == "clip_hub" else "sentence_transformers"
        httpx.post(f"{server.url}/load_model", json={"name": name, "library": library}, timeout=120).raise_for_status()
    texts = ["I loved every minute", "dull and far too long"]
    answer = httpx.post(f"{server.url}/classify_text", json={"name": names["classifier"], "text": texts}, timeout=60)
    assert answer.status_code == 200, answer.text
    tokenizer = AutoTokenizer.from_pretrained(names["classifier"])
    classifier = AutoModelForSequenceClassification.from_pretrained(names["classifier"]).eval()
    with torch.no_grad():
        expected = classifier(**tokenizer(texts, padding=True, return_tensors="pt")).logits.softmax(-1).numpy()
    labels = [classifier.config.id2label[i] for i in range(3)]
    for row, scores in zip(answer.json()["predictions"], expected, strict=True):
        got = {p["label"]: p["score"] for p in row}
        np.testing.assert_allclose([got[label] for label in labels], scores, atol=1e-5)
    monkeypatch.setattr(constants, "is_offline_mode", lambda: False)
    hf = InferenceClient(base_url=server.url)
    best = hf.text_classification(texts[0])
    first = answer.json()["predictions"][0]
    assert [e.label for e in best] == [p["label"] for p in first]
    np.testing.assert_allclose([e.score for e in best], [p["score"] for p in first], atol=1e-6)

    colbert = MultiVectorEncoder(names["colbert"], device="cpu")
    matrices = httpx.post(f"{server.url}/embed_multi_vector", timeout=60,
                          json={"name": names["colbert"], "text": texts, "input_type": "query"}).json()["embeddings"]
    for matrix, library_matrix in zip(matrices, colbert.encode_query(texts, convert_to_numpy=True), strict=True):
        np.testing.assert_allclose(matrix, library_matrix, atol=1e-5)

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    body = {"name": names["clip_hub"], "image": [base64.b64encode(buffer.getvalue()).decode()],
            "labels": ["a cat", "a dog", "a plane"]}
    zero_shot = httpx.post(f"{server.url}/classify_image", json=body, timeout=60)
    assert zero_shot.status_code == 200, zero_shot.text
    import open_clip
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    clip, _, preprocess = open_clip.create_model_and_transforms(names["clip_hub"])
    clip.eval()
    with torch.no_grad():
        weights = build_zero_shot_classifier(clip, open_clip.get_tokenizer(names["clip_hub"]), body["labels"],
                                             ["a photo of a {}."], device="cpu", use_tqdm=False)
        features = clip.encode_image(preprocess(image)[None], normalize=True)
        probabilities = (clip.logit_scale.exp() * features @ weights).softmax(-1).numpy()
    np.testing.assert_allclose(zero_shot.json()["probabilities"], probabilities, atol=1e-5)
    for name in names.values():  # the later tests count on the models they loaded being resident
        httpx.post(f"{server.url}/unload_model", json={"name": name}, timeout=60).raise_for_status()


def test_both_cohere_clients_and_a_jina_body_rerank_beside_an_embedder_and_a_clip_model(server, hub_models):
    """The published ``cohere`` client, unmodified: ClientV2 posts to /v2/rerank, Client to
    /v1/rerank; a Jina-style body to /rerank. The reranker serves beside an embedder and a CLIP
    model in the one server."""
    import cohere
    from sentence_transformers import CrossEncoder

    name, query = hub_models["reranker"], "what is the capital of France?"
    documents = ["Paris is the capital of France.", "Berlin is in Germany.", "France is in Europe.", "x"]
    for other, library in ((hub_models["minilm"], "sentence_transformers"), (hub_models["clip_hub"], "open_clip"),
                           (name, "sentence_transformers")):
        response = httpx.post(f"{server.url}/load_model", json={"name": other, "library": library}, timeout=120)
        assert response.status_code == 200, response.text
    expected = CrossEncoder(name, device="cpu").predict([(query, d) for d in documents])
    best = [int(i) for i in (-expected).argsort(kind="stable")[:2]]

    v2 = cohere.ClientV2(base_url=server.url, api_key="unused").rerank(model=name, query=query, documents=documents,
                                                                        top_n=2)
    assert [r.index for r in v2.results] == best
    assert max_abs_diff([r.relevance_score for r in v2.results], expected[best], "reranker scores (served)") \
        <= MAX_ABS_DIFF
    v1 = cohere.Client(base_url=server.url, api_key="unused").rerank(model=name, query=query, documents=documents,
                                                                      top_n=2, return_documents=True)
    assert [r.index for r in v1.results] == best and v1.results[0].document.text == documents[best[0]]
    jina = httpx.post(f"{server.url}/rerank", json={"model": name, "query": query, "documents": documents,
                                                    "top_n": 2, "return_documents": True}, timeout=60).json()
    assert [r["index"] for r in jina["results"]] == best and jina["results"][1]["document"]["text"] == \
        documents[best[1]]
    embedded = httpx.post(f"{server.url}/embed_text", json={"name": hub_models["minilm"], "text": "still here"})
    clip = httpx.post(f"{server.url}/embed_text", json={"name": hub_models["clip_hub"], "text": "a cat"})
    assert embedded.status_code == clip.status_code == 200
    with pytest.raises(Exception) as error:
        cohere.ClientV2(base_url=server.url, api_key="unused").rerank(model=hub_models["minilm"], query=query,
                                                                      documents=documents)
    assert getattr(error.value, "status_code", None) == 400


def test_unload_and_delete_through_both_clients(seed, current, hub_models):
    seed.load_timm_model(name=hub_models["timm"])  # resident, whatever the tests before loaded since
    current.load_model(name=hub_models["minilm"], library="sentence_transformers")
    seed.unload_model(name=hub_models["timm"])
    with pytest.raises(Exception) as error:
        seed.unload_model(name=hub_models["timm"])
    assert error.value.status_code == 404
    assert current.unload_model(name=hub_models["minilm"]).message.endswith("unloaded successfully.")
    assert current.delete_model(name=hub_models["minilm"]).message.endswith("deleted successfully.")
    names = {m.name for m in current.repository_models().models}
    assert hub_models["minilm"] not in names and hub_models["timm"] in names


def test_bad_requests_get_a_message_and_the_server_keeps_serving(server, hub_models, files_dir, file_server):
    """Every kind of bad input: the status it must get, a {"message"} body, and a server that still serves."""
    httpx.post(f"{server.url}/load_timm_model", json={"name": hub_models["timm"]}, timeout=120).raise_for_status()
    httpx.post(f"{server.url}/load_sentence_transformer_model", json={"name": hub_models["st"]},
               timeout=120).raise_for_status()
    failed = bad_input_failures(server.url, hub_models, files_dir, file_server.url)
    assert not failed, "\n".join(failed)
    stored = {m["name"] for m in httpx.get(f"{server.url}/repository_models").json()["models"]}
    assert not stored & {"pickled", "corrupt", "too-big", "slow", "gone", "local"}, "a failed download was stored"
    one_pixel = httpx.post(f"{server.url}/embed_image", json={"name": hub_models["timm"], "image": png((1, 1))})
    assert one_pixel.status_code == 200 and len(one_pixel.json()["embeddings"]) == 1
    assert not any(p.name == "x" for p in server.home.parent.iterdir()), "a bad name wrote outside the store"


def test_restart_keeps_the_store_restores_the_resident_models_and_serves_without_downloading(
        server, real_server_factory, hub_models, session_dir, seed, files_dir, file_server):
    import os
    import subprocess
    import sys

    pulled = subprocess.run([sys.executable, "-m", "ingrain_bento.cli", "pull", "--library", "sentence_transformers",
                             "--name", hub_models["st_prompt"]], env={**os.environ, "BENTOML_HOME": str(server.home)},
                            capture_output=True, text=True, timeout=300)
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    seed.load_sentence_transformer_model(name=hub_models["st"])
    before = {(m["name"], m["pretrained"]) for m in seed.repository_models()["models"]}
    assert (hub_models["st_prompt"], None) in before, "the running server sees what the CLI pulled"
    resident = {(m["name"], m["pretrained"]) for m in seed.loaded_models()["models"]}
    assert (hub_models["st"], None) in resident
    server.stop()
    empty_cache = session_dir / "empty-hf-cache"
    empty_cache.mkdir(exist_ok=True)
    # A slow restore (a pause before each model): the restarted server answers while restoring.
    again = real_server_factory(server.home, env={**LIMITS, "HF_HUB_CACHE": str(empty_cache),
                                                  "INGRAIN_RESTORE_DELAY_S": "2"}).start(until="/livez")
    started = time.monotonic()
    models = httpx.get(f"{again.url}/repository_models", timeout=10).json()["models"]
    assert time.monotonic() - started < 1.0, "the listing waited for the restore"
    assert {(m["name"], m["pretrained"]) for m in models} == before
    restoring = {(m["name"], m["pretrained"]) for m in models if m["state"] == "LOADING"}
    assert restoring == resident, models
    assert httpx.get(f"{again.url}/readyz", timeout=10).status_code == 503, "not ready while restoring"
    waited = httpx.post(f"{again.url}/embed_text", json={"name": hub_models["st"], "text": "x"}, timeout=120)
    assert waited.status_code == 200, "a request for a model being restored waits for it: " + waited.text
    # Bad input, while the models are restored, gets its own answer (the two-tier design answered
    # six of these 503 "restarting"): the cases that need a model wait for it.
    failed = bad_input_failures(again.url, hub_models, files_dir, file_server.url)
    assert not failed, "\n".join(failed)
    deadline = time.monotonic() + 120
    while httpx.get(f"{again.url}/readyz", timeout=10).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.3)
    models = httpx.get(f"{again.url}/repository_models").json()["models"]
    assert {(m["name"], m["pretrained"]) for m in models if m["state"] == "READY"} == resident
    assert all(m["state"] == "UNAVAILABLE" for m in models if (m["name"], m["pretrained"]) not in resident)
    for name in (hub_models["st"], hub_models["st_prompt"]):
        response = httpx.post(f"{again.url}/embed_text", json={"name": name, "text": "x"}, timeout=120)
        assert response.status_code == 200, response.text
    again.stop()


def test_an_offline_bento_build_bakes_the_preload_list_and_serves_it(server, real_server_factory, hub_models,
                                                                      session_dir):
    """`bentoml build` with INGRAIN_PRELOAD bakes those store entries into the Bento; the built Bento,
    served with an empty HF cache and no network, preloads and answers from them."""
    import json
    import os
    import subprocess
    import sys

    model_list = session_dir / "preload.yaml"
    model_list.write_text(f"models:\n  - {{library: sentence_transformers, name: {hub_models['st']}}}\n")
    empty_cache = session_dir / "empty-hf-cache"
    empty_cache.mkdir(exist_ok=True)
    env = {**os.environ, "BENTOML_HOME": str(server.home), "INGRAIN_PRELOAD": str(model_list),
           "HF_HUB_CACHE": str(empty_cache)}
    repo_root = Path(__file__).resolve().parents[1]
    build = subprocess.run([sys.executable, "-m", "bentoml", "build", "--output", "tag"], cwd=repo_root, env=env,
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-2000:]
    tag = build.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    info = subprocess.run([sys.executable, "-m", "bentoml", "get", tag, "-o", "json"], env=env,
                          capture_output=True, text=True, check=True)
    baked = [m["tag"] for service in json.loads(info.stdout)["services"] for m in service["models"]]
    assert len(baked) == 1 and baked[0].startswith("st-intfloat-e5-small-v2-")
    _assert_the_bento_runs_on_a_gpu_with_the_projects_packages(server.home, tag)

    bento = real_server_factory(server.home, env={"INGRAIN_PRELOAD": str(model_list),
                                                  "HF_HUB_CACHE": str(empty_cache)}, target=tag).start()
    assert httpx.get(f"{bento.url}/health").json() == {"message": "The model server is running."}
    assert [m["name"] for m in httpx.get(f"{bento.url}/loaded_models").json()["models"]] == [hub_models["st"]]
    response = httpx.post(f"{bento.url}/embed_text", json={"name": hub_models["st"], "text": "baked"})
    assert response.status_code == 200 and len(response.json()["embeddings"][0]) > 0
    bento.stop()


def _assert_the_bento_runs_on_a_gpu_with_the_projects_packages(home: Path, tag: str) -> None:
    """The built Bento's container: a CUDA base matching torch's CUDA build, the project's Python,
    ``bentoml serve`` as its entrypoint, and exactly the packages of ``lock/runtime.txt`` (BentoML
    adds its own pin, the lock's own)."""
    import torch
    from packaging.utils import canonicalize_name

    from fixtures.lock import read_lock

    name, version = tag.split(":")
    bento = home / "bentos" / name / version
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    cuda = torch.version.cuda or "13.0"
    assert f"FROM nvidia/cuda:{cuda}." in dockerfile, "the base image's CUDA is torch's"
    assert "uv venv --python 3.11 " in dockerfile
    entrypoint = (bento / "env" / "docker" / "entrypoint.sh").read_text()
    assert 'ENTRYPOINT [ "/home/bentoml/bento/env/docker/entrypoint.sh" ]' in dockerfile
    assert 'set -- bentoml serve "$@" "$BENTO_PATH"' in entrypoint
    lock = read_lock("runtime")
    packed = [line for line in (bento / "env" / "python" / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    pins = {canonicalize_name(name): version for name, _, version in (line.partition("==") for line in packed)}
    assert pins == lock, {name: (pins.get(name), lock.get(name)) for name in pins.keys() | lock.keys()
                          if pins.get(name) != lock.get(name)}
    assert len(packed) - len(pins) <= 1, "only BentoML's own pin may repeat one of the lock's"
