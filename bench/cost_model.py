"""The CPU cost model of the two tiers, measured here, and what it projects for a GPU machine.

    python bench/cost_model.py [--json bench/cost_model_cpu2.json]

What a GPU machine would spend around its forwards is CPU work, and this machine can measure
it: a real ``bentoml serve`` (one front worker, one runner: ``INGRAIN_ENGINE_PROCESS=runner``)
serves models whose forward costs next to nothing (a 2-layer, 32-wide BERT sentence-transformer;
timm's ``test_vit`` at 160 px), under load from bench/loadgen.py in its own process, and /proc
gives each process's CPU time:

- front CPU per request: one text (64 concurrent clients), one 640x480 JPEG (16 clients):
  HTTP, JSON, tokenizing or decoding and preprocessing, the runner call, the response;
- runner CPU per forward and per item, solved from two loads (64 x 1 text and 8 x 64 texts;
  forwards counted by the runner's own statistics), the forward's own CPU included (tiny); per
  image, its CPU here includes the tiny ViT's forward on this CPU, so the projection uses the
  per-forward cost plus the pixels' serde instead;
- latency at concurrency 1: server p50 minus the in-process library's p50 on the same model, with
  the models in the runner and (a second server) in the front worker's own process;
- the hop: 2,000 sequential ``infer`` calls of one tokenized text (and of 64) sent straight to the
  runner with the front's own transport, on the runner's own socket (``frame_socket``) and over
  HTTP (``wire.RunnerTransport``, ``_http``): the round trip minus the runner's own time (its
  ``Server-Timing``, or the socket reply's), p50, and the client's CPU per call;
- serde: encoding and decoding the frames (``wire``) of packed payloads, ms per MB and us per
  item, for token rows, uint8 pixels and float32 rows.

The projection for one H200 with 16 cores uses these costs (this machine's cores, so it errs
low) and the GPU forward rates and library latency measured by ../shared/gpu at 6915698
(MiniLM encode b256 13,110 texts/s fp16; ViT-B-32 forward 23,794 img/s; MiniLM c1 p50
3.8 ms): ``default_http_workers(16, 1)`` front workers each carry 1000 / (front ms per
request) requests/s, the runner's process 1000 / (ms per forward / items per forward + ms per
item) items/s, the GPU its forward rate; the smallest of the three is the projection.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402
    Server,
    cpu_seconds,
    jpegs,
    loadgen,
    offline_workdir,
    place_tiny_st,
    runner_handle,
)

WORK = offline_workdir("ingrain-cost-")
TIMM = "test_vit.r160_in1k::false"
H200 = {"text_forward_per_s": 13110.0, "image_forward_per_s": 23794.0, "library_c1_p50_ms": 3.8, "cores": 16}


def texts(n: int, offset: int = 0) -> list[str]:
    return [f"text number {offset + i} about the weather in a small town" for i in range(n)]


class Meter:
    """CPU seconds of the front workers and the runner, and the runner's forward count, between two reads."""

    def __init__(self, server: Server, model: str) -> None:
        self.server, self.model = server, model
        self.fronts, self.executor = server.service_pids("ingrain-bento"), server.worker_pid()
        self.start = self._read()

    def _read(self) -> tuple[float, float, int]:
        import httpx

        stats = httpx.get(f"{self.server.url}/metrics").json()["modelStats"]
        forwards = sum(int(s["executionCount"]) for s in stats if s["name"] == self.model)
        return sum(cpu_seconds(pid) for pid in self.fronts), cpu_seconds(self.executor), forwards

    def done(self) -> dict[str, float]:
        end = self._read()
        return {"front_s": end[0] - self.start[0], "runner_s": end[1] - self.start[1],
                "forwards": end[2] - self.start[2]}


def under_load(server: Server, model: str, path: str, bodies: list[dict], concurrency: int) -> dict[str, float]:
    loadgen(WORK, f"{server.url}{path}", bodies[: max(32, len(bodies) // 8)], concurrency)  # warm
    meter = Meter(server, model)
    run = loadgen(WORK, f"{server.url}{path}", bodies, concurrency)
    if run["errors"]:
        raise RuntimeError(f"{run['errors']} errors under load: {run}")
    return {**meter.done(), "requests": len(bodies), "requests_per_s": len(bodies) / run["seconds"]}


def c1_p50_ms(server: Server, path: str, body: dict, n: int = 200) -> float:
    import httpx

    with httpx.Client(timeout=60) as client:
        latencies = []
        for _ in range(n):
            started = time.perf_counter()
            client.post(f"{server.url}{path}", json=body).raise_for_status()
            latencies.append((time.perf_counter() - started) * 1000)
    return statistics.median(latencies[n // 10:])


def library_c1_p50_ms(repo: str, n: int = 200) -> float:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(repo, device="cpu")
    latencies = []
    for _ in range(n):
        started = time.perf_counter()
        model.encode(["a single short query text"])
        latencies.append((time.perf_counter() - started) * 1000)
    return statistics.median(latencies[n // 10:])


def serde(items: list, repeat: int = 20) -> dict[str, float]:
    """ms per MB and us per item of encoding and decoding an infer call's frame, as the tiers send it."""
    from ingrain_bento.refs import ModelRef
    from ingrain_bento.wire import CALLS

    codec, ref = CALLS["infer"], ModelRef("timm", "x", None)
    started = time.perf_counter()
    for _ in range(repeat):
        body = codec.encode_args({"ref": ref, "task": "embed_text", "tag": "t", "requests": [items]})
        codec.decode_args(body)
    seconds = (time.perf_counter() - started) / repeat
    megabytes = len(body) / 1e6
    return {"ms_per_mb": seconds * 1000 / megabytes, "us_per_item": seconds * 1e6 / len(items), "mb": megabytes}


def hop(server: Server, model: str, texts_per_call: int, calls: int = 2000, over: str = "socket") -> dict[str, float]:
    """What one call to the runner costs beyond the runner's own time: ``calls`` sequential infer
    calls of ``texts_per_call`` tokenized texts, straight to the runner with the front's transport:
    on the runner's own socket (``over="socket"``, what a front on the same machine uses) or over
    HTTP (``"http"``, BentoML's socket: what services deployed apart use)."""
    import numpy as np

    from ingrain_bento.frame_socket import SocketTransport
    from ingrain_bento.wire import CALLS, RunnerTransport

    address, token = server.runner_address()
    tokens = [np.ones((3, 14), dtype=np.int32)] * texts_per_call  # input_ids, token_type_ids, attention_mask

    async def run() -> dict[str, float]:
        transport = SocketTransport(address, token) if over == "socket" else RunnerTransport(address, token)
        infer = CALLS["infer"]
        handle = await runner_handle(transport, model)
        beyond, cpu_started = [], time.process_time()
        for _ in range(calls):
            started = time.perf_counter()
            body = infer.encode_args({"ref": handle.ref, "task": "embed_text", "tag": handle.tag,
                                      "requests": [tokens]})
            reply = await transport.post("infer", body)
            infer.decode_result(reply.body)
            assert reply.status == 200 and reply.runner_ms is not None, reply
            beyond.append((time.perf_counter() - started) * 1000 - reply.runner_ms)
        cpu_ms = (time.process_time() - cpu_started) * 1000 / calls
        await transport.close()
        return {"p50_ms_beyond_runner": statistics.median(beyond), "p90_ms_beyond_runner":
                sorted(beyond)[int(0.9 * calls)], "client_cpu_ms_per_call": cpu_ms}

    return asyncio.run(run())


def main() -> None:
    import numpy as np

    from ingrain_bento.machine import default_http_workers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    tiny = place_tiny_st()
    out: dict = {}
    query = {"name": tiny, "text": "a single short query text"}
    server = Server(WORK / "serve.log", extra_env={"INGRAIN_ENGINE_PROCESS": "runner"})
    try:
        server.post("/load_sentence_transformer_model", {"name": tiny})
        server.post("/load_timm_model", {"name": TIMM})
        singles = under_load(server, tiny, "/embed_text", [{"name": tiny, "text": t} for t in texts(3000)], 64)
        batches = under_load(server, tiny, "/embed_text",
                             [{"name": tiny, "text": texts(64, 64 * i)} for i in range(60)], 8)
        encoded = [base64.b64encode(b).decode() for b in jpegs(24)]
        images = under_load(server, TIMM, "/embed_image", [{"name": TIMM, "image": encoded[i % 24]}
                                                           for i in range(480)], 16)
        server_c1 = c1_p50_ms(server, "/embed_text", query)
        out["hop_1_text"], out["hop_64_texts"] = hop(server, tiny, 1), hop(server, tiny, 64, calls=500)
        out["hop_1_text_http"] = hop(server, tiny, 1, over="http")
        out["hop_64_texts_http"] = hop(server, tiny, 64, calls=500, over="http")
    finally:
        server.stop()
    in_front = Server(WORK / "serve-front.log", extra_env={"INGRAIN_ENGINE_PROCESS": "front"})
    try:
        in_front.post("/load_sentence_transformer_model", {"name": tiny})
        front_c1 = c1_p50_ms(in_front, "/embed_text", query)
    finally:
        in_front.stop()
    library_c1 = library_c1_p50_ms(tiny)
    shutil.rmtree(WORK, ignore_errors=True)

    # runner CPU = a * forwards + b * items, from the two text loads
    (f1, i1, r1), (f2, i2, r2) = ((singles["forwards"], singles["requests"], singles["runner_s"]),
                                  (batches["forwards"], batches["requests"] * 64, batches["runner_s"]))
    per_item_ms = max(0.0, (r2 * f1 - r1 * f2) / (i2 * f1 - i1 * f2)) * 1000
    per_forward_ms = max(0.0, (r1 * 1000 - per_item_ms * i1) / f1)
    out["front_ms_per_text_request"] = singles["front_s"] * 1000 / singles["requests"]
    out["front_ms_per_64_text_request"] = batches["front_s"] * 1000 / batches["requests"]
    out["front_ms_per_jpeg_request"] = images["front_s"] * 1000 / images["requests"]
    out["runner_ms_per_forward"], out["runner_ms_per_text"] = per_forward_ms, per_item_ms
    out["runner_ms_per_image"] = images["runner_s"] * 1000 / images["requests"]
    out["texts_per_forward_64x1"] = singles["requests"] / max(1, singles["forwards"])
    out["server_requests_per_s_64x1_tiny"] = singles["requests_per_s"]
    out["c1_p50_ms"] = {"server": server_c1, "library": library_c1, "overhead": server_c1 - library_c1,
                        "server_models_in_front": front_c1, "overhead_models_in_front": front_c1 - library_c1}
    out["serde_tokens_64"] = serde([np.ones((3, 14), dtype=np.int32)] * 64)
    out["serde_pixels_64_uint8_224"] = serde([np.zeros((224, 224, 3), dtype=np.uint8)] * 64, repeat=5)
    out["serde_rows_64x384_f32"] = serde([np.zeros(384, dtype=np.float32)] * 64)

    workers, per_forward_items = default_http_workers(H200["cores"], 1), 64
    runner_texts = 1000 / (per_forward_ms / per_forward_items + per_item_ms)
    text_bounds = {"front": workers * 1000 / out["front_ms_per_text_request"], "runner": runner_texts,
                   "GPU": H200["text_forward_per_s"]}
    # The runner's CPU per image on a GPU: its share of a call plus decoding the pixels (here the
    # tiny ViT's forward runs on this CPU too, so runner_ms_per_image is not that number).
    pixel_ms = out["serde_pixels_64_uint8_224"]["us_per_item"] / 1000
    image_bounds = {"front": workers * 1000 / out["front_ms_per_jpeg_request"],
                    "runner": 1000 / (per_forward_ms / per_forward_items + per_item_ms + pixel_ms),
                    "GPU": H200["image_forward_per_s"]}
    out["projection_h200_16_cores"] = {
        "front_workers": workers,
        "one_front_worker_text_requests_per_s": 1000 / out["front_ms_per_text_request"],
        "one_front_worker_jpegs_per_s": 1000 / out["front_ms_per_jpeg_request"],
        "text_256x1_texts_per_s": text_bounds,
        "text_256x1_bound_by": min(text_bounds, key=text_bounds.__getitem__),
        "text_8x64_texts_per_s": min(workers * 1000 / out["front_ms_per_64_text_request"] * 64, runner_texts,
                                     H200["text_forward_per_s"]),
        "image_64x1_per_s": image_bounds,
        "image_64x1_bound_by": min(image_bounds, key=image_bounds.__getitem__),
        "text_c1_p50_ms": H200["library_c1_p50_ms"] + out["c1_p50_ms"]["overhead"],
    }
    for key, value in out.items():
        print(f"{key:36s} {json.dumps(value, default=str)}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
