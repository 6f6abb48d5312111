"""Token rows straight from a model's Rust tokenizer, where they are the library's own.

sentence-transformers' ``preprocess`` wraps the model's ``tokenizers.Tokenizer`` in two layers of
Python: its own (modality detection, prompts, keyword merging) and transformers' (argument checks,
a dict per text, torch tensors), which the front then splits back into one row per text. For a
short text that is ~170 µs a call beside ~15 µs of tokenizing, and ~0.8 ms more for 64 texts (2
cores, ``bench/front_cost.py``). ``RustTokens`` asks the Rust tokenizer for the rows directly: the
prompt prepended as the library prepends it, cut at the model's length from the side asked (or
not cut), never padded. It is the library's own tokenizer object, configured for each call under
the lock the library's calls hold too.

It is used only where it gives back exactly the rows ``preprocess`` gives: ``RustTokens.verified``
tokenizes probe texts both ways when the front opens a model (texts under and over the limit, the
tokenizer's special tokens, no prompt, the default prompt and another, both truncation sides and
no truncation). Anything else (a chat template, a multimodal processor, a tokenizer without a Rust
backend, a library that changed how it prepares texts) keeps the library's path.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["Direction", "LibraryRows", "RustTokens"]

log = logging.getLogger("ingrain_bento.rust_tokens")

Direction = str | None  # the side a text over the limit is cut from ("right", "left"); None: not cut
# The library's own rows: (texts, prompt, direction) -> one int32 (keys, tokens) array per text.
LibraryRows = Callable[[list[str], str | None, Direction], list[np.ndarray]]

# The tokenizer output's keys (``TextFormat.keys``), as a Rust ``Encoding`` names them.
ENCODING_FIELDS = {"input_ids": "ids", "token_type_ids": "type_ids", "attention_mask": "attention_mask"}
DIRECTIONS: tuple[Direction, ...] = ("right", "left", None)
PROBE_PROMPT = "probe prompt: "


class RustTokens:
    def __init__(self, backend: Any, keys: Sequence[str], max_length: int, split_special_tokens: bool,
                 lock: threading.Lock) -> None:
        """``backend``: the model's own ``tokenizers.Tokenizer``, shared with transformers (a copy
        costs ~7 MB for a 30k vocabulary), so ``lock`` (held by the library's calls too) guards it:
        transformers sets its truncation and padding on every call, and so does ``rows``."""
        self._tokenizer = backend
        self._encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # no character offsets
        self._fields = tuple(ENCODING_FIELDS[key] for key in keys)
        self._max_length = max_length
        self._split_special_tokens = split_special_tokens
        self._lock = lock

    def rows(self, texts: Sequence[str], prompt: str | None, direction: Direction) -> list[np.ndarray]:
        """One int32 (keys, tokens) array per text, ``prompt`` first."""
        if not texts:
            return []
        tokenizer = self._tokenizer
        with self._lock:
            tokenizer.no_padding()
            if direction is None:
                tokenizer.no_truncation()
            else:
                tokenizer.enable_truncation(self._max_length, strategy="longest_first", direction=direction)
            tokenizer.encode_special_tokens = self._split_special_tokens
            encodings = self._encode([prompt + text for text in texts] if prompt else list(texts))
        fields = self._fields
        return [np.array([getattr(encoding, name) for name in fields], dtype=np.int32) for encoding in encodings]

    @classmethod
    def verified(cls, model: Any, keys: Sequence[str], default_prompt: str | None, library: LibraryRows,
                 lock: threading.Lock) -> RustTokens | None:
        """The Rust path for ``model`` (a sentence-transformers model) when it equals ``library`` on
        every probe; None when the model has no Rust tokenizer, or the two differ anywhere.
        ``lock``: held by ``library`` around each of its calls (not around this one)."""
        hf_tokenizer = getattr(model, "tokenizer", None)
        backend = getattr(hf_tokenizer, "_tokenizer", None)
        if backend is None or not hasattr(backend, "encode_batch") or not set(keys) <= ENCODING_FIELDS.keys():
            return None
        limit = int(getattr(model, "max_seq_length", 0) or 0)
        if limit <= 0:
            return None
        try:
            fast = cls(backend, keys, limit, bool(getattr(hf_tokenizer, "split_special_tokens", False)), lock)
            for prompt in dict.fromkeys([None, default_prompt, PROBE_PROMPT]):
                for direction in DIRECTIONS:
                    texts = probe_texts(hf_tokenizer, limit, over_limit=direction is not None)
                    expected, got = library(texts, prompt, direction), fast.rows(texts, prompt, direction)
                    if len(expected) != len(got) or not all(map(np.array_equal, expected, got)):
                        log.info("rust_tokens model=%s differs from the library (prompt=%r direction=%s): the "
                                 "library tokenizes", type(model).__name__, prompt, direction)
                        return None
        except Exception as exc:  # a tokenizer this cannot configure, or a library path that refuses a probe
            log.info("rust_tokens not used (%s: %s): the library tokenizes", type(exc).__name__, exc)
            return None
        return fast


def probe_texts(hf_tokenizer: Any, limit: int, over_limit: bool) -> list[str]:
    """Texts that tell two tokenizations apart: empty, short, mixed scripts and whitespace, the
    tokenizer's special tokens written out, and (``over_limit``) a text well over ``limit`` tokens.
    Untruncated, a text over the limit is refused whatever its tokens (a 413), and the library
    warns of it: that side is probed under the limit only."""
    specials = " ".join(str(token) for token in getattr(hf_tokenizer, "all_special_tokens", []) or [])
    texts = ["", "a", "Hello, World!  tabs\tand\nnewlines ÜNÏCÖDÉ 日本語 🙂", f"before {specials} after"]
    if over_limit:
        texts.append(" ".join(f"Wort{i} straße" for i in range(limit + 1)))  # two words: over the limit
    return texts
