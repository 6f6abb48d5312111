"""CPU per request of each process, and where the front's goes (README "Front cost per request").

    python bench/front_cost.py [--requests 4000] [--json FILE] [--no-profile] [--server-env KEY=VALUE]

A real ``bentoml serve`` with the models in the runner (``INGRAIN_ENGINE_PROCESS=runner``, one
front worker), 64 keep-alive clients (bench/loadgen.py, its own process), and /proc for each
process's CPU time. For ``GET /health``, ``POST /embed_text`` of one text and of 64 texts, on
all-MiniLM-L6-v2 and on a 2-layer 32-wide BERT whose forward costs next to nothing (so the
runner's figure is its own cost around the forward): CPU milliseconds per request of the front
and of the runner, and the runner's per forward (``ingrain_forward_seconds`` counts the
forwards; its sum, their wall time, is given beside); the runner's own cost per ``infer`` call,
the forward left out: its event loop thread's CPU (forwards run on other threads) per call; and
the tiny model's one-text figures from one client, where each call carries one request, and
beside them, calls sent straight to the runner (a call it answers with no work: the HTTP; one
``infer`` after another) and its own path in this process, without HTTP (``RunnerEngine.infer``
alone and through the gate).

Then, unless ``--no-profile``: the front worker sampled with py-spy under the one-text load and
under the 64-text load (the thread holding the GIL), each sample put in the first stage its stack reaches from the leaf
(``STAGES``: HTTP and middleware, validation, tokenization, the hop, batching, serialization,
metrics, the event loop) and in every layer it is inside (``LAYERS``: uvicorn and BentoML's app,
our middleware, the FastAPI app, the route, the gateway), times the front's CPU per request:
milliseconds per stage and per layer.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402
    ROOT,
    Server,
    add_server_env_option,
    cpu_seconds,
    loadgen,
    metric_totals,
    offline_workdir,
    place_minilm,
    place_tiny_st,
    report,
    runner_handle,
    server_env,
)

WORK = offline_workdir("ingrain-front-cost-")
# Where a stack's time goes, by the first frame from the leaf that matches (file or function).
STAGES: list[tuple[str, re.Pattern[str]]] = [
    ("metrics", re.compile(r"prometheus_client|ingrain_bento/metrics\.py")),
    ("serialization", re.compile(r"model_dump_json|json_response|json/|jsonable|front/outputs\.py|tolist|orjson|"
                                 r"render")),
    ("validation", re.compile(r"pydantic|fastapi/dependencies|fastapi/_compat|validate|schemas\.py")),
    ("tokenization", re.compile(r"tokenizers|transformers/|sentence_transformers|front/inputs\.py|families/")),
    ("hop", re.compile(r"ingrain_bento/wire\.py|ingrain_bento/frame_socket\.py|aiohttp|remote_engine\.py|"
                        r"boundary\.py")),
    ("batching", re.compile(r"ingrain_bento/batching\.py")),
    ("http and middleware", re.compile(r"uvicorn|h11|httptools|starlette|fastapi|_bentoml|bentoml/|front/http\.py|"
                                       r"opentelemetry|anyio")),
    ("gateway and routes", re.compile(r"front/gateway\.py|service\.py|front/task_routes\.py")),
    ("event loop", re.compile(r"asyncio|uvloop|selectors")),
]


def stage_of(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, pattern in STAGES:
            if pattern.search(frame):
                return name
    return "other"


# Layers of the request path, by a frame that marks where each starts: a sample inside a layer
# counts for it and every layer around it (inclusive shares).
LAYERS: list[tuple[str, re.Pattern[str]]] = [
    ("uvicorn and BentoML's app", re.compile(r"httptools_impl\.py")),
    ("our ASGI middleware", re.compile(r"WorkerHeaderMiddleware\.__call__")),
    ("the lean path (front/fast_path.py)", re.compile(r"FastPath\.__call__")),
    ("the FastAPI app", re.compile(r"FastAPI\.__call__")),
    ("FastAPI's route handler (body, validation, endpoint)", re.compile(r"get_request_handler")),
    ("the endpoint", re.compile(r"run_endpoint_function")),
    ("the gateway", re.compile(r"ModelGateway\.")),
]


def profile(pid: int, seconds: int, raw: Path) -> dict[str, dict[str, float]]:
    """The front's samples holding the GIL (py-spy ``--gil``: what its Python costs), as shares
    per stage (exclusive: the first stage from the leaf) and per layer (inclusive)."""
    subprocess.run(["py-spy", "record", "-p", str(pid), "-d", str(seconds), "-r", "400", "--gil", "-f", "raw",
                    "-o", str(raw)], check=True, capture_output=True)
    stages: Counter[str] = Counter()
    layers: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames, n = stack.split(";")[1:], int(count)
        total += n
        stages[stage_of(frames)] += n
        for name, pattern in LAYERS:
            if any(pattern.search(frame) for frame in frames):
                layers[name] += n
    total = total or 1
    return {"stages": {stage: count / total for stage, count in stages.most_common()},
            "layers": {name: layers[name] / total for name, _ in LAYERS}}


def profile_under_load(server: Server, bodies: list[dict], seconds: int, raw: Path) -> dict[str, dict[str, float]]:
    """The front's profile (``profile``) while 64 clients send ``bodies`` to /embed_text."""
    payloads = WORK / "profile.json"
    payloads.write_text(json.dumps(bodies))
    load = subprocess.Popen([sys.executable, str(ROOT / "bench" / "loadgen.py"), "--url", f"{server.url}/embed_text",
                             "--payloads", str(payloads), "--concurrency", "64"], stdout=subprocess.DEVNULL)
    time.sleep(1)
    try:
        return profile(server.service_pids("ingrain-bento")[0], seconds, raw)
    finally:
        load.wait()


def runner_counters(server: Server) -> tuple[float, float, float]:
    """(forwards, their wall seconds, ``infer`` calls answered) so far, from the runner's series
    (``ingrain_forward_seconds``; ``ingrain_http_requests`` of the gate)."""
    totals = metric_totals(server, {"ingrain_forward_seconds_count": {}, "ingrain_forward_seconds_sum": {},
                                    "ingrain_http_requests_total": {"route": "/ingrain/infer"}})
    return (totals["ingrain_forward_seconds_count"], totals["ingrain_forward_seconds_sum"],
            totals["ingrain_http_requests_total"])


def measure(server: Server, url: str, bodies: list[dict], method: str = "POST", clients: int = 64) -> dict[str, float]:
    """CPU ms per request of the front and the runner over ``bodies`` (``clients`` at once), after a warm-up.
    The runner's own cost per call, the forward left out, is its event loop's thread (the main
    thread: the HTTP, the frames, the batcher; forwards run on other threads) per ``infer`` call."""
    loadgen(WORK, url, bodies[:256], clients, method=method)
    front, runner = server.service_pids("ingrain-bento")[0], server.worker_pid()
    time.sleep(1.2)  # the metrics of the warm-up written (metrics.Deferred: once a second)
    forwards_before, wall_before, calls_before = runner_counters(server)
    front_before, runner_before = cpu_seconds(front), cpu_seconds(runner)
    loop_before = cpu_seconds(runner, thread=runner)
    run = loadgen(WORK, url, bodies, clients, method=method)
    front_cpu, runner_cpu = cpu_seconds(front) - front_before, cpu_seconds(runner) - runner_before
    loop_cpu = cpu_seconds(runner, thread=runner) - loop_before
    time.sleep(1.2)
    forwards_after, wall_after, calls_after = runner_counters(server)
    calls = calls_after - calls_before
    assert run["errors"] == 0, run
    n = len(bodies)
    forwards = forwards_after - forwards_before
    return {"front_ms_per_request": front_cpu / n * 1000, "runner_ms_per_request": runner_cpu / n * 1000,
            "runner_ms_per_forward": runner_cpu / forwards * 1000 if forwards else 0.0,
            "runner_loop_ms_per_call": loop_cpu / calls * 1000 if calls else 0.0,
            "runner_loop_ms_per_request": loop_cpu / n * 1000, "runner_calls_per_request": calls / n,
            "forward_wall_ms_per_request": (wall_after - wall_before) / n * 1000,
            "requests_per_s": n / run["seconds"], "loadgen_cpu_ms_per_request": run["cpu_s"] / n * 1000}


def runner_direct(server: Server, model: str, calls: int = 3000) -> dict[str, float]:
    """The runner's event-loop CPU per call for calls sent straight to it, one at a time, with the
    front's own transports, over HTTP (BentoML's socket, ``http_``) and over the runner's own
    socket (``socket_``, ``frame_socket``): a call it answers with no work at all (an unknown call,
    a 404 right after the token check: what the hop itself costs the runner a call, the floor under
    ``runner_loop_ms_per_call``), and a one-text ``infer`` call back to back (no idle time between
    calls). And the client's CPU per call (this process: what the front spends on the hop)."""
    import asyncio

    import numpy as np

    from ingrain_bento.frame_socket import SocketTransport
    from ingrain_bento.wire import CALLS, RunnerTransport

    address, token = server.runner_address()
    runner = server.worker_pid()

    async def per_call(transport: RunnerTransport, method: str, body: bytes, status: int) -> tuple[float, float]:
        for _ in range(200):
            await transport.post(method, body)
        before, client_before = cpu_seconds(runner, thread=runner), time.thread_time()
        for _ in range(calls):
            reply = await transport.post(method, body)
            assert reply.status == status, reply
        return ((cpu_seconds(runner, thread=runner) - before) / calls * 1000,
                (time.thread_time() - client_before) / calls * 1000)

    async def run() -> dict[str, float]:
        out = {}
        transports = {"http": RunnerTransport(address, token), "socket": SocketTransport(address, token)}
        for label, transport in transports.items():
            try:
                handle = await runner_handle(transport, model)
                one_text = CALLS["infer"].encode_args({"ref": handle.ref, "task": "embed_text", "tag": handle.tag,
                                                       "requests": [[np.ones((3, 12), dtype=np.int32)]]})
                kinds = {"floor": ("no-such-call", b"", 404), "infer": ("infer", one_text, 200)}
                for call, (method, body, status) in kinds.items():
                    loop_ms, client_ms = await per_call(transport, method, body, status)
                    out[f"{label}_{call}_loop_ms_per_call"] = loop_ms
                    out[f"{label}_{call}_client_ms_per_call"] = client_ms
            finally:
                await transport.close()
        return out

    return asyncio.run(run())


def runner_in_process(model: str, calls: int = 3000) -> dict[str, float]:
    """The runner's own path without any HTTP server, one request a call, in this process (on
    uvloop, as the runner is): the event-loop thread's CPU per call of ``RunnerEngine.infer`` (the
    pool, the batcher, the forward's hand-off to its thread and back, the forward left out), and
    of the same call through ``RunnerGate`` (the frames both ways, the gate). Metrics are off
    here; the served figure has them, and uvicorn (``runner_direct``)."""
    import uvloop

    from ingrain_bento import schemas
    from ingrain_bento.families import family
    from ingrain_bento.runner.engine import RunnerEngine
    from ingrain_bento.settings import Settings
    from ingrain_bento.store import ModelStore
    from ingrain_bento.wire import CALLS, RunnerGate

    async def run() -> dict[str, float]:
        engine = RunnerEngine(Settings())
        try:
            await engine.load(schemas.ModelRequest(name=model), "sentence_transformers")
            handle = await engine.describe(model, None, "sentence_transformers")
            entry = ModelStore().by_tag(handle.tag)
            assert entry is not None
            items = family("sentence_transformers").load_preprocessor(entry.path, handle.ref).prepare_texts(
                ["text number 7 about the weather in town"])
            body = CALLS["infer"].encode_args({"ref": handle.ref, "task": "embed_text", "tag": handle.tag,
                                               "requests": [items]})

            async def the_engine() -> RunnerEngine:
                return engine

            gate = RunnerGate(None, the_engine, "token")  # type: ignore[arg-type]  # only its calls are made
            scope = {"type": "http", "method": "POST", "path": "/ingrain/infer",
                     "headers": [(b"authorization", b"Bearer token")]}

            async def receive() -> dict[str, object]:
                return {"type": "http.request", "body": body, "more_body": False}

            async def send(message: object) -> None:
                pass

            async def infer() -> None:
                await engine.infer(handle.ref, "embed_text", handle.tag, [items])

            async def through_the_gate() -> None:
                await gate(scope, receive, send)

            out = {}
            for name, call in (("engine_infer", infer), ("through_the_gate", through_the_gate)):
                for _ in range(300):
                    await call()
                started = time.thread_time()
                for _ in range(calls):
                    await call()
                out[f"{name}_loop_ms_per_call"] = (time.thread_time() - started) / calls * 1000
            return out
        finally:
            await engine.close()

    return uvloop.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--seconds", type=int, default=8, help="of the profile")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--profile-out", type=Path, help="keep py-spy's raw samples here")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--minilm-only", action="store_true", help="skip the tiny model's figures")
    add_server_env_option(parser)
    args = parser.parse_args()
    if not args.no_profile and shutil.which("py-spy") is None:
        sys.exit("py-spy is not installed: pip install py-spy (or --no-profile)")
    minilm, tiny = place_minilm(), place_tiny_st()
    env = {"INGRAIN_ENGINE_PROCESS": "runner", "INGRAIN_HTTP_WORKERS": "1", **server_env(args)}
    results: dict = {"server_env": " ".join(f"{k}={v}" for k, v in env.items())}
    server = Server(WORK / "serve.log", extra_env=env)
    try:
        for name in (minilm, tiny):
            server.post("/load_model", {"name": name, "library": "sentence_transformers"})
        n = args.requests
        results["health"] = measure(server, f"{server.url}/health", [{}] * n, method="GET")
        for label, name in (("minilm", minilm), ("tiny", tiny))[:1 if args.minilm_only else 2]:
            one = [{"name": name, "text": f"text number {i} about the weather in town"} for i in range(n)]
            many = [{"name": name, "text": [f"text {i} {j} about the weather in town" for j in range(64)]}
                    for i in range(max(64, n // 32))]
            results[f"{label}_1_text"] = measure(server, f"{server.url}/embed_text", one)
            results[f"{label}_64_texts"] = measure(server, f"{server.url}/embed_text", many)
            if label == "tiny":  # one client: each runner call carries one request
                results["tiny_1_text_1_client"] = measure(server, f"{server.url}/embed_text", one[:n // 4], clients=1)
                results["runner_direct_1_client"] = runner_direct(server, name)
                results["runner_in_process_1_client"] = runner_in_process(name)
        results["ratio_1_text_to_health"] = (results["minilm_1_text"]["front_ms_per_request"]
                                             / results["health"]["front_ms_per_request"])
        if not args.no_profile:
            for texts, label in ((1, "1_text"), (64, "64_texts")):
                bodies = [{"name": minilm, "text": [f"profile text {i} {j} about the weather" for j in range(texts)]}
                          for i in range(n * 4 // texts)]
                raw = args.profile_out.with_suffix(f".{label}.txt") if args.profile_out else WORK / f"{label}.txt"
                shares = profile_under_load(server, bodies, args.seconds, raw)
                per_request = results[f"minilm_{label}"]["front_ms_per_request"]
                results[f"front_stages_ms_{label}"] = {stage: share * per_request
                                                       for stage, share in shares["stages"].items()}
                results[f"front_layers_ms_{label}"] = {name: share * per_request
                                                       for name, share in shares["layers"].items()}
    finally:
        server.stop()
        shutil.rmtree(WORK, ignore_errors=True)
    report(results, args.json)


if __name__ == "__main__":
    main()
