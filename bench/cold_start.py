"""What a front worker costs before and at its first request: memory, and the first request's wait.

    python bench/cold_start.py [--settle-s 15] [--json FILE]

Starts a real ``bentoml serve`` (one front worker on this machine), reads the front worker's
and the runner's RSS at ready and again after ``--settle-s`` seconds (a front worker imports the
families' libraries in the background once it is ready), then loads all-MiniLM-L6-v2 and times
the first and the second ``/embed_text`` for it: the first one pays whatever the front worker
still has to open (the tokenizer, and the library's import if it was not done ahead).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Server, offline_workdir, place_minilm, proc_status  # noqa: E402

WORK = offline_workdir("ingrain-cold-")


def main() -> None:
    import httpx

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settle-s", type=float, default=15.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    minilm = place_minilm()
    results: dict[str, float] = {}
    server = Server(WORK / "serve.log")
    try:
        front, runner = server.service_pids("ingrain-bento")[0], server.worker_pid()
        results["front_rss_mb_at_ready"] = proc_status(front)["VmRSS"]
        results["runner_rss_mb_at_ready"] = proc_status(runner)["VmRSS"]
        time.sleep(args.settle_s)
        results["front_rss_mb_settled"] = proc_status(front)["VmRSS"]
        server.post("/load_sentence_transformer_model", {"name": minilm})
        for which in ("first", "second"):
            started = time.perf_counter()
            httpx.post(f"{server.url}/embed_text", json={"name": minilm, "text": which},
                       timeout=120).raise_for_status()
            results[f"{which}_embed_ms_after_load"] = (time.perf_counter() - started) * 1000
    finally:
        server.stop()
        shutil.rmtree(WORK, ignore_errors=True)
    for key, value in results.items():
        print(f"{key:30s} {value:9.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
