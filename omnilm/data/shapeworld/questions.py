"""Single-image questions: one generator per family, each question with one exact answer.

    q, a = ask("colour", scene, rng)    # ("What colour is the circle?", "red")

Answers are short and canonical (lower case, no final punctuation, counts as digits), so
exact-match accuracy is a real, repeatable number. A question names its object with words that
pick it out alone in the scene (`refer`), never with the attribute it asks about.
"""

from __future__ import annotations

import itertools
import random

from omnilm.data.shapeworld.scenes import COLOURS, PLURALS, SHAPES, Obj, Scene, article

FAMILIES = ("colour", "shape", "count", "position", "existence", "spatial")
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

P_SINGLE_TURN = 0.4
# Spatial needs two objects (3 scenes in 4); a heavier weight keeps the families balanced.
FAMILY_WEIGHTS = {"colour": 1.0, "shape": 1.0, "count": 1.0, "position": 1.0, "existence": 1.0, "spatial": 1.5}


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
    question = rng.choice(TEMPLATES["existence"]).format(article=article(colour), colour=colour, shape=shape)
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


def subject(family: str, question: str, scene: Scene) -> Obj | None:
    """The object a colour, shape or position `question` about `scene` asks about: the one whose
    words it uses. None for the other families, which ask about no single object."""
    refs = {"colour": _REF_BY_SHAPE, "shape": _REF_BY_COLOUR, "position": _REF_NO_CELL}.get(family)
    if refs is None:
        return None
    return next((o for o in scene if question in {t.format(ref=refer(o, scene, refs)) for t in TEMPLATES[family]}),
                None)


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
