"""ShapeWorld: procedurally generated images of coloured shapes, with exact ground truth.

No data can be downloaded where omnilm trains, so it makes its own: 1 to 4 objects (shape,
colour, size) on a 3x3 grid, drawn with PIL, plus a caption and questions whose short
canonical answers make exact-match accuracy a real, repeatable number.

    scene    = generate_scene(rng)              # tuple of Obj, in reading order
    image    = render(scene, image_size, rng)   # PIL RGB image
    text     = caption(scene)                   # "a large red circle at the top left and ..."
    q, a     = ask("colour", scene, rng)        # ("What colour is the circle?", "red")
    example  = make_example(index, seed, split) # scene, image and LLaVA JSON records
    path     = write_shapeworld(out_dir, n, seed, split)

Determinism and splits: example `index` of `split` under `seed` uses one generator,
`random.Random(f"shapeworld:{split}:{seed}:{index}")`, and nothing else (no global state,
no hash randomisation: Python seeds from a str through SHA-512). So the same (split, seed,
index) gives byte-identical PNG and text in any process, and train and test never share a
generator stream. The stream is consumed in a fixed order (scene, render, caption prompt,
questions) and `render` draws the same numbers at every image size, so the text does not
depend on `image_size`. Note that the world is small: a single-object scene has only 540
possible contents, so test *scenes* can also occur in train (with other jitter, tint and
questions); 3- and 4-object scenes are practically all new.

Later tasks (multi-image, video, needles) build on the same small pieces: a scene model,
a renderer, and one question generator per family.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from PIL import Image, ImageDraw

from omnilm.errors import OmniInputError
from omnilm.io import write_text

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = ("small", "large")
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
FAMILIES = ("colour", "shape", "count", "position", "existence", "spatial")

# Saturated and at least ~100 apart in RGB from each other, and far from the light background.
COLOUR_RGB = {
    "red": (215, 25, 40),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 15),
    "purple": (135, 40, 190),
    "orange": (245, 120, 0),
}
# Side of the shape's bounding box as a fraction of the cell: clearly different sizes.
SIZE_FRACTION = {"small": 0.45, "large": 0.9}
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds",
           "cross": "crosses"}

CAPTION_PROMPTS = ("Describe the image.", "What is in the image?", "Describe the shapes in the image.")
TEMPLATES = {
    "colour": ("What colour is the {ref}?", "What is the colour of the {ref}?"),
    "shape": ("What shape is the {ref}?", "What is the shape of the {ref}?"),
    "count_all": ("How many shapes are there?", "How many objects are there?"),
    "count_colour": ("How many {colour} shapes are there?",),
    "count_shape": ("How many {shapes} are there?",),
    "position": ("Where is the {ref}?", "Where is the {ref} in the image?"),
    "existence": ("Is there {article} {colour} {shape}?", "Is there {article} {colour} {shape} in the image?"),
    "left": ("Is the {a} left of the {b}?", "Is the {a} to the left of the {b}?"),
    "above": ("Is the {a} above the {b}?",),
}
# Every canonical answer: what normalize_answer(prediction) is compared with.
ANSWERS = frozenset(COLOURS + SHAPES + CELLS + ("yes", "no") + tuple("01234"))

P_SINGLE_TURN = 0.4
# Spatial needs two objects (3 scenes in 4); a heavier weight keeps the families balanced.
FAMILY_WEIGHTS = {"colour": 1.0, "shape": 1.0, "count": 1.0, "position": 1.0, "existence": 1.0, "spatial": 1.5}


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    cell: int  # 0..8 in reading order: row = cell // 3, column = cell % 3

    @property
    def row(self) -> int:
        return self.cell // 3

    @property
    def col(self) -> int:
        return self.cell % 3

    @property
    def position(self) -> str:
        return CELLS[self.cell]


Scene = tuple  # tuple[Obj, ...], sorted by cell


# --- scenes and pixels ------------------------------------------------------------------------


def example_rng(split: str, seed: int, index: int) -> random.Random:
    """The one generator behind example `index` of `split` under `seed` (see module docstring)."""
    return random.Random(f"shapeworld:{split}:{seed}:{index}")


def generate_scene(rng: random.Random, n_objects: int | None = None) -> Scene:
    """1 to 4 objects (uniform) in distinct cells, sorted in reading order. No two objects
    share shape, colour and size all three, so the full description always picks one out."""
    n = n_objects if n_objects is not None else rng.randint(1, 4)
    cells = sorted(rng.sample(range(9), n))
    seen, objects = set(), []
    for cell in cells:
        while True:
            kind = (rng.choice(SHAPES), rng.choice(COLOURS), rng.choice(SIZES))
            if kind not in seen:
                break
        seen.add(kind)
        objects.append(Obj(*kind, cell))
    return tuple(objects)


def render(scene: Scene, image_size: int = 64, rng: random.Random | None = None, jitter: float = 1.0) -> Image.Image:
    """Draw `scene` on a light, slightly tinted background, each shape inside its cell with a
    1 px margin and a random offset: anywhere in the cell with `jitter` 1, centred with 0.
    Draws the same numbers from `rng` at any size and jitter."""
    if not 32 <= image_size <= 512:
        raise OmniInputError(f"image_size {image_size} is out of range: use 32 to 512 pixels (64 to 128 is typical)")
    rng = rng or random.Random(0)
    background = tuple(rng.randint(220, 250) for _ in range(3))
    image = Image.new("RGB", (image_size, image_size), background)
    draw = ImageDraw.Draw(image)
    edges = [round(i * image_size / 3) for i in range(4)]  # cell boundaries in pixels
    for obj in scene:
        jx, jy = (0.5 + jitter * (u - 0.5) for u in (rng.random(), rng.random()))
        fill = tuple(min(255, max(0, c + rng.randint(-8, 8))) for c in COLOUR_RGB[obj.colour])
        left, top = edges[obj.col], edges[obj.row]
        inner = min(edges[obj.col + 1] - left, edges[obj.row + 1] - top) - 2  # room inside the margin
        d = min(int(SIZE_FRACTION[obj.size] * image_size / 3), inner)
        d -= 1 - d % 2  # odd, so shapes have a centre pixel and stay symmetric
        x0 = left + 1 + round(jx * (edges[obj.col + 1] - left - 2 - d))
        y0 = top + 1 + round(jy * (edges[obj.row + 1] - top - 2 - d))
        _draw_shape(draw, obj.shape, x0, y0, d, fill)
    return image


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, x0: int, y0: int, d: int, fill: tuple) -> None:
    # The shape fills the d x d pixel box whose top-left pixel is (x0, y0); bounds are inclusive.
    x1, y1, cx, cy = x0 + d - 1, y0 + d - 1, x0 + d // 2, y0 + d // 2
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif shape == "triangle":  # pointing up
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif shape == "cross":  # a plus sign, arms about a third of the box wide
        a = max(1, d // 6)
        draw.rectangle((x0, cy - a, x1, cy + a), fill=fill)
        draw.rectangle((cx - a, y0, cx + a, y1), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}: use one of {', '.join(SHAPES)}")


# --- text -------------------------------------------------------------------------------------


def caption(scene: Scene) -> str:
    """Every object with size, colour, shape and position, in reading order:
    "a large red circle at the top left, a small blue square at the center and a ... ."."""
    parts = [f"a {o.size} {o.colour} {o.shape} at the {o.position}" for o in scene]
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return body + "."


def refer(obj: Obj, scene: Scene, attribute_sets) -> str | None:
    """The first noun phrase built from one of `attribute_sets` (each a tuple of "size",
    "colour", "shape", "cell") that picks out `obj` alone in `scene`; None if none does."""
    for attrs in attribute_sets:
        if sum(all(getattr(o, a) == getattr(obj, a) for a in attrs) for o in scene) == 1:
            words = [getattr(obj, a) for a in ("size", "colour") if a in attrs]
            words.append(obj.shape if "shape" in attrs else "object")
            return " ".join(words) + (f" at the {obj.position}" if "cell" in attrs else "")
    return None


# How each family may name an object: never with the attribute it asks about.
_REF_BY_SHAPE = (("shape",), ("size", "shape"), ("shape", "cell"))  # colour questions
_REF_BY_COLOUR = (("colour",), ("size", "colour"), ("cell",))  # shape questions
_REF_NO_CELL = (("colour", "shape"), ("size", "colour", "shape"))  # position and spatial questions


def _ask_colour(scene: Scene, rng: random.Random) -> tuple[str, str]:
    obj = rng.choice(scene)
    return rng.choice(TEMPLATES["colour"]).format(ref=refer(obj, scene, _REF_BY_SHAPE)), obj.colour


def _ask_shape(scene: Scene, rng: random.Random) -> tuple[str, str]:
    obj = rng.choice(scene)
    return rng.choice(TEMPLATES["shape"]).format(ref=refer(obj, scene, _REF_BY_COLOUR)), obj.shape


def _ask_count(scene: Scene, rng: random.Random) -> tuple[str, str]:
    # All objects (2 in 5), of one colour or of one shape; a quarter of those ask about an
    # absent one, so "0" is a real answer.
    kind, u = rng.random(), rng.random()
    if kind < 0.4:
        return rng.choice(TEMPLATES["count_all"]), str(len(scene))
    attr, values = ("colour", COLOURS) if kind < 0.7 else ("shape", SHAPES)
    present = sorted({getattr(o, attr) for o in scene}, key=values.index)
    value = rng.choice(present if u < 0.75 else [v for v in values if v not in present])
    n = sum(getattr(o, attr) == value for o in scene)
    if attr == "colour":
        return rng.choice(TEMPLATES["count_colour"]).format(colour=value), str(n)
    return rng.choice(TEMPLATES["count_shape"]).format(shapes=PLURALS[value]), str(n)


def _ask_position(scene: Scene, rng: random.Random) -> tuple[str, str]:
    obj = rng.choice(scene)
    return rng.choice(TEMPLATES["position"]).format(ref=refer(obj, scene, _REF_NO_CELL)), obj.position


def _ask_existence(scene: Scene, rng: random.Random) -> tuple[str, str]:
    # Balanced yes/no. Three "no"s in four are hard negatives: the colour is there on another
    # shape, or the shape in another colour.
    want_yes, hard = rng.random() < 0.5, rng.random() < 0.75
    present = {(o.colour, o.shape) for o in scene}
    if want_yes:
        colour, shape = rng.choice(sorted(present))
    else:
        if hard:
            near = {(c, o.shape) for o in scene for c in COLOURS} | {(o.colour, s) for o in scene for s in SHAPES}
        else:
            near = set(itertools.product(COLOURS, SHAPES))
        colour, shape = rng.choice(sorted(near - present))
    article = "an" if colour[0] in "aeiou" else "a"
    question = rng.choice(TEMPLATES["existence"]).format(article=article, colour=colour, shape=shape)
    return question, "yes" if want_yes else "no"


_RELATIONS = {"left": lambda a, b: a.col < b.col, "above": lambda a, b: a.row < b.row}


def _ask_spatial(scene: Scene, rng: random.Random) -> tuple[str, str]:
    # Balanced yes/no: pick the answer, then an ordered pair and relation that give it. With
    # two objects in distinct cells both answers always exist (swap the pair for "no"); the
    # "no"s include same-row/column pairs ("left of" needs a strictly smaller column).
    want_yes = rng.random() < 0.5
    options = [(rel, a, b) for rel, holds in _RELATIONS.items()
               for a, b in itertools.permutations(scene, 2) if holds(a, b) == want_yes]
    rel, a, b = rng.choice(options)
    question = rng.choice(TEMPLATES[rel]).format(a=refer(a, scene, _REF_NO_CELL), b=refer(b, scene, _REF_NO_CELL))
    return question, "yes" if want_yes else "no"


_ASKERS = {"colour": _ask_colour, "shape": _ask_shape, "count": _ask_count, "position": _ask_position,
           "existence": _ask_existence, "spatial": _ask_spatial}


def can_ask(family: str, scene: Scene) -> bool:
    """Whether `ask(family, scene, rng)` has a question: spatial needs two objects."""
    return family in _ASKERS and (family != "spatial" or len(scene) >= 2)


def ask(family: str, scene: Scene, rng: random.Random) -> tuple[str, str]:
    """One question of `family` about `scene` and its canonical answer (lower case, no
    final punctuation; counts as digits)."""
    if family not in _ASKERS:
        raise ValueError(f"unknown question family {family!r}: use one of {', '.join(FAMILIES)}")
    if not can_ask(family, scene):
        raise ValueError(f"no {family} question for a scene of {len(scene)} object(s)")
    return _ASKERS[family](scene, rng)


QUESTION_MIXES = ("mixed", "all")


def pick_families(scene: Scene, rng: random.Random, questions: str = "mixed") -> list[str]:
    """The families to ask about `scene`, in asking order. "mixed": one family (with probability
    P_SINGLE_TURN) or 2 to 4 different ones; "all": every family the scene allows, shuffled."""
    pool = [f for f in FAMILIES if can_ask(f, scene)]
    if questions == "all":
        rng.shuffle(pool)
        return pool
    k = 1 if rng.random() < P_SINGLE_TURN else rng.randint(2, 4)
    chosen = []
    for _ in range(k):
        family = rng.choices(pool, weights=[FAMILY_WEIGHTS[f] for f in pool])[0]
        pool.remove(family)
        chosen.append(family)
    return chosen


def normalize_answer(text: str) -> str:
    """What exact match compares: lower case, spaces collapsed, trailing punctuation and
    quotes stripped, number words "zero".."four" as digits ("Two." -> "2")."""
    text = " ".join(str(text).lower().split()).strip(" \"'`").rstrip(".!?,;:").strip(" \"'`")
    return " ".join(_ANSWER_SYNONYMS.get(word, word) for word in text.split())


_ANSWER_SYNONYMS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "centre": "center"}


# --- records and files ------------------------------------------------------------------------


class Example(NamedTuple):
    scene: Scene
    image: Image.Image
    records: list  # [caption record, question record] in LLaVA JSON form


def make_example(index: int, seed: int, split: str, image_size: int = 64, jitter: float = 1.0,
                 questions: str = "mixed", n_objects: int | None = None) -> Example:
    """Example `index`: its scene (`n_objects` objects, default 1 to 4), image and two LLaVA
    records, a caption and a question conversation (see `pick_families`), all from one
    generator. `jitter` changes where shapes sit in their cells (see `render`), never the text."""
    rng = example_rng(split, seed, index)
    scene = generate_scene(rng, n_objects)
    image = render(scene, image_size, rng, jitter)
    stem = f"{split}-{index:06d}"
    image_path = f"images/{split}_{index:06d}.png"
    caption_record = {
        "id": f"{stem}-caption", "image": image_path, "task": "caption",
        "conversations": [{"from": "human", "value": "<image>\n" + rng.choice(CAPTION_PROMPTS)},
                          {"from": "gpt", "value": caption(scene)}],
    }
    families = pick_families(scene, rng, questions)
    conversations = []
    for turn, family in enumerate(families):
        question, answer = ask(family, scene, rng)
        conversations += [{"from": "human", "value": ("<image>\n" if turn == 0 else "") + question},
                          {"from": "gpt", "value": answer}]
    task = families[0] if len(families) == 1 else "multi_turn"
    question_record = {"id": f"{stem}-{task}", "image": image_path, "task": task}
    if task == "multi_turn":
        question_record["turn_tasks"] = families
    question_record["conversations"] = conversations
    return Example(scene, image, [caption_record, question_record])


def write_shapeworld(out_dir: str | Path, n: int, seed: int, split: str, image_size: int = 64,
                     jitter: float = 1.0, questions: str = "mixed", n_objects: int | None = None) -> Path:
    """Write `n` examples: PNGs to `out_dir/images/{split}_{index:06d}.png` and all records to
    `out_dir/{split}.json` (a JSON list, one record a line, replaced atomically; image paths
    are relative to `out_dir`). Returns the JSON path."""
    from tqdm import tqdm

    if not re.fullmatch(r"[a-z][a-z0-9_]*", str(split)):
        raise OmniInputError(f"split {split!r} is not a plain name: use train or test (lower case letters, digits, _)")
    if n < 0:
        raise OmniInputError(f"n is {n}: ask for zero or more examples")
    if not 0 <= jitter <= 1:
        raise OmniInputError(f"jitter is {jitter}: use 0 (shapes centred in their cells) to 1 (anywhere in the cell)")
    if n_objects is not None and not 1 <= n_objects <= 4:
        raise OmniInputError(f"n_objects is {n_objects}: a scene holds 1 to 4 objects (or leave it unset for a mix)")
    if questions not in QUESTION_MIXES:
        raise OmniInputError(f"questions={questions!r}: use 'mixed' (1 to 4 families per image) or 'all' (every family)")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for index in tqdm(range(n), desc=f"shapeworld {split}", unit="img", disable=n < 2000):
        example = make_example(index, seed, split, image_size, jitter, questions, n_objects)
        example.image.save(out_dir / example.records[0]["image"], format="PNG")
        lines += [json.dumps(record) for record in example.records]
    path = out_dir / f"{split}.json"
    write_text(path, "[\n" + ",\n".join(lines) + "\n]\n" if lines else "[]\n")
    return path

