"""Video in: frames from a file (PyAV), a folder of frames or a list of images, sampled as
transformers samples them.

`sample_indices` is transformers' default frame sampler (`video_utils.default_sample_indices_fn`),
index for index: n frames spread uniformly (`arange(n) * total // n`), or with `fps` as many as
the clip's duration holds at that rate. `read_video` decodes with PyAV (the `[media]` extra; its
wheel bundles FFmpeg), checking the file against `VideoLimits` before it decodes a frame and
failing in one line, with the file's name, on anything it cannot use. `write_video` writes frames
losslessly (FFV1), so that a clip written and read back gives the same bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

from omnilm.data.image import load_image
from omnilm.errors import OmniInputError
from omnilm.io import atomic_write

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
# Containers `write_video` can put FFV1 in, by suffix: FFmpeg's format names.
LOSSLESS_CONTAINERS = {".mp4": "mp4", ".mkv": "matroska", ".avi": "avi"}


class VideoTooLarge(OmniInputError):
    """A video over one of its VideoLimits (a server answers 413)."""


@dataclass(frozen=True)
class VideoLimits:
    """What `read_video` accepts; a larger clip is refused before its frames are decoded."""

    max_bytes: int = 2 * 2**30  # file size
    max_frames: int = 100_000  # frames in the file (an hour at 25 fps is 90,000)
    max_seconds: float = 4 * 3600.0  # duration
    max_side: int = 4096  # frame width and height, in pixels


@dataclass
class Video:
    """Sampled frames (T, H, W, 3) uint8 RGB, which of the source's frames they are, and the source's
    frame count and rate (None for frames given as images)."""

    frames: np.ndarray
    indices: list[int]
    total_frames: int
    fps: float | None

    @property
    def timestamps(self) -> list[float] | None:
        """Each sampled frame's time in seconds, when the source has a frame rate."""
        return None if self.fps is None else [i / self.fps for i in self.indices]


def sample_indices(total_frames: int, num_frames: int | None = None, fps: float | None = None,
                   video_fps: float | None = None) -> list[int]:
    """Which of `total_frames` frames to keep: `num_frames` spread uniformly, or, without it, `fps`
    frames per second of a clip recorded at `video_fps` (at least one); all of them without either.
    transformers' default sampler, with its refusals as one-line errors."""
    if num_frames is None and fps is not None:
        if video_fps is None:
            raise OmniInputError(f"fps={fps} samples by time, but these frames have no frame rate: ask for a number "
                                 "of frames instead")
        num_frames = max(1, int(total_frames / video_fps * fps))
    if num_frames is None:
        return list(range(total_frames))
    if num_frames > total_frames:
        raise OmniInputError(f"{num_frames} frames asked of a clip of {total_frames}: ask for at most {total_frames} "
                             "(or a lower fps)")
    return [i * total_frames // num_frames for i in range(num_frames)]


def read_video(source, num_frames: int | None = None, fps: float | None = None,
               limits: VideoLimits = VideoLimits(), up_to: bool = False) -> Video:
    """The frames of `source` (a video file's path, a folder of frame images in name order, or a
    list of images: paths, bytes or PIL images), sampled by `sample_indices`. With `up_to`,
    `num_frames` is a ceiling, and a shorter clip gives all its frames (transformers refuses it)."""
    if isinstance(source, (list, tuple)):
        return _from_images(list(source), "the list of frames", num_frames, fps, up_to)
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        return _from_images(files, str(path), num_frames, fps, up_to)
    return _decode(path, num_frames, fps, limits, up_to)


def _ceiling(num_frames: int | None, total: int, up_to: bool) -> int | None:
    return min(num_frames, total) if up_to and isinstance(num_frames, int) and num_frames > 0 else num_frames


def _from_images(images: list, name: str, num_frames: int | None, fps: float | None, up_to: bool) -> Video:
    if not images:
        raise OmniInputError(f"{name} holds no frames: give at least one image ({', '.join(FRAME_SUFFIXES)})")
    indices = sample_indices(len(images), _ceiling(num_frames, len(images), up_to), fps)
    frames = [np.asarray(load_image(images[i]).convert("RGB")) for i in indices]
    if len({f.shape for f in frames}) > 1:
        sizes = sorted({f"{f.shape[1]}x{f.shape[0]}" for f in frames})
        raise OmniInputError(f"the frames of {name} differ in size ({', '.join(sizes)}): give frames of one size")
    return Video(np.stack(frames), indices, len(images), None)


def _av():
    try:
        import av
    except ImportError as e:
        raise OmniInputError("reading video files needs PyAV: pip install 'omnilm[media]'") from e
    return av


def _decode(path: Path, num_frames: int | None, fps: float | None, limits: VideoLimits, up_to: bool) -> Video:
    av = _av()
    if not path.is_file():
        raise OmniInputError(f"{path}: no such video file")
    size = path.stat().st_size
    if size == 0:
        raise OmniInputError(f"{path} is empty: give a video file")
    if size > limits.max_bytes:
        raise VideoTooLarge(f"{path} is {size / 2**20:.0f} MiB, over the {limits.max_bytes / 2**20:.0f} MiB a video "
                             "may be: cut or re-encode it")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise OmniInputError(f"{path} has no video stream")
            stream = container.streams.video[0]
            _check_header(path, stream, container, limits)
            # Count the frames from the packets (no decoding), then decode, keeping the sampled ones.
            total = sum(1 for packet in container.demux(stream) if packet.size)
            if total == 0:
                raise OmniInputError(f"{path} has no frames")
            if total > limits.max_frames:
                raise VideoTooLarge(f"{path} has {total} frames, over the {limits.max_frames} a video may have: "
                                     "cut it or lower its frame rate")
            rate = float(stream.average_rate) if stream.average_rate else None
            declared = _declared_frames(stream, container, rate)
            if declared is not None and total < declared - 1:  # one frame of slack for rounding
                raise OmniInputError(f"{path} is truncated: {total} frames of the {declared} its header declares")
            indices = sample_indices(total, _ceiling(num_frames, total, up_to), fps, rate)
            container.seek(0)
            frames = _decode_frames(container, stream, set(indices))
    except OmniInputError:
        raise
    except av.error.FFmpegError as e:
        raise OmniInputError(f"{path} cannot be read as video ({_reason(e)}): it is damaged, truncated or not a video; "
                             "give an mp4, webm, gif or avi file") from None
    if len(frames) < len(indices):
        raise OmniInputError(f"{path} is truncated or damaged: {total} frames listed, frame {len(frames)} of the "
                             f"{len(indices)} sampled ones did not decode")
    return Video(np.stack([frames[i] for i in indices]), indices, total, rate)


def _check_header(path: Path, stream, container, limits: VideoLimits) -> None:
    width, height = stream.codec_context.width, stream.codec_context.height
    if not width or not height:
        raise OmniInputError(f"{path}: its video stream declares no frame size")
    if max(width, height) > limits.max_side:
        raise VideoTooLarge(f"{path} is {width}x{height}, over the {limits.max_side} px a frame's side may be: "
                             "scale it down")
    seconds = container.duration / 1e6 if container.duration else None  # microseconds (AV_TIME_BASE)
    if seconds is not None and seconds > limits.max_seconds:
        raise VideoTooLarge(f"{path} lasts {seconds:.0f} s, over the {limits.max_seconds:.0f} s a video may last: "
                             "cut it")


def _declared_frames(stream, container, rate: float | None) -> int | None:
    """The frame count the header declares: the stream's own, or its duration times its rate (the
    container's duration only when the video is its one stream)."""
    if stream.frames:
        return stream.frames
    if rate is None:
        return None
    if stream.duration is not None and stream.time_base is not None:
        return round(float(stream.duration * stream.time_base) * rate)
    if container.duration and len(container.streams) == 1:
        return round(container.duration / 1e6 * rate)
    return None


def _decode_frames(container, stream, keep: set[int]) -> dict[int, np.ndarray]:
    frames = {}
    for i, frame in enumerate(container.decode(stream)):
        if i in keep:
            frames[i] = frame.to_ndarray(format="rgb24")
        if len(frames) == len(keep):
            break
    return frames


def _reason(error: Exception) -> str:
    return getattr(error, "strerror", None) or type(error).__name__


def write_video(path: str | Path, frames, fps: float = 1.0) -> None:
    """Write `frames` ((T, H, W, 3) uint8 RGB, or a list of same-sized images) losslessly with FFV1
    in an .mp4, .mkv or .avi file, atomically."""
    av = _av()
    path = Path(path)
    container_format = LOSSLESS_CONTAINERS.get(path.suffix.lower())
    if container_format is None:
        raise OmniInputError(f"{path}: write lossless video to a {', '.join(LOSSLESS_CONTAINERS)} file")
    frames = np.stack([np.asarray(f.convert("RGB") if isinstance(f, Image.Image) else f) for f in frames])
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or not len(frames):
        raise OmniInputError(f"frames of shape {frames.shape} and type {frames.dtype}: give (T, H, W, 3) uint8 RGB")
    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise OmniInputError(f"fps={fps!r} must be a number > 0")
    rate = Fraction(fps).limit_denominator(1001)

    def write(tmp: str) -> None:
        with av.open(tmp, "w", format=container_format) as container:
            stream = container.add_stream("ffv1", rate=rate)
            stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "bgr0"
            for f in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
            container.mux(stream.encode())

    atomic_write(path, write)

