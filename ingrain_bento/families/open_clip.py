"""open_clip models: built-in architecture + pretrained tag, ``hf-hub:`` repos, custom checkpoints.

Store format: the folder ``open_clip.create_model_and_transforms("local-dir:<folder>")``
opens: ``open_clip_config.json`` (``model_cfg`` + ``preprocess_cfg``), the weights as
``open_clip_model.safetensors``, and the HF tokenizer files when the model uses one.
"""

from __future__ import annotations

import json
from copy import deepcopy
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ingrain_bento.errors import BadRequest, ModelNotFound
from ingrain_bento.families.base import IMAGE, TEXT, LoadedModel
from ingrain_bento.refs import ModelRef

if TYPE_CHECKING:
    import torch
    from PIL import Image

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
PREPROCESS_OVERRIDES = ("mode", "mean", "std", "interpolation", "resize_mode")


def _save(model: Any, model_cfg: dict[str, Any], tokenizer: Any, folder: Path) -> dict[str, Any]:
    import safetensors.torch
    from open_clip.tokenizer import HFTokenizer

    model_cfg = deepcopy(model_cfg)
    if isinstance(tokenizer, HFTokenizer):
        tokenizer.save_pretrained(str(folder))
    elif type(tokenizer).__name__ != "SimpleTokenizer":
        raise BadRequest(
            f"Models using open_clip's {type(tokenizer).__name__} cannot be stored in local-dir form yet."
        )
    config = {"model_cfg": model_cfg, "preprocess_cfg": deepcopy(model.visual.preprocess_cfg)}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS_FILE)
    )
    return {"embedding_size": int(model_cfg["embed_dim"]), "modalities": [TEXT, IMAGE]}


def fetch(ref: ModelRef, folder: Path) -> dict[str, Any]:
    """Download a built-in ``name`` + ``pretrained`` tag, or an ``hf-hub:`` repo, into ``folder``."""
    import open_clip

    if ref.is_hub_name:
        model_cfg = open_clip.get_model_config(ref.name)
        if model_cfg is None:
            raise ModelNotFound(f"{ref.name} has no open_clip_config.json with a model_cfg.")
    else:
        if ref.name not in open_clip.list_models():
            raise ModelNotFound(f"{ref.name!r} is not an open_clip architecture (see open_clip.list_models()).")
        if ref.pretrained not in open_clip.list_pretrained_tags_by_model(ref.name):
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(ref.name)) or "none"
            raise ModelNotFound(
                f"{ref.pretrained!r} is not a pretrained tag of {ref.name} (known: {tags}); for a custom "
                "checkpoint, call /download_custom_model first."
            )
        model_cfg = open_clip.get_model_config(ref.name)
    model, _, _ = open_clip.create_model_and_transforms(ref.name, pretrained=None if ref.is_hub_name else ref.pretrained)
    return _save(model, model_cfg, open_clip.get_tokenizer(ref.name), folder)


def bind_custom(ref: ModelRef, weights: Path, options: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Build the local-dir folder for a custom checkpoint, now that the architecture is named."""
    import open_clip

    if ref.is_hub_name or ref.name not in open_clip.list_models():
        raise BadRequest(f"{ref.name!r} is not an open_clip architecture to load {ref.pretrained!r} into.")
    overrides = {k: v for k, v in options.items() if k in PREPROCESS_OVERRIDES and v is not None}
    try:
        model = open_clip.create_model(ref.name, pretrained=str(weights), force_preprocess_cfg=overrides)
    except RuntimeError as exc:
        raise BadRequest(f"The checkpoint {ref.pretrained!r} does not fit architecture {ref.name}: {exc}") from None
    return _save(model, open_clip.get_model_config(ref.name), open_clip.get_tokenizer(ref.name), folder)


class OpenClipModel(LoadedModel):
    modalities = frozenset({TEXT, IMAGE})
    prepares_texts = True

    def __init__(self, folder: Path, ref: ModelRef, device: "torch.device", half: bool) -> None:
        import open_clip

        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
        super().__init__(ref, model, device, half)
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
        self._embed_dim = int(json.loads((folder / CONFIG_FILE).read_text())["model_cfg"]["embed_dim"])

    @property
    def embedding_size(self) -> int:
        return self._embed_dim

    def prepare_texts(self, texts: Sequence[str]) -> Sequence["torch.Tensor"]:
        """Fixed-length token rows, so requests tokenized apart stack into one batch."""
        return list(self.tokenizer(list(texts)))

    def encode_text(self, tokens: Sequence["torch.Tensor"]) -> "torch.Tensor":
        import torch

        batch = torch.stack(list(tokens)).to(self.device)
        with torch.inference_mode():
            return self.module.encode_text(batch).float().cpu()

    def preprocess_images(self, images: Sequence["Image.Image"]) -> "torch.Tensor":
        import torch

        return torch.stack([self.preprocess(image) for image in images])

    def encode_image(self, pixels: Sequence["torch.Tensor"]) -> "torch.Tensor":
        import torch

        with torch.inference_mode():
            return self.module.encode_image(self._pixels_to_device(pixels)).float().cpu()


def load(folder: Path, ref: ModelRef, device: "torch.device", half: bool) -> LoadedModel:
    return OpenClipModel(folder, ref, device, half)
