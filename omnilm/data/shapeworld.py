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

Multi-image examples (`make_multi_example`, and `write_shapeworld(..., multi_image=P)`) put
2 to 4 images in one record, each marker where a template puts it (before or after the
question, mid-sentence, labelled "Image 1: <image>"), with questions that need several of
them: which image has the most shapes, which colour is new in one image, whether two images
hold the same shape, how many shapes there are in all (families `MULTI_FAMILIES`, answers an
ordinal, a colour, yes/no or a digit). Some are chats whose first turn asks an ordinary
question about one image and whose later turns each bring one more image; with
`questions="all"` each goes on with every other multi-image family its images answer
(`follow_up_questions`). Which indices are multi-image is decided by
`random.Random(f"shapeworld-kind:{split}:{seed}:{index}")`, and a
multi-image example draws from `random.Random(f"shapeworld-multi:{split}:{seed}:{index}")`
(`multi_rng`), so the single-image examples come out exactly as without them.

    example  = make_multi_example(index, seed, split)   # scenes, images, one LLaVA record

Later tasks (video, needles) build on the same small pieces: a scene model, a renderer, and
one question generator per family.
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
# Which image, in multi-image answers (at most 4 images).
ORDINALS = ("first", "second", "third", "fourth")
# Every canonical answer: what normalize_answer(prediction) is compared with. Counts above 4
# and ordinals come from multi-image questions only.
ANSWERS = frozenset(COLOURS + SHAPES + CELLS + ("yes", "no") + tuple("0123456789") + ORDINALS)

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
    quotes stripped, number words "zero".."nine" as digits ("Two." -> "2") and "1st".."4th"
    as ordinal words ("2nd" -> "second")."""
    text = " ".join(str(text).lower().split()).strip(" \"'`").rstrip(".!?,;:").strip(" \"'`")
    return " ".join(_ANSWER_SYNONYMS.get(word, word) for word in text.split())


_ANSWER_SYNONYMS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                    "seven": "7", "eight": "8", "nine": "9", "centre": "center",
                    "1st": "first", "2nd": "second", "3rd": "third", "4th": "fourth"}


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
        "id": f"{stem}-caption", "image": image_path, "task": "caption", "n_objects": len(scene),
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
    # n_objects lets `omnilm eval` split accuracy by scene size: with one object a question needs
    # no look-up, with two or more the model must find the object the question names.
    question_record = {"id": f"{stem}-{task}", "image": image_path, "task": task, "n_objects": len(scene)}
    if task == "multi_turn":
        question_record["turn_tasks"] = families
    question_record["conversations"] = conversations
    return Example(scene, image, [caption_record, question_record])


def write_shapeworld(out_dir: str | Path, n: int, seed: int, split: str, image_size: int = 64,
                     jitter: float = 1.0, questions: str = "mixed", n_objects: int | None = None,
                     multi_image: float = 0.0, progress: bool = True) -> Path:
    """Write `n` examples: PNGs to `out_dir/images/{split}_{index:06d}.png` and all records to
    `out_dir/{split}.json` (a JSON list, one record a line, replaced atomically; image paths
    are relative to `out_dir`). Returns the JSON path.

    A `multi_image` fraction of the examples (chosen per index by `is_multi_image`) are
    multi-image ones (`make_multi_example`): one record, and PNGs `{split}_{index:06d}_{k}.png`.
    The others are exactly what they are without it. `n_objects` shapes the single-image examples
    only (multi-image scenes are drawn to fit their questions); `questions="all"` asks every family
    a single image allows, and follows a multi-image question with every other multi-image family
    its images answer. A progress bar shows for 2,000 examples or more, unless `progress` is False."""
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
    if not 0 <= multi_image <= 1:
        raise OmniInputError(f"multi_image is {multi_image}: give the fraction of multi-image examples, "
                             "from 0 (none) to 1 (all)")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for index in tqdm(range(n), desc=f"shapeworld {split}", unit="img", disable=not progress or n < 2000):
        if is_multi_image(index, seed, split, multi_image):
            multi = make_multi_example(index, seed, split, image_size, jitter, questions)
            for image, name in zip(multi.images, multi.record["image"]):
                image.save(out_dir / name, format="PNG")
            lines.append(json.dumps(multi.record))
            continue
        example = make_example(index, seed, split, image_size, jitter, questions, n_objects)
        example.image.save(out_dir / example.records[0]["image"], format="PNG")
        lines += [json.dumps(record) for record in example.records]
    path = out_dir / f"{split}.json"
    write_text(path, "[\n" + ",\n".join(lines) + "\n]\n" if lines else "[]\n")
    return path



# --- multi-image examples ---------------------------------------------------------------------
#
# A multi-image question is built together with its images: the images a record already has
# stay as they are (a chat's earlier turns), and the missing ones (None in `slots`) are drawn
# so that the question has exactly one answer (a unique largest count, exactly one new colour,
# single-object images where shapes are compared, a total of at most 9). Task names carry a
# "multi_" prefix so per-task tables keep them apart from the single-image families.

MULTI_FAMILIES = ("multi_more", "multi_new_colour", "multi_same_shape", "multi_total")
MULTI_TEMPLATES = {
    "more_of_two": ("Which image has more shapes?", "Which of the two images has more shapes?",
                    "Which image has more objects?"),
    "most": ("Which image has the most shapes?", "Which image has the most objects?"),
    "new_colour": ("Which colour appears in the {b} image but not in the {a}?",
                   "Which colour is in the {b} image but not in the {a} image?",
                   "What colour does the {b} image have that the {a} image does not?"),
    "same_shape": ("Do the {a} and {b} images show the same shape?",
                   "Is the shape in the {a} image the same as the shape in the {b} image?"),
    "total_all": ("How many shapes are there in the images?", "How many shapes are there in all the images?",
                  "How many objects are there in the images altogether?"),
    "total_colour": ("How many {colour} shapes are there in the images?",
                     "How many {colour} shapes are there in all the images?"),
    "total_shape": ("How many {shapes} are there in the images?", "How many {shapes} are there in all the images?"),
}
# Later turns of a chat: each brings one new image and asks about all the images so far.
NEW_IMAGE_TURNS = ("Here is another image: <image>\n{question}", "<image>\n{question}",
                   "And one more image: <image>\n{question}", "{question}\n<image>",
                   "Now look at this image too: <image>\n{question}")
MAX_TOTAL = 9  # "total" answers stay one digit
P_MULTI_CHAT = 0.4  # multi-image examples that are chats whose later turns bring the images
P_THIRD_IMAGE = 0.5  # such chats that go on to a third image (and turn)

Slots = list  # list[Scene | None]: a multi-image question's images, None where one is still to be drawn


def multi_rng(split: str, seed: int, index: int) -> random.Random:
    """The one generator behind multi-image example `index`: a stream of its own, so the
    single-image stream of the same index (`example_rng`) is never touched."""
    return random.Random(f"shapeworld-multi:{split}:{seed}:{index}")


def is_multi_image(index: int, seed: int, split: str, fraction: float) -> bool:
    """Whether example `index` is a multi-image one when `fraction` of them are. A generator of
    its own decides, so the single-image examples keep their streams, and the indices that are
    multi-image at a smaller fraction stay multi-image at a larger one."""
    return fraction > 0 and random.Random(f"shapeworld-kind:{split}:{seed}:{index}").random() < fraction


def _colours(scene: Scene) -> list[str]:
    # In COLOURS order, never set order: str hashes differ between processes.
    return [c for c in COLOURS if any(o.colour == c for o in scene)]


def _scene_with(rng: random.Random, specs: list[tuple[str | None, str | None]]) -> Scene:
    """One object per (shape, colour) spec, None for a random value, in distinct random cells;
    like `generate_scene`, no two objects share shape, colour and size. The specs are shuffled
    first so that a constructed object (the new colour, say) is not always the top-left one."""
    specs = list(specs)
    rng.shuffle(specs)
    cells = sorted(rng.sample(range(9), len(specs)))
    seen, objects = set(), []
    for cell, (shape, colour) in zip(cells, specs):
        while True:
            kind = (shape or rng.choice(SHAPES), colour or rng.choice(COLOURS), rng.choice(SIZES))
            if kind not in seen:
                break
        seen.add(kind)
        objects.append(Obj(*kind, cell))
    return tuple(objects)


def _fill(slots: Slots, rng: random.Random) -> list:
    # The images nothing constrains: ordinary 1- to 4-object scenes, drawn in image order.
    return [scene if scene is not None else generate_scene(rng) for scene in slots]


def _unique_max_counts(slots: Slots) -> list[tuple[int, ...]]:
    # Every way to give the missing images 1 to 4 objects that leaves one image with the most.
    free = [i for i, scene in enumerate(slots) if scene is None]
    options = []
    for drawn in itertools.product(range(1, 5), repeat=len(free)):
        counts = [len(scene) if scene is not None else 0 for scene in slots]
        for i, n in zip(free, drawn):
            counts[i] = n
        if counts.count(max(counts)) == 1:
            options.append(tuple(counts))
    return options


def _ask_more(slots: Slots, rng: random.Random) -> tuple[list, str, str]:
    # The winning image is drawn first (uniform over those that can win), so every ordinal is
    # an answer, and the count pattern then, so a 4-object image does not always win.
    options = _unique_max_counts(slots)
    winners = sorted({counts.index(max(counts)) for counts in options})
    winner = rng.choice(winners)
    counts = rng.choice([c for c in options if c.index(max(c)) == winner])
    scenes = [scene if scene is not None else generate_scene(rng, n) for scene, n in zip(slots, counts)]
    return scenes, rng.choice(_more_templates(len(slots))), ORDINALS[winner]


def _more_templates(n_images: int) -> tuple[str, ...]:
    return MULTI_TEMPLATES["more_of_two" if n_images == 2 else "most"]


def _ask_new_colour(slots: Slots, rng: random.Random) -> tuple[list, str, str]:
    # "In b but not in a": one image of the pair is drawn to fit the other, so that exactly one
    # colour of b is missing from a. When b is drawn it also repeats some of a's colours, and
    # when a is drawn it may add colours b lacks, so the answer needs both images.
    pairs = [(a, b) for a, b in itertools.permutations(range(len(slots)), 2) if slots[a] is None or slots[b] is None]
    a, b = rng.choice(pairs)
    built = b if slots[b] is None else a
    scenes = [scene if i == built else _fill([scene], rng)[0] for i, scene in enumerate(slots)]
    if built == b:
        seen = _colours(scenes[a])
        answer = rng.choice([c for c in COLOURS if c not in seen])
        colours = [answer] + rng.sample(seen, rng.randint(0, min(len(seen), 3)))
    else:
        there = _colours(scenes[b])
        answer = rng.choice(there)
        colours = [c for c in there if c != answer]
        lacking = [c for c in COLOURS if c not in there]
        colours += rng.sample(lacking, rng.randint(0 if colours else 1, min(2, 4 - len(colours))))
    if len(colours) < 4 and rng.random() < 0.3:  # sometimes one colour on two shapes
        colours.append(rng.choice(colours))
    scenes[built] = _scene_with(rng, [(None, c) for c in colours])
    question = rng.choice(MULTI_TEMPLATES["new_colour"]).format(a=ORDINALS[a], b=ORDINALS[b])
    return scenes, question, answer


def _same_shape_pairs(slots: Slots) -> list[tuple[int, int]]:
    # Pairs of one-object images (drawn or still missing) with at least one still missing.
    usable = [i for i, scene in enumerate(slots) if scene is None or len(scene) == 1]
    return [(a, b) for a, b in itertools.combinations(usable, 2) if slots[a] is None or slots[b] is None]


def _ask_same_shape(slots: Slots, rng: random.Random) -> tuple[list, str, str]:
    # Balanced yes/no. The compared images hold one object each, so "the shape" of an image is
    # unambiguous; colours and sizes are drawn independently of the answer, so only the shape
    # tells it.
    a, b = rng.choice(_same_shape_pairs(slots))
    want_yes = rng.random() < 0.5
    scenes = list(slots)
    if scenes[a] is None and scenes[b] is None:
        scenes[a] = generate_scene(rng, 1)
    built, other = (b, a) if scenes[b] is None else (a, b)
    shape = scenes[other][0].shape
    if not want_yes:
        shape = rng.choice([s for s in SHAPES if s != shape])
    scenes[built] = _scene_with(rng, [(shape, None)])
    question = rng.choice(MULTI_TEMPLATES["same_shape"]).format(a=ORDINALS[a], b=ORDINALS[b])
    return _fill(scenes, rng), question, "yes" if want_yes else "no"


def _ask_total(slots: Slots, rng: random.Random) -> tuple[list, str, str]:
    # Counting over all images, as `_ask_count` does over one: all objects (2 in 5), of one
    # colour or of one shape, a quarter of those absent from every image (when one is). The
    # missing images get few enough objects that the total stays at most MAX_TOTAL (1 to 4
    # with two images, 1 to 3 with three, 1 to 2 with four).
    free = slots.count(None)
    given = sum(len(scene) for scene in slots if scene is not None)
    most = min(4, (MAX_TOTAL - given) // free)
    scenes = [scene if scene is not None else generate_scene(rng, rng.randint(1, most)) for scene in slots]
    return (scenes, *_total_question(scenes, rng))


def _total_question(scenes: list, rng: random.Random) -> tuple[str, str]:
    # A "how many ... in all the images" question about drawn scenes holding at most MAX_TOTAL objects.
    objects = [o for scene in scenes for o in scene]
    kind, u = rng.random(), rng.random()
    if kind < 0.4:
        return rng.choice(MULTI_TEMPLATES["total_all"]), str(len(objects))
    attr, values = ("colour", COLOURS) if kind < 0.7 else ("shape", SHAPES)
    present = [v for v in values if any(getattr(o, attr) == v for o in objects)]
    absent = [v for v in values if v not in present]  # empty when all images together hold every one
    value = rng.choice(present if u < 0.75 or not absent else absent)
    n = sum(getattr(o, attr) == value for o in objects)
    if attr == "colour":
        return rng.choice(MULTI_TEMPLATES["total_colour"]).format(colour=value), str(n)
    return rng.choice(MULTI_TEMPLATES["total_shape"]).format(shapes=PLURALS[value]), str(n)


# --- questions about images already drawn (questions="all") -------------------------------------
#
# `ask_multi` draws images to fit a question; these ask what images already drawn answer with
# exactly one answer, or return None: a unique largest count, a pair of images with exactly one
# new colour, a pair of one-object images, a total of at most MAX_TOTAL.


def _tell_more(scenes: list, rng: random.Random) -> tuple[str, str] | None:
    counts = [len(scene) for scene in scenes]
    if counts.count(max(counts)) > 1:
        return None
    return rng.choice(_more_templates(len(scenes))), ORDINALS[counts.index(max(counts))]


def _tell_new_colour(scenes: list, rng: random.Random) -> tuple[str, str] | None:
    new = {(a, b): [c for c in _colours(scenes[b]) if c not in _colours(scenes[a])]
           for a, b in itertools.permutations(range(len(scenes)), 2)}
    pairs = [pair for pair, colours in new.items() if len(colours) == 1]
    if not pairs:
        return None
    a, b = rng.choice(pairs)
    return rng.choice(MULTI_TEMPLATES["new_colour"]).format(a=ORDINALS[a], b=ORDINALS[b]), new[a, b][0]


def _tell_same_shape(scenes: list, rng: random.Random) -> tuple[str, str] | None:
    pairs = list(itertools.combinations([i for i, scene in enumerate(scenes) if len(scene) == 1], 2))
    if not pairs:
        return None
    a, b = rng.choice(pairs)
    question = rng.choice(MULTI_TEMPLATES["same_shape"]).format(a=ORDINALS[a], b=ORDINALS[b])
    return question, "yes" if scenes[a][0].shape == scenes[b][0].shape else "no"


def _tell_total(scenes: list, rng: random.Random) -> tuple[str, str] | None:
    return _total_question(scenes, rng) if sum(len(scene) for scene in scenes) <= MAX_TOTAL else None


_MULTI_TELLERS = {"multi_more": _tell_more, "multi_new_colour": _tell_new_colour,
                  "multi_same_shape": _tell_same_shape, "multi_total": _tell_total}


def follow_up_questions(scenes: list, rng: random.Random, skip: str | None = None) -> list[tuple[str, str, str]]:
    """(family, question, answer) for each multi-image family but `skip` that the drawn `scenes`
    answer with exactly one answer, in random order: the follow-up turns of `questions="all"`."""
    families = [f for f in MULTI_FAMILIES if f != skip]
    rng.shuffle(families)
    told = [(family, _MULTI_TELLERS[family](scenes, rng)) for family in families]
    return [(family, *qa) for family, qa in told if qa is not None]


_MULTI_ASKERS = {"multi_more": _ask_more, "multi_new_colour": _ask_new_colour,
                 "multi_same_shape": _ask_same_shape, "multi_total": _ask_total}


def can_ask_multi(family: str, slots: Slots) -> bool:
    """Whether `ask_multi(family, slots, rng)` can draw the missing images so that its question
    has one answer: there must be a missing image, and the drawn ones must be able to fix it."""
    if family not in _MULTI_ASKERS or len(slots) < 2 or None not in slots:
        return False
    if family == "multi_more":
        return bool(_unique_max_counts(slots))
    if family == "multi_same_shape":
        return bool(_same_shape_pairs(slots))
    if family == "multi_total":
        return sum(len(scene) for scene in slots if scene is not None) + slots.count(None) <= MAX_TOTAL
    return True


def ask_multi(family: str, slots: Slots, rng: random.Random) -> tuple[tuple, str, str]:
    """(scenes, question, canonical answer) for a question of `family` about 2 to 4 images:
    `slots` holds one scene per image, None for each image still to be drawn, and the drawn
    ones are made to give the question exactly one answer. Images are named by ordinal words
    in the order of their markers ("the second image"); answers are an ordinal, a colour,
    yes/no or a digit."""
    if family not in _MULTI_ASKERS:
        raise ValueError(f"unknown multi-image question family {family!r}: use one of {', '.join(MULTI_FAMILIES)}")
    if not 2 <= len(slots) <= len(ORDINALS):
        raise ValueError(f"a multi-image question is about 2 to {len(ORDINALS)} images, not {len(slots)}")
    if not can_ask_multi(family, slots):
        sizes = [len(scene) if scene is not None else None for scene in slots]
        raise ValueError(f"no {family} question with one answer for images of {sizes} objects (None: to draw)")
    scenes, question, answer = _MULTI_ASKERS[family](slots, rng)
    return tuple(scenes), question, answer


def _and_list(items: list[str], last: str = "and") -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + f" {last} " + items[-1]


# Where a single-turn question's k images go: each returns the human turn. The markers stand
# in image order; a marker that starts a line is followed by "\n", as in the single-image
# records, and one mid-sentence by the sentence.
IMAGE_LAYOUTS = {
    "before": lambda question, k: "<image>\n" * k + question,
    "labelled": lambda question, k: "".join(f"Image {i}: <image>\n" for i in range(1, k + 1)) + question,
    "after": lambda question, k: question + "\n<image>" * k,
    "labelled_after": lambda question, k: question + "".join(f"\nImage {i}: <image>" for i in range(1, k + 1)),
    "inline": lambda question, k: f"Compare {_and_list(['<image>'] * k, 'with' if k == 2 else 'and')}. {question}",
}


def _human(value: str) -> dict:
    return {"from": "human", "value": value}


def _gpt(value: str) -> dict:
    return {"from": "gpt", "value": value}


def _multi_question(rng: random.Random) -> tuple[tuple, list[dict], list[str]]:
    # One turn: 2 to 4 images laid out by one of IMAGE_LAYOUTS, and one multi-image question.
    k = rng.randint(2, len(ORDINALS))
    family = rng.choice(MULTI_FAMILIES)
    scenes, question, answer = ask_multi(family, [None] * k, rng)
    layout = IMAGE_LAYOUTS[rng.choice(sorted(IMAGE_LAYOUTS))]
    return scenes, [_human(layout(question, k)), _gpt(answer)], [family]


def _multi_chat(rng: random.Random) -> tuple[tuple, list[dict], list[str]]:
    # Turn 1: one image and an ordinary single-image question; each later turn (one, or two
    # with P_THIRD_IMAGE) brings one more image and asks about all images so far.
    first = generate_scene(rng)
    pool = [f for f in FAMILIES if can_ask(f, first)]
    family = rng.choices(pool, weights=[FAMILY_WEIGHTS[f] for f in pool])[0]
    question, answer = ask(family, first, rng)
    scenes, families = (first,), [family]
    conversations = [_human("<image>\n" + question), _gpt(answer)]
    for _ in range(2 if rng.random() < P_THIRD_IMAGE else 1):
        slots = [*scenes, None]
        family = rng.choice([f for f in MULTI_FAMILIES if can_ask_multi(f, slots)])
        scenes, question, answer = ask_multi(family, slots, rng)
        conversations += [_human(rng.choice(NEW_IMAGE_TURNS).format(question=question)), _gpt(answer)]
        families.append(family)
    return scenes, conversations, families


class MultiExample(NamedTuple):
    scenes: tuple  # tuple[Scene, ...], one per image, in marker order
    images: list  # PIL images, in marker order
    record: dict  # the one LLaVA JSON record; its "image" lists the images' paths in marker order


def make_multi_example(index: int, seed: int, split: str, image_size: int = 64, jitter: float = 1.0,
                       questions: str = "mixed") -> MultiExample:
    """Multi-image example `index`, all from `multi_rng(split, seed, index)`: a single question
    about 2 to 4 images placed anywhere in the text, or (P_MULTI_CHAT) a chat whose later turns
    bring more images. With `questions="all"` the chat goes on, with no new image, to every other
    multi-image family the images answer (`follow_up_questions`): more supervision per image drawn,
    as "all" gives single-image examples. Its images are `images/{split}_{index:06d}_{k}.png`,
    k = 1, 2, ... in marker order. The record's `task` is its one family or "multi_turn" (with
    `turn_tasks`). Text is drawn before pixels, so it depends on neither `image_size` nor `jitter`."""
    rng = multi_rng(split, seed, index)
    scenes, conversations, families = _multi_chat(rng) if rng.random() < P_MULTI_CHAT else _multi_question(rng)
    if questions == "all":
        for family, question, answer in follow_up_questions(list(scenes), rng, skip=families[-1]):
            conversations += [_human(question), _gpt(answer)]
            families.append(family)
    images = [render(scene, image_size, rng, jitter) for scene in scenes]
    task = families[0] if len(families) == 1 else "multi_turn"
    record = {"id": f"{split}-{index:06d}-{task}",
              "image": [f"images/{split}_{index:06d}_{k}.png" for k in range(1, len(scenes) + 1)], "task": task}
    if task == "multi_turn":
        record["turn_tasks"] = families
    record["conversations"] = conversations
    return MultiExample(scenes, images, record)
