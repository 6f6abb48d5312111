"""timm models: architecture names with pretrained weights, ``hf-hub:`` ids, custom checkpoints.

Store format: the folder ``timm.models.save_for_hf`` writes (``config.json`` with the
architecture, ``num_classes``, ``pretrained_cfg`` and label info, plus ``model.safetensors``),
opened with ``timm.create_model("local-dir:<folder>", pretrained=True)``. The front builds
the model on torch's meta device (no weights, no memory) only to resolve its data config. The
model's one graph, ``image``, gives both the pooled pre-logits features and the logits (the head
is a small part of the forward).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ingrain_bento.errors import BadRequest, ModelNotFound
from ingrain_bento.families import register
from ingrain_bento.families.base import ImagePipeline, LoadedModel, Preprocessor
from ingrain_bento.refs import ModelRef, validate_tag
from ingrain_bento.tasks import CLASSIFY, EMBED_IMAGE

if TYPE_CHECKING:
    import numpy as np

    from ingrain_bento.backends import BackendChoice, Executor, Graph
    from ingrain_bento.schemas import CustomModelRequest

RANDOM_WEIGHTS = "false"  # pretrained=false: the architecture with random weights
CAPABILITIES = frozenset({EMBED_IMAGE, CLASSIFY})


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


def _feature_size(model: Any) -> int:
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def _save(model: Any, folder: Path, with_labels: bool) -> dict[str, Any]:
    from timm.models import save_for_hf

    save_for_hf(model, str(folder), model_config=_label_config(model) if with_labels else None,
                safe_serialization=True)
    return {"embedding_size": _feature_size(model), "capabilities": sorted(CAPABILITIES),
            "num_classes": int(model.num_classes)}


def _image_pipeline(model: Any) -> ImagePipeline:
    from timm.data import create_transform, resolve_data_config

    return ImagePipeline(create_transform(**resolve_data_config({}, model=model)))


def _heads(model: Any, pixels: Any) -> tuple[Any, Any]:
    features = model.forward_features(pixels)
    return model.forward_head(features, pre_logits=True), model.forward_head(features)


def _graphs(folder: Path) -> dict[str, Graph]:
    """``image``: the front's pixels -> (pooled pre-logits features, logits)."""
    import timm

    from ingrain_bento.backends import Graph
    from ingrain_bento.backends.pixels import PixelGraph

    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    pipeline = _image_pipeline(model)
    batch = {0: "batch"}
    return {"image": Graph(PixelGraph(model, pipeline, _heads), {"pixels": pipeline.example()},
                           ["features", "logits"], {"pixels": batch, "features": batch, "logits": batch})}


class TimmModel(LoadedModel):
    capabilities = CAPABILITIES

    def __init__(self, ref: ModelRef, executor: Executor, labels: list[str], feature_size: int) -> None:
        super().__init__(ref, executor)
        self._size = feature_size
        self.labels = labels

    @property
    def embedding_size(self) -> int:
        return self._size

    def _run(self, items: Sequence[np.ndarray]) -> list[np.ndarray]:
        import numpy as np

        return self.executor.run("image", {"pixels": np.stack(items)})

    def encode_image(self, items: Sequence[np.ndarray]) -> np.ndarray:
        """The pooled pre-logits features."""
        return self._run(items)[0]

    def classify_image(self, items: Sequence[np.ndarray]) -> np.ndarray:
        """Logits, one column per label."""
        return self._run(items)[1]


class TimmPreprocessor(Preprocessor):
    capabilities = CAPABILITIES

    def __init__(self, folder: Path) -> None:
        import timm
        import torch

        with torch.device("meta"):
            self.model = timm.create_model(f"local-dir:{folder}", pretrained=False)
        self.pixels = _image_pipeline(self.model)


class TimmFamily:
    name = "timm"
    tag_prefix = "timm"
    library_modules: tuple[str, ...] = ("timm",)
    custom_form: Literal["checkpoint", "folder"] = "checkpoint"
    custom_files: Mapping[str, str] = {"safetensors_url": "custom.safetensors"}

    def canonical_pretrained(self, name: str, pretrained: str | bool | None) -> str | None:
        """``None`` for the pretrained weights, ``"false"`` for random ones, else a custom name."""
        if pretrained is None or pretrained is True or str(pretrained).lower() == "true":
            return None
        if pretrained is False or str(pretrained).lower() == RANDOM_WEIGHTS:
            return RANDOM_WEIGHTS
        return validate_tag(str(pretrained))

    def api_pretrained(self, pretrained: str | None) -> str | bool | None:
        if pretrained is None:
            return True
        return False if pretrained == RANDOM_WEIGHTS else pretrained

    def check_custom(self, request: CustomModelRequest) -> dict[str, Any]:
        if request.num_classes is None:
            raise BadRequest("timm custom models need 'num_classes' (the classifier's output size).")
        if request.pretrained_name.lower() in ("true", "false"):
            raise BadRequest("'true' and 'false' mean timm's own weights: give the checkpoint another name.")
        return {"num_classes": request.num_classes}

    def describe_custom(self, folder: Path, options: dict[str, Any]) -> dict[str, Any]:
        """A checkpoint whose classifier has ``num_classes`` outputs: some tensor of it (the head's
        weight or bias) must lead with that size, read from the safetensors header alone."""
        from safetensors import safe_open

        num_classes = int(options["num_classes"])
        with safe_open(str(folder / self.custom_files["safetensors_url"]), framework="pt") as handle:
            leading = {handle.get_slice(key).get_shape()[0] for key in handle.keys()
                       if handle.get_slice(key).get_shape()}
        if num_classes not in leading:
            raise BadRequest(f"num_classes={num_classes} fits no classifier in the checkpoint: no tensor has "
                             f"{num_classes} outputs. Send the checkpoint's own number of classes.")
        return {"capabilities": sorted(CAPABILITIES)}

    def fetch(self, ref: ModelRef, folder: Path) -> dict[str, Any]:
        """Create ``ref.name`` through timm (downloading pretrained weights) and save it into ``folder``."""
        import timm

        pretrained = ref.pretrained != RANDOM_WEIGHTS
        try:
            model = timm.create_model(ref.name, pretrained=pretrained)
        except RuntimeError as exc:
            raise ModelNotFound(f"timm could not create {ref.name!r}: {exc}") from None
        return _save(model, folder, with_labels=pretrained)

    def bind_custom(self, ref: ModelRef, weights: Path, options: dict[str, Any], folder: Path) -> dict[str, Any]:
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

    def graphs(self, folder: Path) -> dict[str, Graph]:
        return _graphs(folder)

    def load(self, folder: Path, ref: ModelRef, choice: BackendChoice) -> LoadedModel:
        labels = self.read_labels(folder)
        assert labels is not None
        graphs = _graphs(folder)
        size = _feature_size(graphs["image"].module.model)
        return TimmModel(ref, choice.executor(graphs), labels, size)

    def load_preprocessor(self, folder: Path, ref: ModelRef) -> Preprocessor:
        return TimmPreprocessor(folder)

    def read_labels(self, folder: Path) -> list[str] | None:
        """Class labels from the config alone: descriptions, else names, else indices."""
        config = json.loads((folder / "config.json").read_text())
        num_classes = int(config.get("num_classes", 0))
        names = config.get("label_names")
        descriptions = config.get("label_descriptions") or {}
        if isinstance(names, dict):
            names = [names[k] for k in sorted(names, key=int)]
        if names and len(names) == num_classes:
            return [descriptions.get(name, name) for name in names]
        return [str(i) for i in range(num_classes)]


register(TimmFamily())
