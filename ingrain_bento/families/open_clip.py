"""open_clip models: built-in architecture + pretrained tag, ``hf-hub:`` repos, custom checkpoints.

Store format: the folder ``open_clip.create_model_and_transforms("local-dir:<folder>")``
opens: ``open_clip_config.json`` (``model_cfg`` + the final ``preprocess_cfg``), the weights
as ``open_clip_model.safetensors``, and the HF tokenizer files when the model uses one.
The front tokenizes with ``open_clip.get_tokenizer("local-dir:<folder>")`` and builds the
image transform from the stored ``preprocess_cfg`` exactly as ``create_model_and_transforms``
does; neither needs the weights. The model's two graphs are its towers: ``text`` (token ids ->
``encode_text``) and ``image`` (pixels -> ``encode_image``). A model with both classifies
images against labels sent with a request (``tasks/zero_shot``): its ``zero_shot_classify`` gives
each image's normalized embedding times the model's ``logit_scale.exp()``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from copy import deepcopy
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ingrain_bento.errors import BadRequest, ModelNotFound
from ingrain_bento.families import register
from ingrain_bento.families.base import DEFAULT_TEXT_PREP, ImagePipeline, LoadedModel, Preprocessor, TextPrep
from ingrain_bento.refs import HF_HUB_PREFIX, ModelRef, validate_tag
from ingrain_bento.tasks import EMBED_IMAGE, EMBED_TEXT
from ingrain_bento.tasks.zero_shot import ZERO_SHOT

if TYPE_CHECKING:
    import numpy as np

    from ingrain_bento.backends import BackendChoice, Executor, Graph
    from ingrain_bento.schemas import CustomModelRequest

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
PREPROCESS_OVERRIDES = ("mode", "mean", "std", "interpolation", "resize_mode")
CAPABILITIES = frozenset({EMBED_TEXT, EMBED_IMAGE, ZERO_SHOT})


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
    return {"embedding_size": int(model_cfg["embed_dim"]), "capabilities": sorted(CAPABILITIES)}


def _require_safetensors(repo: str) -> None:
    """A 400 unless the repo's weights, as open_clip itself picks them, are safetensors: open_clip
    would otherwise unpickle ``open_clip_pytorch_model.bin`` (code a repo's author chose), or, with
    no weights at all, serve random ones without a word. Built-in pretrained tags come from
    open_clip's own curated list and load with ``torch.load(weights_only=True)``."""
    from open_clip.pretrained import download_pretrained_from_hf

    try:
        weights = download_pretrained_from_hf(repo)
    except FileNotFoundError:
        raise ModelNotFound(f"hf-hub:{repo} has no open_clip weights to download.") from None
    if not str(weights).endswith(".safetensors"):
        raise BadRequest(f"hf-hub:{repo} has only pickled weights ({Path(weights).name}): only safetensors "
                         "weights are loaded (open_clip_model.safetensors).")


def _graphs(folder: Path) -> dict[str, Graph]:
    """``text``: int64 token ids (batch, context) -> ``encode_text``; ``image``: the front's pixels
    -> ``encode_image`` (``PixelGraph``)."""
    import open_clip
    import torch

    from ingrain_bento.backends import Graph
    from ingrain_bento.backends.pixels import PixelGraph

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    model.eval()
    pipeline = ImagePipeline(preprocess)
    tokens = open_clip.get_tokenizer(f"local-dir:{folder}")(["a photo of a cat", "a diagram"]).numpy()

    class TextTower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.model.encode_text(tokens)

    pixels = pipeline.example()
    return {
        "text": Graph(TextTower(), {"tokens": tokens.astype("int64")}, ["features"],
                      {"tokens": {0: "batch"}, "features": {0: "batch"}}),
        "image": Graph(PixelGraph(model, pipeline, lambda m, x: m.encode_image(x)), {"pixels": pixels},
                       ["features"], {"pixels": {0: "batch"}, "features": {0: "batch"}}),
    }


def _logit_scale(folder: Path) -> float:
    """``logit_scale.exp()`` from the stored weights (read alone: an ONNX runner holds no torch model)."""
    import math

    from safetensors import safe_open

    with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as weights:
        return math.exp(float(weights.get_tensor("logit_scale").float().reshape(-1)[0]))


class OpenClipModel(LoadedModel):
    capabilities = CAPABILITIES

    def __init__(self, ref: ModelRef, executor: Executor, embed_dim: int, logit_scale: float) -> None:
        super().__init__(ref, executor)
        self._embed_dim = embed_dim
        self.logit_scale = logit_scale  # exp() of the stored parameter, as CLIP's forward applies it

    @property
    def embedding_size(self) -> int:
        return self._embed_dim

    def encode_text(self, items: Sequence[np.ndarray]) -> np.ndarray:
        import numpy as np

        return self.executor.run("text", {"tokens": np.stack(items).astype(np.int64)})[0]

    def encode_image(self, items: Sequence[np.ndarray]) -> np.ndarray:
        import numpy as np

        return self.executor.run("image", {"pixels": np.stack(items)})[0]

    def zero_shot_classify(self, items: Sequence[np.ndarray]) -> np.ndarray:
        """Pixel items -> ``logit_scale`` x each image's normalized embedding (the labels' side of
        the logits is made in the front, ``tasks.zero_shot``)."""
        import numpy as np

        rows = self.encode_image(items).astype(np.float32)
        result: np.ndarray = rows / np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), 1e-12) * self.logit_scale
        return result


class OpenClipPreprocessor(Preprocessor):
    capabilities = CAPABILITIES

    def __init__(self, folder: Path) -> None:
        import open_clip
        from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

        stored = json.loads((folder / CONFIG_FILE).read_text()).get("preprocess_cfg", {})
        # What create_model_and_transforms does with the stored (final) preprocess_cfg.
        config = merge_preprocess_dict(asdict(PreprocessCfg()), stored)
        self.pixels = ImagePipeline(image_transform_v2(PreprocessCfg(**config), is_train=False))
        self.tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")

    def prepare_texts(self, texts: Sequence[str], prep: TextPrep = DEFAULT_TEXT_PREP) -> list[np.ndarray]:
        """Fixed-length token rows (int32 on the wire; the runner widens them back). A literal
        ``prompt`` is prefixed to each text; open_clip models name no prompts, and their tokenizer
        cuts every text to its context from the right, the one truncation it has."""
        import numpy as np

        if prep.prompt_name is not None:
            raise BadRequest("open_clip models have no named prompts: send 'prompt' (a literal prefix) instead.")
        if not prep.truncate or prep.direction != "right":
            raise BadRequest("open_clip's tokenizer cuts every text to its context from the right: 'truncate: false' "
                             "and 'truncation_direction: left' apply to sentence-transformers models.")
        if prep.prompt:
            texts = [prep.prompt + text for text in texts]
        return list(self.tokenizer(list(texts)).numpy().astype(np.int32))


class OpenClipFamily:
    name = "open_clip"
    tag_prefix = "clip"
    library_modules: tuple[str, ...] = ("open_clip",)
    custom_form: Literal["checkpoint", "folder"] = "checkpoint"
    custom_files: Mapping[str, str] = {"safetensors_url": "custom.safetensors"}

    def canonical_pretrained(self, name: str, pretrained: str | bool | None) -> str | None:
        if isinstance(pretrained, bool):
            raise BadRequest("open_clip takes a pretrained tag (a string such as 'laion2b_s34b_b79k'), not true/false.")
        if name.startswith(HF_HUB_PREFIX):
            if pretrained is not None:
                raise BadRequest(f"{name!r} carries its own weights: send pretrained as null.")
            return None
        if pretrained is None:
            raise BadRequest(f"open_clip model {name!r} needs a pretrained tag (for example 'laion2b_s34b_b79k').")
        return validate_tag(pretrained)

    def api_pretrained(self, pretrained: str | None) -> str | bool | None:
        return pretrained

    def check_custom(self, request: CustomModelRequest) -> dict[str, Any]:
        """Preprocessing overrides, applied when the checkpoint is bound to an architecture."""
        return {key: getattr(request, key) for key in PREPROCESS_OVERRIDES if getattr(request, key) is not None}

    def describe_custom(self, folder: Path, options: dict[str, Any]) -> dict[str, Any]:
        return {"capabilities": sorted(CAPABILITIES)}

    def fetch(self, ref: ModelRef, folder: Path) -> dict[str, Any]:
        """Download a built-in ``name`` + ``pretrained`` tag, or an ``hf-hub:`` repo, into ``folder``."""
        import open_clip

        if ref.is_hub_name:
            model_cfg = open_clip.get_model_config(ref.name)
            if model_cfg is None:
                raise ModelNotFound(f"{ref.name} has no open_clip_config.json with a model_cfg.")
            _require_safetensors(ref.name.removeprefix("hf-hub:"))
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
        pretrained = None if ref.is_hub_name else ref.pretrained
        model, _, _ = open_clip.create_model_and_transforms(ref.name, pretrained=pretrained)
        return _save(model, model_cfg, open_clip.get_tokenizer(ref.name), folder)

    def bind_custom(self, ref: ModelRef, weights: Path, options: dict[str, Any], folder: Path) -> dict[str, Any]:
        import open_clip

        if ref.is_hub_name or ref.name not in open_clip.list_models():
            raise BadRequest(f"{ref.name!r} is not an open_clip architecture to load {ref.pretrained!r} into.")
        overrides = {k: v for k, v in options.items() if k in PREPROCESS_OVERRIDES and v is not None}
        try:
            model = open_clip.create_model(ref.name, pretrained=str(weights), force_preprocess_cfg=overrides)
        except RuntimeError as exc:
            raise BadRequest(f"The checkpoint {ref.pretrained!r} does not fit architecture {ref.name}: {exc}") from None
        return _save(model, open_clip.get_model_config(ref.name), open_clip.get_tokenizer(ref.name), folder)

    def graphs(self, folder: Path) -> dict[str, Graph]:
        return _graphs(folder)

    def load(self, folder: Path, ref: ModelRef, choice: BackendChoice) -> LoadedModel:
        embed_dim = int(json.loads((folder / CONFIG_FILE).read_text())["model_cfg"]["embed_dim"])
        return OpenClipModel(ref, choice.executor(_graphs(folder)), embed_dim, _logit_scale(folder))

    def load_preprocessor(self, folder: Path, ref: ModelRef) -> Preprocessor:
        return OpenClipPreprocessor(folder)

    def read_labels(self, folder: Path) -> list[str] | None:
        return None


register(OpenClipFamily())
