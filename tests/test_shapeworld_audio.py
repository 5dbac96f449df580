"""ShapeWorld audio: determinism, answers checked against the samples, balance, the haystack, the
cross-modal pairs, and files.

The sample oracle finds the tones from the samples alone (an envelope over a threshold) and reads
each one's pitch and timbre from its spectrum; it answers each question by parsing its text, so
the tests assert that the clip sounds as the records say, not only that the records agree with
the tones they were made from.
"""

import collections
import json
import re

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from omnilm.data.shapeworld.audio import (AUDIO_FAMILIES, BELL_SECONDS, CHANCE, CROSS_FAMILIES, MAX_NEEDLE_WINDOWS,
                                          NEEDLE_TEMPLATES, NEEDLE_TONES, ORDINALS, PITCHES, SAMPLE_RATE, TIMBRES,
                                          TONE_RMS, WINDOW_SAMPLES, AudioClip, chance, make_audio_example,
                                          make_audio_needle, make_cross_example, write_audio_clips,
                                          write_shapeworld_audio)
from omnilm.errors import OmniInputError

GAP = int(0.1 * SAMPLE_RATE)


def _clips(n, seed=0, split="train", **kwargs) -> list[AudioClip]:
    return [make_audio_example(i, seed, split, **kwargs) for i in range(n)]


# --- the sample oracle ----------------------------------------------------------------------------


def segments(samples: np.ndarray, threshold: float = 0.15) -> list[tuple[int, int]]:
    """(start, end) of each sound: where a 5 ms moving maximum of |x| is over `threshold` (above
    the noise's 0.05 peak, below a tone's plateau)."""
    envelope = sliding_window_view(np.pad(np.abs(samples), 40), 81).max(1)
    on = np.concatenate([[0], (envelope > threshold).astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(on))
    return list(zip(edges[::2], edges[1::2]))


def spectrum(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(frequencies, magnitudes) of a Hann-windowed segment, zero-padded to 0.25 Hz bins."""
    mags = np.abs(np.fft.rfft(x * np.hanning(len(x)), 4 * SAMPLE_RATE))
    return np.fft.rfftfreq(4 * SAMPLE_RATE, 1 / SAMPLE_RATE), mags


def dominant(x: np.ndarray) -> float:
    freqs, mags = spectrum(x)
    return float(freqs[np.argmax(mags)])


def pitch_of(x: np.ndarray) -> str:
    f = dominant(x)
    name = min(PITCHES, key=lambda p: abs(np.log(f / PITCHES[p])))
    assert abs(f / PITCHES[name] - 1) < 0.01, f"a tone at {f:.1f} Hz"
    return name


def timbre_of(x: np.ndarray) -> str:
    """Sine: no harmonics; square: odd ones (the third at 1/3); saw: all (the second at 1/2)."""
    freqs, mags = spectrum(x)
    f = freqs[np.argmax(mags)]
    peak = [mags[np.abs(freqs - k * f) < 0.02 * f].max() / mags.max() for k in (2, 3)]
    return "saw" if peak[0] > 0.25 else "square" if peak[1] > 0.15 else "sine"


def answer_from_samples(question: str, samples: np.ndarray) -> str:
    tones = [samples[a:b] for a, b in segments(samples)]
    if question in ("How many tones are there?", "How many tones do you hear?"):
        return str(len(tones))
    if m := re.fullmatch(r"(?:What is the pitch of the (\w+) tone|Is the (\w+) tone low, mid or high)\?", question):
        return pitch_of(tones[ORDINALS.index(m[1] or m[2])])
    if question in ("Does the melody go up or down?", "From the first tone to the last, does the pitch go up or down?"):
        first, last = dominant(tones[0]), dominant(tones[-1])
        assert abs(first / last - 1) > 0.1, "the melody question asked of a first and last tone alike"
        return "up" if last > first else "down"
    if question in ("What kind of tone is it?", "What kind of tone do you hear: sine, square or saw?"):
        kinds = {timbre_of(t) for t in tones}
        assert len(kinds) == 1, kinds
        return kinds.pop()
    raise AssertionError(f"the oracle cannot parse {question!r}")


# --- determinism ----------------------------------------------------------------------------------


def test_same_index_same_samples_and_others_differ():
    for index in range(5):
        a, b = make_audio_example(index, 3, "test"), make_audio_example(index, 3, "test")
        assert a.samples.tobytes() == b.samples.tobytes() and a.records == b.records and a.tones == b.tones
        for other in (make_audio_example(index + 5, 3, "test"), make_audio_example(index, 3, "train"),
                      make_audio_example(index, 4, "test")):
            assert other.samples.tobytes() != a.samples.tobytes()
    assert [c.records for c in _clips(20, split="test")] != [c.records for c in _clips(20, split="train")]
    needle = make_audio_needle(2, 0, "test", 3)
    assert needle.samples.tobytes() == make_audio_needle(2, 0, "test", 3).samples.tobytes()
    assert needle.samples.tobytes() != make_audio_needle(3, 0, "test", 3).samples.tobytes()


def test_noise_level_changes_only_the_noise():
    for index, clip in enumerate(_clips(40, seed=1)):
        quiet = make_audio_example(index, 1, "train", noise=0.0)
        assert quiet.records == clip.records and quiet.tones == clip.tones and quiet.noise == 0.0
        difference = np.abs(quiet.samples - clip.samples).max()
        assert difference == 0.0 if clip.noise == 0 else 0.5 * clip.noise < difference <= clip.noise + 1e-6
    assert 0.15 < np.mean([c.noise > 0 for c in _clips(300, seed=2)]) < 0.45


# --- the clip model and the samples -----------------------------------------------------------------


def test_clip_model():
    starts = collections.defaultdict(list)
    for clip in _clips(300, seed=3, noise=0.0):
        x = clip.samples
        assert x.dtype == np.float32 and x.shape == (WINDOW_SAMPLES,) and np.abs(x).max() <= 1.0
        assert 1 <= clip.n_tones <= 5 and clip.timbre in TIMBRES
        starts[clip.n_tones].append(clip.tones[0].start)
        for t, after in zip(clip.tones, clip.tones[1:] + (None,)):
            assert 0.15 * SAMPLE_RATE <= t.length <= 0.3 * SAMPLE_RATE and 0 <= t.start and t.end <= WINDOW_SAMPLES
            assert after is None or after.start - t.end >= GAP
            middle = x[t.start + 80:t.end - 80]  # past the fades
            assert abs(np.sqrt((middle.astype(np.float64) ** 2).mean()) / TONE_RMS - 1) < 0.05, clip.timbre
            assert abs(x[t.start]) < 0.02 and abs(x[t.end - 1]) < 0.02  # faded in and out: no clicks
        silent = np.ones(WINDOW_SAMPLES, bool)
        for t in clip.tones:
            silent[t.start:t.end] = False
        assert not x[silent].any()
        found = segments(x)
        assert len(found) == clip.n_tones
        assert all(abs(a - t.start) <= 120 and abs(b - t.end) <= 120 for (a, b), t in zip(found, clip.tones))
    for n, first in starts.items():  # where the first tone starts does not give away how many follow
        assert min(first) < 0.05 * SAMPLE_RATE and max(first) > 0.2 * SAMPLE_RATE, (n, min(first), max(first))


def test_samples_answer_the_questions():
    checked = collections.Counter()
    for clip in _clips(150, seed=4, split="test"):  # with noise where the clip draws it
        families = {r["task"] for r in clip.records}
        assert ("melody" in families) == (clip.tones[0].pitch != clip.tones[-1].pitch)
        for record in clip.records:
            question, answer = (turn["value"] for turn in record["conversations"])
            assert answer_from_samples(question.removeprefix("<audio>\n"), clip.samples) == answer == record["answer"]
            checked[record["task"]] += 1
    assert set(checked) == set(AUDIO_FAMILIES) and min(checked.values()) > 60


def test_one_conversation_asks_every_question_and_the_samples_agree():
    checked = 0
    for clip in _clips(60, seed=5, split="test", questions="all"):
        (record,) = clip.records
        turns = record["conversations"]
        assert record["task"] == "multi_turn" and len(record["turn_tasks"]) == len(turns) // 2
        assert turns[0]["value"].startswith("<audio>\n") and all("<audio>" not in t["value"] for t in turns[1:])
        tasks = collections.Counter(record["turn_tasks"])
        assert tasks["pitch"] == clip.n_tones and tasks["count"] == tasks["timbre"] == 1
        assert tasks["melody"] == (clip.tones[0].pitch != clip.tones[-1].pitch)
        for question, answer in zip(turns[::2], turns[1::2]):
            assert answer_from_samples(question["value"].removeprefix("<audio>\n"), clip.samples) == answer["value"]
            checked += 1
    assert checked > 250


# --- balance --------------------------------------------------------------------------------------


def test_answers_are_balanced():
    clips = _clips(600, seed=6, split="test")
    answers = collections.defaultdict(collections.Counter)
    questions = collections.defaultdict(set)
    for c in clips:
        for r in c.records:
            answers[r["task"]][r["answer"]] += 1
            questions[r["task"]].add(re.sub(r"first|second|third|fourth|fifth", "K", r["conversations"][0]["value"]))
    expected = {"count": list("12345"), "pitch": list(PITCHES), "melody": ["up", "down"], "timbre": list(TIMBRES)}
    for family, options in expected.items():
        counts, total = answers[family], sum(answers[family].values())
        assert sorted(counts) == sorted(options), (family, counts)
        assert all(abs(counts[o] / total - 1 / len(options)) < 0.06 for o in options), (family, counts)
        assert len(questions[family]) == 2  # both phrasings
    assert sum(answers["count"].values()) == sum(answers["timbre"].values()) == len(clips)
    assert 0.45 < sum(answers["melody"].values()) / len(clips) < 0.62  # 4/5 * 2/3 of the clips
    assert {r["id"] for c in clips for r in c.records} == {f"test-{i:06d}-{r['task']}"
                                                          for i, c in enumerate(clips) for r in c.records}


def test_chance_levels():
    assert CHANCE == {"count": 1 / 5, "pitch": 1 / 3, "melody": 1 / 2, "timbre": 1 / 3, "tones_vs_shapes": 1 / 2,
                      "needle": 1 / 3}
    assert set(AUDIO_FAMILIES + CROSS_FAMILIES) < set(CHANCE)
    with pytest.raises(ValueError, match="unknown audio question family"):
        chance("colour")


# --- the haystack ---------------------------------------------------------------------------------


HEAD = SAMPLE_RATE // 10  # a bell's first 0.1 s, and less than any tone


def partials(x: np.ndarray) -> tuple[float, float, float]:
    """(f, m(2.76 f) / m(f), m(5.40 f) / m(f)) of a sound's first 0.1 s, f its strongest frequency and
    m the spectrum's largest magnitude within 1% of a frequency. A bell's partials decay alike, so
    its ratios are its amplitudes' (0.5, 0.25); a tone's harmonics (sine: none; square: odd; saw:
    all) lie at least 0.24 f from 2.76 f, so its first ratio is leakage and noise (~0.01)."""
    freqs, mags = spectrum(x[:HEAD])
    f = freqs[np.argmax(mags)]
    near = [mags[np.abs(freqs - r * f) < 0.01 * r * f].max() for r in (1, 2.76, 5.40)]
    return float(f), near[1] / near[0], near[2] / near[0]


def sounds(window: np.ndarray) -> list[tuple[int, float, float]]:
    """(start, f, m(2.76 f) / m(f)) of each sound in a window, from the samples alone. A bell's
    decaying tail can dip under the segment threshold and rise over it again (its partials beat):
    a segment starting within BELL_SECONDS of a bell's start (ratio over 0.3) is that tail."""
    found, bell_until = [], -1
    for a, _ in segments(window):
        if a < bell_until:
            continue
        f, ratio, _ = partials(window[a:])
        found.append((int(a), f, ratio))
        if ratio > 0.3:
            bell_until = a + round(BELL_SECONDS * SAMPLE_RATE)
    return found


def test_the_oracle_tells_a_bell_from_every_tone():
    """No timbre at any pitch looks like a bell to `partials`, so its silence about the tones is evidence."""
    seen = collections.defaultdict(list)
    for clip in _clips(60, seed=8, noise=0.0):
        for t in clip.tones:
            f, ratio, _ = partials(clip.samples[t.start:t.end].astype(np.float64))
            assert abs(f / t.frequency - 1) < 0.01
            seen[clip.timbre, t.pitch].append(ratio)
    assert len(seen) == len(TIMBRES) * len(PITCHES) and max(map(max, seen.values())) < 0.02, seen


@pytest.mark.parametrize("n_windows, depth", [(8, 0.0), (8, 0.5), (8, 1.0), (5, None), (1, None), (16, 0.3)])
def test_haystack_holds_one_bell_in_the_needle_window(n_windows, depth):
    for index in range(3):
        needle = make_audio_needle(index, 0, "test", n_windows, depth)
        x = needle.samples.astype(np.float64)
        assert needle.samples.shape == (n_windows * WINDOW_SAMPLES,) and needle.samples.dtype == np.float32
        at = needle.needle_window
        assert depth is None or at == round(depth * (n_windows - 1))
        assert at == {0.0: 0, 1.0: n_windows - 1}.get(depth, at)  # depth 0 and 1: the first and last window
        record = needle.record
        assert record["task"] == "needle" and record["n_windows"] == n_windows and record["needle_window"] == at
        assert record["depth"] == at / max(1, n_windows - 1)
        assert needle.question in NEEDLE_TEMPLATES and needle.answer in PITCHES
        assert [t["value"] for t in record["conversations"]] == ["<audio>\n" + needle.question, needle.answer]
        assert record["answer"] == needle.answer
        # the bell, where the clip says it is: its pitch the answer, inharmonic, decaying, as loud as a tone
        start, length = needle.start, needle.length
        assert length == round(BELL_SECONDS * SAMPLE_RATE)
        assert at * WINDOW_SAMPLES <= start and start + length <= (at + 1) * WINDOW_SAMPLES
        bell = x[start:start + length]
        f, second, third = partials(bell)
        assert abs(f / PITCHES[needle.answer] - 1) < 0.01, (f, needle.answer)
        assert 0.4 < second < 0.6 and 0.15 < third < 0.35, (second, third)
        rms = [np.sqrt((bell[k * HEAD:(k + 1) * HEAD] ** 2).mean()) for k in range(3)]
        assert abs(rms[0] / TONE_RMS - 1) < 0.03, rms  # noise (RMS < 0.03) adds little
        assert 0.35 < rms[1] / rms[0] < 0.55 and rms[2] / rms[0] < 0.3, rms  # exp(-t / 0.12 s): 0.43, 0.19
        assert abs(bell[0]) < 0.07 and abs(bell[-1]) < 0.07  # faded in and out (noise peaks at 0.05)
        # from the samples alone: one bell in the whole clip, there; every other sound a tone
        for w in range(n_windows):
            found = sounds(x[w * WINDOW_SAMPLES:(w + 1) * WINDOW_SAMPLES])
            bells = [(a, f) for a, f, ratio in found if ratio > 0.3]
            tones = [(a, f, ratio) for a, f, ratio in found if ratio <= 0.3]
            assert all(ratio < 0.05 for _, _, ratio in tones), (w, tones)
            assert all(min(abs(f / p - 1) for p in PITCHES.values()) < 0.01 for _, f, _ in tones), (w, tones)
            if w != at:
                assert bells == [] and 1 <= len(tones) <= 5, (w, found)
                continue
            ((a, f),) = bells
            assert abs(w * WINDOW_SAMPLES + a - start) <= 120 and abs(f / PITCHES[needle.answer] - 1) < 0.01
            assert 1 <= len(tones) <= NEEDLE_TONES, found


def test_haystack_answers_and_places_are_balanced():
    needles = [make_audio_needle(i, 1, "train", 4) for i in range(300)]
    answers = collections.Counter(n.answer for n in needles)
    assert sorted(answers) == sorted(PITCHES) and all(abs(c / 300 - 1 / 3) < 0.08 for c in answers.values()), answers
    assert {n.question for n in needles} == set(NEEDLE_TEMPLATES)
    places = collections.Counter(n.needle_window for n in needles)
    assert sorted(places) == [0, 1, 2, 3] and min(places.values()) > 50
    within = [n.start - n.needle_window * WINDOW_SAMPLES for n in needles]  # anywhere in its window
    assert min(within) < 0.1 * SAMPLE_RATE and max(within) > 1.2 * SAMPLE_RATE
    for window in range(4):  # the answer tells nothing of the place
        here = collections.Counter(n.answer for n in needles if n.needle_window == window)
        assert sorted(here) == sorted(PITCHES) and min(here.values()) > 10, (window, here)


# --- across modalities ----------------------------------------------------------------------------


def shapes_in(image) -> int:
    """Objects in a ShapeWorld image: the 3x3 cells with any pixel off the background."""
    pixels = np.asarray(image)
    off = (pixels != pixels[0, 0]).any(-1)
    edges = [round(i * pixels.shape[0] / 3) for i in range(4)]
    return sum(off[edges[r]:edges[r + 1], edges[c]:edges[c + 1]].any() for r in range(3) for c in range(3))


def test_cross_modal_answers_match_the_image_and_the_clip():
    yes = collections.defaultdict(list)  # tone count -> whether the answer was yes
    by_shapes = collections.defaultdict(list)
    for index in range(300):
        example = make_cross_example(index, 0, "test")
        (record,) = example.clip.records
        n_shapes, n_tones = shapes_in(example.image), len(segments(example.clip.samples))
        assert n_shapes == len(example.scene) and n_tones == example.clip.n_tones <= 4
        assert record["answer"] == record["conversations"][1]["value"] == ("yes" if n_shapes == n_tones else "no")
        assert record["conversations"][0]["value"].startswith("<image>\n<audio>\n")
        assert record["task"] == "tones_vs_shapes"
        yes[n_tones].append(record["answer"] == "yes")
        by_shapes[n_shapes].append(record["answer"] == "yes")
    assert 0.4 < np.mean(sum(yes.values(), [])) < 0.6
    for counts in (yes, by_shapes):  # neither the clip alone nor the image alone tells the answer
        assert sorted(counts) == [1, 2, 3, 4] and all(0.3 < np.mean(v) < 0.7 for v in counts.values()), counts


# --- files ----------------------------------------------------------------------------------------


def test_wav_files_round_trip(tmp_path):
    pytest.importorskip("soundfile", reason="writing WAV files needs soundfile (the [media] extra)")
    from PIL import Image

    from omnilm.data.audio import load_audio

    path = write_shapeworld_audio(tmp_path, 4, seed=7, split="test", cross=2)
    records = json.loads(path.read_text())
    assert path == tmp_path / "test.json"
    clips = [make_audio_example(i, 7, "test") for i in range(4)]
    crosses = [make_cross_example(i, 7, "test") for i in range(2)]
    assert records == [r for c in clips for r in c.records] + [r for x in crosses for r in x.clip.records]
    for clip, record in [(c, c.records[0]) for c in clips] + [(x.clip, x.clip.records[0]) for x in crosses]:
        samples = load_audio(tmp_path / record["audio"])
        assert samples.shape == (2 * SAMPLE_RATE,) and np.abs(samples - clip.samples).max() <= 1 / 32768
    for example in crosses:
        drawn = Image.open(tmp_path / example.clip.records[0]["image"])
        assert np.array_equal(np.asarray(drawn), np.asarray(example.image))
    needles = write_audio_clips(tmp_path, 2, seed=7, split="test", needles=True, n_windows=2)
    for index, record in enumerate(needles):
        needle = make_audio_needle(index, 7, "test", 2)
        assert record == needle.record
        samples = load_audio(tmp_path / record["audio"])
        assert samples.shape == (4 * SAMPLE_RATE,) and np.abs(samples - needle.samples).max() <= 1 / 32768
    assert write_audio_clips(tmp_path, 0, seed=7, split="test") == []


@pytest.mark.parametrize("kwargs, message", [
    ({"n": -1}, r"n is -1: ask for zero or more clips"),
    ({"split": "a/b"}, r"split 'a/b' is not a plain name"),
    ({"split": "Test"}, r"split 'Test' is not a plain name"),
    ({"questions": "x"}, r"questions='x': use 'one' .* or 'all'"),
    ({"n_windows": 0}, r"n_windows is 0: a haystack clip has 1 to 64 windows"),
    ({"n_windows": MAX_NEEDLE_WINDOWS + 1}, r"n_windows is 65: a haystack clip has 1 to 64 windows"),
    ({"cross": -2}, r"cross is -2: ask for zero or more"),
])
def test_bad_arguments_are_refused_in_one_line(tmp_path, kwargs, message):
    args = {"n": 2, "seed": 0, "split": "test"} | kwargs
    with pytest.raises(OmniInputError, match=message) as caught:
        write_shapeworld_audio(tmp_path, **args)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "test.json").exists()


@pytest.mark.parametrize("call, message", [
    (lambda: make_audio_example(0, 0, "a/b"), r"split 'a/b' is not a plain name"),
    (lambda: make_audio_example(0, 0, "test", questions="x"), r"questions='x'"),
    (lambda: make_audio_example(0, 0, "test", noise=-0.1), r"noise is -0.1: give the white noise's peak"),
    (lambda: make_audio_example(0, 0, "test", noise=1.0), r"noise is 1.0: give the white noise's peak"),
    (lambda: make_audio_needle(0, 0, "test", 0), r"n_windows is 0"),
    (lambda: make_audio_needle(0, 0, "test", 8, depth=1.5), r"depth is 1.5: give a place in the clip"),
    (lambda: make_audio_needle(0, 0, "test", 8, depth=-0.1), r"depth is -0.1: give a place in the clip"),
    (lambda: make_audio_needle(0, 0, "test", 8, depth="0.5"), r"depth is '0.5': give a place in the clip"),
    (lambda: make_audio_needle(0, 0, "test", MAX_NEEDLE_WINDOWS + 1), r"n_windows is 65"),
    (lambda: make_audio_needle(0, 0, "test", True), r"n_windows is True"),
    (lambda: make_audio_needle(0, 0, "Test"), r"split 'Test' is not a plain name"),
    (lambda: make_cross_example(0, 0, "../x"), r"split '../x' is not a plain name"),
])
def test_the_library_refuses_bad_arguments_in_one_line(call, message):
    with pytest.raises(OmniInputError, match=message) as caught:
        call()
    assert "\n" not in str(caught.value)
