"""The image of an `image_url` part, or the video of a `video_url` part (an omnilm extension, as
vLLM's), fetched under the server's rules (MediaSettings).

    data:image/<type>;base64,<payload>   always accepted; an image media type (video/<type> for a
                                         video), base64, at most max_image_bytes (max_video_bytes)
                                         once decoded
    /a/path.png, rel/path.png, file://…  only under --allowed-local-media-path: no `..` component,
                                         raw or percent-encoded (any depth), and the real path
                                         (symlinks resolved) inside that folder
    http://…, https://…                  only with --allow-remote-media: every address the host
                                         resolves to must be public (see is_public_address), and
                                         the connection goes to the address checked, so DNS cannot
                                         answer differently in between; redirects are followed by
                                         hand, each hop checked again (at most MAX_REDIRECTS); no
                                         proxy from the environment; remote_timeout seconds for
                                         all hops (checked between chunks; name resolution aside);
                                         the body streamed and cut off past max_image_bytes
                                         (max_video_bytes)

Whatever the source, an image's header is read before any pixel is decoded: over max_image_pixels
is refused, and then omnilm.data.image.load_image decodes it under its own limits (side, aspect
ratio, Pillow's decompression-bomb limit). A video is decoded by the caller's reader (the
processor's frame sampling under the server's VideoLimits: bytes, frames, seconds, side, all
checked before a frame is decoded).

Refusals raise MediaError, a one-line OmniInputError whose `status` is the HTTP status to answer:

    400  the source is malformed or unreadable: not a data/file/http(s) URL or path, not base64,
         not an image (video) media type, a NUL in a path, no such file, a host that does not
         resolve, a remote answer that is not 200 or never comes, too many redirects, not an image
         (not a video)
    403  the server's settings forbid it: local files without an allowed folder, a path outside it
         or with `..`, remote URLs without --allow-remote-media, an address that is not public
    413  too large: more bytes than max_image_bytes, more pixels than max_image_pixels; a video
         over max_video_bytes or its VideoLimits
"""

from __future__ import annotations

import io
import ipaddress
import os
import re
import socket
import stat
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import unquote, urljoin, urlsplit

import httpx
from PIL import Image

from omnilm.data.image import data_url_bytes, load_image
from omnilm.data.video import VideoTooLarge
from omnilm.errors import OmniInputError
from omnilm.serve.settings import MediaSettings

MAX_REDIRECTS = 3
T = TypeVar("T")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# NAT64's well-known prefix (RFC 6052) routes to the IPv4 address in its last 32 bits.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class MediaError(OmniInputError):
    """A media source refused; `status` is the HTTP status that fits (see the module docstring)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class _Kind:
    """What a fetch is for, as its messages and size check say it."""

    noun: str  # "image" or "video": also the data URL's media type, image/... or video/...
    max_bytes: int
    flag: str  # the setting that raises max_bytes
    suffix: str  # a file type of the kind, for examples

    @property
    def data_url(self) -> str:
        return f"data:{self.noun}/...;base64"

    @property
    def a_noun(self) -> str:
        return ("an " if self.noun[0] in "aeiou" else "a ") + self.noun


def fetch_image(url: str, settings: MediaSettings,
                address_check: Callable[[IPAddress], bool] | None = None) -> Image.Image:
    """The image `url` names, decoded; MediaError when it is refused or cannot be read.

    `address_check` decides which addresses a remote fetch may connect to (default
    is_public_address); it is asked again for every redirect.
    """
    kind = _Kind("image", settings.max_image_bytes, "--max-image-bytes", "png")
    data, name = _fetch(url, kind, settings, address_check)
    return _decode(data, name, settings.max_image_pixels)


def fetch_video(url: str, settings: MediaSettings, read: Callable[[Path], T],
                address_check: Callable[[IPAddress], bool] | None = None) -> T:
    """The video `url` names, under the same rules as an image (a data:video/... URL, an allowed
    local file, a public http(s) URL) and at most max_video_bytes; `read` decodes it from a
    temporary file (e.g. `Processor.read_video` under the server's VideoLimits), its one-line
    errors answered 400 (413 for a limit)."""
    kind = _Kind("video", settings.max_video_bytes, "--max-video-bytes", "mp4")
    data, name = _fetch(url, kind, settings, address_check)
    with tempfile.TemporaryDirectory(prefix="omnilm-video-") as folder:
        path = Path(folder) / "video"
        path.write_bytes(data)
        try:
            return read(path)
        except OmniInputError as e:  # it names the temporary file: name what was sent instead
            reason = str(e).replace(str(path), f"video {name}")
            raise MediaError(reason if name in reason else f"video {name}: {reason}",
                             413 if isinstance(e, VideoTooLarge) else 400) from None


def _fetch(url: str, kind: _Kind, settings: MediaSettings,
           address_check: Callable[[IPAddress], bool] | None) -> tuple[bytes, str]:
    """The bytes `url` names and a name for them in messages."""
    if not isinstance(url, str) or not url:
        raise MediaError(f"the {kind.noun} URL is empty: send a {kind.data_url} URL")
    if "\0" in url:
        raise MediaError(f"the {kind.noun} URL {shown(url)} holds a NUL character: check it")
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):", url)
    scheme = scheme.group(1).lower() if scheme else ""
    if scheme == "data":
        return _data_bytes(url, kind), f"<data URL, {len(url)} characters>"
    if scheme in ("", "file"):
        return _local_bytes(url, scheme == "file", kind, settings), shown(url)
    if scheme in ("http", "https"):
        return _remote_bytes(url, kind, settings, address_check or is_public_address), shown(url)
    raise MediaError(f"the {kind.noun} URL {shown(url)} has scheme {scheme!r}: send a {kind.data_url} URL "
                     "(or a path, or an http(s) URL, where the server allows them)")


def is_public_address(ip: IPAddress) -> bool:
    """Whether `ip` is a globally routable unicast address: not private, loopback, link-local,
    shared (100.64/10), multicast, reserved or unspecified, nor an IPv6 form of such an IPv4
    address (IPv4-mapped, 6to4, NAT64)."""
    if not ip.is_global or ip.is_multicast:
        return False
    if ip.version == 6:
        embedded = [ip.ipv4_mapped, ip.sixtofour,
                    ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _NAT64 else None]
        return all(is_public_address(v4) for v4 in embedded if v4 is not None)
    return True


# --- data: URLs ----------------------------------------------------------------------------------


def _data_bytes(url: str, kind: _Kind) -> bytes:
    media_type = url[len("data:"):].partition(",")[0].partition(";")[0].strip().lower()
    if not media_type.startswith(f"{kind.noun}/"):
        raise MediaError(f"the data URL's media type is {shown(media_type) if media_type else 'missing'}, not "
                         f"{kind.a_noun} type: send data:{kind.noun}/{kind.suffix};base64,... (or another "
                         f"{kind.noun}/ type)")
    try:
        data = data_url_bytes(url)
    except OmniInputError as e:
        raise MediaError(str(e)) from None
    _check_bytes(len(data), kind, f"the data URL's {kind.noun}")
    return data


# --- local files ---------------------------------------------------------------------------------


def _local_bytes(url: str, is_file_url: bool, kind: _Kind, settings: MediaSettings) -> bytes:
    root = settings.allowed_local_media_path
    if root is None:
        raise MediaError(f"{kind.noun} {shown(url)}: this server reads no local files; send the {kind.noun} as a "
                         f"{kind.data_url} URL (or start the server with --allowed-local-media-path DIR)", 403)
    raw = url
    if is_file_url:
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise MediaError(f"{kind.noun} {shown(url)} names host {shown(parts.netloc)}: a file URL reads this "
                             f"machine's files only; write file:///path/to/{kind.noun}.{kind.suffix}")
        raw = parts.path
    # `..` is refused in every form: raw, and each round of percent-decoding (%2e%2e, %252e%252e, ...).
    form, forms = raw, [raw]
    while (decoded := unquote(form)) != form:
        forms.append(form := decoded)
    if any(".." in re.split(r"[/\\]", f) for f in forms):
        raise MediaError(f"{kind.noun} {shown(url)} has a '..' path component: name the file by its path inside "
                         "the allowed folder", 403)
    path = unquote(raw) if is_file_url else raw  # a file URL is percent-encoded once
    if "\0" in path:
        raise MediaError(f"{kind.noun} {shown(url)} decodes to a path with a NUL character: check it")
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, path))  # an absolute path replaces the root
    if not Path(real).is_relative_to(real_root):
        raise MediaError(f"{kind.noun} {shown(url)} is outside the folder this server reads media from: "
                         f"send it as a {kind.data_url} URL", 403)
    what = f"{kind.noun} {shown(url)}"
    try:
        # No following a symlink put in place since realpath, and no waiting on a FIFO.
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        with open(fd, "rb") as f:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise MediaError(f"{what} is not a file: name {kind.a_noun} file")
            _check_bytes(info.st_size, kind, what)
            data = f.read(kind.max_bytes + 1)  # the file may have grown since fstat
    except OSError as e:
        raise MediaError(f"cannot read {what}: {e.strerror}; check the path") from None
    _check_bytes(len(data), kind, what)
    return data


# --- remote URLs ---------------------------------------------------------------------------------


def _remote_bytes(url: str, kind: _Kind, settings: MediaSettings,
                  address_check: Callable[[IPAddress], bool]) -> bytes:
    if not settings.allow_remote_media:
        raise MediaError(f"{kind.noun} {shown(url)}: this server fetches no remote URLs; send the {kind.noun} as a "
                         f"{kind.data_url} URL (or start the server with --allow-remote-media)", 403)
    deadline = time.monotonic() + settings.remote_timeout
    # trust_env=False: a proxy from the environment would connect on our behalf, past the address check.
    with httpx.Client(follow_redirects=False, trust_env=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            target, host = _pinned(url, kind, address_check)
            try:
                with client.stream("GET", target, headers={"Host": host, "Accept-Encoding": "identity"},
                                   timeout=max(0.0, deadline - time.monotonic()),
                                   extensions={"sni_hostname": urlsplit(url).hostname}) as response:  # TLS checks the name
                    if response.is_redirect:
                        url = urljoin(url, response.headers["location"])
                        continue
                    return _read_response(response, url, kind, settings.remote_timeout, deadline)
            except (httpx.HTTPError, httpx.InvalidURL) as e:
                reason = " ".join(str(e).split()) or type(e).__name__
                raise MediaError(f"cannot fetch {kind.noun} {shown(url)}: {reason}; check the URL") from None
    raise MediaError(f"{kind.noun} {shown(url)}: more than {MAX_REDIRECTS} redirects; send the final URL")


def _pinned(url: str, kind: _Kind, address_check: Callable[[IPAddress], bool]) -> tuple[str, str]:
    """`url` with its host replaced by the address it resolves to, once every address it resolves
    to has passed `address_check`; and the Host header for it."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError as e:  # a bad port or IPv6 literal
        raise MediaError(f"{kind.noun} URL {shown(url)} is malformed ({e}): check it") from None
    if parts.scheme.lower() not in ("http", "https"):  # a redirect may point anywhere
        raise MediaError(f"{kind.noun} {shown(url)}: a remote {kind.noun} may only redirect to http(s) URLs")
    if not host:
        raise MediaError(f"{kind.noun} URL {shown(url)} has no host: check it")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise MediaError(f"cannot fetch {kind.noun} {shown(url)}: host {host!r} does not resolve; "
                         "check the URL") from None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    refused = [ip for ip in addresses if not address_check(ip)]
    if refused:
        raise MediaError(f"{kind.noun} {shown(url)}: host {host!r} resolves to {refused[0]}, which is not a public "
                         "address; this server fetches from public addresses only", 403)
    ip, named = addresses[0], f"[{host}]" if ":" in host else host  # IPv6 literals go in brackets
    netloc = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
    return parts._replace(netloc=netloc).geturl(), named if parts.port is None else f"{named}:{parts.port}"


def _read_response(response: httpx.Response, url: str, kind: _Kind, timeout: float, deadline: float) -> bytes:
    """The body of a final (not redirecting) answer, within the size cap and the deadline."""
    if response.status_code != 200:
        raise MediaError(f"cannot fetch {kind.noun} {shown(url)}: the server answered HTTP {response.status_code}; "
                         "check the URL")
    encoding = response.headers.get("content-encoding", "identity").lower()
    if encoding != "identity":
        raise MediaError(f"cannot fetch {kind.noun} {shown(url)}: it came {encoding}-encoded though none was "
                         f"asked; send it as a {kind.data_url} URL")
    declared = response.headers.get("content-length", "")
    if declared.isdigit():
        _check_bytes(int(declared), kind, f"{kind.noun} {shown(url)}")
    data = bytearray()
    for chunk in response.iter_raw():
        data += chunk
        _check_bytes(len(data), kind, f"{kind.noun} {shown(url)}", at_least=True)
        if time.monotonic() > deadline:
            raise MediaError(f"cannot fetch {kind.noun} {shown(url)}: it took over {timeout:g} s "
                             f"(--remote-timeout); send it as a {kind.data_url} URL")
    return bytes(data)


# --- checks shared by every source ---------------------------------------------------------------


def _check_bytes(n: int, kind: _Kind, what: str, at_least: bool = False) -> None:
    """Refuse `n` bytes (`at_least`: the count so far of a body still coming) over the kind's limit."""
    if n > kind.max_bytes:
        raise MediaError(f"{what} is {'at least ' if at_least else ''}{n} bytes, over the server's limit of "
                         f"{kind.max_bytes} ({kind.flag}): send a smaller {kind.noun}", 413)


def _decode(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """`data` decoded by load_image, once its header (read alone: Image.open decodes nothing) holds
    at most `max_pixels` pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # load_image refuses those
            width, height = Image.open(io.BytesIO(data)).size
    except Image.DecompressionBombError as e:  # over twice Pillow's own limit, so over ours too
        pixels = re.search(r"\d+", str(e))
        raise MediaError(f"image {name} has {pixels.group() if pixels else 'too many'} pixels, over the limit of "
                         f"{max_pixels} (--max-image-pixels): downscale it", 413) from None
    except Exception:
        pass  # a header Pillow cannot read: load_image below says why, as for any other image
    else:
        if width * height > max_pixels:
            raise MediaError(f"image {name} is {width}x{height} = {width * height} pixels, over the limit of "
                             f"{max_pixels} (--max-image-pixels): downscale it", 413)
    try:
        return load_image(data)
    except OmniInputError as e:
        raise MediaError(str(e)) from None


def shown(text: str, limit: int = 80) -> str:
    """`text` fit for a one-line message: quoted when it holds unprintable characters, cut at `limit`."""
    text = text if len(text) <= limit else text[:limit - 3] + "..."
    return text if text.isprintable() else repr(text)
