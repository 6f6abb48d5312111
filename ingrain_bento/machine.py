"""How many processes of each tier this machine gets, decided before BentoML starts them.

BentoML's own resource probe (``system_resources``: the CPU quota of the container, NVIDIA
devices through NVML) is read once, when the service module is imported; it neither imports
torch nor touches a GPU.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from ingrain_bento.settings import Settings

__all__ = ["default_http_workers", "http_workers", "runner_resources"]

MAX_HTTP_WORKERS = 16


@lru_cache(maxsize=1)
def _probe() -> tuple[float, int]:
    from bentoml._internal.resource import system_resources

    found = system_resources()
    return float(found.get("cpu") or 1), len(found.get("nvidia.com/gpu") or [])


def default_http_workers(cpus: float, gpus: int) -> int:
    """Without a GPU the forwards need the cores: one front worker per 4 cores (1 on 2 cores).
    With one, every core but two (the runner's event loop and its forward thread) prepares
    inputs for it, up to 16: a front worker carries roughly 1-2k single-text requests/s, and
    decoding a 640x480 JPEG costs a few ms of one core (README Performance)."""
    if gpus:
        return max(1, min(MAX_HTTP_WORKERS, int(cpus) - 2))
    return max(1, int(cpus) // 4)


def http_workers(settings: Settings) -> int:
    """``INGRAIN_HTTP_WORKERS``, else the rule above."""
    return settings.http_workers or default_http_workers(*_probe())


def runner_resources(settings: Settings) -> dict[str, Any] | None:
    """One GPU for the runner when the machine has one and ``INGRAIN_DEVICE`` does not pick a
    device by hand, so BentoML (and BentoCloud) place the runner on a GPU and the front on CPUs."""
    return {"gpu": 1} if _probe()[1] and not settings.device else None
