"""A table of image inputs, good and bad, through `ImageProcessor`: every one either becomes the
right pixels or is refused with a one-line OmniInputError that names it.

Good inputs are built from raw pixel values whose 8-bit RGB is known by formula (alpha composited
onto white, palettes looked up, 16-bit and float images mapped by their range; for lossy files, the
decoded pixels), and the result must equal what the processor makes of that RGB image: so only the
conversion to RGB is under test here (resizing and cropping are tested against transformers in
test_image.py).
"""

import base64
import colorsys
import io
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from PIL import Image, features

from conftest import one_line_error

from omnilm.data import ImageProcessor
from omnilm.data.image import MAX_ASPECT_RATIO, MAX_IMAGE_SIDE

# Mean 0 and std 1, so the output is pixel / 255; at 8 x 8 an 8 x 8 image is not resampled at all.
PLAIN = ImageProcessor(size=8, crop_size=8, image_mean=(0, 0, 0), image_std=(1, 1, 1))
PAD = ImageProcessor(size=8, crop_size=8, image_mean=(0, 0, 0), image_std=(1, 1, 1), pad_to_square=True)
CLIP = ImageProcessor(size=16, crop_size=16)  # CLIP's mean and std: the output range is checked too
NAME = object()  # in an error's expected parts: the name of the file the case wrote


@dataclass
class Case:
    id: str
    make: Callable[[Path], Any]  # tmp_path -> what is passed to the processor
    error: tuple = ()  # parts of the expected one-line message; empty: the input must work
    expected: Callable[[Any], np.ndarray] | None = None  # source -> its (H, W, 3) 8-bit RGB
    levels: float = 0  # how many 8-bit levels the conversion may be off (rounding in Pillow)
    processor: ImageProcessor = field(default_factory=lambda: PLAIN)


# --- reference conversions, by formula --------------------------------------------------------

def _grey(g):
    return np.repeat(np.asarray(g, np.float64)[..., None], 3, axis=-1)


def _on_white(rgb, alpha):
    a = np.asarray(alpha, np.float64)[..., None] / 255
    return np.asarray(rgb, np.float64) * a + 255 * (1 - a)


def _wide_to_8bit(values, mode: str):
    # The documented rule: I;16 by its full scale; I and F by the smallest standard range that holds
    # every value (F: 0..1 or 0..255; I: 0..255 or 0..65535), else by their own min..max.
    v = np.asarray(values, np.float64)
    if mode.startswith("I;16"):
        return np.rint(v / 257)
    low, high = v.min(), v.max()
    for top in ((1, 255) if mode == "F" else (255, 65535)):
        if low >= 0 and high <= top:
            return np.rint(v * 255 / top)
    return np.zeros_like(v) if high == low else np.rint((v - low) * 255 / (high - low))


def _hsv(hsv):
    flat = [colorsys.hsv_to_rgb(*(c / 255 for c in px)) for px in hsv.reshape(-1, 3)]
    return np.array(flat).reshape(hsv.shape) * 255


def _ycbcr(ycc):
    y, cb, cr = (ycc[..., i].astype(np.float64) for i in range(3))
    return np.clip(np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                             y + 1.772 * (cb - 128)], -1), 0, 255)


def _lab_grey(lightness):
    # A neutral L*a*b* colour (a = b = 128 in Pillow's 8-bit encoding) is the sRGB grey of its lightness.
    lstar = np.asarray(lightness, np.float64) * 100 / 255
    y = np.where(lstar > 8, ((lstar + 16) / 116) ** 3, lstar / 903.3)
    return _grey(255 * np.where(y > 0.0031308, 1.055 * y ** (1 / 2.4) - 0.055, 12.92 * y))


# --- the modes: a recipe per mode, from raw values to (image, expected RGB, tolerance) ----------

def _mode_recipe(mode: str, rng, w: int, h: int):
    u8 = lambda *c: rng.integers(0, 256, (h, w, *c), dtype=np.uint8)  # noqa: E731
    if mode == "1":
        bits = u8() > 127
        return Image.fromarray(bits), _grey(bits * 255), 0
    if mode in ("L", "L+transparency"):
        g = u8()
        image = Image.fromarray(g, "L")
        if mode == "L":
            return image, _grey(g), 0
        image.info["transparency"] = int(g.flat[0])
        return image, _grey(np.where(g == g.flat[0], 255, g)), 0
    if mode in ("LA", "La"):
        g, a = u8(), u8()
        image = Image.fromarray(np.stack([g, a], -1), "LA")
        # La stores premultiplied values, which lose precision where alpha is small.
        return (image, _on_white(_grey(g), a), 1) if mode == "LA" else (image.convert("La"), _on_white(_grey(g), a), 2)
    if mode == "P with an RGBA palette":
        index, palette = u8(), rng.integers(0, 256, (256, 4), dtype=np.uint8)
        image = Image.fromarray(index, "P")
        image.putpalette(palette.tobytes(), "RGBA")
        return image, _on_white(palette[index][..., :3], palette[index][..., 3]), 1
    if mode in ("P", "P+transparency", "PA"):
        index, palette = u8(), rng.integers(0, 256, (256, 3), dtype=np.uint8)
        if mode == "PA":
            a = u8()
            image = Image.fromarray(np.stack([index, a], -1), "PA")
            image.putpalette(palette.tobytes())
            return image, _on_white(palette[index], a), 1
        image = Image.fromarray(index, "P")
        image.putpalette(palette.tobytes())
        if mode == "P":
            return image, palette[index], 0
        image.info["transparency"] = int(index.flat[0])
        return image, np.where((index == index.flat[0])[..., None], 255, palette[index]), 0
    if mode in ("RGB", "RGB+transparency"):
        rgb = u8(3)
        image = Image.fromarray(rgb, "RGB")
        if mode == "RGB":
            return image, rgb, 0
        image.info["transparency"] = tuple(int(c) for c in rgb[0, 0])
        return image, np.where((rgb == rgb[0, 0]).all(-1, keepdims=True), 255, rgb), 0
    if mode in ("RGBA", "RGBa"):
        rgba = u8(4)
        image = Image.fromarray(rgba, "RGBA")
        expected = _on_white(rgba[..., :3], rgba[..., 3])
        return (image, expected, 1) if mode == "RGBA" else (image.convert("RGBa"), expected, 2)
    if mode == "RGBX":
        rgbx = u8(4)
        return Image.fromarray(rgbx, "RGBX"), rgbx[..., :3], 0
    if mode == "CMYK":
        # Pillow's (and transformers') naive conversion, without a colour profile.
        cmyk = u8(4).astype(np.float64)
        return Image.fromarray(cmyk.astype(np.uint8), "CMYK"), (255 - cmyk[..., :3]) * (255 - cmyk[..., 3:]) / 255, 1
    if mode == "YCbCr":
        ycc = u8(3)
        return Image.fromarray(ycc, "YCbCr"), _ycbcr(ycc), 2
    if mode == "LAB neutral":
        # Built band by band: Pillow reads a LAB array's a and b bytes differently from a band's.
        lightness, neutral = u8(), np.full((h, w), 128, np.uint8)
        image = Image.merge("LAB", [Image.fromarray(band, "L") for band in (lightness, neutral, neutral)])
        return image, _lab_grey(lightness), 2
    if mode == "HSV":
        hsv = u8(3)
        return Image.fromarray(hsv, "HSV"), _hsv(hsv), 2
    if mode.startswith("I;16"):
        values = rng.integers(0, 65536, (h, w), dtype=np.uint16)
        values.flat[0] = 65535  # the top of the scale must reach white
        dtype = {"I;16": "<u2", "I;16B": ">u2"}[mode]
        image = Image.fromarray(values.astype(dtype))
        assert image.mode == mode
        return image, _grey(_wide_to_8bit(values, mode)), 0
    if mode.startswith("I "):
        low, high = {"I 8-bit values": (0, 256), "I 16-bit values": (256, 65536),
                     "I beyond 16 bits": (-70000, 1 << 30)}[mode]
        values = rng.integers(low, high, (h, w)).astype(np.int32)
        return Image.fromarray(values), _grey(_wide_to_8bit(values, "I")), 0
    if mode.startswith("F "):
        low, high = {"F in 0..1": (0, 1), "F in 0..255": (1.5, 255), "F beyond 0..255": (-3, 1000)}[mode]
        values = rng.uniform(low, high, (h, w)).astype(np.float32)
        return Image.fromarray(values), _grey(_wide_to_8bit(values, "F")), 1
    raise AssertionError(mode)


MODES = ["1", "L", "L+transparency", "LA", "La", "P", "P+transparency", "P with an RGBA palette", "PA", "RGB",
         "RGB+transparency", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB neutral", "HSV", "I;16", "I;16B",
         "I 8-bit values", "I 16-bit values", "I beyond 16 bits", "F in 0..1", "F in 0..255", "F beyond 0..255"]
# Not resampled; upscaled from one pixel; elongated and padded to a square.
SHAPES = [(8, 8, PLAIN), (1, 1, PLAIN), (3, 40, PAD)]


def _mode_case(mode: str, w: int, h: int, processor: ImageProcessor, seed: int) -> Case:
    image, rgb, levels = _mode_recipe(mode, np.random.default_rng(seed), w, h)
    return Case(f"mode {mode} {w}x{h}{' pad' if processor.pad_to_square else ''}", lambda tmp: image,
                expected=lambda src: rgb, levels=levels, processor=processor)


CASES = [_mode_case(mode, w, h, proc, seed) for seed, (mode, (w, h, proc)) in
         enumerate((m, s) for m in MODES for s in SHAPES)]


# --- files: formats, animation, orientation ----------------------------------------------------

def _write(name: str, image: Image.Image, **save):
    def make(tmp: Path) -> Path:
        path = tmp / name
        image.save(path, **save)
        return path
    return make


def _decoded(src) -> np.ndarray:
    # For lossy formats the reference is the decoded file (stored orientation, first frame).
    with Image.open(src) as image:
        return np.asarray(image.convert("RGB"))


def _file_case(fmt: str, mode: str, ext: str, lossy: bool = False, **save) -> Case:
    image, rgb, levels = _mode_recipe(mode, np.random.default_rng(len(CASES)), 12, 9)
    name = f"file {fmt} {mode}{' lossy' if lossy else ''}"
    if lossy:
        return Case(name, _write(f"x.{ext}", image, format=fmt, **save), expected=_decoded)
    return Case(name, _write(f"x.{ext}", image, format=fmt, **save), expected=lambda src: rgb, levels=levels,
                processor=CLIP)


FILES = [("PNG", m, "png") for m in ("1", "L", "L+transparency", "LA", "P", "P+transparency", "RGB",
                                      "RGB+transparency", "RGBA", "I;16")]
FILES += [("TIFF", m, "tif") for m in ("CMYK", "RGB", "RGBA", "I;16", "I 16-bit values", "F in 0..1",
                                       "F beyond 0..255")]
FILES += [("BMP", m, "bmp") for m in ("1", "L", "P", "RGB")]
FILES += [("GIF", m, "gif") for m in ("P", "P+transparency")]
FILES += [("PPM", m, "ppm") for m in ("L", "RGB")]
CASES += [_file_case(*f) for f in FILES]
CASES += [_file_case("JPEG", m, "jpg", lossy=True) for m in ("L", "RGB", "CMYK")]
if features.check("webp"):
    CASES += [_file_case("WEBP", m, "webp", lossless=True) for m in ("RGB", "RGBA")]
    CASES += [_file_case("WEBP", "RGB", "webp", lossy=True, quality=50)]


def _frames(n: int, w: int = 10, h: int = 7) -> list[Image.Image]:
    rng = np.random.default_rng(n)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(n)]


def _animated(name: str, fmt: str, **save):
    frames = _frames(3)
    if fmt == "GIF":  # GIF holds a palette: the first frame's colours, exactly
        frames = [f.quantize(64) for f in frames]
    first = np.asarray(frames[0].convert("RGB"))
    make = _write(name, frames[0], format=fmt, save_all=True, append_images=frames[1:], **save)
    return Case(f"animated {fmt}: first frame", make, expected=lambda src: first)


CASES += [_animated("a.gif", "GIF", duration=50, loop=0), _animated("a.png", "PNG", duration=50),
          _animated("pages.tif", "TIFF")]


def _pgm(maxval: int):
    values = np.arange(12 * 5).reshape(5, 12) * (maxval // 59)
    header = f"P5 12 5 {maxval}\n".encode()

    def make(tmp: Path) -> Path:
        (tmp / "x.pgm").write_bytes(header + values.astype(">u2").tobytes())
        return tmp / "x.pgm"
    # Pillow opens a 16-bit PGM as "I", rescaled from maxval to 0..65535.
    scaled = np.rint(values * 65535 / maxval)
    return Case(f"PGM 16-bit maxval {maxval}", make, expected=lambda src: _grey(np.rint(scaled / 257)), levels=1)


def _grey16_png_with_transparency(tmp: Path) -> Path:
    values = np.arange(60, dtype=np.uint16).reshape(6, 10) * 1000
    Image.fromarray(values).save(tmp / "t16.png", transparency=5000)
    return tmp / "t16.png"


def _exif_rotated_jpeg(tmp: Path) -> Path:
    # Orientation 6 ("rotate 90 to display"): like transformers' image processors, omnilm keeps
    # the stored orientation, so the reference is the stored pixels.
    exif = Image.Exif()
    exif[0x0112] = 6
    _frames(1, 16, 8)[0].save(tmp / "rotated.jpg", exif=exif.tobytes())
    return tmp / "rotated.jpg"


def _png_as_jpg(tmp: Path) -> Path:
    _frames(1)[0].save(tmp / "really_png.jpg", format="PNG")
    return tmp / "really_png.jpg"


CASES += [
    _pgm(65535),
    _pgm(1023),
    Case("PNG I;16 with a transparent value", _grey16_png_with_transparency,
         expected=lambda src: _on_white(_grey(np.rint(np.arange(60).reshape(6, 10) * 1000 / 257)),
                                        np.where(np.arange(60).reshape(6, 10) == 5, 0, 255))),
    Case("EXIF-rotated JPEG keeps its stored orientation", _exif_rotated_jpeg, expected=_decoded),
    Case("PNG named .jpg", _png_as_jpg, expected=lambda src: np.asarray(_frames(1)[0])),
]


# --- sizes: declared in a header, refused before decoding ---------------------------------------

def _png(width: int, height: int, colour_type: int = 2, complete: bool = True) -> bytes:
    """A PNG of black pixels built by hand. `complete=False` stops the pixel data after a few rows,
    so that only the header's size is real: cheap for any declared size, and a file that decoding
    would reject as truncated (so a refusal that names the size came before decoding)."""
    channels = {0: 1, 2: 3}[colour_type]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + width * channels)  # filter byte, then the row's samples
    rows = height if complete else min(height, 2)
    idat = zlib.compress(row * rows) if complete else zlib.compress(row * rows)[:-4]
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _file(name: str, data: bytes):
    def make(tmp: Path) -> Path:
        (tmp / name).write_bytes(data)
        return tmp / name
    return make


BLACK = lambda src: np.zeros((1, 1, 3))  # noqa: E731  (a black image stays black at any size)
LIMIT = f"{MAX_ASPECT_RATIO}:1"
CASES += [
    Case("1x1 PNG", _file("one.png", _png(1, 1)), expected=BLACK),
    Case(f"{MAX_ASPECT_RATIO}x1 PNG: the widest allowed", _file("wide.png", _png(MAX_ASPECT_RATIO, 1)), expected=BLACK),
    Case(f"1x{MAX_ASPECT_RATIO} PNG padded", _file("tall.png", _png(1, MAX_ASPECT_RATIO)), expected=BLACK,
         processor=PAD),
    Case("201x1 PNG", _file("x.png", _png(MAX_ASPECT_RATIO + 1, 1)), (NAME, "201x1", LIMIT, "crop")),
    Case("200000x1 PNG bomb", _file("bomb.png", _png(200_000, 1)), (NAME, "200000x1", LIMIT)),
    Case("200000x1 PNG bomb, padded", _file("bomb.png", _png(200_000, 1)), (NAME, LIMIT), processor=PAD),
    Case("1x60000 PNG bomb", _file("tall.png", _png(1, 60_000)), (NAME, "1x60000", LIMIT)),
    Case("200000x1 bomb as bytes", lambda tmp: _png(200_000, 1), ("bytes>", LIMIT)),
    Case("9000x9000 declared", _file("big.png", _png(9000, 9000, 0, complete=False)),
         (NAME, "9000x9000", f"{MAX_IMAGE_SIDE} px")),
    Case("8193x41 declared", _file("big.png", _png(MAX_IMAGE_SIDE + 1, 41, 0, complete=False)),
         (NAME, f"{MAX_IMAGE_SIDE + 1}x41", "downscale")),
    Case("10000x10000 declared: Pillow's warning band", _file("big.png", _png(10_000, 10_000, 0, complete=False)),
         (NAME, "100000000 pixels", "MAX_IMAGE_PIXELS")),
    Case("20000x20000 declared", _file("big.png", _png(20_000, 20_000, 0, complete=False)),
         (NAME, "400000000 pixels", "MAX_IMAGE_PIXELS")),
    Case("65535x65535 declared", _file("big.png", _png(65_535, 65_535, 2, complete=False)), (NAME, "pixels")),
    Case("8000x41 resized to 4096 px would be too big", _file("wide.png", _png(8000, 41, 0, complete=False)),
         (NAME, "8000x41", "resizing", "4096"), processor=ImageProcessor(size=4096, crop_size=16)),
    Case("0x5 declared", _file("empty.png", _png(0, 5, complete=False)), (NAME, "cannot read image")),
    Case("10000x1 PIL image", lambda tmp: Image.new("L", (10_000, 1)), ("<PIL image>", LIMIT)),
]


# --- broken files and bad paths -------------------------------------------------------------

GOOD_PNG = _png(20, 12)
_buf = io.BytesIO()
_frames(1, 40, 30)[0].save(_buf, format="JPEG")
GOOD_JPEG = _buf.getvalue()
_buf = io.BytesIO()
_frames(2)[0].quantize(16).save(_buf, format="GIF")
GOOD_GIF = _buf.getvalue()


def _random_bytes(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _bad_crc(data: bytes) -> bytes:
    return data[:29] + bytes([data[29] ^ 0xFF]) + data[30:]  # the IHDR chunk's CRC


def _noise_png(w: int = 64, h: int = 64) -> bytes:
    # Noise does not compress, so cutting the file cuts the pixel data.
    buf = io.BytesIO()
    _frames(1, w, h)[0].save(buf, format="PNG")
    return buf.getvalue()


NOISE_PNG = _noise_png()
CASES += [
    Case("empty bytes", lambda tmp: b"", ("<0 bytes>", "not a format")),
    Case("empty file", _file("empty.png", b""), (NAME, "not a format")),
    *[Case(f"random {n} bytes", _file(f"random{n}.png", _random_bytes(n, n)), (NAME, "not a format"))
      for n in (1, 16, 1000, 4096)],
    Case("PNG signature then random bytes", _file("sig.png", GOOD_PNG[:8] + _random_bytes(200, 1)),
         (NAME, "cannot read image")),
    *[Case(f"PNG cut at {n} bytes", _file(f"cut{n}.png", NOISE_PNG[:n]), (NAME, "cannot read image"))
      for n in (8, 20, 40, len(NOISE_PNG) // 2, len(NOISE_PNG) - 200)],
    Case("JPEG cut in half", _file("cut.jpg", GOOD_JPEG[: len(GOOD_JPEG) // 2]), (NAME, "truncated")),
    Case("GIF cut in half", _file("cut.gif", GOOD_GIF[: len(GOOD_GIF) // 2]), (NAME, "cannot read image")),
    Case("PNG with a bad CRC", _file("crc.png", _bad_crc(GOOD_PNG)), (NAME, "cannot read image")),
    Case("text named .png", _file("notes.png", b"just some text\n"), (NAME, "not a format")),
    Case("SVG", _file("x.svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"/>'),
         (NAME, "not a format")),
    Case("a directory", lambda tmp: tmp, (NAME, "directory")),
    Case("a missing path", lambda tmp: tmp / "missing.jpg", (NAME, "No such file")),
    Case("a missing path as str", lambda tmp: str(tmp / "missing.jpg"), ("missing.jpg", "check the path")),
    Case("a path with a newline", lambda tmp: str(tmp / "a\nb.png"), ("a\\nb.png", "check the path")),
    Case("a path with a NUL", lambda tmp: "a\0b.png", ("NUL",)),
    Case("a path too long", lambda tmp: "x" * 5000 + ".png", ("cannot read image", "check the path")),
]


# --- data URLs, web URLs and things that are not images -------------------------------------

def _data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


PNG_PIXELS = lambda src: np.zeros((12, 20, 3))  # noqa: E731  (GOOD_PNG is black)
CASES += [
    Case("data URL", lambda tmp: _data_url(GOOD_PNG), expected=PNG_PIXELS),
    Case("data URL wrapped over lines", lambda tmp: _data_url(GOOD_PNG).replace("A", "A\n", 3), expected=PNG_PIXELS),
    Case("data URL naming another image type", lambda tmp: _data_url(GOOD_PNG, "image/jpeg"), expected=PNG_PIXELS),
    Case("data URL with a text mime type", lambda tmp: _data_url(GOOD_PNG, "text/plain"), expected=PNG_PIXELS),
    Case("data URL not base64", lambda tmp: "data:image/png,notbase64", ("data URL", "not base64")),
    Case("data URL with nothing", lambda tmp: "data:", ("not base64",)),
    Case("data URL bad alphabet", lambda tmp: "data:image/png;base64,!!!!", ("broken base64",)),
    Case("data URL bad padding", lambda tmp: "data:image/png;base64,aGVsbG8", ("broken base64",)),
    Case("data URL empty payload", lambda tmp: "data:image/png;base64,", ("not a format",)),
    Case("data URL of text", lambda tmp: _data_url(b"hello"), ("data URL", "not a format")),
    Case("data URL of a bomb", lambda tmp: _data_url(_png(200_000, 1)), ("data URL", LIMIT)),
    Case("data URL with a newline in its header", lambda tmp: "data:image/png\n;base64,AAAA",
         ("'data:image/png\\n;base64", "not a format")),
    Case("https URL", lambda tmp: "https://example.com/cat.png", ("https://example.com/cat.png", "download")),
    Case("http URL", lambda tmp: "http://example.com/cat.png", ("download",)),
    Case("HTTP URL in capitals", lambda tmp: "HTTP://EXAMPLE.COM/CAT.PNG", ("download",)),
    Case("bytearray", lambda tmp: bytearray(GOOD_PNG), expected=PNG_PIXELS),
    Case("int", lambda tmp: 12345, ("type int",)),
    Case("None", lambda tmp: None, ("type NoneType",)),
    Case("float", lambda tmp: 1.5, ("type float",)),
    Case("list", lambda tmp: [GOOD_PNG], ("type list",)),
    Case("dict", lambda tmp: {"image": "x.png"}, ("type dict",)),
    Case("numpy array", lambda tmp: np.zeros((4, 4, 3), np.uint8), ("type ndarray",)),
    Case("torch tensor", lambda tmp: torch.zeros(3, 4, 4), ("type Tensor",)),
    Case("memoryview", lambda tmp: memoryview(GOOD_PNG), ("type memoryview",)),
    Case("float image with NaN", lambda tmp: Image.fromarray(np.array([[0, np.nan]], np.float32)), ("NaN",)),
    Case("float image with inf", lambda tmp: Image.fromarray(np.array([[0, np.inf]], np.float32)), ("infinite",)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_image_input(case: Case, tmp_path):
    src = case.make(tmp_path)
    proc = case.processor
    if case.error:
        parts = [Path(src).name if part is NAME else part for part in case.error]
        one_line_error(lambda: proc([src]), *parts)
        return
    out = proc([src])
    assert out.shape == (1, 3, proc.crop_size, proc.crop_size) and out.dtype == torch.float32
    mean, std = torch.tensor(proc.image_mean)[:, None, None], torch.tensor(proc.image_std)[:, None, None]
    pixels = out[0] * std + mean  # back to 0..1
    assert torch.isfinite(out).all() and pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    rgb = np.clip(np.rint(case.expected(src)), 0, 255).astype(np.uint8)
    reference = proc([Image.fromarray(rgb, "RGB")])
    # Resampling can spread a level of difference a little, hence the 1.5.
    tolerance = 1.5 * case.levels / 255 / min(proc.image_std) + 1e-5
    diff = (out - reference).abs().max().item()
    assert diff <= tolerance, f"max abs diff {diff} over {tolerance}"


def test_there_are_enough_cases():
    assert len(CASES) >= 80 and len({c.id for c in CASES}) == len(CASES)


# --- preprocessor_config.json -------------------------------------------------------------------

GOOD_CONFIG = ImageProcessor(40, 32, (0.5, 0.4, 0.3), (0.25, 0.5, 0.75)).to_hf_dict()
CONFIGS = [
    ("a list", [GOOD_CONFIG], ("holds a list", "JSON object")),
    ("a string", "size: 336", ("holds a str",)),
    ("null", None, ("holds a NoneType",)),
    ("a number", 336, ("holds a int",)),
]
CONFIGS += [(f"{key}={value!r}", GOOD_CONFIG | {key: value}, (key, need)) for key, value, need in [
    ("size", 0, "whole number"),
    ("size", -336, "whole number"),
    ("size", "336", "whole number"),
    ("size", 336.5, "whole number"),
    ("size", True, "whole number"),
    ("size", None, "whole number"),
    ("size", [336, 336], "whole number"),
    ("size", 10**9, "whole number"),
    ("size", {"shortest_edge": 0}, "whole number"),
    ("size", {"shortest_edge": "336"}, "whole number"),
    ("size", {"height": 336, "width": 336}, "fixed shape"),
    ("crop_size", 0, "whole number"),
    ("crop_size", {"height": 0, "width": 0}, "whole number"),
    ("crop_size", {"height": 32, "width": 48}, "not square"),
    ("crop_size", {"height": 32}, "height and width"),
    ("crop_size", "32", "whole number"),
    ("crop_size", 1.5e9, "whole number"),
    ("image_mean", "0.5", "3 numbers"),
    ("image_mean", [0.5, 0.5], "3 numbers"),
    ("image_mean", [0.5, 0.5, 0.5, 0.5], "3 numbers"),
    ("image_mean", ["a", "b", "c"], "3 numbers"),
    ("image_mean", [0.5, None, 0.5], "3 numbers"),
    ("image_mean", [0.5, float("nan"), 0.5], "from 0 to 1"),
    ("image_mean", [0.5, 300, 0.5], "from 0 to 1"),
    ("image_mean", {"r": 0.5}, "3 numbers"),
    ("image_std", [0, 1, 1], "at least 1e-6"),
    ("image_std", [-0.2, 0.2, 0.2], "at least 1e-6"),
    ("image_std", [float("inf"), 1, 1], "at least 1e-6"),
    ("image_std", [1e-30, 1, 1], "at least 1e-6"),
    ("image_std", [True, 1, 1], "3 numbers"),
    ("do_resize", "false", "true or false"),
    ("do_pad", "yes", "true or false"),
    ("do_normalize", False, "set it true"),
    ("resample", "bicubic", "bicubic"),
    ("resample", 2, "bicubic"),
    ("rescale_factor", "1/255", "1/255"),
    ("rescale_factor", 1.0, "1/255"),
    ("image_processor_type", 5, "class name"),
]]
CONFIGS += [
    ("a valid one", GOOD_CONFIG, ImageProcessor(40, 32, (0.5, 0.4, 0.3), (0.25, 0.5, 0.75))),
    ("an empty one: CLIPImageProcessor's defaults", {}, ImageProcessor(224, 224)),
    ("a single number as mean and std", {"image_mean": 0.5, "image_std": 0.5},
     ImageProcessor(224, 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))),
    ("nulls for flags", {"do_convert_rgb": None, "image_processor_type": None}, ImageProcessor(224, 224)),
    ("an integer std", GOOD_CONFIG | {"image_std": [1, 1, 1]}, ImageProcessor(40, 32, (0.5, 0.4, 0.3), (1, 1, 1))),
]


@pytest.mark.parametrize("config,expected", [c[1:] for c in CONFIGS], ids=[c[0] for c in CONFIGS])
def test_preprocessor_config(config, expected):
    if isinstance(expected, ImageProcessor):
        assert ImageProcessor.from_hf_dict(config) == expected
        return
    source = Path("ckpt/preprocessor_config.json")
    one_line_error(lambda: ImageProcessor.from_hf_dict(config, source=source), str(source), *expected)
