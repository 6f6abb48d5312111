"""Which device a runner's models live on (the threads torch uses there: ``backends.torch``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ingrain_bento.settings import Settings

if TYPE_CHECKING:
    import torch

__all__ = ["pick_device"]


def pick_device(settings: Settings, index: int = 0) -> torch.device:
    """``INGRAIN_DEVICE`` if set, else CUDA device ``index`` (modulo the devices BentoML gave this
    worker: runner ``i`` of ``INGRAIN_RUNNERS`` takes device ``i``), else the CPU."""
    import torch

    if settings.device:
        return torch.device(settings.device)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", index % torch.cuda.device_count())
