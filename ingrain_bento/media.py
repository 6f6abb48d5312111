"""Image inputs: base64, ``data:image/...;base64,`` URIs and http(s) URLs, to RGB PIL images.

Limits are checked before the expensive step: encoded size before decoding base64 or
fetching on, pixel counts from the headers before any pixel is decoded (per image, and for the
whole request: a request of many decompression bombs is refused before one allocates), with
Pillow's own bomb guard on behind them. Only the formats people send are opened. Every error
names the index of the image in the request.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import warnings

from PIL import Image, ImageOps

from ingrain_bento.errors import BadRequest, IngrainError, TooLarge
from ingrain_bento.fetch import SafeFetcher
from ingrain_bento.settings import Settings

__all__ = ["FORMATS", "ImageLoader", "decode_image"]

# What clients send: photos (a phone's MPO opens as JPEG), screenshots, the first frame of a GIF,
# scans. Not EPS (Ghostscript), PSD, ICNS or the other formats Pillow could open.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
Image.init()  # registers every plugin, so that ``formats=`` can name WEBP and TIFF


def _decode_base64(value: str, index: int, max_bytes: int) -> bytes:
    if value.startswith("data:"):
        header, _, value = value.partition(",")
        if ";base64" not in header:
            raise BadRequest(f"Image {index}: data URIs must be base64 encoded ('data:image/png;base64,...').")
    value = "".join(value.split())
    if len(value) * 3 // 4 - value[-2:].count("=") > max_bytes:
        raise TooLarge(f"Image {index} is over the {max_bytes}-byte cap for one image.")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(
            f"Image {index} is neither an http(s) URL nor valid base64 (or a data:image/...;base64, URI)."
        ) from None


def decode_image(data: bytes, index: int, max_pixels: int) -> Image.Image:
    """Bytes to an upright RGB image, or a 400 that says what is wrong with image ``index``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opened = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = opened.size
            if width * height > max_pixels:
                raise BadRequest(f"Image {index} is {width}x{height} pixels, over the {max_pixels}-pixel cap.")
            opened.load()
            return ImageOps.exif_transpose(opened).convert("RGB")
    except IngrainError:
        raise
    except Image.DecompressionBombError:
        raise BadRequest(f"Image {index} is over the {max_pixels}-pixel cap (a decompression bomb).") from None
    except Image.UnidentifiedImageError:
        raise BadRequest(f"Image {index} is not an image in a format this server reads "
                         f"({', '.join(FORMATS)}).") from None
    except Exception as exc:  # PIL raises many types for corrupt, truncated or unknown data
        raise BadRequest(f"Image {index} could not be decoded as an image ({type(exc).__name__}).") from None


def pixel_count(data: bytes, index: int, max_pixels: int) -> int:
    """Width x height from the header alone (no pixel is decoded); a 400 over ``max_pixels``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            width, height = Image.open(io.BytesIO(data), formats=FORMATS).size
    except Image.DecompressionBombError:
        raise BadRequest(f"Image {index} is over the {max_pixels}-pixel cap (a decompression bomb).") from None
    except Exception:
        raise BadRequest(f"Image {index} is not an image in a format this server reads "
                         f"({', '.join(FORMATS)}).") from None
    if width * height > max_pixels:
        raise BadRequest(f"Image {index} is {width}x{height} pixels, over the {max_pixels}-pixel cap.")
    return int(width) * int(height)


class ImageLoader:
    """Turns the strings of a request into encoded image bytes, fetching URLs concurrently."""

    def __init__(self, fetcher: SafeFetcher, settings: Settings) -> None:
        self.fetcher = fetcher
        self.settings = settings
        # Pillow's own guard behind ours: it warns past this and refuses past twice this (our cap is
        # checked first, with a message that names the image's size).
        Image.MAX_IMAGE_PIXELS = max(settings.max_image_pixels, Image.MAX_IMAGE_PIXELS or 0)

    async def _bytes(self, value: str, index: int, headers: dict[str, str] | None) -> bytes:
        if value.startswith(("http://", "https://")):
            try:
                return await self.fetcher.fetch_bytes(
                    value, headers=headers, max_bytes=self.settings.max_image_bytes,
                    timeout=self.settings.image_timeout_s,
                )
            except IngrainError as exc:
                exc.message = f"Image {index}: {exc.message}"
                raise
        return _decode_base64(value, index, self.settings.max_image_bytes)

    async def fetch(self, values: list[str], headers: dict[str, str] | None = None) -> list[bytes]:
        """The encoded bytes of every image of a request, in order; the first bad one fails it."""
        return list(await asyncio.gather(*(self._bytes(v, i, headers) for i, v in enumerate(values))))

    def check_pixels(self, encoded: list[bytes]) -> None:
        """413 when the request's images hold more pixels than ``INGRAIN_MAX_REQUEST_PIXELS``."""
        total = sum(pixel_count(data, index, self.settings.max_image_pixels) for index, data in enumerate(encoded))
        cap = self.settings.max_request_pixels
        if total > cap:
            raise TooLarge(f"The request's {len(encoded)} images hold {total} pixels, over the {cap}-pixel cap for "
                           "one request: split the request.")

    def decode(self, data: bytes, index: int) -> Image.Image:
        return decode_image(data, index, self.settings.max_image_pixels)
