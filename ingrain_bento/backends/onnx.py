"""The ONNX Runtime backend: a family's graphs exported once, with torch's own exporter, and run
by ONNX Runtime.

- **Export** (``export_graphs``, run in a child process by ``runner.export``): each ``Graph``
  through ``torch.onnx.export`` (the TorchScript exporter, opset 17, the graph's dynamic axes),
  then checked: ONNX Runtime and torch run the example inputs, and a batch of another size, and
  their outputs may differ by at most ``EXPORT_TOLERANCE``. A graph that does not export or does
  not match is not used: the model loads with torch, and says why.
- **onnx-int8**: the exported graphs with dynamic int8 quantization of their weights
  (``onnxruntime.quantization.quantize_dynamic``); opt-in, never a default: not exact.
- **Run** (``OnnxExecutor``): one session per graph, on the CPU execution provider, or CUDA's
  when ``onnxruntime-gpu`` is installed and the model's device is a GPU; intra-op threads from
  ``INGRAIN_TORCH_THREADS`` (the setting torch's forwards use), one inter-op thread, every graph
  optimization on, idle threads asleep unless ``INGRAIN_ONNX_SPINNING``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ingrain_bento.backends.base import Backend, Graph

if TYPE_CHECKING:
    import numpy as np

    from ingrain_bento.backends import BackendChoice

__all__ = ["EXPORTER_VERSION", "EXPORT_TOLERANCE", "OPSET", "OnnxExecutor", "export", "export_graphs", "open_executor",
           "quantize_graphs"]

log = logging.getLogger("ingrain_bento.backends.onnx")

OPSET = 17
# Max abs difference, ONNX Runtime vs torch on the same inputs (fp32), per unit of the outputs' scale
# (the largest absolute value, at least 1): raw features of a large model are not unit vectors.
EXPORT_TOLERANCE = 1e-5
# Bumped when the exporter changes what it can export: a failure recorded by an older one is tried again.
EXPORTER_VERSION = 1


def graph_file(folder: Path, name: str) -> Path:
    return folder / f"{name}.onnx"


def _session(path: Path, threads: int | None, device: str, spinning: bool = False) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.inter_op_num_threads = 1
    # Idle intra-op threads sleep instead of spinning for work (INGRAIN_ONNX_SPINNING): on 2 cores
    # shared with the front, spinning cost ~0.6 ms of CPU per text for ~0.9 ms less at concurrency 1.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if threads:
        options.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        index = int(device.partition(":")[2] or 0)
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))  # type: ignore[arg-type]
    return ort.InferenceSession(str(path), options, providers=providers)


def open_executor(choice: BackendChoice, graphs: Mapping[str, Graph]) -> OnnxExecutor:
    """The export's sessions; the graphs' torch modules are dropped (the weights are not needed)."""
    assert choice.export is not None
    executor = OnnxExecutor(choice.export, graphs, choice.backend, str(choice.device), choice.threads, choice.spinning)
    for graph in graphs.values():
        graph.module = None
    return executor


def export(backend: Backend, graphs: Mapping[str, Graph], out: Path, source: Path | None) -> dict[str, Any]:
    """``backend``'s export of ``graphs`` into ``out``: fp32 graphs, or (``onnx-int8``) the fp32
    export in ``source`` quantized."""
    if source is not None:
        return {"graphs": quantize_graphs(graphs, source, out)}
    return {"graphs": export_graphs(graphs, out)}


class OnnxExecutor:
    def __init__(self, folder: Path, graphs: Mapping[str, Graph], backend: Backend, device: str,
                 threads: int | None, spinning: bool = False) -> None:
        """The exported ``graphs`` in ``folder`` (an export's store entry); ``graphs`` gives each
        one's input and output names (their modules are not used)."""
        import onnxruntime as ort

        self.backend = backend
        uses_cuda = device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers()
        self.device = device if uses_cuda else "cpu"
        self.dtype = "int8" if backend == "onnx-int8" else "float32"
        self._outputs = {name: list(graph.outputs) for name, graph in graphs.items()}
        self._inputs = {name: list(graph.inputs) for name, graph in graphs.items()}
        self._sessions = {name: _session(graph_file(folder, name), threads, device, spinning) for name in graphs}
        self.memory_bytes = sum(graph_file(folder, name).stat().st_size for name in graphs)

    def run(self, graph: str, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        feed = {name: inputs[name] for name in self._inputs[graph]}
        outputs: list[np.ndarray] = self._sessions[graph].run(self._outputs[graph], feed)
        return outputs

    def release(self) -> None:
        self._sessions.clear()


# ---- export (in a child process: runner/export.py) ---------------------------------------------

def _other_batch(graph: Graph) -> dict[str, np.ndarray]:
    """The example inputs with the batch axis (axis 0, when dynamic) one item longer."""
    import numpy as np

    out = {}
    for name, array in graph.inputs.items():
        if 0 in graph.dynamic.get(name, {}):
            array = np.concatenate([array, array[-1:]])
        out[name] = array
    return out


def _torch_outputs(graph: Graph, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    import torch

    tensors = [torch.from_numpy(inputs[name]) for name in graph.inputs]
    with torch.inference_mode():
        out = graph.module(*tensors)
    return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]


def export_graphs(graphs: Mapping[str, Graph], folder: Path) -> dict[str, Any]:
    """Export and check every graph into ``folder``; what was measured, per graph. Raises
    ``RuntimeError`` (with the reason) for a graph that does not export or does not match."""
    import numpy as np
    import torch

    report: dict[str, Any] = {}
    for name, graph in graphs.items():
        started = time.perf_counter()
        path = graph_file(folder, name)
        module = graph.module.eval()
        examples = tuple(torch.from_numpy(graph.inputs[key]) for key in graph.inputs)
        fast_path = torch.backends.mha.get_fastpath_enabled()
        try:
            # nn.MultiheadAttention's inference fast path is one fused op the exporter lacks
            # (aten::_native_multi_head_attention): export the plain ops it stands for.
            torch.backends.mha.set_fastpath_enabled(False)
            with torch.no_grad():
                torch.onnx.export(module, examples, str(path), input_names=list(graph.inputs),
                                  output_names=list(graph.outputs), dynamic_axes={k: dict(v) for k, v in
                                                                                 graph.dynamic.items()},
                                  opset_version=OPSET, dynamo=False, do_constant_folding=True)
        except Exception as exc:
            raise RuntimeError(f"torch.onnx.export failed on {name} ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0][:300] if str(exc) else ''})") from None
        finally:
            torch.backends.mha.set_fastpath_enabled(fast_path)
        seconds = time.perf_counter() - started
        session = _session(path, None, "cpu")
        worst, scale = 0.0, 1.0
        for inputs in (dict(graph.inputs), _other_batch(graph)):
            got = session.run(list(graph.outputs), inputs)
            want = _torch_outputs(graph, inputs)
            for a, b in zip(got, want, strict=True):
                if a.shape != b.shape:
                    raise RuntimeError(f"{name}: ONNX Runtime gave shape {a.shape}, torch {b.shape}")
                worst = max(worst, float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max(initial=0.0)))
                scale = max(scale, float(np.abs(b).max(initial=0.0)))
        if worst > EXPORT_TOLERANCE * scale:
            raise RuntimeError(f"{name}: ONNX Runtime differs from torch by {worst:.2e} "
                               f"(more than {EXPORT_TOLERANCE:.0e} of the outputs' scale {scale:.3g})")
        report[name] = {"export_seconds": round(seconds, 3), "bytes": path.stat().st_size, "max_abs_diff": worst}
    return report


def quantize_graphs(graphs: Mapping[str, Graph], source: Path, folder: Path) -> dict[str, Any]:
    """Dynamic int8 quantization of the exported graphs in ``source`` into ``folder``, and how
    close each stays to fp32 on the examples (cosine of the flattened outputs)."""
    import numpy as np
    from onnxruntime.quantization import QuantType, quantize_dynamic

    report: dict[str, Any] = {}
    for name, graph in graphs.items():
        started = time.perf_counter()
        # Per-channel weight scales: MiniLM's rows keep a cosine of 0.989 to fp32 (0.954 per tensor).
        quantize_dynamic(str(graph_file(source, name)), str(graph_file(folder, name)), weight_type=QuantType.QInt8,
                         per_channel=True)
        inputs = dict(graph.inputs)
        exact = _session(graph_file(source, name), None, "cpu").run(list(graph.outputs), inputs)
        quantized = _session(graph_file(folder, name), None, "cpu").run(list(graph.outputs), inputs)
        cosines = []
        for a, b in zip(quantized, exact, strict=True):
            a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
            cosines.append(float(a64 @ b64 / max(np.linalg.norm(a64) * np.linalg.norm(b64), 1e-30)))
        report[name] = {"quantize_seconds": round(time.perf_counter() - started, 3),
                        "bytes": graph_file(folder, name).stat().st_size, "cosine_to_fp32": min(cosines)}
    return report
