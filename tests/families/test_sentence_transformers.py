"""sentence-transformers through the server equals ``SentenceTransformer.encode`` itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fixtures.compare import MAX_ABS_DIFF, max_abs_diff

TEXTS = ["The cat sits on the mat.", "A man is playing a guitar.", "", "long " * 2000]


def _encode(name_or_path: str, texts: list[str]) -> torch.Tensor:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(name_or_path, device="cpu").encode(texts, convert_to_tensor=True)


@pytest.mark.parametrize("key", ["st", "minilm"])
def test_embeddings_equal_encode(client, hub_models, key):
    name = hub_models[key]
    response = client.post("/load_sentence_transformer_model", json={"name": name})
    assert response.status_code == 200, response.text
    expected = _encode(name, TEXTS)
    raw = client.post("/infer_text", json={"name": name, "text": TEXTS, "normalize": False}).json()["embeddings"]
    assert max_abs_diff(raw, expected, "sentence_transformers text") <= MAX_ABS_DIFF
    unit = client.post("/embed_text", json={"name": name, "text": TEXTS}).json()["embeddings"]
    assert max_abs_diff(unit, F.normalize(expected, dim=-1), "sentence_transformers text") <= MAX_ABS_DIFF
    cut = client.post("/embed_text", json={"name": name, "text": TEXTS, "n_dims": 16}).json()["embeddings"]
    assert max_abs_diff(cut, F.normalize(expected[:, :16], dim=-1), "sentence_transformers text") <= MAX_ABS_DIFF


def test_default_prompt_from_the_config_is_applied(client, hub_models):
    name = hub_models["st_prompt"]
    assert client.post("/load_model", json={"name": name, "library": "sentence_transformers"}).status_code == 200
    got = client.post("/embed_text", json={"name": name, "text": TEXTS[:2], "normalize": False}).json()["embeddings"]
    assert max_abs_diff(got, _encode(name, TEXTS[:2]), "sentence_transformers text (prompt)") <= MAX_ABS_DIFF
    from sentence_transformers import SentenceTransformer

    no_prompt = SentenceTransformer(name, device="cpu").encode(TEXTS[:2], prompt="", convert_to_tensor=True)
    assert not torch.allclose(torch.tensor(got), no_prompt, atol=1e-4), "the prompt changed nothing"


def test_embedding_size_and_text_only(client, hub_models, files_dir):
    name = hub_models["st"]
    client.post("/load_sentence_transformer_model", json={"name": name})
    size = client.get("/model_embedding_size", params={"name": name}).json()["embeddingSize"]
    assert size == _encode(name, ["x"]).shape[1]
    from fixtures.compare import b64

    response = client.post("/embed_image", json={"name": name, "image": b64(files_dir / "red.png")})
    message = response.json()["message"]
    assert response.status_code == 400 and "cannot embed images: it can embed text (/embed_text)" in message


def test_custom_checkpoint_from_urls(client, file_server, session_dir, files_dir):
    files = {
        "safetensors_url": "model.safetensors", "config_json_url": "config.json",
        "tokenizer_json_url": "tokenizer.json",
        "tokenizer_config_json_url": "tokenizer_config.json", "vocab_txt_url": "vocab.txt",
        "special_tokens_map_json_url": "special_tokens_map.json", "pooling_config_json_url": "pooling_config.json",
        "sentence_bert_config_json_url": "sentence_bert_config.json", "modules_json_url": "modules.json",
    }
    body = {"library": "sentence_transformers", "pretrainedName": "my-st",
            **{field: f"{file_server.url}/st/{name}" for field, name in files.items()}}
    missing = {k: v for k, v in body.items() if k != "vocab_txt_url"}
    response = client.post("/download_custom_model", json=missing)
    assert response.status_code == 400 and "vocab_txt_url" in response.json()["message"]
    response = client.post("/download_custom_model", json=body)
    assert response.status_code == 200, response.text
    assert client.post("/load_sentence_transformer_model", json={"name": "my-st"}).status_code == 200
    from fixtures.offline_models import assemble_st_folder

    folder = assemble_st_folder(files_dir / "st", session_dir / "st-folder")
    got = client.post("/embed_text", json={"name": "my-st", "text": TEXTS[:2], "normalize": False}).json()
    assert max_abs_diff(got["embeddings"], _encode(str(folder), TEXTS[:2]), "sentence_transformers text (custom)") \
        <= MAX_ABS_DIFF
    assert client.request("DELETE", "/delete_model", json={"name": "my-st"}).status_code == 200


# ---- tokenized in the front, padded per batch in the runner ----------------------------------

def _halves(name: str, folder: Path, backend: str = "torch"):
    """The front's preprocessor (no weights) and the engine's model with ``backend``, from one
    saved folder (exported first, for onnx)."""
    from sentence_transformers import SentenceTransformer

    from ingrain_bento.backends import BackendChoice
    from ingrain_bento.backends.onnx import export_graphs
    from ingrain_bento.families import family, parse_ref

    SentenceTransformer(name, device="cpu").save(str(folder / "model"))
    ref = parse_ref("sentence_transformers", name, None)
    st = family("sentence_transformers")
    export = None
    if backend == "onnx":
        export = folder / "export"
        export.mkdir()
        export_graphs(st.graphs(folder / "model"), export)
    engine = BackendChoice(backend, torch.device("cpu"), False, None, export)  # type: ignore[arg-type]
    return st.load_preprocessor(folder / "model", ref), st.load(folder / "model", ref, engine)


@pytest.mark.parametrize("key", ["st", "st_prompt", "minilm"])
def test_requests_tokenized_apart_and_batched_together_equal_encode(hub_models, tmp_path, key, backend):
    """Rows from separately tokenized requests of different lengths, merged into one forward."""
    preprocessor, model = _halves(hub_models[key], tmp_path, backend)
    assert model.backend == backend
    assert preprocessor.format is not None and preprocessor.format == model.format, \
        "this model should take the tokenize-before-batching path, in both halves alike"
    requests = [TEXTS[:1], ["a b c d e f g h i j k l m n o p"], TEXTS[1:3], ["x"]]
    rows = [row for texts in requests for row in preprocessor.prepare_texts(texts)]
    got = model.forward("embed_text", rows)
    expected = _encode(hub_models[key], [text for texts in requests for text in texts])
    assert max_abs_diff(got, expected, "sentence_transformers text (batched apart)") <= MAX_ABS_DIFF


def test_the_front_opens_the_model_without_its_weights(hub_models, tmp_path):
    preprocessor, model = _halves(hub_models["minilm"], tmp_path)
    assert {p.device.type for p in preprocessor.model.parameters()} == {"meta"}
    assert preprocessor.front_weights is None
    assert {p.device.type for p in model.executor.graphs["forward"].module.parameters()} == {"cpu"}


@pytest.mark.parametrize("key", ["st", "reranker", "sparse"])
def test_the_front_opens_every_kind_without_its_weights_with_or_without_kernels(hub_models, tmp_path, key):
    """Embedders, rerankers and sparse encoders, stored as the server stores them: no parameter
    of the front's model is on a real device. transformers kernelizes every model it loads when
    ``kernels`` is installed (transformers 5.25 requires it), and kernelizing refuses the meta
    device: the front's open must not kernelize."""
    import importlib.util

    from ingrain_bento.families import family, parse_ref

    st = family("sentence_transformers")
    ref = parse_ref("sentence_transformers", hub_models[key], None)
    st.fetch(ref, tmp_path)
    preprocessor = st.load_preprocessor(tmp_path, ref)
    assert {p.device.type for p in preprocessor.model.parameters()} == {"meta"}, preprocessor.front_weights
    assert preprocessor.front_weights is None
    if importlib.util.find_spec("kernels") is not None:
        assert not getattr(preprocessor.model[0].auto_model, "use_kernels", False)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_split_then_pad_gives_back_the_tokenizers_batch(hub_models, padding_side):
    from sentence_transformers import SentenceTransformer

    from ingrain_bento.families.sentence_transformers import pad_rows, split_rows, text_format

    library = SentenceTransformer(hub_models["st"], device="cpu")
    library.tokenizer.padding_side = padding_side
    fmt = text_format(library, None)
    assert fmt is not None and fmt.padding_side == padding_side
    features = library.preprocess(["short", "a much longer text than the first", ""])
    rows = split_rows(features, fmt)
    assert [row.shape[1] for row in rows] == features["attention_mask"].sum(dim=1).tolist()
    again = pad_rows(rows, fmt)
    tensors = {key: value for key, value in features.items() if isinstance(value, torch.Tensor)}
    assert again.keys() == tensors.keys()
    for key, value in tensors.items():
        assert torch.from_numpy(again[key]).equal(value)


def test_an_item_of_another_format_is_refused(hub_models):
    from sentence_transformers import SentenceTransformer

    from ingrain_bento.families.sentence_transformers import pad_rows, text_format

    fmt = text_format(SentenceTransformer(hub_models["st"], device="cpu"), None)
    assert fmt is not None
    with pytest.raises(ValueError, match="token rows"):
        pad_rows([np.ones((len(fmt.keys) + 1, 3), dtype=np.int32)], fmt)


def test_a_tokenizer_output_that_does_not_split_falls_back_to_encode(hub_models, tmp_path, monkeypatch):
    from ingrain_bento.families import family
    from ingrain_bento.families import sentence_transformers as st_family

    monkeypatch.setattr(st_family, "split_rows", lambda features, fmt: None)
    preprocessor, model = _halves(hub_models["st_prompt"], tmp_path)
    with pytest.raises(RuntimeError, match="raw texts"):  # the ONNX engine: such a model loads with torch
        family("sentence_transformers").graphs(tmp_path / "model")
    assert preprocessor.format is None and model.format is None
    items = preprocessor.prepare_texts(TEXTS[:2])
    assert items == TEXTS[:2], "without a format the front sends the texts themselves"
    got = model.forward("embed_text", items)
    assert max_abs_diff(got, _encode(hub_models["st_prompt"], TEXTS[:2]), "sentence_transformers text (prompt)") \
        <= MAX_ABS_DIFF


def test_a_hub_repo_with_only_pickled_weights_is_refused(client, hub_models):
    response = client.post("/load_sentence_transformer_model", json={"name": hub_models["st_pickled"]})
    assert response.status_code == 400 and "safetensors" in response.json()["message"], response.text


def test_a_name_is_a_hub_id_never_a_folder_of_the_server(client, hub_models, tmp_path, monkeypatch):
    """A relative name that is also a folder in the server's working directory is not opened."""
    from sentence_transformers import SentenceTransformer

    SentenceTransformer(hub_models["st"], device="cpu").save(str(tmp_path / "local-only-model"))
    monkeypatch.chdir(tmp_path)
    response = client.post("/load_sentence_transformer_model", json={"name": "local-only-model"})
    assert response.status_code == 502, response.text  # fetched from the Hub (offline here), never opened
    assert str(tmp_path) not in response.json()["message"], "error messages never show server paths"


def test_a_custom_modules_json_may_name_only_the_librarys_modules(client, file_server, files_dir):
    import json

    evil = files_dir / "st-evil"
    evil.mkdir(exist_ok=True)
    modules = json.loads((files_dir / "st" / "modules.json").read_text())
    modules[0]["type"] = "os.system"
    (evil / "modules.json").write_text(json.dumps(modules))
    names = {"safetensors_url": "model.safetensors", "config_json_url": "config.json",
             "tokenizer_json_url": "tokenizer.json", "tokenizer_config_json_url": "tokenizer_config.json",
             "vocab_txt_url": "vocab.txt", "special_tokens_map_json_url": "special_tokens_map.json",
             "pooling_config_json_url": "pooling_config.json",
             "sentence_bert_config_json_url": "sentence_bert_config.json"}
    body = {"library": "sentence_transformers", "pretrained_name": "evil-st",
            **{field: f"{file_server.url}/st/{name}" for field, name in names.items()},
            "modules_json_url": f"{file_server.url}/st-evil/modules.json"}
    response = client.post("/download_custom_model", json=body)
    assert response.status_code == 400 and "os.system" in response.json()["message"], response.text
    assert "evil-st" not in {m["name"] for m in client.get("/repository_models").json()["models"]}


@pytest.mark.parametrize("key", ["st", "minilm"])
def test_padding_changes_no_row(hub_models, tmp_path, key, backend):
    """A text's row is the same alone and in a forward padded to a text ten times its length."""
    preprocessor, model = _halves(hub_models[key], tmp_path, backend)
    short = preprocessor.prepare_texts(["a short query"])
    padded = preprocessor.prepare_texts(["a short query", "a much longer passage " * 20])
    alone = model.forward("embed_text", short)[0]
    together = model.forward("embed_text", padded)[0]
    assert padded[1].shape[-1] > 5 * short[0].shape[-1]
    assert max_abs_diff(together, alone, "sentence_transformers text (padded vs alone)") <= 1e-6
