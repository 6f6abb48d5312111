"""The one HTTP downloader for everything a client asks the server to fetch.

Image URLs and custom-model files both come through here, so the guard is in one place:
http/https only; every address a host resolves to is checked against loopback, private,
link-local, multicast and reserved ranges (refused unless ``INGRAIN_ALLOW_PRIVATE_URLS``)
and against cloud-metadata names and addresses (always refused); IPv6 forms that carry an
IPv4 address (mapped, compatible, NAT64, 6to4, Teredo) are judged by that address. The
socket goes to an address that was checked, not to a second DNS answer (no DNS rebinding).
Redirects are followed by hand so each hop is re-checked; connect/read timeouts, and an
optional total deadline for downloads; size caps enforced while streaming, not trusted
from headers.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import AsyncGenerator, Iterable
from contextlib import aclosing
from contextvars import ContextVar
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpcore
import httpx

from ingrain_bento.errors import BadRequest, TooLarge, UpstreamFailed, UpstreamTimeout

__all__ = ["CHUNK_BYTES", "MAX_REDIRECTS", "SafeFetcher", "check_url"]

MAX_REDIRECTS = 5
CHUNK_BYTES = 1 << 20
_DEFAULT_PORTS = {"http": 80, "https": 443}
_METADATA_HOSTS = {"metadata.google.internal", "metadata", "instance-data"}
# Cloud instance-metadata (credential) endpoints: refused even with INGRAIN_ALLOW_PRIVATE_URLS.
_METADATA_ADDRESSES = frozenset(ipaddress.ip_address(address) for address in (
    "169.254.169.254",  # AWS, GCP, Azure, Oracle, OpenStack, DigitalOcean, ...
    "fd00:ec2::254",  # AWS IMDS over IPv6
    "169.254.170.2",  # AWS ECS task credentials
    "169.254.170.23", "fd00:ec2::23",  # AWS EKS Pod Identity
    "100.100.100.200",  # Alibaba Cloud
    "192.0.0.192",  # Oracle Cloud (legacy)
    "168.63.129.16",  # Azure WireServer
))
_NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")
# RFC 8215 local-use NAT64: never public, and its prefix length (where the IPv4 address sits) is the operator's.
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
# High 96 bits of ::a.b.c.d (IPv4-compatible) and ::ffff:0:a.b.c.d (IPv4-translated).
_IPV4_IN_LOW_BITS = (0, 0xFFFF_0000)
_IPV4_MASK = 0xFFFF_FFFF

# The addresses check_url approved for the request this task is sending: (host, addresses).
_PIN: ContextVar[tuple[str, tuple[str, ...]] | None] = ContextVar("ingrain_fetch_pin", default=None)


# ---- which addresses may be fetched ------------------------------------------------------

def _parse(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(address.split("%", 1)[0])


def _rfc6052_ipv4(value: int, prefix_length: int) -> ipaddress.IPv4Address:
    """The IPv4 address in a NAT64 address under a /``prefix_length`` prefix (RFC 6052 2.2).

    Bits 64-71 (the "u" octet) never carry address bits: squeeze them out, then read 32 bits.
    """
    squeezed = ((value >> 64) << 56) | (value & ((1 << 56) - 1))
    start = prefix_length if prefix_length <= 64 else prefix_length - 8
    return ipaddress.IPv4Address((squeezed >> (120 - start - 32)) & _IPV4_MASK)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries ([] for none): its traffic ends up there.

    IPv4-mapped, -compatible and -translated, NAT64 (every prefix length the local-use range
    allows), 6to4, and Teredo (server and client).
    """
    value = int(ip)
    if ip.ipv4_mapped is not None:
        return [ip.ipv4_mapped]
    if value >> 32 in _IPV4_IN_LOW_BITS:
        return [ipaddress.IPv4Address(value & _IPV4_MASK)]
    if ip in _NAT64_WELL_KNOWN:
        return [_rfc6052_ipv4(value, 96)]
    if ip in _NAT64_LOCAL:
        return [_rfc6052_ipv4(value, length) for length in (48, 56, 64, 96)]
    if ip.sixtofour is not None:
        return [ip.sixtofour]
    if ip.teredo is not None:
        return list(ip.teredo)
    return []


def _is_global(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return ip.is_global and not ip.is_multicast


def _is_public(address: str) -> bool:
    """Whether ``address`` is global unicast; an IPv6 form carrying IPv4 addresses is judged by them."""
    ip = _parse(address)
    embedded = _embedded_ipv4(ip) if isinstance(ip, ipaddress.IPv6Address) else []
    if embedded:
        return ip not in _NAT64_LOCAL and all(_is_global(inner) for inner in embedded)
    return _is_global(ip)


def _is_metadata(address: str) -> bool:
    """Whether ``address``, or an IPv4 address it carries, is a cloud metadata endpoint."""
    ip = _parse(address)
    embedded = _embedded_ipv4(ip) if isinstance(ip, ipaddress.IPv6Address) else []
    return any(candidate in _METADATA_ADDRESSES for candidate in (ip, *embedded))


def _check_address(host: str, address: str, allow_private: bool) -> None:
    """Raise 400 unless ``host`` may be fetched at ``address``."""
    if _is_metadata(address):
        raise BadRequest(f"Refusing to fetch {host!r}: {address} is a cloud metadata address, never fetched "
                         "(not even with INGRAIN_ALLOW_PRIVATE_URLS).")
    if not allow_private and not _is_public(address):
        raise BadRequest(
            f"Refusing to fetch {host!r}: it resolves to the non-public address {address} "
            "(set INGRAIN_ALLOW_PRIVATE_URLS=true to allow loopback/private addresses)."
        )


async def _resolve_checked(host: str, port: int, allow_private: bool) -> list[str]:
    """Resolve ``host`` once and check every address; return them all (in the resolver's order)."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UpstreamFailed(f"Could not resolve host {host!r}: {exc}.") from None
    except ValueError as exc:  # UnicodeError for a name IDNA cannot encode
        raise BadRequest(f"Malformed host name {host[:100]!r}: {exc}.") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    for address in addresses:
        _check_address(host, address, allow_private)
    return addresses


async def check_url(url: str, allow_private: bool) -> list[str]:
    """Raise 400 unless ``url`` may be fetched; return the checked addresses to connect to.

    http(s) only; cloud metadata names and addresses never; other non-public addresses only
    when ``allow_private``. A literal address is checked as it is. A name is resolved here and
    every address checked, except under ``allow_private``: then nothing is resolved here ([]
    is returned) and the connection resolves and checks the name (``_PinnedBackend``).
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise BadRequest(f"Malformed URL {url[:100]!r}: {exc}.") from None
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise BadRequest(f"Only http:// and https:// URLs can be fetched, not {url[:100]!r}.")
    host = parts.hostname.lower()
    if host.rstrip(".") in _METADATA_HOSTS:
        raise BadRequest(f"Refusing to fetch {host!r}: cloud metadata addresses are never fetched.")
    try:
        literal = str(ipaddress.ip_address(host))
    except ValueError:
        if allow_private:
            return []
        return await _resolve_checked(host, port or _DEFAULT_PORTS[parts.scheme], allow_private)
    _check_address(host, literal, allow_private)
    return [literal]


# ---- connecting only to checked addresses ------------------------------------------------

class _PinnedBackend(httpcore.AsyncNetworkBackend):
    """Opens sockets only to checked addresses: resolve once, check all, connect to one of them.

    The addresses ``check_url`` returned for the request being sent (``_PIN``) are used as they
    are, so a second, different DNS answer is never asked for. Without them (a name under
    ``allow_private``, or a ``check_url`` that returned nothing) the name is resolved and
    checked here. Only the socket's destination is fixed: the URL, Host header, TLS SNI and
    certificate check keep the name.
    """

    def __init__(self, allow_private: bool) -> None:
        self.allow_private = allow_private
        self._inner = httpcore.AnyIOBackend()

    async def _addresses(self, host: str, port: int) -> list[str]:
        pin = _PIN.get()
        if pin is not None and pin[0] == host:
            return list(pin[1])
        return await _resolve_checked(host, port, self.allow_private)

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        """Try the checked addresses in order (``timeout`` bounds each); the first that answers wins."""
        failure: Exception | None = None
        for address in await self._addresses(host, port):
            try:
                return await self._inner.connect_tcp(address, port, timeout=timeout, local_address=local_address,
                                                     socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        raise failure or httpcore.ConnectError(f"No address to connect to for {host!r}.")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _PinnedTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport, its connection pool connecting through a ``_PinnedBackend``.

    httpx 0.28 takes no network backend, but httpcore 1.x's pool does
    (``AsyncConnectionPool(network_backend=...)``), so the pool httpx built is replaced by the
    same pool with the backend. httpx's request/response and error mapping stay as they are.
    Rewriting URLs to the address instead would need a hand-set Host header and SNI, and would
    let one pooled TLS connection (keyed by address) serve other names its certificate was not
    checked for.
    """

    def __init__(self, backend: _PinnedBackend) -> None:
        super().__init__(trust_env=False)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=100, max_keepalive_connections=20, keepalive_expiry=5.0,  # httpx's default limits
            network_backend=backend,
        )


# ---- the fetcher -------------------------------------------------------------------------

class SafeFetcher:
    """Fetches client-named URLs under the guard above. One instance per process."""

    def __init__(self, allow_private: bool) -> None:
        self.allow_private = allow_private
        self._client: httpx.AsyncClient | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            transport = _PinnedTransport(_PinnedBackend(self.allow_private))
            self._client = httpx.AsyncClient(follow_redirects=False, trust_env=False, transport=transport)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def _send_pinned(self, request: httpx.Request, addresses: list[str] | None) -> httpx.Response:
        """Send ``request``; a new connection for it goes to one of ``addresses`` (checked already)."""
        pin = (request.url.raw_host.decode("ascii"), tuple(addresses)) if addresses else None
        token = _PIN.set(pin)
        try:
            return await self.client.send(request, stream=True)
        finally:
            _PIN.reset(token)

    async def _stream(self, url: str, headers: dict[str, str] | None, max_bytes: int,
                      timeout: float) -> AsyncGenerator[bytes, None]:
        """Yield the body of ``url`` (after checked redirects) in chunks, capped at ``max_bytes``."""
        httpx_timeout = httpx.Timeout(timeout, connect=min(timeout, 10.0))
        try:
            for _ in range(MAX_REDIRECTS + 1):
                addresses = await check_url(url, self.allow_private)
                try:
                    request = self.client.build_request("GET", url, headers=headers, timeout=httpx_timeout)
                    response = await self._send_pinned(request, addresses)
                except (httpx.InvalidURL, UnicodeEncodeError, ValueError, OverflowError) as exc:
                    raise BadRequest(f"Cannot request {url[:200]}: {exc}.") from None
                try:
                    if response.is_redirect:
                        target = urljoin(url, response.headers.get("location", ""))
                        if urlsplit(target).netloc != urlsplit(url).netloc:
                            headers = None  # the client's headers (credentials) are for the host it named
                        url = target
                        continue
                    if response.status_code >= 400:
                        raise UpstreamFailed(
                            f"Fetching {url[:200]} failed: the server answered {response.status_code}.")
                    declared = response.headers.get("content-length")
                    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                        raise TooLarge(f"{url[:200]} is {declared} bytes, over the {max_bytes}-byte cap.")
                    received = 0
                    async for chunk in response.aiter_bytes(CHUNK_BYTES):
                        received += len(chunk)
                        if received > max_bytes:
                            raise TooLarge(f"{url[:200]} is over the {max_bytes}-byte cap.")
                        yield chunk
                    return
                finally:
                    await response.aclose()
            raise UpstreamFailed(f"Fetching {url[:200]} took more than {MAX_REDIRECTS} redirects.")
        except httpx.TimeoutException:
            raise UpstreamTimeout(f"Fetching {url[:200]} timed out after {timeout:g} s.") from None
        except httpx.HTTPError as exc:
            raise UpstreamFailed(f"Fetching {url[:200]} failed: {type(exc).__name__}: {exc}.") from None

    async def fetch_bytes(self, url: str, *, headers: dict[str, str] | None = None,
                          max_bytes: int, timeout: float) -> bytes:
        """The whole body of ``url`` in memory (for images); ``timeout`` bounds the whole fetch."""
        try:
            async with asyncio.timeout(timeout):
                async with aclosing(self._stream(url, headers, max_bytes, timeout)) as chunks:
                    body = [chunk async for chunk in chunks]
        except TimeoutError:
            raise UpstreamTimeout(f"Fetching {url[:200]} timed out after {timeout:g} s.") from None
        return b"".join(body)

    async def download_to(self, url: str, destination: Path, *, max_bytes: int, timeout: float,
                          headers: dict[str, str] | None = None, deadline: float | None = None) -> int:
        """Stream ``url`` into ``destination``; return the bytes written. The caller cleans up on error.

        ``timeout`` bounds each connect and read; ``deadline`` (seconds, None for none) the whole
        download, redirects included, so a server dripping bytes cannot hold it forever.
        """
        scope = asyncio.timeout(deadline)
        try:
            async with scope:
                return await self._write(url, destination, headers, max_bytes, timeout)
        except TimeoutError:
            if not scope.expired():
                raise
            raise UpstreamTimeout(f"Downloading {url[:200]} took longer than {deadline:g} s "
                                  "(raise INGRAIN_DOWNLOAD_DEADLINE_S to allow longer downloads).") from None

    async def _write(self, url: str, destination: Path, headers: dict[str, str] | None, max_bytes: int,
                     timeout: float) -> int:
        written = 0
        with open(destination, "wb") as handle:
            async with aclosing(self._stream(url, headers, max_bytes, timeout)) as chunks:
                async for chunk in chunks:
                    handle.write(chunk)
                    written += len(chunk)
        return written
