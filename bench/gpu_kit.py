"""The GPU check kit (../shared/gpu) adapted to the two tiers: run it on a GPU machine.

    # here, once: the kit beside the project, the wheels the GPU machine lacks
    echo /.gpu/ >> .git/info/exclude; mkdir -p .gpu && cp -r ../shared/gpu .gpu/kit
    ../shared/gpu/fetch-wheels.sh .gpu/whl
    pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \\
        -d .gpu/whl accelerate psutil   # the front opens sentence-transformers on the meta device
    OUT=/tmp/gpu-out INGRAIN_PROJECT=$PWD python bench/gpu_kit.py --quick   # a CPU dry run
    # on the GPU machine (device tool; carry .gpu):
    bash .gpu/kit/run.sh  # the kit's own phases, unchanged: hub,lib,fp16,fp32
    python3 bench/gpu_kit.py --phases fronts,runners   # this file: the front-worker and runner sweeps

The kit's phases use the public API only and run as they are. Its ``workers4`` phase edited
``workers=1`` in service.py to give each HTTP worker its own model copy: with two tiers that
edit would multiply the runner; this file replaces it with ``fronts``: the same loads with
``INGRAIN_HTTP_WORKERS`` at 1, 4, 8 and the machine's default (``default_http_workers``), one
runner, so the figures show how many front workers feed the GPU. ``runners`` runs the same loads
with ``INGRAIN_RUNNERS`` at 1 and at the machine's GPU count (one runner per GPU, each with its own
copy of the models, README "Several runners and replicas"), and ``runners_scaling`` is the second
over the first (the goal: at least 1.9 at 2 GPUs). Figures land in ``$OUT/gpu.json`` beside the kit's.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def load_kit() -> Any:
    for candidate in (ROOT / ".gpu" / "kit" / "bench.py", ROOT.parent / "shared" / "gpu" / "bench.py"):
        if candidate.is_file():
            spec = importlib.util.spec_from_file_location("gpu_kit_bench", candidate)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules["gpu_kit_bench"] = module
            spec.loader.exec_module(module)
            return module
    raise SystemExit("the GPU kit is missing: cp -r ../shared/gpu .gpu/kit")


def sweep_phase(k: Any, n: int, images: list[bytes], procs: int, setups: dict[str, dict[str, str]]) -> None:
    """The kit's helpers (Server, load, texts, fig) with each setup's environment: a tag (the
    figures' prefix) -> the settings."""
    for tag, env in setups.items():
        server = k.Server(tag, {"FP16_ENABLED": "true", **env})
        try:
            k.fig(f"{tag}_ready_s", server.ready_s)
            server.call("POST", "/load_model", {"name": k.MINILM, "library": "sentence_transformers"})
            warm = [json.dumps({"name": k.MINILM, "text": [x]}).encode() for x in k.texts(512, 9_000_000)]
            k.load(server.url + "/embed_text", warm, 256, procs)
            bodies = [json.dumps({"name": k.MINILM, "text": [x]}).encode() for x in k.texts(n, 9_100_000)]
            k.fig(f"{tag}_minilm_256x1", k.load(server.url + "/embed_text", bodies, 256, procs))
            clip = f"{k.CLIP_ARCH}::{k.CLIP_TAG}"
            server.call("POST", "/load_model", {"name": clip, "library": "open_clip"})
            b64 = [json.dumps({"name": clip, "image": [base64.b64encode(b).decode()]}).encode() for b in images]
            k.fig(f"{tag}_clip_img_64x1", k.load(server.url + "/embed_image", b64, 64, procs))
        except Exception as exc:  # noqa: BLE001 - a phase that fails is reported, the next one runs
            k.RESULTS["errors"].append(f"{tag}: {exc!r}")
            k.say(f"ERROR {tag}: {exc!r}")
        finally:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a CPU dry run")
    parser.add_argument("--phases", default="hub,fronts")
    args = parser.parse_args()
    os.environ.setdefault("INGRAIN_PROJECT", str(ROOT))
    kit = load_kit()
    kit.OUT.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    from ingrain_bento.machine import default_http_workers

    cpus = os.cpu_count() or 1
    default = default_http_workers(cpus, 1)
    levels = sorted({1, 2} if args.quick else {1, 4, 8, default})
    n, n_img, procs = (256, 64, 2) if args.quick else (16384, 2048, 8)
    if "hub" in args.phases:
        kit.build_hub(False)
    if "fronts" in args.phases:
        sweep_phase(kit, n, kit.jpegs(n_img), procs,
                    {f"fronts{w}": {"INGRAIN_HTTP_WORKERS": str(w)} for w in levels})
    if "runners" in args.phases:
        gpus = 2 if args.quick else max(2, gpu_count())
        sweep_phase(kit, n, kit.jpegs(n_img), procs, {f"runners{r}": {"INGRAIN_RUNNERS": str(r)} for r in (1, gpus)})
        figures = kit.RESULTS["figures"]
        one, many = figures.get("runners1_minilm_256x1"), figures.get(f"runners{gpus}_minilm_256x1")
        if isinstance(one, dict) and isinstance(many, dict) and one.get("items_per_s"):
            kit.fig("runners_scaling", many["items_per_s"] / one["items_per_s"])


def gpu_count() -> int:
    """NVIDIA GPUs, as BentoML's probe sees them (what ``INGRAIN_RUNNERS`` defaults to)."""
    from ingrain_bento.bentoml_seam import machine_resources

    return machine_resources()[1]


if __name__ == "__main__":
    main()
