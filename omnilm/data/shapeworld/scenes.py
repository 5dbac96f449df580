"""Scenes and pixels: the ShapeWorld vocabulary, the scene model, the renderer and the caption.

A scene is 1 to 4 objects (shape, colour, size) in distinct cells of a 3x3 grid, in reading
order; `render` draws it with PIL and `caption` says it in words.

    scene = generate_scene(rng)               # tuple of Obj, in reading order
    image = render(scene, IMAGE_SIZE, rng)    # PIL RGB image
    text  = caption(scene)                    # "a large red circle at the top left and ..."

Determinism: example `index` of `split` under `seed` draws from one generator,
`example_rng(split, seed, index)`, and nothing else (no global state, no hash randomisation:
Python seeds from a str through SHA-512). So the same (split, seed, index) gives byte-identical
PNG and text in any process, and train and test never share a generator stream. `render` draws
the same numbers at every image size and jitter, so what is drawn after it does not depend on
either. The world is small: a single-object scene has only 540 possible contents, so test
*scenes* can also occur in train (with other jitter, tint and questions); 3- and 4-object
scenes are practically all new.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from omnilm.errors import OmniInputError

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = ("small", "large")
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")

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
# Which image, in multi-image answers (at most 4 images).
ORDINALS = ("first", "second", "third", "fourth")
# Every canonical answer: what the VQA scorer compares a normalised prediction with. Counts
# above 4 and ordinals come from multi-image questions only.
ANSWERS = frozenset(COLOURS + SHAPES + CELLS + ("yes", "no") + tuple("0123456789") + ORDINALS)

# The one default world, the demo's: the tiny preset's input size, so images go in as drawn.
MAX_OBJECTS = 4  # a scene holds 1 to this many objects
IMAGE_SIZE = 96
# Shapes near their cell's centre, as the tiny ViT sees each cell as one 32 px patch and is not
# translation-invariant inside it (docs/shapeworld-recipe.md, "Second round").
JITTER = 0.25


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
    n = n_objects if n_objects is not None else rng.randint(1, MAX_OBJECTS)
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


def render(scene: Scene, image_size: int = IMAGE_SIZE, rng: random.Random | None = None,
           jitter: float = JITTER) -> Image.Image:
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


def article(word: str) -> str:
    """The indefinite article before `word`, one of the world's words: "an orange", "a red"."""
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene) -> str:
    """Every object with size, colour, shape and position, in reading order:
    "a large red circle at the top left, a small blue square at the center and a ... ."."""
    parts = [f"a {o.size} {o.colour} {o.shape} at the {o.position}" for o in scene]
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return body + "."
