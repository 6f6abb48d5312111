"""What hostile requests cost a real server: status, time, and the peak memory of each process.

    python bench/hostile.py [--json FILE]

Against one ``bentoml serve`` (defaults; one front worker, one runner) with a timm model loaded:

- 64 PNGs of 6000x6000 (36 MP each, under the 50 MP per-image cap, a few KB each in base64):
  refused from their headers (the request holds 2.3 G pixels, over ``INGRAIN_MAX_REQUEST_PIXELS``);
- 11 of them (396 MP, just under that cap): decoded one at a time each in the front's pool;
- a text holding a lone UTF-16 surrogate; a body over ``INGRAIN_MAX_REQUEST_BYTES``.

For each: the HTTP status, the seconds it took, and how far each process's peak resident memory
(VmHWM) rose; then whether the server still answers ``/health``.
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import struct
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Server, offline_workdir, proc_status  # noqa: E402

WORK = offline_workdir("ingrain-hostile-")
TIMM = "test_vit.r160_in1k::false"


def big_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of ``width`` x ``height`` whose zero pixels compress to a few KB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" + b"\0" * ((width + 7) // 8)
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def attempt(server: Server, name: str, path: str, content: bytes) -> dict:
    import httpx

    pids = {"front": server.service_pids("ingrain-bento")[0], "runner": server.worker_pid()}
    before = {role: proc_status(pid)["VmHWM"] for role, pid in pids.items()}
    started = time.perf_counter()
    response = httpx.post(f"{server.url}{path}", content=content, headers={"content-type": "application/json"},
                          timeout=600)
    seconds = time.perf_counter() - started
    grown = {role: proc_status(pid)["VmHWM"] - before[role] for role, pid in pids.items()}
    message = response.json().get("message", "") if response.status_code != 200 else ""
    return {"case": name, "status": response.status_code, "seconds": round(seconds, 2),
            "peak_rss_growth_mb": {role: round(mb, 1) for role, mb in grown.items()}, "message": message[:160],
            "health_after": httpx.get(f"{server.url}/health").status_code}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    png = base64.b64encode(big_png(6000, 6000)).decode()
    cases = [
        ("64 PNGs of 6000x6000", "/embed_image", json.dumps({"name": TIMM, "image": [png] * 64}).encode()),
        ("11 PNGs of 6000x6000", "/embed_image", json.dumps({"name": TIMM, "image": [png] * 11}).encode()),
        ("a lone surrogate", "/embed_text", b'{"name": "' + TIMM.encode() + b'", "text": "a \\ud800 b"}'),
        ("a 65 MiB body", "/embed_text", b'{"name": "x", "text": "' + b"a" * (65 * 2**20) + b'"}'),
    ]
    results = []
    server = Server(WORK / "serve.log")
    try:
        server.post("/load_timm_model", {"name": TIMM})
        server.post("/embed_image", {"name": TIMM, "image": base64.b64encode(big_png(64, 64)).decode()})  # warm
        for name, path, content in cases:
            results.append(attempt(server, name, path, content))
            print(json.dumps(results[-1]))
    finally:
        server.stop()
        shutil.rmtree(WORK, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
