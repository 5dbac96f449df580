"""Audio in: Whisper's log-mel front end in torch, and audio files read as 16 kHz mono.

`log_mel` is what transformers' `WhisperFeatureExtractor` computes on its torch path
(`_torch_extract_fbank_features`), which Whisper and Voxtral both use: a periodic Hann STFT (400
samples, hop 160, centred with reflect padding, last frame dropped), power through Slaney mel
filters from 0 to 8 kHz, log10, clamped to 8 below the window's peak, scaled as (x + 4) / 4. Audio
is padded with silence to a whole number of windows (Whisper's 30 s) and each window normalised on
its own, as Whisper transcribes long audio; `per_window=False` gives Voxtral's processor instead,
which takes one STFT and one peak over the whole padded clip and cuts the frames into windows.

`read_audio` decodes with soundfile (libsndfile: WAV, FLAC, MP3, OGG; the `[media]` extra), checks
the file against `AudioLimits` from its header before it decodes a sample, averages the channels
and resamples to 16 kHz with soxr, failing in one line, with the file's name, on anything it
cannot use. `write_audio` writes 16-bit PCM WAV or FLAC atomically.

Shapes: W windows, T frames per window (window_samples // hop_length), F = n_fft // 2 + 1 bins.
"""

from __future__ import annotations

import io
import math
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from omnilm.errors import OmniInputError
from omnilm.io import atomic_write

# What `write_audio` writes, by suffix: libsndfile's format names (16-bit PCM in both).
WRITE_FORMATS = {".wav": "WAV", ".flac": "FLAC"}
# Samples a file may fall short of its header's count before it counts as truncated: one MP3 frame,
# since an MP3 without a Xing/Info header only estimates its length.
SHORTFALL_SLACK = 1152


@dataclass(frozen=True)
class LogMelConfig:
    """Whisper's front end (80 mels; Whisper large-v3 and Voxtral use 128). The window is Whisper's
    30 s `chunk_length`; tiny test models use shorter ones."""

    n_mels: int = 80
    window_seconds: float = 30.0
    sampling_rate: int = 16000
    n_fft: int = 400
    hop_length: int = 160

    def __post_init__(self):
        ints = dict(n_mels=self.n_mels, sampling_rate=self.sampling_rate, n_fft=self.n_fft, hop_length=self.hop_length)
        for name, value in ints.items():
            if not isinstance(value, int) or value <= 0:
                raise OmniInputError(f"{name}={value!r} must be a whole number > 0")
        if not (self.window_samples >= self.n_fft and self.window_samples % self.hop_length == 0):
            raise OmniInputError(f"window_seconds={self.window_seconds!r} gives {self.window_samples} samples: give a "
                                 f"window of at least n_fft={self.n_fft} samples and a whole number of "
                                 f"hop_length={self.hop_length} hops")

    @property
    def window_samples(self) -> int:
        return round(self.window_seconds * self.sampling_rate)

    @property
    def window_frames(self) -> int:
        return self.window_samples // self.hop_length

    def to_hf(self) -> dict:
        """A preprocessor_config.json from which transformers builds the `WhisperFeatureExtractor` of
        these settings (one window per call: it normalises each window on its own)."""
        return {"feature_extractor_type": "WhisperFeatureExtractor", "feature_size": self.n_mels,
                "sampling_rate": self.sampling_rate, "hop_length": self.hop_length, "n_fft": self.n_fft,
                "chunk_length": self.window_seconds, "n_samples": self.window_samples,
                "nb_max_frames": self.window_frames, "padding_side": "right", "padding_value": 0.0,
                "return_attention_mask": False, "dither": 0.0}

    @classmethod
    def from_hf(cls, config: dict) -> LogMelConfig:
        """The settings of a `WhisperFeatureExtractor` (its preprocessor_config.json as a dict)."""
        if config.get("dither", 0.0):
            raise OmniInputError(f"dither={config['dither']} adds noise to the features, which omnilm's front end "
                                 "does not: set it to 0")
        return cls(n_mels=config.get("feature_size", 80), window_seconds=config.get("chunk_length", 30.0),
                   sampling_rate=config.get("sampling_rate", 16000), n_fft=config.get("n_fft", 400),
                   hop_length=config.get("hop_length", 160))


def hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear (3 mels per 200 Hz) up to 1 kHz = 15 mels, logarithmic above (27
    mels per factor of 6.4)."""
    hz = np.asarray(hz, dtype=np.float64)
    return np.where(hz < 1000.0, hz * 3.0 / 200.0, 15.0 + np.log(np.maximum(hz, 1000.0) / 1000.0) * 27.0 / np.log(6.4))


def mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    return np.where(mel < 15.0, mel * 200.0 / 3.0, 1000.0 * np.exp((mel - 15.0) * np.log(6.4) / 27.0))


@lru_cache(maxsize=8)
def mel_filters(n_mels: int = 80, n_fft: int = 400, sampling_rate: int = 16000, max_hz: float = 8000.0) -> np.ndarray:
    """(F, n_mels) float64: triangles spaced evenly in mels from 0 Hz to `max_hz`, each scaled to unit
    area (Slaney's norm, 2 / its width in Hz). Read only: it is cached."""
    edges = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(max_hz), n_mels + 2))  # (n_mels + 2,)
    lo, peak, hi = edges[:-2], edges[1:-1], edges[2:]
    bins = np.linspace(0.0, sampling_rate // 2, n_fft // 2 + 1)[:, None]  # (F, 1) the STFT bins' frequencies
    triangles = np.maximum(0.0, np.minimum((bins - lo) / (peak - lo), (hi - bins) / (hi - peak)))
    triangles *= 2.0 / (hi - lo)
    triangles.flags.writeable = False
    return triangles


def log_mel(audio, config: LogMelConfig = LogMelConfig(), per_window: bool = True,
            device: str | torch.device | None = None) -> torch.Tensor:
    """(W, n_mels, T) float32 log-mel features of mono `audio` (samples at config.sampling_rate: an
    array or tensor), padded with silence to W whole windows (at least one). Each window is
    normalised on its own, so each equals WhisperFeatureExtractor on that window's samples; with
    `per_window=False`, on the whole clip, as VoxtralProcessor does."""
    x = torch.as_tensor(audio, dtype=torch.float32, device=device)
    if x.ndim != 1:
        raise OmniInputError(f"audio of shape {tuple(x.shape)}: give mono samples, one dimension")
    n = config.window_samples
    n_windows = max(1, math.ceil(len(x) / n))
    x = F.pad(x, (0, n_windows * n - len(x)))
    if per_window:
        x = x.view(n_windows, n)  # (W, n): one STFT per window, reflect-padded at its own ends
    window = torch.hann_window(config.n_fft, periodic=True, device=x.device)
    spec = torch.stft(x, config.n_fft, config.hop_length, window=window, center=True, pad_mode="reflect",
                      return_complex=True)  # (W, F, T + 1) or (F, W*T + 1)
    # The last frame is centred on the padding's end; Whisper drops it (n // hop frames, not 1 + n // hop).
    power = spec[..., :-1].abs() ** 2
    filters = torch.tensor(mel_filters(config.n_mels, config.n_fft, config.sampling_rate), dtype=torch.float32,
                           device=x.device)
    mel = filters.T @ power  # (W, n_mels, T) or (n_mels, W*T)
    logs = mel.clamp(min=1e-10).log10()
    peak = logs.amax(dim=(-2, -1), keepdim=True)  # per window, or over the whole clip
    logs = (torch.maximum(logs, peak - 8.0) + 4.0) / 4.0
    if not per_window:
        logs = logs.view(config.n_mels, n_windows, config.window_frames).transpose(0, 1).contiguous()
    return logs


# --- files ---------------------------------------------------------------------------------------------


class AudioTooLarge(OmniInputError):
    """Audio over one of its AudioLimits (a server answers 413)."""


@dataclass(frozen=True)
class AudioLimits:
    """What `read_audio` accepts; a larger file is refused from its header, before it is decoded."""

    max_bytes: int = 2**30  # file size
    max_seconds: float = 3600.0  # duration (Voxtral listens to half an hour and more)
    max_channels: int = 16  # mixed down block by block, so channels cost little memory
    max_rate: int = 192_000  # samples per second; with max_seconds it bounds the decoded samples' memory


def read_audio(source: str | os.PathLike | bytes, limits: AudioLimits = AudioLimits(),
               sampling_rate: int = 16000) -> np.ndarray:
    """The samples of an audio file (a path, or the file's bytes) as float32 mono at `sampling_rate`:
    the channels' mean, resampled when the file's rate differs as librosa.load and transformers'
    load_audio resample (soxr)."""
    sf = _soundfile()
    if isinstance(source, (bytes, bytearray)):
        return _decode(sf, io.BytesIO(source), f"<{len(source)} bytes>", len(source), limits, sampling_rate)
    try:
        file = open(source, "rb")
    except OSError as e:
        raise OmniInputError(f"cannot read audio {source}: {e.strerror}; check the path") from None
    # Opened here, so that a missing file or a folder fails with the reason libsndfile would not give.
    with file:
        return _decode(sf, file, str(source), os.fstat(file.fileno()).st_size, limits, sampling_rate)


def load_audio(source, limits: AudioLimits = AudioLimits(), sampling_rate: int = 16000) -> np.ndarray:
    """Float32 mono samples at `sampling_rate` from a file (`read_audio`), a (samples, rate) pair or
    bare samples already at `sampling_rate`. Samples are 1-D or (frames, channels), float in [-1, 1]
    or signed integers (scaled as PCM: int16 by 1 / 32768)."""
    if isinstance(source, (str, os.PathLike, bytes, bytearray)):
        return read_audio(source, limits, sampling_rate)
    samples, rate = source if isinstance(source, tuple) and len(source) == 2 else (source, sampling_rate)
    samples = np.asarray(samples)
    if not (isinstance(rate, (int, np.integer)) and rate > 0):
        raise OmniInputError(f"sampling rate {rate!r}: give a whole number of samples per second > 0")
    if samples.ndim not in (1, 2) or samples.dtype.kind not in "fi":
        raise OmniInputError(f"audio samples of shape {samples.shape} and type {samples.dtype}: give float or "
                             "signed-integer samples, 1-D or (frames, channels)")
    if samples.ndim == 2 and samples.shape[1] > limits.max_channels:
        raise AudioTooLarge(f"audio samples of shape {samples.shape} have {samples.shape[1]} channels, over the "
                            f"{limits.max_channels} audio may have: give (frames, channels), or mix it down")
    if len(samples) / rate > limits.max_seconds:
        raise AudioTooLarge(f"audio samples last {len(samples) / rate:.1f} s, over the {limits.max_seconds:g} s "
                            "audio may last: cut them")
    if samples.dtype.kind == "i":
        samples = samples / (np.iinfo(samples.dtype).max + 1)
    samples = samples.astype(np.float32, copy=False)
    return _finish(samples.mean(axis=1) if samples.ndim == 2 else samples, rate, sampling_rate, "the audio samples")


def write_audio(path: str | Path, samples, sampling_rate: int = 16000) -> None:
    """Write float samples in [-1, 1] (1-D, or (frames, channels)) as 16-bit PCM to a .wav or .flac
    file, atomically; values beyond [-1, 1] are clipped."""
    sf = _soundfile()
    path = Path(path)
    file_format = WRITE_FORMATS.get(path.suffix.lower())
    if file_format is None:
        raise OmniInputError(f"{path}: write audio to a {' or '.join(WRITE_FORMATS)} file")
    samples = np.asarray(samples)
    if samples.ndim not in (1, 2) or samples.dtype.kind != "f" or not samples.size:
        raise OmniInputError(f"audio samples of shape {samples.shape} and type {samples.dtype}: give float samples "
                             "in [-1, 1], 1-D or (frames, channels)")
    if not np.isfinite(samples).all():
        raise OmniInputError(f"{path}: the samples hold NaN or infinite values")
    if not (isinstance(sampling_rate, int) and sampling_rate > 0):
        raise OmniInputError(f"sampling_rate={sampling_rate!r} must be a whole number > 0")
    # Scaled by 32768, as libsndfile scales 16-bit PCM back to float: a round trip is off by half a
    # step at most (a whole step at +1.0, which clips to 32767).
    pcm = np.clip(np.round(samples * 32768.0), -32768, 32767).astype(np.int16)
    atomic_write(path, lambda tmp: sf.write(tmp, pcm, sampling_rate, subtype="PCM_16", format=file_format))


def _soundfile():
    try:
        import soundfile
    except ImportError as e:
        raise OmniInputError("reading and writing audio files needs soundfile: pip install 'omnilm[media]'") from e
    return soundfile


def _decode(sf, file, name: str, size: int, limits: AudioLimits, sampling_rate: int) -> np.ndarray:
    if size == 0:
        raise OmniInputError(f"{name} is empty: give an audio file (WAV, FLAC, MP3 or OGG)")
    if size > limits.max_bytes:
        raise AudioTooLarge(f"{name} is {size:,} bytes, over the {limits.max_bytes:,} an audio file may be: cut or "
                            "compress it")
    try:
        with sf.SoundFile(file) as f:
            _check_header(name, f, limits)
            declared, rate = f.frames, f.samplerate
            # The channels' mean, block by block: memory for the mono samples only. Not f.blocks(),
            # which pads a block that a truncated file cuts short with stale memory (soundfile 0.14).
            blocks = []
            while len(block := f.read(2**16, dtype="float32", always_2d=True)):
                blocks.append(block.mean(axis=1))
            log = f.extra_info
    except sf.LibsndfileError as e:
        raise OmniInputError(f"{name} cannot be read as audio ({e.error_string.rstrip('.') or f'error {e.code}'}): "
                             "it is damaged, truncated or not audio; give a WAV, FLAC, MP3 or OGG file") from None
    samples = np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
    if cut := _data_cut_short(log):
        raise OmniInputError(f"{name} is truncated: {cut[1]} bytes of samples of the {cut[0]} its header declares")
    if declared - len(samples) > SHORTFALL_SLACK:
        raise OmniInputError(f"{name} is truncated: {len(samples)} samples of the {declared} its header declares")
    return _finish(samples, rate, sampling_rate, name)


def _check_header(name: str, f, limits: AudioLimits) -> None:
    if f.channels > limits.max_channels:
        raise AudioTooLarge(f"{name} has {f.channels} channels, over the {limits.max_channels} audio may have: "
                            "mix it down")
    if f.samplerate > limits.max_rate:
        raise AudioTooLarge(f"{name} is sampled at {f.samplerate} Hz, over the {limits.max_rate} Hz audio may be: "
                            "resample it")
    if f.frames / f.samplerate > limits.max_seconds:
        raise AudioTooLarge(f"{name} lasts {f.frames / f.samplerate:.1f} s, over the {limits.max_seconds:g} s "
                            "audio may last: cut it")
    if f.frames == 0:
        raise OmniInputError(f"{name} holds no audio samples: it is empty or truncated")


def _data_cut_short(log: str) -> tuple[int, int] | None:
    """(bytes declared, bytes present) of a WAV or AIFF cut short, which libsndfile reads without an
    error, shortened to the bytes present; its log says so: `data : 32000 (should be 15978)`.
    A declared 0xFFFFFFFF is a streamed file's placeholder, not a cut."""
    match = re.search(r"^(?:data|SSND) : (\d+) \(should be (\d+)\)", log, re.MULTILINE)
    if match is None or int(match[1]) == 0xFFFFFFFF:
        return None
    return int(match[1]), int(match[2])


def _finish(samples: np.ndarray, rate: int, sampling_rate: int, name: str) -> np.ndarray:
    if not len(samples):
        raise OmniInputError(f"{name} holds no audio samples: give at least one")
    if not np.isfinite(samples).all():
        raise OmniInputError(f"{name} holds NaN or infinite samples: it is damaged")
    if rate == sampling_rate:
        return samples
    try:
        import soxr
    except ImportError as e:
        raise OmniInputError("resampling audio needs soxr: pip install 'omnilm[media]'") from e
    # As librosa.load and transformers' load_audio (soundfile backend) do: soxr at "HQ", then padded or
    # cut to ceil(n * new rate / old rate) samples (soxr itself rounds).
    n = math.ceil(len(samples) * sampling_rate / rate)
    resampled = soxr.resample(samples, rate, sampling_rate, quality="HQ")
    return np.pad(resampled, (0, max(0, n - len(resampled))))[:n]
