"""ImageProcessor against transformers' CLIP/LLaVA PIL image processors, and load_image's errors."""

import base64
import io
import json
import os
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, CLIPImageProcessorPil, LlavaImageProcessorPil

from conftest import one_line_error

from omnilm.data import ImageProcessor, load_image
from omnilm.errors import OmniInputError


def _noise(width: int, height: int, channels: int = 3, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels, "RGBA" if channels == 4 else "RGB")


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _test_images(tmp_path):
    rgba_path = tmp_path / "rgba.png"
    _noise(61, 47, channels=4, seed=3).save(rgba_path)  # random alpha: compositing matters
    palette_transparent = _noise(33, 45, seed=5).convert("P")
    palette_transparent.info["transparency"] = 7
    return {
        "rgb 517x333": _noise(517, 333),
        "rgb 333x517": _noise(333, 517, seed=1),
        "grey L": _noise(300, 211, seed=2).convert("L"),
        "rgba png path": str(rgba_path),
        "palette P": _noise(90, 70, seed=4).convert("P"),
        "palette with transparency": palette_transparent,
        "grey+alpha LA": _noise(40, 52, channels=4, seed=6).convert("LA"),
        "tiny 20x30": _noise(20, 30, seed=7),
        "square": _noise(64, 64, seed=8),
    }


def _hf_pixels(hf_processor, image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(hf_processor(load_image(image), return_tensors="np")["pixel_values"]))


# (64, 80): a crop larger than the resized image, so centre crop has to pad.
@pytest.mark.parametrize("size,crop", [(336, 336), (64, 64), (64, 80)])
@pytest.mark.parametrize("pad_to_square", [False, True])
def test_matches_transformers(tmp_path, size, crop, pad_to_square):
    ours = ImageProcessor(size=size, crop_size=crop, pad_to_square=pad_to_square)
    kwargs = dict(size={"shortest_edge": size}, crop_size={"height": crop, "width": crop})
    hf = LlavaImageProcessorPil(**kwargs, do_pad=True) if pad_to_square else CLIPImageProcessorPil(**kwargs)
    images = _test_images(tmp_path)
    batch = ours(list(images.values()))
    assert batch.shape == (len(images), 3, crop, crop) and batch.dtype == torch.float32
    for i, (name, image) in enumerate(images.items()):
        diff = (batch[i : i + 1] - _hf_pixels(hf, image)).abs().max().item()
        assert diff <= 1e-5, f"{name}: max abs diff {diff}"


def test_pad_to_square_fills_with_mean_colour():
    # A wide black image: the rows added above and below must be the mean colour, which
    # normalises to (int(m * 255) / 255 - m) / s, close to 0 but not 0.
    image = Image.new("RGB", (60, 20), (0, 0, 0))
    ours = ImageProcessor(size=60, crop_size=60, pad_to_square=True)
    pixels = ours([image])[0]
    mean, std = torch.tensor(ours.image_mean), torch.tensor(ours.image_std)
    expected_fill = (torch.tensor([int(m * 255) for m in ours.image_mean]) / 255 - mean) / std
    assert torch.allclose(pixels[:, 0, 0], expected_fill, atol=1e-5)
    assert torch.allclose(pixels[:, 30, 30], -mean / std, atol=1e-5)


@pytest.mark.parametrize("pad_to_square", [False, True])
def test_hf_dict_round_trip(tmp_path, pad_to_square):
    ours = ImageProcessor(40, 32, image_mean=(0.5, 0.5, 0.5), image_std=(0.25, 0.5, 0.75), pad_to_square=pad_to_square)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(ours.to_hf_dict()))
    hf = AutoImageProcessor.from_pretrained(tmp_path)
    image = _noise(71, 43)
    assert (ours([image]) - _hf_pixels(hf, image)).abs().max().item() <= 1e-5
    assert ImageProcessor.from_hf_dict(hf.to_dict()) == ours
    assert ImageProcessor.from_hf_dict(ours.to_hf_dict()) == ours


def test_from_hf_dict_older_forms_and_vision_config():
    old = {"size": 224, "crop_size": 224, "do_center_crop": True, "image_mean": [0.1, 0.2, 0.3], "image_std": [1, 1, 1]}
    assert ImageProcessor.from_hf_dict(old) == ImageProcessor(224, 224, (0.1, 0.2, 0.3), (1, 1, 1))
    # do_pad in a CLIPImageProcessor is batch padding, not LLaVA's square padding.
    assert not ImageProcessor.from_hf_dict({"image_processor_type": "CLIPImageProcessor", "do_pad": True}).pad_to_square
    with pytest.raises(OmniInputError, match="do_center_crop"):
        ImageProcessor.from_hf_dict({"do_center_crop": False})
    cfg = SimpleNamespace(image_size=28, image_mean=(0.1, 0.2, 0.3), image_std=(0.4, 0.5, 0.6))
    expected = ImageProcessor(28, 28, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), pad_to_square=True)
    assert ImageProcessor.from_vision_config(cfg, pad_to_square=True) == expected


def test_load_image_sources_agree(tmp_path):
    image = _noise(30, 20)
    data = _png_bytes(image)
    path = tmp_path / "x.png"
    path.write_bytes(data)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    for source in (str(path), path, data, url, image):
        assert np.array_equal(np.asarray(load_image(source)), np.asarray(image))
    assert load_image(_noise(8, 8).convert("L")).mode == "L"  # mode is left alone


def test_unreadable_images_fail_with_their_name(tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    one_line_error(lambda: load_image(str(garbage)), "garbage.png", "not a format")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(_png_bytes(_noise(64, 64))[:2000])
    one_line_error(lambda: load_image(truncated), "truncated.png", "truncated")
    one_line_error(lambda: load_image(str(tmp_path / "missing.jpg")), "missing.jpg")
    one_line_error(lambda: load_image(b"not an image"), "12 bytes")
    one_line_error(lambda: load_image(12345), "int")


def test_urls(tmp_path):
    one_line_error(lambda: load_image("https://example.com/cat.png"), "https://example.com/cat.png", "download")
    one_line_error(lambda: load_image("http://example.com/cat.png"), "download")
    one_line_error(lambda: load_image("data:image/png,notbase64"), "base64")
    one_line_error(lambda: load_image("data:image/png;base64,!!!!"), "broken base64")
    one_line_error(lambda: load_image("data:image/png;base64," + base64.b64encode(b"hello").decode()), "not a format")


def test_decompression_bomb_is_refused(monkeypatch):
    data = _png_bytes(_noise(40, 30))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow warns above 1000, raises above 2000
    one_line_error(lambda: load_image(data), "1200 pixels", "MAX_IMAGE_PIXELS")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    one_line_error(lambda: load_image(data), "1200 pixels", "MAX_IMAGE_PIXELS")


def _grey_levels(image, **kw) -> list[list[int]]:
    # An image 4 pixels wide through a processor that neither resamples nor normalises it: its 8-bit grey.
    plain = ImageProcessor(size=4, crop_size=4, image_mean=(0, 0, 0), image_std=(1, 1, 1), **kw)
    pixels = plain([image])[0].numpy() * 255
    assert np.allclose(pixels[0], pixels[1]) and np.allclose(pixels[0], pixels[2])  # grey
    return np.rint(pixels[0]).astype(int).tolist()


def test_high_bit_depth_and_float_images_map_by_their_range(tmp_path):
    # A 16-bit PNG opens as I;16 and maps by its full scale (v / 257), where a plain convert clips to white.
    v16 = np.array([[0, 257, 1000, 30000, 65535]] * 4, np.uint16)[:, 1:]
    Image.fromarray(v16).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    assert _grey_levels(tmp_path / "grey16.png")[0] == [1, 4, 117, 255]
    # A float TIFF in 0..1 maps to 0..255, where a plain convert makes it black.
    Image.fromarray(np.array([[0, 0.25, 0.5, 1]] * 4, np.float32)).save(tmp_path / "float.tif")
    assert Image.open(tmp_path / "float.tif").mode == "F"
    assert _grey_levels(tmp_path / "float.tif")[0] == [0, 64, 128, 255]
    # Float beyond 0..1 but within 0..255: taken as 8-bit values; beyond that: the image's min..max.
    assert _grey_levels(Image.fromarray(np.array([[0, 2, 100.4, 255]] * 4, np.float32)))[0] == [0, 2, 100, 255]
    assert _grey_levels(Image.fromarray(np.array([[-1, 0, 1, 3]] * 4, np.float32)))[0] == [0, 64, 128, 255]
    # 32-bit integers: 8-bit values, else 16-bit values, else min..max; a constant out-of-range image is black.
    assert _grey_levels(Image.fromarray(np.array([[0, 7, 200, 255]] * 4, np.int32)))[0] == [0, 7, 200, 255]
    assert _grey_levels(Image.fromarray(np.array([[0, 257, 1000, 65535]] * 4, np.int32)))[0] == [0, 1, 4, 255]
    assert _grey_levels(Image.fromarray(np.array([[-100, 0, 100, 410]] * 4, np.int32)))[0] == [0, 50, 100, 255]
    assert _grey_levels(Image.fromarray(np.full((4, 4), 70000, np.int32)))[0] == [0, 0, 0, 0]
    # A 16-bit PNG's transparent value (raw, before mapping) is composited onto white.
    Image.fromarray(v16).save(tmp_path / "t16.png", transparency=1000)
    assert _grey_levels(tmp_path / "t16.png")[0] == [1, 255, 117, 255]
    one_line_error(lambda: load_image(Image.fromarray(np.array([[0, np.nan]], np.float32))), "NaN", "replace them")


def _declared_png(width: int, height: int) -> bytes:
    # A PNG whose header declares width x height grey pixels, with pixel data for none of them.
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_size_limits_refuse_before_decoding(tmp_path, monkeypatch):
    from PIL import ImageFile

    from omnilm.data.image import MAX_ASPECT_RATIO, MAX_IMAGE_SIDE

    def no_decoding(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    for (width, height), parts in {
        (200_000, 1): ("200000x1", f"{MAX_ASPECT_RATIO}:1", "crop it"),
        (1, 60_000): ("1x60000", f"{MAX_ASPECT_RATIO}:1"),
        (MAX_IMAGE_SIDE + 1, MAX_IMAGE_SIDE + 1): (f"{MAX_IMAGE_SIDE} px", "downscale it"),
        (20_000, 20_000): ("400000000 pixels", "MAX_IMAGE_PIXELS"),
    }.items():
        path = tmp_path / f"{width}x{height}.png"
        path.write_bytes(_declared_png(width, height))
        one_line_error(lambda: load_image(path), path.name, *parts)
    # Resizing a 150:1 image's short side to 1024 px would make it 153600 x 1024: refused, for that size
    # only (at 336 px it passes the header checks and reaches decoding, whose failure reads as a broken file).
    path = tmp_path / "long.png"
    path.write_bytes(_declared_png(7500, 50))
    one_line_error(lambda: ImageProcessor(size=1024, crop_size=1024)([path]), "long.png", "153600x1024", "resizing")
    one_line_error(lambda: ImageProcessor(size=336, crop_size=336)([path]), "long.png", "pixels were decoded")


def test_preprocessor_config_errors_name_the_file(tmp_path):
    from omnilm.data import Processor, train_tokenizer

    train_tokenizer(["a red circle"] * 4, vocab_size=300).save(tmp_path)
    file = tmp_path / "preprocessor_config.json"
    for config, parts in [([1, 2], ("holds a list",)), ({"crop_size": 0}, ("crop_size=0",)),
                          ({"image_mean": ["0.5", "0.5", "0.5"]}, ("image_mean", "3 numbers")),
                          ({"image_std": [0.2, 0, 0.2]}, ("image_std", "at least 1e-6"))]:
        file.write_text(json.dumps(config))
        one_line_error(lambda: Processor.from_pretrained(tmp_path, 9), str(file), *parts)
