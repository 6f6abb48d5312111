"""Which device the runner's models live on, and how many threads torch uses there."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ingrain_bento.settings import Settings

if TYPE_CHECKING:
    import torch

__all__ = ["apply_torch_threads", "pick_device"]


def apply_torch_threads(settings: Settings) -> None:
    """``INGRAIN_TORCH_THREADS``, if set: torch's intra-op threads for every forward."""
    import torch

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)


def pick_device(settings: Settings, index: int = 0) -> torch.device:
    """``INGRAIN_DEVICE`` if set, else CUDA device ``index`` (modulo the devices BentoML gave this
    worker: runner ``i`` of ``INGRAIN_RUNNERS`` takes device ``i``), else the CPU."""
    import torch

    if settings.device:
        return torch.device(settings.device)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", index % torch.cuda.device_count())
