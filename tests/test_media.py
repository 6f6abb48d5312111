"""Image inputs: ``ImageLoader.fetch``/``decode`` and ``decode_image``.

An image is a base64 string, a ``data:image/...;base64,`` URI or an http(s) URL. Whatever
the format or mode, it comes back as an upright RGB ``PIL.Image``. Limits are checked
before the expensive step, and every error names the index of the image in the request.
"""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from ingrain_bento.errors import BadRequest, TooLarge, UpstreamFailed
from ingrain_bento.fetch import SafeFetcher
from ingrain_bento.media import ImageLoader, decode_image
from ingrain_bento.settings import Settings

# ---- helpers -----------------------------------------------------------------------------

def encode(image: Image.Image, fmt: str, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def sample(mode: str = "RGB", size: tuple[int, int] = (32, 16)) -> Image.Image:
    image = Image.new("RGB", size, (200, 40, 10))
    image.paste((10, 40, 200), (0, 0, size[0] // 2, size[1]))  # left half blue, right half red
    if mode == "P":
        return image.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    return image.convert(mode)


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG of ``width`` x ``height`` 1-bit pixels whose body compresses to a few KiB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def load(values: list[str], headers: dict[str, str] | None = None, **settings) -> list[Image.Image]:
    """``ImageLoader(...).fetch(values)`` then ``.decode`` each, on a fresh event loop (private
    URLs allowed by default).

    The limits are the documented defaults unless a test overrides one, whatever the environment says.
    """
    defaults = {"allow_private_urls": True, "max_image_bytes": 20 * 1024 * 1024,
                "max_image_pixels": 50_000_000, "max_request_pixels": 400_000_000, "image_timeout_s": 10.0}
    config = Settings(**{**defaults, **settings})

    async def main():
        fetcher = SafeFetcher(allow_private=config.allow_private_urls)
        try:
            loader = ImageLoader(fetcher, config)
            encoded = await asyncio.wait_for(loader.fetch(values, headers), 10)
            loader.check_pixels(encoded)
            return [loader.decode(data, index) for index, data in enumerate(encoded)]
        finally:
            await fetcher.aclose()

    return asyncio.run(main())


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802
        self.server.requests.append((self.path, dict(self.headers)))
        body = self.server.files.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")


@pytest.fixture(scope="module")
def server():
    """A local HTTP server: put bytes in ``server.files[path]``; ``server.requests`` logs hits."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.files = {}
    httpd.requests = []
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


# ---- formats and modes -------------------------------------------------------------------

FORMATS = [
    pytest.param("RGB", "PNG", (32, 16), id="png-rgb"),
    pytest.param("RGB", "JPEG", (32, 16), id="jpeg"),
    pytest.param("RGB", "WEBP", (32, 16), id="webp"),
    pytest.param("RGBA", "PNG", (32, 16), id="png-rgba"),
    pytest.param("L", "PNG", (32, 16), id="png-grayscale"),
    pytest.param("P", "PNG", (32, 16), id="png-palette"),
    pytest.param("RGB", "GIF", (32, 16), id="gif"),
    pytest.param("RGB", "PNG", (1, 1), id="1x1"),
    pytest.param("RGB", "JPEG", (1, 1), id="1x1-jpeg"),
]


@pytest.mark.parametrize("mode, fmt, size", FORMATS)
def test_base64_images_come_back_rgb_with_their_size(mode, fmt, size):
    [image] = load([b64(encode(sample(mode, size), fmt))])
    assert image.mode == "RGB"
    assert image.size == size


@pytest.mark.parametrize("mode, fmt, size", FORMATS)
def test_data_uris_come_back_rgb_with_their_size(mode, fmt, size):
    uri = f"data:image/{fmt.lower()};base64," + b64(encode(sample(mode, size), fmt))
    [image] = load([uri])
    assert image.mode == "RGB"
    assert image.size == size


def test_pixels_survive_decoding():
    [image] = load([b64(encode(sample("RGB", (32, 16)), "PNG"))])
    assert image.getpixel((0, 0)) == (10, 40, 200)
    assert image.getpixel((31, 15)) == (200, 40, 10)


def test_base64_with_line_breaks_is_accepted():
    encoded = b64(encode(sample(), "PNG"))
    wrapped = "\n".join(encoded[i:i + 76] for i in range(0, len(encoded), 76))
    [image] = load([wrapped])
    assert image.size == (32, 16)


def test_several_images_come_back_in_request_order():
    sizes = [(5, 7), (9, 3), (1, 1), (16, 16)]
    images = load([b64(encode(sample("RGB", size), "PNG")) for size in sizes])
    assert [image.size for image in images] == sizes


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    data = encode(sample("RGB", (40, 20)), "JPEG", exif=exif.tobytes())
    assert Image.open(io.BytesIO(data)).size == (40, 20)
    [image] = load([b64(data)])
    assert image.size == (20, 40)


# ---- URLs --------------------------------------------------------------------------------

def test_url_images_are_fetched_with_the_download_headers(server):
    server.files["/cat.png"] = encode(sample("RGBA", (12, 8)), "PNG")
    server.files["/dog.webp"] = encode(sample("RGB", (6, 10)), "WEBP")
    headers = {"Authorization": "Bearer img-token", "X-Trace": "abc"}
    before = len(server.requests)

    images = load([server.base + "/cat.png", b64(encode(sample(), "JPEG")), server.base + "/dog.webp"],
                  headers=headers)

    assert [(image.mode, image.size) for image in images] == [("RGB", (12, 8)), ("RGB", (32, 16)),
                                                            ("RGB", (6, 10))]
    received = server.requests[before:]
    assert sorted(path for path, _ in received) == ["/cat.png", "/dog.webp"]
    for _, sent in received:
        assert sent.get("Authorization") == "Bearer img-token"
        assert sent.get("X-Trace") == "abc"


def test_url_errors_name_the_image_index(server):
    server.files["/ok.png"] = encode(sample(), "PNG")
    with pytest.raises(UpstreamFailed) as info:
        load([server.base + "/ok.png", server.base + "/missing.png"])
    assert info.value.message.startswith("Image 1: ")
    assert "404" in info.value.message


def test_private_urls_are_refused_unless_allowed(server):
    server.files["/ok.png"] = encode(sample(), "PNG")
    before = len(server.requests)
    with pytest.raises(BadRequest) as info:
        load([server.base + "/ok.png"], allow_private_urls=False)
    assert info.value.message.startswith("Image 0: ")
    assert len(server.requests) == before


def test_a_url_image_over_max_image_bytes_is_too_large(server):
    server.files["/big.png"] = encode(sample("RGB", (64, 64)), "PNG") + b"\0" * 5000
    with pytest.raises(TooLarge) as info:
        load([server.base + "/big.png"], max_image_bytes=4000)
    assert info.value.message.startswith("Image 0: ")


def test_a_url_body_that_is_not_an_image_is_a_bad_request(server):
    server.files["/page.html"] = b"<html>not an image</html>"
    with pytest.raises(BadRequest, match="Image 0 is not an image in a format this server reads"):
        load([server.base + "/page.html"])


# ---- refused inputs ----------------------------------------------------------------------

def test_invalid_base64_names_the_image_index():
    good = b64(encode(sample(), "PNG"))
    with pytest.raises(BadRequest) as info:
        load([good, "this is not base64!!"])
    assert "Image 1" in info.value.message
    assert "base64" in info.value.message


def test_a_data_uri_that_is_not_base64_is_refused():
    with pytest.raises(BadRequest, match="Image 0: data URIs must be base64"):
        load(["data:image/svg+xml,<svg></svg>"])


def test_bytes_that_are_not_an_image_are_a_bad_request():
    with pytest.raises(BadRequest) as info:
        load([b64(b"hello, this is plain text and not an image at all")])
    assert "Image 0 is not an image in a format this server reads" in info.value.message


def test_a_truncated_png_is_a_bad_request():
    data = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "PNG")
    with pytest.raises(BadRequest, match="Image 0 could not be decoded"):
        load([b64(data[: len(data) // 2])])


def test_an_empty_image_is_a_bad_request():
    with pytest.raises(BadRequest, match="Image 0"):
        load([""])


def test_a_decompression_bomb_is_refused_before_decoding():
    bomb = png_header_only(20_000, 20_000)  # 400 megapixels in ~60 KiB
    assert len(bomb) < 200_000
    assert Settings.model_fields["max_image_pixels"].default == 50_000_000
    with pytest.raises(BadRequest) as info:
        load([b64(bomb)], max_image_pixels=50_000_000)
    assert "50000000-pixel cap" in info.value.message  # Pillow's guard, past twice its limit
    with pytest.raises(BadRequest) as info:
        load([b64(png_header_only(10_000, 6_000))], max_image_pixels=50_000_000)
    assert "10000x6000 pixels, over the 50000000-pixel cap" in info.value.message


def test_the_pixel_cap_is_a_setting():
    image = b64(encode(sample("RGB", (100, 50)), "PNG"))
    assert load([image], max_image_pixels=5000)[0].size == (100, 50)  # exactly at the cap
    with pytest.raises(BadRequest, match="Image 0 is 100x50 pixels, over the 4999-pixel cap"):
        load([image], max_image_pixels=4999)


def test_an_image_over_max_image_bytes_is_too_large():
    data = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "PNG")
    assert len(data) > 4000
    with pytest.raises(TooLarge) as info:
        load([b64(data)], max_image_bytes=4000)
    assert "Image 0" in info.value.message
    assert info.value.status_code == 413
    with pytest.raises(TooLarge):
        load(["data:image/png;base64," + b64(data)], max_image_bytes=4000)


def test_an_image_of_exactly_max_image_bytes_is_accepted():
    data = next(d for w in range(20, 40) if len(d := encode(sample("RGB", (w, 16)), "PNG")) % 3)
    assert b64(data).endswith("=")  # base64 padding is needed
    [image] = load([b64(data)], max_image_bytes=len(data))
    assert image.size[1] == 16


# ---- decode_image directly ---------------------------------------------------------------

def test_decode_image_converts_to_rgb():
    image = decode_image(encode(sample("L", (3, 4)), "PNG"), 0, max_pixels=100)
    assert (image.mode, image.size) == ("RGB", (3, 4))


def test_decode_image_names_the_index_it_is_given():
    with pytest.raises(BadRequest, match="^Image 7 is not an image"):
        decode_image(b"\x89PNG not really", 7, max_pixels=100)


# ---- formats and bombs -------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["ICO", "PCX", "TGA"])
def test_formats_people_do_not_send_are_not_opened(fmt):
    with pytest.raises(BadRequest, match="not an image in a format this server reads"):
        load([b64(encode(sample("RGB", (16, 16)), fmt))])


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_the_formats_people_send_are_opened(fmt):
    assert load([b64(encode(sample("RGB", (16, 16)), fmt))])[0].size == (16, 16)


def test_the_images_of_one_request_share_a_pixel_cap_read_from_their_headers():
    """Three 20-megapixel images, each under the per-image cap: 413 before any is decoded."""
    bombs = [b64(png_header_only(5000, 4000)) for _ in range(3)]
    with pytest.raises(TooLarge) as info:
        load(bombs, max_request_pixels=50_000_000)
    assert info.value.status_code == 413 and "60000000 pixels" in info.value.message


def test_pillows_own_bomb_guard_stays_on():
    import ingrain_bento.media  # noqa: F401

    assert Image.MAX_IMAGE_PIXELS is not None
