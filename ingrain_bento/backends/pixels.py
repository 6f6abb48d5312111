"""``PixelGraph``: the part of an image model's graph (``backends.Graph``) that every family shares.

It runs an image model on the uint8 HWC pixels the front sends: it converts them
as torchvision's ``ToTensor`` + ``Normalize`` do (the same float32 operations, so rows equal the
library's), then calls the model. Inside the graph, the conversion runs where the model runs:
on the GPU for torch there, fused into the graph for ONNX Runtime.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ingrain_bento.families.base import ImagePipeline

__all__ = ["PixelGraph", "weights_dtype"]


def weights_dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


class PixelGraph(torch.nn.Module):
    """``forward(pixels)``: ``call(model, normalized pixels)`` for a batch of uint8 NHWC pixels
    (or float32 NCHW ones, for a transform the front runs whole)."""

    def __init__(self, model: torch.nn.Module, pipeline: ImagePipeline,
                 call: Callable[[Any, torch.Tensor], Any]) -> None:
        super().__init__()
        self.model = model
        self.call = call
        self.mean_std = (pipeline.mean, pipeline.std) if pipeline.mean is not None else None
        # float32 on each device, made once: not buffers, which ``.half()`` would round (the
        # conversion runs in float32, as torchvision's does; only its result takes the weights' dtype)
        self._constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _mean_std(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._constants:
            assert self.mean_std is not None
            mean, std = (torch.tensor(v, dtype=torch.float32, device=device).view(1, -1, 1, 1) for v in self.mean_std)
            self._constants[device] = (mean, std)
        return self._constants[device]

    def forward(self, pixels: torch.Tensor) -> Any:
        if self.mean_std is not None:
            scaled = pixels.permute(0, 3, 1, 2).to(torch.float32).div(255)
            mean, std = self._mean_std(scaled.device)
            pixels = (scaled - mean) / std
        return self.call(self.model, pixels.to(weights_dtype(self.model)))
