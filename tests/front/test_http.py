"""HTTP concerns around every route: the API key, the request-size cap, and the error shapes."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from fixtures.clients import ingrain_007, ingrain_023

KEY = "s3cret-test-key"


@pytest.fixture(scope="module")
def keyed_url(real_server_factory, session_dir) -> Iterator[str]:
    """A real server with INGRAIN_API_KEY set (the pycurl-based ingrain clients need a socket)."""
    server = real_server_factory(session_dir / "bentoml-keyed",
                                 env={"INGRAIN_API_KEY": KEY, "INGRAIN_MAX_REQUEST_BYTES": "100000",
                                      "INGRAIN_ALLOW_PRIVATE_URLS": "false"}).start()
    yield server.url
    server.stop()


AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.mark.parametrize("path", ["/health", "/livez", "/readyz"])
def test_probes_need_no_key(keyed_url, path):
    assert httpx.get(f"{keyed_url}{path}").status_code == 200


@pytest.mark.parametrize("method,path", [("GET", "/loaded_models"), ("GET", "/repository_models"),
                                         ("POST", "/embed_text"), ("DELETE", "/delete_model"),
                                         ("GET", "/metrics"), ("POST", "/download_custom_model"),
                                         ("POST", "/"), ("POST", "/v2/embed"), ("POST", "/tokenize"),
                                         ("GET", "/info")])
def test_every_other_route_needs_the_key(keyed_url, method, path):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        response = httpx.request(method, f"{keyed_url}{path}", headers=headers, json={})
        assert response.status_code == 401 and "API key" in response.json()["message"]
    keyed = httpx.request(method, f"{keyed_url}{path}", headers=AUTH, json={}).status_code
    assert keyed != 401 and keyed < 500, keyed


def test_openai_routes_answer_in_openais_error_shape(keyed_url):
    body = httpx.get(f"{keyed_url}/v1/models").json()
    assert body["error"]["type"] == "authentication_error" and body["error"]["code"] == 401
    missing = httpx.post(f"{keyed_url}/v1/embeddings", headers=AUTH, json={"model": "nope", "input": "x"})
    assert missing.status_code == 404 and "message" in missing.json()["error"]


def test_both_ingrain_clients_send_the_key_through_their_header_argument(keyed_url):
    header = ["Content-Type: application/json", f"Authorization: Bearer {KEY}"]
    seed = ingrain_007().Client(inference_server_url=keyed_url, model_server_url=keyed_url, header=header)
    assert "models" in seed.loaded_models()
    current = ingrain_023().Client(inference_server_url=keyed_url, model_server_url=keyed_url, header=header)
    assert isinstance(current.repository_models().models, list)
    keyless = ingrain_023().Client(inference_server_url=keyed_url, model_server_url=keyed_url)
    with pytest.raises(Exception) as error:
        keyless.loaded_models()
    assert error.value.status_code == 401


def test_a_body_over_the_cap_is_a_413_with_or_without_content_length(keyed_url):
    big = b'{"name": "x", "text": "' + b"a" * 200_000 + b'"}'
    declared = httpx.post(f"{keyed_url}/embed_text", headers={**AUTH, "content-type": "application/json"}, content=big)
    assert declared.status_code == 413

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(big), 10_000):
            yield big[start:start + 10_000]

    chunked = httpx.post(f"{keyed_url}/embed_text", headers={**AUTH, "content-type": "application/json"},
                         content=chunks())
    assert chunked.status_code == 413 and "cap" in chunked.json()["message"]
    assert httpx.get(f"{keyed_url}/health").status_code == 200


def test_unknown_routes_and_methods_get_a_json_message(keyed_url):
    missing = httpx.get(f"{keyed_url}/no_such_route", headers=AUTH)
    assert missing.status_code == 404 and "No route" in missing.json()["message"]
    wrong = httpx.get(f"{keyed_url}/load_model", headers=AUTH)
    assert wrong.status_code == 405 and "not allowed" in wrong.json()["message"]


def test_the_fetch_guard_holds_at_route_level(keyed_url, file_server, hub_models):
    """The other server tests allow private URLs (their files are on 127.0.0.1); this one does not."""
    timm_name = hub_models["timm"]
    assert httpx.post(f"{keyed_url}/load_timm_model", headers=AUTH, json={"name": timm_name},
                      timeout=120).status_code == 200
    for url in (f"{file_server.url}/red.png", "http://169.254.169.254/latest/meta-data/", "http://[::127.0.0.1]/x"):
        response = httpx.post(f"{keyed_url}/embed_image", headers=AUTH, json={"name": timm_name, "image": url})
        assert response.status_code == 400 and "Refusing" in response.json()["message"], response.text
    custom = {"library": "timm", "pretrained_name": "from-loopback", "num_classes": 7,
              "safetensors_url": f"{file_server.url}/timm.safetensors"}
    response = httpx.post(f"{keyed_url}/download_custom_model", headers=AUTH, json=custom, timeout=60)
    assert response.status_code == 400 and "Refusing" in response.json()["message"], response.text
    stored = httpx.get(f"{keyed_url}/repository_models", headers=AUTH).json()["models"]
    assert "from-loopback" not in {m["name"] for m in stored}


def test_head_answers_wherever_get_does(client):
    """Every GET route answers HEAD with GET's status and no body (it was a 405)."""
    from fastapi.routing import APIRoute

    import service

    paths = sorted({route.path for route in service.app.routes
                    if isinstance(route, APIRoute) and route.methods and "GET" in route.methods
                    and "{" not in route.path})
    assert {"/", "/health", "/loaded_models", "/v1/models"} <= set(paths)
    for path in paths:
        got, head = client.get(path, follow_redirects=False), client.head(path, follow_redirects=False)
        assert head.status_code == got.status_code != 405, (path, head.status_code, got.status_code)
        assert head.content == b"", path
    assert client.head("/embed_text").status_code == 405, "a POST route still refuses HEAD"
    operations = {method for item in service.app.openapi()["paths"].values() for method in item}
    assert "head" not in operations, "the API reference lists no HEAD operation beside each GET"


@pytest.mark.parametrize(("path", "status"), [("/", 307), ("/health", 200)])
def test_head_on_a_real_server_is_the_status_without_a_body(keyed_url, path, status):
    response = httpx.head(f"{keyed_url}{path}")
    assert response.status_code == status and response.content == b""
