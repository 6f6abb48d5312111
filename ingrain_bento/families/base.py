"""What a library family is, and the objects it builds from a stored model.

A family (``open_clip.py``, ``sentence_transformers.py``, ``timm.py``) is one module that
registers one object satisfying ``Family``: how its names are read, how a checkpoint gets into
the store (``fetch``, ``bind_custom``), and three ways to open a stored folder:

- ``graphs``: the model's forwards as ``backends.Graph`` (torch modules over arrays, with example
  inputs): what each backend runs, and what the ONNX backend exports;
- ``load`` (the runner's process): a ``LoadedModel`` whose forwards take a batch of prepared
  items and return numpy rows, its graphs run by the chosen backend (``backends.BackendChoice``);
- ``load_preprocessor`` (the front): no weights at all, a ``Preprocessor`` that turns texts and
  images into those items with the model's own tokenizer and transforms.

What a model can do is a set of capabilities (the tasks of ``ingrain_bento.tasks``), never a
library check. Torch and the libraries are imported inside the families and the torch
backend only: a ``LoadedModel`` speaks numpy.
"""

from __future__ import annotations

import ctypes
import gc
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol

from ingrain_bento.errors import BadRequest
from ingrain_bento.tasks import TASKS, refuse

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from ingrain_bento.backends import BackendChoice, Executor, Graph
    from ingrain_bento.refs import ModelRef
    from ingrain_bento.schemas import CustomModelRequest

__all__ = ["DEFAULT_TEXT_PREP", "LIBRARY_IMPORTS", "Family", "ImagePipeline", "LoadedModel", "Preprocessor",
           "TextPrep", "check_safetensors", "freeze_heap", "trim_heap"]

# The libraries' imports, one thread at a time: transformers 5's lazy module hands a second thread
# a half-built namespace ("ImportError: cannot import name ..."). Held while a front opens a model's
# preprocessor, while it imports the libraries in the background (``InputPreparer.import_libraries``)
# and while the pool opens a model (a restore in the process that also serves the front). Reentrant:
# opening a model may import what a preprocessor does.
LIBRARY_IMPORTS = threading.RLock()

TextItem = Any  # what a Preprocessor makes of one text: a small integer array, or the text itself
ImageItem = Any  # what a Preprocessor makes of one image: a uint8 HWC array, or float CHW pixels


class TextPrep(NamedTuple):
    """How one request asks its texts to be prepared (API.md "Prompts, truncation and output
    precision"); the defaults are the library's own ``encode``: the model's default prompt, cut to
    its context from the right. Texts of concurrent requests are tokenized together only when they
    ask alike."""

    prompt_name: str | None = None  # one of the model's named prompts
    prompt: str | None = None  # a literal prefix
    truncate: bool = True  # False: a text over the context is a 413
    direction: Literal["right", "left"] = "right"  # left: keep the end


DEFAULT_TEXT_PREP = TextPrep()


class Family(Protocol):
    """One library. ``name`` is the ``library`` value clients send."""

    name: str
    tag_prefix: str  # short prefix of its BentoML store tags ("clip")
    # What /download_custom_model stores: a bare checkpoint bound to an architecture when first
    # loaded ("checkpoint"), or a complete model folder that loads by its own name ("folder").
    custom_form: Literal["checkpoint", "folder"]
    custom_files: Mapping[str, str]  # request field -> file in the downloaded folder
    # The modules ``load_preprocessor`` imports: a front worker imports them once it is ready
    # (``InputPreparer.import_libraries``), so a model's first request there does not wait for it.
    library_modules: tuple[str, ...]

    def canonical_pretrained(self, name: str, pretrained: str | bool | None) -> str | None:
        """``pretrained`` as the store keys it (a 400 when the library cannot take it)."""

    def api_pretrained(self, pretrained: str | None) -> str | bool | None:
        """``pretrained`` as the API shows it."""

    def check_custom(self, request: CustomModelRequest) -> dict[str, Any]:
        """Refuse a custom-model request missing what this library needs; return its options."""

    def describe_custom(self, folder: Path, options: dict[str, Any]) -> dict[str, Any]:
        """Store metadata of a downloaded custom folder (400 when the files do not form a model
        or do not fit ``options``)."""

    def fetch(self, ref: ModelRef, folder: Path) -> dict[str, Any]:
        """Download ``ref`` with the library's own hub code into ``folder``; return metadata."""

    def bind_custom(self, ref: ModelRef, weights: Path, options: dict[str, Any], folder: Path) -> dict[str, Any]:
        """Build a loadable folder from a custom checkpoint, now that the architecture is named."""

    def graphs(self, folder: Path) -> dict[str, Graph]:
        """A stored model's forwards, opened with the library's own loader (fp32, on the CPU);
        raises with the reason for a model whose forwards cannot be graphs (the ONNX backend then
        falls back to torch)."""

    def load(self, folder: Path, ref: ModelRef, choice: BackendChoice) -> LoadedModel:
        """Open a stored folder with the library's own loader, its graphs run by the backend of ``choice``."""

    def load_preprocessor(self, folder: Path, ref: ModelRef) -> Preprocessor:
        """The model's tokenizer and image transforms, without its weights."""

    def read_labels(self, folder: Path) -> list[str] | None:
        """Class labels from the stored config alone, or None for a model that does not classify."""


class Preprocessor:
    """Turns a request's inputs into the items the model's forward takes, without weights.

    ``prepare_texts`` runs on the front's one tokenizer thread, on the texts of many requests
    at once; ``prepare_image`` runs per image in the front's image pool. Both return one item
    per input, small numpy arrays the runner stacks into a batch."""

    capabilities: frozenset[str] = frozenset()
    pixels: ImagePipeline | None = None  # the model's image transform, for a model that takes images
    # The library's model as the front opened it, on torch's meta device (no weights, no memory),
    # for a family whose preprocessing needs the model object; None for one that needs none.
    model: Any = None
    # Why this front holds the model's weights after all: its weightless open failed and it loaded
    # them on the CPU (shown in /metrics and in the model's listing); None when it holds none.
    front_weights: str | None = None
    prompts: dict[str, str] = {}  # its named prompts, for ``TextPrep.prompt_name``
    labels: list[str] | None = None  # a classifier's labels, in the order of its scores
    multi_label: bool = False  # its labels are scored apart (sigmoid), not against each other (softmax)

    @property
    def tokenizes_inline(self) -> bool:
        """Its ``prepare_texts`` costs next to nothing a call beyond the texts themselves (the Rust
        tokenizer straight): a short request is tokenized at once, on the event loop, instead of
        being batched with others on the tokenizer thread to share the library's cost a call."""
        return False

    def tokenizer_idle(self) -> bool:
        """Whether no tokenization of this model is running now (on the tokenizer thread): a short
        request tokenized on the event loop would otherwise wait for it there, and so would every
        request of the worker."""
        return True

    def tokens(self, texts: Sequence[str], add_special_tokens: bool = True,
               prep: TextPrep = DEFAULT_TEXT_PREP) -> list[list[tuple[int, str, bool, int | None, int | None]]]:
        """Each text's tokens as the model's tokenizer makes them (its prompt first): (id, text,
        special, start, stop), ``start``/``stop`` being character offsets in the text as sent
        (None for a token the tokenizer added, or one of the prompt)."""
        raise BadRequest("This model has no text tokenizer to show.")

    def decode(self, ids: Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        """Token ids back to text, with the model's tokenizer."""
        raise BadRequest("This model has no text tokenizer to decode with.")

    def prepare_texts(self, texts: Sequence[str], prep: TextPrep = DEFAULT_TEXT_PREP) -> list[TextItem]:
        raise BadRequest("This model takes images, not text.")

    def prepare_pairs(self, query: str, documents: Sequence[str], max_tokens: int | None) -> list[TextItem]:
        """One item per (query, document) pair; ``max_tokens`` cuts each document first."""
        raise BadRequest("This model does not rerank.")

    def prepare_image(self, image: Image.Image) -> ImageItem:
        if self.pixels is None:
            raise BadRequest("This model takes text, not images.")
        return self.pixels.prepare(image)


class LoadedModel(ABC):
    """A resident model. ``forward(task, items)`` runs one batch of prepared items through its
    executor (``backends.Executor``) and returns one numpy row per item (float32, or float16 for a
    half model)."""

    capabilities: frozenset[str] = frozenset()
    labels: list[str] | None = None
    context_length: int | None = None  # tokens of text it takes at most (texts are truncated to it)
    prompts: dict[str, str] = {}  # its named prompts (sentence-transformers' ``prompts``)

    def __init__(self, ref: ModelRef, executor: Executor) -> None:
        self.ref = ref
        self.executor = executor
        self.fallback: str | None = None  # why the backend asked for is not the one running (set by the pool)

    @property
    def backend(self) -> str:
        return self.executor.backend

    @property
    def device(self) -> str:
        return self.executor.device

    @property
    def dtype(self) -> str:
        return self.executor.dtype

    @property
    def memory_bytes(self) -> int:
        return self.executor.memory_bytes

    @property
    @abstractmethod
    def embedding_size(self) -> int | None:
        """The size ``model_embedding_size`` reports (CLIP: the text tower's; a sparse encoder: its
        vocabulary); None for a model that makes no embeddings (a reranker)."""

    def forward(self, task: str, items: Sequence[Any]) -> np.ndarray:
        """One batch of ``task`` (a capability): one row per item, on the CPU (the task's method)."""
        if task not in self.capabilities:
            raise refuse(self.ref.display_id, task, self.capabilities)
        rows: np.ndarray = getattr(self, TASKS[task].method)(items)
        return rows

    def item_tokens(self, task: str) -> Callable[[Any], int] | None:
        """How many tokens a prepared item of ``task`` holds, for a task whose items vary in
        length (texts: their forwards are sized by padded tokens); None for fixed-size items."""
        return None

    def encode_text(self, items: Sequence[TextItem]) -> np.ndarray:
        raise NotImplementedError

    def encode_image(self, items: Sequence[ImageItem]) -> np.ndarray:
        raise NotImplementedError

    def classify_image(self, items: Sequence[ImageItem]) -> np.ndarray:
        raise NotImplementedError

    def rerank(self, items: Sequence[TextItem]) -> np.ndarray:
        """A score row per (query, document) pair item."""
        raise NotImplementedError

    def embed_sparse(self, items: Sequence[TextItem]) -> np.ndarray:
        """A dense row of vocabulary size per text item (its non-zeros are the sparse embedding)."""
        raise NotImplementedError

    def release(self) -> None:
        """Drop the weights and give the memory back (device memory, glibc heap)."""
        self.executor.release()
        gc.unfreeze()  # let the collector reach the model's reference cycles again
        freeze_heap()
        trim_heap()


class ImagePipeline:
    """A torchvision eval transform, split where the PIL steps end.

    The front runs the PIL steps (resize, crop, mode) and sends uint8 HWC pixels, a quarter of
    the bytes of float32; the model's image graph runs ``ToTensor`` + ``Normalize`` on the whole
    batch, on the device (``backends.pixels.PixelGraph``). That is the transform's own arithmetic
    (divide by 255, subtract the mean, divide by the std, elementwise), so rows equal the
    library's. A transform of another shape runs whole in the front and crosses as float32 CHW
    pixels."""

    def __init__(self, transform: Any) -> None:
        from torchvision import transforms as T

        steps = list(getattr(transform, "transforms", [transform]))
        cut = next((i for i, step in enumerate(steps) if isinstance(step, T.ToTensor)), None)
        tail = steps[cut:] if cut is not None else []
        split = len(tail) == 2 and isinstance(tail[1], T.Normalize) and not tail[1].inplace
        self.transform = transform
        self.pil_steps = T.Compose(steps[:cut]) if split else None
        self.mean = tuple(float(v) for v in tail[1].mean) if split else None
        self.std = tuple(float(v) for v in tail[1].std) if split else None

    def prepare(self, image: Image.Image) -> np.ndarray:
        """The front's part: uint8 HWC pixels (or float32 CHW when the transform does not split)."""
        import numpy as np

        if self.pil_steps is None:
            return self.transform(image).numpy()
        return np.asarray(self.pil_steps(image), dtype=np.uint8)

    def example(self, count: int = 2) -> np.ndarray:
        """``count`` items as the front prepares them (noise images through the PIL steps)."""
        import numpy as np
        from PIL import Image

        noise = np.random.default_rng(0).integers(0, 256, (count, 240, 320, 3), dtype=np.uint8)
        return np.stack([self.prepare(Image.fromarray(image)) for image in noise])


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
