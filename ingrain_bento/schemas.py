"""Request and response bodies of both API generations, snake_case and camelCase alike.

One request class per shape, shared by the seed routes (``/infer_text``) and the current
ones (``/embed_text``). Responses serialize by alias (camelCase), as Ingrain sends them.

The size caps (``INGRAIN_MAX_ITEMS``, ``INGRAIN_MAX_TEXT_CHARS``, ``INGRAIN_MAX_IMAGE_BYTES``) are
in the schemas, read from the settings when this module is imported: a request over them stops
at validation (a 413, front/http.py), and the API page shows them.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetPydanticSchema,
    StringConstraints,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import core_schema

from ingrain_bento.backends.base import BACKENDS
from ingrain_bento.settings import get_settings

__all__ = ["MAX_CLASSES", "PROTOCOL_TAGS", "ApiModel", "AutoPickInfo", "Backend", "CohereContent", "CohereEmbedRequest",
           "CohereEmbeddingType", "CohereImageUrl", "CohereInput", "CustomModelRequest", "EmbeddingSizeResponse",
           "EmbeddingsResponse", "Image", "ImageRequest", "Images", "InferenceRequest", "LabelsResponse",
           "MessageResponse", "ModelInfo", "ModelListResponse", "ModelRequest", "ModelTextsRequest", "ModelState",
           "NonEmptyName", "OpenAIEmbedding", "OpenAIEmbeddingRequest", "OpenAIEmbeddingResponse", "OpenAIModel",
           "OpenAIModelList", "OpenAIUsage", "Precision", "Pretrained", "ProbabilitiesResponse", "PromptName",
           "RerankDocument", "RerankRequest", "RerankResponse", "RerankResult", "Rows", "RunnerInfo",
           "SparseEmbedding", "SparseEmbeddingsResponse", "SparseRequest", "TEIDecodeRequest", "TEIEmbedRequest",
           "TEIOptions", "TEIRerankRequest", "TEISimilarityInputs", "TEISimilarityRequest", "TEISparseRequest",
           "TEITokenizeRequest", "Text", "TextImageEmbeddingsResponse", "TextImageRequest", "TextOptions",
           "TextRequest", "Texts", "Token", "TruncationDirection", "as_list", "build", "one_prompt",
           "validation_message"]

M = TypeVar("M", bound=BaseModel)
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# The tags of a route body that takes two protocols' bodies (``front.tei.Protocol``): never shown in a message.
PROTOCOL_TAGS = ("native", "tei")
MAX_CLASSES = 100_000  # a classifier's outputs at most (ImageNet-22k has 21,843); the checkpoint is checked too


def _utf8(text: Any) -> Any:
    """JSON lets a string carry a lone UTF-16 surrogate (``"\\ud800"``), which no tokenizer can
    take (the Rust tokenizers panicked, and the connection reset): refuse it here, a 400."""
    try:
        if isinstance(text, str):
            text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"the text holds a lone surrogate {text[exc.start]!r} at character {exc.start}: "
                         "send valid Unicode (a surrogate pair or the character itself)") from None
    return text


_LIMITS = get_settings()
_MAX_ITEMS = _LIMITS.max_items_per_request
Text = Annotated[str, StringConstraints(max_length=_LIMITS.max_text_chars), BeforeValidator(_utf8)]
Texts = Text | Annotated[list[Text], Field(min_length=1, max_length=_MAX_ITEMS)]
# an image: a URL, base64 or a data: URI of at most INGRAIN_MAX_IMAGE_BYTES (4/3 of it in base64)
Image = Annotated[str, StringConstraints(max_length=_LIMITS.max_image_bytes * 4 // 3 + 4096)]
Images = Image | Annotated[list[Image], Field(min_length=1, max_length=_MAX_ITEMS)]
Pretrained = bool | str | None
NonEmptyName = Annotated[str, StringConstraints(min_length=1)]


class ApiModel(BaseModel):
    """Accepts ``n_dims`` and ``nDims`` alike, ignores unknown fields, answers in camelCase."""

    model_config = ConfigDict(
        alias_generator=to_camel, validate_by_name=True, validate_by_alias=True,
        serialize_by_alias=True, extra="ignore",
    )


def as_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


# ---- management requests ---------------------------------------------------------------

def _known_backend(value: str) -> str:
    if value not in BACKENDS:
        raise ValueError(f"unknown backend {value!r}: use one of {', '.join(map(repr, BACKENDS))}")
    return value


# A compute backend's name (``backends.BACKENDS``, the one list of them).
Backend = Annotated[str, AfterValidator(_known_backend), WithJsonSchema({"type": "string", "enum": list(BACKENDS)})]


class ModelRequest(ApiModel):
    """Names one model: ``name`` (or display id ``name::pretrained``), ``pretrained``, ``library``;
    a load may pick its backend (``backend``; unset: the server's ``INGRAIN_BACKEND``)."""

    name: NonEmptyName
    pretrained: Pretrained = None
    library: str | None = None
    backend: Backend | None = None


class CustomModelRequest(ApiModel):
    library: str
    pretrained_name: NonEmptyName = Field(validation_alias="pretrained_name")
    safetensors_url: NonEmptyName
    # open_clip preprocessing overrides
    mode: str | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    interpolation: str | None = None
    resize_mode: str | None = None
    # sentence-transformers files
    config_json_url: str | None = None
    tokenizer_json_url: str | None = None
    tokenizer_config_json_url: str | None = None
    vocab_txt_url: str | None = None
    special_tokens_map_json_url: str | None = None
    pooling_config_json_url: str | None = None
    sentence_bert_config_json_url: str | None = None
    modules_json_url: str | None = None
    # timm
    num_classes: int | None = Field(None, ge=1, le=MAX_CLASSES)

    @model_validator(mode="before")
    @classmethod
    def _name_alias(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in ("pretrained_name", "pretrainedName", "name"):
                if data.get(key) is not None:
                    return {**data, "pretrained_name": data[key]}
        return data


# ---- inference requests ----------------------------------------------------------------

Precision = Literal["float32", "int8", "uint8", "binary", "ubinary"]
TruncationDirection = Literal["right", "left"]
PromptName = Annotated[str, StringConstraints(min_length=1, max_length=200)]


def one_prompt(request: Any) -> Any:
    """A request names a prompt (``prompt_name``) or gives one (``prompt``), not both."""
    if request.prompt_name is not None and request.prompt is not None:
        raise ValueError("send one of 'prompt_name' (a prompt the model names) and 'prompt' (a literal prefix), "
                         "not both")
    return request


class TextOptions(ApiModel):
    """How texts are embedded and rows given back, whichever protocol asked (API.md "Prompts,
    truncation and output precision"): the native routes take these fields as they are; the
    OpenAI, Cohere and TEI adapters map their own onto them."""

    prompt_name: PromptName | None = None  # one of the model's named prompts (ModelInfo.prompts)
    prompt: Text | None = None  # a literal prefix
    truncate: bool = True  # false: a text over the model's context is a 413, not cut
    truncation_direction: TruncationDirection = "right"  # left: keep the end of the text
    precision: Precision = "float32"  # after n_dims and normalize

    @model_validator(mode="after")
    def _one_prompt(self) -> Any:
        return one_prompt(self)


class InferenceRequest(TextOptions):
    """Fields common to every inference route; ``text``/``image`` requirements per route below."""

    name: NonEmptyName
    pretrained: Pretrained = None
    library: str | None = None
    text: Texts | None = None
    image: Images | None = None
    normalize: bool = True
    n_dims: int | None = None
    image_download_headers: dict[str, str] | None = None

    @field_validator("image_download_headers")
    @classmethod
    def _plain_headers(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for key, item in (value or {}).items():
            if not _HEADER_NAME.fullmatch(key) or "\r" in item or "\n" in item or not item.isascii():
                raise ValueError(f"header {key!r} is not a valid HTTP header (ASCII name and value, no line breaks)")
        return value

    @field_validator("normalize", mode="before")
    @classmethod
    def _null_is_default(cls, value: Any) -> Any:
        return True if value is None else value

    @property
    def texts(self) -> list[str]:
        return as_list(self.text)

    @property
    def images(self) -> list[str]:
        return as_list(self.image)


class TextRequest(InferenceRequest):
    text: Texts


class ImageRequest(InferenceRequest):
    image: Images


class TextImageRequest(InferenceRequest):
    @model_validator(mode="after")
    def _needs_input(self) -> TextImageRequest:
        if self.text is None and self.image is None:
            raise ValueError("send at least one of 'text' and 'image'")
        return self


class SparseRequest(InferenceRequest):
    """``/embed_sparse``: texts, and ``top_k`` (keep the largest values of each vector)."""

    text: Texts
    top_k: int | None = Field(None, ge=1)


class ModelTextsRequest(ApiModel):
    """A task module's request of texts for one model: ``name`` (or ``model``), ``text``."""

    name: NonEmptyName = Field(validation_alias=AliasChoices("name", "model"))
    text: Texts
    pretrained: Pretrained = None
    library: str | None = None

    @property
    def texts(self) -> list[str]:
        return as_list(self.text)


class RerankDocument(BaseModel):
    model_config = ConfigDict(extra="ignore")

    text: Text


class RerankRequest(ApiModel):
    """``/rerank``, ``/v1/rerank``, ``/v2/rerank``: Cohere's (v1, v2) and Jina's bodies alike. The
    model is ``model`` (or ``name``, as on every other route); a document is a string or
    ``{"text": ...}``."""

    name: NonEmptyName = Field(validation_alias=AliasChoices("model", "name"))
    query: Text
    documents: Annotated[list[Text | RerankDocument], Field(min_length=1, max_length=_MAX_ITEMS)]
    top_n: int | None = Field(None, ge=1)
    return_documents: bool = False
    max_tokens_per_doc: int | None = Field(None, ge=1)
    pretrained: Pretrained = None
    library: str | None = None

    @field_validator("query")
    @classmethod
    def _query_has_text(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the query is empty: send the text to rank the documents against")
        return value

    @property
    def document_texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


class OpenAIEmbeddingRequest(BaseModel):
    """OpenAI's body, and (in the ``openai`` client's ``extra_body``) the text options of API.md
    "Prompts, truncation and output precision" but ``precision``: OpenAI's rows are floats."""

    model_config = ConfigDict(extra="ignore")

    model: NonEmptyName
    input: Texts
    dimensions: int | None = None
    encoding_format: Literal["float", "base64"] = "float"
    prompt_name: PromptName | None = None
    prompt: Text | None = None
    truncate: bool = True
    truncation_direction: TruncationDirection = "right"

    @model_validator(mode="after")
    def _one_prompt(self) -> Any:
        return one_prompt(self)

    @field_validator("input", mode="before")
    @classmethod
    def _no_token_ids(cls, value: Any) -> Any:
        """OpenAI's API also takes token ids (a list of ints, or a list of such lists), which
        LangChain's ``OpenAIEmbeddings`` sends by default: ids of OpenAI's tokenizer, meaningless
        to any model here. Refused with what to do instead."""
        if isinstance(value, list) and value and all(
                isinstance(item, int) or (isinstance(item, list) and item and all(isinstance(i, int) for i in item))
                for item in value):
            raise ValueError("this server takes texts, not token ids (it tokenizes with each model's own "
                             "tokenizer): send the texts as strings. LangChain's OpenAIEmbeddings sends token ids "
                             "unless you pass check_embedding_ctx_length=False")
        return value


# ---- responses -------------------------------------------------------------------------

class MessageResponse(ApiModel):
    message: str


ModelState = Literal["READY", "UNAVAILABLE", "LOADING"]


class RunnerInfo(ApiModel):
    """One live runner's hold on a model (``ModelInfo.runners``): ``id`` is ``<replica>/<index>``."""

    id: str
    device: str
    state: Literal["READY", "LOADING", "FAILED"]
    message: str | None = None  # why it FAILED (it does not fit, its files are missing)


class AutoPickInfo(ApiModel):
    """The backend ``auto`` picks for a model on this runner's device type, and why: the faster one
    timed on this machine when its export was made (``backends.timing``), else ``backends.AUTO``."""

    backend: str
    device: str  # the device type it is picked for ("cpu", "cuda")
    why: str  # the figure it was picked on ("onnx 133.4 ms vs torch 162.1 ms for a batch and one item (...)")
    ms: dict[str, float] = {}  # the deciding figure per backend, batch plus one item (empty: not timed here)


class ModelInfo(ApiModel):
    id: str
    name: str
    pretrained: Pretrained
    library: str
    state: ModelState
    modalities: list[str] = []
    capabilities: list[str] = []  # its tasks: embed_text, embed_image, classify, rerank, embed_sparse
    embedding_size: int | None = None
    device: str | None = None
    dtype: str | None = None
    memory_bytes: int | None = None
    last_used: float | None = None
    store_tag: str | None = None
    backend: str | None = None  # the backend running it (resident models)
    fallback: str | None = None  # why that is not the backend its load asked for
    exports: list[str] = []  # the backends it has an export in the store for ("onnx", "onnx-int8")
    auto_pick: AutoPickInfo | None = None  # what ``auto`` picks for it here (null until its export is made)
    # Why the answering front worker holds the model's weights (its weightless open failed and it
    # loaded them on the CPU, also counted in ingrain_front_weights_loaded_total); null: it holds none.
    front_weights: str | None = None
    prompts: list[str] = []  # its named prompts, for prompt_name (sentence-transformers)
    # Every live runner of every replica that holds the model, loads it, or could not load it.
    runners: list[RunnerInfo] = []


class ModelListResponse(ApiModel):
    models: list[ModelInfo]


class EmbeddingSizeResponse(ApiModel):
    embedding_size: int


class LabelsResponse(ApiModel):
    labels: list[str]


# The server's own rows are numpy arrays up to the response's bytes (``front.http.json_response``
# writes them with orjson: no Python float per number); a client reading a response gets lists.
# JSON mode (``model_dump_json``) writes an array as its lists too.
_NDArray = Annotated[np.ndarray, GetPydanticSchema(lambda _source, _handler: core_schema.is_instance_schema(
    np.ndarray, serialization=core_schema.plain_serializer_function_ser_schema(np.ndarray.tolist, when_used="json")))]
_NUMBERS = {"type": "array", "items": {"type": "number"}}
# Rows as floats, or as integers with an int8/uint8/binary/ubinary ``precision``.
Rows = Annotated[list[list[float]] | list[list[int]] | _NDArray,
                 WithJsonSchema({"type": "array", "items": _NUMBERS})]
Row = Annotated[list[float] | _NDArray, WithJsonSchema(_NUMBERS)]


class EmbeddingsResponse(ApiModel):
    embeddings: Rows
    processing_time_ms: float


class TextImageEmbeddingsResponse(ApiModel):
    text_embeddings: Rows | None = None
    image_embeddings: Rows | None = None
    processing_time_ms: float


class ProbabilitiesResponse(ApiModel):
    probabilities: list[list[float]]
    processing_time_ms: float


class SparseEmbedding(ApiModel):
    indices: list[int]
    values: list[float]


class SparseEmbeddingsResponse(ApiModel):
    embeddings: list[SparseEmbedding]
    processing_time_ms: float


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: RerankDocument | None = None  # with return_documents (left out of the JSON otherwise)


class RerankResponse(BaseModel):
    """Cohere's shape (Jina's clients read the same fields)."""

    id: str
    results: list[RerankResult]
    meta: dict[str, Any] = Field(default_factory=lambda: {"billed_units": {"search_units": 1}})


class OpenAIEmbedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Row | str


class OpenAIUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class OpenAIEmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIEmbedding]
    model: str
    usage: OpenAIUsage


class OpenAIModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    owned_by: str


class OpenAIModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]


# ---- Cohere embed (/v1/embed, /v2/embed) -------------------------------------------------

CohereEmbeddingType = Literal["float", "int8", "uint8", "binary", "ubinary", "base64"]


class CohereImageUrl(BaseModel):
    model_config = ConfigDict(extra="ignore")

    url: Image


class CohereContent(BaseModel):
    """One part of a Cohere ``inputs`` entry: a text, or an image as a data URI."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "image_url"]
    text: Text | None = None
    image_url: CohereImageUrl | Image | None = None


class CohereInput(BaseModel):
    model_config = ConfigDict(extra="ignore")

    content: Annotated[list[CohereContent], Field(min_length=1)]


class CohereEmbedRequest(BaseModel):
    """Cohere's embed body, v1 and v2 alike (API.md "Cohere embed")."""

    model_config = ConfigDict(extra="ignore")

    model: NonEmptyName
    texts: Annotated[list[Text], Field(min_length=1, max_length=_MAX_ITEMS)] | None = None
    images: Annotated[list[Image], Field(min_length=1, max_length=_MAX_ITEMS)] | None = None
    inputs: Annotated[list[CohereInput], Field(min_length=1, max_length=_MAX_ITEMS)] | None = None
    input_type: str | None = None
    embedding_types: Annotated[list[CohereEmbeddingType], Field(min_length=1)] | None = None
    output_dimension: int | None = Field(None, ge=1)
    truncate: Literal["NONE", "START", "END"] | None = None

    @model_validator(mode="after")
    def _one_kind_of_input(self) -> CohereEmbedRequest:
        given = [field for field in ("texts", "images", "inputs") if getattr(self, field) is not None]
        if len(given) != 1:
            raise ValueError("send one of 'texts', 'images' and 'inputs'")
        return self


# ---- the TEI protocol (Hugging Face text-embeddings-inference) --------------------------------

def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


class TEIOptions(BaseModel):
    """What TEI's text bodies share: TEI names no model, and spells the direction ``Left``/``Right``."""

    model_config = ConfigDict(extra="ignore")

    truncate: bool | None = None
    truncation_direction: Annotated[TruncationDirection, BeforeValidator(_lower)] = "right"
    prompt_name: PromptName | None = None


class TEIEmbedRequest(TEIOptions):
    inputs: Texts
    normalize: bool = True
    dimensions: int | None = Field(None, ge=1)


class TEISimilarityInputs(BaseModel):
    model_config = ConfigDict(extra="ignore")

    source_sentence: Text
    sentences: Annotated[list[Text], Field(min_length=1, max_length=_MAX_ITEMS)]


class TEISimilarityRequest(TEIOptions):
    inputs: TEISimilarityInputs


class TEIRerankRequest(TEIOptions):
    query: Text
    texts: Annotated[list[Text], Field(min_length=1, max_length=_MAX_ITEMS)]
    raw_scores: bool = False
    return_text: bool = False


class TEISparseRequest(TEIOptions):
    inputs: Texts


class TEITokenizeRequest(TEIOptions):
    inputs: Texts
    add_special_tokens: bool = True


class TEIDecodeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    ids: list[int] | Annotated[list[list[int]], Field(min_length=1, max_length=_MAX_ITEMS)]
    skip_special_tokens: bool = True


class Token(BaseModel):
    """One token of ``/tokenize``: its id, its text, whether the tokenizer added it, its characters."""

    id: int
    text: str
    special: bool
    start: int | None
    stop: int | None


def build(schema: type[M], **fields: Any) -> M:
    """A native request built from another protocol's fields (an adapter's): what does not
    validate is the client's input, a 400 that says which field and why, never a 500."""
    from ingrain_bento.errors import BadRequest

    try:
        return schema.model_validate(fields)
    except ValidationError as exc:
        raise BadRequest(validation_message([dict(error) for error in exc.errors()])) from None


def validation_message(errors: list[dict[str, Any]]) -> str:
    """One readable sentence from pydantic's error list: which field, what is wrong."""
    if any(error.get("type") == "json_invalid" for error in errors):
        return "The request body is not valid JSON: send a JSON object."
    parts = []
    for error in errors[:5]:
        # pydantic names the validator and union branch it tried ("function-after[_utf8(), str]",
        # "list[...]"): a client needs the field and the index only
        steps = [str(p) for p in error.get("loc", ()) if p not in ("body", *PROTOCOL_TAGS)
                 and not re.search(r"[\[(]", str(p))]
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{'.'.join(steps) or 'body'}: {message}")
    return "Invalid request: " + "; ".join(dict.fromkeys(parts)) + "."

