"""Images in: loading from anything a user may hand us, and CLIP preprocessing.

`ImageProcessor` reproduces transformers' `CLIPImageProcessorPil` step for step (convert to
RGB, resize the shortest edge with PIL bicubic, centre crop, rescale, normalise), so that a
checkpoint trained with HF preprocessing sees the same pixels here. `pad_to_square` is
LLaVA-1.5's "pad" image aspect ratio mode (Liu et al. 2023, "Improved Baselines").
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from omnilm.config import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, is_int
from omnilm.errors import OmniInputError
from omnilm.model.hf_config import preprocessor_config

# Limits read from an image's header before any pixel is decoded, so that what a header declares
# can never exhaust memory later; with them no image in the pipeline (decoded, padded to a square,
# resized) holds more than MAX_IMAGE_SIDE ** 2 pixels. Pillow's own pixel limit
# (PIL.Image.MAX_IMAGE_PIXELS) is enforced as well.

# pad_to_square builds a side x side canvas, and 8192 px holds a 48-megapixel camera's long side
# while keeping that canvas under Pillow's pixel limit.
MAX_IMAGE_SIDE = 8192
# Resizing the short side to the model's size stretches the long side by the aspect ratio, and past
# 200:1 the centre crop would keep under half a percent of the image anyway.
MAX_ASPECT_RATIO = 200
# A resize may make an image no larger than the largest image that may be decoded.
MAX_RESIZED_PIXELS = MAX_IMAGE_SIDE**2


def load_image(src) -> Image.Image:
    """Open an image from a path, raw bytes, a PIL image or a `data:image/...;base64,` URL.

    The header is checked first (pixel count, side, aspect ratio: see MAX_IMAGE_SIDE and
    MAX_ASPECT_RATIO), then the pixels are decoded here (so a truncated file fails now, with
    its name) and the mode is left as stored; `ImageProcessor` converts to RGB.
    """
    return _load(src)


def _load(src, shortest_edge: int | None = None) -> Image.Image:
    # `shortest_edge`: the size a processor will resize the short side to, checked before decoding.
    if isinstance(src, Image.Image):
        return _decode(src, _name(getattr(src, "filename", None) or "<PIL image>"), shortest_edge)
    if isinstance(src, (bytes, bytearray)):
        return _decode(io.BytesIO(src), f"<{len(src)} bytes>", shortest_edge)
    if isinstance(src, str) and src[:8].lower().startswith(("http://", "https://")):
        raise OmniInputError(
            f"cannot fetch image {_name(src)}: omnilm never uses the network; download it and pass a path"
        )
    if isinstance(src, str) and src.startswith("data:"):
        return _decode(io.BytesIO(data_url_bytes(src)), f"<data URL {_name(src[:24])}...>", shortest_edge)
    if isinstance(src, (str, os.PathLike)):
        try:
            f = open(src, "rb")
        except OSError as e:
            raise OmniInputError(f"cannot read image {_name(src)}: {e.strerror}; check the path") from None
        except ValueError:  # a NUL character, which no file name can hold
            raise OmniInputError(
                f"cannot read image {_name(src)}: the path holds a NUL character; check the path"
            ) from None
        # Opened, not read: Pillow reads the header, and the pixels only once the header passes.
        with f:
            return _decode(f, _name(src), shortest_edge)
    raise OmniInputError(
        f"cannot read an image from a value of type {type(src).__name__}: "
        "pass a path, bytes, a PIL image or a data:image URL"
    )


def _name(src) -> str:
    # How messages show a path or URL: quoted when it holds a newline or other unprintable character,
    # so that the message stays on one line.
    text = os.fsdecode(src) if isinstance(src, (bytes, os.PathLike)) else str(src)
    return text if text.isprintable() else repr(text)


def data_url_bytes(url: str) -> bytes:
    """The payload of a `data:...;base64,` URL, decoded; one-line OmniInputError when it is not one."""
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise OmniInputError(
            f"data URL {_name(url[:40])}... is not base64: write it as data:image/<format>;base64,<payload>"
        )
    try:
        # Whitespace may wrap a long payload; anything else outside the alphabet is an error.
        return base64.b64decode("".join(payload.split()), validate=True)
    except binascii.Error as e:
        raise OmniInputError(
            f"data URL {_name(url[:40])}... has a broken base64 payload ({e}); re-encode the image"
        ) from None


def _decode(fp, name: str, shortest_edge: int | None = None) -> Image.Image:
    try:
        # Pillow only warns between 1x and 2x its pixel limit and raises above; a huge image
        # would exhaust memory either way, so both are refused.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = fp if isinstance(fp, Image.Image) else Image.open(fp)  # reads the header only
            _check_size(image, name, shortest_edge)
            image.load()
    except OmniInputError:
        raise  # from _check_size, already worded
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        # Pillow's message begins "Image size (N pixels) exceeds limit ...".
        pixels = re.search(r"\d+", str(e))
        raise OmniInputError(
            f"image {name} has {pixels.group() if pixels else 'too many'} pixels, over the limit of "
            f"{Image.MAX_IMAGE_PIXELS} that PIL.Image.MAX_IMAGE_PIXELS sets against decompression bombs: "
            "downscale it"
        ) from None
    except Image.UnidentifiedImageError:
        raise OmniInputError(
            f"cannot read image {name}: not a format Pillow recognises; pass a PNG, JPEG, WebP, ... file"
        ) from None
    except MemoryError:
        raise  # the machine's limit, not a broken file: it must not read as one
    except Exception as e:
        # Pillow's format plugins report broken files with OSError, SyntaxError, ValueError or EOFError
        # mostly, but some raise others (NotImplementedError, AttributeError, RuntimeError, ...) on
        # malformed input, and a file from a user is never a reason for a traceback.
        reason = " ".join(str(e).split()) or type(e).__name__
        raise OmniInputError(
            f"cannot read image {name}: {reason}; check that the file is a complete image"
        ) from None
    # NaN or infinite pixels have no brightness to map to, so such a float image is refused.
    if image.mode == "F" and not np.isfinite(np.asarray(image)).all():
        raise OmniInputError(
            f"image {name} is a float image with NaN or infinite pixels: replace them and save it again"
        )
    return image


def _check_size(image: Image.Image, name: str, shortest_edge: int | None) -> None:
    # The header's size, before decoding: see MAX_IMAGE_SIDE and MAX_ASPECT_RATIO.
    width, height = image.size
    if min(width, height) < 1:
        raise OmniInputError(f"image {name} is {width}x{height} pixels, which holds nothing: pass a non-empty image")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise OmniInputError(
            f"image {name} is {width}x{height} pixels, more elongated than {MAX_ASPECT_RATIO}:1, which no model "
            "input can hold: crop it to the part that matters"
        )
    if max(width, height) > MAX_IMAGE_SIDE:
        raise OmniInputError(
            f"image {name} is {width}x{height} pixels, over the limit of {MAX_IMAGE_SIDE} px a side: "
            f"downscale it to at most {MAX_IMAGE_SIDE} px on its longest side"
        )
    if shortest_edge is not None:
        new_height, new_width = _resize_shape(height, width, shortest_edge)
        if new_height * new_width > MAX_RESIZED_PIXELS:
            raise OmniInputError(
                f"image {name} is {width}x{height} pixels, which resizing its short side to {shortest_edge} px "
                f"would make {new_width}x{new_height}, over {MAX_RESIZED_PIXELS} pixels: crop it to a less "
                "elongated part"
            )


@dataclass
class ImageProcessor:
    """CLIP preprocessing: images -> float32 tensor (N, 3, crop_size, crop_size).

    Matches transformers' `CLIPImageProcessorPil` (or `LlavaImageProcessorPil` with
    `do_pad=True` when `pad_to_square`) to within float rounding.
    """

    size: int = 336  # shortest edge after resizing
    crop_size: int = 336
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    pad_to_square: bool = False

    def __call__(self, images: list) -> torch.Tensor:
        """Anything `load_image` accepts, N of them -> (N, 3, crop_size, crop_size) float32."""
        # Padding to a square resizes a square, so only a plain resize depends on the aspect ratio.
        shortest_edge = None if self.pad_to_square else self.size
        pixels = [self._preprocess(_load(image, shortest_edge)) for image in images]
        if not pixels:
            return torch.empty(0, 3, self.crop_size, self.crop_size)
        return torch.from_numpy(np.stack(pixels))

    def _preprocess(self, image: Image.Image) -> np.ndarray:
        image = _to_rgb(image)
        if self.pad_to_square:
            image = _expand_to_square(image, tuple(int(m * 255) for m in self.image_mean))
        height, width = _resize_shape(image.height, image.width, self.size)
        image = image.resize((width, height), Image.Resampling.BICUBIC)
        pixels = _centre_crop(np.asarray(image), self.crop_size)  # (H, W, 3) uint8
        # Same arithmetic as HF: rescale in float64, cast to float32, then normalise.
        x = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
        x = (x - np.array(self.image_mean, np.float32)) / np.array(self.image_std, np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))  # (3, H, W)

    @classmethod
    def from_vision_config(cls, vision_cfg, pad_to_square: bool = False) -> ImageProcessor:
        """The preprocessing a vision encoder config (`image_size`, `image_mean`, `image_std`) was trained with."""
        return cls(
            size=vision_cfg.image_size,
            crop_size=vision_cfg.image_size,
            image_mean=tuple(vision_cfg.image_mean),
            image_std=tuple(vision_cfg.image_std),
            pad_to_square=pad_to_square,
        )

    def to_hf_dict(self) -> dict:
        """A `preprocessor_config.json` that transformers' `AutoImageProcessor` loads to the same preprocessing."""
        return preprocessor_config(self.size, self.crop_size, self.image_mean, self.image_std, self.pad_to_square)

    @classmethod
    def from_hf_dict(cls, d: dict, source: str | Path | None = None) -> ImageProcessor:
        """Read a transformers `preprocessor_config.json` dict (current or older forms such as `size: 336`),
        checking every field it uses; `source` (the file it came from) is named in errors."""
        where = f"preprocessor config {source}" if source is not None else "preprocessor config"
        if not isinstance(d, dict):
            raise OmniInputError(f"{where} holds a {type(d).__name__}, not a JSON object of settings; save it again")

        def bad(field: str, need: str):
            value = repr(d[field])
            value = value if len(value) <= 40 else value[:37] + "..."
            return OmniInputError(f"{where}: {field}={value} {need}; fix it or save the processor again")

        for flag in ("do_convert_rgb", "do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_pad"):
            if d.get(flag) is not None and not isinstance(d[flag], bool):
                raise bad(flag, "must be true or false")
            if d.get(flag) is False and flag != "do_pad":
                raise OmniInputError(f"{where} sets {flag}=false, which omnilm does not support; set it true")
        if "resample" in d and (not is_int(d["resample"]) or d["resample"] != 3):
            raise bad("resample", "is not bicubic (3), the only resampling omnilm supports")
        factor = d.get("rescale_factor", 1 / 255)
        if not _is_number(factor) or abs(factor - 1 / 255) > 1e-12:
            raise bad("rescale_factor", "is not 1/255, the only rescale factor omnilm supports")
        kind = d.get("image_processor_type") or ""
        if not isinstance(kind, str):
            raise bad("image_processor_type", "must be a class name string")
        # Missing keys take CLIPImageProcessor's class defaults, as transformers would.
        size, crop = d.get("size", 224), d.get("crop_size", 224)
        if isinstance(size, dict):
            if "shortest_edge" not in size:
                raise bad("size", "resizes to a fixed shape; omnilm needs size={'shortest_edge': N}")
            size = size["shortest_edge"]
        if isinstance(crop, dict):
            if not {"height", "width"} <= crop.keys():
                raise bad("crop_size", "must give height and width")
            if crop["height"] != crop["width"]:
                raise bad("crop_size", "is not square; omnilm needs a square crop")
            crop = crop["height"]
        for field, value in (("size", size), ("crop_size", crop)):
            if not is_int(value) or not 1 <= value <= MAX_IMAGE_SIDE:
                raise bad(field, f"must be a whole number of pixels from 1 to {MAX_IMAGE_SIDE}")
        stats = {}
        for field, default in (("image_mean", OPENAI_CLIP_MEAN), ("image_std", OPENAI_CLIP_STD)):
            value = d.get(field, default)
            # transformers broadcasts a single number over the channels.
            value = [value] * 3 if _is_number(value) else value
            if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(_is_number(v) for v in value):
                raise bad(field, "must be 3 numbers, one per RGB channel")
            # Pixels are rescaled to 0..1, so a mean outside it is no mean of theirs; a std under 1e-6
            # (or 0) would blow normalised pixels up to sizes no encoder was trained on (or divide by 0).
            if field == "image_mean" and not all(0 <= v <= 1 for v in value):
                raise bad(field, "must be 3 numbers from 0 to 1, the range rescaled pixels have")
            if field == "image_std" and not all(1e-6 <= v < math.inf for v in value):
                raise bad(field, "must be 3 finite numbers of at least 1e-6")
            stats[field] = tuple(value)
        return cls(
            size=size,
            crop_size=crop,
            **stats,
            # In a CLIPImageProcessor `do_pad` means padding to a batch shape, not LLaVA's square pad.
            pad_to_square=bool(d.get("do_pad")) and kind.startswith("Llava"),
        )


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I") or image.mode == "F":
        image = _to_8bit(image)
    if image.mode in _PREMULTIPLIED:
        image = image.convert(_PREMULTIPLIED[image.mode])
    if image.mode == "RGB" and image.info.get("transparency") is None:
        return image  # convert() would copy it
    # As HF's convert_to_rgb: anything transparent (an alpha band, or a palette/greyscale
    # image with a transparent colour) is composited onto white rather than dropping alpha,
    # which would reveal whatever colour the transparent pixels happen to store.
    # (Pillow's "LAB" has a band named A too, which is colour, not alpha.)
    palette_alpha = image.mode == "P" and image.palette is not None and image.palette.mode.endswith("A")
    if image.mode in ("LA", "PA", "RGBA") or palette_alpha or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    return image.convert("RGB")


# Pillow's premultiplied-alpha modes: converted to straight alpha, so that compositing onto white applies.
_PREMULTIPLIED = {"La": "LA", "RGBa": "RGBA"}


def _to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit ("I;16*"), 32-bit integer ("I") or float ("F") greyscale image -> "L", or "LA"
    when a value is marked transparent, mapped by its value range rather than clipped to 0..255:

    - "I;16*": the format's full scale, 0..65535 -> 0..255 (divide by 257);
    - "I": 0..255 when every value fits (8-bit data in a wide container), else 0..65535 when every
      value fits (Pillow opens 16-bit PGM files as "I", scaled to that range), else min..max;
    - "F": 0..1 when every value fits (the float image convention), else 0..255 when every value
      fits, else min..max.

    Under min..max a constant image becomes black.
    """
    values = np.asarray(image)
    if image.mode.startswith("I;16"):
        grey = ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)  # round(v / 257)
    else:
        low, high = (values.min().item(), values.max().item()) if values.size else (0, 0)
        ranges = (1.0, 255.0) if image.mode == "F" else (255.0, 65535.0)
        top = next((r for r in ranges if low >= 0 and high <= r), None)
        low, top = (0.0, top) if top is not None else (low, high)
        scaled = values.astype(np.float32)
        scaled -= np.float32(low)
        scaled *= np.float32(255 / (top - low) if top > low else 0)
        grey = np.clip(np.rint(scaled, out=scaled), 0, 255, out=scaled).astype(np.uint8)
    transparent = image.info.get("transparency")
    if isinstance(transparent, (int, float)) and not isinstance(transparent, bool):
        # The transparent value is a raw one, so it is matched before the mapping.
        alpha = np.where(values == transparent, 0, 255).astype(np.uint8)
        return Image.merge("LA", (Image.fromarray(grey, "L"), Image.fromarray(alpha, "L")))
    return Image.fromarray(grey, "L")


def _expand_to_square(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    # LLaVA-1.5's expand2square and HF's LlavaImageProcessor.pad_to_square agree: fill with
    # the mean colour truncated to int, and put the image at offset (long - short) // 2.
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def _resize_shape(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    # HF's get_resize_output_image_size(default_to_square=False): the long side is truncated,
    # not rounded, and a square image counts as "width is the short side".
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest_edge * long / short)
    return (new_long, shortest_edge) if width <= height else (shortest_edge, new_long)


def _centre_crop(pixels: np.ndarray, crop: int) -> np.ndarray:
    # (H, W, C) -> (crop, crop, C). Like HF's center_crop, an axis shorter than the crop is
    # zero-padded (black, before normalisation) with the image at offset ceil((crop - size) / 2).
    out = np.zeros((crop, crop, pixels.shape[2]), dtype=pixels.dtype)
    src, dst = [], []
    for size in pixels.shape[:2]:
        if size >= crop:
            src.append(slice((size - crop) // 2, (size - crop) // 2 + crop))
            dst.append(slice(0, crop))
        else:
            src.append(slice(0, size))
            dst.append(slice((crop - size + 1) // 2, (crop - size + 1) // 2 + size))
    out[dst[0], dst[1]] = pixels[src[0], src[1]]
    return out
