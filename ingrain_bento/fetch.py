"""The one HTTP downloader for everything a client asks the server to fetch.

Image URLs and custom-model files both come through here, so the guard is in one place:
http/https only; every address a host resolves to is checked against loopback, private,
link-local, multicast, reserved and cloud-metadata ranges (refused unless
``INGRAIN_ALLOW_PRIVATE_URLS``); redirects are followed by hand so each hop is re-checked;
connect/read timeouts; size caps enforced while streaming, not trusted from headers.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx

from ingrain_bento.errors import BadRequest, TooLarge, UpstreamFailed, UpstreamTimeout

MAX_REDIRECTS = 5
CHUNK_BYTES = 1 << 20
_METADATA_HOSTS = {"metadata.google.internal", "metadata", "instance-data"}


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


async def check_url(url: str, allow_private: bool) -> None:
    """Raise 400 unless ``url`` is http(s) and (unless allowed) resolves only to public addresses."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise BadRequest(f"Malformed URL {url[:100]!r}: {exc}.") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadRequest(f"Only http:// and https:// URLs can be fetched, not {url[:100]!r}.")
    if allow_private:
        return
    host = parts.hostname.lower()
    if host in _METADATA_HOSTS:
        raise BadRequest(f"Refusing to fetch {host!r}: cloud metadata addresses are never fetched.")
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port or 443, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UpstreamFailed(f"Could not resolve host {host!r}: {exc}.") from None
    for info in infos:
        address = str(info[4][0])
        if not _is_public(address):
            raise BadRequest(
                f"Refusing to fetch {host!r}: it resolves to the non-public address {address} "
                "(set INGRAIN_ALLOW_PRIVATE_URLS=true to allow loopback/private addresses)."
            )


class SafeFetcher:
    """Fetches client-named URLs under the guard above. One instance per process."""

    def __init__(self, allow_private: bool) -> None:
        self.allow_private = allow_private
        self._client: httpx.AsyncClient | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(follow_redirects=False, trust_env=False)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def _stream(self, url: str, headers: dict[str, str] | None, max_bytes: int,
                      timeout: float) -> AsyncIterator[bytes]:
        """Yield the body of ``url`` (after checked redirects) in chunks, capped at ``max_bytes``."""
        httpx_timeout = httpx.Timeout(timeout, connect=min(timeout, 10.0))
        try:
            for _ in range(MAX_REDIRECTS + 1):
                await check_url(url, self.allow_private)
                try:
                    request = self.client.build_request("GET", url, headers=headers, timeout=httpx_timeout)
                    response = await self.client.send(request, stream=True)
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
                chunks = [chunk async for chunk in self._stream(url, headers, max_bytes, timeout)]
        except TimeoutError:
            raise UpstreamTimeout(f"Fetching {url[:200]} timed out after {timeout:g} s.") from None
        return b"".join(chunks)

    async def download_to(self, url: str, destination: Path, *, max_bytes: int, timeout: float,
                          headers: dict[str, str] | None = None) -> int:
        """Stream ``url`` into ``destination``; return the bytes written. The caller cleans up on error."""
        written = 0
        with open(destination, "wb") as handle:
            async for chunk in self._stream(url, headers, max_bytes, timeout):
                handle.write(chunk)
                written += len(chunk)
        return written
