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
import os
import re
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from omnilm.config import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from omnilm.errors import OmniInputError
from omnilm.model.hf_config import preprocessor_config



def load_image(src) -> Image.Image:
    """Open an image from a path, raw bytes, a PIL image or a `data:image/...;base64,` URL.

    The pixels are decoded here (so a truncated file fails now, with its name) and the mode
    is left as stored; `ImageProcessor` converts to RGB.
    """
    if isinstance(src, Image.Image):
        return _decode(src, getattr(src, "filename", None) or "<PIL image>")
    if isinstance(src, (bytes, bytearray)):
        return _decode(io.BytesIO(src), f"<{len(src)} bytes>")
    if isinstance(src, str) and src.startswith(("http://", "https://")):
        raise OmniInputError(f"cannot fetch image {src}: omnilm never uses the network; download it and pass a path")
    if isinstance(src, str) and src.startswith("data:"):
        return _decode(io.BytesIO(_data_url_bytes(src)), f"<data URL {src[:24]}...>")
    if isinstance(src, (str, os.PathLike)):
        try:
            with open(src, "rb") as f:
                data = f.read()
        except OSError as e:
            raise OmniInputError(f"cannot read image {src}: {e.strerror}; check the path") from None
        return _decode(io.BytesIO(data), str(src))
    raise OmniInputError(
        f"cannot read an image from a value of type {type(src).__name__}: "
        "pass a path, bytes, a PIL image or a data:image URL"
    )


def _data_url_bytes(url: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise OmniInputError(f"data URL {url[:40]}... is not base64: write it as data:image/<format>;base64,<payload>")
    try:
        # Whitespace may wrap a long payload; anything else outside the alphabet is an error.
        return base64.b64decode("".join(payload.split()), validate=True)
    except binascii.Error as e:
        raise OmniInputError(f"data URL {url[:40]}... has a broken base64 payload ({e}); re-encode the image") from None


def _decode(fp, name: str) -> Image.Image:
    try:
        # Pillow only warns between 1x and 2x its pixel limit and raises above; a huge image
        # would exhaust memory either way, so both are refused.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = fp if isinstance(fp, Image.Image) else Image.open(fp)
            image.load()
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        # Pillow's message begins "Image size (N pixels) exceeds limit ...".
        pixels = re.search(r"\d+", str(e))
        raise OmniInputError(
            f"image {name} has {pixels.group() if pixels else 'too many'} pixels, over Pillow's limit of "
            f"{Image.MAX_IMAGE_PIXELS} (a decompression-bomb guard): downscale it, or raise "
            "PIL.Image.MAX_IMAGE_PIXELS if you trust the file"
        ) from None
    except Image.UnidentifiedImageError:
        raise OmniInputError(
            f"cannot read image {name}: not a format Pillow recognises; pass a PNG, JPEG, WebP, ... file"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # Pillow reports broken files with any of these, depending on the format plugin.
        reason = " ".join(str(e).split()) or type(e).__name__
        raise OmniInputError(
            f"cannot read image {name}: {reason}; check that the file is a complete image"
        ) from None
    return image


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
        pixels = [self._preprocess(load_image(image)) for image in images]
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
    def from_hf_dict(cls, d: dict) -> ImageProcessor:
        """Read a transformers `preprocessor_config.json` dict (current or older forms such as `size: 336`)."""
        for flag in ("do_convert_rgb", "do_resize", "do_center_crop", "do_rescale", "do_normalize"):
            if d.get(flag) is False:
                raise OmniInputError(f"preprocessor config sets {flag}=false, which omnilm does not support; set it true")
        if d.get("resample", 3) != 3 or abs(d.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-12:
            raise OmniInputError(
                "preprocessor config asks for non-bicubic resampling or a rescale factor other than 1/255; "
                "omnilm supports CLIP's bicubic and 1/255 only"
            )
        # Missing keys take CLIPImageProcessor's class defaults, as transformers would.
        size, crop = d.get("size", 224), d.get("crop_size", 224)
        if isinstance(size, dict) and "shortest_edge" not in size:
            raise OmniInputError(
                f"preprocessor config size={size} resizes to a fixed shape; omnilm needs size={{'shortest_edge': N}}"
            )
        if isinstance(crop, dict) and crop["height"] != crop["width"]:
            raise OmniInputError(f"preprocessor config crop_size={crop} is not square; omnilm needs a square crop")
        return cls(
            size=size["shortest_edge"] if isinstance(size, dict) else size,
            crop_size=crop["height"] if isinstance(crop, dict) else crop,
            image_mean=tuple(d.get("image_mean", OPENAI_CLIP_MEAN)),
            image_std=tuple(d.get("image_std", OPENAI_CLIP_STD)),
            # In a CLIPImageProcessor `do_pad` means padding to a batch shape, not LLaVA's square pad.
            pad_to_square=bool(d.get("do_pad")) and d.get("image_processor_type", "").startswith("Llava"),
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    # As HF's convert_to_rgb: anything transparent (an alpha band, or a palette/greyscale
    # image with a transparent colour) is composited onto white rather than dropping alpha,
    # which would reveal whatever colour the transparent pixels happen to store.
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    return image.convert("RGB")


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
