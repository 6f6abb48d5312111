"""The FastAPI app the front service mounts, and everything HTTP-shaped around the routes.

- one error shape: ``{"message": ...}`` (as Cohere's clients read it too), or OpenAI's
  ``{"error": {...}}`` on the OpenAI routes;
  never BentoML's list body, an HTML page or a stack trace;
- the API key check and the request-size cap, as one ASGI middleware on the whole service
  (BentoML's own ``/metrics`` and ``/docs.json`` included; ``/health``, ``/livez``,
  ``/readyz`` and the API reference, ``/docs`` with its files and ``/openapi.json``, stay open);
- ``json_response``: pydantic's Rust serializer straight to bytes (re-validating a large float
  matrix through FastAPI's response model is the slowest part of a response otherwise).
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from pydantic_core import to_jsonable_python
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ingrain_bento.bentoml_seam import worker_index
from ingrain_bento.errors import IngrainError, TooLarge
from ingrain_bento.front.docs import DOCS_OPEN_PATHS, DOCS_STATIC_PREFIX, DOCS_URL, OPENAPI_URL, add_api_docs
from ingrain_bento.schemas import validation_message
from ingrain_bento.settings import Settings, get_settings

__all__ = ["ALL_METHODS", "OPENAI_PATHS", "OPEN_PATHS", "READ_METHODS", "TOO_LONG", "GuardMiddleware",
           "HeadAsGetMiddleware", "WorkerHeaderMiddleware", "add_fallback_route", "create_app", "error_response",
           "exception_response", "is_open", "json_response"]

log = logging.getLogger("ingrain_bento.http")

TOO_LONG = frozenset({"too_long", "string_too_long"})  # pydantic's error types of a size cap
OPEN_PATHS = frozenset({"/health", "/livez", "/readyz", "/healthz", *DOCS_OPEN_PATHS})
OPENAI_PATHS = ("/v1/embeddings", "/v1/models")  # errors in OpenAI's shape there (/v1/rerank is Cohere's)


READ_METHODS = frozenset({"GET", "HEAD"})


def is_open(path: str, method: str = "GET") -> bool:
    """Whether a request answers without the API key: reads of the probes and of the API reference
    page (``GET /`` redirects to it; ``POST /`` is TEI's inference, and needs the key)."""
    return method in READ_METHODS and (path in OPEN_PATHS or path.startswith(DOCS_STATIC_PREFIX))


JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def json_response(content: Any, status_code: int = 200, exclude_none: bool = False) -> Response:
    """``content`` (a response model, or plain JSON values) as JSON bytes, by orjson: numpy arrays
    (a response's rows, ``schemas.Rows``) are written from their own memory, float32 in its
    shortest form (which reads back into the same float32), with no Python float made per number.
    pydantic's serializer writes what orjson does not know."""
    if isinstance(content, BaseModel):
        content = content.model_dump(by_alias=True, exclude_none=exclude_none)
    return Response(orjson.dumps(content, default=_plain, option=JSON_OPTIONS), status_code=status_code,
                    media_type="application/json")


def _plain(value: Any) -> Any:
    """A value orjson does not know, as JSON values: a model by its aliases, anything else as pydantic writes it."""
    if isinstance(value, BaseModel):
        return value.model_dump(by_alias=True)
    return to_jsonable_python(value)


def error_response(path: str, status_code: int, message: str, error_type: str = "invalid_request_error",
                   headers: dict[str, str] | None = None) -> JSONResponse:
    if path.startswith(OPENAI_PATHS):
        body: dict[str, Any] = {"error": {"message": message, "type": error_type, "code": status_code}}
    else:
        body = {"message": message}
    return JSONResponse(body, status_code=status_code, headers=headers)


def exception_response(path: str, exc: Exception) -> Response:
    """What a route's exception answers: an ``IngrainError`` its status and message; anything
    else a 500 that says it is a bug (logged with its traceback)."""
    if isinstance(exc, IngrainError):
        return error_response(path, exc.status_code, exc.message, exc.error_type, exc.headers())
    log.exception("Unhandled error on %s", path, exc_info=exc)
    return error_response(path, 500, f"Internal error ({type(exc).__name__}); this is a bug, please report it with "
                          "the request that caused it.", "server_error")


def create_app() -> FastAPI:
    app = FastAPI(title="ingrain-bento", description="Ingrain-compatible model server on BentoML.",
                  openapi_url=OPENAPI_URL, docs_url=None, redoc_url=None)  # add_api_docs serves /docs
    add_api_docs(app, OPEN_PATHS)
    app.add_middleware(HeadAsGetMiddleware)

    @app.exception_handler(IngrainError)
    async def _ingrain_error(request: Request, exc: IngrainError) -> Response:
        return exception_response(request.url.path, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        errors = list(exc.errors())
        # a size cap of the schemas (the other branch of a text|list union fails on its type beside it)
        too_large = any(error.get("type") in TOO_LONG for error in errors)
        return error_response(request.url.path, 413 if too_large else 400, validation_message(errors))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        if isinstance(exc.__cause__, IngrainError):  # FastAPI wraps errors raised while reading the body
            return await _ingrain_error(request, exc.__cause__)
        message = {404: f"No route {request.method} {request.url.path}: see the API docs at {DOCS_URL}.",
                   405: f"{request.method} is not allowed on {request.url.path}."}.get(exc.status_code, str(exc.detail))
        return error_response(request.url.path, exc.status_code, message)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> Response:
        return exception_response(request.url.path, exc)

    return app


ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


def add_fallback_route(app: FastAPI) -> None:
    """Register last: an unknown path is a JSON 404, a known path with the wrong method a 405
    (without it, the mounted app's miss falls through to BentoML's plain-text 404)."""
    from starlette.routing import Match

    async def fallback(request: Request) -> Response:
        for route in app.routes:
            if getattr(route, "endpoint", None) is fallback or not hasattr(route, "matches"):
                continue
            if route.matches(request.scope)[0] is Match.PARTIAL:
                raise StarletteHTTPException(405)
        raise StarletteHTTPException(404)

    app.add_api_route("/{path:path}", fallback, methods=ALL_METHODS, include_in_schema=False)


class HeadAsGetMiddleware:
    """HEAD answers wherever GET does, as HTTP says it should: the GET route runs and its status
    and headers go back without the body (a monitor's or a load balancer's ``HEAD /health``).
    FastAPI's routes take only the methods they name (HEAD was a 405), and adding HEAD to their
    methods would list a HEAD operation beside every GET one in the API reference."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def without_body(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, without_body)


class GuardMiddleware:
    """API key (constant-time compare) and request-body cap, before any route runs."""

    def __init__(self, app: ASGIApp, settings: Settings | None = None) -> None:
        settings = settings or get_settings()
        self.app = app
        self.expected = f"Bearer {settings.api_key}".encode() if settings.api_key else None
        self.max_body_bytes = settings.max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        headers = dict(scope["headers"])
        if self.expected is not None and not is_open(path, scope.get("method", "GET")):
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                await self._reject(scope, receive, send, path, 401,
                                   "Missing or wrong API key: send 'Authorization: Bearer <key>'.")
                return
        too_large = f"The request body is over the {self.max_body_bytes}-byte cap: split the request."
        length = headers.get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.max_body_bytes:
            await self._reject(scope, receive, send, path, 413, too_large)
            return
        received = 0

        async def capped_receive() -> Message:
            """Counts a body sent without (or with a false) Content-Length; the route answers 413."""
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise TooLarge(too_large)
            return message

        await self.app(scope, capped_receive, send)

    @staticmethod
    async def _reject(scope: Scope, receive: Receive, send: Send, path: str, status: int, message: str) -> None:
        kind = "authentication_error" if status == 401 else "invalid_request_error"
        await error_response(path, status, message, kind)(scope, receive, send)


class WorkerHeaderMiddleware:
    """``X-Ingrain-Worker: <n>`` on every response: which front worker answered (debugging a
    load balance, and the tests that check every worker answers alike)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.header = (b"x-ingrain-worker", str(worker_index()).encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_worker(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_with_worker)
