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


def pick_device(settings: Settings) -> torch.device:
    """``INGRAIN_DEVICE`` if set, else the first CUDA device BentoML gave this worker, else the CPU."""
    import torch

    if settings.device:
        return torch.device(settings.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
