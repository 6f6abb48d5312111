"""Every family test runs once per engine: the server default (``INGRAIN_BACKEND``) is set to
``torch``, then to ``onnx``, on the one in-process app, and what the first run left resident is
unloaded in between, so each run loads its models with its own engine."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from ingrain_bento.settings import get_settings

from fixtures.compare import ENGINE


@pytest.fixture(scope="session", params=["torch", "onnx"])
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    settings = get_settings()
    before = settings.backend
    settings.backend = request.param
    ENGINE[:] = [request.param]
    yield request.param
    ENGINE.clear()
    settings.backend = before


@pytest.fixture(scope="session")
def client(client: Any, backend: str) -> Iterator[Any]:
    """The in-process app, its models loaded with ``backend``."""
    _unload_all(client)
    yield client
    _unload_all(client)


def _unload_all(client: Any) -> None:
    for model in client.get("/loaded_models").json()["models"]:
        client.post("/unload_model", json={"name": model["id"], "library": model["library"]})


@pytest.fixture(autouse=True)
def _every_model_ran_on_the_engine(client: Any, backend: str) -> Iterator[None]:
    """After each test: what it loaded runs on ``backend``, not on a torch fallback."""
    yield
    for model in client.get("/loaded_models").json()["models"]:
        assert (model["backend"], model["fallback"]) == (backend, None), model
