"""Zero-shot image classification (API.md "More tasks"): ``/classify_image`` with ``labels`` on an
open_clip model, against the whole app in-process, equal to open_clip's own recipe
(``build_zero_shot_classifier`` and the model's ``logit_scale``) on the same weights."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest

from ingrain_bento.tasks import zero_shot

LABELS = ["cat", "dog", "red square", "diagram"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}"]


def noise_images(count: int, seed: int = 0) -> list:
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (48 + 8 * i, 64, 3), dtype=np.uint8)) for i in range(count)]


def data_uri(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def open_clip_probabilities(name: str, images: list, labels: list[str], templates: list[str]) -> np.ndarray:
    """open_clip's zero-shot recipe, as its evaluation runs it, with the model's own logit_scale."""
    import open_clip
    import torch
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    model, _, preprocess = open_clip.create_model_and_transforms(name)
    model.eval()
    tokenizer = open_clip.get_tokenizer(name)
    with torch.no_grad():
        classifier = build_zero_shot_classifier(model, tokenizer, labels, templates, num_classes_per_batch=10,
                                                device="cpu", use_tqdm=False)
        features = model.encode_image(torch.stack([preprocess(image) for image in images]), normalize=True)
        return (model.logit_scale.exp() * features @ classifier).softmax(dim=-1).numpy()


@pytest.fixture(scope="module")
def clip(client, hub_models):
    name = hub_models["clip_hub"]
    assert client.post("/load_model", json={"name": name, "library": "open_clip"}).status_code == 200
    return name


@pytest.mark.parametrize("templates", [None, TEMPLATES])
def test_probabilities_equal_open_clips_recipe(client, clip, templates):
    images = noise_images(3)
    body = {"name": clip, "image": [data_uri(i) for i in images], "labels": LABELS}
    if templates:
        body["templates"] = templates
    response = client.post("/classify_image", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["labels"] == LABELS
    expected = open_clip_probabilities(clip, images, LABELS, templates or list(zero_shot.DEFAULT_TEMPLATES))
    np.testing.assert_allclose(answer["probabilities"], expected, atol=1e-5)


def test_both_backends_give_open_clips_probabilities(client, clip):
    images = noise_images(2, seed=3)
    expected = open_clip_probabilities(clip, images, LABELS, TEMPLATES)
    for backend in ("torch", "onnx"):
        assert client.post("/unload_model", json={"name": clip}).status_code == 200
        loaded = client.post("/load_model", json={"name": clip, "library": "open_clip", "backend": backend})
        assert loaded.status_code == 200, loaded.text
        body = {"name": clip, "image": [data_uri(i) for i in images], "labels": LABELS, "templates": TEMPLATES}
        np.testing.assert_allclose(client.post("/classify_image", json=body).json()["probabilities"], expected,
                                   atol=1e-5)


def test_the_labels_classifier_is_made_once_per_label_set(client, clip):
    images = [data_uri(i) for i in noise_images(2, seed=1)]
    body = {"name": clip, "image": images, "labels": ["a", "b", "c"], "templates": ["{} here"]}
    first = client.post("/classify_image", json=body).json()
    made = zero_shot.CACHE.computed
    again = client.post("/classify_image", json=body).json()
    assert zero_shot.CACHE.computed == made and again["probabilities"] == first["probabilities"]
    client.post("/classify_image", json={**body, "labels": ["a", "b"]})
    assert zero_shot.CACHE.computed == made + 1


def test_the_cache_is_bounded():
    import asyncio

    cache = zero_shot.ClassifierCache(size=2)

    async def fill() -> None:
        for index in range(5):
            await cache.get(("tag", (str(index),), ("{}",)), lambda: asyncio.sleep(0, np.zeros(1)))

    asyncio.run(fill())
    assert len(cache._entries) == 2 and cache.computed == 5


def test_a_timms_own_classes_are_unchanged_and_labels_are_refused(client, hub_models):
    name = hub_models["timm"]
    assert client.post("/load_model", json={"name": name, "library": "timm"}).status_code == 200
    image = data_uri(noise_images(1)[0])
    own = client.post("/classify_image", json={"name": name, "image": [image]})
    assert own.status_code == 200 and "probabilities" in own.json() and "labels" not in own.json()
    refused = client.post("/classify_image", json={"name": name, "image": [image], "labels": ["cat"]})
    assert refused.status_code == 400 and "send no 'labels'" in refused.json()["message"]


@pytest.mark.parametrize(("extra", "words"), [
    ({"labels": []}, "label list is empty"),
    ({"labels": ["cat"], "templates": ["a photo of a cat"]}, "has no '{}'"),
    ({"templates": ["a {}"]}, "templates apply with labels"),
])
def test_bad_label_requests_say_what_to_fix(client, clip, extra, words):
    response = client.post("/classify_image", json={"name": clip, "image": [data_uri(noise_images(1)[0])], **extra})
    assert response.status_code == 400, response.text
    assert words in response.json()["message"]
    assert client.post("/classify_image", json={"name": clip, "image": [data_uri(noise_images(1)[0])],
                                                "labels": ["ok"]}).status_code == 200
