"""sentence-transformers models: Hub ids and custom checkpoints.

Store format: the folder ``SentenceTransformer.save()`` writes, opened with
``SentenceTransformer(folder)``. Encoding follows the library's own ``encode`` in two steps so
tokenization never waits behind a forward: texts are tokenized (batched across requests, on
the tokenizer thread) with the model's own ``preprocess`` (the configured default prompt
included, as ``encode`` applies it) and split into one unpadded row per text; a forward batch
pads those rows the way the tokenizer pads and runs the model's own forward (pooling,
``prompt_length`` for ``include_prompt=False``, a ``Normalize`` module). A model whose
tokenizer output cannot be split and re-padded exactly (checked once at load) is encoded with
``encode`` itself, tokenization included.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

from ingrain_bento.errors import ModelNotFound
from ingrain_bento.families.base import TEXT, LoadedModel
from ingrain_bento.refs import ModelRef

if TYPE_CHECKING:
    import torch

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


class TokenizedText(NamedTuple):
    """One text as the model's ``preprocess`` tokenized it: its own (unpadded) token rows, and
    the non-tensor entries every row of a batch must share (``modality``, ``prompt_length``)."""

    tokens: dict[str, torch.Tensor]
    shared: tuple[tuple[str, Any], ...]


def split_rows(features: dict[str, Any], padding_side: str) -> list[TokenizedText] | None:
    """``preprocess`` output -> one ``TokenizedText`` per text; None when the output is not
    plain padded token rows (then the caller falls back to ``encode``)."""
    import torch

    mask = features.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2 or padding_side not in ("left", "right"):
        return None
    sequences, shared = {}, []
    for key, value in features.items():
        if isinstance(value, torch.Tensor):
            if value.shape != mask.shape:
                return None
            sequences[key] = value
        else:
            shared.append((key, value))
    width = mask.shape[1]
    rows = []
    for index, length in enumerate(mask.sum(dim=1).tolist()):
        kept = slice(0, length) if padding_side == "right" else slice(width - length, width)
        if not bool(mask[index, kept].all()):
            return None
        rows.append(TokenizedText({key: value[index, kept] for key, value in sequences.items()}, tuple(shared)))
    return rows


def pad_rows(rows: Sequence[TokenizedText], pad_values: dict[str, int], padding_side: str) -> dict[str, Any]:
    """Texts tokenized apart -> one batch of features, padded as the tokenizer pads."""
    from torch.nn.utils.rnn import pad_sequence

    shared = rows[0].shared
    if any(row.shared != shared for row in rows[1:]):
        raise ValueError("texts tokenized with different prompts cannot share one forward")
    batch: dict[str, Any] = {
        key: pad_sequence([row.tokens[key] for row in rows], batch_first=True,
                          padding_value=pad_values.get(key, 0), padding_side=padding_side)
        for key in rows[0].tokens
    }
    batch.update(shared)
    return batch


def _dimension(model: Any) -> int:
    getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(getter())


def _describe(model: Any) -> dict[str, Any]:
    return {"embedding_size": int(_dimension(model)), "modalities": [TEXT]}


def fetch(ref: ModelRef, folder: Path) -> dict[str, Any]:
    """Download a Hub id through the library and save it into ``folder``."""
    from sentence_transformers import SentenceTransformer

    try:
        model = SentenceTransformer(ref.name, device="cpu")
    except OSError as exc:
        raise ModelNotFound(f"{ref.name!r} could not be fetched as a sentence-transformers model: {exc}") from None
    model.save(str(folder), safe_serialization=True)
    return _describe(model)


def describe_folder(folder: Path) -> dict[str, Any]:
    """Open a custom folder once (proves the files form a model) and describe it."""
    from sentence_transformers import SentenceTransformer

    return _describe(SentenceTransformer(str(folder), device="cpu"))


class SentenceTransformerModel(LoadedModel):
    modalities = frozenset({TEXT})

    def __init__(self, folder: Path, ref: ModelRef, device: "torch.device", half: bool) -> None:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(folder), device=str(device))
        super().__init__(ref, model, device, half)
        self._size = int(_dimension(model))
        # What encode() applies when called with neither prompt nor prompt_name.
        self._prompt = model.prompts.get(model.default_prompt_name) if model.default_prompt_name else None
        tokenizer = getattr(model, "tokenizer", None)
        self._padding_side = getattr(tokenizer, "padding_side", "right")
        self._pad_values = {"input_ids": getattr(tokenizer, "pad_token_id", None) or 0,
                            "token_type_ids": getattr(tokenizer, "pad_token_type_id", 0)}
        self.prepares_texts = self._round_trips(["a", "a longer text, to pad the first one"])

    def _round_trips(self, probe: list[str]) -> bool:
        """True when split_rows + pad_rows give back exactly what ``preprocess`` batched."""
        try:
            features = self.module.preprocess(probe, prompt=self._prompt)
            rows = split_rows(features, self._padding_side)
            if rows is None:
                return False
            again = pad_rows(rows, self._pad_values, self._padding_side)
        except Exception:  # any surprise in the probe means: keep the library's encode()
            return False
        return again.keys() == features.keys() and all(
            value.equal(features[key]) if hasattr(value, "equal") else value == features[key]
            for key, value in again.items()
        )

    @property
    def embedding_size(self) -> int:
        return self._size

    def prepare_texts(self, texts: Sequence[str]) -> Sequence[TokenizedText]:
        features = self.module.preprocess(list(texts), prompt=self._prompt)
        rows = split_rows(features, self._padding_side)
        if rows is None:
            raise RuntimeError(f"{self.ref.display_id}: the tokenizer's output changed shape since load")
        return rows

    def encode_text(self, texts: Sequence[Any]) -> "torch.Tensor":
        import torch

        with torch.inference_mode():
            if not self.prepares_texts:
                rows = self.module.encode(list(texts), batch_size=max(len(texts), 1), convert_to_tensor=True,
                                          show_progress_bar=False)
                return rows.float().cpu()
            features = pad_rows(texts, self._pad_values, self._padding_side)
            features = {key: value.to(self.device) if isinstance(value, torch.Tensor) else value
                        for key, value in features.items()}
            rows = self.module(features)["sentence_embedding"]
        if self.module.truncate_dim:
            rows = rows[:, :self.module.truncate_dim]
        return rows.float().cpu()


def load(folder: Path, ref: ModelRef, device: "torch.device", half: bool) -> LoadedModel:
    return SentenceTransformerModel(folder, ref, device, half)
