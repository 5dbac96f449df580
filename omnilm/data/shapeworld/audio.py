"""ShapeWorld you can hear: short clips of tones, with questions whose short answers are exact.

    clip = make_audio_example(index, seed, split)     # samples (N,), tones, LLaVA records
    path = write_shapeworld_audio(out_dir, n, seed, split)

The world. A clip is one WINDOW_SECONDS window (2 s, 32000 samples at SAMPLE_RATE = 16 kHz, float32
in [-1, 1]). It holds 1 to 5 tones (uniform), each at one of three PITCHES (low 300, mid 600, high
1200 Hz: octaves apart, drawn uniformly and independently per tone) and all in one of three
TIMBRES (sine, square, saw; the square and saw band-limited, a Fourier series cut at the Nyquist
frequency, so nothing aliases). Every tone has the same RMS, whatever its timbre, so loudness
tells nothing, and a 5 ms linear fade at each end, so there are no clicks. Tones last 0.15 to 0.3 s
and are at least 0.1 s apart; the silence left over is cut at random into the time before, between
and after them, so neither the first tone's start nor the spacing gives away the count. Some clips
(P_NOISE) carry white noise of a low level (NOISE_LEVELS), uniform in [-level, level].

The families (AUDIO_FAMILIES), each asked once per clip where the clip allows it, one record
each; `chance` is a uniform guess among the answers the question allows:

    count   "How many tones are there?" -> a digit, 1 to 5                               1/5
    pitch   "What is the pitch of the second tone?" -> low | mid | high                  1/3
    melody  "Does the melody go up or down?" -> up | down (the last tone against the
            first; asked only where they differ, so pitches drawn alike make it even)    1/2
    timbre  "What kind of tone is it?" -> sine | square | saw                            1/3

Across modalities (CROSS_FAMILIES): a ShapeWorld image of 1 to 4 shapes and a clip of 1 to 4
tones, "Are there as many tones as shapes?" -> yes | no (1/2). Half the pairs have as many of
each; the others draw the tone count uniformly from the other three, so every tone count and
every shape count answers yes half the time: neither the image nor the clip alone tells.

The haystack (`make_audio_needle`): a clip of n_windows windows of ordinary tones, one of which
also holds a bell, a struck bar's sound that no tone makes: inharmonic partials at 1, 2.76 and
5.40 times its fundamental (BELL_PARTIALS), decaying exponentially (BELL_DECAY_SECONDS), 0.4 s
long, its first 0.1 s as loud (RMS) as a tone. Its fundamental is one of the PITCHES, uniform;
"What is the pitch of the bell?" -> low | mid | high (1/3), as the video haystack asks the colour
of its cross.

Determinism: clip `index` of `split` under `seed` draws from one generator, `audio_rng`, in a
fixed order: the clip's contents, its questions, then its timing, phases and noise (a numpy
generator seeded from it); so the same call gives the same samples and text in any process.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from omnilm.data.audio import write_audio
from omnilm.data.llava_json import write_records
from omnilm.data.shapeworld.scenes import IMAGE_SIZE, MAX_OBJECTS, Scene, generate_scene, render
from omnilm.errors import OmniInputError

AUDIO_FAMILIES = ("count", "pitch", "melody", "timbre")
CROSS_FAMILIES = ("tones_vs_shapes",)
AUDIO_QUESTIONS = ("one", "all")  # a record per family, or one multi-turn record of every question

SAMPLE_RATE = 16000
WINDOW_SECONDS = 2.0
WINDOW_SAMPLES = round(SAMPLE_RATE * WINDOW_SECONDS)
MAX_TONES = 5
PITCHES = {"low": 300.0, "mid": 600.0, "high": 1200.0}  # Hz, an octave apart
TIMBRES = ("sine", "square", "saw")
TONE_SECONDS = (0.15, 0.3)  # a tone's length, uniform
MIN_GAP_SECONDS = 0.1  # silence between two tones, at least
FADE_SECONDS = 0.005  # linear fade in and out
TONE_RMS = 0.5 / math.sqrt(2)  # a sine of amplitude 0.5; squares and saws as loud
P_NOISE = 0.3  # a clip carries white noise this often, unless `noise` is given
NOISE_LEVELS = (0.02, 0.05)  # its peak, uniform
MAX_NOISE = 0.2  # what `noise` may be
ORDINALS = ("first", "second", "third", "fourth", "fifth")

AUDIO_TEMPLATES = {
    "count": ("How many tones are there?", "How many tones do you hear?"),
    "pitch": ("What is the pitch of the {ordinal} tone?", "Is the {ordinal} tone low, mid or high?"),
    "melody": ("Does the melody go up or down?", "From the first tone to the last, does the pitch go up or down?"),
    "timbre": ("What kind of tone is it?", "What kind of tone do you hear: sine, square or saw?"),
    "tones_vs_shapes": ("Are there as many tones as shapes?", "Is the number of tones the same as the number of "
                                                              "shapes?"),
}


def chance(family: str) -> float:
    """Accuracy of a uniform guess among the answers a `family` question allows (an audio, cross-modal
    or "needle" family): what a model that ignores the clip scores."""
    levels = {"count": 1 / MAX_TONES, "pitch": 1 / len(PITCHES), "melody": 1 / 2, "timbre": 1 / len(TIMBRES),
              "tones_vs_shapes": 1 / 2, "needle": 1 / len(PITCHES)}
    if family not in levels:
        raise ValueError(f"unknown audio question family {family!r}: use one of {', '.join(levels)}")
    return levels[family]


CHANCE = {family: chance(family) for family in AUDIO_FAMILIES + CROSS_FAMILIES + ("needle",)}


@dataclass(frozen=True)
class Tone:
    """One tone: its pitch's name, first sample and length in samples, and the phase (in periods)
    its waveform starts at."""

    pitch: str
    start: int = 0
    length: int = 0
    phase: float = 0.0

    @property
    def frequency(self) -> float:
        return PITCHES[self.pitch]

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass
class AudioClip:
    """A clip's samples ((N,) float32 in [-1, 1] at SAMPLE_RATE), its tones in time order, their one
    timbre, the noise level (0: none) and LLaVA records."""

    samples: np.ndarray
    tones: tuple[Tone, ...]
    timbre: str
    noise: float
    records: list = field(default_factory=list)

    @property
    def n_tones(self) -> int:
        return len(self.tones)


def audio_rng(split: str, seed: int, index: int) -> random.Random:
    """The one generator behind clip `index` of `split` under `seed`: a stream of its own, apart
    from the image (`example_rng`) and video (`video_rng`) worlds'."""
    return random.Random(f"shapeworld-audio:{split}:{seed}:{index}")


# --- the clip's contents, timing and samples -----------------------------------------------------


def _draw_tones(rng: random.Random, n_tones: int | None = None) -> tuple[tuple[Tone, ...], str]:
    """1 to 5 tones (or `n_tones`), each pitch uniform, and the clip's timbre (no timing yet)."""
    n = n_tones if n_tones is not None else rng.randint(1, MAX_TONES)
    timbre = rng.choice(TIMBRES)
    return tuple(Tone(rng.choice(tuple(PITCHES))) for _ in range(n)), timbre


def _tone_length(rng: random.Random) -> int:
    return round(rng.uniform(*TONE_SECONDS) * SAMPLE_RATE)


def _lay_out(rng: random.Random, lengths: list[int]) -> list[int]:
    """Starts of sounds of these `lengths`, in this order, in one window: at least MIN_GAP_SECONDS
    apart, the rest of the silence cut at uniform points into the time before, between and after."""
    gap = round(MIN_GAP_SECONDS * SAMPLE_RATE)
    slack = WINDOW_SAMPLES - sum(lengths) - gap * (len(lengths) - 1)
    if slack < 0:
        raise RuntimeError(f"sounds of {lengths} samples do not fit one window: a bug")
    cuts = sorted(rng.randint(0, slack) for _ in lengths)
    spare = [b - a for a, b in zip([0] + cuts, cuts)]  # silence before each sound, beyond the gap
    starts, at = [], 0
    for k, (length, extra) in enumerate(zip(lengths, spare)):
        at += extra + (gap if k else 0)
        starts.append(at)
        at += length
    return starts


def _place(rng: random.Random, tones: tuple[Tone, ...]) -> tuple[Tone, ...]:
    lengths = [_tone_length(rng) for _ in tones]
    starts = _lay_out(rng, lengths)
    return tuple(replace(t, start=s, length=n, phase=rng.random()) for t, s, n in zip(tones, starts, lengths))


def _draw_noise(rng: random.Random, noise: float | None) -> float:
    # Both numbers are drawn whatever `noise` is, so a given level changes nothing else in the clip.
    noisy, level = rng.random() < P_NOISE, rng.uniform(*NOISE_LEVELS)
    return noise if noise is not None else (level if noisy else 0.0)


@lru_cache(maxsize=len(TIMBRES) * len(PITCHES))
def _wavetable(timbre: str, frequency: float, size: int = 4096) -> np.ndarray:
    """One period of the timbre at RMS TONE_RMS, `size` + 1 points (the last the first again): the
    Fourier series of a square (odd harmonics, 1/k) or saw (all, 1/k) up to the Nyquist frequency."""
    ks = np.arange(1, int((SAMPLE_RATE / 2) // frequency) + 1)
    weights = {"sine": (ks == 1) * 1.0, "square": (ks % 2 == 1) / ks, "saw": 1.0 / ks}[timbre]
    theta = 2 * np.pi * np.arange(size + 1)[:, None] / size
    wave = (np.sin(theta * ks) * weights).sum(1)
    return wave * TONE_RMS / np.sqrt((weights ** 2).sum() / 2)  # a harmonic sum's RMS over a period


def _fade(length: int) -> np.ndarray:
    ramp = max(1, round(FADE_SECONDS * SAMPLE_RATE))
    k = np.arange(length)
    return np.minimum(1.0, np.minimum(k + 1, length - k) / ramp)


def _synthesize(tones: tuple[Tone, ...], timbre: str, noise: float, gen: np.random.Generator) -> np.ndarray:
    """(WINDOW_SAMPLES,) float64: the tones, faded, plus uniform white noise of peak `noise`."""
    out = np.zeros(WINDOW_SAMPLES)
    for t in tones:
        table = _wavetable(timbre, t.frequency)
        cycles = (t.frequency * np.arange(t.length) / SAMPLE_RATE + t.phase) % 1.0
        out[t.start:t.end] = np.interp(cycles * (len(table) - 1), np.arange(len(table)), table) * _fade(t.length)
    if noise > 0:
        out += gen.uniform(-noise, noise, WINDOW_SAMPLES)
    return out


def _finish(samples: np.ndarray) -> np.ndarray:
    return np.clip(samples, -1.0, 1.0).astype(np.float32)


# --- questions -----------------------------------------------------------------------------------


def can_ask_audio(family: str, tones: tuple[Tone, ...]) -> bool:
    """Whether a clip of these tones has a `family` question: melody needs a first and last tone of
    different pitches."""
    if family == "melody":
        return tones[0].pitch != tones[-1].pitch
    return family in AUDIO_FAMILIES


def _melody(tones: tuple[Tone, ...]) -> str:
    return "up" if tones[-1].frequency > tones[0].frequency else "down"


def ask_audio(family: str, tones: tuple[Tone, ...], timbre: str, rng: random.Random,
              which: int | None = None) -> tuple[str, str]:
    """One `family` question about a clip of `tones` in `timbre` and its canonical answer; a pitch
    question asks about tone `which` (0-based; default uniform)."""
    if family not in AUDIO_FAMILIES:
        raise ValueError(f"unknown audio question family {family!r}: use one of {', '.join(AUDIO_FAMILIES)}")
    if not can_ask_audio(family, tones):
        raise ValueError(f"no {family} question for this clip")
    templates = AUDIO_TEMPLATES[family]
    if family == "pitch":
        k = which if which is not None else rng.randrange(len(tones))
        return rng.choice(templates).format(ordinal=ORDINALS[k]), tones[k].pitch
    answer = {"count": str(len(tones)), "melody": _melody(tones), "timbre": timbre}[family]
    return rng.choice(templates), answer


def every_question(tones: tuple[Tone, ...], timbre: str, rng: random.Random) -> list[tuple[str, str, str]]:
    """Every question a clip answers, in random order, as (family, question, answer): the count,
    each tone's pitch, the melody where it has one, and the timbre."""
    out = [("count", *ask_audio("count", tones, timbre, rng))]
    out += [("pitch", *ask_audio("pitch", tones, timbre, rng, k)) for k in range(len(tones))]
    out += [(family, *ask_audio(family, tones, timbre, rng)) for family in ("melody", "timbre")
            if can_ask_audio(family, tones)]
    rng.shuffle(out)
    return out


# --- examples ------------------------------------------------------------------------------------


def audio_path(index: int, split: str, kind: str = "") -> str:
    """Where clip `index` goes, relative to the output folder; `kind` "cross" or "needle" keeps
    those clips apart from the question clips of the same index."""
    return f"audio/{split}_{kind + '_' if kind else ''}{index:06d}.wav"


def make_audio_example(index: int, seed: int, split: str, questions: str = "one",
                       noise: float | None = None) -> AudioClip:
    """Clip `index`: its samples, tones and one LLaVA record for each family the clip can answer
    (`task` the family, `audio` its path as `write_audio_clips` writes it), all from `audio_rng`;
    with `questions` "all", one multi-turn record of `every_question` instead (`turn_tasks` the
    families). `noise` fixes the noise's peak (0: none) and changes nothing else."""
    _check(split, questions)
    _check_noise(noise)
    rng = audio_rng(split, seed, index)
    tones, timbre = _draw_tones(rng)
    path, stem, records = audio_path(index, split), f"{split}-{index:06d}", []
    if questions == "all":
        asked = every_question(tones, timbre, rng)
        turns = [{"from": role, "value": ("<audio>\n" if k == 0 and role == "human" else "") + text}
                 for k, (_, question, answer) in enumerate(asked) for role, text in (("human", question),
                                                                                     ("gpt", answer))]
        records.append({"id": f"{stem}-all", "audio": path, "task": "multi_turn",
                        "turn_tasks": [family for family, _, _ in asked], "n_tones": len(tones),
                        "conversations": turns})
    for family in AUDIO_FAMILIES if questions == "one" else ():
        if can_ask_audio(family, tones):
            question, answer = ask_audio(family, tones, timbre, rng)
            records.append({"id": f"{stem}-{family}", "audio": path, "task": family, "n_tones": len(tones),
                            "conversations": [{"from": "human", "value": "<audio>\n" + question},
                                              {"from": "gpt", "value": answer}], "answer": answer})
    tones = _place(rng, tones)
    noise = _draw_noise(rng, noise)
    samples = _synthesize(tones, timbre, noise, np.random.default_rng(rng.getrandbits(64)))
    return AudioClip(_finish(samples), tones, timbre, noise, records)


class CrossExample(NamedTuple):
    scene: Scene
    image: Image.Image
    clip: AudioClip  # its one record names both the image and the clip


def make_cross_example(index: int, seed: int, split: str) -> CrossExample:
    """Cross-modal example `index`: a ShapeWorld image of 1 to 4 shapes, a clip of 1 to 4 tones
    (as many as the shapes half the time) and one record, "Are there as many tones as shapes?"."""
    _check(split, "one")
    rng = random.Random(f"shapeworld-audio-cross:{split}:{seed}:{index}")
    scene = generate_scene(rng)
    same = rng.random() < 0.5
    n_tones = len(scene) if same else rng.choice([k for k in range(1, MAX_OBJECTS + 1) if k != len(scene)])
    tones, timbre = _draw_tones(rng, n_tones)
    question, answer = rng.choice(AUDIO_TEMPLATES["tones_vs_shapes"]), "yes" if same else "no"
    image = render(scene, IMAGE_SIZE, rng)
    record = {"id": f"{split}-{index:06d}-cross", "image": f"images/{split}_cross_{index:06d}.png",
              "audio": audio_path(index, split, "cross"), "task": "tones_vs_shapes", "n_objects": len(scene),
              "n_tones": n_tones, "conversations": [{"from": "human", "value": "<image>\n<audio>\n" + question},
                                                    {"from": "gpt", "value": answer}], "answer": answer}
    tones = _place(rng, tones)
    noise = _draw_noise(rng, None)
    samples = _synthesize(tones, timbre, noise, np.random.default_rng(rng.getrandbits(64)))
    return CrossExample(scene, image, AudioClip(_finish(samples), tones, timbre, noise, [record]))


# --- the audio haystack --------------------------------------------------------------------------
#
# As the video needle: a long clip of ordinary windows, one of which holds something no other does,
# here a bell among 1 to 3 tones, and the question asks its pitch (as the video asks the cross's
# colour). A bell's partials are inharmonic: its 2.76 f lies between a tone's harmonics 2 f and
# 3 f, so no sine, square or saw at any of the PITCHES sounds like one.

BELL_PARTIALS = ((1.0, 1.0), (2.76, 0.5), (5.40, 0.25))  # (ratio to the fundamental, amplitude): a struck bar
BELL_DECAY_SECONDS = 0.12  # the time constant of its exponential decay
BELL_SECONDS = 0.4  # its length, a 5 ms fade at each end (FADE_SECONDS)
BELL_LEVEL_SECONDS = 0.1  # its RMS over its first 0.1 s is TONE_RMS, a tone's
MAX_NEEDLE_WINDOWS = 64
NEEDLE_TONES = 3  # tones beside the bell in its window, at most (they and the bell fit 2 s)
NEEDLE_TEMPLATES = ("What is the pitch of the bell?", "Is the bell low, mid or high?")


@dataclass
class AudioNeedle:
    """A haystack clip: samples ((n_windows * WINDOW_SAMPLES,) float32), the needle's window, the
    bell's first sample and length in the whole clip, the question, its answer (the bell's pitch)
    and the record."""

    samples: np.ndarray
    needle_window: int
    start: int
    length: int
    question: str
    answer: str
    record: dict


def _bell(frequency: float, phases: list[float]) -> np.ndarray:
    """A bell of this fundamental: the BELL_PARTIALS, each starting at its phase (in periods), decaying
    over BELL_DECAY_SECONDS, faded at both ends and scaled so that its first BELL_LEVEL_SECONDS has
    RMS TONE_RMS."""
    n = round(BELL_SECONDS * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    wave = sum(a * np.sin(2 * np.pi * (r * frequency * t + phase)) for (r, a), phase in zip(BELL_PARTIALS, phases))
    bell = wave * np.exp(-t / BELL_DECAY_SECONDS) * _fade(n)
    head = bell[:round(BELL_LEVEL_SECONDS * SAMPLE_RATE)]
    return bell * TONE_RMS / np.sqrt((head ** 2).mean())


def make_audio_needle(index: int, seed: int, split: str, n_windows: int = 8,
                      depth: float | None = None) -> AudioNeedle:
    """A haystack clip of `n_windows` 2 s windows of ordinary tones; the window at `depth` (0: the
    first, 1: the last; default uniform) also holds a bell, its pitch low, mid or high equally
    often. One record, task "needle", with the needle's `depth` and `needle_window`."""
    _check(split, "one")
    _check_windows(n_windows)
    if depth is not None and not (isinstance(depth, (int, float)) and 0 <= depth <= 1):
        raise OmniInputError(f"depth is {depth!r}: give a place in the clip from 0 (first window) to 1 (last)")
    rng = random.Random(f"shapeworld-audio-needle:{split}:{seed}:{index}")
    at = rng.randrange(n_windows) if depth is None else round(depth * (n_windows - 1))
    pitch = rng.choice(tuple(PITCHES))
    bell = _bell(PITCHES[pitch], [rng.random() for _ in BELL_PARTIALS])
    windows, start = [], 0
    for w in range(n_windows):
        tones, timbre = _draw_tones(rng, rng.randint(1, NEEDLE_TONES) if w == at else None)
        if w == at:  # the bell is one more sound in the window's layout, anywhere among the tones
            slot = rng.randrange(len(tones) + 1)
            lengths = [_tone_length(rng) for _ in tones]
            starts = _lay_out(rng, lengths[:slot] + [len(bell)] + lengths[slot:])
            start = starts.pop(slot)
            tones = tuple(replace(t, start=s, length=n, phase=rng.random()) for t, s, n in zip(tones, starts, lengths))
        else:
            tones = _place(rng, tones)
        noise = _draw_noise(rng, None)
        window = _synthesize(tones, timbre, noise, np.random.default_rng(rng.getrandbits(64)))
        if w == at:
            window[start:start + len(bell)] += bell
        windows.append(window)
    question, answer = rng.choice(NEEDLE_TEMPLATES), pitch
    record = {"id": f"{split}-{index:06d}-needle", "audio": audio_path(index, split, "needle"), "task": "needle",
              "n_windows": n_windows, "depth": at / max(1, n_windows - 1), "needle_window": at,
              "conversations": [{"from": "human", "value": "<audio>\n" + question}, {"from": "gpt", "value": answer}],
              "answer": answer}
    return AudioNeedle(_finish(np.concatenate(windows)), at, at * WINDOW_SAMPLES + start, len(bell), question,
                       answer, record)


# --- checks and files ----------------------------------------------------------------------------


def _check(split: str, questions: str) -> None:
    if not re.fullmatch(r"[a-z][a-z0-9_]*", str(split)):
        raise OmniInputError(f"split {split!r} is not a plain name: use train or test (lower case letters, digits, _)")
    if questions not in AUDIO_QUESTIONS:
        raise OmniInputError(f"questions={questions!r}: use 'one' (a record per family) or 'all' (one multi-turn "
                             "record of every question a clip answers)")


def _check_noise(noise) -> None:
    if noise is not None and not (isinstance(noise, (int, float)) and 0 <= noise <= MAX_NOISE):
        raise OmniInputError(f"noise is {noise!r}: give the white noise's peak, 0 (none) to {MAX_NOISE}, or leave it "
                             f"unset for noise in {P_NOISE:.0%} of the clips")


def _check_windows(n_windows) -> None:
    if not (_is_int(n_windows) and 1 <= n_windows <= MAX_NEEDLE_WINDOWS):
        raise OmniInputError(f"n_windows is {n_windows!r}: a haystack clip has 1 to {MAX_NEEDLE_WINDOWS} windows "
                             f"of {WINDOW_SECONDS:g} s")


def _check_count(n, what: str) -> None:
    if not _is_int(n) or n < 0:
        raise OmniInputError(f"{what} is {n!r}: ask for zero or more clips")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def write_shapeworld_audio(out_dir: str | Path, n: int, seed: int, split: str, questions: str = "one",
                           needles: bool = False, n_windows: int = 8, cross: int = 0, progress: bool = False) -> Path:
    """Write `n` clips to `out_dir/audio/` (`write_audio_clips`) and `cross` cross-modal examples
    (`write_cross_modal`), and all their records to `out_dir/{split}.json` (replaced atomically;
    paths relative to `out_dir`). Returns the JSON path."""
    _check_count(cross, "cross")
    records = write_audio_clips(out_dir, n, seed, split, questions, needles, n_windows, progress)
    if cross:
        records += write_cross_modal(out_dir, cross, seed, split, progress)
    path = Path(out_dir) / f"{split}.json"
    write_records(path, records)
    return path


def write_audio_clips(out_dir: str | Path, n: int, seed: int, split: str, questions: str = "one",
                      needles: bool = False, n_windows: int = 8, progress: bool = False) -> list[dict]:
    """Write `n` clips as 16-bit WAV files `out_dir/audio/{split}_{index:06d}.wav` (soundfile, the
    `[media]` extra) and return their LLaVA records; `questions` as `make_audio_example`. With
    `needles`, haystack clips (`make_audio_needle`) of `n_windows` windows instead, at
    `{split}_needle_{index:06d}.wav`. A progress bar shows for 500 clips or more, if `progress`."""
    from tqdm import tqdm

    _check_count(n, "n")
    _check(split, questions)
    _check_windows(n_windows)
    out_dir = Path(out_dir)
    (out_dir / "audio").mkdir(parents=True, exist_ok=True)
    records = []
    for index in tqdm(range(n), desc=f"shapeworld audio {split}", unit="clip", disable=not progress or n < 500):
        if needles:
            needle = make_audio_needle(index, seed, split, n_windows)
            samples, clip_records = needle.samples, [needle.record]
        else:
            clip = make_audio_example(index, seed, split, questions)
            samples, clip_records = clip.samples, clip.records
        write_audio(out_dir / clip_records[0]["audio"], samples, SAMPLE_RATE)
        records += clip_records
    return records


def write_cross_modal(out_dir: str | Path, n: int, seed: int, split: str, progress: bool = False) -> list[dict]:
    """Write `n` cross-modal examples (`make_cross_example`): PNGs `out_dir/images/{split}_cross_
    {index:06d}.png` and WAVs `out_dir/audio/{split}_cross_{index:06d}.wav`; returns their records."""
    from tqdm import tqdm

    _check_count(n, "n")
    _check(split, "one")
    out_dir = Path(out_dir)
    for folder in ("audio", "images"):
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
    records = []
    for index in tqdm(range(n), desc=f"shapeworld audio+image {split}", unit="pair", disable=not progress or n < 500):
        example = make_cross_example(index, seed, split)
        (record,) = example.clip.records
        example.image.save(out_dir / record["image"], format="PNG")
        write_audio(out_dir / record["audio"], example.clip.samples, SAMPLE_RATE)
        records.append(record)
    return records
