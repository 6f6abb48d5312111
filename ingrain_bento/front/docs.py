"""The API reference: Swagger UI at ``/docs`` (``/`` redirects there), served by the server itself.

Swagger UI's JavaScript and CSS come from the ``fastapi-swagger`` package (its ``resources``
folder is a copy of an upstream ``swagger-ui-dist`` release), mounted at ``/docs/static``: the
page loads nothing from another host, so it works air-gapped.

FastAPI's OpenAPI document is completed once, on first use:

- an HTTP bearer scheme, so Swagger UI's Authorize button sends ``Authorization: Bearer <key>``
  (optional: a server without ``INGRAIN_API_KEY`` takes requests without it);
The example request of each route lives on the route (``service.py``, FastAPI's
``openapi_examples``): routes that share a model want different values (``/load_clip_model`` and
``/load_timm_model`` both take ``ModelRequest``), so "Try it out" starts from a request that works
for that route. The model names those examples use are here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.staticfiles import StaticFiles

__all__ = ["CLIP", "DOCS_OPEN_PATHS", "DOCS_STATIC_PREFIX", "DOCS_URL", "OPENAPI_URL", "PNG", "RERANKER",
           "SECURITY_SCHEME", "SPLADE", "ST", "TIMM", "add_api_docs", "complete_openapi"]

DOCS_URL = "/docs"
OPENAPI_URL = "/openapi.json"
STATIC_URL = f"{DOCS_URL}/static"
DOCS_STATIC_PREFIX = f"{STATIC_URL}/"
DOCS_OPEN_PATHS = frozenset({"/", DOCS_URL, OPENAPI_URL})  # the page is useless without its schema
SWAGGER_FILES = ("fastapi_swagger", "resources")  # (package, folder) holding swagger-ui-bundle.js and swagger-ui.css
SWAGGER_UI_PARAMETERS: dict[str, Any] = {
    "validatorUrl": None,  # Swagger UI's default sends the schema to validator.swagger.io
    "displayRequestDuration": True,
}
SECURITY_SCHEME = "apiKey"

ST = "intfloat/e5-small-v2"
CLIP = "ViT-B-32::laion2b_s34b_b79k"
TIMM = "resnet50.a1_in1k"
RERANKER = "cross-encoder/ms-marco-MiniLM-L6-v2"
SPLADE = "naver/splade-v3"
PNG = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAAFUlEQVR42mM8ISfHgA0wMeAAg1MCA"
       "NDKARQfGKMRAAAAAElFTkSuQmCC")  # an 8x8 red square

def add_api_docs(app: FastAPI, open_paths: Iterable[str]) -> None:
    """Serve the page, its static files and the ``/`` redirect; complete the app's OpenAPI document.

    Call before any catch-all route: routes match in the order they were added.
    """

    async def docs_page(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=f"{root}{OPENAPI_URL}", title=f"{app.title} API",
            swagger_js_url=f"{root}{STATIC_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{STATIC_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{STATIC_URL}/favicon-32x32.png",
            swagger_ui_parameters=SWAGGER_UI_PARAMETERS,
        )

    async def to_docs(request: Request) -> Response:
        return RedirectResponse(f"{request.scope.get('root_path', '').rstrip('/')}{DOCS_URL}")

    app.add_api_route(DOCS_URL, docs_page, methods=["GET"], include_in_schema=False)
    app.add_api_route("/", to_docs, methods=["GET"], include_in_schema=False)
    app.mount(STATIC_URL, StaticFiles(packages=[SWAGGER_FILES]), name="swagger-ui")
    complete_openapi(app, frozenset(open_paths))


def complete_openapi(app: FastAPI, open_paths: frozenset[str]) -> None:
    """Make ``app.openapi()`` (and so ``/openapi.json``) return FastAPI's document plus auth and examples."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = add_bearer_auth(generate(), open_paths)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def add_bearer_auth(spec: dict[str, Any], open_paths: frozenset[str]) -> dict[str, Any]:
    """Declare the API key (Swagger UI's Authorize button sends it); the open routes need none."""
    spec.setdefault("components", {}).setdefault("securitySchemes", {})[SECURITY_SCHEME] = {
        "type": "http", "scheme": "bearer",
        "description": "The server's INGRAIN_API_KEY, needed only when the server sets one.",
    }
    spec["security"] = [{SECURITY_SCHEME: []}, {}]  # {}: a server without a key takes requests without it
    for path in open_paths:
        for operation in spec["paths"].get(path, {}).values():
            operation["security"] = []
    return spec
