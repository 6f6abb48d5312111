"""Request and response bodies (``ingrain_bento.schemas``).

Requests accept snake_case and camelCase alike and ignore unknown fields; a missing
required field, a wrong type or an empty list is a validation error, which
``validation_message`` turns into one readable line. Responses serialize in camelCase,
as Ingrain sends them.
"""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from ingrain_bento.schemas import (
    CustomModelRequest,
    EmbeddingSizeResponse,
    EmbeddingsResponse,
    ImageRequest,
    InferenceRequest,
    ModelInfo,
    ModelListResponse,
    ModelRequest,
    OpenAIEmbeddingRequest,
    ProbabilitiesResponse,
    TextImageEmbeddingsResponse,
    TextImageRequest,
    TextRequest,
    validation_message,
)


def errors_of(model, data) -> list[dict]:
    with pytest.raises(ValidationError) as info:
        model.model_validate(data)
    return info.value.errors()


# ---- snake_case and camelCase ------------------------------------------------------------

@pytest.mark.parametrize("n_dims_key, headers_key", [
    ("n_dims", "image_download_headers"),
    ("nDims", "imageDownloadHeaders"),
    ("n_dims", "imageDownloadHeaders"),
])
def test_inference_fields_accept_snake_and_camel_case(n_dims_key, headers_key):
    request = ImageRequest.model_validate({
        "name": "ViT-B-32", "image": "https://example.com/a.png",
        n_dims_key: 64, headers_key: {"Authorization": "Bearer x"},
    })
    assert request.n_dims == 64
    assert request.image_download_headers == {"Authorization": "Bearer x"}


def test_inference_defaults():
    request = TextRequest.model_validate({"name": "m", "text": "hi"})
    assert request.normalize is True
    assert request.n_dims is None
    assert request.pretrained is None
    assert request.library is None
    assert request.image_download_headers is None


def test_normalize_null_means_the_default_true():
    assert TextRequest.model_validate({"name": "m", "text": "hi", "normalize": None}).normalize is True
    assert TextRequest.model_validate({"name": "m", "text": "hi", "normalize": False}).normalize is False


def test_unknown_fields_are_ignored():
    request = TextRequest.model_validate({"name": "m", "text": "hi", "future_field": 1, "somethingElse": [1]})
    assert request.texts == ["hi"]
    assert not hasattr(request, "future_field")
    assert "future_field" not in request.model_dump()


@pytest.mark.parametrize("pretrained", ["openai", True, False, None])
def test_pretrained_is_a_string_a_bool_or_null(pretrained):
    assert ModelRequest.model_validate({"name": "m", "pretrained": pretrained}).pretrained == pretrained


# ---- text and image ----------------------------------------------------------------------

def test_text_takes_one_string_or_a_list():
    assert TextRequest.model_validate({"name": "m", "text": "one"}).texts == ["one"]
    assert TextRequest.model_validate({"name": "m", "text": ["a", "b"]}).texts == ["a", "b"]
    assert ImageRequest.model_validate({"name": "m", "image": ["x", "y"]}).images == ["x", "y"]


def test_text_request_without_text_fails():
    errors = errors_of(TextRequest, {"name": "m"})
    assert [e["loc"] for e in errors] == [("text",)]
    assert errors[0]["type"] == "missing"


def test_image_request_without_image_fails():
    errors = errors_of(ImageRequest, {"name": "m", "text": "not an image"})
    assert ("image",) in [e["loc"] for e in errors]


def test_an_empty_list_fails():
    errors = errors_of(TextRequest, {"name": "m", "text": []})
    assert all(e["loc"][0] == "text" for e in errors)
    errors_of(ImageRequest, {"name": "m", "image": []})
    errors_of(OpenAIEmbeddingRequest, {"model": "m", "input": []})


@pytest.mark.parametrize("text", [5, [1, 2], {"a": 1}, ["ok", None]])
def test_text_of_the_wrong_type_fails(text):
    errors_of(TextRequest, {"name": "m", "text": text})


def test_an_empty_name_fails():
    errors_of(TextRequest, {"name": "", "text": "hi"})
    errors_of(ModelRequest, {"name": ""})


def test_text_image_request_needs_text_or_image():
    errors = errors_of(TextImageRequest, {"name": "m"})
    assert "at least one of 'text' and 'image'" in errors[0]["msg"]
    assert TextImageRequest.model_validate({"name": "m", "text": "t"}).images == []
    assert TextImageRequest.model_validate({"name": "m", "image": "i"}).texts == []
    both = TextImageRequest.model_validate({"name": "m", "text": ["t"], "image": ["i", "j"]})
    assert (both.texts, both.images) == (["t"], ["i", "j"])


def test_inference_request_alone_takes_neither():
    request = InferenceRequest.model_validate({"name": "m"})
    assert request.texts == [] and request.images == []


# ---- download_custom_model ---------------------------------------------------------------

@pytest.mark.parametrize("key", ["pretrained_name", "pretrainedName", "name"])
def test_custom_model_accepts_every_spelling_of_pretrained_name(key):
    request = CustomModelRequest.model_validate({
        "library": "timm", key: "my-ckpt", "safetensors_url": "http://h/x.safetensors", "num_classes": 3,
    })
    assert request.pretrained_name == "my-ckpt"
    assert request.num_classes == 3


def test_custom_model_camel_case_urls():
    request = CustomModelRequest.model_validate({
        "library": "sentence_transformers", "pretrainedName": "st", "safetensorsUrl": "http://h/m.safetensors",
        "configJsonUrl": "http://h/config.json", "modulesJsonUrl": "http://h/modules.json",
    })
    assert request.safetensors_url == "http://h/m.safetensors"
    assert request.config_json_url == "http://h/config.json"
    assert request.modules_json_url == "http://h/modules.json"
    assert request.vocab_txt_url is None


def test_custom_model_without_a_name_fails():
    errors = errors_of(CustomModelRequest, {"library": "timm", "safetensors_url": "http://h/x"})
    assert ("pretrained_name",) in [e["loc"] for e in errors]


def test_custom_model_num_classes_must_be_positive():
    errors_of(CustomModelRequest, {"library": "timm", "name": "c", "safetensors_url": "u", "num_classes": 0})


# ---- OpenAI ------------------------------------------------------------------------------

def test_openai_request_defaults_and_encoding_format():
    request = OpenAIEmbeddingRequest.model_validate({"model": "m", "input": "hi", "user": "ignored"})
    assert (request.input, request.dimensions, request.encoding_format) == ("hi", None, "float")
    errors_of(OpenAIEmbeddingRequest, {"model": "m", "input": "hi", "encoding_format": "int8"})


# ---- responses ---------------------------------------------------------------------------

def test_responses_serialize_in_camel_case():
    assert EmbeddingsResponse(embeddings=[[0.5]], processing_time_ms=1.5).model_dump() == {
        "embeddings": [[0.5]], "processingTimeMs": 1.5,
    }
    assert EmbeddingSizeResponse(embedding_size=512).model_dump() == {"embeddingSize": 512}
    assert json.loads(ProbabilitiesResponse(probabilities=[[1.0]], processing_time_ms=2).model_dump_json()) == {
        "probabilities": [[1.0]], "processingTimeMs": 2.0,
    }


def test_text_image_response_keys():
    body = TextImageEmbeddingsResponse(text_embeddings=[[1.0]], processing_time_ms=3).model_dump()
    assert body == {"textEmbeddings": [[1.0]], "imageEmbeddings": None, "processingTimeMs": 3.0}


def test_model_info_serializes_in_camel_case_inside_a_list():
    info = ModelInfo(id="r::x", name="r", pretrained=True, library="timm", state="READY",
                     embedding_size=512, memory_bytes=10, last_used=1.0, store_tag="timm-r-abc:1")
    body = json.loads(ModelListResponse(models=[info]).model_dump_json())
    model = body["models"][0]
    assert model["embeddingSize"] == 512
    assert model["memoryBytes"] == 10
    assert model["lastUsed"] == 1.0
    assert model["storeTag"] == "timm-r-abc:1"
    assert model["pretrained"] is True
    assert "embedding_size" not in model


def test_model_info_state_is_one_of_three():
    with pytest.raises(ValidationError):
        ModelInfo(id="x", name="x", pretrained=None, library="timm", state="LOADED")


# ---- validation_message ------------------------------------------------------------------

def test_validation_message_names_the_field_in_one_line():
    errors = errors_of(TextRequest, {"name": "m"})
    message = validation_message(errors)
    assert message.startswith("Invalid request: ")
    assert "text" in message
    assert "Field required" in message
    assert "\n" not in message
    assert message.endswith(".")


def test_validation_message_drops_the_body_prefix_of_fastapi_locations():
    errors = [{"type": "missing", "loc": ("body", "name"), "msg": "Field required"}]
    assert validation_message(errors) == "Invalid request: name: Field required."


def test_validation_message_for_a_nested_field():
    errors = errors_of(TextRequest, {"name": "m", "text": ["ok", 5]})
    assert "text" in validation_message(errors)
    assert any(".1" in validation_message([e]) for e in errors)


def test_validation_message_for_the_whole_body():
    errors = [{"type": "value_error", "loc": ("body",), "msg": "Value error, send at least one of 'text' and 'image'"}]
    assert validation_message(errors) == "Invalid request: body: send at least one of 'text' and 'image'."


def test_validation_message_for_invalid_json():
    errors = [{"type": "json_invalid", "loc": ("body", 12), "msg": "JSON decode error"}]
    assert validation_message(errors) == "The request body is not valid JSON: send a JSON object."


def test_validation_message_keeps_at_most_five_errors():
    errors = [{"type": "missing", "loc": ("body", f"f{i}"), "msg": "Field required"} for i in range(8)]
    message = validation_message(errors)
    assert "f4" in message
    assert "f5" not in message


@pytest.mark.parametrize("body", [{"text": "a \ud800 b"}, {"text": ["fine", "\udfff"]}])
def test_a_text_with_a_lone_surrogate_is_refused(body):
    """JSON can carry a lone UTF-16 surrogate; no tokenizer can take one (the Rust tokenizer panicked)."""
    with pytest.raises(ValidationError, match="lone surrogate"):
        TextRequest.model_validate({"name": "m", **body})


def test_the_size_caps_are_in_the_schemas_from_the_settings():
    """A request over a cap stops at validation (a 413, before the texts reach a tokenizer); the
    API page shows the caps. tests/test_e2e_clients.py crosses lowered caps on a real server."""
    from ingrain_bento.settings import Settings

    defaults = Settings()
    schema = json.dumps(TextRequest.model_json_schema())
    assert f'"maxItems": {defaults.max_items_per_request}' in schema
    assert f'"maxLength": {defaults.max_text_chars}' in schema
    with pytest.raises(ValidationError) as info:
        TextRequest.model_validate({"name": "m", "text": ["x"] * (defaults.max_items_per_request + 1)})
    assert {error["type"] for error in info.value.errors()} <= {"too_long", "string_type"}
