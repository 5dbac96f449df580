"""ShapeWorld video: determinism, the clip model, answers checked against the pixels, balance,
and files.

The pixel oracle finds each object in every frame by its exact drawn colour (tints differ between
the objects of a clip) and answers each question by parsing its text against what it found; so
the tests assert that the frames show what the records say, not only that the records agree with
the tracks they were made from.
"""

import collections
import json
import re

import numpy as np
import pytest

from omnilm.data.shapeworld.scenes import COLOUR_RGB, COLOURS, SHAPES
from omnilm.data.shapeworld.video import (CHANCE, FPS, LATTICE, MOTIONS, VIDEO_FAMILIES, VideoClip, chance,
                                          make_video_example, write_shapeworld_video)
from omnilm.errors import OmniInputError


def _clips(n, seed=0, split="train", **kwargs) -> list[VideoClip]:
    return [make_video_example(i, seed, split, **kwargs) for i in range(n)]


# --- the pixel oracle ---------------------------------------------------------------------------


def observe(clip: VideoClip) -> dict:
    """Per object (by "colour shape"): the frames it shows in and its pixel centroid (x, y) in
    each, from the pixels of its exact colour alone."""
    seen = {}
    for t in clip.objects:
        mask = (clip.frames == np.array(t.rgb, np.uint8)).all(-1)  # (T, H, W)
        frames = [k for k in range(clip.n_frames) if mask[k].sum() >= 0.1 * t.size ** 2]
        centroids = {k: (np.nonzero(mask[k])[1].mean(), np.nonzero(mask[k])[0].mean()) for k in frames}
        seen[t.ref] = (frames, centroids, t.shape)
    return seen


_REF = rf"(?:{'|'.join(COLOURS)}) (?:{'|'.join(SHAPES)})"


def answer_from_pixels(question: str, clip: VideoClip) -> str:
    """Answer a video question by parsing it against what `observe` reads from the frames."""
    seen = observe(clip)
    last = clip.n_frames - 1
    if m := re.fullmatch(rf"(?:Does|Is) the ({_REF}) (?:move|moving) (\w+) or (\w+)\?", question):
        frames, centroids, _ = seen[m[1]]
        axis = 0 if {m[2], m[3]} == {"left", "right"} else 1
        delta = centroids[frames[-1]][axis] - centroids[frames[0]][axis]
        assert abs(delta) > 5, f"{m[1]} is seen to move only {delta:.1f} px"
        return ("right" if delta > 0 else "left") if axis == 0 else ("down" if delta > 0 else "up")
    if re.fullmatch(r"Which shape (appears|disappears)(?: during the video)?\?", question):
        appears = "disappears" not in question
        return next(shape for frames, _, shape in seen.values()
                    if (frames[0] > 0 if appears else frames[-1] < last))
    if re.fullmatch(r"How many shapes are (?:in the first frame|there at the start of the video)\?", question):
        return str(sum(frames[0] == 0 for frames, _, _ in seen.values()))
    if re.fullmatch(r"How many shapes are (?:in the last frame|there at the end of the video)\?", question):
        return str(sum(frames[-1] == last for frames, _, _ in seen.values()))
    if question in ("How many shapes are there in the whole video?", "How many different shapes does the video show?"):
        return str(sum(bool(frames) for frames, _, _ in seen.values()))
    if m := re.fullmatch(rf"Which (?:comes|happens) first, the ({_REF}) (appearing|disappearing) or the ({_REF}) "
                         r"(appearing|disappearing)\?", question):
        times = {}
        for ref, event in ((m[1], m[2]), (m[3], m[4])):
            frames, _, shape = seen[ref]
            times[shape] = frames[0] if event == "appearing" else frames[-1] + 1
        assert len(set(times.values())) == 2, f"the two events are simultaneous: {times}"
        return min(times, key=times.get)
    if m := re.fullmatch(rf"At which second does the ({_REF}) appear\?", question):
        return str(int(seen[m[1]][0][0] / FPS))
    if m := re.fullmatch(rf"At which second is the ({_REF}) last seen\?", question):
        return str(int(seen[m[1]][0][-1] / FPS))
    raise AssertionError(f"the oracle cannot parse {question!r}")


# --- determinism --------------------------------------------------------------------------------


def test_same_index_same_bytes_and_splits_differ():
    for index in range(5):
        a, b = make_video_example(index, 3, "test"), make_video_example(index, 3, "test")
        assert a.frames.tobytes() == b.frames.tobytes() and a.records == b.records and a.objects == b.objects
        other = make_video_example(index, 3, "train")
        assert other.frames.tobytes() != a.frames.tobytes()
        assert make_video_example(index, 4, "test").frames.tobytes() != a.frames.tobytes()
    assert [c.records for c in _clips(20, split="test")] != [c.records for c in _clips(20, split="train")]


def test_text_does_not_depend_on_frame_size():
    for index in range(20):
        small, large = make_video_example(index, 0, "test", 64), make_video_example(index, 0, "test", 200)
        assert small.records == large.records
        assert small.frames.shape[1:] == (64, 64, 3) and large.frames.shape[1:] == (200, 200, 3)


# --- the clip model -----------------------------------------------------------------------------


@pytest.mark.parametrize("frame_size, n_frames", [(96, None), (64, 4), (128, 13), (256, 32)])
def test_clip_model(frame_size, n_frames):
    cell = frame_size // LATTICE
    origin = (frame_size - LATTICE * cell) // 2
    for clip in _clips(150, seed=1, frame_size=frame_size, n_frames=n_frames):
        T = clip.n_frames
        assert clip.frames.dtype == np.uint8 and clip.frames.shape == (T, frame_size, frame_size, 3)
        assert (T == n_frames) if n_frames else 4 <= T <= 8
        assert clip.fps == 1.0 and 1 <= len(clip.objects) <= 3
        assert len({t.shape for t in clip.objects}) == len(clip.objects)  # "the circle" is one object
        assert any(t.first_frame == 0 for t in clip.objects)
        appearing = [t for t in clip.objects if t.first_frame > 0]
        disappearing = [t for t in clip.objects if t.last_frame < T - 1]
        assert len(appearing) <= 1 and len(disappearing) <= 1
        for t in appearing:
            assert t.last_frame == T - 1
        for t in disappearing:
            assert t.first_frame == 0 and 0 <= t.last_frame <= T - 2
        if appearing and disappearing:
            assert appearing[0].first_frame != disappearing[0].last_frame + 1
        for t in clip.objects:
            assert t.motion in MOTIONS and len(t.positions) == T
            assert t.size % 2 == 1 and cell - 3 <= t.size <= cell - 2  # a box inside its cell, odd
            cells = [tuple((c - origin) // cell for c in p) for p in t.positions]
            assert all(p == tuple(origin + cell * c + (cell - t.size) // 2 for c in cp)  # centred in a cell
                       for p, cp in zip(t.positions, cells))
            assert all(0 <= c < LATTICE for cp in cells for c in cp)
            if t.motion == "still":
                assert len(set(cells)) == 1
            else:  # one step of one cell, the way the motion says, between two frames
                steps = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(cells, cells[1:]) if a != b]
                assert steps == [{"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[t.motion]]
        for k in range(T):  # objects seen together never share a cell
            shown = [t.positions[k] for t in clip.objects if t.visible(k)]
            assert len(shown) == len(set(shown))


# --- ground truth in the pixels -------------------------------------------------------------------


def test_pixels_show_the_tracks_and_answer_the_questions():
    checked = 0
    for clip in _clips(200, seed=2, split="test"):
        rgbs = [t.rgb for t in clip.objects]
        if len(set(rgbs)) < len(rgbs):  # two objects drawn in the very same tint: the oracle cannot tell
            continue
        background = clip.frames[0, 0, 0]
        for t in clip.objects:
            palette = np.array([COLOUR_RGB[c] for c in COLOURS])
            assert COLOURS[int(np.argmin(((palette - t.rgb) ** 2).sum(1)))] == t.colour
        seen = observe(clip)
        for t in clip.objects:
            assert seen[t.ref][0] == [k for k in range(clip.n_frames) if t.visible(k)], t
            for k in seen[t.ref][0]:
                x, y = t.centre(k)
                assert tuple(clip.frames[k, y, x]) == t.rgb  # no other object covers a shape's centre
        for k, frame in enumerate(clip.frames):  # nothing drawn outside the visible objects' boxes
            inside = np.zeros(frame.shape[:2], bool)
            for t in clip.objects:
                if t.visible(k):
                    x, y = t.positions[k]
                    inside[y:y + t.size, x:x + t.size] = True
            assert not (frame != background).any(-1)[~inside].any()
        for record in clip.records:
            question = record["conversations"][0]["value"].removeprefix("<video>\n")
            assert answer_from_pixels(question, clip) == record["conversations"][1]["value"], record
            checked += 1
    assert checked > 500


def test_one_conversation_asks_every_question_and_the_pixels_agree():
    """questions="all": one multi-turn record per clip, every mover's direction, every count and
    event, each answer what the frames show; the first turn holds the marker."""
    checked = 0
    for index in range(80):
        every = make_video_example(index, 4, "test", questions="all")
        (record,) = every.records
        turns = record["conversations"]
        assert record["task"] == "multi_turn" and len(record["turn_tasks"]) == len(turns) // 2
        assert turns[0]["value"].startswith("<video>\n") and all("<video>" not in t["value"] for t in turns[1:])
        movers = [t for t in every.objects if t.motion != "still" and t.first_frame == 0
                  and t.last_frame == every.n_frames - 1]
        assert record["turn_tasks"].count("direction") == len(movers) and record["turn_tasks"].count("count") == 3
        assert set(record["turn_tasks"]) <= set(VIDEO_FAMILIES)
        rgbs = [t.rgb for t in every.objects]
        if len(set(rgbs)) < len(rgbs):
            continue
        for question, answer in zip(turns[::2], turns[1::2]):
            assert answer_from_pixels(question["value"].removeprefix("<video>\n"), every) == answer["value"]
            checked += 1
    assert checked > 400


def test_haystack_clips_show_the_cross_once(tmp_path):
    from omnilm.data.shapeworld.video import make_video_needle

    for index, (n, depth) in enumerate([(32, 0.0), (32, 0.5), (32, 1.0), (8, None), (1, None)]):
        clip = make_video_needle(index, 0, "test", n_frames=n, depth=depth)
        (record,) = clip.records
        (cross,) = clip.objects
        at = record["needle_frame"]
        assert clip.frames.shape == (n, 96, 96, 3) and record["conversations"][1]["value"] == cross.colour
        assert depth is None or at == round(depth * (n - 1))
        rgb = np.array(COLOUR_RGB[cross.colour], np.uint8)
        assert (cross.shape, cross.first_frame, cross.last_frame) == ("cross", at, at)
        x, y = cross.centre(at)
        assert (clip.frames[at, y, x] == rgb).all()  # a cross covers its centre
        # A cross's corners are background: the box's corner pixels differ from its centre's colour.
        assert not (clip.frames[at, cross.positions[at][1], cross.positions[at][0]] == rgb).all()
    with pytest.raises(OmniInputError, match="1 to 256 frames"):
        make_video_needle(0, 0, "test", n_frames=300)
    for bad in (0, 300):  # the writer takes a haystack clip's own range, not a question clip's 4 to 32
        with pytest.raises(OmniInputError, match="1 to 256 frames"):
            write_shapeworld_video(tmp_path, 1, 0, "needle", needles=True, n_frames=bad, frames_as="png")
    one = json.loads(write_shapeworld_video(tmp_path, 2, 0, "needle", needles=True, n_frames=1,
                                            frames_as="png").read_text())
    assert [r["n_frames"] for r in one] == [1, 1] and len(list((tmp_path / "videos" / "needle_000000").iterdir())) == 1


# --- no single frame gives away the direction -----------------------------------------------------


def test_only_the_order_of_the_frames_tells_the_direction():
    """Shuffled frames show a mover's two cells but not the way it steps: the lower cell and the
    number of frames spent in it are distributed alike for left and right movers (up and down).
    Frame 0 shows where the walk starts, which differs by one cell of the five a path can start in."""
    paths = collections.defaultdict(list)  # motion -> (lower end, frames at the lower end), along its axis
    start = collections.defaultdict(list)  # motion -> the position along its axis in frame 0
    across = collections.defaultdict(list)
    for clip in _clips(1500, seed=5):
        for t in clip.objects:
            if t.motion != "still":
                axis = 0 if t.motion in ("left", "right") else 1
                along = [p[axis] for p in t.positions]
                paths[t.motion].append((min(along), along.count(min(along)) / len(along)))
                start[t.motion].append(along[0])
                across[t.motion].extend(p[1 - axis] for p in t.positions)
    assert sum(map(len, paths.values())) > 2000
    for a, b in (("left", "right"), ("up", "down")):
        assert min(len(paths[a]), len(paths[b])) > 400
        for i, tolerance in ((0, 2.0), (1, 0.03)):
            ends_a, ends_b = [p[i] for p in paths[a]], [p[i] for p in paths[b]]
            assert abs(np.mean(ends_a) - np.mean(ends_b)) < tolerance
            assert abs(np.std(ends_a) - np.std(ends_b)) < tolerance
            assert min(ends_a) == min(ends_b) and max(ends_a) == max(ends_b)
        # Frame 0: a right (down) mover starts at its path's lower end, a left (up) one at the upper.
        gap = abs(np.mean(start[a]) - np.mean(start[b]))
        assert 16 - 3 <= gap <= 16 + 3 and gap < 0.3 * (max(start[a]) - min(start[a]))
        for motion in (a, b):  # the other coordinate spans the frame
            assert min(across[motion]) <= 2 and max(across[motion]) >= 96 - 16


# --- balance ------------------------------------------------------------------------------------


def test_family_balance():
    clips = _clips(500, seed=6, split="test")
    tasks = collections.Counter(r["task"] for c in clips for r in c.records)
    assert set(tasks) == set(VIDEO_FAMILIES)
    answers = {f: collections.Counter(r["conversations"][1]["value"] for c in clips for r in c.records
                                      if r["task"] == f) for f in VIDEO_FAMILIES}
    direction = answers["direction"]
    assert set(direction) == {"left", "right", "up", "down"}
    assert all(0.2 <= n / tasks["direction"] <= 0.3 for n in direction.values()), direction
    assert 0.35 <= tasks["appear"] / len(clips) <= 0.65 and 0.35 <= tasks["disappear"] / len(clips) <= 0.65
    assert tasks["order"] / len(clips) >= 0.15 and tasks["direction"] / len(clips) >= 0.6
    assert set(answers["appear"]) == set(answers["disappear"]) == set(SHAPES)
    # Neither the wording nor the event order carries the answer: each option is named first half
    # the time, and the answer is the first-named one half the time.
    named = [(re.search(r"(?:move|moving) (\w+) or (\w+)", r["conversations"][0]["value"]).groups(),
              r["conversations"][1]["value"]) for c in clips for r in c.records if r["task"] == "direction"]
    for option in ("left", "up"):
        on_axis = [options for options, _ in named if option in options]
        assert 0.4 <= sum(options[0] == option for options in on_axis) / len(on_axis) <= 0.6
    assert 0.4 <= sum(options[0] == answer for options, answer in named) / len(named) <= 0.6
    appear_first = [c for c in clips for r in c.records if r["task"] == "order"
                    and any(t.shape == r["conversations"][1]["value"] and t.first_frame > 0 for t in c.objects)]
    assert 0.35 <= len(appear_first) / tasks["order"] <= 0.65
    assert {r["id"] for c in clips for r in c.records} == {f"test-{i:06d}-{r['task']}"
                                                          for i, c in enumerate(clips) for r in c.records}


def test_chance_levels():
    assert CHANCE["direction"] == CHANCE["order"] == 0.5 and CHANCE["appear"] == 1 / len(SHAPES)
    assert chance("when", 6) == 1 / 5 and chance("count") == 1 / 4
    with pytest.raises(ValueError, match="unknown video question family"):
        chance("colour")


# --- files --------------------------------------------------------------------------------------


def _check_written(path, out, n, frames_as):
    from omnilm.data.video import read_video

    records = json.loads(path.read_text())
    assert path == out / "test.json" and len({r["id"] for r in records}) == len(records)
    assert {int(r["id"].split("-")[1]) for r in records} == set(range(n))
    for r in records:
        human = r["conversations"][0]["value"]
        assert human.startswith("<video>\n") and sum(t["value"].count("<video>") for t in r["conversations"]) == 1
        assert r["video"].startswith("videos/") and (out / r["video"]).exists()
        assert r["video"].endswith(".mp4") == (frames_as == "mp4")
    for index in (0, n - 1):
        clip = make_video_example(index, 7, "test", 64, frames_as=frames_as)
        record = next(r for r in records if r["id"].startswith(f"test-{index:06d}-"))
        video = read_video(out / record["video"])
        assert video.frames.dtype == np.uint8 and video.frames.tobytes() == clip.frames.tobytes()
        assert len(video.frames) == record["n_frames"] == clip.n_frames
        assert [r for r in records if r["id"].startswith(f"test-{index:06d}-")] == clip.records
        if frames_as == "mp4":
            assert video.fps == FPS


def test_write_mp4(tmp_path):
    pytest.importorskip("av")
    path = write_shapeworld_video(tmp_path, 5, seed=7, split="test", frame_size=64)
    _check_written(path, tmp_path, 5, "mp4")
    assert not list((tmp_path / "videos").glob(".*tmp*"))


def test_write_png_folders(tmp_path):
    path = write_shapeworld_video(tmp_path, 5, seed=7, split="test", frame_size=64, frames_as="png")
    _check_written(path, tmp_path, 5, "png")
    folder = tmp_path / "videos" / "test_000000"
    assert sorted(p.name for p in folder.iterdir())[:2] == ["000.png", "001.png"]
    # Written again with shorter clips, a folder holds only the new frames.
    write_shapeworld_video(tmp_path, 1, seed=7, split="test", frame_size=64, frames_as="png", n_frames=32)
    write_shapeworld_video(tmp_path, 1, seed=7, split="test", frame_size=64, frames_as="png", n_frames=4)
    assert sorted(p.name for p in folder.iterdir()) == ["000.png", "001.png", "002.png", "003.png"]
    assert json.loads(write_shapeworld_video(tmp_path, 0, seed=7, split="test", frames_as="png").read_text()) == []


@pytest.mark.parametrize("kwargs, message", [
    ({"n": -1}, r"n is -1: ask for zero or more clips"),
    ({"frame_size": 32}, r"frame_size is 32: use 64 to 256 pixels"),
    ({"frame_size": 512}, r"frame_size is 512: use 64 to 256 pixels"),
    ({"frames_as": "gif"}, r"frames_as='gif': use 'mp4' .* or 'png'"),
    ({"n_frames": 3}, r"n_frames is 3: use 4 to 32 frames"),
    ({"n_frames": 33}, r"n_frames is 33: use 4 to 32 frames"),
    ({"split": "../x"}, r"split '../x' is not a plain name"),
    ({"split": "Test"}, r"split 'Test' is not a plain name"),
])
def test_bad_arguments_are_refused_in_one_line(tmp_path, kwargs, message):
    args = {"n": 2, "seed": 0, "split": "test"} | kwargs
    with pytest.raises(OmniInputError, match=message) as caught:
        write_shapeworld_video(tmp_path, **args)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "test.json").exists()
    if "n" not in kwargs:  # the library refuses what the writer refuses
        example = {k: v for k, v in args.items() if k != "n"}
        with pytest.raises(OmniInputError, match=message):
            make_video_example(0, **example)
