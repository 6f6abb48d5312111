"""The lean path (``front/fast_path.py``): a JSON ``POST`` to a gateway route is answered by the
route's own endpoint before BentoML's layers; everything else, and every refusal of a body, goes
the whole way and reads as it always did."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Annotated, Any

import pytest
from fastapi import Depends, FastAPI
from pydantic import BaseModel, Field
from starlette.responses import Response
from starlette.testclient import TestClient
from starlette.types import Receive, Scope, Send

from ingrain_bento.errors import ModelNotFound
from ingrain_bento.front.fast_path import FastPath, lean_routes
from ingrain_bento.front.http import GuardMiddleware, create_app, json_response
from ingrain_bento.settings import Settings


class Echo(BaseModel):
    name: str = Field(min_length=1)
    count: int = 1


class FakeGateway:
    def __init__(self) -> None:
        self.calls: list[Echo] = []

    async def echo(self, request: Echo) -> dict[str, Any]:
        self.calls.append(request)
        if request.name == "missing":
            raise ModelNotFound("Model missing is not loaded.")
        if request.name == "bug":
            raise RuntimeError("a bug")
        if request.name == "slow":
            await asyncio.sleep(5)
        return {"name": request.name, "count": request.count}


GATEWAY = FakeGateway()


async def gateway() -> FakeGateway:
    return GATEWAY


def build_app() -> FastAPI:
    app = create_app()

    @app.post("/echo")
    async def echo(gw: Annotated[FakeGateway, Depends(gateway)], request: Echo) -> Response:
        return json_response(await gw.echo(request))

    @app.post("/with_query")
    async def with_query(gw: Annotated[FakeGateway, Depends(gateway)], request: Echo, flag: bool = False) -> Response:
        return json_response({"flag": flag})

    @app.get("/read")
    async def read(gw: Annotated[FakeGateway, Depends(gateway)]) -> Response:
        return json_response({"read": True})

    return app


class Recording:
    """The app behind FastPath (BentoML's, in the service): records which requests reach it."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.paths: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.paths.append(scope["path"])
        await self.app(scope, receive, send)


APP = build_app()


@pytest.fixture()
def behind() -> Recording:
    GATEWAY.calls.clear()
    return Recording(APP)


@pytest.fixture()
def fast(behind: Recording) -> Iterator[TestClient]:
    with TestClient(FastPath(behind, lambda: lean_routes(APP, gateway), gateway, timeout_s=0.5)) as client:
        yield client


@pytest.fixture()
def plain() -> Iterator[TestClient]:
    with TestClient(APP, raise_server_exceptions=False) as client:
        yield client


def test_the_lean_routes_are_the_posts_of_the_gateway_and_one_body():
    assert set(lean_routes(APP, gateway)) == {"/echo"}  # not a query parameter beside, not a GET


def test_the_service_answers_every_inference_route_on_the_lean_path():
    import service

    lean = set(lean_routes(service.app, service.gateway))
    assert {"/embed_text", "/infer_text", "/embed_image", "/infer_image", "/embed", "/infer", "/classify_image",
            "/embed_sparse", "/rerank", "/v1/rerank", "/v2/rerank", "/v1/embeddings", "/v1/embed", "/v2/embed",
            "/classify_text", "/predict", "/classify", "/embed_multi_vector", "/"} <= lean
    assert "/health" not in lean and "/loaded_models" not in lean


def test_a_valid_body_is_answered_by_the_endpoint_without_the_app_behind(fast, behind):
    response = fast.post("/echo", json={"name": "a", "count": 3})
    assert response.status_code == 200
    assert response.json() == {"name": "a", "count": 3}
    assert behind.paths == []
    assert GATEWAY.calls == [Echo(name="a", count=3)]


@pytest.mark.parametrize("body", [b'{"count": 2}', b'{"name": ""}', b'{"name": "a", "count": "many"}', b"not json",
                                  b"", b"[1, 2]"])
def test_a_refused_body_reads_exactly_as_without_the_lean_path(fast, plain, behind, body):
    expected = plain.post("/echo", content=body, headers={"content-type": "application/json"})
    response = fast.post("/echo", content=body, headers={"content-type": "application/json"})
    assert response.status_code == expected.status_code == 400
    assert response.json() == expected.json()
    assert behind.paths == ["/echo"], "the app behind saw the same body"
    assert GATEWAY.calls == []


def test_other_content_types_methods_and_routes_go_the_whole_way(fast, plain, behind):
    form = fast.post("/echo", content=b"name=a", headers={"content-type": "application/x-www-form-urlencoded"})
    assert form.json() == plain.post("/echo", content=b"name=a",
                                     headers={"content-type": "application/x-www-form-urlencoded"}).json()
    assert fast.get("/read").json() == {"read": True}
    assert fast.post("/with_query?flag=true", json={"name": "a"}).json() == {"flag": True}
    assert fast.get("/echo").status_code == 405
    assert behind.paths == ["/echo", "/read", "/with_query", "/echo"]


def test_a_body_without_a_content_type_is_refused_as_fastapi_refuses_it(fast, plain, behind):
    response = fast.post("/echo", content=json.dumps({"name": "b"}).encode())
    expected = plain.post("/echo", content=json.dumps({"name": "b"}).encode())
    assert (response.status_code, response.json()) == (expected.status_code, expected.json())
    assert behind.paths == ["/echo"]
    charset = {"content-type": "application/json; charset=utf-8"}
    with_charset = fast.post("/echo", content=b'{"name": "c"}', headers=charset)
    assert with_charset.json() == {"name": "c", "count": 1}
    assert behind.paths == ["/echo"], "a JSON body with a charset is on the lean path"


def test_the_endpoints_errors_keep_their_status_and_shape(fast, plain):
    for name in ("missing", "bug"):
        response, expected = fast.post("/echo", json={"name": name}), plain.post("/echo", json={"name": name})
        assert (response.status_code, response.json()) == (expected.status_code, expected.json())
    assert fast.post("/echo", json={"name": "missing"}).status_code == 404
    assert "this is a bug" in fast.post("/echo", json={"name": "bug"}).json()["message"]


def test_a_request_past_the_timeout_is_a_504_and_the_next_is_served(fast):
    response = fast.post("/echo", json={"name": "slow"})
    assert response.status_code == 504
    assert "took longer than" in response.json()["message"]
    assert fast.post("/echo", json={"name": "after"}).status_code == 200


def test_the_api_key_and_the_body_cap_still_hold_before_it(behind):
    settings = Settings(api_key="k3y", max_request_bytes=64)
    guarded = GuardMiddleware(FastPath(behind, lambda: lean_routes(APP, gateway), gateway, timeout_s=5), settings)
    with TestClient(guarded) as client:
        assert client.post("/echo", json={"name": "a"}).status_code == 401
        keyed = {"Authorization": "Bearer k3y"}
        assert client.post("/echo", json={"name": "a"}, headers=keyed).status_code == 200
        big = {"name": "x" * 100}
        assert client.post("/echo", json=big, headers=keyed).status_code == 413
        chunked = client.post("/echo", content=iter([json.dumps(big).encode()]), headers=keyed)  # no Content-Length
        assert chunked.status_code == 413
        assert "byte cap" in chunked.json()["message"]
    assert GATEWAY.calls == [Echo(name="a")]


def test_the_service_serves_the_lean_path_outside_bentomls_app(client):
    """``serve_outside_bentoml``: what BentoML's worker serves is our layers around its app."""
    from ingrain_bento.front.http import WorkerHeaderMiddleware

    import service

    app = service.IngrainBento.to_asgi()
    assert isinstance(app, WorkerHeaderMiddleware)
    layers = []
    while hasattr(app, "app"):
        layers.append(type(app).__name__)
        app = app.app
    assert layers[:4] == ["WorkerHeaderMiddleware", "GuardMiddleware", "MetricsFormatMiddleware", "FastPath"]
    assert type(service.IngrainRunner.to_asgi()).__name__ == "RunnerGate", "the runner's own layer, in front"


def test_what_it_answers_is_counted_as_bentomls_layers_counted_it(behind):
    """``ingrain_http_*{service}``: each answer by route and status, its time, those in progress."""
    from prometheus_client import REGISTRY

    from ingrain_bento.metrics import HttpMetrics

    metrics = HttpMetrics("fast-path-test")

    def answered(code: str) -> float:
        labels = {"service": "fast-path-test", "route": "/echo", "code": code}
        return REGISTRY.get_sample_value("ingrain_http_requests_total", labels) or 0.0

    lean = FastPath(behind, lambda: lean_routes(APP, gateway), gateway, timeout_s=5, metrics=metrics)
    with TestClient(lean) as client:
        for body in ({"name": "a"}, {"name": "b"}, {"name": "missing"}, {"count": 1}):
            client.post("/echo", json=body)
        client.get("/read")  # not on the lean path: BentoML's layers count it
    metrics.flush()
    assert (answered("200"), answered("404"), answered("400")) == (2, 1, 1)
    assert REGISTRY.get_sample_value("ingrain_http_request_duration_seconds_count",
                                     {"service": "fast-path-test", "route": "/echo"}) == 4
    assert REGISTRY.get_sample_value("ingrain_http_requests_in_progress", {"service": "fast-path-test"}) == 0
    assert metrics.in_progress == 0
