"""open_clip through the server equals open_clip itself, on the same weights and inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fixtures.compare import MAX_ABS_DIFF, b64, data_uri, max_abs_diff, pil

TEXTS = ["a photo of a cat", "two dogs playing in the snow", "", "word " * 400]
IMAGES = ["red.png", "rgba.png", "gray.jpg", "photo.webp", "one.png", "exif_rotated.jpg"]


def _library(name: str, pretrained: str | None = None) -> tuple[object, object, object]:
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


@pytest.fixture(scope="module")
def tiny_clip(client, hub_models):
    name = hub_models["clip_hub"]
    response = client.post("/load_clip_model", json={"name": name})
    assert response.status_code == 200, response.text
    return (name, *_library(name))


def test_text_embeddings_equal_open_clip_normalized_or_not(client, tiny_clip):
    name, model, _, tokenizer = tiny_clip
    with torch.inference_mode():
        raw = model.encode_text(tokenizer(TEXTS))
    for normalize in (True, False):
        got = client.post("/infer_text", json={"name": name, "text": TEXTS, "normalize": normalize}).json()
        expected = F.normalize(raw, dim=-1) if normalize else raw
        assert max_abs_diff(got["embeddings"], expected, "open_clip text") <= MAX_ABS_DIFF
        assert got["processingTimeMs"] > 0


def test_n_dims_truncates_then_normalizes(client, tiny_clip):
    name, model, _, tokenizer = tiny_clip
    with torch.inference_mode():
        raw = model.encode_text(tokenizer(TEXTS[:2]))
    got = client.post("/embed_text", json={"name": name, "text": TEXTS[:2], "nDims": 8}).json()["embeddings"]
    assert max_abs_diff(got, F.normalize(raw[:, :8], dim=-1), "open_clip text") <= MAX_ABS_DIFF
    assert torch.allclose(torch.tensor(got).norm(dim=-1), torch.ones(2), atol=1e-5)


def test_image_embeddings_equal_open_clip_for_every_format(client, tiny_clip, files_dir):
    name, model, preprocess, _ = tiny_clip
    paths = [files_dir / f for f in IMAGES]
    with torch.inference_mode():
        raw = model.encode_image(torch.stack([preprocess(pil(p)) for p in paths]))
    for normalize in (True, False):
        got = client.post("/embed_image", json={"name": name, "image": [b64(p) for p in paths],
                                                "normalize": normalize}).json()["embeddings"]
        expected = F.normalize(raw, dim=-1) if normalize else raw
        assert max_abs_diff(got, expected, "open_clip image") <= MAX_ABS_DIFF


def test_image_urls_and_data_uris_give_the_same_rows(client, tiny_clip, file_server, files_dir):
    name = tiny_clip[0]
    red = files_dir / "red.png"
    by_b64 = client.post("/embed_image", json={"name": name, "image": b64(red)}).json()["embeddings"]
    by_uri = client.post("/embed_image", json={"name": name, "image": data_uri(red, "image/png")}).json()
    by_url = client.post("/embed_image", json={
        "name": name, "image": [f"{file_server.url}/red.png"], "imageDownloadHeaders": {"X-Ingrain-Test": "yes"},
    }).json()
    assert max_abs_diff(by_uri["embeddings"], by_b64, "open_clip image") == 0
    assert max_abs_diff(by_url["embeddings"], by_b64, "open_clip image") == 0
    sent = [headers for path, headers in file_server.requests if path.endswith("red.png")]
    assert any(h.get("X-Ingrain-Test") == "yes" for h in sent)


def test_infer_returns_text_and_image_rows_in_order(client, tiny_clip, files_dir):
    name = tiny_clip[0]
    red = b64(files_dir / "red.png")
    both = client.post("/infer", json={"name": name, "text": TEXTS[:2], "image": [red, red]}).json()
    text = client.post("/infer_text", json={"name": name, "text": TEXTS[:2]}).json()["embeddings"]
    image = client.post("/infer_image", json={"name": name, "image": red}).json()["embeddings"]
    assert max_abs_diff(both["textEmbeddings"], text, "open_clip text") <= MAX_ABS_DIFF
    assert max_abs_diff(both["imageEmbeddings"], image * 2, "open_clip image") <= MAX_ABS_DIFF
    only_text = client.post("/embed", json={"name": name, "text": "hi"}).json()
    assert only_text["imageEmbeddings"] is None and len(only_text["textEmbeddings"]) == 1


def test_embedding_size_is_the_text_towers(client, tiny_clip):
    name, model = tiny_clip[0], tiny_clip[1]
    response = client.get("/model_embedding_size", params={"name": name})
    assert response.json() == {"embeddingSize": model.text_projection.shape[1]}


def test_builtin_architecture_and_pretrained_tag(client, hub_models):
    arch, tag = hub_models["clip_arch"], hub_models["clip_tag"]
    response = client.post("/load_clip_model", json={"name": arch, "pretrained": tag})
    assert response.status_code == 200, response.text
    assert client.post("/load_clip_model", json={"name": arch, "pretrained": tag}).json()["message"].endswith(
        "already loaded.")
    model, _, tokenizer = _library(arch, tag)
    with torch.inference_mode():
        expected = F.normalize(model.encode_text(tokenizer(TEXTS[:2])), dim=-1)
    got = client.post("/embed_text", json={"name": f"{arch}::{tag}", "text": TEXTS[:2]}).json()["embeddings"]
    assert max_abs_diff(got, expected, "open_clip text (built-in tag)") <= MAX_ABS_DIFF
    client.post("/unload_model", json={"name": arch, "pretrained": tag})


def test_unknown_tag_is_a_404_naming_known_tags(client, hub_models):
    response = client.post("/load_clip_model", json={"name": hub_models["clip_arch"], "pretrained": "no_such_tag"})
    assert response.status_code == 404
    assert hub_models["clip_tag"] in response.json()["message"]


def test_custom_checkpoint_downloads_then_binds_to_an_architecture(client, hub_models, file_server, files_dir):
    arch = hub_models["clip_custom_arch"]
    body = {"library": "open_clip", "pretrained_name": "my-clip",
            "safetensors_url": f"{file_server.url}/clip.safetensors"}
    response = client.post("/download_custom_model", json=body)
    assert response.status_code == 200, response.text
    assert response.json() == {"message": "Custom model my-clip downloaded successfully."}
    assert client.post("/download_custom_model", json=body).status_code == 409
    listed = {(m["name"], m["pretrained"]) for m in client.get("/repository_models").json()["models"]}
    assert ("my-clip", "my-clip") in listed

    assert client.post("/load_clip_model", json={"name": arch, "pretrained": "my-clip"}).status_code == 200
    model, _, tokenizer = _library(arch, str(files_dir / "clip.safetensors"))
    with torch.inference_mode():
        expected = F.normalize(model.encode_text(tokenizer(TEXTS[:2])), dim=-1)
    got = client.post("/embed_text", json={"name": f"{arch}::my-clip", "text": TEXTS[:2]}).json()["embeddings"]
    assert max_abs_diff(got, expected, "open_clip text (custom)") <= MAX_ABS_DIFF
    listed = {(m["name"], m["pretrained"]) for m in client.get("/repository_models").json()["models"]}
    assert (arch, "my-clip") in listed and ("my-clip", "my-clip") not in listed
    assert client.request("DELETE", "/delete_model", json={"name": arch, "pretrained": "my-clip"}).status_code == 200


def test_an_hf_hub_repo_with_only_pickled_weights_is_refused(client, hub_models):
    name = hub_models["clip_hub_pickled"]
    response = client.post("/load_clip_model", json={"name": name})
    assert response.status_code == 400 and "safetensors" in response.json()["message"], response.text
    assert name not in {m["name"] for m in client.get("/repository_models").json()["models"]}
