"""Declarative model lists (``models/*.yaml``): what to preload at start-up and bake into a Bento.

    models:
      - {library: sentence_transformers, name: intfloat/e5-small-v2}
      - {library: open_clip, name: ViT-B-32, pretrained: laion2b_s34b_b79k, backend: onnx}
      - {library: timm, name: resnet50.a1_in1k}

``backend`` (optional) picks the engine, as the load routes' field does.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict

from ingrain_bento.backends.base import Backend
from ingrain_bento.families import parse_ref
from ingrain_bento.refs import ModelRef
from ingrain_bento.settings import Settings

__all__ = ["baked_model_tags", "preload_list", "read_model_list"]


class ModelListEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    library: str
    name: str
    pretrained: bool | str | None = None
    backend: Backend | None = None


class ModelList(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[ModelListEntry] = []


def read_model_list(path: str | Path) -> list[tuple[ModelRef, Backend | None]]:
    """The validated models of a YAML list, each with its engine (None: the server default); a
    bad entry fails loudly, naming the file."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    try:
        entries = ModelList.model_validate(data).models
        return [(parse_ref(e.library, e.name, e.pretrained), e.backend) for e in entries]
    except Exception as exc:
        raise ValueError(f"{path}: {exc}") from exc


def preload_list(settings: Settings) -> list[tuple[ModelRef, Backend | None]]:
    """``INGRAIN_PRELOAD``'s models (and engines), or none."""
    return read_model_list(settings.preload) if settings.preload else []


def baked_model_tags(settings: Settings) -> list[str]:
    """Store tags of the preload list's models that are stored here: what ``bentoml build``
    bakes into a Bento (BentoML's own mechanism), so the Bento serves them with no network."""
    from ingrain_bento.store import ModelStore

    store = ModelStore()
    return [entry.tag for entry in (store.find(ref) for ref, _ in preload_list(settings)) if entry is not None]
