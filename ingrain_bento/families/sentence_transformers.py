"""sentence-transformers models: Hub ids and custom checkpoints.

Store format: the folder ``SentenceTransformer.save()`` writes, opened with
``SentenceTransformer(folder)``. Encoding is the library's own ``encode`` (prompts, pooling
and a configured ``Normalize`` module included); the server adds no prefix itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

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

    @property
    def embedding_size(self) -> int:
        return self._size

    def encode_text(self, texts: Sequence[str]) -> "torch.Tensor":
        import torch

        with torch.inference_mode():
            rows = self.module.encode(
                list(texts), batch_size=max(len(texts), 1), convert_to_tensor=True, show_progress_bar=False
            )
        return rows.float().cpu()


def load(folder: Path, ref: ModelRef, device: "torch.device", half: bool) -> LoadedModel:
    return SentenceTransformerModel(folder, ref, device, half)
