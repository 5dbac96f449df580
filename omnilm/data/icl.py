"""In-context learning episodes on ShapeWorld: new words for what the model sees, from the prompt alone.

Frozen's fast concept binding (Tsimpoukelli et al. 2021) in ShapeWorld's world. An episode picks
an attribute (colour or shape) and N of its values, binds N nonsense words to them, drawn afresh
for every episode, shows k single-object images of each value with its word, then asks for the
word of one more. Each shot is a turn of the chat, its word the answer, as in Chan et al.'s
sequences of (image, label) pairs, so that training supervises every one (the first of each word
a guess among the words named, every later one answerable from the prompt). Each turn asks for the
attribute the instruction names (an ambiguous episode, "What is the object?"; with `ask=False`,
"What is this?", as the first lessons of `omnilm demo-icl` do). With `describe`, each answer first
names what its image shows, then gives the word: the model says what it sees, and the word is then
a look-up in text (`omnilm eval icl` has the model name each shot's image itself, so that the
prompt holds only images and words):

    USER: The words dax and blicket name colours.
          <image> What colour?    ASSISTANT: red blicket
    USER: <image> What colour?    ASSISTANT: blue dax
    USER: <image> What colour?    ASSISTANT: ?    (the query: red blicket or blue dax)

The other attribute (and the size and cell) varies from image to image, so only the named
attribute carries the answer. Since a word's meaning changes between episodes, the answer can
come from the prompt alone (with no shots: chance, 1/N). Variants:

    novel      nonsense words (NOVEL_WORDS, or the HELD_OUT_WORDS no training record uses)
    real       the attribute's own names ("red", "circle"): the perception ceiling
    shuffled   the own names, each on another value's images: does the answer follow the prompt
               (the name the shots gave) or the image?
    ambiguous  nonsense words, the instruction says "colours or shapes", and each word's first
               shot differs from the others' in both attributes, as does the query, whose colour
               points to one word and whose shape to another: one shot each cannot tell them
               apart (chance), and only more shots, where the other attribute varies, can

An episode may end in several queries, one a turn, each after the answers before it.

The labels may also be capital letters (`words="letters"`), and an episode may show each object
in words instead of an image (`form="text"`: "purple square What is this?"): the first lessons
of `omnilm demo-icl`, where the look-up is learned on keys and labels that are easy to read and
write before it is asked of images and new words. How a word is read is the tokenizer's business:
the recipe gives each word one token whose rows never train (`Tokenizer.add_words`,
`OmniModel.add_tokens`); any other tokenizer splits it into pieces. No word is part of a word the
chats use, so none is a piece of a BPE trained on them. An episode's words start with
different letters, so that even a word's first piece tells which it is.

Images come from a pool of single-object images per split (`pool_path`), drawn once and shared by
the episodes, so that a frozen vision tower's features can be cached. Determinism: episode
`index` of `split` under `seed` draws from one generator, `icl_rng`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from omnilm.data.llava_json import write_records
from omnilm.data.shapeworld.scenes import CELLS, COLOURS, IMAGE_SIZE, JITTER, SHAPES, SIZES, Obj, render
from omnilm.errors import OmniInputError
from omnilm.settings import check_range, check_seed, setting

ATTRIBUTES = ("colour", "shape")
VALUES = {"colour": COLOURS, "shape": SHAPES}
PLURAL = {"colour": "colours", "shape": "shapes"}
VARIANTS = ("novel", "real", "shuffled", "ambiguous")
WORD_SETS = ("train", "held-out", "letters")
FORMS = ("image", "text")
MAX_SHOTS = 16


def _nonsense_words(n: int) -> list[str]:
    # Two syllables, consonant-vowel each, and maybe a closing consonant: "dabek", "tovi". None is
    # part of a word the chats use ("mage" of "image"), which a BPE trained on them may hold as a
    # piece: a word given a token of its own (Tokenizer.add_words) must be new to the tokenizer.
    rng = random.Random("omnilm-icl-words")
    onsets, vowels, codas = "bdfgklmnprstvz", "aeiou", ("", "", "k", "n", "x")
    words: dict[str, None] = {}
    while len(words) < n:
        word = "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(2)) + rng.choice(codas)
        if not any(word in used for used in _CHAT_WORDS):
            words[word] = None
    return list(words)


# The episodes' words, the demo's system prompt's, and ShapeWorld's questions' and answers'.
_CHAT_WORDS = frozenset("""the words name colours shapes or what is this answer about image describe objects above
    below left right center centre top bottom circles crosses diamonds squares triangles purple orange yellow
    green blue red large small there where many how are yes no""".split())


# Many words, each rare in training (Chan et al.: many rare classes favour in-context learning).
_WORDS = _nonsense_words(4608)
NOVEL_WORDS = tuple(_WORDS[:4096])  # what training episodes draw from
HELD_OUT_WORDS = tuple(_WORDS[4096:])  # never in a training record: the evaluation's default
ALL_WORDS = NOVEL_WORDS + HELD_OUT_WORDS
# Capital letters as the labels of the first lessons (omnilm.recipes.icl): BPE's own tokens, whose
# rows train, so that the model learns the look-up before it has to copy a word whose rows never do.
LETTERS = tuple("BCEFGKLMNPRSVXYZ")


# --- the image pool -----------------------------------------------------------------------------


class PoolImage(NamedTuple):
    path: str  # relative to the data folder
    obj: Obj


def pool_path(split: str, index: int) -> str:
    return f"images/icl_{split}_{index:05d}.png"


def pool_scene(split: str, seed: int, index: int) -> Obj:
    """The object on pool image `index`: colours and shapes in turn (every pair equally often), size
    and cell at random."""
    rng = random.Random(f"icl-pool:{split}:{seed}:{index}")
    return Obj(SHAPES[(index // len(COLOURS)) % len(SHAPES)], COLOURS[index % len(COLOURS)], rng.choice(SIZES),
               rng.randrange(len(CELLS)))


def write_pool(out: Path, split: str, seed: int, n: int, image_size: int = IMAGE_SIZE) -> list[PoolImage]:
    """`n` single-object images of `split` under `out/images/` (kept where already drawn)."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    pool = []
    for index in range(n):
        obj, path = pool_scene(split, seed, index), pool_path(split, index)
        if not (out / path).is_file():
            rng = random.Random(f"icl-render:{split}:{seed}:{index}")
            render((obj,), image_size, rng, JITTER).save(out / path, format="PNG")
        pool.append(PoolImage(path, obj))
    return pool


# --- one episode --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Episode:
    """What an episode is drawn as; `make_episode` draws it as a LLaVA record."""

    attribute: str  # colour or shape
    ways: int  # N words, N values
    shots: int  # examples per word before the query
    variant: str = "novel"
    words: str = "train"  # which labels: the train or held-out nonsense words, or letters
    queries: int = 1  # questions, one a turn
    form: str = "image"  # image, or text: each image replaced by its object's colour and shape in words
    ask: bool = True  # each turn asks for the attribute named ("What colour?"); False: "What is this?"
    describe: bool = False  # each answer names what its image shows, then the word: "red blicket"


def turn_question(attribute: str | None, ask: bool = True) -> str:
    """What each turn asks: the attribute (None: an ambiguous episode's either), or with `ask=False`
    "What is this?". Asking for an attribute takes three tokens, so that 5-way 8 shots with each
    answer described (41 images) comes to 893 tokens with the demo's tokenizer, 1,018 ambiguous."""
    if not ask:
        return "What is this?"
    return f"What {attribute}?" if attribute else "What is the object?"


def episode_attributes(attribute: str, variant: str) -> tuple[str, ...]:
    """The attributes an episode turns on, in order: the one it binds, or both for an ambiguous
    episode (whose question asks for either). A described answer names these before the word."""
    return ATTRIBUTES if variant == "ambiguous" else (attribute,)


def icl_rng(split: str, seed: int, index: int) -> random.Random:
    return random.Random(f"icl:{split}:{seed}:{index}")


def make_episode(rng: random.Random, by_value: dict[tuple[str, str], list[PoolImage]], episode: Episode,
                 record_id: str) -> dict:
    """A LLaVA record of `episode`, its images from `by_value` ((colour, shape) -> pool images).
    Its "icl" field says what was drawn: the attribute, the values, the labels given to them, the
    answers (the label the prompt gave each query's value) and, for `shuffled`, each query's true
    name."""
    attribute, n = episode.attribute, episode.ways
    other = "shape" if attribute == "colour" else "colour"
    values = rng.sample(VALUES[attribute], n)
    if episode.variant in ("novel", "ambiguous"):
        words = {"train": NOVEL_WORDS, "held-out": HELD_OUT_WORDS, "letters": LETTERS}[episode.words]
        labels = rng.sample(words, n)
        while len({label[0] for label in labels}) < n:  # distinct first letters: the first piece tells
            labels = rng.sample(words, n)
    elif episode.variant == "real":
        labels = list(values)
    else:  # shuffled: every value named by another's name (a derangement), so no answer is its own name
        labels = list(values)
        while any(label == value for label, value in zip(labels, values)):
            rng.shuffle(labels)
    ambiguous = episode.variant == "ambiguous"
    confound = rng.sample(VALUES[other], n) if ambiguous else None  # word i's first shot: values[i], confound[i]

    def image(value: str, other_value: str | None = None) -> PoolImage:
        pair = {attribute: value, other: other_value or rng.choice(VALUES[other])}
        return rng.choice(by_value[pair["colour"], pair["shape"]])

    shots = [(i, image(values[i], confound[i] if ambiguous and r == 0 else None))
             for r in range(episode.shots) for i in range(n)]
    if ambiguous:  # first shots in order of words, then the rest shuffled: the confound stays in round 0
        first, rest = shots[:n], shots[n:]
        rng.shuffle(first)
        rng.shuffle(rest)
        shots = first + rest
    else:
        rng.shuffle(shots)
    asked, query_images = [], []
    for _ in range(episode.queries):
        i = rng.randrange(n)
        # An ambiguous query's other attribute is another word's first shot's: the two readings disagree.
        misleading = confound[rng.choice([j for j in range(n) if j != i])] if ambiguous else None
        asked.append(i)
        query_images.append(image(values[i], misleading))

    kinds = "colours or shapes" if ambiguous else PLURAL[attribute]
    order = rng.sample(labels, n)  # the instruction lists the words in an order of its own
    named = " and ".join(order) if n == 2 else ", ".join(order[:-1]) + " and " + order[-1]
    seen = [item for _, item in shots] + query_images
    ask = turn_question(None if ambiguous else attribute, episode.ask)
    described = episode_attributes(attribute, episode.variant)
    turns = []
    for k, (i, item) in enumerate(zip([i for i, _ in shots] + asked, seen)):
        shown = "<image>" if episode.form == "image" else f"{item.obj.colour} {item.obj.shape}"
        question = f"The words {named} name {kinds}.\n{shown} {ask}" if k == 0 else f"{shown} {ask}"
        shows = " ".join(getattr(item.obj, a) for a in described)
        answer = f"{shows} {labels[i]}" if episode.describe else labels[i]
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    info = {"attribute": attribute, "ways": n, "shots": episode.shots, "variant": episode.variant,
            "words": episode.words, "form": episode.form, "describe": episode.describe, "values": values,
            "labels": labels, "answers": [labels[i] for i in asked], "names": [values[i] for i in asked]}
    images = {"image": [item.path for item in seen]} if episode.form == "image" else {}
    return {"id": record_id, "task": "icl", **images, "conversations": turns, "icl": info}


def index_pool(pool: Sequence[PoolImage]) -> dict[tuple[str, str], list[PoolImage]]:
    by_value: dict[tuple[str, str], list[PoolImage]] = {}
    for item in pool:
        by_value.setdefault((item.obj.colour, item.obj.shape), []).append(item)
    missing = [f"{c} {s}" for c in COLOURS for s in SHAPES if (c, s) not in by_value]
    if missing:
        raise OmniInputError(f"the image pool has no {missing[0]}: give at least {len(COLOURS) * len(SHAPES)} "
                             "pool images")
    return by_value


# --- files ----------------------------------------------------------------------------------------


def _ints(values, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in values)
    except (TypeError, ValueError):
        raise OmniInputError(f"--{name} {values!r}: give whole numbers, comma-separated") from None


@dataclass(kw_only=True)
class IclSpec:
    """What `omnilm data icl` writes: episodes, each drawn at random from the lists given."""

    out: Path = setting(help="folder for <split>.json and images/", positional=True)
    n: int = setting(1000, "number of episodes")
    seed: int = setting(0, "seed of the episodes and of the image pool")
    split: str = setting("train", "train or test: each has its own image pool and episodes")
    attributes: tuple[str, ...] = setting(ATTRIBUTES, "what the words name: colour, shape, or both (comma-"
                                                      "separated, one drawn per episode)")
    ways: tuple[int, ...] = setting((2, 3, 4, 5), "words per episode, comma-separated (at most 6 colours or 5 "
                                                  "shapes), one drawn per episode")
    shots: tuple[int, ...] = setting((0, 1, 2, 3, 4, 5, 6, 7, 8), "examples of each word before the question, "
                                                                  f"comma-separated (0 to {MAX_SHOTS})")
    variants: tuple[str, ...] = setting(("novel",), "novel (nonsense words), real (the attribute's names), shuffled "
                                                    "(the names on the wrong values) or ambiguous (each word's "
                                                    "first shot differs in colour and shape), comma-separated")
    words: str = setting("train", "labels: the nonsense words of training (train), the ones no training record "
                                  "uses (held-out), or capital letters (letters)", choices=WORD_SETS)
    form: str = setting("image", "image, or text: each image replaced by its object's colour and shape in words "
                                 "(no images)", choices=FORMS)
    queries: int = setting(1, "questions per episode, one a turn, each after the answers before it")
    ask: bool = setting(True, "each turn asks for the attribute the instruction names ('What colour?'; an "
                              "ambiguous episode's, 'What is the object?'); --no-ask: 'What is this?'")
    describe: bool = setting(False, "each answer names what its image shows, then the word ('red dax')")
    pool: int = setting(3000, "single-object images the episodes draw from")
    image_size: int = setting(IMAGE_SIZE, "pixels per side of the images")

    def __post_init__(self) -> None:
        check_seed(self)
        check_range(self, ("n", "queries"), low=1)
        check_range(self, ("pool",), low=len(COLOURS) * len(SHAPES))
        self.ways, self.shots = _ints(self.ways, "ways"), _ints(self.shots, "shots")
        self.attributes, self.variants = tuple(self.attributes), tuple(self.variants)
        for name, given, allowed in (("attributes", self.attributes, ATTRIBUTES),
                                     ("variants", self.variants, VARIANTS)):
            bad = [v for v in given if v not in allowed]
            if bad or not given:
                raise OmniInputError(f"--{name} {','.join(given)}: choose from {', '.join(allowed)}")
        if self.words not in WORD_SETS:
            raise OmniInputError(f"--words {self.words!r}: choose train, held-out or letters")
        if self.form not in FORMS:
            raise OmniInputError(f"--form {self.form!r}: choose image or text")
        most = min(len(VALUES[a]) for a in (ATTRIBUTES if "ambiguous" in self.variants else self.attributes))
        if not self.ways or not all(2 <= w <= most for w in self.ways):
            raise OmniInputError(f"--ways {','.join(map(str, self.ways))}: give 2 to {most} words per episode "
                                 f"(there are {len(COLOURS)} colours and {len(SHAPES)} shapes, and an ambiguous "
                                 "episode needs as many of both)")
        if not self.shots or not all(0 <= k <= MAX_SHOTS for k in self.shots):
            raise OmniInputError(f"--shots {','.join(map(str, self.shots))}: give 0 to {MAX_SHOTS} examples per word")
        if self.split not in ("train", "test"):
            raise OmniInputError(f"--split {self.split!r}: use train or test")

    def write(self, progress: bool = True) -> Path:
        return write_icl(self, progress)


def draw_episode(spec: IclSpec, rng: random.Random) -> Episode:
    """One episode's settings, drawn from `spec`'s lists."""
    return Episode(rng.choice(spec.attributes), rng.choice(spec.ways), rng.choice(spec.shots),
                   rng.choice(spec.variants), spec.words, spec.queries, spec.form, spec.ask, spec.describe)


def write_icl(spec: IclSpec, progress: bool = True) -> Path:
    """Write `spec.n` episodes to `spec.out/icl_{split}.json` and the image pool under `spec.out/images/`."""
    from tqdm import tqdm

    out = Path(spec.out)
    by_value = index_pool(write_pool(out, spec.split, spec.seed, spec.pool, spec.image_size))
    records = []
    for index in tqdm(range(spec.n), desc=f"icl {spec.split}", unit="episode", disable=not progress or spec.n < 1000):
        rng = icl_rng(spec.split, spec.seed, index)
        records.append(make_episode(rng, by_value, draw_episode(spec, rng), f"icl-{spec.split}-{index:06d}"))
    path = out / f"icl_{spec.split}.json"
    write_records(path, records)
    return path
