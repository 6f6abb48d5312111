"""sentence-transformers models: embedders, rerankers, text classifiers, sparse and multi-vector
encoders; Hub ids and custom checkpoints.

A model's *kind* comes from its own files, as the library reads them (``model_kind``): its saved
``config_sentence_transformers.json`` says ``SentenceTransformer``, ``CrossEncoder``,
``SparseEncoder`` or ``MultiVectorEncoder``; a plain Hugging Face sequence-classification repo (no
sentence-transformers files, as ``cross-encoder/ms-marco-MiniLM-L6-v2`` is) is a ``CrossEncoder``.
A cross-encoder with one label is a reranker, one with several (``id2label``) a
``TextClassifier``. Each kind is opened with its own class (every class opens every other kind's
folder without a word, and computes nonsense) and serves its tasks (``KINDS``): ``embed_text``,
``rerank`` (one-label cross-encoders, scores with the model's own activation, as ``predict``),
``classify_text`` (the logits; ``tasks/classify_text`` scores them), ``embed_sparse`` (as
``encode``, ``max_active_dims`` included), or ``embed_multi_vector`` and a MaxSim ``rerank``
(``MultiVectorModel``: the library's own ``encode_query`` / ``encode_document``, torch only).

Store format: the folder the class's ``save()`` writes, opened with the same class. Encoding
follows the library's own ``encode`` / ``predict`` in two halves:

- the front opens the same folder with its weights on torch's meta device (``WEIGHTLESS``:
  accelerate's ``device_map``, no kernelization; no memory, no reads of the weights) and
  tokenizes with the model's own ``preprocess``, the configured default prompt included as
  ``encode`` applies it; each text becomes one unpadded item, its token rows stacked into a small
  int32 array (texts to embed, classify or sparse-encode come from the Rust tokenizer straight
  where that was verified to give the same rows at open: ``rust_tokens.RustTokens``);
- the runner pads a batch of items the way the tokenizer pads and runs the model's own
  forward, every module ``modules.json`` lists (pooling with ``prompt_length`` for
  ``include_prompt=False``, ``Dense``, ``Normalize``; a reranker's head and activation; SPLADE
  pooling), then ``truncate_dim`` / ``max_active_dims``: that forward is the model's one graph,
  ``forward`` (token ids -> its output rows), for either backend. A reranker's item is a (query,
  document) pair tokenized together, as ``predict`` tokenizes it.

Both halves read how a model's tokenizer output splits (``TextFormat``) from one probe, at
load: a model whose output does not split and re-pad exactly (multimodal processors,
flattened FA2 inputs) takes raw texts, and the runner calls ``encode`` itself (torch only).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from ingrain_bento.errors import BadRequest, TooLarge
from ingrain_bento.families import register
from ingrain_bento.families.base import DEFAULT_TEXT_PREP, LoadedModel, Preprocessor, TextPrep
from ingrain_bento.refs import ModelRef
from ingrain_bento.rust_tokens import Direction, RustTokens
from ingrain_bento.tasks import EMBED_SPARSE, EMBED_TEXT, RERANK
from ingrain_bento.tasks.classify_text import CLASSIFY_TEXT
from ingrain_bento.tasks.multi_vector import (
    EMBED_MULTI_VECTOR,
    pack,
    pair_item,
    read_item,
    read_pair,
)

if TYPE_CHECKING:
    import numpy as np

    from ingrain_bento.backends import BackendChoice, Executor, Graph
    from ingrain_bento.schemas import CustomModelRequest

log = logging.getLogger("ingrain_bento.families.sentence_transformers")

ModelKind = Literal["SentenceTransformer", "CrossEncoder", "TextClassifier", "SparseEncoder", "MultiVectorEncoder"]
# download_custom_model field -> path inside the saved folder
CUSTOM_FILES = {
    "safetensors_url": "model.safetensors",
    "config_json_url": "config.json",
    "tokenizer_json_url": "tokenizer.json",
    "tokenizer_config_json_url": "tokenizer_config.json",
    "vocab_txt_url": "vocab.txt",
    "special_tokens_map_json_url": "special_tokens_map.json",
    "pooling_config_json_url": "1_Pooling/config.json",
    "sentence_bert_config_json_url": "sentence_bert_config.json",
    "modules_json_url": "modules.json",
}
PROBE = ["a", "a longer text, to pad the first one"]
PROBE_PAIRS = [("a", "b"), ("a longer query", "a longer document, to pad the first pair")]
# Files a Hub download leaves out: pickles (never loaded) and other runtimes' exports.
UNSAFE_OR_UNUSED = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.h5", "*.msgpack", "*.onnx", "*.ot",
                    "onnx/*", "openvino/*", "*.gguf"]
MODULE_PACKAGE = "sentence_transformers."
# The front's open of a model: every weight on torch's meta device (accelerate's ``device_map``),
# and none of the load steps that rewrite weights. transformers kernelizes every model it loads
# when the ``kernels`` package is installed (transformers 5.25 requires it), and kernelizing
# refuses the meta device (``ValueError: Unsupported device type 'meta'``): without
# ``use_kernels=False`` the front would quietly load every model's weights on the CPU.
WEIGHTLESS: dict[str, Any] = {"device_map": "meta", "use_kernels": False}
RAW_TEXTS = ("its tokenizer's output does not split into token rows (it takes raw texts): only the torch backend "
             "runs it")
MULTI_VECTOR = ("a multi-vector model runs the library's own encode_query / encode_document (query expansion, "
                "skiplist masks per text): only the torch backend runs it")


def check_modules(folder: Path) -> None:
    """A 400 unless every module ``modules.json`` names is one of the library's own classes:
    older sentence-transformers imported any class a local ``modules.json`` named (code from a
    client's download); this holds whatever version is installed."""
    import json

    path = folder / "modules.json"
    if not path.is_file():
        return
    try:
        modules = json.loads(path.read_text())
        types = [str(module["type"]) for module in modules]
    except (ValueError, KeyError, TypeError):
        raise BadRequest("modules.json is not a list of sentence-transformers modules.") from None
    foreign = [name for name in types if not name.startswith(MODULE_PACKAGE)]
    if foreign:
        raise BadRequest(f"modules.json names modules outside sentence-transformers ({', '.join(foreign)}): "
                         "only the library's own module classes are loaded.")


class Kind(NamedTuple):
    """What one kind of model is to the server: its library class, the tasks it serves, the key
    of its forward's output, and the inputs its tokenizer is probed with."""

    name: ModelKind
    library_class: str
    tasks: frozenset[str]
    output: str
    probe: Sequence[Any]


KINDS: dict[str, Kind] = {kind.name: kind for kind in (
    Kind("SentenceTransformer", "SentenceTransformer", frozenset({EMBED_TEXT}), "sentence_embedding", PROBE),
    Kind("CrossEncoder", "CrossEncoder", frozenset({RERANK}), "scores", PROBE_PAIRS),
    Kind("TextClassifier", "CrossEncoder", frozenset({CLASSIFY_TEXT}), "scores", PROBE),
    Kind("SparseEncoder", "SparseEncoder", frozenset({EMBED_SPARSE}), "sentence_embedding", PROBE),
    Kind("MultiVectorEncoder", "MultiVectorEncoder", frozenset({EMBED_MULTI_VECTOR, RERANK}), "token_embeddings",
         PROBE),
)}
SAVED_KINDS = ("SentenceTransformer", "CrossEncoder", "SparseEncoder", "MultiVectorEncoder")  # model_type values
# The kinds whose texts the front tokenizes into one row each (``prepare_texts``).
TEXT_ROW_KINDS = frozenset({"SentenceTransformer", "TextClassifier", "SparseEncoder"})


def _read_json(path: Path) -> dict[str, Any] | None:
    import json

    try:
        data = json.loads(path.read_text(encoding="utf8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def model_kind(folder: Path) -> Kind:
    """The kind of the model in ``folder``, from its files alone (see the module docstring)."""
    kind = (_read_json(folder / "config_sentence_transformers.json") or {}).get("model_type")
    if kind is not None:
        if kind not in SAVED_KINDS:
            raise BadRequest(f"The model is a sentence-transformers {kind}: this server serves "
                             f"{', '.join(SAVED_KINDS)}.")
    else:
        architectures = (_read_json(folder / "config.json") or {}).get("architectures") or []
        is_classifier = any(isinstance(a, str) and a.endswith("ForSequenceClassification") for a in architectures)
        kind = "CrossEncoder" if is_classifier else "SentenceTransformer"
    if kind == "CrossEncoder" and len(read_labels(folder) or ()) > 1:
        return KINDS["TextClassifier"]
    return KINDS[kind]


def read_labels(folder: Path) -> list[str] | None:
    """A sequence classifier's labels, in logit order (``id2label`` of its ``config.json``;
    transformers' default of two labels when it names none)."""
    config = _read_json(folder / "config.json") or {}
    if not any(str(a).endswith("ForSequenceClassification") for a in config.get("architectures") or []):
        return None
    id2label = config.get("id2label") or {"0": "LABEL_0", "1": "LABEL_1"}
    try:
        return [str(label) for _, label in sorted((int(i), label) for i, label in id2label.items())]
    except (TypeError, ValueError):
        raise BadRequest("The model's id2label is not a map of class indices to labels.") from None


def is_multi_label(folder: Path) -> bool:
    return (_read_json(folder / "config.json") or {}).get("problem_type") == "multi_label_classification"


def library_class(kind: Kind) -> Any:
    import sentence_transformers

    return getattr(sentence_transformers, kind.library_class)


class TextFormat(NamedTuple):
    """How one model's ``preprocess`` output splits into one item per text: the token keys (in
    order, one row of an item each) with their pad values, the padding side, and the
    non-tensor entries a whole batch shares (``modality``, ``prompt_length``)."""

    keys: tuple[str, ...]
    pad_values: tuple[int, ...]
    padding_side: str
    shared: tuple[tuple[str, Any], ...]


def split_rows(features: dict[str, Any], fmt: TextFormat) -> list[np.ndarray] | None:
    """``preprocess`` output -> one int32 (keys, tokens) array per text, its padding removed;
    None when the output is not plain padded token rows of this format."""
    import numpy as np
    import torch

    mask = features.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2:
        return None
    if tuple(k for k, v in features.items() if isinstance(v, torch.Tensor)) != fmt.keys:
        return None
    if any(features[key].shape != mask.shape for key in fmt.keys):
        return None
    stacked = np.stack([features[key].numpy() for key in fmt.keys]).astype(np.int32)
    kept = mask.numpy().astype(bool)
    width = kept.shape[1]
    lengths = kept.sum(axis=1)
    positions = np.arange(width)
    if fmt.padding_side == "right":
        if not np.array_equal(kept, positions < lengths[:, None]):  # every row: its tokens, then padding
            return None
        return [stacked[:, index, :length] for index, length in enumerate(lengths.tolist())]
    if not np.array_equal(kept, positions >= (width - lengths)[:, None]):
        return None
    return [stacked[:, index, width - length:] for index, length in enumerate(lengths.tolist())]


def pad_rows(rows: Sequence[np.ndarray], fmt: TextFormat) -> dict[str, np.ndarray]:
    """Texts tokenized apart -> one batch of int64 token arrays, padded as the tokenizer pads."""
    import numpy as np

    width = max(row.shape[1] for row in rows)
    out = np.empty((len(fmt.keys), len(rows), width), dtype=np.int64)
    out[:] = np.asarray(fmt.pad_values, dtype=np.int64)[:, None, None]
    for index, row in enumerate(rows):
        if row.shape[0] != len(fmt.keys):
            raise ValueError(f"a text item has {row.shape[0]} token rows, this model takes {len(fmt.keys)}")
        columns = slice(0, row.shape[1]) if fmt.padding_side == "right" else slice(width - row.shape[1], width)
        out[:, index, columns] = row
    return {key: out[i] for i, key in enumerate(fmt.keys)}


def default_prompt(model: Any) -> str | None:
    """The prompt ``encode`` applies when called with neither prompt nor prompt_name."""
    return model.prompts.get(model.default_prompt_name) if model.default_prompt_name else None


def text_format(model: Any, prompt: str | None, probe: Sequence[Any] = PROBE) -> TextFormat | None:
    """Probe once: the format when split + pad gives back exactly what ``preprocess`` batched
    (``probe``: texts, or pairs for a reranker)."""
    import torch

    tokenizer = getattr(model, "tokenizer", None)
    padding_side = getattr(tokenizer, "padding_side", "right")
    pad_by_key = {"input_ids": getattr(tokenizer, "pad_token_id", None) or 0,
                  "token_type_ids": getattr(tokenizer, "pad_token_type_id", 0)}
    try:
        features = model.preprocess(list(probe), prompt=prompt)
        tensors = {k: v for k, v in features.items() if isinstance(v, torch.Tensor)}
        fmt = TextFormat(tuple(tensors), tuple(int(pad_by_key.get(k, 0)) for k in tensors), padding_side,
                         tuple((k, v) for k, v in features.items() if k not in tensors))
        if padding_side not in ("left", "right"):
            return None
        rows = split_rows(features, fmt)
        if rows is None:
            return None
        again = pad_rows(rows, fmt)
    except Exception:  # any surprise in the probe means: keep the library's encode()
        return None
    same = again.keys() == tensors.keys() and all(
        torch.from_numpy(again[key]).to(value.dtype).equal(value) for key, value in tensors.items())
    return fmt if same else None


def _dimension(model: Any, kind: Kind) -> int | None:
    """What ``/model_embedding_size`` reports: the embedding's size; a sparse encoder's vocabulary
    (its ``get_embedding_dimension`` gives the hidden size when SPLADE pooling's config has none);
    none for a reranker."""
    if kind.name in ("CrossEncoder", "TextClassifier"):
        return None
    if kind.name == "SparseEncoder":
        vocabulary = getattr(getattr(getattr(model[0], "model", None), "config", None), "vocab_size", None)
        if vocabulary:
            return int(vocabulary)
    getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(getter())


def _describe(model: Any, kind: Kind) -> dict[str, Any]:
    if kind.name == "CrossEncoder" and model.num_labels != 1:
        raise BadRequest(f"This cross-encoder has {model.num_labels} labels: /rerank serves rerankers, which "
                         "score a pair with one.")
    described: dict[str, Any] = {"capabilities": sorted(kind.tasks), "kind": kind.name}
    if getattr(model, "prompts", None):
        described["prompts"] = sorted(model.prompts)
    size = _dimension(model, kind)
    if size is not None:  # BentoML's metadata takes no None
        described["embedding_size"] = size
    return described


def _graph(model: Any, kind: Kind, fmt: TextFormat) -> Graph:
    """The model's whole forward over its token arrays (what ``encode`` / ``predict`` runs per
    batch), a reranker's activation included."""
    import torch

    from ingrain_bento.backends import Graph

    activation = getattr(model, "activation_fn", None) if kind.name == "CrossEncoder" else None

    class Forward(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *tokens: torch.Tensor) -> torch.Tensor:
            features: dict[str, Any] = dict(zip(fmt.keys, tokens, strict=True))
            features.update(fmt.shared)
            rows: torch.Tensor = self.model(features)[kind.output]
            if activation is not None:  # predict upcasts half scores before its activation
                rows = activation(rows.float())
            return rows

    rows = split_rows(model.preprocess(list(kind.probe), prompt=default_prompt(model)), fmt)
    assert rows is not None
    axes = {0: "batch", 1: "tokens"}
    return Graph(Forward(), pad_rows(rows, fmt), [kind.output],
                 {**{key: axes for key in fmt.keys}, kind.output: {0: "batch"}})


def _open(folder: Path) -> tuple[Any, Kind, TextFormat | None]:
    kind = model_kind(folder)
    model = library_class(kind)(str(folder), device="cpu").eval()
    return model, kind, text_format(model, default_prompt(model), kind.probe)


def _pools_prompt(model: Any) -> bool:
    """Whether the model's pooling keeps the prompt's tokens (``Pooling(include_prompt=True)``, the
    library's default); a model that is not a sequence of modules has no such pooling."""
    try:
        modules = list(model)
    except TypeError:
        return True
    return all(getattr(module, "include_prompt", True) for module in modules)


def _token_count(item: np.ndarray) -> int:
    return int(item.shape[-1])


class SentenceTransformerModel(LoadedModel):
    def __init__(self, ref: ModelRef, executor: Executor, kind: Kind, fmt: TextFormat | None, size: int | None,
                 context_length: int | None, truncate_dim: int | None = None, max_active_dims: int | None = None,
                 library_model: Any = None, prompts: dict[str, str] | None = None) -> None:
        super().__init__(ref, executor)
        self.prompts = prompts or {}
        self.capabilities = kind.tasks
        self.context_length = context_length
        self.format = fmt
        self._size = size
        self.truncate_dim = truncate_dim
        self.max_active_dims = max_active_dims
        self.library_model = library_model  # the model itself, for one that takes raw texts (torch only)

    @property
    def embedding_size(self) -> int | None:
        return self._size

    def item_tokens(self, task: str) -> Callable[[Any], int] | None:
        return _token_count if self.format is not None else None

    def _forward(self, items: Sequence[Any]) -> np.ndarray:
        assert self.format is not None
        return self.executor.run("forward", pad_rows(items, self.format))[0]

    def encode_text(self, items: Sequence[Any]) -> np.ndarray:
        """Token items (or, for a model without a ``TextFormat``, raw texts) -> rows."""
        if self.format is None or isinstance(items[0], str):
            return self._encode_texts(items)
        rows = self._forward(items)
        return rows[:, :self.truncate_dim] if self.truncate_dim else rows

    def rerank(self, items: Sequence[Any]) -> np.ndarray:
        """(query, document) pair items -> one score each (the activation is in the graph)."""
        return self._forward(items)

    def classify_text(self, items: Sequence[Any]) -> np.ndarray:
        """Text items -> the classifier's logits, one per label."""
        return self._forward(items)

    def embed_sparse(self, items: Sequence[Any]) -> np.ndarray:
        """Text items -> dense rows of vocabulary size, pruned to ``max_active_dims`` as ``encode``
        prunes them (the library's own ``select_max_active_dims``)."""
        rows = self._forward(items)
        if not self.max_active_dims:
            return rows
        import torch
        from sentence_transformers.util import select_max_active_dims

        pruned: np.ndarray = select_max_active_dims(torch.from_numpy(rows), self.max_active_dims).numpy()
        return pruned

    def _encode_texts(self, items: Sequence[Any]) -> np.ndarray:
        if self.library_model is None or not all(isinstance(item, str) for item in items):
            raise ValueError(f"{self.ref.display_id} takes token items, not raw texts")
        import torch

        with torch.inference_mode():
            rows = self.library_model.encode(list(items), batch_size=len(items), convert_to_tensor=True,
                                             show_progress_bar=False)
        result: np.ndarray = rows.cpu().numpy()
        return result


class MultiVectorModel(LoadedModel):
    """A ``MultiVectorEncoder``: each text's token vectors as the library's ``encode_query`` /
    ``encode_document`` give them (``tasks/multi_vector``: items, rows), and a MaxSim rerank."""

    def __init__(self, ref: ModelRef, executor: Executor, library_model: Any, size: int | None,
                 context_length: int | None, max_tokens: int, prompts: dict[str, str]) -> None:
        super().__init__(ref, executor)
        self.capabilities = KINDS["MultiVectorEncoder"].tasks
        self.library_model = library_model
        self.context_length = context_length
        self.max_tokens = max_tokens
        self.prompts = prompts
        self._size = size

    @property
    def embedding_size(self) -> int | None:
        return self._size

    def item_tokens(self, task: str) -> Callable[[Any], int] | None:
        """A text's tokens by the model's own tokenizer (the document's, for a rerank pair), so that
        forwards group texts of about one length, as for the other text models: the library's own
        ``encode`` pads each of its batches to the longest text."""
        read = (lambda value: read_pair(value)[1]) if task == RERANK else (lambda value: read_item(value)[1])
        tokenizer, most = self.library_model.tokenizer, self.max_tokens
        return lambda value: min(most, len(tokenizer(read(value))["input_ids"]))  # ~70 us a text

    def _encode(self, side: str, texts: list[str]) -> list[np.ndarray]:
        """The library's encode of one side's texts, as one batch: the batcher has already grouped
        texts of about one length into this forward (``item_tokens``)."""
        import torch

        encode = self.library_model.encode_query if side == "query" else self.library_model.encode_document
        with torch.inference_mode():
            matrices = encode(texts, batch_size=len(texts), show_progress_bar=False, convert_to_numpy=True)
        return [matrix.astype("float32", copy=False) for matrix in matrices]

    def embed_multi_vector(self, items: Sequence[str]) -> np.ndarray:
        """Items of either side -> one packed row per text (``tasks.multi_vector.pack``)."""
        sides = [read_item(value) for value in items]
        matrices: list[Any] = [None] * len(sides)
        for side in ("query", "document"):
            indices = [i for i, (s, _) in enumerate(sides) if s == side]
            if indices:
                for index, matrix in zip(indices, self._encode(side, [sides[i][1] for i in indices]), strict=True):
                    matrices[index] = matrix
        return pack(matrices, self.max_tokens)

    def rerank(self, items: Sequence[str]) -> np.ndarray:
        """(query, document) pair items -> the library's ``similarity`` (MaxSim) of each: the batch's
        queries encoded once each, its documents in one call, then scored per query."""
        import numpy as np

        pairs = [read_pair(value) for value in items]
        queries = list(dict.fromkeys(query for query, _ in pairs))
        query_rows = dict(zip(queries, self._encode("query", queries), strict=True))
        document_rows = self._encode("document", [document for _, document in pairs])
        scores = np.empty((len(pairs), 1), dtype=np.float32)
        for query in queries:
            indices = [i for i, (q, _) in enumerate(pairs) if q == query]
            row = self.library_model.similarity([query_rows[query]], [document_rows[i] for i in indices])[0]
            scores[indices, 0] = row.float().cpu().numpy()
        return scores


def _max_tokens(model: Any) -> int:
    """The most token vectors one text of a multi-vector model can give (the longer side's length)."""
    transformer = model[0]
    lengths = [getattr(transformer, name, None) for name in ("query_length", "document_length")]
    return max([int(model.max_seq_length), *(int(n) for n in lengths if n)])


class SentenceTransformerPreprocessor(Preprocessor):
    def __init__(self, folder: Path) -> None:
        kind = model_kind(folder)
        cls = library_class(kind)
        try:
            model = cls(str(folder), model_kwargs=dict(WEIGHTLESS))
        except Exception as exc:  # a module that cannot be built without its weights
            self.front_weights = f"its weightless load failed ({type(exc).__name__}: {exc})"[:300]
            log.warning("preprocessor.load folder=%s without weights failed (%s): loading them on the CPU",
                        folder.name, self.front_weights)
            model = cls(str(folder), device="cpu")
        self.kind = kind
        self.capabilities = kind.tasks
        self.labels = read_labels(folder) if kind.name == "TextClassifier" else None
        self.multi_label = is_multi_label(folder)
        self.model = model
        self.prompts: dict[str, str] = dict(getattr(model, "prompts", None) or {})
        self.prompt = default_prompt(model)
        self.format = text_format(model, self.prompt, kind.probe)
        # Pooling that leaves the prompt's tokens out takes one prompt length per batch: the
        # runner's graph has the default prompt's, so such a model takes no other prompt.
        self.pools_prompt = _pools_prompt(model)
        # The tokenizer's truncation side is flipped for a left cut, and ``RustTokens`` configures
        # it for each call: one tokenization at a time (the tokenizer thread, or the event loop).
        self._tokenizing = threading.Lock()
        self.rust_tokens = None if self.format is None or kind.name not in TEXT_ROW_KINDS else RustTokens.verified(
            model, self.format.keys, self.prompt, self._library_rows, self._tokenizing)
        log.info("preprocessor.open folder=%s tokenizer=%s", folder.name, "rust" if self.rust_tokens else "library")

    @property
    def tokenizes_inline(self) -> bool:
        return self.rust_tokens is not None

    def _split(self, inputs: list[Any], prompt: str | None = None, direction: str = "right",
               **kwargs: Any) -> list[Any]:
        assert self.format is not None
        with self._tokenizing:
            tokenizer = self.model.tokenizer
            side = tokenizer.truncation_side
            tokenizer.truncation_side = direction
            try:
                features = self.model.preprocess(inputs, prompt=prompt, **kwargs)
            finally:
                tokenizer.truncation_side = side
        rows = split_rows(features, self.format)
        if rows is None:
            raise RuntimeError("the tokenizer's output changed shape since load")
        return rows

    def tokenizer_idle(self) -> bool:
        return not self._tokenizing.locked()

    def _text_rows(self, texts: list[str], prompt: str | None, direction: Direction) -> list[Any]:
        """One row per text (``direction``: the side a text over the limit is cut from; None: not cut),
        from the Rust tokenizer where it was verified equal to the library at load, else the library's."""
        if self.rust_tokens is not None:
            return self.rust_tokens.rows(texts, prompt, direction)
        return self._library_rows(texts, prompt, direction)

    def _library_rows(self, texts: list[str], prompt: str | None, direction: Direction) -> list[Any]:
        if direction is None:
            return self._split(texts, prompt, processing_kwargs={"text": {"truncation": False}})
        return self._split(texts, prompt, direction)

    def resolve_prompt(self, prep: TextPrep) -> str | None:
        """The prefix ``encode(prompt_name=...)`` / ``encode(prompt=...)`` applies: a named prompt,
        a literal one, else the model's default."""
        if prep.prompt is not None:
            return prep.prompt
        if prep.prompt_name is None:
            return self.prompt
        if prep.prompt_name not in self.prompts:
            named = ", ".join(repr(name) for name in self.prompts) or "none"
            raise BadRequest(f"This model has no prompt named {prep.prompt_name!r}: its prompts are {named} (or send "
                             "'prompt', a literal prefix).")
        return self.prompts[prep.prompt_name]

    def prepare_texts(self, texts: Sequence[str], prep: TextPrep = DEFAULT_TEXT_PREP) -> list[Any]:
        """One token item per text, tokenized as ``encode`` tokenizes them with that prompt and
        truncation; the texts themselves when the model has no ``TextFormat`` (the library's
        ``encode`` in the runner, with the model's own defaults only)."""
        if self.kind.name == "CrossEncoder":
            raise BadRequest("This model is a reranker: it scores (query, document) pairs at /rerank.")
        if self.kind.name == "MultiVectorEncoder":
            raise BadRequest("This model is a multi-vector encoder: it embeds texts at /embed_multi_vector.")
        if self.format is None:
            if prep != DEFAULT_TEXT_PREP:
                raise BadRequest("This model's tokenizer output is not split per text: it embeds with its own "
                                 "defaults only (no prompt, truncation or direction per request).")
            return list(texts)
        prompt = self.resolve_prompt(prep)
        if prompt != self.prompt and not self.pools_prompt:
            raise BadRequest("This model's pooling leaves its default prompt out of the embedding: it takes no "
                             "other prompt per request.")
        rows = self._text_rows(list(texts), prompt, prep.direction if prep.truncate else None)
        if prep.truncate:
            return rows
        limit = self.model.max_seq_length
        for index, row in enumerate(rows):
            if row.shape[-1] > limit:
                raise TooLarge(f"Text {index} is {row.shape[-1]} tokens, over this model's limit of {limit} "
                               "(send truncate: true to cut it, or shorten it).")
        return rows

    def tokens(self, texts: Sequence[str], add_special_tokens: bool = True,
               prep: TextPrep = DEFAULT_TEXT_PREP) -> list[list[tuple[int, str, bool, int | None, int | None]]]:
        prompt = self.resolve_prompt(prep) or ""
        tokenizer = self.model.tokenizer
        with self._tokenizing:
            encoded = tokenizer([prompt + text for text in texts], add_special_tokens=add_special_tokens,
                                return_offsets_mapping=True, return_special_tokens_mask=True, truncation=False)
        shown = []
        for index, text in enumerate(texts):
            row = []
            for token, (start, stop), special in zip(encoded["input_ids"][index], encoded["offset_mapping"][index],
                                                     encoded["special_tokens_mask"][index], strict=True):
                inside = not special and start >= len(prompt)
                piece = (prompt + text)[start:stop] if not special else tokenizer.convert_ids_to_tokens(token)
                row.append((int(token), piece, bool(special), start - len(prompt) if inside else None,
                            stop - len(prompt) if inside else None))
            shown.append(row)
        return shown

    def decode(self, ids: Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        vocabulary = self.model.tokenizer.vocab_size
        for row in ids:
            unknown = [i for i in row if not 0 <= i < vocabulary + len(self.model.tokenizer.get_added_vocab())]
            if unknown:
                raise BadRequest(f"Token id {unknown[0]} is not in this model's vocabulary of {vocabulary}.")
        return [self.model.tokenizer.decode(list(row), skip_special_tokens=skip_special_tokens) for row in ids]

    def prepare_pairs(self, query: str, documents: Sequence[str], max_tokens: int | None) -> list[Any]:
        """One token item per (query, document) pair, tokenized as ``predict`` tokenizes pairs
        (longest first, to the model's length). ``max_tokens`` cuts every document to that many
        tokens first, with the model's own tokenizer (``truncation="only_second"``: exact for
        every tokenizer kind, where cutting the text is not). A multi-vector model's pair is its
        two texts, encoded apart in the runner."""
        if self.kind.name == "MultiVectorEncoder":
            if max_tokens is not None:
                raise BadRequest("max_tokens_per_doc applies to cross-encoders: a multi-vector model cuts documents "
                                 "to its own document length.")
            return [pair_item(query, document) for document in documents]
        if self.kind.name != "CrossEncoder" or self.format is None:
            raise BadRequest("This model is not a reranker.")
        pairs = [(query, document) for document in documents]
        if max_tokens is None:
            return self._split(pairs, self.prompt)
        tokenizer = self.model.tokenizer
        asked = (self.prompt or "") + query
        length = len(tokenizer(asked, add_special_tokens=False)["input_ids"]) + tokenizer.num_special_tokens_to_add(
            pair=True)
        limit = min(int(tokenizer.model_max_length), getattr(self.model, "max_length", None) or 10**9)
        if length >= limit:  # the query alone fills the model: the library's own cut (longest first)
            return self._split(pairs, self.prompt)
        cut = {"text": {"truncation": "only_second", "max_length": min(limit, length + max_tokens)}}
        return self._split(pairs, self.prompt, processing_kwargs=cut)


class SentenceTransformersFamily:
    name = "sentence_transformers"
    tag_prefix = "st"
    library_modules: tuple[str, ...] = ("sentence_transformers",)
    custom_form: Literal["checkpoint", "folder"] = "folder"
    custom_files: Mapping[str, str] = CUSTOM_FILES

    def canonical_pretrained(self, name: str, pretrained: str | bool | None) -> str | None:
        return None  # a sentence-transformers model is its name; pretrained is ignored

    def api_pretrained(self, pretrained: str | None) -> str | bool | None:
        return None

    def check_custom(self, request: CustomModelRequest) -> dict[str, Any]:
        missing = [field for field in CUSTOM_FILES if not getattr(request, field)]
        if missing:
            raise BadRequest(f"sentence_transformers custom models need these URLs too: {', '.join(missing)}.")
        return {}

    def describe_custom(self, folder: Path, options: dict[str, Any]) -> dict[str, Any]:
        """Open a downloaded custom folder once (proves the files form a model) and describe it;
        its ``modules.json`` may name the library's own module classes only."""
        check_modules(folder)
        kind = model_kind(folder)
        return _describe(library_class(kind)(str(folder), device="cpu"), kind)

    def fetch(self, ref: ModelRef, folder: Path) -> dict[str, Any]:
        """Download a Hub id (never a folder of the server's that happens to have its name) with
        huggingface_hub, as the library does, safetensors only, and save it into ``folder``."""
        from huggingface_hub import snapshot_download

        # What the download raises (no such repo, offline and not cached, gated) is the store's to
        # answer (``ModelStore._fetch``: a 404 for a model the Hub says does not exist, else a 502).
        snapshot = Path(snapshot_download(ref.name, ignore_patterns=UNSAFE_OR_UNUSED))
        if not any(snapshot.rglob("*.safetensors")):
            raise BadRequest(f"{ref.name!r} has no safetensors weights: only safetensors are loaded, never "
                             "pickled .bin files.")
        check_modules(snapshot)
        kind = model_kind(snapshot)
        try:
            model = library_class(kind)(str(snapshot), device="cpu")
        except (OSError, ValueError) as exc:
            raise BadRequest(f"{ref.name!r} is not a sentence-transformers model ({type(exc).__name__}).") from None
        described = _describe(model, kind)
        model.save(str(folder), safe_serialization=True)
        return described

    def bind_custom(self, ref: ModelRef, weights: Path, options: dict[str, Any], folder: Path) -> dict[str, Any]:
        raise BadRequest("sentence-transformers custom models load by their own name, not into an architecture.")

    def graphs(self, folder: Path) -> dict[str, Graph]:
        if model_kind(folder).name == "MultiVectorEncoder":
            raise RuntimeError(MULTI_VECTOR)
        model, kind, fmt = _open(folder)
        if fmt is None:
            raise RuntimeError(RAW_TEXTS)
        return {"forward": _graph(model, kind, fmt)}

    def load(self, folder: Path, ref: ModelRef, choice: BackendChoice) -> LoadedModel:
        from ingrain_bento.backends import Graph

        model, kind, fmt = _open(folder)
        if kind.name == "MultiVectorEncoder":
            if choice.backend != "torch":
                raise RuntimeError(MULTI_VECTOR)
            graph = Graph(model, {}, [])
            return MultiVectorModel(ref, choice.executor({"library": graph}), graph.module, _dimension(model, kind),
                                    model.max_seq_length, _max_tokens(model), dict(model.prompts or {}))
        extra = {"size": _dimension(model, kind), "context_length": model.max_seq_length,
                 "prompts": dict(getattr(model, "prompts", None) or {}),
                 "truncate_dim": getattr(model, "truncate_dim", None),
                 "max_active_dims": getattr(model, "max_active_dims", None)}
        if fmt is None:  # the library's own encode, on the torch backend
            if choice.backend != "torch" or kind.name != "SentenceTransformer":
                raise RuntimeError(RAW_TEXTS)
            graph = Graph(model, {}, [])
            executor = choice.executor({"library": graph})
            return SentenceTransformerModel(ref, executor, kind, None, library_model=graph.module, **extra)
        return SentenceTransformerModel(ref, choice.executor({"forward": _graph(model, kind, fmt)}), kind, fmt, **extra)

    def load_preprocessor(self, folder: Path, ref: ModelRef) -> Preprocessor:
        return SentenceTransformerPreprocessor(folder)

    def read_labels(self, folder: Path) -> list[str] | None:
        return read_labels(folder) if model_kind(folder).name == "TextClassifier" else None


register(SentenceTransformersFamily())
