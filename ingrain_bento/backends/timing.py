"""``auto`` measured on the machine: torch against the exported backend, timed once per model.

Which backend is faster depends on the model (its size, its ops, its input lengths) and on the
machine (cores, instruction set, ONNX Runtime's kernels for it), so a fixed table can only guess.
When a model's export for a backend ``auto`` may pick is made (``runner.export``, in its child
process, which has both the model's torch modules and the exported graphs at hand), both
backends run the model's graphs at its typical inputs, a few seconds at most, and the figures are
kept in the export's report in the store (``report["timing"]``), with the device type they were
measured on. ``pick_auto`` then reads them: ``auto`` loads the faster one on that device type.

- **Inputs**: each graph's own example input (the family's probe, made by the model's tokenizer
  and transforms), as one item and as a batch: up to ``TEXT_BATCH`` texts of ``TEXT_TOKENS`` tokens
  (token axes that vary are tiled to that length; a fixed context, open_clip's 77, stays), or up
  to ``IMAGE_BATCH`` images at the model's input size; fewer (at least 2) where one item is slow
  enough that the batch would not fit the budget (all-MiniLM-L6-v2: 32 texts; ViT-B-32: a few).
- **Runs**: each backend warmed once per shape, then the backends run in turn, each first every
  other round (so a noisy moment costs both alike), up to ``RUNS`` times or until the case's share
  of ``BUDGET_S`` is spent (at least once each; ``ONE_ITEM_RUNS`` times for one item, whose figure
  sizes the batch, unless that takes twice the share). The figure is each backend's fastest run,
  summed over the model's graphs (open_clip: both towers): the export runs beside the models the
  server is serving, and on a busy machine a median took their noise (a one-item median of 0.3 ms
  once read 82 ms on 2 shared cores); the fastest run is the one least disturbed, the backend's
  own cost.
- **Pick** (``pick_auto``): per backend, the batch figure plus the one item figure; torch when its
  sum is more than ``MARGIN`` below the table's backend's, else the table's backend.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ingrain_bento.backends.base import Backend, Executor, Graph

if TYPE_CHECKING:
    import numpy as np

__all__ = ["BUDGET_S", "CASES", "IMAGE_BATCH", "MARGIN", "ONE_ITEM_RUNS", "RUNS", "TEXT_BATCH", "TEXT_TOKENS",
           "AutoPick", "describe_timing", "pick_auto", "time_backends"]

BUDGET_S = 4.0  # the whole timing of one model, all graphs, both cases, both backends (soft: one run each at least)
TEXT_BATCH = 32  # texts in the batch case
TEXT_TOKENS = 32  # tokens per text there (a sentence or two; the batchers split longer texts' batches anyway)
IMAGE_BATCH = 8  # images in the batch case, at most
RUNS = 20  # timed runs per backend and case, at most
ONE_ITEM_RUNS = 3  # timed runs of one item at least, whatever the budget: they size the batch
CASES = ("batch", "one")  # what the pick adds up: a batch and one item
MARGIN = 0.1  # the other backend must be this much faster than the table's to be picked instead


@dataclass(frozen=True)
class AutoPick:
    """What ``auto`` loads a model with on one device type, and the figure it picked on."""

    backend: Backend
    device: str  # the device type it is for ("cpu", "cuda")
    why: str
    ms: Mapping[str, float] = field(default_factory=dict)  # the deciding figure per backend ({}: not measured)


def pick_auto(table: Backend, device_type: str, report: Mapping[str, Any] | None) -> AutoPick:
    """``auto``'s backend for one model on ``device_type``: of torch and ``table`` (the backend
    ``backends.AUTO`` names there), the faster as timed when ``table``'s export was made
    (``report``: that export's report), when it was timed on this device type; torch when the model
    has no such export (it failed); else ``table``, the fixed table's guess.

    The figure is a batch plus one item (a server under load runs batches; one alone waits on the
    one-item time), and the other backend must beat ``table`` by ``MARGIN``: within it, two timings of
    one model on a busy machine could pick either, and the table (measured per family) stays."""
    if table == "torch":
        return AutoPick("torch", device_type, f"backends.AUTO: torch on {device_type}")
    if report is not None and report.get("failure"):
        return AutoPick("torch", device_type, f"it has no {table} export: {report['failure']}")
    timing = (report or {}).get("timing") or {}
    cases = timing.get("cases") or {}
    timed = all({"torch", table} <= set((cases.get(case) or {}).get("ms", {})) for case in CASES)
    if timing.get("device") != device_type or not timed:
        measured = timing.get("failure") or (f"measured on {timing['device']} only" if timing.get("device")
                                            else "not timed here")
        return AutoPick(table, device_type, f"backends.AUTO: {table} on {device_type} ({measured})")
    ms = {backend: round(sum(float(cases[case]["ms"][backend]) for case in CASES), 3) for backend in ("torch", table)}
    picked = "torch" if ms["torch"] < ms[table] * (1 - MARGIN) else table
    return AutoPick(picked, device_type, describe_timing(timing, picked, "torch" if picked == table else table), ms)


def describe_timing(timing: Mapping[str, Any], picked: Backend, other: Backend) -> str:
    """One line: the deciding figures, each case's, and what they were measured on: ``onnx 313.3 ms
    vs torch 864.4 ms for a batch and one item (forward: 32 x 32 tokens) on cpu, 2 threads: batch
    311.1 vs 762.6 ms, one item 2.2 vs 101.8 ms``."""
    batch, one = timing["cases"]["batch"], timing["cases"]["one"]
    shapes = ", ".join(f"{name}: {graph['items']} x {graph['item']}" for name, graph in batch["graphs"].items())
    total = {backend: batch["ms"][backend] + one["ms"][backend] for backend in (picked, other)}
    line = (f"{picked} {total[picked]:.1f} ms vs {other} {total[other]:.1f} ms for a batch and one item ({shapes}) "
            f"on {timing['device']}, {timing['threads']} threads: batch {batch['ms'][picked]:.1f} vs "
            f"{batch['ms'][other]:.1f} ms, one item {one['ms'][picked]:.1f} vs {one['ms'][other]:.1f} ms")
    if picked != "torch" and total[picked] > total[other]:
        line += f" (torch is not {MARGIN:.0%} faster: the table's pick stays)"
    return line


# ---- measuring (in the export's child process: runner/export.py) -------------------------------

def time_backends(graphs: Mapping[str, Graph], backend: Backend, export: Path, threads: int | None,
                  spinning: bool = False, budget_s: float = BUDGET_S) -> dict[str, Any]:
    """Time torch and ``backend`` (its export in ``export``) on the CPU, on each graph's typical
    inputs: ``{"device", "threads", "seconds", "cases": {"one" | "batch": {"ms": {backend: ms},
    "graphs": {name: {"items", "item"}}}}}``."""
    import torch

    from ingrain_bento.backends import BackendChoice

    started = time.perf_counter()
    cpu = torch.device("cpu")
    # Each backend gets graphs of its own: the ONNX backend drops the modules of the graphs it opens.
    executors: dict[Backend, Executor] = {
        "torch": BackendChoice("torch", cpu, False, threads).executor({k: replace(g) for k, g in graphs.items()}),
        backend: BackendChoice(backend, cpu, False, threads, export, spinning).executor(
            {k: replace(g) for k, g in graphs.items()}),
    }
    share = budget_s / max(1, len(graphs))
    cases: dict[str, dict[str, Any]] = {"one": {"ms": {}, "graphs": {}}, "batch": {"ms": {}, "graphs": {}}}
    for name, graph in graphs.items():
        typical = _typical(graph)
        one = _rows(graph, typical, 1)
        ms = _time(executors, name, one, share / 4, ONE_ITEM_RUNS)
        _add(cases["one"], name, graph, one, ms)
        items = _batch_items(graph, typical, max(ms.values()), share * 3 / 4)
        batch = _rows(graph, typical, items)
        _add(cases["batch"], name, graph, batch, _time(executors, name, batch, share * 3 / 4))
    for executor in executors.values():
        executor.release()
    return {"device": "cpu", "threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - started, 3),
            "cases": cases}


def _is_tokens(array: np.ndarray) -> bool:
    return array.dtype.kind in "iu" and array.ndim == 2


def _typical(graph: Graph) -> dict[str, np.ndarray]:
    """One item of typical length: the example's last item (the family's longer probe text), its
    varying token axis tiled to ``TEXT_TOKENS`` (the values do not change the cost)."""
    import numpy as np

    out = {}
    for name, array in graph.inputs.items():
        row = array[-1:] if 0 in graph.dynamic.get(name, {}) else array
        if _is_tokens(row) and 1 in graph.dynamic.get(name, {}) and row.shape[1] < TEXT_TOKENS:
            row = np.take(row, np.arange(TEXT_TOKENS) % row.shape[1], axis=1)
        out[name] = np.ascontiguousarray(row)
    return out


def _rows(graph: Graph, typical: Mapping[str, np.ndarray], items: int) -> dict[str, np.ndarray]:
    """``items`` copies of the typical item (inputs whose batch axis is fixed stay as they are)."""
    import numpy as np

    return {name: np.repeat(array, items, axis=0) if 0 in graph.dynamic.get(name, {}) else array
            for name, array in typical.items()}


def _batch_items(graph: Graph, typical: Mapping[str, np.ndarray], one_ms: float, share_s: float) -> int:
    """The batch case's size: as many items (at most ``TEXT_BATCH`` texts or ``IMAGE_BATCH``
    images, at least 2: a batch) as fit the share with a warm run and two timed ones per backend,
    each item costing the slower backend's one-item time (an upper bound: batched, an item costs
    less)."""
    cap = TEXT_BATCH if _is_tokens(next(iter(typical.values()))) else IMAGE_BATCH
    fits = int(share_s * 1000 / (2 * 3 * max(one_ms, 1e-3)))
    return max(2, min(cap, fits))


def _time(executors: Mapping[Backend, Executor], graph: str, inputs: Mapping[str, np.ndarray],
          share_s: float, at_least: int = 1) -> dict[Backend, float]:
    """The fastest of the timed forwards of ``graph`` (ms) per backend, the backends in turn, until
    ``share_s`` (the warm runs included) is spent, after ``at_least`` runs each unless that would
    take twice the share (one run each, always)."""
    deadline = time.perf_counter() + share_s
    cutoff = deadline + share_s
    for executor in executors.values():
        executor.run(graph, inputs)  # warm: the first run at a shape allocates
    runs: dict[Backend, list[float]] = {backend: [] for backend in executors}
    order = list(executors.items())
    for done in range(1, RUNS + 1):
        # Each backend goes first every other round: neither always runs in the other's wake (torch's
        # OpenMP threads spin a moment after a forward).
        for backend, executor in order if done % 2 else order[::-1]:
            started = time.perf_counter()
            executor.run(graph, inputs)
            runs[backend].append((time.perf_counter() - started) * 1000)
        now = time.perf_counter()
        if (done >= at_least and now > deadline) or now > cutoff:
            break
    return {backend: min(times) for backend, times in runs.items()}


def _add(case: dict[str, Any], name: str, graph: Graph, inputs: Mapping[str, np.ndarray],
         ms: Mapping[Backend, float]) -> None:
    """Add one graph's figures to a case: its ms summed into the case's, and what it ran on."""
    first = next(iter(inputs.values()))
    item = f"{first.shape[1]} tokens" if _is_tokens(first) else "x".join(map(str, first.shape[1:]))
    case["graphs"][name] = {"items": int(first.shape[0]), "item": item}
    for backend, value in ms.items():
        case["ms"][backend] = round(case["ms"].get(backend, 0.0) + value, 3)
