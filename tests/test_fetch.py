"""``SafeFetcher`` and ``check_url``: the one guarded HTTP downloader.

Every URL a client names (image URLs, custom-model files) is fetched through here. The
guard: http/https only; loopback, private, link-local, metadata and other non-public
addresses are refused (unless ``allow_private``) *before* a connection is made, cloud
metadata addresses always; the connection goes to an address that was checked (no DNS
rebinding); each redirect hop is re-checked; size caps hold while streaming; timeouts and
upstream errors become 504/502.

All traffic in these tests goes to small HTTP(S) servers on 127.0.0.1; refused addresses
are rejected before any connection, and no public name is resolved: made-up ``*.test``
names are answered by the ``fake_dns`` fixture, and a guard fails any test whose sockets
try to connect anywhere but loopback.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import ipaddress
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

import ingrain_bento.fetch as fetch_module
from ingrain_bento.errors import BadRequest, TooLarge, UpstreamFailed, UpstreamTimeout
from ingrain_bento.fetch import SafeFetcher, _is_public, check_url
from ingrain_bento.settings import Settings

BODY = bytes(range(256)) * 40  # 10 240 bytes
# 169.254.169.254 spelled as one decimal number, in hex, and as a.b.c16 (inet_aton forms).
METADATA_SPELLINGS = ("2852039166", "0xa9fea9fe", "169.254.43518")


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
    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
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
    """A safety net: should a guard regress, the test fails instead of sending traffic elsewhere.

    Requests may name 127.0.0.1, a made-up ``*.test`` name (see ``fake_dns``) or a numeric spelling
    in ``METADATA_SPELLINGS``; whatever a name resolves to, no socket may connect to anything but
    a loopback address.
    """
    real_send = httpx.AsyncClient.send
    real_connect = socket.socket.connect

    async def send(self, request, **kwargs):
        host = request.url.host
        allowed = host == "127.0.0.1" or host.endswith(".test") or host in METADATA_SPELLINGS
        assert allowed, f"the test tried to reach {request.url}"
        return await real_send(self, request, **kwargs)

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            assert ipaddress.ip_address(address[0]).is_loopback, f"the test tried to connect to {address}"
        return real_connect(self, address)

    monkeypatch.setattr(httpx.AsyncClient, "send", send)
    monkeypatch.setattr(socket.socket, "connect", connect)


class FakeDNS:
    """``socket.getaddrinfo`` for made-up names: ``answers[name]`` is one address list per lookup.

    The last list repeats once the others are used up; ``lookups[name]`` counts the lookups.
    Numeric hosts resolve as usual (no DNS); any other name fails as unknown.
    """

    def __init__(self) -> None:
        self.answers: dict[str, list[list[str]]] = {}
        self.lookups: collections.Counter[str] = collections.Counter()
        self._real = socket.getaddrinfo

    def __call__(self, host, port, family=0, type=0, proto=0, flags=0):
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name not in self.answers:
            try:
                return self._real(host, port, family, type, proto, flags | socket.AI_NUMERICHOST)
            except socket.gaierror:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known") from None
        answers = self.answers[name]
        addresses = answers[min(self.lookups[name], len(answers) - 1)]
        self.lookups[name] += 1
        port = int(port or 0)
        return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", (a, port, 0, 0)) if ":" in a
                else (socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in addresses]


@pytest.fixture
def fake_dns(monkeypatch) -> FakeDNS:
    resolver = FakeDNS()
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    return resolver


@pytest.fixture
def loopback_counts_as_public(monkeypatch):
    """127.0.0.1 and 127.0.0.2 count as public, so the guard can be tested against the local server.

    Nothing listens on 127.0.0.2: a connection sent there is refused.
    """
    real_is_public = fetch_module._is_public
    monkeypatch.setattr(fetch_module, "_is_public",
                        lambda a: a in ("127.0.0.1", "127.0.0.2") or real_is_public(a))


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
    "http://169.254.1.1/x",
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


def test_a_public_address_passes_the_check(fake_dns):
    """check_url only resolves and checks (nothing is sent); it returns the addresses to connect to."""
    assert asyncio.run(check_url("http://8.8.8.8/x", allow_private=False)) == ["8.8.8.8"]
    assert asyncio.run(check_url("https://[2001:4860:4860::8888]/x", allow_private=False)) == [
        "2001:4860:4860::8888"]
    fake_dns.answers["public.test"] = [["8.8.8.8", "2001:4860:4860::8888"]]
    assert asyncio.run(check_url("https://public.test/x", allow_private=False)) == [
        "8.8.8.8", "2001:4860:4860::8888"]


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


# Teredo addresses: server 65.54.227.120, client = ~(last 32 bits).
TEREDO_127_0_0_1 = "2001:0:4136:e378:8000:63bf:80ff:fffe"
TEREDO_10_0_0_1 = "2001:0:4136:e378:8000:63bf:f5ff:fffe"
TEREDO_8_8_8_8 = "2001:0:4136:e378:8000:63bf:f7f7:f7f7"
TEREDO_METADATA = "2001:0:4136:e378:8000:63bf:5601:5601"  # client 169.254.169.254


@pytest.mark.parametrize("address, public", [
    ("8.8.8.8", True), ("2001:4860:4860::8888", True),
    ("127.0.0.1", False), ("10.0.0.1", False), ("169.254.169.254", False), ("::1", False),
    ("::ffff:10.0.0.1", False), ("fe80::1%eth0", False), ("224.0.0.1", False), ("fc00::1", False),
    # IPv6 forms that carry an IPv4 address are judged by it.
    ("::127.0.0.1", False), ("::10.0.0.1", False), ("::ffff:0:127.0.0.1", False),
    ("64:ff9b::7f00:1", False), ("64:ff9b::808:808", True),
    ("64:ff9b:1::808:808", False),  # the local-use NAT64 prefix is never public
    ("2002:7f00:1::", False), ("2002:a00:1::1", False), ("2002:808:808::", True),
    (TEREDO_127_0_0_1, False), (TEREDO_10_0_0_1, False), (TEREDO_8_8_8_8, True),
])
def test_is_public(address, public):
    assert _is_public(address) is public


@pytest.mark.parametrize("address", [
    "::127.0.0.1", "::ffff:0:127.0.0.1", "64:ff9b::7f00:1", "64:ff9b::a00:1", "64:ff9b:1::7f00:1",
    "64:ff9b:1:7f00:1::", "2002:7f00:1::", "2002:a00:1::1", TEREDO_127_0_0_1, TEREDO_10_0_0_1,
])
def test_ipv6_forms_embedding_a_non_public_ipv4_are_refused(address, server):
    url = f"http://[{address}]/x"
    with pytest.raises(BadRequest, match="non-public address"):
        asyncio.run(check_url(url, allow_private=False))
    before = len(server.requests)
    with pytest.raises(BadRequest, match="non-public address"):
        fetch(url, allow_private=False)
    assert len(server.requests) == before


# ---- cloud metadata: refused even with allow_private ------------------------------------

METADATA_URLS = [
    "http://169.254.169.254/latest/meta-data/",
    "http://[fd00:ec2::254]/latest/meta-data/",
    "http://100.100.100.200/latest/meta-data/",
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://metadata.google.internal./computeMetadata/v1/",
    "http://metadata/",
    "http://instance-data/latest/",
    "http://[::ffff:169.254.169.254]/",
    "http://[::169.254.169.254]/",
    "http://[64:ff9b::a9fe:a9fe]/",
    "http://[64:ff9b::6464:64c8]/",  # 100.100.100.200
    "http://[64:ff9b:1::a9fe:a9fe]/",
    "http://[64:ff9b:1:a9fe:a9:fe00::]/",  # local-use NAT64 with a /48 prefix (RFC 6052 layout)
    "http://[2002:a9fe:a9fe::]/",
    f"http://[{TEREDO_METADATA}]/",
]


@pytest.mark.parametrize("url", METADATA_URLS)
@pytest.mark.parametrize("allow_private", [False, True])
def test_cloud_metadata_is_always_refused(url, allow_private, monkeypatch):
    def no_dns(*args, **kwargs):
        raise AssertionError("metadata names and literal addresses are refused without resolving them")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(BadRequest, match="metadata"):
        asyncio.run(check_url(url, allow_private=allow_private))


@pytest.mark.parametrize("target", ["http://169.254.169.254/latest/meta-data/", "http://[fd00:ec2::254]/",
                                    "http://[::ffff:a9fe:a9fe]/", "http://metadata.google.internal/"])
def test_a_redirect_to_cloud_metadata_is_refused_with_private_urls_allowed(server, target):
    before = len(server.requests)
    with pytest.raises(BadRequest, match="metadata"):
        fetch(server.url("/redirect?to=" + target), allow_private=True)
    assert [path for path, _ in server.requests[before:]] == ["/redirect"]


@pytest.mark.parametrize("spelling", METADATA_SPELLINGS)
def test_other_spellings_of_the_metadata_address_are_refused_with_private_urls_allowed(fake_dns, spelling):
    """Numeric forms ``ipaddress`` does not parse are resolved (no DNS) and checked before connecting."""
    with pytest.raises(BadRequest, match="169.254.169.254 is a cloud metadata address"):
        fetch(f"http://{spelling}/latest", allow_private=True)


@pytest.mark.parametrize("answer", ["169.254.169.254", "fd00:ec2::254", "::ffff:100.100.100.200"])
def test_a_name_resolving_to_cloud_metadata_is_refused_with_private_urls_allowed(fake_dns, answer, tmp_path):
    fake_dns.answers["imds.test"] = [[answer]]
    with pytest.raises(BadRequest, match="metadata"):
        fetch("http://imds.test/latest/meta-data/", allow_private=True)
    with pytest.raises(BadRequest, match="metadata"):
        run_with(True, lambda f: f.download_to("http://imds.test/latest", tmp_path / "x.bin",
                                               max_bytes=1 << 20, timeout=5))


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


# ---- the connection goes to the checked address (DNS rebinding) --------------------------

def test_a_rebinding_name_never_reaches_the_address_it_switches_to(server, fake_dns, loopback_counts_as_public):
    """DNS answers a "public" address for the check, then 127.0.0.1: the connection must use the first."""
    port = server.httpd.server_address[1]
    fake_dns.answers["rebind.test"] = [["127.0.0.2"], ["127.0.0.1"]]
    before = len(server.requests)
    with pytest.raises(UpstreamFailed):
        fetch(f"http://rebind.test:{port}/file", allow_private=False)
    assert len(server.requests) == before


def test_a_redirect_hop_is_pinned_too(server, fake_dns, loopback_counts_as_public):
    port = server.httpd.server_address[1]
    fake_dns.answers["rebind.test"] = [["127.0.0.2"], ["127.0.0.1"]]
    before = len(server.requests)
    with pytest.raises(UpstreamFailed):
        fetch(server.url(f"/redirect?to=http://rebind.test:{port}/file"), allow_private=False)
    assert [path for path, _ in server.requests[before:]] == ["/redirect"]


def test_a_name_is_resolved_once_and_its_host_header_kept(server, fake_dns, loopback_counts_as_public):
    port = server.httpd.server_address[1]
    fake_dns.answers["pinned.test"] = [["127.0.0.1"]]
    assert fetch(f"http://pinned.test:{port}/file", allow_private=False) == BODY
    assert fake_dns.lookups["pinned.test"] == 1
    assert server.requests[-1][1]["Host"] == f"pinned.test:{port}"


def test_the_first_reachable_checked_address_is_used(server, fake_dns, loopback_counts_as_public):
    port = server.httpd.server_address[1]
    fake_dns.answers["two.test"] = [["127.0.0.2", "127.0.0.1"]]  # nothing listens on 127.0.0.2
    assert fetch(f"http://two.test:{port}/file", allow_private=False) == BODY


def test_a_name_is_resolved_and_checked_at_connect_time_when_private_urls_are_allowed(server, fake_dns):
    port = server.httpd.server_address[1]
    fake_dns.answers["local.test"] = [["127.0.0.1"]]
    assert fetch(f"http://local.test:{port}/file", allow_private=True) == BODY
    assert fake_dns.lookups["local.test"] == 1


def _certificate(hostname: str) -> tuple[bytes, bytes]:
    """A self-signed certificate for ``hostname`` and its key, both PEM."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(hours=1))
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


@pytest.mark.parametrize("certified, works", [("tls.test", True), ("other.test", False)])
def test_tls_to_a_pinned_address_verifies_the_hostname(fake_dns, monkeypatch, tmp_path, certified, works):
    """SNI and certificate checks are for the name in the URL, though the socket goes to 127.0.0.1.

    The client trusts the test certificate (``httpx.create_ssl_context`` is replaced); a certificate
    for another name is refused.
    """
    certificate, key = _certificate(certified)
    (tmp_path / "cert.pem").write_bytes(certificate)
    (tmp_path / "key.pem").write_bytes(key)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    names_seen = []
    server_context.sni_callback = lambda connection, name, context: names_seen.append(name)
    client_context = ssl.create_default_context(cadata=certificate.decode())
    monkeypatch.setattr(httpx, "create_ssl_context", lambda *args, **kwargs: client_context)
    fake_dns.answers["tls.test"] = [["127.0.0.1"]]

    tls_server = LocalServer(tls=server_context)
    tls_server.thread.start()
    try:
        port = tls_server.httpd.server_address[1]
        if works:
            assert fetch(f"https://tls.test:{port}/file") == BODY
            assert tls_server.requests[-1][1]["Host"] == f"tls.test:{port}"
        else:
            with pytest.raises(UpstreamFailed, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
                fetch(f"https://tls.test:{port}/file")
        assert names_seen == ["tls.test"]
    finally:
        tls_server.httpd.shutdown()
        tls_server.httpd.server_close()


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


def test_download_to_has_a_total_deadline(server, tmp_path):
    """Every read is quick (one byte every 0.1 s, read timeout 5 s), but the whole takes 2 s."""
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout) as info:
        run_with(True, lambda f: f.download_to(server.url("/drip"), tmp_path / "drip.bin",
                                               max_bytes=1 << 20, timeout=5, deadline=0.5))
    assert time.monotonic() - started < 1.5
    assert info.value.status_code == 504
    assert "INGRAIN_DOWNLOAD_DEADLINE_S" in info.value.message


def test_the_download_deadline_covers_redirect_hops(server, tmp_path):
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout, match="INGRAIN_DOWNLOAD_DEADLINE_S"):
        run_with(True, lambda f: f.download_to(server.url("/redirect?to=/slow?s=2"), tmp_path / "slow.bin",
                                               max_bytes=1 << 20, timeout=5, deadline=0.5))
    assert time.monotonic() - started < 1.5


def test_a_download_within_its_deadline_completes(server, tmp_path):
    destination = tmp_path / "model.safetensors"
    written = run_with(True, lambda f: f.download_to(server.url("/redirect?to=/file"), destination,
                                                      max_bytes=1 << 20, timeout=5, deadline=5))
    assert written == len(BODY) and destination.read_bytes() == BODY


def test_the_download_deadline_setting(monkeypatch):
    monkeypatch.delenv("INGRAIN_DOWNLOAD_DEADLINE_S", raising=False)
    assert Settings().download_deadline_s == 1800.0
    monkeypatch.setenv("INGRAIN_DOWNLOAD_DEADLINE_S", "2.5")
    assert Settings().download_deadline_s == 2.5
    with pytest.raises(ValueError):
        Settings(download_deadline_s=0)


def test_download_to_is_guarded_too(tmp_path):
    destination = tmp_path / "never.bin"
    with pytest.raises(BadRequest):
        run_with(False, lambda f: f.download_to("http://169.254.169.254/latest", destination,
                                                max_bytes=1 << 20, timeout=5))
    assert not destination.exists() or destination.read_bytes() == b""
