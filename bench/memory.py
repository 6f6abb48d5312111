"""Worker RSS drift over repeated load/unload cycles of a ViT-B-32-sized model.

    python bench/memory.py [--cycles 20] [--server-env MALLOC_ARENA_MAX=2 ...] [--json FILE]

Starts a real ``bentoml serve`` (its own store, offline), serves ViT-B-32 random weights as a
custom open_clip checkpoint (``pretrained_name`` "bench-random") from a loopback file server,
then reads the BentoML worker's ``VmRSS`` (``/proc/<pid>/status`` of the child whose cmdline
contains ``_bentoml_impl.worker``):

- baseline: after one warm-up cycle (load + one /embed_image + one /embed_text + unload);
- each of ``--cycles`` cycles: the same four calls, RSS while loaded and after the unload.

Prints one line per cycle, the drift (final RSS after unload - baseline, MB) and the largest
RSS seen, then one JSON line with the figures. ``--server-env KEY=VALUE`` (repeatable) sets
extra environment for the server only, e.g. ``MALLOC_ARENA_MAX=2`` or
``MALLOC_TRIM_THRESHOLD_=131072``, to compare allocator behaviour. Target: drift < 50 MB.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from functools import partial
from http.server import ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import QuietHandler, Server, add_server_env_option, offline_workdir, proc_status, server_env  # noqa: E402

WORK = offline_workdir("ingrain-bench-memory-")


ARCH = "ViT-B-32"
TAG = "bench-random"
MB = 1024 * 1024
TARGET_DRIFT_MB = 50.0


def make_checkpoint(folder: Path) -> Path:
    """ViT-B-32 with open_clip's random init, as a safetensors file (built in a subprocess so
    this process stays small and does not import torch)."""
    path = folder / "vit-b-32-random.safetensors"
    code = (
        "import open_clip, safetensors.torch, sys\n"
        f"m = open_clip.create_model({ARCH!r})\n"
        "safetensors.torch.save_file({k: v.contiguous() for k, v in m.state_dict().items()}, sys.argv[1])\n"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], check=True)
    return path


def small_png() -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 120, 30)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def cycle(server: Server, image: str, pid: int) -> tuple[dict[str, float], dict[str, float], float, float]:
    """Load, embed one image and one text, unload; RSS while loaded and after, seconds, load seconds."""
    started = time.perf_counter()
    server.post("/load_clip_model", {"name": ARCH, "pretrained": TAG})
    load_s = time.perf_counter() - started
    image_rows = server.post("/embed_image", {"name": f"{ARCH}::{TAG}", "image": image})["embeddings"]
    text_rows = server.post("/embed_text", {"name": f"{ARCH}::{TAG}", "text": "an orange square"})["embeddings"]
    assert len(image_rows) == 1 and len(text_rows) == 1 and len(image_rows[0]) == len(text_rows[0]) == 512
    loaded = proc_status(pid)
    server.post("/unload_model", {"name": ARCH, "pretrained": TAG})
    time.sleep(0.2)
    after = proc_status(pid)
    return loaded, after, time.perf_counter() - started, load_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=20)
    add_server_env_option(parser)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    extra_env = server_env(args)

    files = WORK / "files"
    files.mkdir(parents=True)
    begun = time.perf_counter()
    checkpoint = make_checkpoint(files)
    image = small_png()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(files)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    server = Server(WORK / "serve.log", extra_env)
    try:
        pid = server.worker_pid()
        started = proc_status(pid)
        print(f"server env: {extra_env or '(default)'}; worker pid {pid}; RSS at start {started['VmRSS']:.1f} MB",
              flush=True)
        server.post("/download_custom_model", {
            "library": "open_clip", "pretrained_name": TAG,
            "safetensors_url": f"http://127.0.0.1:{httpd.server_address[1]}/{checkpoint.name}"})
        httpd.shutdown()
        loaded, baseline, seconds, load_s = cycle(server, image, pid)  # warm-up: imports, first load, forward
        print(f"warm-up   loaded {loaded['VmRSS']:8.1f} MB   after unload {baseline['VmRSS']:8.1f} MB "
              f"(baseline; anon {baseline['RssAnon']:.1f}, file {baseline['RssFile']:.1f})  "
              f"{seconds:.1f} s (load {load_s:.1f} s)", flush=True)
        rows = []
        for index in range(1, args.cycles + 1):
            loaded, after, seconds, load_s = cycle(server, image, pid)
            rows.append({"cycle": index, "loaded_mb": loaded["VmRSS"], "after_unload_mb": after["VmRSS"],
                         "anon_after_mb": after["RssAnon"], "file_after_mb": after["RssFile"],
                         "threads": after["Threads"], "seconds": seconds, "load_seconds": load_s})
            print(f"cycle {index:3d} loaded {loaded['VmRSS']:8.1f} MB   after unload {after['VmRSS']:8.1f} MB "
                  f"(drift {after['VmRSS'] - baseline['VmRSS']:+7.1f}; anon {after['RssAnon']:.1f}, "
                  f"file {after['RssFile']:.1f}, threads {after['Threads']})  {seconds:.1f} s (load {load_s:.1f} s)",
                  flush=True)
        final = proc_status(pid)
    finally:
        server.stop()
        httpd.server_close()
        log_tail = server.log.read_text()[-1500:] if server.log.exists() else ""
        shutil.rmtree(WORK, ignore_errors=True)
    drift = rows[-1]["after_unload_mb"] - baseline["VmRSS"]
    result = {
        "server_env": extra_env, "cycles": args.cycles, "cpu_count": os.cpu_count(),
        "rss_start_mb": round(started["VmRSS"], 1),
        "baseline_after_unload_mb": round(baseline["VmRSS"], 1),
        "final_after_unload_mb": round(rows[-1]["after_unload_mb"], 1),
        "drift_mb": round(drift, 1),
        "max_after_unload_mb": round(max(r["after_unload_mb"] for r in rows), 1),
        "max_drift_mb": round(max(r["after_unload_mb"] for r in rows) - baseline["VmRSS"], 1),
        "loaded_mean_mb": round(sum(r["loaded_mb"] for r in rows) / len(rows), 1),
        "loaded_max_mb": round(max(r["loaded_mb"] for r in rows), 1),
        "peak_vmhwm_mb": round(final["VmHWM"], 1),
        "anon_drift_mb": round(rows[-1]["anon_after_mb"] - baseline["RssAnon"], 1),
        "file_drift_mb": round(rows[-1]["file_after_mb"] - baseline["RssFile"], 1),
        "seconds_per_cycle": round(sum(r["seconds"] for r in rows) / len(rows), 2),
        "load_seconds_mean": round(sum(r["load_seconds"] for r in rows) / len(rows), 2),
        "total_seconds": round(time.perf_counter() - begun, 1),
        "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
        "target_drift_mb": TARGET_DRIFT_MB, "pass": drift < TARGET_DRIFT_MB,
    }
    print(f"drift (final after unload - baseline): {drift:+.1f} MB   max after unload: "
          f"{result['max_after_unload_mb']:.1f} MB (max drift {result['max_drift_mb']:+.1f} MB)   "
          f"resident while loaded: mean {result['loaded_mean_mb']:.1f} / max {result['loaded_max_mb']:.1f} MB   "
          f"target < {TARGET_DRIFT_MB:.0f} MB: {'PASS' if result['pass'] else 'FAIL'}")
    if not rows or "Traceback" in log_tail:
        print(log_tail, file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({**result, "rows": rows}, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
