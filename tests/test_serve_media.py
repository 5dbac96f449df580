"""omnilm.serve.media: what an `image_url` may name, and how large it may be. (test_serve_api
imports the image helpers here.)

Remote fetches run against a small HTTP server on 127.0.0.1 started here: the default address
check refuses it (loopback) before any request reaches it; an injected check that allows the first
hop only proves that each redirect is checked again.
"""

import base64
import http.server
import io
import ipaddress
import os
import struct
import sys
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from omnilm.serve.media import MAX_REDIRECTS, MediaError, fetch_image, is_public_address
from omnilm.serve.settings import MediaSettings


def png(width: int = 32, height: int = 32, noise: bool = False) -> bytes:
    """A red PNG, or with `noise` one of random pixels (which PNG cannot compress)."""
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8) if noise else \
        np.full((height, width, 3), (200, 30, 30), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares `width` x `height` pixels and holds a few bytes of them: only a decoder
    that ignores the header would notice the rest missing."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def refused(url: str, settings: MediaSettings, status: int, *parts: str, **kw) -> str:
    """fetch_image refuses `url` with a one-line MediaError of `status` holding every part."""
    with pytest.raises(MediaError) as info:
        fetch_image(url, settings, **kw)
    message = str(info.value)
    assert info.value.status == status and "\n" not in message, (info.value.status, message)
    for part in parts:
        assert part in message, message
    return message


# --- addresses -----------------------------------------------------------------------------------


@pytest.mark.parametrize("address", [
    "127.0.0.1", "127.255.0.9", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1",
    "0.0.0.0", "255.255.255.255", "224.0.0.1", "240.0.0.1", "192.0.2.1", "198.18.0.1",
    "::1", "::", "fe80::1", "fc00::1", "fd12:3456::1", "ff02::1", "2001:db8::1",
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254",
    "2002:7f00:1::1", "2002:a00:1::1",  # 6to4 around 127.0.0.1 and 10.0.0.1
    "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe",  # NAT64 of 127.0.0.1 and 169.254.169.254
])
def test_non_public_addresses_are_refused(address):
    assert not is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111",
                                     "::ffff:8.8.8.8", "2002:808:808::1", "64:ff9b::808:808"])
def test_public_addresses_pass(address):
    assert is_public_address(ipaddress.ip_address(address))


# --- data: URLs ------------------------------------------------------------------------------------


def test_a_data_url_image_is_decoded():
    image = fetch_image(data_url(png(40, 30)), MediaSettings())
    assert image.size == (40, 30)


@pytest.mark.parametrize("url, status, part", [
    (data_url(png(), "text/plain"), 400, "text/plain, not an image type"),
    ("data:,aGVsbG8=", 400, "missing, not an image type"),
    ("data:image/png,rawbytes", 400, "not base64"),
    ("data:image/png;base64,!!!!", 400, "broken base64"),
    (data_url(b"not an image"), 400, "not a format Pillow recognises"),
    (data_url(png()[:60]), 400, "cannot read image"),
])
def test_bad_data_urls_are_refused(url, status, part):
    refused(url, MediaSettings(), status, part)


def test_an_image_over_the_byte_limit_is_refused():
    refused(data_url(png(64, 64)), MediaSettings(max_image_bytes=100), 413, "over the server's limit of 100",
            "--max-image-bytes")


@pytest.mark.parametrize("width, height, status, part", [
    (20_000, 20_000, 413, "400000000 pixels"),  # past Pillow's own bomb limit as well
    (2_000, 1_000, 413, "2000x1000 = 2000000 pixels"),
])
def test_too_many_pixels_are_refused_before_decoding(monkeypatch, width, height, status, part):
    def no_decoding(self):
        raise AssertionError("pixels were decoded")
    monkeypatch.setattr(Image.Image, "load", no_decoding)
    refused(data_url(png_header(width, height)), MediaSettings(max_image_pixels=1_000_000), status, part,
            "--max-image-pixels")


# --- local files -----------------------------------------------------------------------------------


@pytest.fixture()
def media(tmp_path):
    """An allowed folder (with an image, a sub-folder, a symlink out, a FIFO) beside a secret image."""
    allowed = tmp_path / "allowed"
    (allowed / "sub").mkdir(parents=True)
    (allowed / "red.png").write_bytes(png())
    (allowed / "sub" / "blue.png").write_bytes(png(16, 16))
    (tmp_path / "secret.png").write_bytes(png())
    (allowed / "escape.png").symlink_to(tmp_path / "secret.png")
    (allowed / "inside.png").symlink_to(allowed / "red.png")
    (allowed / "out").symlink_to(tmp_path)
    os.mkfifo(allowed / "fifo.png")
    return allowed


@pytest.mark.parametrize("url", ["red.png", "sub/blue.png", "inside.png", "{allowed}/red.png",
                                 "file://{allowed}/red.png", "file://localhost{allowed}/sub/blue.png",
                                 "file://{allowed}/%72ed.png"])
def test_local_images_inside_the_folder_are_read(media, url):
    assert fetch_image(url.format(allowed=media), MediaSettings(allowed_local_media_path=media)).width > 0


@pytest.mark.parametrize("url, status, part", [
    ("../secret.png", 403, "'..' path component"),
    ("sub/../../secret.png", 403, "'..' path component"),
    ("%2e%2e/secret.png", 403, "'..' path component"),
    ("%252e%252e/secret.png", 403, "'..' path component"),
    ("file://{allowed}/%2e%2e/secret.png", 403, "'..' path component"),
    ("file://{allowed}/..%2fsecret.png", 403, "'..' path component"),
    ("..\\secret.png", 403, "'..' path component"),
    ("{root}/secret.png", 403, "outside the folder"),
    ("file:///etc/passwd", 403, "outside the folder"),
    ("escape.png", 403, "outside the folder"),
    ("out/secret.png", 403, "outside the folder"),
    ("file://example.com/red.png", 400, "names host"),
    ("nope.png", 400, "No such file"),
    ("sub", 400, "Is a directory"),
    ("fifo.png", 400, "not a file"),
    ("file://{allowed}/red%00.png", 400, "NUL"),
])
def test_local_paths_that_leave_the_folder_or_name_nothing_are_refused(media, url, status, part):
    refused(url.format(allowed=media, root=media.parent), MediaSettings(allowed_local_media_path=media), status, part)


def test_no_local_file_is_read_without_an_allowed_folder(media):
    refused(str(media / "red.png"), MediaSettings(), 403, "reads no local files", "--allowed-local-media-path")


def test_a_local_file_over_the_byte_limit_is_refused(media):
    refused("red.png", MediaSettings(allowed_local_media_path=media, max_image_bytes=10), 413, "--max-image-bytes")


# --- remote URLs -----------------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    """/image.png; /redirect/N redirects N times, then to /image.png; /to?url=U redirects to U;
    /big sends more than any test's byte limit; /slow takes 3 s; anything else is 404."""

    def do_GET(self):
        self.server.seen.append(self.path)
        if self.path == "/image.png":
            self._send(200, png())
        elif self.path.startswith("/redirect/"):
            n = int(self.path.rsplit("/", 1)[1])
            self._redirect(f"/redirect/{n - 1}" if n > 1 else "/image.png")
        elif self.path.startswith("/to?url="):
            self._redirect(self.path[len("/to?url="):])
        elif self.path == "/big":
            self._send(200, b"\0" * 100_000, length=False)
        elif self.path == "/slow":
            time.sleep(3)
            self._send(200, png())
        else:
            self._send(404, b"no")

    def _send(self, status: int, body: bytes, length: bool = True):
        self.send_response(status)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


class _Server(http.server.ThreadingHTTPServer):
    """Quiet when a client hangs up early (the byte-limit and timeout tests do so on purpose):
    the default handler prints the BrokenPipeError to stderr, seconds later, into whatever test
    is then capturing it."""

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@pytest.fixture(scope="module")
def web():
    """The image server on 127.0.0.1: (base URL, the list of paths it was asked for)."""
    server = _Server(("127.0.0.1", 0), _Handler)
    server.seen = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", server.seen
    server.shutdown()
    server.server_close()  # joins the handler threads, the slow one included


REMOTE = MediaSettings(allow_remote_media=True, max_image_bytes=50_000, remote_timeout=1.0)


def anywhere(ip) -> bool:
    return True


def test_no_remote_url_is_fetched_without_the_flag(web):
    base, seen = web
    seen.clear()
    refused(f"{base}/image.png", MediaSettings(), 403, "fetches no remote URLs", "--allow-remote-media")
    assert seen == []


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "127.1", "0x7f000001", "2130706433"])
def test_loopback_is_refused_even_with_the_flag(web, host):
    base, seen = web
    seen.clear()
    refused(base.replace("127.0.0.1", host) + "/image.png", REMOTE, 403, "127.0.0.1, which is not a public address")
    assert seen == []  # refused before connecting


def test_an_allowed_address_is_fetched_and_each_redirect_checked(web):
    base, seen = web
    checked = []
    image = fetch_image(f"{base}/redirect/3", REMOTE, address_check=lambda ip: checked.append(ip) or True)
    assert image.size == (32, 32)
    assert len(checked) == 4 and all(str(ip) == "127.0.0.1" for ip in checked)


def test_a_redirect_to_a_refused_address_is_not_followed(web):
    base, seen = web
    seen.clear()
    first_hop_only = iter([True])  # the first check passes, the redirect's is refused
    refused(f"{base}/redirect/1", REMOTE, 403, "not a public address",
            address_check=lambda ip: next(first_hop_only, False))
    assert seen == ["/redirect/1"]  # /image.png was never asked for


@pytest.mark.parametrize("path, status, part", [
    (f"/redirect/{MAX_REDIRECTS + 1}", 400, f"more than {MAX_REDIRECTS} redirects"),
    ("/to?url=file:///etc/passwd", 400, "may only redirect to http(s) URLs"),
    ("/missing", 400, "answered HTTP 404"),
    ("/big", 413, "--max-image-bytes"),
    ("/slow", 400, "cannot fetch image"),
])
def test_remote_failures_are_refused(web, path, status, part):
    base, _ = web
    start = time.monotonic()
    refused(base + path, REMOTE, status, part, address_check=anywhere)
    assert time.monotonic() - start < 2.5  # the 1 s timeout holds
