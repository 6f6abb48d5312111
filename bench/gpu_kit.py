"""The GPU check kit (../shared/gpu) adapted to the two tiers: run it on a GPU machine.

    # here, once: the kit beside the project, the wheels the GPU machine lacks
    echo /.gpu/ >> .git/info/exclude; mkdir -p .gpu && cp -r ../shared/gpu .gpu/kit
    ../shared/gpu/fetch-wheels.sh .gpu/whl
    pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \\
        -d .gpu/whl accelerate psutil   # the front opens sentence-transformers on the meta device
    OUT=/tmp/gpu-out INGRAIN_PROJECT=$PWD python bench/gpu_kit.py --quick   # a CPU dry run (~3 min on 2 cores)
    # on the GPU machine (device tool; carry .gpu):
    bash .gpu/kit/run.sh  # the kit's own phases, unchanged: hub,lib,fp16,fp32 (installs into /tmp/site)
    PYTHONPATH=/tmp/site python3 bench/gpu_kit.py --phases fronts,runners   # this file's sweeps
    # or this file alone (its own hub, none of the kit's phases), e.g. for the front figures only:
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl
    PYTHONPATH=/tmp/site python3 bench/gpu_kit.py --phases hub,fronts

The kit's phases use the public API only and run as they are. Its ``workers4`` phase edited
``workers=1`` in service.py to give each HTTP worker its own model copy: with two tiers that
edit would multiply the runner; this file replaces it with ``fronts``: ``INGRAIN_HTTP_WORKERS``
at 1, 2, 4 and 8 (``--workers 1,2,4,8,default`` adds the machine's ``default_http_workers``), one
runner holding the models (``INGRAIN_ENGINE_PROCESS=runner``, ``INGRAIN_RUNNERS=1``), so the
figures show how many front workers feed the GPU and what a front worker costs. For each level
``fronts_w<W>_``: 256 clients x one text on MiniLM (``minilm_256x1``, the load's dict, and
``requests_per_s``, ``requests_per_s_per_front_worker``), the CPU the tiers spent over that load
from /proc (bench/harness.py ``descendants``, ``service_of``, ``cpu_seconds``: the ``bentoml
serve`` process's ``ingrain-bento`` and ``ingrain-runner`` workers): ``front_cpu_ms_per_request``
(all front workers together), ``runner_cpu_ms_per_request``, ``front_cores`` and
``runner_cores`` (CPU seconds per second of the load: a tier at its worker count is saturated),
``front_workers`` (the workers found); ``health_front_cpu_ms_per_request`` and
``health_requests_per_s`` (``GET /health``, 64 clients, bench/loadgen.py); then 64 clients x one
JPEG on ViT-B-32 (``clip_img_64x1``). ``fronts_summary`` puts the MiniLM figures of every level
side by side. ``runners`` runs the same loads (without /health) with ``INGRAIN_RUNNERS`` at 1 and
at the machine's GPU count (one runner per GPU, each with its own copy of the models, README
"Several runners and replicas"), and ``runners_scaling`` is the second over the first (the goal:
at least 1.9 at 2 GPUs). Figures land in ``$OUT/gpu.json`` beside the kit's (this file adds to
what is there). ``--quick``: workers 1 and 2, 256 requests a load, 2 load processes.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from harness import cpu_seconds, descendants, loadgen, service_of  # noqa: E402

FRONT, RUNNER = "ingrain-bento", "ingrain-runner"  # the services' names (service.py)


def load_kit() -> Any:
    """The kit's bench.py as a module: ``.gpu/kit`` (the copy carried to the GPU machine), else
    ``../shared/gpu``; what ``$OUT/gpu.json`` already holds (the kit's figures) is kept."""
    for candidate in (ROOT / ".gpu" / "kit" / "bench.py", ROOT.parent / "shared" / "gpu" / "bench.py"):
        if candidate.is_file():
            spec = importlib.util.spec_from_file_location("gpu_kit_bench", candidate)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules["gpu_kit_bench"] = module
            spec.loader.exec_module(module)
            previous = module.OUT / "gpu.json"
            if previous.is_file():
                kept = json.loads(previous.read_text())
                module.RESULTS["figures"].update(kept.get("figures", {}))
                module.RESULTS["errors"].extend(kept.get("errors", []))
                module.RESULTS.update({k: v for k, v in kept.items() if k not in ("figures", "errors")})
            return module
    raise SystemExit("the GPU kit is missing: cp -r ../shared/gpu .gpu/kit")


def tier_pids(root: int, service: str, expected: int, timeout: float = 60.0) -> list[int]:
    """The worker processes of ``service`` under the ``bentoml serve`` process ``root``, once
    ``expected`` of them run (or what runs after ``timeout``: ``front_workers`` says)."""
    deadline = time.monotonic() + timeout
    found: list[int] = []
    while time.monotonic() < deadline:
        found = [pid for pid in descendants(root) if service_of(pid) == service]
        if len(found) >= expected:
            return found
        time.sleep(0.2)
    if not found:
        raise RuntimeError(f"no worker of {service} under {root}")
    return found


def tiers_cpu(pids: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds so far of each tier's processes together (a worker gone is an error: a
    restart in the middle of a load would make the difference meaningless)."""
    try:
        return {tier: sum(cpu_seconds(pid) for pid in group) for tier, group in pids.items()}
    except OSError as exc:
        raise RuntimeError(f"a worker exited during the load: {exc}") from exc


def health_cost(k: Any, server: Any, front: list[int], n: int) -> tuple[float, float]:
    """(front CPU ms per ``GET /health``, requests/s), 64 clients (bench/loadgen.py)."""
    work = k.WORK / "loadgen"
    work.mkdir(parents=True, exist_ok=True)
    loadgen(work, server.url + "/health", [{}] * 256, 64, method="GET")
    before = tiers_cpu({"front": front})["front"]
    run = loadgen(work, server.url + "/health", [{}] * n, 64, method="GET")
    spent = tiers_cpu({"front": front})["front"] - before
    if run["errors"]:
        raise RuntimeError(f"/health: {run['errors']} errors, {run['first_failures']}")
    return round(spent / n * 1000, 3), round(n / run["seconds"], 1)


def sweep_phase(k: Any, n: int, images: list[bytes], procs: int, setups: dict[str, dict[str, str]],
                fronts: int, health: bool = False) -> dict[str, dict[str, float]]:
    """The kit's helpers (Server, load, texts, fig) with each setup's environment: a tag (the
    figures' prefix) -> the settings; ``fronts``: the front workers where a setup does not set
    ``INGRAIN_HTTP_WORKERS``. Returns each tag's MiniLM figures (rates and CPU)."""
    table: dict[str, dict[str, float]] = {}
    for tag, env in setups.items():
        server = k.Server(tag, {"FP16_ENABLED": "true", **env})
        try:
            k.fig(f"{tag}_ready_s", server.ready_s)
            server.call("POST", "/load_model", {"name": k.MINILM, "library": "sentence_transformers"})
            warm = [json.dumps({"name": k.MINILM, "text": [x]}).encode() for x in k.texts(512, 9_000_000)]
            k.load(server.url + "/embed_text", warm, 256, procs)
            workers = int(env.get("INGRAIN_HTTP_WORKERS", fronts))
            pids = {"front": tier_pids(server.proc.pid, FRONT, workers),
                    "runner": tier_pids(server.proc.pid, RUNNER, int(env.get("INGRAIN_RUNNERS", 1)))}
            k.fig(f"{tag}_front_workers", len(pids["front"]))
            bodies = [json.dumps({"name": k.MINILM, "text": [x]}).encode() for x in k.texts(n, 9_100_000)]
            before = tiers_cpu(pids)
            run = k.load(server.url + "/embed_text", bodies, 256, procs)
            after = tiers_cpu(pids)
            k.fig(f"{tag}_minilm_256x1", run)
            if run["errors"]:
                raise RuntimeError(f"/embed_text: {run['errors']} errors, {run['first_errors']}")
            seconds = n / run["req_per_s"]
            row = {"requests_per_s": run["req_per_s"],
                   "requests_per_s_per_front_worker": round(run["req_per_s"] / len(pids["front"]), 1)}
            for tier in ("front", "runner"):
                row[f"{tier}_cpu_ms_per_request"] = round((after[tier] - before[tier]) / n * 1000, 3)
                row[f"{tier}_cores"] = round((after[tier] - before[tier]) / seconds, 2)
            if health:
                row["health_front_cpu_ms_per_request"], row["health_requests_per_s"] = health_cost(
                    k, server, pids["front"], n)
            for name, value in row.items():
                k.fig(f"{tag}_{name}", value)
            table[tag] = row
            clip = f"{k.CLIP_ARCH}::{k.CLIP_TAG}"
            server.call("POST", "/load_model", {"name": clip, "library": "open_clip"})
            b64 = [json.dumps({"name": clip, "image": [base64.b64encode(b).decode()]}).encode() for b in images]
            k.fig(f"{tag}_clip_img_64x1", k.load(server.url + "/embed_image", b64, 64, procs))
        except Exception as exc:  # noqa: BLE001 - a phase that fails is reported, the next one runs
            k.RESULTS["errors"].append(f"{tag}: {exc!r}")
            k.say(f"ERROR {tag}: {exc!r}")
            k.save()
        finally:
            server.stop()
    return table


def main() -> None:
    """Parse the options, then the phases asked for, in order: hub, fronts, runners."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a CPU dry run")
    parser.add_argument("--phases", default="hub,fronts")
    parser.add_argument("--workers", help="the fronts phase's INGRAIN_HTTP_WORKERS levels, comma-separated; "
                                          "'default': the machine's (default: 1,2,4,8; 1,2 with --quick)")
    args = parser.parse_args()
    os.environ.setdefault("INGRAIN_PROJECT", str(ROOT))
    kit = load_kit()
    kit.OUT.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    from ingrain_bento.bentoml_seam import machine_resources
    from ingrain_bento.machine import default_http_workers

    cpus, gpus = machine_resources()
    default = default_http_workers(cpus, gpus)
    kit.RESULTS["gpu_kit_env"] = {"cpus": cpus, "gpus": gpus, "default_http_workers": default, "quick": args.quick}
    levels_arg = args.workers or ("1,2" if args.quick else "1,2,4,8")
    levels = sorted({default if w == "default" else int(w) for w in levels_arg.split(",")})
    n, n_img, procs = (256, 64, 2) if args.quick else (16384, 2048, 8)
    if "hub" in args.phases:
        kit.build_hub(False)
    if "fronts" in args.phases:
        one_runner = {"INGRAIN_ENGINE_PROCESS": "runner", "INGRAIN_RUNNERS": "1"}
        table = sweep_phase(kit, n, kit.jpegs(n_img), procs,
                            {f"fronts_w{w}": {**one_runner, "INGRAIN_HTTP_WORKERS": str(w)} for w in levels},
                            default, health=True)
        kit.fig("fronts_summary", table)
    if "runners" in args.phases:
        count = 2 if args.quick else max(2, gpus)
        sweep_phase(kit, n, kit.jpegs(n_img), procs, {f"runners{r}": {"INGRAIN_RUNNERS": str(r)} for r in (1, count)},
                    default)
        figures = kit.RESULTS["figures"]
        one, many = figures.get("runners1_minilm_256x1"), figures.get(f"runners{count}_minilm_256x1")
        if isinstance(one, dict) and isinstance(many, dict) and one.get("items_per_s"):
            kit.fig("runners_scaling", many["items_per_s"] / one["items_per_s"])


if __name__ == "__main__":
    main()
