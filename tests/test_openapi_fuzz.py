"""Property-based fuzzing of every typed route with schemathesis: no input may cause a 5xx.

The schema is the FastAPI app's own OpenAPI document (the one ``/openapi.json`` serves; the
module fixture checks that the served one is the same). Requests go through the conftest
``client`` (``TestClient(IngrainBento.to_asgi())``): one in-process app, one event loop, no
socket. Before fuzzing, one tiny timm model (random weights) and one sentence-transformers
model from the offline hub cache are loaded, and every generated inference request is also
sent once per loaded model (and once with a decodable image), so its other fields reach real
model code rather than stopping at "model not found".

Nothing can leave the machine: ``ingrain_bento.fetch.check_url`` is replaced for this module
by a guard that refuses (400) every URL whose host is not 127.0.0.1/localhost.

Each operation runs at most ``MAX_EXAMPLES`` generated cases (plus schemathesis' deterministic
coverage cases), derandomized so a failure reproduces in CI. 4xx for junk is the expected
answer; the only assertion is ``not_a_server_error``. An unhandled exception in the app is
re-raised by the ``TestClient`` (``raise_server_exceptions``), so it fails the case with its
traceback instead of showing up as a 500 response.

``test_fetch_edge_cases`` pins URL/header inputs the fuzzer cannot reach (its strings are never
well-formed loopback URLs) that once made the server answer 500: each must now be a 4xx.
"""

from __future__ import annotations

import base64
import copy
import io
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import schemathesis  # noqa: F401  (a test dependency: pip install -e '.[test]')
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

import service  # noqa: E402  (conftest has set the environment already)
from fixtures.hub import hub_that_knows_no_model  # noqa: E402

MAX_EXAMPLES = 25
TIMM_MODEL = "test_resnet.r160_in1k"
LOOPBACK_HOSTS = {"127.0.0.1", "localhost"}

def without_examples(spec: dict[str, Any]) -> dict[str, Any]:
    """The schema less the API page's examples (the routes' ``openapi_examples`` in service.py): they
    name real Hub models that this offline test cannot download, and schemathesis sends them and
    variants of them."""
    spec = copy.deepcopy(spec)
    for operations in spec["paths"].values():
        for operation in operations.values():
            for media in operation.get("requestBody", {}).get("content", {}).values():
                media.pop("example", None)
                media.pop("examples", None)
            for parameter in operation.get("parameters", []):
                parameter.pop("example", None)
                parameter.pop("examples", None)
    return spec


schema = schemathesis.openapi.from_dict(without_examples(service.app.openapi()))

# Operations with a real server bug found by this fuzzer (label -> bug); they xfail(strict=False).
KNOWN_BUGS: dict[str, str] = {}


def _tiny_png() -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


PNG_B64 = _tiny_png()
# Filled in by the ``fuzz_client`` fixture once the models are loaded.
LOADED_NAMES: list[str] = []

INFERENCE_PATHS = {"/embed_text", "/infer_text", "/infer_image", "/embed_image", "/infer", "/embed", "/classify_image"}
IMAGE_PATHS = {"/infer_image", "/embed_image", "/infer", "/embed", "/classify_image"}
QUERY_NAME_PATHS = {"/model_embedding_size", "/model_classification_labels"}


def loaded_model_variants(case: Any, kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    """The same request pointed at each loaded model, so the rest of the body reaches model code.

    Generated names almost never match a loaded model, which would stop every inference request at
    404. For each JSON-object body of an inference route (and each query naming a model), one more
    request per loaded model keeps every other generated field as it is; image routes get one more
    with a decodable image in place of the generated one.
    """
    path, body, query = case.operation.path, kwargs.get("json"), kwargs.get("params")
    variants: list[dict[str, Any]] = []
    if path in INFERENCE_PATHS and isinstance(body, dict):
        for name in LOADED_NAMES:
            variants.append({**kwargs, "json": {**body, "name": name, "library": None, "pretrained": None}})
        if path in IMAGE_PATHS:
            variants.append({**kwargs, "json": {**body, "name": LOADED_NAMES[0], "library": None,
                                                "pretrained": None, "image": [PNG_B64]}})
    elif path == "/v1/embeddings" and isinstance(body, dict):
        variants.extend({**kwargs, "json": {**body, "model": name}} for name in LOADED_NAMES)
    elif path in QUERY_NAME_PATHS and isinstance(query, dict):
        rest = {key: value for key, value in query.items() if key != "pretrained"}
        variants.extend({**kwargs, "params": {**rest, "name": name}} for name in LOADED_NAMES)
    return variants


@pytest.fixture(scope="module")
def fuzz_client(client: Any, hub_models: dict[str, str]) -> Iterator[Any]:
    """The conftest client with the fetch guard narrowed to loopback and two tiny models loaded."""
    import ingrain_bento.fetch as fetch
    from ingrain_bento.errors import BadRequest

    original_check_url = fetch.check_url

    async def loopback_only(url: str, allow_private: bool) -> None:
        await original_check_url(url, True)  # scheme and host presence, no DNS
        host = (urlsplit(url).hostname or "").lower()
        if host not in LOOPBACK_HOSTS:
            raise BadRequest(f"fuzz tests fetch only from 127.0.0.1/localhost, not {host[:100]!r}.")

    served = client.get("/openapi.json")
    assert served.status_code == 200 and served.json() == service.app.openapi()

    def ids(route: str) -> set[str]:
        return {model["id"] for model in client.get(route).json()["models"]}

    loaded_before, stored_before = ids("/loaded_models"), ids("/repository_models")
    models = [("/load_timm_model", {"name": TIMM_MODEL, "pretrained": False}, f"{TIMM_MODEL}::false"),
              ("/load_sentence_transformer_model", {"name": hub_models["st"]}, hub_models["st"])]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fetch, "check_url", loopback_only)
        for route, body, _ in models:
            response = client.post(route, json=body)
            assert response.status_code == 200, response.text
        LOADED_NAMES[:] = [model_id for _, _, model_id in models]
        try:
            # A generated name the store lacks goes to the Hub, which says it does not exist (a
            # 404), as the real Hub would; offline, that is a 502 (upstream) and fails this check.
            with hub_that_knows_no_model():
                yield client
        finally:
            LOADED_NAMES.clear()
            # Leave the session's app as this module found it: other modules share it.
            for _, _, model_id in models:
                if model_id not in stored_before:
                    client.request("DELETE", "/delete_model", json={"name": model_id})
                elif model_id not in loaded_before:
                    client.post("/unload_model", json={"name": model_id})
            assert ids("/loaded_models") <= loaded_before and ids("/repository_models") <= stored_before


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_no_server_error(case: Any, fuzz_client: Any, request: pytest.FixtureRequest) -> None:
    bug = KNOWN_BUGS.get(case.operation.label)
    if bug:
        request.node.add_marker(pytest.mark.xfail(reason=bug, strict=False))
    # Not followed: schemathesis also tries other methods on each path, and GET / redirects to the
    # API page, whose request it cannot read back.
    kwargs = {**case.as_transport_kwargs(), "follow_redirects": False}
    case.validate_response(fuzz_client.request(**kwargs), checks=[not_a_server_error])
    for variant in loaded_model_variants(case, kwargs):
        response = fuzz_client.request(**variant)
        assert response.status_code < 500, (
            f"{case.operation.label} answered {response.status_code} {response.text[:300]!r} to "
            f"json={variant.get('json')!r} params={variant.get('params')!r}")


# Requests that crash the URL fetcher (found by hand; every URL is loopback or malformed, and the
# loopback-only guard stays on). Each should be a 4xx.
FETCH_BUGS = [
    pytest.param("/embed_image", {"image": ["http://[::1/x.png"]}, id="image-unclosed-ipv6-ValueError"),
    pytest.param("/embed_image", {"image": ["http://127.0.0.1:abc/x.png"]}, id="image-port-not-a-number-InvalidURL"),
    pytest.param("/embed_image", {"image": ["http://127.0.0.1:99999/x.png"]}, id="image-port-over-65535-OverflowError"),
    pytest.param("/embed_image", {"image": ["http://127.0.0.1:1/x.png"], "image_download_headers": {"a": "\u20ac"}},
                 id="image-header-not-ascii-UnicodeEncodeError"),
    pytest.param("/download_custom_model", {"library": "open_clip", "pretrained_name": "fuzz-bug",
                                            "safetensors_url": "http://[::1/x"}, id="custom-unclosed-ipv6-ValueError"),
]


@pytest.mark.parametrize("route,body", FETCH_BUGS)
def test_fetch_edge_cases(fuzz_client: Any, route: str, body: dict[str, Any]) -> None:
    if route != "/download_custom_model":
        body = {"name": LOADED_NAMES[0], **body}
    response = fuzz_client.post(route, json=body)
    assert 400 <= response.status_code < 500, response.text
