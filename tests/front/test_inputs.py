"""``InputPreparer``: a front worker's tokenizers and image transforms, without weights.

Texts of concurrent requests are tokenized together on the worker's tokenizer thread; a short
request alone in its worker is tokenized at once on the event loop, sparing two thread hops, as
is every short request for a model whose Rust tokenizer is called straight.
Either way each text becomes the same token item. Once the worker is ready it imports every
family's library in the background, so no request waits for an import.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

import ingrain_bento.families as registry
from ingrain_bento import schemas as s
from ingrain_bento.front.gateway import ModelGateway
from ingrain_bento.front.inputs import INLINE_TEXT_CHARS
from ingrain_bento.runner.engine import RunnerEngine
from ingrain_bento.settings import Settings

from fixtures.compare import MAX_ABS_DIFF, max_abs_diff

Embed = Callable[..., Awaitable[Any]]  # (gateway, *texts) -> each text's embeddings


def _recorded_embeds(name: str, check: Callable[[ModelGateway, Embed, list[str]], Awaitable[None]],
                     rust: bool) -> None:
    """Run ``check`` against a gateway whose preprocessor for ``name`` records the thread of each
    tokenization (the Rust tokenizer called straight, or the library's, as ``rust`` says)."""

    async def embed(gateway: ModelGateway, *texts: str) -> list[list[list[float]]]:
        replies = await asyncio.gather(*(gateway.embed_text(s.TextRequest(name=name, text=text)) for text in texts))
        return [reply.embeddings for reply in replies]

    async def main() -> None:
        engine = RunnerEngine(Settings())
        gateway = ModelGateway(engine, Settings(), own_process=True)
        try:
            await gateway.load(s.ModelRequest(name=name), "sentence_transformers")
            handle = await gateway.handle(s.TextRequest(name=name, text="x"))
            preprocessor = await gateway.inputs.preprocessor(handle)
            assert preprocessor.tokenizes_inline, "a BERT tokenizer is called straight"
            if not rust:
                preprocessor.rust_tokens = None
            tokenize, threads = preprocessor.prepare_texts, []

            def recording(texts, **options):
                threads.append(threading.current_thread().name)
                return tokenize(texts, **options)

            preprocessor.prepare_texts = recording  # type: ignore[method-assign]  # records, then tokenizes
            await check(gateway, embed, threads)
        finally:
            await gateway.close()
            await engine.close()

    asyncio.run(asyncio.wait_for(main(), 120))


def test_a_lone_short_request_is_tokenized_on_the_loop_and_concurrent_ones_together_on_the_thread(hub_models):
    """The library's tokenizer costs ~0.2 ms a call: concurrent requests share one."""

    async def check(gateway: ModelGateway, embed: Embed, threads: list[str]) -> None:
        (lone,) = await embed(gateway, "a lone query")
        assert threads == [threading.current_thread().name], "alone: tokenized on the event loop"

        threads.clear()
        many = await embed(gateway, *[f"query number {i} about rivers" for i in range(12)], "a lone query")
        # the same embedding either way (padded beside longer texts: the same up to float rounding)
        assert np.allclose(many[-1], lone, atol=1e-6), "the same embedding either way"
        # The first request was alone when it started; the other twelve found it in flight.
        assert threads[0] == threading.current_thread().name, threads
        assert threads[1:] and all(t.startswith("ingrain-tokenize") for t in threads[1:]), threads
        assert len(threads[1:]) < 12, "concurrent requests were tokenized in few calls"

        threads.clear()
        await embed(gateway, "word " * (INLINE_TEXT_CHARS // 5 + 1))
        assert len(threads) == 1 and threads[0].startswith("ingrain-tokenize"), "a long text stays off the loop"

    _recorded_embeds(hub_models["st"], check, rust=False)


def test_with_the_rust_tokenizer_every_short_request_is_tokenized_on_the_loop(hub_models):
    """Called straight, the Rust tokenizer has no cost a call to share: no thread hop for a short
    request, alone or not; a long one still leaves the loop."""

    async def check(gateway: ModelGateway, embed: Embed, threads: list[str]) -> None:
        texts = [f"query number {i} about rivers" for i in range(12)]
        many = await embed(gateway, *texts)
        assert threads == [threading.current_thread().name] * 12, threads
        from sentence_transformers import SentenceTransformer

        expected = SentenceTransformer(hub_models["st"], device="cpu").encode(texts, normalize_embeddings=True)
        assert max_abs_diff([rows[0] for rows in many], expected, "rust tokens, inline") <= MAX_ABS_DIFF

        threads.clear()
        await embed(gateway, "word " * (INLINE_TEXT_CHARS // 5 + 1))
        assert len(threads) == 1 and threads[0].startswith("ingrain-tokenize"), "a long text stays off the loop"

    _recorded_embeds(hub_models["st"], check, rust=True)


def test_a_short_request_does_not_wait_on_the_loop_for_a_tokenization_running_on_the_thread(hub_models):
    """While the tokenizer is busy on its thread (a long request's texts; held here for 0.5 s), a
    short request goes to the thread too: the event loop, and every other request, keeps going."""

    async def check(gateway: ModelGateway, embed: Embed, threads: list[str]) -> None:
        handle = await gateway.handle(s.TextRequest(name=hub_models["st"], text="x"))
        preprocessor = await gateway.inputs.preprocessor(handle)
        held = threading.Event()

        def long_tokenization() -> None:
            with preprocessor._tokenizing:  # what a long request's tokenization holds on the thread
                held.set()
                time.sleep(0.5)

        busy = threading.Thread(target=long_tokenization)
        busy.start()
        held.wait()
        short = asyncio.create_task(embed(gateway, "a short query"))
        started = time.monotonic()
        await asyncio.sleep(0.05)
        assert time.monotonic() - started < 0.3, "the event loop waited for the tokenizer"
        await short
        busy.join()
        assert len(threads) == 1 and threads[0].startswith("ingrain-tokenize"), threads

    _recorded_embeds(hub_models["st"], check, rust=True)


def test_inline_and_threaded_tokenizing_give_the_same_items(hub_models):
    async def main() -> None:
        engine = RunnerEngine(Settings())
        gateway = ModelGateway(engine, Settings(), own_process=True)
        try:
            await gateway.load(s.ModelRequest(name=hub_models["st"]), "sentence_transformers")
            handle = await gateway.handle(s.TextRequest(name=hub_models["st"], text="x"))
            texts = ["a query", "another, longer query about the weather in town"]
            inline = await gateway.inputs.texts(handle, texts, alone=True)
            threaded = await gateway.inputs.texts(handle, texts, alone=False)
            assert len(inline) == len(threaded) == 2
            for a, b in zip(inline, threaded, strict=True):
                np.testing.assert_array_equal(a, b)
        finally:
            await gateway.close()
            await engine.close()

    asyncio.run(asyncio.wait_for(main(), 120))


def test_import_libraries_imports_every_familys_modules_and_survives_a_missing_one(tmp_path: Path, monkeypatch,
                                                                                   caplog):
    (tmp_path / "ingrain_toy_library.py").write_text("IMPORTED = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "ingrain_toy_library", raising=False)

    class Toy:
        name = "toy"
        library_modules = ("ingrain_toy_library_that_is_not_installed", "ingrain_toy_library")

    registry.families()  # the real families first, so the toy joins them
    monkeypatch.setitem(registry._REGISTRY, "toy", Toy())

    async def main() -> None:
        gateway = ModelGateway(RunnerEngine(Settings()), Settings())
        try:
            await gateway.inputs.import_libraries()
        finally:
            await gateway.inputs.close()
            await gateway.fetcher.aclose()

    asyncio.run(main())
    assert sys.modules["ingrain_toy_library"].IMPORTED
    assert "ingrain_toy_library_that_is_not_installed" in caplog.text
    for module in ("sentence_transformers", "open_clip", "timm"):
        assert module in sys.modules
