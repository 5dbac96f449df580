"""Multi-image examples: 2 to 4 images in one record, and questions that need several of them.

    example = make_multi_example(index, seed, split)   # scenes, images, one LLaVA record

Each image marker stands where a template puts it (before or after the question, mid-sentence,
labelled "Image 1: <image>"). The questions ask which image has the most shapes, which colour
is new in one image, whether two images hold the same shape, how many shapes there are in all
(families `MULTI_FAMILIES`, answers an ordinal, a colour, yes/no or a digit). Some examples are
chats whose first turn asks an ordinary question about one image and whose later turns each
bring one more image; with `questions="all"` each goes on with every other multi-image family
its images answer (`follow_up_questions`).

A multi-image question is built together with its images: the images a record already has stay
as they are (a chat's earlier turns), and the missing ones (None in `slots`) are drawn so that
the question has exactly one answer (a unique largest count, exactly one new colour,
single-object images where shapes are compared, a total of at most 9). Task names carry a
"multi_" prefix so per-task tables keep them apart from the single-image families.

Which indices are multi-image is decided by `is_multi_image`, from a generator of its own, and
a multi-image example draws from `multi_rng(split, seed, index)`, so the single-image examples
come out exactly as without them.
"""

from __future__ import annotations

import itertools
import random
from typing import NamedTuple

from omnilm.data.shapeworld.questions import FAMILIES, FAMILY_WEIGHTS, ask, can_ask
from omnilm.data.shapeworld.scenes import (COLOURS, IMAGE_SIZE, JITTER, ORDINALS, PLURALS, SHAPES, SIZES, Obj, Scene,
                                           generate_scene, render)

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


def make_multi_example(index: int, seed: int, split: str, image_size: int = IMAGE_SIZE, jitter: float = JITTER,
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
