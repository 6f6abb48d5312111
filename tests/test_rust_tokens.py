"""Token rows from a model's Rust tokenizer, called straight (``rust_tokens``).

The front opens a model and, where the Rust tokenizer gives back exactly what the library's
``preprocess`` gives on probe texts, tokenizes with it: the same rows, without the library's
~0.2 ms of Python a call. Compared here with ``SentenceTransformer.preprocess`` itself, for every
text-row kind, every prompt, both truncation sides and no truncation, on WordPiece (BERT) and
byte-level BPE (RoBERTa, left-padded) tokenizers; anything that differs keeps the library's path.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ingrain_bento.families import family, parse_ref
from ingrain_bento.families.base import TextPrep
from ingrain_bento.families.sentence_transformers import SentenceTransformerPreprocessor, split_rows, text_format
from ingrain_bento.rust_tokens import RustTokens

TEXTS = [
    "The cat sits on the mat.",
    "",
    "  Spaces,\ttabs\nand NEWLINES; ÜNÏCÖDÉ straße 日本語 🙂",
    "[CLS] written out [SEP] <s> </s> [PAD]",
    "long " * 400,
    " ".join(f"word{i}" for i in range(300)),
]


def _library_rows(library: Any, texts: list[str], prompt: str | None, direction: str | None) -> list[np.ndarray]:
    """The rows the library's own ``preprocess`` gives (its padding split off)."""
    tokenizer = library.tokenizer
    side = tokenizer.truncation_side
    tokenizer.truncation_side = direction or "right"
    try:
        kwargs = {"processing_kwargs": {"text": {"truncation": False}}} if direction is None else {}
        features = library.preprocess(texts, prompt=prompt, **kwargs)
    finally:
        tokenizer.truncation_side = side
    fmt = text_format(library, None)
    assert fmt is not None
    rows = split_rows(features, fmt)
    assert rows is not None
    return rows


def _opened(name: str, folder: Path) -> SentenceTransformerPreprocessor:
    """The preprocessor the front opens for ``name``, fetched into ``folder`` as the store holds it."""
    st = family("sentence_transformers")
    ref = parse_ref("sentence_transformers", name, None)
    st.fetch(ref, folder)
    preprocessor = st.load_preprocessor(folder, ref)
    assert isinstance(preprocessor, SentenceTransformerPreprocessor)
    return preprocessor


def _assert_rows_equal_the_library(preprocessor: SentenceTransformerPreprocessor, library: Any, texts: list[str],
                                   prompts: dict[str | None, TextPrep]) -> None:
    """Every prompt x direction (and no truncation, on the texts within the limit)."""
    limit = library.max_seq_length
    for prompt, prep in prompts.items():
        for direction in ("right", "left", None):
            asked = prep._replace(direction=direction or "right", truncate=direction is not None)
            chosen = texts if direction else [text for text in texts if len(_library_rows(
                library, [text], prompt, None)[0][0]) <= limit]
            got = preprocessor.prepare_texts(chosen, asked)
            expected = _library_rows(library, chosen, prompt, direction)
            assert len(got) == len(expected)
            for index, (a, b) in enumerate(zip(got, expected, strict=True)):
                assert a.dtype == np.int32
                np.testing.assert_array_equal(a, b, err_msg=f"text {index}, prompt {prompt!r}, {direction}")


@pytest.mark.parametrize("key", ["st", "st_prompt", "st_prompts", "minilm", "classifier", "multilabel", "sparse"])
def test_every_text_row_kind_takes_the_rust_path_and_gets_the_librarys_rows(hub_models, tmp_path, key):
    preprocessor = _opened(hub_models[key], tmp_path)
    assert preprocessor.rust_tokens is not None and preprocessor.tokenizes_inline
    library = preprocessor.model
    prompts: dict[str | None, TextPrep] = {preprocessor.prompt: TextPrep()}
    if preprocessor.pools_prompt:  # a model whose pooling leaves its prompt out takes no other
        prompts["a literal prompt: "] = TextPrep(prompt="a literal prompt: ")
        prompts.update({prompt: TextPrep(prompt_name=name) for name, prompt in preprocessor.prompts.items()})
    _assert_rows_equal_the_library(preprocessor, library, TEXTS, prompts)


def _tiny_roberta(folder: Path) -> Path:
    """A RoBERTa-shaped sentence-transformer with a byte-level BPE tokenizer trained here, padded
    on the left and cut at 16 tokens: another tokenizer family than the fixtures' WordPiece."""
    from sentence_transformers import SentenceTransformer, models
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors, trainers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast, RobertaConfig, RobertaModel

    bpe = Tokenizer(BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(TEXTS * 3 + ["the quick brown fox jumps over the lazy dog"] * 5, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>"], initial_alphabet=pre_tokenizers.ByteLevel
        .alphabet()))
    bpe.post_processor = processors.RobertaProcessing(("</s>", bpe.token_to_id("</s>")),
                                                      ("<s>", bpe.token_to_id("<s>")))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>", model_max_length=16, padding_side="left")
    hf = folder / "hf"
    config = RobertaConfig(vocab_size=bpe.get_vocab_size(), hidden_size=16, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=32, max_position_embeddings=40,
                           pad_token_id=bpe.token_to_id("<pad>"))
    RobertaModel(config).save_pretrained(str(hf))
    tokenizer.save_pretrained(str(hf))
    transformer = models.Transformer(str(hf), max_seq_length=16)
    pooling = models.Pooling(16, pooling_mode="mean")
    out = folder / "st"
    SentenceTransformer(modules=[transformer, pooling], device="cpu").save(str(out))
    return out


def test_a_left_padded_byte_level_bpe_tokenizer_gets_the_librarys_rows(tmp_path):
    preprocessor = SentenceTransformerPreprocessor(_tiny_roberta(tmp_path))
    assert preprocessor.format is not None and preprocessor.format.padding_side == "left"
    assert preprocessor.rust_tokens is not None
    _assert_rows_equal_the_library(preprocessor, preprocessor.model, TEXTS, {None: TextPrep(), "q: ": TextPrep(
        prompt="q: ")})


def test_a_tokenizer_that_differs_from_the_library_keeps_the_librarys_path(hub_models, tmp_path, monkeypatch):
    """Verified once at open: where any probe differs (here the library adds a token the Rust
    tokenizer does not), the front tokenizes with the library, batched on its thread."""
    original = SentenceTransformerPreprocessor._library_rows

    def one_more_token(self, texts, prompt, direction):
        return [np.concatenate([row, row[:, -1:]], axis=1) for row in original(self, texts, prompt, direction)]

    monkeypatch.setattr(SentenceTransformerPreprocessor, "_library_rows", one_more_token)
    preprocessor = _opened(hub_models["st"], tmp_path)
    assert preprocessor.format is not None
    assert preprocessor.rust_tokens is None and not preprocessor.tokenizes_inline
    got = preprocessor.prepare_texts(["a text"])
    assert got[0].shape[1] == one_more_token(preprocessor, ["a text"], None, "right")[0].shape[1]


def test_a_tokenizer_without_a_rust_backend_keeps_the_librarys_path():
    class PythonOnly:  # a model whose tokenizer is written in Python: no ``_tokenizer`` to call
        tokenizer = object()
        max_seq_length = 128

    assert RustTokens.verified(PythonOnly(), ("input_ids",), None, lambda texts, prompt, direction: [],
                               threading.Lock()) is None
