"""What every library family gives the rest of the server.

A family module (``open_clip.py``, ``sentence_transformers.py``, ``timm.py``) offers:

- ``fetch(ref, folder)``: download ``ref`` through the library's own hub code and write it
  into ``folder`` in the library's own ``local-dir`` format; return store metadata;
- ``bind_custom(ref, weights, options, folder)``: build that folder from a custom
  safetensors checkpoint (open_clip and timm, whose architecture is named at load time);
- ``load(folder, ref, device, half)``: open the folder with the library's own loader and
  return a ``LoadedModel``.

Torch and the libraries are imported inside the families only, so the server starts fast.
"""

from __future__ import annotations

import ctypes
import gc
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ingrain_bento.errors import BadRequest
from ingrain_bento.refs import ModelRef

if TYPE_CHECKING:
    import torch
    from PIL import Image

TEXT = "text"
IMAGE = "image"
METADATA_FILE = "ingrain.json"


class LoadedModel(ABC):
    """A resident model. ``encode_*``/``classify_image`` run one batch on the device and
    return float32 rows on the CPU; ``prepare_texts`` and ``preprocess_images`` run before
    batching, off the loop."""

    modalities: frozenset[str] = frozenset()
    labels: list[str] | None = None
    prepares_texts = False  # True: texts go through prepare_texts (the tokenizer thread) first

    def __init__(self, ref: ModelRef, module: "torch.nn.Module", device: "torch.device", half: bool) -> None:
        import torch

        self.ref = ref
        self.device = device
        self.dtype = torch.float16 if half else torch.float32
        module.eval()
        if half:
            module.half()
        self.module = module.to(device)
        self.memory_bytes = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))

    @property
    @abstractmethod
    def embedding_size(self) -> int:
        """The size ``model_embedding_size`` reports (CLIP: the text tower's)."""

    @property
    def image_embedding_size(self) -> int:
        return self.embedding_size

    def prepare_texts(self, texts: Sequence[str]) -> Sequence[Any]:
        """Tokenization, batched across requests on the pool's one tokenizer thread (so never two
        calls at once) while the previous forward runs; unused when ``prepares_texts`` is False."""
        return texts

    def encode_text(self, texts: Sequence[Any]) -> "torch.Tensor":
        raise BadRequest(f"{self.ref.display_id} has no text tower: send images instead.")

    def preprocess_images(self, images: Sequence["Image.Image"]) -> "torch.Tensor":
        raise BadRequest(f"{self.ref.display_id} has no image tower: send text instead.")

    def encode_image(self, pixels: Sequence["torch.Tensor"]) -> "torch.Tensor":
        raise BadRequest(f"{self.ref.display_id} has no image tower: send text instead.")

    def classify_image(self, pixels: Sequence["torch.Tensor"]) -> "torch.Tensor":
        raise BadRequest(
            f"{self.ref.display_id} is not a classifier: /classify_image serves timm models."
        )

    def _pixels_to_device(self, pixels: Sequence["torch.Tensor"]) -> "torch.Tensor":
        import torch

        batch = torch.stack(list(pixels))
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        return batch.to(self.dtype)

    def release(self) -> None:
        """Drop the weights and give the memory back (CUDA cache, glibc heap)."""
        import torch

        self.module = None
        gc.unfreeze()  # let the collector reach the model's reference cycles again
        freeze_heap()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        trim_heap()


def freeze_heap() -> None:
    """Collect, then move every object alive now (the libraries, resident models) to the
    collector's permanent generation, so later full collections skip them. With torch,
    transformers and one model loaded the heap holds ~640k tracked objects, and one full
    collection took ~0.36 s with the GIL held, stalling the event loop and the forward alike
    (timed with ``gc.callbacks`` under the text load; with the heap frozen: ~6 ms)."""
    gc.collect()
    gc.freeze()


def trim_heap() -> None:
    """Return freed heap pages to the OS (glibc keeps them otherwise and RSS never drops)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def write_metadata(folder: Path, metadata: dict[str, Any]) -> None:
    (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=2))


def read_metadata(folder: Path) -> dict[str, Any]:
    path = folder / METADATA_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def check_safetensors(path: Path) -> None:
    """A 400 unless ``path`` is a readable safetensors file (pickles are never opened)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            if not list(handle.keys()):
                raise BadRequest("The safetensors file holds no tensors.")
    except BadRequest:
        raise
    except Exception as exc:
        raise BadRequest(
            f"The weights are not a valid safetensors file ({type(exc).__name__}); only safetensors are "
            "accepted, never pickled .bin/.pt files."
        ) from None
