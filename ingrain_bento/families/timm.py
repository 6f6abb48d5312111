"""timm models: architecture names with pretrained weights, ``hf-hub:`` ids, custom checkpoints.

Store format: the folder ``timm.models.save_for_hf`` writes (``config.json`` with the
architecture, ``num_classes``, ``pretrained_cfg`` and label info, plus ``model.safetensors``),
opened with ``timm.create_model("local-dir:<folder>", pretrained=True)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ingrain_bento.errors import BadRequest, ModelNotFound
from ingrain_bento.families.base import IMAGE, LoadedModel
from ingrain_bento.refs import TIMM_RANDOM_WEIGHTS, ModelRef

if TYPE_CHECKING:
    import torch
    from PIL import Image


def _label_config(model: Any) -> dict[str, Any]:
    """Label names/descriptions the pretrained config carries, else timm's ImageNet info."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    cfg = model.pretrained_cfg
    if cfg.get("label_names"):
        return {k: cfg[k] for k in ("label_names", "label_descriptions") if cfg.get(k)}
    subset = infer_imagenet_subset(model)
    if not subset:
        return {}
    info = ImageNetInfo(subset)
    return {"label_names": info.label_names(), "label_descriptions": info.label_descriptions(as_dict=True)}


def _save(model: Any, folder: Path, with_labels: bool) -> dict[str, Any]:
    from timm.models import save_for_hf

    save_for_hf(model, str(folder), model_config=_label_config(model) if with_labels else None,
                safe_serialization=True)
    return {"embedding_size": int(getattr(model, "head_hidden_size", None) or model.num_features),
            "modalities": [IMAGE], "num_classes": int(model.num_classes)}


def fetch(ref: ModelRef, folder: Path) -> dict[str, Any]:
    """Create ``ref.name`` through timm (downloading pretrained weights) and save it into ``folder``."""
    import timm

    pretrained = ref.pretrained != TIMM_RANDOM_WEIGHTS
    try:
        model = timm.create_model(ref.name, pretrained=pretrained)
    except RuntimeError as exc:
        raise ModelNotFound(f"timm could not create {ref.name!r}: {exc}") from None
    return _save(model, folder, with_labels=pretrained)


def bind_custom(ref: ModelRef, weights: Path, options: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Build the local-dir folder for a custom checkpoint, now that the architecture is named."""
    import safetensors.torch
    import timm

    if ref.is_hub_name or not timm.is_model(ref.name):
        raise BadRequest(f"{ref.name!r} is not a timm architecture to load {ref.pretrained!r} into.")
    model = timm.create_model(ref.name, pretrained=False, num_classes=int(options["num_classes"]))
    try:
        model.load_state_dict(safetensors.torch.load_file(str(weights)), strict=True)
    except RuntimeError as exc:
        raise BadRequest(f"The checkpoint {ref.pretrained!r} does not fit architecture {ref.name}: {exc}") from None
    return _save(model, folder, with_labels=False)


def read_labels(folder: Path) -> list[str]:
    """Class labels of a stored model, from its config alone: descriptions, else names, else indices."""
    config = json.loads((folder / "config.json").read_text())
    num_classes = int(config.get("num_classes", 0))
    names = config.get("label_names")
    descriptions = config.get("label_descriptions") or {}
    if isinstance(names, dict):
        names = [names[k] for k in sorted(names, key=int)]
    if names and len(names) == num_classes:
        return [descriptions.get(name, name) for name in names]
    return [str(i) for i in range(num_classes)]


class TimmModel(LoadedModel):
    modalities = frozenset({IMAGE})

    def __init__(self, folder: Path, ref: ModelRef, device: "torch.device", half: bool) -> None:
        import timm
        from timm.data import create_transform, resolve_data_config

        model = timm.create_model(f"local-dir:{folder}", pretrained=True)
        super().__init__(ref, model, device, half)
        self.transform = create_transform(**resolve_data_config({}, model=model))
        self._size = int(getattr(model, "head_hidden_size", None) or model.num_features)
        self.labels = read_labels(folder)

    @property
    def embedding_size(self) -> int:
        return self._size

    def preprocess_images(self, images: Sequence["Image.Image"]) -> "torch.Tensor":
        import torch

        return torch.stack([self.transform(image) for image in images])

    def encode_image(self, pixels: Sequence["torch.Tensor"]) -> "torch.Tensor":
        import torch

        with torch.inference_mode():
            features = self.module.forward_features(self._pixels_to_device(pixels))
            return self.module.forward_head(features, pre_logits=True).float().cpu()

    def classify_image(self, pixels: Sequence["torch.Tensor"]) -> "torch.Tensor":
        import torch

        with torch.inference_mode():
            return self.module(self._pixels_to_device(pixels)).float().cpu()


def load(folder: Path, ref: ModelRef, device: "torch.device", half: bool) -> LoadedModel:
    return TimmModel(folder, ref, device, half)
