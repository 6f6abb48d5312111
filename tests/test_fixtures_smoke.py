"""Smoke tests for tests/fixtures/offline_models.py: each fixture loads through the libraries' own API.

Hub loads run in-process inside ``offline_hub(cache)``, which patches ``huggingface_hub.constants``
(``HF_HUB_CACHE``/``HF_HUB_OFFLINE`` are read once, at import, so setting ``os.environ`` later is not
enough). ``test_env_vars_alone_in_subprocess`` checks the plain env-var route in a fresh interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

try:
    from fixtures import offline_models as om
except ImportError:  # run without the repo conftest
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fixtures import offline_models as om


EXPECTED_IDS = {
    "clip_hub": "hf-hub:ingrain-test/tiny-clip",
    "clip_arch": "ViTamin-S",
    "clip_tag": "datacomp1b",
    "timm": "test_resnet.r160_in1k",
    "timm_hub": "hf-hub:timm/test_resnet.r160_in1k",
    "st": "intfloat/e5-small-v2",
    "st_prompt": "ingrain-test/tiny-st-prompt",
    "st_prompts": "ingrain-test/tiny-st-prompts",
    "minilm": "sentence-transformers/all-MiniLM-L6-v2",
    "clip_custom_arch": "ViT-S-32-alt",
    "clip_hub_pickled": "hf-hub:ingrain-test/tiny-clip-pickled",
    "st_pickled": "ingrain-test/tiny-st-pickled",
    "reranker": "ingrain-test/tiny-reranker",
    "reranker_hf": "ingrain-test/tiny-plain-reranker",
    "sparse": "ingrain-test/tiny-splade",
    "classifier": "ingrain-test/tiny-sentiment",
    "multilabel": "ingrain-test/tiny-multilabel",
    "colbert": "ingrain-test/tiny-colbert",
}


@pytest.fixture(scope="session")
def smoke_cache(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    cache = tmp_path_factory.mktemp("smoke-hf-cache")
    return cache, om.build_hf_cache(cache)


@pytest.fixture(scope="session")
def smoke_files(tmp_path_factory) -> dict[str, Path]:
    return om.build_custom_files(tmp_path_factory.mktemp("smoke-files"))


@pytest.fixture
def offline(smoke_cache):
    cache, ids = smoke_cache
    with om.offline_hub(cache):
        yield ids


def _snapshot_file(cache: Path, repo_id: str, filename: str) -> Path:
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = (repo / "refs" / "main").read_text()
    return repo / "snapshots" / commit / filename


def _same_weights(model, safetensors_path: Path) -> None:
    from safetensors.torch import load_file

    saved = load_file(str(safetensors_path))
    state = model.state_dict()
    assert set(saved) == set(state)
    for key in list(saved)[:: max(1, len(saved) // 8)]:
        assert saved[key].shape == state[key].shape, key
        assert (saved[key].float() == state[key].float()).all(), key


# --------------------------------------------------------------------------------------------- build


def test_ids_and_idempotent(smoke_cache):
    cache, ids = smoke_cache
    assert ids == EXPECTED_IDS
    start = time.perf_counter()
    assert om.build_hf_cache(cache) == ids
    assert time.perf_counter() - start < 1.0


def test_cache_layout(smoke_cache):
    from huggingface_hub import scan_cache_dir

    cache, _ = smoke_cache
    info = scan_cache_dir(cache)  # pass the dir: its default is bound at import
    assert not info.warnings, info.warnings
    repos = {r.repo_id: r for r in info.repos}
    assert set(repos) == {
        "ingrain-test/tiny-clip",
        "jienengchen/ViTamin-S",
        "timm/test_resnet.r160_in1k",
        "intfloat/e5-small-v2",
        "ingrain-test/tiny-st-prompt",
        "ingrain-test/tiny-st-prompts",
        "sentence-transformers/all-MiniLM-L6-v2",
        "ingrain-test/tiny-clip-pickled",
        "ingrain-test/tiny-st-pickled",
        "ingrain-test/tiny-reranker",
        "ingrain-test/tiny-plain-reranker",
        "ingrain-test/tiny-splade",
        "ingrain-test/tiny-sentiment",
        "ingrain-test/tiny-multilabel",
        "ingrain-test/tiny-colbert",
    }
    for repo in repos.values():
        (revision,) = repo.revisions
        assert len(revision.commit_hash) == 40 and "main" in revision.refs
        for f in revision.files:
            assert f.file_path.is_symlink() and f.blob_path.is_file()


def test_env_vars_alone_in_subprocess(smoke_cache):
    """HF_HUB_CACHE + HF_HUB_OFFLINE set before the first import are enough (no patching)."""
    cache, _ = smoke_cache
    code = """
import json, huggingface_hub.constants as c
from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError
out = {"cache": c.HF_HUB_CACHE, "offline": c.is_offline_mode()}
out["files"] = [hf_hub_download(r, f) for r, f in [
    ("ingrain-test/tiny-clip", "open_clip_config.json"),
    ("jienengchen/ViTamin-S", "pytorch_model.safetensors"),
    ("timm/test_resnet.r160_in1k", "config.json"),
    ("sentence-transformers/all-MiniLM-L6-v2", "1_Pooling/config.json"),
]]
out["snapshot"] = snapshot_download("intfloat/e5-small-v2")
try:
    hf_hub_download("timm/test_resnet.r160_in1k", "pytorch_model.bin")
except LocalEntryNotFoundError:
    out["missing"] = "LocalEntryNotFoundError"
print(json.dumps(out))
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], env=om.offline_env(cache), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["cache"] == str(cache) and out["offline"] is True
    assert all(Path(p).is_file() and Path(p).is_relative_to(cache) for p in out["files"])
    assert (Path(out["snapshot"]) / "modules.json").is_file()
    assert out["missing"] == "LocalEntryNotFoundError"


# --------------------------------------------------------------------------------------------- open_clip


def test_open_clip_hf_hub(offline, smoke_cache):
    import open_clip
    import torch
    from PIL import Image

    model, _, preprocess = open_clip.create_model_and_transforms(offline["clip_hub"])
    tokenizer = open_clip.get_tokenizer(offline["clip_hub"])
    _same_weights(model, _snapshot_file(smoke_cache[0], "ingrain-test/tiny-clip", "open_clip_model.safetensors"))
    model.eval()
    with torch.no_grad():
        image = model.encode_image(preprocess(Image.new("RGB", (64, 48), "red")).unsqueeze(0))
        text = model.encode_text(tokenizer(["a photo of a cat", "a dog"]))
    assert image.shape == (1, 32) and text.shape == (2, 32)
    assert type(tokenizer).__name__ == "SimpleTokenizer"


def test_open_clip_builtin_pretrained_tag(offline, smoke_cache):
    import open_clip
    import torch
    from PIL import Image

    assert (offline["clip_arch"], offline["clip_tag"]) in open_clip.list_pretrained()
    model, _, preprocess = open_clip.create_model_and_transforms(offline["clip_arch"], pretrained=offline["clip_tag"])
    _same_weights(model, _snapshot_file(smoke_cache[0], "jienengchen/ViTamin-S", "pytorch_model.safetensors"))
    tokenizer = open_clip.get_tokenizer(offline["clip_arch"])
    model.eval()
    with torch.no_grad():
        image = model.encode_image(preprocess(Image.new("RGB", (64, 48), "red")).unsqueeze(0))
        text = model.encode_text(tokenizer(["a cat"]))
    assert image.shape == text.shape == (1, 384)


def test_open_clip_custom_file(smoke_files):
    import open_clip

    arch = om.HUB_IDS["clip_custom_arch"]
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=str(smoke_files["clip"]))
    _same_weights(model, smoke_files["clip"])


# --------------------------------------------------------------------------------------------- timm


def test_timm_pretrained_and_hf_hub(offline, smoke_cache):
    import timm
    import torch
    from timm.data import ImageNetInfo, infer_imagenet_subset, resolve_data_config

    by_name = timm.create_model(offline["timm"], pretrained=True)
    by_hub = timm.create_model(offline["timm_hub"], pretrained=True)
    weights = _snapshot_file(smoke_cache[0], "timm/test_resnet.r160_in1k", "model.safetensors")
    _same_weights(by_name, weights)
    _same_weights(by_hub, weights)
    for model in (by_name, by_hub):
        subset = infer_imagenet_subset(model)
        assert subset == "imagenet-1k"
        info = ImageNetInfo(subset)
        assert info.num_classes() == model.num_classes == 1000
        assert info.index_to_description(0).startswith("tench")
        assert resolve_data_config({}, model=model)["input_size"] == (3, 160, 160)
    with torch.no_grad():
        assert by_hub.eval()(torch.zeros(1, 3, 160, 160)).shape == (1, 1000)


def test_timm_custom_file(smoke_files):
    import timm

    model = timm.create_model("test_resnet", num_classes=om.TIMM_CUSTOM_CLASSES,
                              checkpoint_path=str(smoke_files["timm"]))
    _same_weights(model, smoke_files["timm"])
    assert model.num_classes == 7


# ---------------------------------------------------------------------------------------- sentence-transformers


def test_sentence_transformers(offline):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(offline["st"], device="cpu")
    assert getattr(st, "get_embedding_dimension", st.get_sentence_embedding_dimension)() == 32
    assert st.default_prompt_name is None
    assert st.encode(["hello world"]).shape == (1, 32)

    prompted = SentenceTransformer(offline["st_prompt"], device="cpu")
    assert prompted.default_prompt_name == "query" and prompted.prompts["query"] == "query: "
    assert prompted[1].include_prompt is False  # its prompt tokens are left out of the mean
    default = prompted.encode(["a red car"])
    named = prompted.encode(["a red car"], prompt_name="query")
    manual = prompted.encode(["query: a red car"], prompt="")  # the prefix pooled like any text
    bare = prompted.encode(["a red car"], prompt="")
    assert abs(default - named).max() < 1e-5
    assert abs(default - manual).max() > 1e-4 and abs(default - bare).max() > 1e-4

    minilm = SentenceTransformer(offline["minilm"], device="cpu")
    emb = minilm.encode(["a photo of a cat", "a photo of a kitten", "stock market crash"], normalize_embeddings=False)
    assert emb.shape == (3, 384)
    assert abs((emb**2).sum(1) - 1).max() < 1e-4  # Normalize module
    assert emb[0] @ emb[1] > emb[0] @ emb[2]  # real weights


def test_sentence_transformers_custom_files(smoke_files, tmp_path):
    from sentence_transformers import SentenceTransformer

    flat = smoke_files["st"]
    assert sorted(p.name for p in flat.iterdir()) == sorted(om.CUSTOM_ST_FILES)
    model = SentenceTransformer(str(om.assemble_st_folder(flat, tmp_path / "st")), device="cpu")
    assert model.encode(["hello world"]).shape == (1, 32)


# ------------------------------------------------------------------------------ rerankers, sparse encoder

QUERY = "how many people live in berlin?"
DOCS = ["berlin had a population of 3,520,031 in 2019.", "berlin is well known for its museums.", "a cat",
        "the quick brown fox jumps over the lazy dog", ""]
SPARSE_TEXTS = ["a cat", "hello world", "", " ".join(["berlin is a big city with many people"] * 12)]


def _snapshot_names(cache: Path, repo_id: str) -> set[str]:
    root = _snapshot_file(cache, repo_id, "")
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def _kind(cache: Path, repo_id: str) -> str | None:
    path = _snapshot_file(cache, repo_id, "config_sentence_transformers.json")
    return json.loads(path.read_text()).get("model_type") if path.exists() else None


def test_rerankers(offline, smoke_cache):
    import numpy as np
    import torch
    from sentence_transformers import CrossEncoder

    cache = smoke_cache[0]
    saved = CrossEncoder(offline["reranker"], device="cpu")
    plain = CrossEncoder(offline["reranker_hf"], device="cpu")
    assert _kind(cache, offline["reranker"]) == "CrossEncoder"
    # a plain HF repo: config.json + safetensors + tokenizer files, nothing sentence-transformers writes
    assert _snapshot_names(cache, offline["reranker_hf"]) == {
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
        "special_tokens_map.json"}
    config = json.loads(_snapshot_file(cache, offline["reranker_hf"], "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    _same_weights(plain[0].model, _snapshot_file(cache, offline["reranker_hf"], "model.safetensors"))

    pairs = [(QUERY, doc) for doc in DOCS]
    for model, activation in ((saved, torch.nn.Sigmoid), (plain, torch.nn.Identity)):
        assert model.num_labels == 1 and type(model.activation_fn) is activation
        assert model.max_seq_length == om.TINY_MAX_POSITIONS and len(model.tokenizer) == 30522
        scores = model.predict(pairs)
        assert scores.shape == (len(DOCS),) and len(np.unique(scores)) == len(DOCS)  # not degenerate
        assert scores.max() - scores.min() > 1e-2
        ranked = model.rank(QUERY, DOCS)
        assert [r["corpus_id"] for r in ranked] == list(np.argsort(-scores, kind="stable"))
    assert 0 < saved.predict(pairs).min() and saved.predict(pairs).max() < 1  # sigmoid
    # the plain repo's legacy key (as cross-encoder/ms-marco-MiniLM-L6-v2 has): raw logits
    logits = plain.predict(pairs, activation_fn=torch.nn.Identity())
    assert abs(plain.predict(pairs) - logits).max() == 0
    # pairs are truncated at 128 tokens, longest first
    long = " ".join(["berlin is a big city"] * 60)
    features = saved.preprocess([(QUERY, long), (long, long)])
    assert features["input_ids"].shape == (2, om.TINY_MAX_POSITIONS)


def test_classifiers_and_multi_vector(offline, smoke_cache):
    """The text classifiers are plain HF repos with id2label (one multi-label); the multi-vector
    model is a MultiVectorEncoder with ColBERT's markers as prompts; none is degenerate."""
    import numpy as np
    from sentence_transformers import MultiVectorEncoder
    from transformers import AutoModelForSequenceClassification

    cache = smoke_cache[0]
    for key, labels, problem in (("classifier", om.CLASSIFIER_LABELS, None),
                                 ("multilabel", om.MULTILABEL_LABELS, "multi_label_classification")):
        config = json.loads(_snapshot_file(cache, offline[key], "config.json").read_text())
        assert config["architectures"] == ["BertForSequenceClassification"] and config.get("problem_type") == problem
        model = AutoModelForSequenceClassification.from_pretrained(offline[key])
        assert model.config.id2label == labels
    assert _kind(cache, offline["colbert"]) == "MultiVectorEncoder"
    colbert = MultiVectorEncoder(offline["colbert"], device="cpu")
    assert colbert.prompts == om.COLBERT_PROMPTS
    query, document = colbert.encode_query(["a query"])[0], colbert.encode_document(["a longer document"])[0]
    assert query.shape[1] == document.shape[1] and not np.allclose(query[0], query[-1])


def test_sparse_encoder(offline, smoke_cache):
    from sentence_transformers import SparseEncoder

    cache = smoke_cache[0]
    assert _kind(cache, offline["sparse"]) == "SparseEncoder"
    model = SparseEncoder(offline["sparse"], device="cpu")
    assert [type(m).__name__ for m in model] == ["MLMTransformer", "SpladePooling"]
    assert model.max_active_dims == om.SPARSE_MAX_ACTIVE_DIMS
    assert model.get_embedding_dimension() == 30522  # the vocabulary (saved embedding_dimension)
    dense = model.encode(SPARSE_TEXTS, convert_to_sparse_tensor=False)
    assert dense.shape == (len(SPARSE_TEXTS), 30522) and dense.min() >= 0
    active = (dense != 0).sum(dim=1).tolist()
    assert all(20 <= n < om.SPARSE_MAX_ACTIVE_DIMS for n in active[:3]), active  # sparse, not all-zero
    assert active[3] == om.SPARSE_MAX_ACTIVE_DIMS  # a long text: max_active_dims keeps the top 128
    assert (model.encode(SPARSE_TEXTS[3:], convert_to_sparse_tensor=False, max_active_dims=10000) != 0).sum() > 128
    supports = [frozenset((row != 0).nonzero().flatten().tolist()) for row in dense]
    assert len(set(supports)) == len(SPARSE_TEXTS)
    assert model.encode(["a cat"]).is_sparse  # the library's default output


def test_rerankers_and_sparse_env_vars_alone_in_subprocess(smoke_cache, offline):
    """CrossEncoder(hub id) / SparseEncoder(hub id) with only HF_HUB_CACHE + HF_HUB_OFFLINE set, in a
    fresh interpreter: same scores as in this process (built deterministically, loaded from the cache)."""
    from sentence_transformers import CrossEncoder, SparseEncoder

    cache, ids = smoke_cache
    code = f"""
import json
from sentence_transformers import CrossEncoder, SparseEncoder
pairs = [({QUERY!r}, d) for d in {DOCS!r}]
out = {{key: CrossEncoder(name, device="cpu").predict(pairs).tolist()
       for key, name in (("reranker", {ids["reranker"]!r}), ("reranker_hf", {ids["reranker_hf"]!r}))}}
sparse = SparseEncoder({ids["sparse"]!r}, device="cpu")
out["sparse"] = sparse.encode({SPARSE_TEXTS!r}, convert_to_sparse_tensor=False).sum(1).tolist()
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", code], env=om.offline_env(cache), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    pairs = [(QUERY, d) for d in DOCS]
    for key in ("reranker", "reranker_hf"):
        here = CrossEncoder(ids[key], device="cpu").predict(pairs).tolist()
        assert max(abs(a - b) for a, b in zip(out[key], here, strict=True)) < 1e-6
    sums = SparseEncoder(ids["sparse"], device="cpu").encode(SPARSE_TEXTS, convert_to_sparse_tensor=False).sum(1)
    assert max(abs(a - b) for a, b in zip(out["sparse"], sums.tolist(), strict=True)) < 1e-5


def test_new_models_are_deterministic(tmp_path):
    from safetensors.torch import load_file

    for name in ("a", "b"):
        om._stage_hf_reranker(tmp_path / f"reranker-{name}", seed=21, activation_fn=om.RERANKER_HF_ACTIVATION)
        om._stage_mlm(tmp_path / f"mlm-{name}", seed=22)
    for kind in ("reranker", "mlm"):
        a, b = (load_file(str(tmp_path / f"{kind}-{n}" / "model.safetensors")) for n in "ab")
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    bias = load_file(str(tmp_path / "mlm-a" / "model.safetensors"))["cls.predictions.bias"]
    assert (bias == om.SPARSE_MLM_BIAS).all()


# --------------------------------------------------------------------------------------------- bad files, images


def test_bad_files(smoke_files):
    import safetensors
    import safetensors.torch
    import torch

    assert zipfile.is_zipfile(smoke_files["not_pickle"])  # torch.save zip-pickle
    assert "fc.weight" in torch.load(smoke_files["not_pickle"], weights_only=True)  # loadable, so refusal is policy
    with pytest.raises(safetensors.SafetensorError):
        safetensors.torch.load_file(str(smoke_files["corrupt"]))


def test_images(smoke_files):
    from PIL import Image, ImageOps, UnidentifiedImageError

    def opened(key):
        return Image.open(smoke_files[key])

    assert (opened("red").mode, opened("red").size) == ("RGB", (64, 48))
    assert opened("rgba").mode == "RGBA"
    assert (opened("gray").format, opened("gray").mode) == ("JPEG", "L")
    assert opened("webp").format == "WEBP"
    assert opened("one").size == (1, 1)
    rotated = opened("exif_rotated")
    assert rotated.getexif()[0x0112] == 6 and rotated.size == (64, 32)
    upright = ImageOps.exif_transpose(rotated).convert("RGB")
    assert upright.size == (32, 64)
    # stored left=red/right=blue; rotated 90 CW for display: top=red, bottom=blue
    r, _, b = upright.getpixel((16, 4))
    assert r > 200 and b < 60
    r, _, b = upright.getpixel((16, 60))
    assert b > 200 and r < 60
    with pytest.raises(UnidentifiedImageError):
        Image.open(smoke_files["not_image"])


# --------------------------------------------------------------------------------------------- server


def test_serve_directory(smoke_files):
    import httpx

    root = smoke_files["red"].parent
    with om.serve_directory(root) as server:
        assert server.url.startswith("http://127.0.0.1:")
        response = httpx.get(f"{server.url}/red.png", headers={"Authorization": "Bearer t0k", "X-Custom": "1"})
        assert response.status_code == 200 and response.content == smoke_files["red"].read_bytes()
        path, headers = server.requests[-1]
        assert path == "/red.png"
        assert headers["authorization"] == "Bearer t0k" and headers.get("x-custom") == "1" and "X-CUSTOM" in headers

        assert httpx.get(f"{server.url}/st/modules.json").json()[0]["path"] == ""
        assert httpx.get(f"{server.url}/missing.bin").status_code == 404
        for code in (401, 403, 418, 500, 503):
            assert httpx.get(f"{server.url}/status/{code}").status_code == code

        target = f"{server.url}/timm.safetensors"
        redirected = httpx.get(f"{server.url}/redirect", params={"to": target}, follow_redirects=True)
        assert redirected.status_code == 200 and redirected.content == smoke_files["timm"].read_bytes()
        assert redirected.history[0].status_code == 302
        assert [p for p, _ in server.requests[-2:]][-1] == "/timm.safetensors"

        start = time.perf_counter()
        with pytest.raises(httpx.ReadTimeout):
            httpx.get(f"{server.url}/slow/one.png", timeout=0.5)
        assert time.perf_counter() - start < 2.5
        start = time.perf_counter()
        slow = httpx.get(f"{server.url}/slow/one.png", timeout=10)
        assert slow.status_code == 200 and time.perf_counter() - start >= 2.9
        assert slow.content == smoke_files["one"].read_bytes()
