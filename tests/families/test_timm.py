"""timm through the server equals timm itself: probabilities, logits, pooled features, labels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fixtures.compare import MAX_ABS_DIFF, b64, max_abs_diff, pil

IMAGES = ["red.png", "rgba.png", "gray.jpg", "photo.webp", "one.png", "exif_rotated.jpg"]


def _library(name: str, **kwargs: object) -> tuple[torch.nn.Module, object]:
    import timm
    from timm.data import create_transform, resolve_data_config

    model = timm.create_model(name, **kwargs).eval()
    return model, create_transform(**resolve_data_config({}, model=model))


@pytest.fixture(scope="module")
def timm_model(client, hub_models, files_dir):
    name = hub_models["timm"]
    response = client.post("/load_timm_model", json={"name": name})
    assert response.status_code == 200, response.text
    model, transform = _library(name, pretrained=True)
    paths = [files_dir / f for f in IMAGES]
    pixels = torch.stack([transform(pil(p)) for p in paths])
    return name, model, pixels, [b64(p) for p in paths]


def test_the_front_opens_the_model_without_its_weights(hub_models, tmp_path):
    """The front builds the model on torch's meta device only to read its data config."""
    from ingrain_bento.families import family, parse_ref

    timm_family = family("timm")
    ref = parse_ref("timm", hub_models["timm"], None)
    timm_family.fetch(ref, tmp_path)
    preprocessor = timm_family.load_preprocessor(tmp_path, ref)
    assert {p.device.type for p in preprocessor.model.parameters()} == {"meta"}
    assert preprocessor.front_weights is None and preprocessor.pixels is not None


def test_infer_image_is_softmax_or_logits(client, timm_model):
    name, model, pixels, images = timm_model
    with torch.inference_mode():
        logits = model(pixels)
    probs = client.post("/infer_image", json={"name": name, "image": images}).json()["embeddings"]
    assert max_abs_diff(probs, logits.softmax(-1), "timm probabilities") <= MAX_ABS_DIFF
    raw = client.post("/infer_image", json={"name": name, "image": images, "normalize": False}).json()
    assert max_abs_diff(raw["embeddings"], logits, "timm logits") <= MAX_ABS_DIFF
    classified = client.post("/classify_image", json={"name": name, "image": images}).json()["probabilities"]
    assert max_abs_diff(classified, logits.softmax(-1), "timm probabilities") <= MAX_ABS_DIFF


def test_embed_image_is_the_pooled_pre_logits_feature(client, timm_model):
    name, model, pixels, images = timm_model
    with torch.inference_mode():
        features = model.forward_head(model.forward_features(pixels), pre_logits=True)
    got = client.post("/embed_image", json={"name": name, "image": images, "normalize": False}).json()
    assert max_abs_diff(got["embeddings"], features, "timm features") <= MAX_ABS_DIFF
    cut = client.post("/embed_image", json={"name": name, "image": images, "nDims": 10}).json()["embeddings"]
    assert max_abs_diff(cut, F.normalize(features[:, :10], dim=-1), "timm features") <= MAX_ABS_DIFF
    size = client.get("/model_embedding_size", params={"name": name}).json()["embeddingSize"]
    assert size == features.shape[1]


def test_labels_are_imagenet_descriptions_in_class_order(client, timm_model):
    from timm.data import ImageNetInfo

    labels = client.get("/model_classification_labels", params={"name": timm_model[0]}).json()["labels"]
    info = ImageNetInfo("imagenet-1k")
    assert labels == [info.index_to_description(i) for i in range(1000)]


def test_text_is_a_400(client, timm_model):
    response = client.post("/embed_text", json={"name": timm_model[0], "text": "hello"})
    message = response.json()["message"]
    assert response.status_code == 400 and "cannot embed text: it can classify images (/classify_image)" in message


def test_hf_hub_name_loads_the_same_weights(client, hub_models, timm_model):
    name, _, pixels, images = timm_model
    hub_name = hub_models["timm_hub"].replace("hf-hub:", "hf_hub:")
    assert client.post("/load_timm_model", json={"name": hub_name}).status_code == 200
    a = client.post("/classify_image", json={"name": hub_name, "image": images[:2]}).json()["probabilities"]
    b = client.post("/classify_image", json={"name": name, "image": images[:2]}).json()["probabilities"]
    assert max_abs_diff(a, b, "timm probabilities") <= MAX_ABS_DIFF


def test_custom_checkpoint_with_num_classes(client, file_server, files_dir):
    body = {"library": "timm", "pretrained_name": "my-timm", "safetensors_url": f"{file_server.url}/timm.safetensors"}
    assert client.post("/download_custom_model", json=body).status_code == 400  # num_classes missing
    assert client.post("/download_custom_model", json={**body, "num_classes": 7}).status_code == 200
    response = client.post("/load_timm_model", json={"name": "test_resnet", "pretrained": "my-timm"})
    assert response.status_code == 200, response.text
    import safetensors.torch

    model, transform = _library("test_resnet", num_classes=7)
    model.load_state_dict(safetensors.torch.load_file(str(files_dir / "timm.safetensors")))
    image = files_dir / "red.png"
    with torch.inference_mode():
        expected = model(transform(pil(image)).unsqueeze(0)).softmax(-1)
    got = client.post("/classify_image", json={"name": "test_resnet::my-timm", "image": b64(image)}).json()
    assert max_abs_diff(got["probabilities"], expected, "timm probabilities (custom)") <= MAX_ABS_DIFF
    labels = client.get("/model_classification_labels", params={"name": "test_resnet", "pretrained": "my-timm"})
    assert labels.json()["labels"] == [str(i) for i in range(7)]
    deleted = client.request("DELETE", "/delete_model", json={"name": "test_resnet", "pretrained": "my-timm"})
    assert deleted.status_code == 200


@pytest.mark.parametrize("num_classes", [8, 60_000_000])
def test_num_classes_must_fit_the_checkpoint_and_nothing_is_stored_otherwise(client, file_server, num_classes):
    """The 7-class checkpoint with 8 classes (a later load would fail) or 60M (~123 GB at load)."""
    body = {"library": "timm", "pretrained_name": f"wrong-classes-{num_classes}", "num_classes": num_classes,
            "safetensors_url": f"{file_server.url}/timm.safetensors"}
    response = client.post("/download_custom_model", json=body)
    assert response.status_code == 400 and "num_classes" in response.json()["message"], response.text
    stored = {m["name"] for m in client.get("/repository_models").json()["models"]}
    assert body["pretrained_name"] not in stored
