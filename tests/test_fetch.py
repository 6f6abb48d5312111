"""``SafeFetcher`` and ``check_url``: the one guarded HTTP downloader.

Every URL a client names (image URLs, custom-model files) is fetched through here. The
guard: http/https only; loopback, private, link-local, metadata and other non-public
addresses are refused (unless ``allow_private``) *before* a connection is made; each
redirect hop is re-checked; size caps hold while streaming; timeouts and upstream errors
become 504/502.

All traffic in these tests goes to a small HTTP server on 127.0.0.1; refused addresses
are rejected before any connection, and no public name is resolved.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

import ingrain_bento.fetch as fetch_module
from ingrain_bento.errors import BadRequest, TooLarge, UpstreamFailed, UpstreamTimeout
from ingrain_bento.fetch import SafeFetcher, _is_public, check_url

BODY = bytes(range(256)) * 40  # 10 240 bytes


# ---- a local HTTP server -----------------------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    """Routes: /file, /chunked?n=, /redirect?to=, /loop, /slow, /drip, /status/<code>."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output quiet
        pass

    def _send(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        self.server.requests.append((parts.path, dict(self.headers)))
        try:
            if parts.path == "/file":
                self._send(200, BODY, {"Content-Type": "application/octet-stream"})
            elif parts.path == "/chunked":
                # No Content-Length: the size is only known while streaming.
                size = int(query["n"][0])
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.send_header("Connection", "close")
                self.end_headers()
                for start in range(0, size, 1000):
                    piece = b"x" * min(1000, size - start)
                    self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")
            elif parts.path == "/redirect":
                self._send(302, headers={"Location": query["to"][0]})
            elif parts.path == "/loop":
                self._send(302, headers={"Location": "/loop"})
            elif parts.path == "/slow":
                time.sleep(float(query.get("s", ["2"])[0]))
                self._send(200, b"late")
            elif parts.path == "/drip":
                # Headers at once, then one byte every 0.1 s: no single read is slow.
                self.send_response(200)
                self.send_header("Content-Length", "20")
                self.send_header("Connection", "close")
                self.end_headers()
                for _ in range(20):
                    self.wfile.write(b"d")
                    self.wfile.flush()
                    time.sleep(0.1)
            elif parts.path.startswith("/status/"):
                self._send(int(parts.path.rsplit("/", 1)[1]), b"error page")
            else:
                self._send(404, b"not found")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeouts, size caps): expected


class LocalServer:
    def __init__(self) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.requests = []
        self.httpd.handle_error = lambda request, address: None
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def requests(self) -> list[tuple[str, dict[str, str]]]:
        return self.httpd.requests

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"


@pytest.fixture(scope="module")
def server():
    local = LocalServer()
    local.thread.start()
    yield local
    local.httpd.shutdown()
    local.httpd.server_close()


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """A safety net: should a guard regress, the test fails instead of sending traffic elsewhere."""
    real_send = httpx.AsyncClient.send

    async def send(self, request, **kwargs):
        assert request.url.host == "127.0.0.1", f"the test tried to reach {request.url}"
        return await real_send(self, request, **kwargs)

    monkeypatch.setattr(httpx.AsyncClient, "send", send)


def run_with(allow_private: bool, use):
    """Run ``await use(fetcher)`` on a fresh event loop and fetcher, then close the fetcher."""

    async def main():
        fetcher = SafeFetcher(allow_private=allow_private)
        try:
            return await asyncio.wait_for(use(fetcher), 10)
        finally:
            await fetcher.aclose()

    return asyncio.run(main())


def fetch(url: str, *, allow_private: bool = True, max_bytes: int = 1 << 20, timeout: float = 5.0,
          headers: dict[str, str] | None = None) -> bytes:
    return run_with(allow_private, lambda f: f.fetch_bytes(url, headers=headers, max_bytes=max_bytes,
                                                           timeout=timeout))


# ---- which URLs are refused --------------------------------------------------------------

@pytest.mark.parametrize("url", [
    "http://127.0.0.1/x",
    "http://127.1.2.3:8080/x",
    "http://localhost/x",
    "http://10.0.0.1/x",
    "http://172.16.0.1/x",
    "http://192.168.1.1/x",
    "http://169.254.169.254/latest/meta-data/",
    "http://[::1]/x",
    "http://[::ffff:127.0.0.1]/x",
    "http://[fe80::1]/x",
    "http://0.0.0.0/x",
    "http://100.64.0.1/x",
    "http://224.0.0.1/x",
    "http://2130706433/x",  # 127.0.0.1 as one decimal number
    "http://0x7f000001/x",  # 127.0.0.1 in hex
])
def test_non_public_addresses_are_refused(url):
    with pytest.raises(BadRequest) as info:
        asyncio.run(check_url(url, allow_private=False))
    assert "non-public address" in info.value.message
    assert "INGRAIN_ALLOW_PRIVATE_URLS" in info.value.message


@pytest.mark.parametrize("host", ["metadata.google.internal", "METADATA.Google.Internal", "metadata",
                                  "instance-data"])
def test_cloud_metadata_names_are_refused_by_name(host, monkeypatch):
    def no_dns(*args, **kwargs):
        raise AssertionError("metadata names must be refused without resolving them")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(BadRequest, match="metadata"):
        asyncio.run(check_url(f"http://{host}/computeMetadata/v1/", allow_private=False))


@pytest.mark.parametrize("url", ["ftp://example.com/x", "file:///etc/passwd", "gopher://127.0.0.1/",
                                 "http:///no-host", "example.com/x", "data:text/plain,hi"])
@pytest.mark.parametrize("allow_private", [False, True])
def test_only_http_and_https_are_fetched(url, allow_private):
    with pytest.raises(BadRequest, match="Only http:// and https://"):
        asyncio.run(check_url(url, allow_private=allow_private))


def test_a_public_address_passes_the_check():
    # check_url only resolves and checks; a literal IP needs no DNS and nothing is sent.
    asyncio.run(check_url("http://8.8.8.8/x", allow_private=False))
    asyncio.run(check_url("https://[2001:4860:4860::8888]/x", allow_private=False))


def test_a_host_with_any_private_address_is_refused(monkeypatch):
    """DNS answering with a public *and* a private address is refused (every address is checked)."""

    def fake_getaddrinfo(host, port, *args, **kwargs):
        assert host == "mixed.example"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("8.8.8.8", port)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.1.2.3", port))]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    with pytest.raises(BadRequest, match="10.1.2.3"):
        asyncio.run(check_url("http://mixed.example/x", allow_private=False))


def test_an_unresolvable_host_is_an_upstream_failure(monkeypatch):
    def fake_getaddrinfo(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    with pytest.raises(UpstreamFailed, match="Could not resolve host 'nowhere.example'"):
        asyncio.run(check_url("http://nowhere.example/x", allow_private=False))


@pytest.mark.parametrize("address, public", [
    ("8.8.8.8", True), ("2001:4860:4860::8888", True),
    ("127.0.0.1", False), ("10.0.0.1", False), ("169.254.169.254", False), ("::1", False),
    ("::ffff:10.0.0.1", False), ("fe80::1%eth0", False), ("224.0.0.1", False), ("fc00::1", False),
])
def test_is_public(address, public):
    assert _is_public(address) is public


def test_refused_fetch_sends_nothing(server):
    before = len(server.requests)
    with pytest.raises(BadRequest):
        fetch(server.url("/file"), allow_private=False)
    assert len(server.requests) == before


# ---- fetching ----------------------------------------------------------------------------

def test_fetch_bytes_returns_the_body(server):
    assert fetch(server.url("/file")) == BODY


def test_fetch_sends_the_given_headers(server):
    fetch(server.url("/file"), headers={"X-Test-Token": "secret-123"})
    path, headers = server.requests[-1]
    assert path == "/file"
    assert headers.get("X-Test-Token") == "secret-123"


def test_redirects_are_followed(server):
    assert fetch(server.url("/redirect?to=/file")) == BODY
    assert fetch(server.url("/redirect?to=" + server.url("/file"))) == BODY


def test_a_redirect_loop_gives_up(server):
    with pytest.raises(UpstreamFailed, match="redirects"):
        fetch(server.url("/loop"))


def test_a_redirect_to_a_malformed_url_is_an_upstream_failure(server):
    with pytest.raises(UpstreamFailed):
        fetch(server.url("/redirect?to=http://[::1/x"))


def test_a_redirect_to_a_non_http_scheme_is_refused(server):
    with pytest.raises(BadRequest, match="Only http"):
        fetch(server.url("/redirect?to=file:///etc/passwd"))


def test_each_redirect_hop_is_rechecked(server, monkeypatch):
    """127.0.0.1 is made to count as public; the redirect to 10.0.0.1 is still refused.

    The check runs before connecting, so nothing is ever sent to 10.0.0.1.
    """
    real_is_public = fetch_module._is_public
    monkeypatch.setattr(fetch_module, "_is_public", lambda a: a == "127.0.0.1" or real_is_public(a))

    assert fetch(server.url("/file"), allow_private=False) == BODY  # the patch lets 127.0.0.1 through
    before = len(server.requests)
    with pytest.raises(BadRequest, match="10.0.0.1"):
        fetch(server.url("/redirect?to=http://10.0.0.1/secret"), allow_private=False)
    assert [path for path, _ in server.requests[before:]] == ["/redirect"]


def test_a_redirect_to_a_metadata_host_is_refused(server, monkeypatch):
    real_is_public = fetch_module._is_public
    monkeypatch.setattr(fetch_module, "_is_public", lambda a: a == "127.0.0.1" or real_is_public(a))
    with pytest.raises(BadRequest, match="metadata"):
        fetch(server.url("/redirect?to=http://metadata.google.internal/"), allow_private=False)


# ---- size caps ---------------------------------------------------------------------------

def test_a_body_over_max_bytes_is_too_large(server):
    with pytest.raises(TooLarge) as info:
        fetch(server.url("/file"), max_bytes=len(BODY) - 1)
    assert info.value.status_code == 413


def test_a_body_of_exactly_max_bytes_is_accepted(server):
    assert fetch(server.url("/file"), max_bytes=len(BODY)) == BODY


def test_the_cap_holds_without_a_content_length(server):
    with pytest.raises(TooLarge, match="5000-byte cap"):
        fetch(server.url("/chunked?n=12000"), max_bytes=5000)


def test_a_chunked_body_under_the_cap_is_fetched(server):
    assert fetch(server.url("/chunked?n=4500"), max_bytes=5000) == b"x" * 4500


# ---- timeouts and upstream errors --------------------------------------------------------

def test_a_slow_server_times_out(server):
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout) as info:
        fetch(server.url("/slow?s=2"), timeout=0.3)
    assert info.value.status_code == 504
    assert time.monotonic() - started < 1.5


def test_the_timeout_bounds_the_whole_fetch_not_each_read(server):
    """A body dripping one byte every 0.1 s never stalls a read for 0.4 s, yet takes 2 s in all."""
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout):
        fetch(server.url("/drip"), timeout=0.4)
    assert time.monotonic() - started < 1.5


@pytest.mark.parametrize("code", [404, 500, 403])
def test_an_upstream_error_status_is_an_upstream_failure(server, code):
    with pytest.raises(UpstreamFailed) as info:
        fetch(server.url(f"/status/{code}"))
    assert str(code) in info.value.message
    assert info.value.status_code == 502


def test_a_closed_port_is_an_upstream_failure():
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens on it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(UpstreamFailed, match="failed"):
        fetch(f"http://127.0.0.1:{port}/x")


# ---- download_to -------------------------------------------------------------------------

def test_download_to_writes_the_file(server, tmp_path):
    destination = tmp_path / "model.safetensors"
    written = run_with(True, lambda f: f.download_to(server.url("/redirect?to=/file"), destination,
                                                      max_bytes=1 << 20, timeout=5))
    assert written == len(BODY)
    assert destination.read_bytes() == BODY


def test_download_to_enforces_the_cap(server, tmp_path):
    destination = tmp_path / "big.bin"
    with pytest.raises(TooLarge):
        run_with(True, lambda f: f.download_to(server.url("/chunked?n=9000"), destination,
                                               max_bytes=4000, timeout=5))


def test_download_to_times_out(server, tmp_path):
    with pytest.raises(UpstreamTimeout):
        run_with(True, lambda f: f.download_to(server.url("/slow?s=2"), tmp_path / "slow.bin",
                                               max_bytes=1 << 20, timeout=0.3))


def test_download_to_is_guarded_too(tmp_path):
    destination = tmp_path / "never.bin"
    with pytest.raises(BadRequest):
        run_with(False, lambda f: f.download_to("http://169.254.169.254/latest", destination,
                                                max_bytes=1 << 20, timeout=5))
    assert not destination.exists() or destination.read_bytes() == b""
