"""The torch backend: a family's graphs run as the library's own modules, in eager mode.

On CUDA with ``FP16_ENABLED`` the weights are halved; inputs cross to the device pinned and
non-blocking, integer inputs as int64 (what embedding lookups take), and the outputs come back
to the CPU in the weights' dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ingrain_bento.backends.base import Backend, Graph

if TYPE_CHECKING:
    import numpy as np
    import torch

    from ingrain_bento.backends import BackendChoice

__all__ = ["TorchExecutor", "apply_torch_threads", "open_executor"]


def apply_torch_threads(threads: int | None) -> None:
    """``INGRAIN_TORCH_THREADS``, if set: torch's intra-op threads for every forward."""
    import torch

    if threads:
        torch.set_num_threads(threads)


def open_executor(choice: BackendChoice, graphs: Mapping[str, Graph]) -> TorchExecutor:
    return TorchExecutor(graphs, choice.device, choice.half)


class TorchExecutor:
    backend: Backend = "torch"

    def __init__(self, graphs: Mapping[str, Graph], device: torch.device, half: bool) -> None:
        import torch

        self._device = device
        self.device = str(device)
        self.dtype = "float16" if half else "float32"
        self.graphs: dict[str, Graph] = {}
        modules: list[Any] = []
        for name, graph in graphs.items():
            module = graph.module.eval()
            if half:
                module = module.half()
            graph.module = module.to(device)
            self.graphs[name] = graph
            modules.append(graph.module)
        tensors = {id(t): t for m in modules for t in (*m.parameters(), *m.buffers())}  # shared weights once
        self.memory_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        self._inference = torch.inference_mode

    def run(self, graph: str, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        import numpy as np
        import torch

        spec = self.graphs[graph]
        tensors = []
        for name in spec.inputs:
            array = np.ascontiguousarray(inputs[name])
            tensor = torch.from_numpy(array.astype(np.int64) if array.dtype.kind == "i" else array)
            if self._device.type == "cuda":
                tensor = tensor.pin_memory().to(self._device, non_blocking=True)
            tensors.append(tensor)
        with self._inference():
            out = spec.module(*tensors)
        outputs = out if isinstance(out, tuple) else (out,)
        return [tensor.cpu().numpy() for tensor in outputs]

    def release(self) -> None:
        import torch

        self.graphs.clear()
        if self._device.type == "cuda":
            torch.cuda.empty_cache()
