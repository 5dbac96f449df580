"""Audio in: the log-mel front end against transformers' WhisperFeatureExtractor (and VoxtralProcessor's
way of cutting long audio), files read as transformers' load_audio reads them, 16-bit round trips,
and one-line errors for files that cannot be used (soundfile tests skip where it is absent)."""

import math
import sys

import numpy as np
import pytest
import torch
from conftest import one_line_error

from omnilm.data.audio import (AudioLimits, AudioTooLarge, LogMelConfig, load_audio, log_mel, mel_filters,
                               read_audio, write_audio)

NO_SOUNDFILE = "soundfile (the [media] extra) is not installed"


def signal(seconds: float, rate: int = 16000, seed: int = 0, channels: int = 0) -> np.ndarray:
    """Three tones and white noise, float32 in [-1, 1]: (n,), or (n, channels) with a different mix each."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * rate)) / rate
    columns = []
    for c in range(max(channels, 1)):
        tones = sum(a * np.sin(2 * np.pi * f * (1 + 0.1 * c) * t) for a, f in [(0.3, 220), (0.2, 1234.5), (0.1, 5000)])
        columns.append(tones + 0.05 * rng.standard_normal(len(t)))
    x = np.stack(columns, axis=1) if channels else columns[0]
    return np.clip(x, -1, 1).astype(np.float32)


def whisper(n_mels: int, **kw):
    transformers = pytest.importorskip("transformers")
    assert transformers.utils.is_torch_available()  # so the extractor takes its torch path, the one we mirror
    return transformers.WhisperFeatureExtractor(feature_size=n_mels, **kw)


def features(extractor, audio: np.ndarray, **kw) -> torch.Tensor:
    return extractor(audio, sampling_rate=16000, return_tensors="pt", device="cpu", **kw)["input_features"]


# --- the front end -------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_mels", [80, 128])
def test_the_mel_filters_are_transformers_slaney_filters(n_mels):
    audio_utils = pytest.importorskip("transformers.audio_utils")
    theirs = audio_utils.mel_filter_bank(num_frequency_bins=201, num_mel_filters=n_mels, min_frequency=0.0,
                                         max_frequency=8000.0, sampling_rate=16000, norm="slaney", mel_scale="slaney")
    ours = mel_filters(n_mels)
    assert ours.shape == theirs.shape == (201, n_mels)
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(ours, whisper(n_mels).mel_filters, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("n_mels", [80, 128])
@pytest.mark.parametrize("seconds", [1.0, 7.3, 30.0])
def test_log_mel_is_the_whisper_feature_extractor(n_mels, seconds):
    extractor = whisper(n_mels)
    config = LogMelConfig.from_hf(extractor.to_dict())
    assert config == LogMelConfig(n_mels=n_mels) and config.window_frames == extractor.nb_max_frames
    audio = signal(seconds, seed=n_mels)
    theirs = features(extractor, audio)
    ours = log_mel(audio, config)
    assert ours.shape == theirs.shape == (1, n_mels, 3000) and ours.dtype == torch.float32
    assert (ours - theirs).abs().max() < 1e-5


@pytest.mark.parametrize("window_seconds, seconds, n_mels", [(30, 65.0, 128), (5, 12.3, 80)])
def test_long_audio_is_cut_into_windows_each_its_own_whisper_input(window_seconds, seconds, n_mels):
    """65 s in 30 s windows (or 12.3 s in the 5 s windows of a tiny model): 3 windows, each equal to
    the extractor on that slice alone. The windows differ in loudness, so each one's own peak matters."""
    extractor = whisper(n_mels, chunk_length=window_seconds)
    config = LogMelConfig(n_mels=n_mels, window_seconds=window_seconds)
    n = config.window_samples
    audio = signal(seconds) * np.repeat([1.0, 0.05, 0.3], n)[: round(seconds * 16000)].astype(np.float32)
    ours = log_mel(audio, config)
    assert ours.shape == (3, n_mels, config.window_frames)
    for i in range(3):
        theirs = features(extractor, audio[i * n:(i + 1) * n])
        assert (ours[i] - theirs[0]).abs().max() < 1e-5, i


def test_per_window_false_is_voxtral_cutting_one_spectrogram():
    """VoxtralProcessor pads to a multiple of 30 s, takes the features of the whole clip and cuts them
    into windows of max_source_positions frames (`_retrieve_input_features`)."""
    extractor = whisper(128)
    audio = signal(65.0) * np.repeat([1.0, 0.05, 0.3], 480000)[:65 * 16000].astype(np.float32)
    whole = features(extractor, audio, padding=True, truncation=False, pad_to_multiple_of=480000)
    theirs = whole.reshape(128, -1, 3000).transpose(0, 1)
    ours = log_mel(audio, LogMelConfig(n_mels=128), per_window=False)
    assert ours.shape == theirs.shape == (3, 128, 3000)
    assert (ours - theirs).abs().max() < 1e-5
    assert (ours - log_mel(audio, LogMelConfig(n_mels=128))).abs().max() > 0.1  # the two ways differ


def test_log_mel_settings_and_inputs_are_checked():
    one_line_error(lambda: LogMelConfig(window_seconds=0.01), "window_seconds=0.01", "at least n_fft=400")
    one_line_error(lambda: LogMelConfig(n_mels=0), "n_mels=0")
    one_line_error(lambda: LogMelConfig.from_hf({"dither": 1e-5}), "dither")
    one_line_error(lambda: log_mel(np.zeros((2, 16000))), "(2, 16000)", "mono")


# --- files -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".wav", ".flac"])
def test_16_bit_files_round_trip_within_one_step(tmp_path, suffix):
    sf = pytest.importorskip("soundfile", reason=NO_SOUNDFILE)
    audio = signal(1.3)
    audio[:4] = [1.0, -1.0, 0.99999, -0.99999]  # the ends of the range
    path = tmp_path / f"clip{suffix}"
    write_audio(path, audio, 16000)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # written atomically: no temporary left
    assert sf.info(path).subtype == "PCM_16" and sf.info(path).format == suffix[1:].upper()
    back = read_audio(path)
    assert back.dtype == np.float32 and back.shape == audio.shape
    assert np.abs(back - audio).max() <= 1 / 32768
    # The same samples as integers, as a (samples, rate) pair: PCM scaled by 1 / 32768.
    assert np.array_equal(load_audio((sf.read(path, dtype="int16")[0], 16000)), back)


@pytest.mark.parametrize("rate", [44100, 8000])
def test_stereo_at_another_rate_comes_back_mono_at_16k_as_transformers_loads_it(tmp_path, rate):
    sf = pytest.importorskip("soundfile", reason=NO_SOUNDFILE)
    soxr = pytest.importorskip("soxr")
    audio_utils = pytest.importorskip("transformers.audio_utils")
    path = tmp_path / "stereo.wav"
    write_audio(path, signal(2.0, rate, channels=2)[: 2 * rate + 100], rate)  # 44.1 kHz: soxr rounds down, pad 1
    stereo = sf.read(path, dtype="float32", always_2d=True)[0]
    mono = read_audio(path)
    expected_length = math.ceil(len(stereo) * 16000 / rate)
    assert mono.dtype == np.float32 and mono.shape == (expected_length,)
    resampled = soxr.resample(stereo.mean(axis=1), rate, 16000)
    assert np.array_equal(mono[: len(resampled)], resampled) and not mono[len(resampled):].any()
    assert np.array_equal(mono, audio_utils.load_audio(str(path), 16000, backend="soundfile"))
    assert np.array_equal(read_audio(path.read_bytes()), mono)  # the file's bytes
    assert np.array_equal(load_audio((stereo, rate)), mono)  # the decoded samples and their rate


@pytest.mark.parametrize("file_format, subtype", [("MP3", "MPEG_LAYER_III"), ("OGG", "VORBIS")])
def test_lossy_files_are_read_as_transformers_reads_them(tmp_path, file_format, subtype):
    sf = pytest.importorskip("soundfile", reason=NO_SOUNDFILE)
    audio_utils = pytest.importorskip("transformers.audio_utils")
    if file_format not in sf.available_formats():
        pytest.skip(f"this libsndfile has no {file_format}")
    path = tmp_path / f"clip.{file_format.lower()}"
    sf.write(path, signal(1.5, 22050, channels=2), 22050, format=file_format, subtype=subtype)
    mono = read_audio(path)
    assert mono.shape == (math.ceil(sf.info(path).frames * 16000 / 22050),)
    assert np.array_equal(mono, audio_utils.load_audio(str(path), 16000, backend="soundfile"))


def test_arrays_as_input():
    audio = signal(0.5)
    assert np.array_equal(load_audio(audio), audio)  # already at 16 kHz, mono, float32
    assert np.array_equal(load_audio(torch.from_numpy(audio)), audio)
    one_line_error(lambda: load_audio((np.zeros((2, 16000), np.float32), 16000)), "(2, 16000)", "(frames, channels)")
    one_line_error(lambda: load_audio(np.full(10, np.nan, np.float32)), "NaN")
    one_line_error(lambda: load_audio((audio, 0)), "sampling rate 0")
    one_line_error(lambda: load_audio(np.zeros(0, np.float32)), "no audio samples")
    one_line_error(lambda: load_audio(audio.astype(np.uint8)), "uint8")
    one_line_error(lambda: load_audio(audio, limits=AudioLimits(max_seconds=0.1)), "0.1 s")


# --- files that cannot be used ---------------------------------------------------------------------------


def test_missing_empty_and_non_audio_files_fail_in_one_line(tmp_path):
    pytest.importorskip("soundfile", reason=NO_SOUNDFILE)
    from PIL import Image

    one_line_error(lambda: read_audio(tmp_path / "nowhere.wav"), "nowhere.wav", "No such file")
    one_line_error(lambda: read_audio(tmp_path), str(tmp_path), "Is a directory")
    (tmp_path / "empty.wav").write_bytes(b"")
    one_line_error(lambda: read_audio(tmp_path / "empty.wav"), "empty.wav", "is empty")
    (tmp_path / "notes.wav").write_text("not a sound\n" * 20)
    Image.new("RGB", (8, 8)).save(tmp_path / "image.png")
    for name in ("notes.wav", "image.png"):
        one_line_error(lambda: read_audio(tmp_path / name), name, "cannot be read as audio", "not audio")
    one_line_error(lambda: write_audio(tmp_path / "a.mp3", signal(0.1)), "a.mp3", ".wav or .flac")
    one_line_error(lambda: write_audio(tmp_path / "a.wav", np.full(10, np.inf)), "a.wav", "NaN or infinite")


@pytest.mark.parametrize("file_format, cut", [("WAV", 0.5), ("WAV", 30), ("FLAC", 0.5), ("MP3", 0.5), ("OGG", 0.5)])
def test_truncated_files_fail_in_one_line(tmp_path, file_format, cut):
    """Cut to half its bytes, or to 30 bytes of a WAV header: each fails, naming the file."""
    sf = pytest.importorskip("soundfile", reason=NO_SOUNDFILE)
    if file_format not in sf.available_formats():
        pytest.skip(f"this libsndfile has no {file_format}")
    path = tmp_path / f"clip.{file_format.lower()}"
    sf.write(path, signal(2.0), 16000, format=file_format)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut) if cut < 1 else cut])
    msg = one_line_error(lambda: read_audio(path), path.name)
    assert any(word in msg for word in ("truncated", "no audio samples")), msg


def test_files_over_the_limits_are_refused_before_decoding(tmp_path, monkeypatch):
    sf = pytest.importorskip("soundfile", reason=NO_SOUNDFILE)
    path = tmp_path / "stereo.wav"
    write_audio(path, signal(1.3, channels=2), 16000)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded a file over the limits")

    monkeypatch.setattr(sf.SoundFile, "read", no_decoding)
    for limits, part in [(AudioLimits(max_bytes=1000), f"{path.stat().st_size:,} bytes, over the 1,000"),
                         (AudioLimits(max_seconds=1.0), "lasts 1.3 s, over the 1 s"),
                         (AudioLimits(max_channels=1), "2 channels"), (AudioLimits(max_rate=8000), "16000 Hz")]:
        one_line_error(lambda: read_audio(path, limits), "stereo.wav", part)
        with pytest.raises(AudioTooLarge):
            read_audio(path, limits)


def test_without_soundfile_the_error_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "soundfile", None)  # `import soundfile` now fails
    one_line_error(lambda: read_audio(tmp_path / "a.wav"), "pip install 'omnilm[media]'")
    one_line_error(lambda: write_audio(tmp_path / "a.wav", signal(0.1)), "pip install 'omnilm[media]'")
