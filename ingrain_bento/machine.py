"""How many processes of each tier this machine gets, decided before BentoML starts them.

BentoML's own resource probe (``system_resources``: the CPU quota of the container, NVIDIA
devices through NVML) is read once, when the service module is imported; it neither imports
torch nor touches a GPU.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Literal

from ingrain_bento.bentoml_seam import machine_resources
from ingrain_bento.settings import Settings

__all__ = ["EngineProcess", "RunnerPlace", "default_http_workers", "engine_process", "http_workers", "runner_count",
           "runner_place", "runner_resources"]

EngineProcess = Literal["front", "runner"]
# Where a front finds the runner service: none at all (``Service.to_asgi()``), on this machine (a
# Unix socket or a loopback port from ``bentoml serve``), or elsewhere (services deployed apart).
RunnerPlace = Literal["none", "local", "remote"]

MAX_HTTP_WORKERS = 16


@lru_cache(maxsize=1)
def _probe() -> tuple[float, int]:
    return machine_resources()


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


def runner_count(settings: Settings) -> int:
    """Runner workers on this machine: ``INGRAIN_RUNNERS``, else one per GPU (1 without one, or
    when ``INGRAIN_DEVICE`` picks a device by hand)."""
    if settings.runners:
        return settings.runners
    return max(1, _probe()[1]) if not settings.device else 1


def runner_resources(settings: Settings) -> dict[str, Any] | None:
    """A GPU per runner worker when the machine has them and ``INGRAIN_DEVICE`` does not pick a
    device by hand, so BentoML (and BentoCloud) place the runner on GPUs and the front on CPUs
    (BentoML shows every assigned GPU to every worker; runner ``i`` takes device ``i``)."""
    gpus = _probe()[1]
    return {"gpu": min(gpus, runner_count(settings))} if gpus and not settings.device else None


def runner_place(address: str | None) -> RunnerPlace:
    """Where the runner is, from the address BentoML gives a front (``BENTOML_RUNNER_MAP``)."""
    if address is None:
        return "none"
    if address.startswith("file://"):
        return "local"
    host = address.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0].strip("[]")
    return "local" if host in ("127.0.0.1", "localhost", "::1") else "remote"


def engine_process(settings: Settings, runner: RunnerPlace) -> EngineProcess:
    """Which process holds the models: ``INGRAIN_ENGINE_PROCESS`` when set; else the front's own
    process when there is no runner to call, or when the runner would be on this machine, the
    models run on its CPU and one front worker serves (up to 7 cores by default): there a second
    process only costs a hop, serialization and its CPU on cores the forwards need (README "Two
    tiers", measured); else the runner service. The runner asks with ``runner="local"``: it
    cannot know where its fronts are, and is started by the first call if it guessed wrong."""
    if settings.engine_process == "front" and runner_count(settings) > 1:
        raise ValueError(f"INGRAIN_ENGINE_PROCESS=front holds the models in the front, which has no runners: unset "
                         f"INGRAIN_RUNNERS={runner_count(settings)}, or let the runners hold them.")
    if settings.engine_process == "front" and http_workers(settings) > 1:
        raise ValueError(f"INGRAIN_ENGINE_PROCESS=front needs one front worker, not {http_workers(settings)}: each "
                         "would hold models of its own. Set INGRAIN_HTTP_WORKERS=1, or let the runner hold them.")
    if settings.engine_process != "auto":
        return settings.engine_process
    if runner == "none":
        return "front"
    if runner_count(settings) > 1:
        return "runner"
    on_cpu = settings.device == "cpu" or (not settings.device and not _probe()[1])
    return "front" if runner == "local" and on_cpu and http_workers(settings) == 1 else "runner"
