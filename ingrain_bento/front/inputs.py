"""A front worker's preparation of inputs: texts to token items, images to pixel items.

Each model's ``Preprocessor`` (tokenizer and image transforms, no weights) is opened from the
BentoML store once per front worker, keyed by the store entry (tag and version), so a model
deleted and stored again is never prepared with the old files; ``clear`` drops them when the
runner's model state moves. Texts of concurrent requests are tokenized together, one call on
the worker's tokenizer thread (a ``Batcher``); a short request is tokenized at once, on the event
loop, when it is alone in the worker or its model's Rust tokenizer is called straight; images are
fetched concurrently, then decoded and preprocessed one at a time each in a small per-process
pool (Pillow releases the GIL while it decodes and resizes). Once the worker is ready, every
family's library is imported in the background.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from ingrain_bento.batching import Batcher, OneThread, call_guarded, in_executor
from ingrain_bento.boundary import ModelHandle
from ingrain_bento.errors import BadRequest, ModelNotFound
from ingrain_bento.families import families, family
from ingrain_bento.families.base import DEFAULT_TEXT_PREP, LIBRARY_IMPORTS, Preprocessor, TextPrep
from ingrain_bento.fetch import SafeFetcher
from ingrain_bento.media import ImageLoader
from ingrain_bento.metrics import RequestMetrics
from ingrain_bento.settings import Settings
from ingrain_bento.store import ModelStore

__all__ = ["InputPreparer", "text_prep"]

log = logging.getLogger("ingrain_bento.front.inputs")

# A request of at most this many characters, alone in its worker, is tokenized on the event
# loop (~0.5 ms for a short query with sentence-transformers' preprocessing) instead of on the
# tokenizer thread: the two thread hops cost ~0.4 ms more than that at concurrency 1 on 2 cores.
# With other requests in flight, texts go to the tokenizer thread and are batched as before,
# unless the model's tokenizer is called straight (``Preprocessor.tokenizes_inline``: ~20 µs for
# a short text, ~0.1 ms at this length), which has no cost a call to share.
INLINE_TEXT_CHARS = 1024


def _one_torch_thread() -> None:
    """A front worker's torch work is tiny (tokenizer output, normalizing rows): one thread. With
    torch's default (a thread per core) every small op wakes a pool whose threads then spin,
    CPU taken from the runner's forwards on the same cores (front CPU per request at
    concurrency 1: 4.5 ms with the pool, 3.7 ms with one thread; bench/cost_model.py)."""
    import torch

    torch.set_num_threads(1)


def text_prep(request: Any) -> TextPrep:
    """The preparation a request's texts ask for (``schemas.TextOptions``; a request without those
    fields, the library's defaults)."""
    return TextPrep(getattr(request, "prompt_name", None), getattr(request, "prompt", None),
                    getattr(request, "truncate", True), getattr(request, "truncation_direction", "right"))


class InputPreparer:
    def __init__(self, settings: Settings, fetcher: SafeFetcher, *, one_torch_thread: bool = True,
                 metrics: RequestMetrics | None = None) -> None:
        """``one_torch_thread``: this worker runs no forward (see ``_one_torch_thread``)."""
        self.settings = settings
        self.metrics = metrics
        self.one_torch_thread = one_torch_thread
        self.store = ModelStore()
        self.loader = ImageLoader(fetcher, settings)
        self.tokenize_executor = OneThread("ingrain-tokenize")
        self.image_executor = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1),
                                                 thread_name_prefix="ingrain-image")
        self._preprocessors: dict[str, asyncio.Task[Preprocessor]] = {}
        self._tokenizers: dict[tuple[str, TextPrep], Batcher[Any]] = {}  # per store entry and preparation

    async def preprocessor(self, handle: ModelHandle) -> Preprocessor:
        """The model's preprocessor, opened once (concurrent requests wait for the same open)."""
        task = self._preprocessors.get(handle.tag)
        if task is not None and task.done() and task.exception() is None:
            return task.result()  # the common case, without a shield's future per request
        if task is None or (task.done() and task.exception() is not None):
            task = asyncio.ensure_future(asyncio.to_thread(self._open, handle))
            self._preprocessors[handle.tag] = task
        return await asyncio.shield(task)

    def _open(self, handle: ModelHandle) -> Preprocessor:
        if self.one_torch_thread:
            _one_torch_thread()
        started = time.perf_counter()
        entry = self.store.by_tag(handle.tag)
        if entry is None:  # a front on another machine than the runner: its own copy of the store
            entry = self.store.pull(handle.ref)
        if entry.ref is None:
            raise ModelNotFound(f"{handle.ref.display_id} is not a loadable store entry.")
        with LIBRARY_IMPORTS:
            preprocessor = family(handle.ref.library).load_preprocessor(entry.path, handle.ref)
        log.info("front.preprocessor model=%s tag=%s seconds=%.2f", handle.ref.display_id, handle.tag,
                 time.perf_counter() - started)
        if preprocessor.front_weights is not None and self.metrics is not None:
            self.metrics.record_front_weights()
        return preprocessor

    def front_weights(self) -> dict[str, str]:
        """Store tag -> why this worker holds that model's weights, for the models whose
        weightless open failed here (``Preprocessor.front_weights``)."""
        held: dict[str, str] = {}
        for tag, task in self._preprocessors.items():
            if task.done() and not task.cancelled() and task.exception() is None:
                reason = task.result().front_weights
                if reason is not None:
                    held[tag] = reason
        return held

    async def import_libraries(self) -> None:
        """Import every family's library in the background (sentence-transformers alone takes ~4 s
        and ~300 MB on 2 cores): otherwise the first request for a model of that library in this
        worker waits for it, and the import holds the GIL, stalling the worker's other requests."""

        def import_all() -> None:
            for entry in families().values():
                for module in entry.library_modules:
                    try:
                        with LIBRARY_IMPORTS:
                            importlib.import_module(module)
                    except Exception:
                        log.exception("front.import_libraries could not import %s", module)

        await asyncio.to_thread(import_all)

    async def prepare(self, kind: str, handle: ModelHandle, request: Any, alone: bool = False) -> list[Any]:
        """A request's items for a task whose inputs are ``kind`` (``tasks.Task.inputs``)."""
        if kind == "texts":
            return await self.texts(handle, request.texts, alone, text_prep(request))
        if kind == "images":
            return await self.images(handle, request.images, request.image_download_headers)
        if kind == "pairs":
            return await self.pairs(handle, request.query, request.document_texts, request.max_tokens_per_doc)
        raise ValueError(f"no preparation for inputs {kind!r}")

    async def texts(self, handle: ModelHandle, texts: list[str], alone: bool = False,
                    prep: TextPrep = DEFAULT_TEXT_PREP) -> list[Any]:
        """One item per text, tokenized with the texts of concurrent requests for this model that
        ask alike (``prep``); a short request is tokenized at once, on the event loop (see
        ``INLINE_TEXT_CHARS``), when the model ``tokenizes_inline`` and its tokenizer is not busy on
        the thread (a long request's texts), or when the request is ``alone`` in this worker and
        finds the tokenizer idle. With
        ``truncate: false`` a request's texts are tokenized on their own, so that a text over the
        limit is named by its index in the request."""
        preprocessor = await self.preprocessor(handle)
        prepare = partial(preprocessor.prepare_texts, prep=prep)
        # short, and the loop would not wait for a tokenization running on the thread
        inline = sum(map(len, texts)) <= INLINE_TEXT_CHARS and preprocessor.tokenizer_idle()
        if inline and preprocessor.tokenizes_inline:
            return list(call_guarded(prepare, texts))
        if not prep.truncate:
            return list(await self.tokenize_executor.run(call_guarded, prepare, texts))
        batcher = self._tokenizers.get((handle.tag, prep))
        if batcher is None:
            batcher = Batcher(in_executor(prepare, self.tokenize_executor),
                              max_batch=self.settings.max_batch_size, max_wait_s=self.settings.batch_wait_ms / 1000,
                              merge=self.settings.dynamic_batching)
            self._tokenizers[(handle.tag, prep)] = batcher
        if inline and alone and batcher.idle:
            return list(call_guarded(prepare, texts))
        return list(await batcher.submit(texts))

    async def pairs(self, handle: ModelHandle, query: str, documents: list[str], max_tokens: int | None) -> list[Any]:
        """One item per (query, document) pair, tokenized together as the model's own tokenizer
        pairs them, on the tokenizer thread (a request's pairs are already a batch)."""
        preprocessor = await self.preprocessor(handle)
        prepare = partial(preprocessor.prepare_pairs, query, max_tokens=max_tokens)
        return list(await self.tokenize_executor.run(call_guarded, prepare, documents))

    async def images(self, handle: ModelHandle, values: list[str], headers: dict[str, str] | None) -> list[Any]:
        """One pixel item per image, in order; the first bad image fails the request (400 naming it)."""
        preprocessor = await self.preprocessor(handle)
        encoded = await self.loader.fetch(values, headers)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.image_executor, self.loader.check_pixels, encoded)

        def prepare(data: bytes, index: int) -> Any:
            image = self.loader.decode(data, index)
            try:
                return preprocessor.prepare_image(image)
            except BadRequest:
                raise
            except Exception as exc:
                raise BadRequest(f"Image {index} could not be preprocessed ({type(exc).__name__}: {exc}).") from None

        return list(await asyncio.gather(*(loop.run_in_executor(self.image_executor, prepare, data, index)
                                           for index, data in enumerate(encoded))))

    async def clear(self) -> None:
        """Forget every preprocessor (the runner's model state moved: unload, delete, store)."""
        tokenizers, self._tokenizers = self._tokenizers, {}
        self._preprocessors = {}
        await asyncio.gather(*(batcher.close() for batcher in tokenizers.values()))

    async def close(self) -> None:
        await self.clear()
        self.tokenize_executor.shutdown(wait=False)
        self.image_executor.shutdown(wait=False)
