"""The API reference page: Swagger UI at ``/docs``, served by the server itself.

In-process (the conftest ``client``): the page, its files and its schema answer with the right
types, the HTML names only this server's URLs, every route has an example, and the page stays
open when an API key is set.

In a real browser against a real ``bentoml serve`` with an API key: the page loads with no failed
request and none to another host, lists every route, and "Try it out" (after Authorize) answers 200
on ``GET /health`` and on ``POST /embed_text`` with a loaded fixture model. A screenshot is written to
``$INGRAIN_TEST_ARTIFACTS`` (else the session folder, removed when the session ends). The browser
is Debian's ``chromium`` driven by Playwright: without either the test fails and says how to install.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import re
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from ingrain_bento import schemas, tasks
from ingrain_bento.front.docs import DOCS_URL, OPENAPI_URL, SECURITY_SCHEME

KEY = "docs-page-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
INSTALL_HINT = ("the API page test drives a real browser: install it with `apt-get update && apt-get install -y "
                "chromium` (Debian, as root) and `pip install -e '.[test]'` (Playwright); .ci/run does both")
CONTENT_TYPES = {".css": "text/css", ".js": "javascript", ".png": "image/png", ".json": "application/json"}


# ---- in process ----------------------------------------------------------------------------

def page_urls(html: str) -> list[str]:
    """Every URL the docs HTML makes the browser load: src/href attributes and Swagger UI's ``url:``."""
    return re.findall(r'(?:src|href)="([^"]*)"', html) + re.findall(r"\burl: '([^']*)'", html)


def test_root_redirects_to_the_docs_page(client: Any) -> None:
    response = client.get("/", follow_redirects=False)
    assert response.status_code in (302, 307) and response.headers["location"] == DOCS_URL


def test_docs_page_and_its_files_are_served_here(client: Any) -> None:
    page = client.get(DOCS_URL)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    urls = page_urls(page.text)
    assert {Path(url).suffix for url in urls} == set(CONTENT_TYPES), urls  # the CSS, JS, icon and schema
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), f"{url} is not on this server"
        response = client.get(url)
        assert response.status_code == 200, url
        assert CONTENT_TYPES[Path(url).suffix] in response.headers["content-type"], (url, response.headers)
    assert "SwaggerUIBundle" in client.get(f"{DOCS_URL}/static/swagger-ui-bundle.js").text


def _example(spec: dict[str, Any], path: str) -> dict[str, Any]:
    """The example body a route carries (its ``openapi_examples``)."""
    body = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]
    example: dict[str, Any] = next(iter(body["examples"].values()))["value"]
    return example


def _body_models(schema: dict[str, Any]) -> list[Any]:
    """The request models a route's body schema names: one (``$ref``), or the protocols' bodies a
    route takes (``oneOf``, e.g. /embed: the native body or TEI's); a free JSON object (``POST /``,
    dispatched by its fields) names none: any object then."""
    refs = [schema["$ref"]] if "$ref" in schema else [one["$ref"] for one in schema.get("oneOf", []) if "$ref" in one]
    return [_model_named(ref.rsplit("/", 1)[-1]) for ref in refs] or [None]


def _model_named(name: str) -> Any:
    """A request schema by name: in ``schemas``, or in the task module that declares it."""
    modules = [schemas, *(importlib.import_module(f"ingrain_bento.tasks.{m.name}")
                          for m in pkgutil.iter_modules(tasks.__path__))]
    return next(getattr(module, name) for module in modules if hasattr(module, name))


def _valid(model: Any, value: Any) -> bool:
    if model is None:
        return isinstance(value, dict)
    try:
        model.model_validate(value)
    except ValueError:
        return False
    return True


def test_every_route_has_its_schemas_and_an_example_body(client: Any) -> None:
    spec = client.get(OPENAPI_URL).json()
    scheme = spec["components"]["securitySchemes"][SECURITY_SCHEME]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")  # Swagger UI's Authorize button
    assert spec["paths"]["/health"]["get"]["security"] == []
    with_body = []
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            assert "schema" in operation["responses"]["200"]["content"]["application/json"], (method, path)
            if "requestBody" not in operation:
                continue
            body = operation["requestBody"]["content"]["application/json"]
            assert body.get("examples"), f"{method.upper()} {path} has no example body"
            for example in body["examples"].values():  # the example is a valid request, of one of its bodies
                assert any(_valid(model, example["value"]) for model in _body_models(body["schema"])), (path, example)
            with_body.append(path)
    assert {"/embed_text", "/rerank", "/v2/rerank", "/embed_sparse", "/load_model", "/delete_model"} <= set(with_body)
    assert spec["paths"]["/model_embedding_size"]["get"]["parameters"][0]["examples"]


def test_an_unknown_route_names_the_docs_page(client: Any) -> None:
    response = client.get("/no_such_route")
    assert response.status_code == 404 and f"see the API docs at {DOCS_URL}" in response.json()["message"]


def test_the_page_needs_no_key_and_the_routes_still_do() -> None:
    """GuardMiddleware with a key, around the app (the routes it lets through never reach the gateway)."""
    from starlette.testclient import TestClient

    from ingrain_bento.front.http import GuardMiddleware
    from ingrain_bento.settings import Settings

    import service

    keyed = TestClient(GuardMiddleware(service.app, Settings(api_key=KEY)))
    for path in ("/", DOCS_URL, OPENAPI_URL, f"{DOCS_URL}/static/swagger-ui.css", "/health"):
        assert keyed.get(path, follow_redirects=False).status_code in (200, 307), path
    for path in ("/loaded_models", "/docsx", f"{DOCS_URL}x/static/swagger-ui.css", "/openapi.jsonx"):
        assert keyed.get(path).status_code == 401, path


# ---- in a real browser ---------------------------------------------------------------------

def require_browser() -> tuple[Any, str]:
    """Playwright's sync API and the chromium to drive, or a failure that says how to install them."""
    try:
        from playwright import sync_api
    except ImportError:
        pytest.fail(f"Playwright is not installed: {INSTALL_HINT}")
    executable = CHROMIUM if os.access(CHROMIUM, os.X_OK) else shutil.which("chromium")
    if executable is None:
        pytest.fail(f"{CHROMIUM} is not installed: {INSTALL_HINT}")
    return sync_api, executable


def start_keyed_server(real_server_factory: Any, session_dir: Path, model: str) -> Any:
    """A real server with an API key and the fixture sentence-transformers model loaded."""
    server = real_server_factory(session_dir / "bentoml-docs", env={"INGRAIN_API_KEY": KEY}).start()
    loaded = httpx.post(f"{server.url}/load_model", headers=AUTH, timeout=120,
                        json={"name": model, "library": "sentence_transformers"})
    assert loaded.status_code == 200, loaded.text
    return server


class Traffic:
    """What the page asked for: failures, answers >= 400, and requests to another host (aborted)."""

    def __init__(self, origin: str) -> None:
        self.origin = origin
        self.failed: list[str] = []
        self.errors: list[str] = []
        self.foreign: list[str] = []
        self.script_errors: list[str] = []
        self.seen: list[str] = []

    def watch(self, context: Any, page: Any) -> None:
        context.route("**/*", self.only_here)
        page.on("requestfailed", lambda request: self.failed.append(f"{request.url} {request.failure}"))
        page.on("response", self.on_response)
        page.on("pageerror", lambda error: self.script_errors.append(str(error)))

    def only_here(self, route: Any) -> None:
        """Every request passes here: this server's go on, another host's are aborted and recorded."""
        url = route.request.url
        self.seen.append(url)
        if urlsplit(url).scheme in ("data", "blob") or url.startswith(f"{self.origin}/"):
            route.continue_()
        else:
            self.foreign.append(url)
            route.abort()

    def on_response(self, response: Any) -> None:
        if response.status >= 400:
            self.errors.append(f"{response.status} {response.request.method} {response.url}")

    def check(self) -> None:
        assert f"{self.origin}{DOCS_URL}/static/swagger-ui-bundle.js" in self.seen, self.seen
        assert not self.foreign, f"requests to another host: {self.foreign}"
        assert not self.failed, f"failed requests: {self.failed}"
        assert not self.errors, f"answers >= 400: {self.errors}"
        assert not self.script_errors, f"script errors: {self.script_errors}"


def artifacts_dir(session_dir: Path) -> Path:
    folder = Path(os.environ.get("INGRAIN_TEST_ARTIFACTS") or session_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def operation(page: Any, method: str, path: str) -> Any:
    """The block of one route on the page (collapsed until clicked)."""
    return page.locator(f".opblock-{method}").filter(has=page.locator(f'.opblock-summary-path[data-path="{path}"]'))


def authorize(page: Any) -> None:
    page.locator(".auth-wrapper button.authorize").click()
    dialog = page.locator(".modal-ux")
    dialog.locator("input").fill(KEY)
    dialog.locator("button.authorize").click()
    dialog.locator("button.btn-done").click()


def try_it_out(page: Any, method: str, path: str, edit: Any = None) -> tuple[str, Any, str]:
    """Open a route, press Try it out, let ``edit`` change the example body, Execute.

    Returns the status shown, the response body shown (parsed), and the curl command shown.
    """
    block = operation(page, method, path)
    block.locator(".opblock-summary-control").click()
    block.locator("button.try-out__btn").click()
    if edit is not None:
        body = block.locator("textarea.body-param__text")
        body.fill(json.dumps(edit(json.loads(body.input_value()))))
    block.locator("button.execute").click()
    answer = block.locator(".live-responses-table tr.response")  # the header row has the same cells
    status = answer.locator("td.response-col_status")
    status.wait_for()
    shown = answer.locator(".response-col_description pre.microlight").first.inner_text()
    return status.inner_text().strip(), json.loads(shown), block.locator(".curl-command").inner_text()


def test_the_docs_page_in_a_browser(real_server_factory: Any, hub_models: dict[str, str], session_dir: Path,
                                    tmp_path: Path) -> None:
    sync_api, chromium = require_browser()  # before the server starts: a missing browser fails fast
    server = start_keyed_server(real_server_factory, session_dir, hub_models["st"])
    try:
        screenshot = check_the_page(sync_api, chromium, server.url, hub_models["st"], tmp_path / "chromium-profile",
                                    artifacts_dir(session_dir) / "api-docs-page.png")
    finally:
        server.stop()
    print(f"screenshot: {screenshot}")


def check_the_page(sync_api: Any, chromium: str, url: str, model: str, profile: Path, screenshot: Path) -> Path:
    """Load the page, check its traffic and its route list, Authorize, and try two routes."""
    traffic = Traffic(url)
    spec = httpx.get(f"{url}{OPENAPI_URL}").json()
    spec_paths = spec["paths"]
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=chromium, args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1280, "height": 900})
        page = context.pages[0] if context.pages else context.new_page()  # the window it opened with
        try:
            context.set_default_timeout(30_000)
            traffic.watch(context, page)
            page.goto(f"{url}/")
            assert page.url == f"{url}{DOCS_URL}"
            page.locator(".opblock").first.wait_for()
            for path in ("/embed_text", "/load_model", "/health", "/v1/embeddings", *spec_paths):
                assert page.locator(f'.opblock-summary-path[data-path="{path}"]').is_visible(), path
            authorize(page)
            status, body, curl = try_it_out(page, "get", "/health")
            assert status == "200" and body == {"message": "The model server is running."}
            assert "Authorization" not in curl  # an open route: the schema says so

            expected = _example(spec, "/embed_text")

            def name_the_fixture_model(example: dict[str, Any]) -> dict[str, Any]:
                assert example == expected  # the page starts from the route's example body
                return {**example, "name": model}

            status, body, curl = try_it_out(page, "post", "/embed_text", name_the_fixture_model)
            assert status == "200", body
            assert f"Authorization: Bearer {KEY}" in curl  # sent by Authorize (the server needs it)
            assert len(body["embeddings"]) == len(expected["text"])
        finally:
            page.screenshot(path=str(screenshot), full_page=True)
            context.close()
    traffic.check()
    return screenshot
