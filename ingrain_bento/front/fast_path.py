"""The lean path: a JSON ``POST`` to a gateway route, straight from uvicorn to its endpoint.

BentoML wraps the app it serves in its own layers: Starlette's error middleware, its request
metrics (six Prometheus writes a request), OpenTelemetry (even with every URL excluded), its
timeout (which runs the rest of the request as a second asyncio task), its request context, its
router and the mount; then FastAPI's own middleware, router, dependency solver and body reader.
Measured with ``bench/front_cost.py``, these cost a one-text ``/embed_text`` more CPU than the
whole of our work (README "Front cost per request").

``FastPath`` sits outside all of them (``bentoml_seam.serve_outside_bentoml``) and answers the
routes whose parameters are the gateway and one JSON body (``lean_routes``: every inference
route, read from the FastAPI app, so a new route needs no line here) by calling the route's own
endpoint: the same function, the same schema (pydantic's ``validate_json`` with FastAPI's own
field), the same error shapes (``front.http.exception_response``). What the layers it skips did
for these routes moves here or around it:

- the API key, the body cap, the worker header and ``/metrics``' format: the same middleware,
  now outside ``FastPath`` (``service.py``), for every route;
- BentoML's traffic timeout: ``asyncio.timeout`` around the endpoint (a 504 in our shape);
- BentoML's request series: ``ingrain_http_requests``, ``ingrain_http_request_duration_seconds``
  and ``ingrain_http_requests_in_progress`` (``metrics.HttpMetrics``) count these routes as
  ``bentoml_service_request_*`` count the rest (``ingrain_requests`` per model, as before);
- an invalid body, another content type, any other method or path: the full stack, as before,
  with the body already read handed on, so every refusal reads exactly as it did.

With tracing or the access log on (``INGRAIN_TRACING``, ``INGRAIN_ACCESS_LOG``), BentoML's layers
see every request: ``service.py`` leaves ``FastPath`` out.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from pydantic import TypeAdapter, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ingrain_bento.errors import UpstreamTimeout
from ingrain_bento.front.http import exception_response
from ingrain_bento.metrics import HttpMetrics

__all__ = ["FastPath", "LeanRoute", "lean_routes"]


@dataclass(frozen=True)
class LeanRoute:
    """A route ``FastPath`` answers: its endpoint, and the names and schema of its two parameters."""

    endpoint: Callable[..., Awaitable[Any]]
    gateway_param: str
    body_param: str
    body: TypeAdapter[Any]


def lean_routes(app: FastAPI, gateway: Callable[..., Any]) -> dict[str, LeanRoute]:
    """The app's ``POST`` routes whose only parameters are ``gateway`` (the dependency) and one
    JSON body, by path. The body's schema is FastAPI's own field (its annotation with its
    ``Body(...)``), so a body validates here as it does there."""
    found: dict[str, LeanRoute] = {}
    for route in app.routes:
        if not isinstance(route, APIRoute) or route.methods != {"POST"}:
            continue
        dependant = route.dependant
        if (len(dependant.body_params) != 1 or len(dependant.dependencies) != 1
                or dependant.dependencies[0].call is not gateway or dependant.query_params
                or dependant.path_params or dependant.header_params or dependant.cookie_params):
            continue
        (field,) = dependant.body_params
        schema: Any = Annotated[field.field_info.annotation, field.field_info]  # a type built at run time
        found[route.path] = LeanRoute(route.endpoint, str(dependant.dependencies[0].name), field.name,
                                      TypeAdapter(schema))
    return found


class FastPath:
    """Answers ``routes`` (``lean_routes``) itself; everything else goes to ``app``.

    ``gateway``: the routes' dependency, called as FastAPI would. ``routes`` is read from the
    FastAPI app on the first request (when every route has been added)."""

    def __init__(self, app: ASGIApp, routes: Callable[[], Mapping[str, LeanRoute]],
                 gateway: Callable[[], Awaitable[Any]], timeout_s: float, metrics: HttpMetrics | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self._read_routes = routes
        self._routes: Mapping[str, LeanRoute] | None = None
        self.gateway = gateway
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self._lean_route(scope)
        if route is None:
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        answer = partial(self._answer, route, path, scope, receive, send)
        if self.metrics is None:
            await answer()
        else:
            await self.metrics.counted(path, answer)

    async def _answer(self, route: LeanRoute, path: str, scope: Scope, receive: Receive, send: Send) -> int:
        """Answer one request on the lean path; its status (499: the client went away)."""
        try:
            body = await _read_body(receive)
        except Exception as exc:  # the body cap (GuardMiddleware's receive)
            response = exception_response(path, exc)
            await response(scope, receive, send)
            return response.status_code
        if body is None:
            return 499  # the client went away
        try:
            request = route.body.validate_json(body)
        except ValidationError:
            refused = _Status(send)
            await self.app(scope, _replay(body, receive), refused)  # FastAPI says what is wrong, as ever
            return refused.code
        try:
            async with asyncio.timeout(self.timeout_s):
                response = await route.endpoint(**{route.gateway_param: await self.gateway(),
                                                   route.body_param: request})
        except TimeoutError:
            response = exception_response(path, UpstreamTimeout(
                f"The request took longer than {self.timeout_s:.0f} s: send fewer items per request."))
        except Exception as exc:
            response = exception_response(path, exc)
        await response(scope, receive, send)
        return response.status_code

    def _lean_route(self, scope: Scope) -> LeanRoute | None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return None
        if self._routes is None:
            self._routes = self._read_routes()
        route = self._routes.get(scope["path"])
        if route is None:
            return None
        for name, value in scope["headers"]:
            if name == b"content-type":  # a JSON body; any other (or none) is FastAPI's to refuse
                return route if value.startswith(b"application/json") else None
        return None


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None when the client disconnected first."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class _Status:
    """A send that notes the status it passes on."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.code = 500

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.code = message["status"]
        await self.send(message)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives ``body`` again, then whatever the client sends next (a disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
