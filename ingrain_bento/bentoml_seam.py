"""Every use of BentoML's private API, in one place: a BentoML upgrade that moves one of them
changes this file only (``tests/test_bentoml_seam.py`` checks each against the installed BentoML).

BentoML's public API (``bentoml.service``, ``bentoml.depends``, ``bentoml.models``,
``bentoml.server_context``) is used where it belongs; these are the values it does not expose:

- ``machine_resources``: the CPUs and NVIDIA GPUs BentoML found (its resource probe: the
  container's CPU quota, devices through NVML; it imports no torch and touches no GPU);
- ``bentoml_home``: ``$BENTOML_HOME`` as BentoML resolved it for this process;
- ``dependency_address``: the address BentoML gives this worker for a dependency service
  (``BENTOML_RUNNER_MAP``: a ``file://`` Unix socket under ``bentoml serve``, a URL when the
  services run apart);
- ``worker_index``: which worker of its service this process is (public, kept here beside the
  rest of what a process asks BentoML about itself);
- ``serve_outside_bentoml``: ASGI layers around the whole app BentoML builds for a service, so
  that they run before BentoML's own middleware (``front/fast_path.py`` says why). BentoML
  offers ``add_asgi_middleware``, but places those inside its metrics, tracing and timeout
  layers; its worker serves ``service.to_asgi()`` (public), which this wraps.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp

__all__ = ["bentoml_home", "dependency_address", "machine_resources", "serve_outside_bentoml", "worker_index"]


def machine_resources() -> tuple[float, int]:
    """(CPUs, NVIDIA GPUs) as BentoML's resource probe sees this machine or container."""
    from bentoml._internal.resource import system_resources

    found = system_resources()
    return float(found.get("cpu") or 1), len(found.get("nvidia.com/gpu") or [])


def bentoml_home() -> Path:
    """``$BENTOML_HOME``, as BentoML resolved it for this process."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    return Path(BentoMLContainer.bentoml_home.get())


def dependency_address(service_name: str) -> str | None:
    """The address of the dependency service ``service_name`` for this worker, or None when
    there is none (``Service.to_asgi()``, or a worker of a service without that dependency)."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    address: str | None = BentoMLContainer.remote_runner_mapping.get().get(service_name)
    return address


def worker_index() -> int:
    """This process's worker index within its service (0 outside ``bentoml serve``)."""
    from bentoml import server_context

    return int(server_context.worker_index or 0)


def serve_outside_bentoml(service: Any, wrap: Callable[[ASGIApp], ASGIApp]) -> None:
    """Serve ``wrap(app)`` for ``service``, where ``app`` is what BentoML builds for it: every
    request (and the lifespan) reaches ``wrap``'s layers first. A BentoML service is a slotted
    class: the method is replaced on the class, for this one service."""
    cls = type(service)
    original = cls.to_asgi

    def to_asgi(self: Any, *args: Any, **kwargs: Any) -> ASGIApp:
        app: ASGIApp = original(self, *args, **kwargs)
        return wrap(app) if self is service else app

    cls.to_asgi = to_asgi
