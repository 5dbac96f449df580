"""ShapeWorld in time: short clips of coloured shapes moving, appearing and disappearing, with
questions whose short answers are exact.

    clip = make_video_example(index, seed, split)     # frames (T, H, W, 3), tracks, LLaVA records
    path = write_shapeworld_video(out_dir, n, seed, split)

The world. A clip is T frames (4 to 8, uniform, unless `n_frames` fixes it) at FPS = 1, so frame
k is second k. It holds 1 to 3 objects on a plain light background, each a different shape (so
"the red circle" and "the circle" name one object) in one of the image world's colours, drawn
with `scenes`' shapes centred in the cells of a LATTICE x LATTICE grid (16 px cells at 96 px, the
tiny ViT's patches: an object is whole in one patch, as the image world keeps its objects in
their cells; a linear probe on a frozen random tower's tokens then reads the shape exactly, where
shapes straddling patches are read at about 40%). Two objects never share a cell in a frame.
Each object is still or moves left, right, up or down: one step of one cell, between frames
j - 1 and j, j uniform over 1..T-1. An object is present throughout, or appears at frame a >= 1,
or disappears after frame d <= T-2 (gone from d+1 on); a clip has at most one of each, and
something in frame 0.

Only the ORDER of the frames tells where a mover goes. The lower of its two cells is uniform
over the five where both fit, and the step's frame uniform, whatever the direction, so a left
mover's frames, shuffled, are distributed exactly as a right mover's. Its first frame says
little: only a start in an edge cell hints at the way it goes (a perfect guesser from frame 0
alone scores 60% on direction, against 50% by chance).

The families (VIDEO_FAMILIES), each asked once per clip where the clip allows it, one record
each; `chance` is a uniform guess among the answers the question allows:

    direction  "Does the red circle move left or right?" -> left | right (up | down)   1/2
    appear     "Which shape appears?" -> a shape                                       1/5
    disappear  "Which shape disappears?" -> a shape                                    1/5
    count      "How many shapes are in the first frame?" -> a digit, 0 to 3            1/4
    order      "Which comes first, the red circle appearing or the blue square
               disappearing?" -> the shape of the earlier event                        1/2
    when       "At which second does the red circle appear?" -> a number, 1 to T-1     1/(T-1)

Determinism: clip `index` of `split` under `seed` draws from one generator, `video_rng`, in a
fixed order: the clip's contents, its questions, then its layout and pixels; so the text does not
depend on `frame_size`.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from omnilm.data.llava_json import write_records
from omnilm.data.shapeworld.scenes import COLOUR_RGB, COLOURS, SHAPES, _draw_shape
from omnilm.data.video import write_video
from omnilm.errors import OmniInputError

VIDEO_FAMILIES = ("direction", "appear", "disappear", "count", "order", "when")
MOTIONS = ("left", "right", "up", "down", "still")
AXIS_OPTIONS = {"left": ("left", "right"), "right": ("left", "right"), "up": ("up", "down"), "down": ("up", "down")}
_STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}

FPS = 1.0  # frame k is at second k
FRAMES_AS = ("mp4", "png")  # a clip on disk: one lossless video file, or a folder of PNG frames
VIDEO_QUESTIONS = ("one", "all")  # a record per family, or one multi-turn record of every question
FRAME_SIZE = 96
FRAME_SIZES = (64, 256)  # smallest and largest frame side allowed
DEFAULT_FRAMES = (4, 8)  # frames per clip, uniform, when n_frames is not given
FRAME_RANGE = (4, 32)  # what n_frames may be
MAX_VIDEO_OBJECTS = 3
LATTICE = 6  # cells a side: objects sit in cells, as the image world's do (16 px at 96 px)
LAYOUT_TRIES = 1000
P_STILL = 0.2  # each object; the four directions share the rest evenly
P_APPEAR = 0.75  # clips of 2 or more objects (a lone object must be in frame 0): half of all clips
P_DISAPPEAR = 0.5

VIDEO_TEMPLATES = {
    "direction": ("Does the {ref} move {a} or {b}?", "Is the {ref} moving {a} or {b}?"),
    "appear": ("Which shape appears?", "Which shape appears during the video?"),
    "disappear": ("Which shape disappears?", "Which shape disappears during the video?"),
    "count_first": ("How many shapes are in the first frame?", "How many shapes are there at the start of the video?"),
    "count_last": ("How many shapes are in the last frame?", "How many shapes are there at the end of the video?"),
    "count_all": ("How many shapes are there in the whole video?", "How many different shapes does the video show?"),
    "order": ("Which comes first, {a} or {b}?", "Which happens first, {a} or {b}?"),
    "when_appear": ("At which second does the {ref} appear?",),
    "when_last": ("At which second is the {ref} last seen?",),
}


def chance(family: str, n_frames: int | None = None) -> float:
    """Accuracy of a uniform guess among the answers a `family` question allows: what a model
    that ignores the video scores. "when" depends on the clip length (default: 4 to 8, averaged)."""
    fixed = {"direction": 1 / 2, "order": 1 / 2, "appear": 1 / len(SHAPES), "disappear": 1 / len(SHAPES),
             "count": 1 / (MAX_VIDEO_OBJECTS + 1)}
    if family in fixed:
        return fixed[family]
    if family != "when":
        raise ValueError(f"unknown video question family {family!r}: use one of {', '.join(VIDEO_FAMILIES)}")
    lengths = [n_frames] if n_frames is not None else range(DEFAULT_FRAMES[0], DEFAULT_FRAMES[1] + 1)
    return sum(1 / (t - 1) for t in lengths) / len(lengths)


CHANCE = {family: chance(family) for family in VIDEO_FAMILIES}  # at the default clip lengths


@dataclass(frozen=True)
class Track:
    """One object over the clip: what it is, how it moves, the frames it is visible in
    (`first_frame` to `last_frame`, inclusive) and, per frame, the top-left pixel of its
    `size` x `size` box (also for frames it is not visible in)."""

    shape: str
    colour: str
    rgb: tuple  # the colour as drawn: COLOUR_RGB[colour] tinted by at most 8 per channel
    motion: str
    first_frame: int
    last_frame: int
    size: int = 0
    positions: tuple = ()  # ((x, y), ...), one per frame

    @property
    def ref(self) -> str:
        return f"{self.colour} {self.shape}"

    def visible(self, frame: int) -> bool:
        return self.first_frame <= frame <= self.last_frame

    def centre(self, frame: int) -> tuple[int, int]:
        """The shape's centre pixel in `frame`: every shape covers it."""
        x, y = self.positions[frame]
        return x + self.size // 2, y + self.size // 2


@dataclass
class VideoClip:
    """A clip's frames ((T, H, W, 3) uint8 RGB), rate, object tracks (in drawing order: later
    ones over earlier ones) and LLaVA records, one question each."""

    frames: np.ndarray
    fps: float
    objects: tuple[Track, ...]
    records: list = field(default_factory=list)

    @property
    def n_frames(self) -> int:
        return len(self.frames)


def video_rng(split: str, seed: int, index: int) -> random.Random:
    """The one generator behind clip `index` of `split` under `seed`: a stream of its own, apart
    from the image world's (`example_rng`) and multi-image (`multi_rng`) streams."""
    return random.Random(f"shapeworld-video:{split}:{seed}:{index}")


# --- the clip's contents ----------------------------------------------------------------------


def _draw_tracks(rng: random.Random, n_frames: int) -> tuple[Track, ...]:
    """1 to 3 objects of distinct shapes, their motions and lifetimes (no positions yet)."""
    n = rng.randint(1, MAX_VIDEO_OBJECTS)
    shapes = rng.sample(SHAPES, n)
    colours = [rng.choice(COLOURS) for _ in range(n)]
    rgbs = [tuple(min(255, max(0, c + rng.randint(-8, 8))) for c in COLOUR_RGB[colour]) for colour in colours]
    motions = [("still" if rng.random() < P_STILL else rng.choice(MOTIONS[:4])) for _ in range(n)]
    lifetimes = [(0, n_frames - 1)] * n
    appearing = rng.randrange(n) if n >= 2 and rng.random() < P_APPEAR else None
    disappearing = None
    if rng.random() < P_DISAPPEAR:
        disappearing = rng.choice([i for i in range(n) if i != appearing])
    frames = range(1, n_frames)  # an appearance at a, or a disappearance at d + 1 (gone from then on)
    if appearing is not None and disappearing is not None:
        # The two events at different frames (so "order" has an answer), either first equally often.
        appear_first = rng.random() < 0.5
        a, gone = rng.choice([(i, j) for i in frames for j in frames if i != j and (i < j) == appear_first])
    else:
        a, gone = rng.choice(frames), rng.choice(frames)
    if appearing is not None:
        lifetimes[appearing] = (a, n_frames - 1)
    if disappearing is not None:
        lifetimes[disappearing] = (0, gone - 1)
    return tuple(Track(s, c, rgb, m, first, last)
                 for s, c, rgb, m, (first, last) in zip(shapes, colours, rgbs, motions, lifetimes))


def _lattice(frame_size: int) -> tuple[int, int, int]:
    """The lattice objects sit on: (cell side, pixel where cell 0 starts, box side). LATTICE x
    LATTICE cells centred in the frame (16 px at 96 px: the tiny ViT's patches); a shape's box is
    the largest odd side at least 2 px under the cell's, centred in it."""
    cell = frame_size // LATTICE
    box = cell - 2 - (1 - cell % 2)
    return cell, (frame_size - LATTICE * cell) // 2, box


def _pixel(cell_index: int, frame_size: int) -> int:
    """The top-left pixel, along one axis, of the box of a shape in cell `cell_index`."""
    cell, origin, box = _lattice(frame_size)
    return origin + cell * cell_index + (cell - box) // 2


def _place(track: Track, rng: random.Random, frame_size: int, n_frames: int) -> Track:
    """Cells in every frame. A mover steps one cell along its axis between frames j - 1 and j (j
    uniform over 1..T-1); the lower of its two cells is uniform over where both fit, the same for
    left and right movers (and up and down ones): only the way the step goes differs."""
    sx, sy = _STEP[track.motion]
    if track.motion == "still":
        cells = [(rng.randrange(LATTICE), rng.randrange(LATTICE))] * n_frames
    else:
        lower, across, j = rng.randrange(LATTICE - 1), rng.randrange(LATTICE), rng.randint(1, n_frames - 1)
        forward = sx + sy > 0  # right and down step from the lower cell up, left and up down
        along = [lower + (k >= j if forward else k < j) for k in range(n_frames)]
        cells = [(a, across) if sx else (across, a) for a in along]
    positions = tuple((_pixel(cx, frame_size), _pixel(cy, frame_size)) for cx, cy in cells)
    return replace(track, size=_lattice(frame_size)[2], positions=positions)


def _too_close(tracks: tuple[Track, ...], n_frames: int) -> bool:
    """Whether two objects visible in the same frame share a cell."""
    return any(len(shown) != len(set(shown)) for shown in
               ([t.positions[k] for t in tracks if t.visible(k)] for k in range(n_frames)))


def _layout(tracks: tuple[Track, ...], rng: random.Random, frame_size: int, n_frames: int) -> tuple[Track, ...]:
    for _ in range(LAYOUT_TRIES):
        placed = tuple(_place(t, rng, frame_size, n_frames) for t in tracks)
        if not _too_close(placed, n_frames):
            return placed
    raise RuntimeError(f"no layout of {len(tracks)} objects in {LAYOUT_TRIES} tries at {frame_size} px: a bug")


def _render(tracks: tuple[Track, ...], background: tuple, frame_size: int, n_frames: int) -> np.ndarray:
    frames = []
    for k in range(n_frames):
        image = Image.new("RGB", (frame_size, frame_size), background)
        draw = ImageDraw.Draw(image)
        for t in tracks:
            if t.visible(k):
                _draw_shape(draw, t.shape, *t.positions[k], t.size, t.rgb)
        frames.append(np.asarray(image))
    return np.stack(frames)


# --- questions --------------------------------------------------------------------------------


def _appearing(tracks: tuple[Track, ...]) -> Track | None:
    return next((t for t in tracks if t.first_frame > 0), None)


def _disappearing(tracks: tuple[Track, ...], n_frames: int) -> Track | None:
    return next((t for t in tracks if t.last_frame < n_frames - 1), None)


def _shows_direction(track: Track, n_frames: int) -> bool:
    # A mover seen for the whole clip, so it is seen to cover its whole path.
    return track.motion != "still" and track.first_frame == 0 and track.last_frame == n_frames - 1


def can_ask_video(family: str, tracks: tuple[Track, ...], n_frames: int) -> bool:
    """Whether a clip of these tracks has a `family` question."""
    appearing, disappearing = _appearing(tracks), _disappearing(tracks, n_frames)
    return {"direction": any(_shows_direction(t, n_frames) for t in tracks), "appear": appearing is not None,
            "disappear": disappearing is not None, "count": True,
            "order": appearing is not None and disappearing is not None,
            "when": appearing is not None or disappearing is not None}.get(family, False)


def _ask_direction(tracks: tuple[Track, ...], n_frames: int, rng: random.Random,
                   track: Track | None = None) -> tuple[str, str]:
    track = track or rng.choice([t for t in tracks if _shows_direction(t, n_frames)])
    a, b = rng.sample(AXIS_OPTIONS[track.motion], 2)  # the options in either order
    return rng.choice(VIDEO_TEMPLATES["direction"]).format(ref=track.ref, a=a, b=b), track.motion


def _ask_appear(tracks: tuple[Track, ...], n_frames: int, rng: random.Random) -> tuple[str, str]:
    return rng.choice(VIDEO_TEMPLATES["appear"]), _appearing(tracks).shape


def _ask_disappear(tracks: tuple[Track, ...], n_frames: int, rng: random.Random) -> tuple[str, str]:
    return rng.choice(VIDEO_TEMPLATES["disappear"]), _disappearing(tracks, n_frames).shape


def _ask_count(tracks: tuple[Track, ...], n_frames: int, rng: random.Random,
               which: str | None = None) -> tuple[str, str]:
    which = which or rng.choice(("first", "last", "all"))
    if which == "all":  # every object is seen at some point
        n = len(tracks)
    else:
        n = sum(t.visible(0 if which == "first" else n_frames - 1) for t in tracks)
    return rng.choice(VIDEO_TEMPLATES[f"count_{which}"]), str(n)


def _ask_order(tracks: tuple[Track, ...], n_frames: int, rng: random.Random) -> tuple[str, str]:
    comes, goes = _appearing(tracks), _disappearing(tracks, n_frames)
    events = [f"the {comes.ref} appearing", f"the {goes.ref} disappearing"]
    rng.shuffle(events)
    first = comes if comes.first_frame < goes.last_frame + 1 else goes
    return rng.choice(VIDEO_TEMPLATES["order"]).format(a=events[0], b=events[1]), first.shape


def _ask_when(tracks: tuple[Track, ...], n_frames: int, rng: random.Random,
              event: int | None = None) -> tuple[str, str]:
    options = [(t, "when_appear", t.first_frame) for t in [_appearing(tracks)] if t is not None]
    options += [(t, "when_last", t.last_frame) for t in [_disappearing(tracks, n_frames)] if t is not None]
    track, template, frame = options[event] if event is not None else rng.choice(options)
    return rng.choice(VIDEO_TEMPLATES[template]).format(ref=track.ref), str(int(frame / FPS))


def every_question(tracks: tuple[Track, ...], n_frames: int, rng: random.Random) -> list[tuple[str, str, str]]:
    """Every question a clip answers, in random order, as (family, question, answer): the direction
    of each mover seen throughout, appear, disappear, the three counts, order, and the time of each
    event. Training on all of a clip's answers at once gives the model many more targets per clip."""
    out = [("direction", *_ask_direction(tracks, n_frames, rng, t)) for t in tracks if _shows_direction(t, n_frames)]
    out += [(family, *_ASKERS[family](tracks, n_frames, rng)) for family in ("appear", "disappear", "order")
            if can_ask_video(family, tracks, n_frames)]
    out += [("count", *_ask_count(tracks, n_frames, rng, which)) for which in ("first", "last", "all")]
    events = (_appearing(tracks) is not None) + (_disappearing(tracks, n_frames) is not None)
    out += [("when", *_ask_when(tracks, n_frames, rng, k)) for k in range(events)]
    rng.shuffle(out)
    return out


_ASKERS = {"direction": _ask_direction, "appear": _ask_appear, "disappear": _ask_disappear, "count": _ask_count,
           "order": _ask_order, "when": _ask_when}


def ask_video(family: str, tracks: tuple[Track, ...], n_frames: int, rng: random.Random) -> tuple[str, str]:
    """One `family` question about a clip of `tracks` and its canonical answer (a lower-case word
    or a number)."""
    if family not in _ASKERS:
        raise ValueError(f"unknown video question family {family!r}: use one of {', '.join(VIDEO_FAMILIES)}")
    if not can_ask_video(family, tracks, n_frames):
        raise ValueError(f"no {family} question for this clip")
    return _ASKERS[family](tracks, n_frames, rng)


# --- the video haystack ----------------------------------------------------------------------
#
# Gemini 1.5's video needle: one frame of a long clip holds something no other frame does. Here
# every frame shows one or two still shapes, never a cross, except the needle frame, which also
# shows a cross; the question asks its colour (chance 1/6).

NEEDLE_SHAPE = "cross"
MAX_NEEDLE_FRAMES = 256
NEEDLE_TEMPLATES = ("What colour is the cross?", "Which colour is the cross in the video?")


def make_video_needle(index: int, seed: int, split: str, n_frames: int = 32, depth: float | None = None,
                      frame_size: int = FRAME_SIZE, frames_as: str = "mp4") -> VideoClip:
    """A haystack clip: `n_frames` frames of one or two still shapes, and at `depth` (0: the first
    frame, 1: the last; default uniform) one frame that also shows a cross. One record, task
    "needle", with the needle's `depth` and `needle_frame`."""
    _check(split, frame_size, None, frames_as)
    _check_needle_frames(n_frames)
    if depth is not None and not 0 <= depth <= 1:
        raise OmniInputError(f"depth is {depth!r}: give a place in the clip from 0 (first frame) to 1 (last)")
    rng = random.Random(f"shapeworld-video-needle:{split}:{seed}:{index}")
    at = rng.randrange(n_frames) if depth is None else round(depth * (n_frames - 1))
    colour = rng.choice(COLOURS)
    background = tuple(rng.randint(220, 250) for _ in range(3))
    d = _lattice(frame_size)[2]
    others = [shape for shape in SHAPES if shape != NEEDLE_SHAPE]
    frames, tracks = [], []
    for k in range(n_frames):
        shapes = rng.sample(others, rng.randint(1, 2)) + ([NEEDLE_SHAPE] if k == at else [])
        colours = [colour if shape == NEEDLE_SHAPE else rng.choice(COLOURS) for shape in shapes]
        cells = rng.sample(range(LATTICE * LATTICE), len(shapes))  # apart, so the cross is never hidden
        boxes = [(_pixel(c % LATTICE, frame_size), _pixel(c // LATTICE, frame_size)) for c in cells]
        image = Image.new("RGB", (frame_size, frame_size), background)
        draw = ImageDraw.Draw(image)
        for shape, c, (x, y) in zip(shapes, colours, boxes):
            _draw_shape(draw, shape, x, y, d, COLOUR_RGB[c])
            if shape == NEEDLE_SHAPE:
                tracks.append(Track(shape, c, COLOUR_RGB[c], "still", k, k, d, ((x, y),) * n_frames))
        frames.append(np.asarray(image))
    record = {"id": f"{split}-{index:06d}-needle", "video": video_path(index, split, frames_as), "task": "needle",
              "n_frames": n_frames, "depth": at / max(1, n_frames - 1), "needle_frame": at,
              "conversations": [{"from": "human", "value": "<video>\n" + rng.choice(NEEDLE_TEMPLATES)},
                                {"from": "gpt", "value": colour}]}
    return VideoClip(np.stack(frames), FPS, tuple(tracks), [record])


# --- examples and files -----------------------------------------------------------------------


def _check(split: str, frame_size: int, n_frames: int | None, frames_as: str) -> None:
    if not re.fullmatch(r"[a-z][a-z0-9_]*", str(split)):
        raise OmniInputError(f"split {split!r} is not a plain name: use train or test (lower case letters, digits, _)")
    if not (_is_int(frame_size) and FRAME_SIZES[0] <= frame_size <= FRAME_SIZES[1]):
        raise OmniInputError(f"frame_size is {frame_size!r}: use {FRAME_SIZES[0]} to {FRAME_SIZES[1]} pixels "
                             f"({FRAME_SIZE} is the default)")
    if n_frames is not None and not (_is_int(n_frames) and FRAME_RANGE[0] <= n_frames <= FRAME_RANGE[1]):
        raise OmniInputError(f"n_frames is {n_frames!r}: use {FRAME_RANGE[0]} to {FRAME_RANGE[1]} frames a clip, or "
                             f"leave it unset for {DEFAULT_FRAMES[0]} to {DEFAULT_FRAMES[1]}")
    if frames_as not in FRAMES_AS:
        raise OmniInputError(f"frames_as={frames_as!r}: use 'mp4' (a lossless video file a clip) or 'png' (a folder "
                             "of frames a clip)")


def _check_needle_frames(n_frames) -> None:
    if not (_is_int(n_frames) and 1 <= n_frames <= MAX_NEEDLE_FRAMES):
        raise OmniInputError(f"n_frames is {n_frames!r}: a haystack clip has 1 to {MAX_NEEDLE_FRAMES} frames")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def video_path(index: int, split: str, frames_as: str = "mp4") -> str:
    """Where clip `index` goes, relative to the output folder: an .mp4 file or a folder of PNGs."""
    return f"videos/{split}_{index:06d}" + (".mp4" if frames_as == "mp4" else "")


def make_video_example(index: int, seed: int, split: str, frame_size: int = FRAME_SIZE, n_frames: int | None = None,
                       frames_as: str = "mp4", questions: str = "one") -> VideoClip:
    """Clip `index`: `n_frames` frames (default 4 to 8) of `frame_size` px, its tracks, and one
    LLaVA record for each family the clip can answer (`task` the family, `video` its path as
    `write_shapeworld_video` writes it with `frames_as`), all from `video_rng`; with `questions`
    "all", one multi-turn record of `every_question` instead (`turn_tasks` the families)."""
    _check(split, frame_size, n_frames, frames_as)
    if questions not in VIDEO_QUESTIONS:
        raise OmniInputError(f"questions={questions!r}: use 'one' (a record per family) or 'all' (one multi-turn "
                             "record of every question a clip answers)")
    rng = video_rng(split, seed, index)
    n_frames = n_frames if n_frames is not None else rng.randint(*DEFAULT_FRAMES)
    tracks = _draw_tracks(rng, n_frames)
    background = tuple(rng.randint(220, 250) for _ in range(3))
    path, records = video_path(index, split, frames_as), []
    if questions == "all":
        asked = every_question(tracks, n_frames, rng)
        turns = [{"from": role, "value": ("<video>\n" if k == 0 and role == "human" else "") + text}
                 for k, (_, question, answer) in enumerate(asked) for role, text in (("human", question),
                                                                                     ("gpt", answer))]
        records.append({"id": f"{split}-{index:06d}-all", "video": path, "task": "multi_turn",
                        "turn_tasks": [family for family, _, _ in asked], "n_frames": n_frames,
                        "n_objects": len(tracks), "conversations": turns})
    for family in VIDEO_FAMILIES if questions == "one" else ():
        if can_ask_video(family, tracks, n_frames):
            question, answer = ask_video(family, tracks, n_frames, rng)
            records.append({"id": f"{split}-{index:06d}-{family}", "video": path, "task": family,
                            "n_frames": n_frames, "n_objects": len(tracks),
                            "conversations": [{"from": "human", "value": "<video>\n" + question},
                                              {"from": "gpt", "value": answer}]})
    tracks = _layout(tracks, rng, frame_size, n_frames)
    return VideoClip(_render(tracks, background, frame_size, n_frames), FPS, tracks, records)


def write_shapeworld_video(out_dir: str | Path, n: int, seed: int, split: str, frame_size: int = FRAME_SIZE,
                           frames_as: str = "mp4", n_frames: int | None = None, progress: bool = True,
                           needles: bool = False, questions: str = "one") -> Path:
    """Write `n` clips to `out_dir/videos/` (`write_video_clips`) and all their records to
    `out_dir/{split}.json` (replaced atomically; video paths relative to `out_dir`). Returns the
    JSON path."""
    records = write_video_clips(out_dir, n, seed, split, frame_size, frames_as, n_frames, progress, needles,
                                questions)
    path = Path(out_dir) / f"{split}.json"
    write_records(path, records)
    return path


def write_video_clips(out_dir: str | Path, n: int, seed: int, split: str, frame_size: int = FRAME_SIZE,
                      frames_as: str = "mp4", n_frames: int | None = None, progress: bool = True,
                      needles: bool = False, questions: str = "one") -> list[dict]:
    """Write `n` clips to `out_dir/videos/`: lossless FFV1 `{split}_{index:06d}.mp4` files (PyAV, the
    `[media]` extra) or, with `frames_as="png"`, folders `{split}_{index:06d}/` of 000.png, 001.png,
    ...; returns their LLaVA records. `questions` as `make_video_example`. With `needles`, haystack
    clips (`make_video_needle`) of `n_frames` frames (default 32) instead. A progress bar shows for
    500 clips or more, unless `progress` is False."""
    from tqdm import tqdm

    if not _is_int(n) or n < 0:
        raise OmniInputError(f"n is {n!r}: ask for zero or more clips")
    _check(split, frame_size, None if needles else n_frames, frames_as)  # a haystack clip checks its own length
    if needles and n_frames is not None:
        _check_needle_frames(n_frames)
    out_dir = Path(out_dir)
    (out_dir / "videos").mkdir(parents=True, exist_ok=True)
    records = []
    for index in tqdm(range(n), desc=f"shapeworld video {split}", unit="clip", disable=not progress or n < 500):
        clip = (make_video_needle(index, seed, split, n_frames or 32, None, frame_size, frames_as) if needles
                else make_video_example(index, seed, split, frame_size, n_frames, frames_as, questions))
        target = out_dir / video_path(index, split, frames_as)
        if frames_as == "mp4":
            write_video(target, clip.frames, clip.fps)
        else:
            target.mkdir(exist_ok=True)
            names = [f"{k:03d}.png" for k in range(clip.n_frames)]
            for stale in target.glob("*.png"):  # frames of a longer clip written here before
                if stale.name not in names:
                    stale.unlink()
            for name, frame in zip(names, clip.frames):
                Image.fromarray(frame).save(target / name, format="PNG")
        records += clip.records
    return records
