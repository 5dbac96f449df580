"""Needle in a haystack on ShapeWorld: facts hidden at a chosen depth of a long prompt, asked for after it.

Long-context retrieval as Gemini 1.5 measured it (arXiv 2403.05530, section 5.2.1) and RULER
varied it, in ShapeWorld's words, so that a small model trained on ShapeWorld knows every word
of the haystack and only the needle is new:

    filler    captions of random scenes: "a large red circle at the top left and a small ..."
    needle    "remember: <key> is <colour> <shape>." with a nonsense key drawn per record
    question  "What is <key>?"  ->  "<colour> <shape>"

Several keys make the unasked ones distractors (RULER's multi-key needles). Several questions
make a multi-turn chat: the haystack and the first question in the first human turn, one more
question per turn, each answered in its own gpt turn. That is LLaVA's multi-turn form: `omnilm
eval` scores it turn by turn, and training supervises every answer of a sequence (dense
supervision, as MQAR in the Zoology paper). Image needles put F ShapeWorld images among the
filler, labelled "Image 1:", "Image 2:", ..., one of them showing the only shape of its kind (or
the only one of its colour) in the prompt, and ask about it: "In the images, what colour is the
triangle?" -> "red", "In the images, what shape is the green one?" -> "square", answers exact
match scores. Several questions ask about several such images, each unique in its own way. For
models that never saw ShapeWorld (a Hugging Face LLaMA), the filler can be plain English
sentences from a small built-in vocabulary instead.

Lengths are counted as the model reads them (`TokenCount`): the chat rendered with the template
and system prompt, tokenized with BOS, each image as `image_seq_len` tokens; without a tokenizer,
characters / CHARS_PER_TOKEN, an estimate. A haystack is filled with whole sentences, then with
the words of one more, each step measured on the whole prompt, so it ends at the budget or less
than one word short of it. Depth is where a needle sits in the filler, by tokens: 0 its start, 1
its end (just before the question). Needles go between sentences, at the boundary nearest the
asked depth; with D depths, the prompts of one length differ only in where the needle is.

Keys are pronounceable nonsense ("tovadik"), so the answer can only come from the prompt. One
key in TEST_KEY_SHARE (by a CRC of the key, the same in every process) is held out: split "test"
draws only those, every other split none, so a model is never tested on a key it trained on.

Determinism: record `index` of `split` under `seed` draws from one generator (`haystack_rng`), as
ShapeWorld's examples do; the needles, their depths and their images are drawn before the filler,
so the tokenizer (which decides how much filler is drawn) changes only the filler.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from PIL import Image

from omnilm.data.chat import render_chat
from omnilm.data.llava_json import write_records
from omnilm.data.shapeworld.scenes import (CELLS, COLOURS, IMAGE_SIZE, MAX_OBJECTS, SHAPES, SIZES, Scene, caption,
                                           generate_scene, render)
from omnilm.data.tokenizer import IMAGE_TOKEN, Tokenizer
from omnilm.errors import OmniInputError
from omnilm.settings import check_range, check_seed, setting

NEEDLES = ("text", "image")
FILLERS = ("shapeworld", "english")
CHARS_PER_TOKEN = 4  # the length unit without a tokenizer: about a LLaMA token of English
TEST_KEY_SHARE = 10  # one key in 10 is held out for split "test"

# Keys: two or three consonant-vowel syllables and maybe a closing consonant ("tovadik", "brelu").
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "gl", "kr", "pl", "st", "tr")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "", "k", "l", "n", "r", "s", "t")

# English filler: subject, verb, object, place; 4,096 sentences with no colour or shape in them.
_ENGLISH = (
    ("The farmer", "A traveller", "The old teacher", "My neighbour", "The young painter", "A quiet student",
     "The baker", "Our captain"),
    ("carried", "found", "mended", "watched", "described", "sold", "borrowed", "cleaned"),
    ("a wooden chair", "the morning paper", "an old map", "a basket of apples", "the kitchen clock", "a long letter",
     "the garden gate", "a fishing net"),
    ("near the river.", "in the market.", "after breakfast.", "before the storm.", "at the station.", "on the hill.",
     "during the winter.", "by the harbour."),
)
_FILLER_WORDS = frozenset(
    [word.strip(".").lower() for part in _ENGLISH for phrase in part for word in phrase.split()]
    + [word for phrase in (*COLOURS, *SHAPES, *SIZES, *CELLS) for word in phrase.split()] + ["and", "at", "the"])

MAX_IMAGE_QUESTIONS = 3  # image needles asked per prompt: each asked property leaves others for the rest
NEEDLE_HELP = ("text: 'remember: <key> is <colour> <shape>.' asked as 'What is <key>?'; image: --images ShapeWorld "
               "images, one holding the only shape of its kind (or colour), asked 'In the images, what colour is "
               "the triangle?' (or '... what shape is the red one?')")
OBJECTS_HELP = f"shapes per image with --needle image, 1 to {MAX_OBJECTS} (default: 1 to {MAX_OBJECTS} at random)"
# A needle object is the only one with its shape (asked for its colour) or its colour (asked for its shape).
# "In the images": the filler's captions name shapes and colours too.
IMAGE_QUESTIONS = {"shape": "In the images, what colour is the {value}?",
                   "colour": "In the images, what shape is the {value} one?"}


# --- keys and filler --------------------------------------------------------------------------


def haystack_rng(split: str, seed: int, index: int) -> random.Random:
    """The one generator behind record `index` of `split` under `seed`."""
    return random.Random(f"haystack:{split}:{seed}:{index}")


def key_split(key: str) -> str:
    """"test" for the held-out keys (one in TEST_KEY_SHARE), else "train"."""
    return "test" if zlib.crc32(key.encode()) % TEST_KEY_SHARE == 0 else "train"


def draw_keys(rng: random.Random, n: int, split: str) -> list[str]:
    """`n` distinct keys of `split`'s share (see `key_split`), none of them a filler word."""
    held_out = split == "test"
    keys: list[str] = []
    while len(keys) < n:
        syllables = rng.randint(2, 3)
        key = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)) + rng.choice(_CODAS)
        if (key_split(key) == "test") == held_out and key not in keys and key not in _FILLER_WORDS:
            keys.append(key)
    return keys


def filler_sentence(rng: random.Random, filler: str = "shapeworld") -> str:
    """One sentence of filler: a random scene's caption, or an English sentence."""
    if filler == "shapeworld":
        return caption(generate_scene(rng))
    if filler == "english":
        return " ".join(rng.choice(part) for part in _ENGLISH)
    raise ValueError(f"unknown filler {filler!r}: use one of {', '.join(FILLERS)}")


# --- lengths ----------------------------------------------------------------------------------


class TokenCount:
    """How long a chat is for the model: `tokenizer`'s ids of the chat rendered with the template
    and the tokenizer's system prompt, BOS included, each image as `image_seq_len` tokens (what
    `Processor` feeds `generate` and what `LlavaDataset` trains on). Without a tokenizer, the
    rendered characters / CHARS_PER_TOKEN plus the images' tokens: an estimate."""

    def __init__(self, tokenizer: Tokenizer | None, image_seq_len: int = 1, system_prompt: str | None = None):
        self.tokenizer = tokenizer
        self.image_seq_len = image_seq_len
        # The tokenizer's own system prompt; without a tokenizer, `system_prompt` (None: Vicuna's).
        self.system = tokenizer.system_prompt if tokenizer is not None else system_prompt

    def text(self, text: str) -> int:
        """Tokens of a piece of text inside a prompt (no BOS)."""
        if self.tokenizer is None:
            return math.ceil(len(text) / CHARS_PER_TOKEN)
        return len(self.tokenizer.encode(text, add_bos=False))

    def chat(self, turns: list[dict], add_generation_prompt: bool) -> int:
        """Tokens of the whole chat, images expanded."""
        prompt, _ = render_chat(turns, add_generation_prompt, self.system)
        if self.tokenizer is None:
            n_images = prompt.count(IMAGE_TOKEN)
            text_chars = len(prompt) - n_images * len(IMAGE_TOKEN)
            return math.ceil(text_chars / CHARS_PER_TOKEN) + n_images * self.image_seq_len
        ids = self.tokenizer.encode(prompt)
        return len(ids) + ids.count(self.tokenizer.image_token_id) * (self.image_seq_len - 1)


# --- one haystack -----------------------------------------------------------------------------


class Haystack(NamedTuple):
    conversations: list[dict]  # LLaVA turns: the haystack and the first question in the first human turn
    images: list[Image.Image]  # in marker order
    scenes: list[Scene]  # what each image shows, in marker order
    answers: list[str]  # one per question, in order
    depths: list[float]  # where each asked needle sits in the filler (0 start, 1 end), in question order
    n_tokens: int  # the length as `TokenCount` counts it
    n_filler: int  # whole filler sentences


class _Needles(NamedTuple):
    pieces: list[str | None]  # a text needle's sentence, or None for an image (labelled by its place)
    depths: list[float]  # asked depth of each piece
    asked: list[int]  # the pieces the questions ask about, in question order
    questions: list[str]  # in question order
    answers: list[str]  # in question order
    images: list[Image.Image]  # one per None piece, in piece order
    scenes: list[Scene]  # what each image shows


def build_haystack(rng: random.Random, count: TokenCount, length: int, *, needle: str = "text", keys: int = 1,
                   questions: int = 1, depth: float | None = None, filler: str = "shapeworld", n_images: int = 4,
                   objects: int | None = None, split: str = "test", prompt: bool = False,
                   image_size: int = IMAGE_SIZE) -> Haystack:
    """A haystack of `length` tokens (as `count` counts them) with its questions and answers.

    Text needles: `keys` needles, `questions` of them asked (distinct, in random order). Image
    needles: `n_images` images of `objects` shapes each (default 1 to 4), `questions` of them
    (at most MAX_IMAGE_QUESTIONS) asked about. The first asked needle sits at `depth`, every
    other piece at a uniform random depth (also the first's when `depth` is None). `prompt`: the
    chat ends at its last question and is counted with the generation prompt, as `generate` reads
    it (with one question: the prompt `omnilm eval niah` asks); otherwise every turn is counted,
    answers included: a training record of `length` tokens. A `length` too short for the needles,
    questions and template raises OmniInputError.
    """
    if needle == "text":
        made = _text_needles(rng, keys, questions, split)
    else:
        made = _image_needles(rng, n_images, questions, objects, image_size)
    depths = [rng.random() for _ in made.pieces]
    if depth is not None:
        depths[made.asked[0]] = depth
    made = made._replace(depths=depths)
    sentences: list[str] = []
    costs: list[int] = []

    def assemble(k: int, tail: str = "") -> Haystack:
        # k whole sentences and the words in `tail`, measured on the whole chat.
        extra = [tail] if tail else []
        extra_costs = [count.text(" " + t) for t in extra]
        context, numbers, placed = _context(sentences[:k] + extra, costs[:k] + extra_costs, made)
        turns = _turns(context, made.questions, made.answers, prompt)
        order = sorted(numbers, key=numbers.get)  # image pieces in marker order
        return Haystack(turns, [made.images[i] for i in order], [made.scenes[i] for i in order], made.answers,
                        [placed[i] for i in made.asked], count.chat(turns, prompt), k)

    def draw(n: int) -> None:
        while len(sentences) < n:
            sentences.append(filler_sentence(rng, filler))
            costs.append(count.text(" " + sentences[-1]))

    base = assemble(0).n_tokens
    if base > length:
        what = "needle and question" if needle == "text" and keys == questions == 1 else "needles and questions"
        raise OmniInputError(f"length {length} is below the {base} tokens the {what} take with the chat template "
                             f"(no filler): ask for at least {base} tokens")
    # Whole sentences by their estimated costs, then corrected by measuring the whole prompt.
    k, room = 0, length - base
    draw(1)
    while costs[k] <= room:
        room -= costs[k]
        k += 1
        draw(k + 1)
    while k > 0 and assemble(k).n_tokens > length:
        k -= 1
    while assemble(k + 1).n_tokens <= length:
        k += 1
        draw(k + 1)
    # Then the most words of the next sentence that still fit (bisection: fewer words, fewer tokens).
    words = sentences[k].split()
    low, high = 0, len(words) - 1
    while low < high:
        mid = (low + high + 1) // 2
        if assemble(k, " ".join(words[:mid])).n_tokens <= length:
            low = mid
        else:
            high = mid - 1
    return assemble(k, " ".join(words[:low]))


def _text_needles(rng: random.Random, keys: int, questions: int, split: str) -> _Needles:
    names = draw_keys(rng, keys, split)
    values = [f"{rng.choice(COLOURS)} {rng.choice(SHAPES)}" for _ in names]
    asked = rng.sample(range(keys), questions)
    return _Needles([f"remember: {key} is {value}." for key, value in zip(names, values)], [], asked,
                    [f"What is {names[i]}?" for i in asked], [values[i] for i in asked], [], [])


def _image_needles(rng: random.Random, n_images: int, questions: int, objects: int | None,
                   image_size: int) -> _Needles:
    # Images 0 .. questions-1 are the needles: image i holds the one object in the prompt with
    # property i (a shape or a colour) and no object with another asked property; the rest hold
    # none. With at most MAX_IMAGE_QUESTIONS properties every kind keeps values to spare, so each
    # draw can succeed.
    if not 1 <= questions <= min(MAX_IMAGE_QUESTIONS, n_images):
        raise ValueError(f"{questions} image questions: ask 1 to {min(MAX_IMAGE_QUESTIONS, n_images)}")
    wanted: list[tuple[str, str]] = []
    while len(wanted) < questions:
        kind = rng.choice(("shape", "colour"))
        prop = (kind, rng.choice(SHAPES if kind == "shape" else COLOURS))
        if prop not in wanted:
            wanted.append(prop)

    def count(scene: Scene, prop: tuple[str, str]) -> int:
        return sum(getattr(obj, prop[0]) == prop[1] for obj in scene)

    def needle(i: int) -> Callable[[Scene], bool]:
        return lambda s: count(s, wanted[i]) == 1 and not any(count(s, p) for j, p in enumerate(wanted) if j != i)

    scenes = [_scene_where(rng, needle(i), objects) for i in range(questions)]
    scenes += [_scene_where(rng, lambda s: not any(count(s, p) for p in wanted), objects)
               for _ in range(n_images - questions)]
    images = [render(scene, image_size, rng) for scene in scenes]
    asked = rng.sample(range(questions), questions)
    asks, answers = [], []
    for i in asked:
        kind, value = wanted[i]
        obj = next(obj for obj in scenes[i] if getattr(obj, kind) == value)
        asks.append(IMAGE_QUESTIONS[kind].format(value=value))
        answers.append(obj.colour if kind == "shape" else obj.shape)
    return _Needles([None] * n_images, [], asked, asks, answers, images, scenes)


def _scene_where(rng: random.Random, ok: Callable[[Scene], bool], objects: int | None = None) -> Scene:
    while not ok(scene := generate_scene(rng, objects)):
        pass
    return scene


def _context(filler: list[str], costs: list[int], made: _Needles) -> tuple[str, dict[int, int], list[float]]:
    """The haystack text: `filler` with each piece at the sentence boundary nearest its depth (by
    `costs`, in tokens). Returns it, the number each image piece is labelled with (1, 2, ... in
    order of appearance) and where each piece sits (the share of filler tokens before it)."""
    cum = list(itertools.accumulate(costs, initial=0))
    total = cum[-1]
    spots = [_nearest(cum, d * total) for d in made.depths]
    order = sorted(range(len(made.pieces)), key=lambda i: (spots[i], made.depths[i], i))
    parts, numbers, j = [], {}, 0
    for i in order:
        parts += filler[j:spots[i]]
        j = spots[i]
        if made.pieces[i] is None:
            numbers[i] = len(numbers) + 1
            parts.append(f"Image {numbers[i]}: {IMAGE_TOKEN}")
        else:
            parts.append(made.pieces[i])
    parts += filler[j:]
    placed = [cum[s] / total if total else 0.0 for s in spots]
    return " ".join(parts), numbers, placed


def _nearest(cum: list[int], target: float) -> int:
    # The boundary (an index into the cumulative costs) closest to `target` tokens; ties go earlier.
    i = bisect.bisect_left(cum, target)
    if i == len(cum) or (i > 0 and target - cum[i - 1] <= cum[i] - target):
        return i - 1
    return i


def _turns(context: str, questions: list[str], answers: list[str], prompt: bool) -> list[dict]:
    turns = []
    for n, (question, answer) in enumerate(zip(questions, answers)):
        turns += [{"from": "human", "value": f"{context}\n{question}" if n == 0 else question},
                  {"from": "gpt", "value": answer}]
    return turns[:-1] if prompt else turns


# --- records and files ------------------------------------------------------------------------


def make_record(index: int, seed: int, split: str, count: TokenCount, length: int, *, needle: str = "text",
                **kwargs) -> tuple[dict, list[Image.Image]]:
    """Record `index` of `split` (a LLaVA record of `length` tokens, answers included) and its
    images; `kwargs` as `build_haystack`. Image paths are `images/{split}_{index:06d}_{k}.png`."""
    hay = build_haystack(haystack_rng(split, seed, index), count, length, needle=needle, split=split, **kwargs)
    record = {"id": f"{split}-{index:06d}-niah", "task": f"niah_{needle}", "n_tokens": hay.n_tokens,
              "depths": [round(d, 4) for d in hay.depths]}
    if hay.images:
        record["image"] = [f"images/{split}_{index:06d}_{k}.png" for k in range(len(hay.images))]
    record["conversations"] = hay.conversations
    return record, hay.images


@dataclass(kw_only=True)
class HaystackSpec:
    """What `omnilm data haystack` writes: needle-in-a-haystack records of a given length."""

    out: Path = setting(help="folder for <split>.json and images/", positional=True)
    n: int = setting(100, "number of records")
    seed: int = setting(0, "seed of the records")
    split: str = setting("train", "train, test, or any other name: each has its own records; test draws only "
                                  "held-out keys, every other split none of them")
    length: int = setting(512, "tokens per record, every turn and answer included (as a training run at that "
                               "max_seq_len reads it): tokens of --tokenizer, exact to less than a word; without "
                               "one, characters / 4, an estimate")
    tokenizer: Path | None = setting(None, "folder with the model's tokenizer.json (a checkpoint, or the demo's "
                                           "data/tokenizer) to count --length in")
    image_tokens: int = setting(9, "tokens each image takes in --length (default 9: the tiny preset's 96 px images "
                                   "in 32 px patches)")
    needle: str = setting("text", NEEDLE_HELP, choices=NEEDLES)
    keys: int = setting(1, "text needles per record, each with its own nonsense key")
    questions: int = setting(1, "needles asked per record, one a turn: a multi-turn chat whose every answer is "
                                "supervised; text: at most --keys; image: images each unique in its own way, at "
                                f"most {MAX_IMAGE_QUESTIONS}")
    images: int = setting(4, "images per record with --needle image", metavar="F")
    objects: int | None = setting(None, OBJECTS_HELP)
    depth: float | None = setting(None, "where the first asked needle sits, 0 (start of the filler) to 1 (end); "
                                        "default: uniform at random, as every other needle")
    filler: str = setting("shapeworld", "shapeworld: captions of random scenes; english: sentences from a small "
                                        "built-in vocabulary", choices=FILLERS)
    image_size: int = setting(IMAGE_SIZE, "pixels per side of the images")

    def __post_init__(self) -> None:
        check_choices(self)
        check_range(self, ("n", "length", "image_tokens", "keys", "questions"), low=1)
        check_range(self, ("depth",), 0, 1)
        check_seed(self)
        if not re.fullmatch(r"[a-z][a-z0-9_]*", str(self.split)):
            raise OmniInputError(f"--split {self.split!r} is not a plain name: use train or test (lower case "
                                 "letters, digits, _)")
        if self.needle == "text" and self.questions > self.keys:
            raise OmniInputError(f"--questions {self.questions} asks more keys than the --keys {self.keys} a record "
                                 "holds: ask at most --keys")
        if self.needle == "image":
            check_image_needles(self)
        if self.tokenizer is not None and not (Path(self.tokenizer) / "tokenizer.json").is_file():
            raise OmniInputError(f"--tokenizer {self.tokenizer} has no tokenizer.json: give a checkpoint or "
                                 "tokenizer folder")

    def write(self, progress: bool = True) -> Path:
        return write_haystack(self, progress)


def check_image_needles(settings) -> None:
    """`settings.images`, `.questions`, `.objects` and `.keys` make image needles that can be drawn."""
    if settings.keys != 1:
        raise OmniInputError("--keys is for text needles: image needles are images, set with --images")
    check_range(settings, ("images",), low=2, what=": one needle image and at least one other")
    check_range(settings, ("questions",), 1, min(MAX_IMAGE_QUESTIONS, settings.images),
                what=f": one asked image each, each unique in its own way (at most {MAX_IMAGE_QUESTIONS})")
    check_range(settings, ("objects",), 1, MAX_OBJECTS)


def check_choices(settings, fillers: tuple[str, ...] = FILLERS, needles: tuple[str, ...] = NEEDLES) -> None:
    """`settings.needle` is one of `needles` and `settings.filler` one of `fillers`."""
    for name, choices in (("needle", needles), ("filler", fillers)):
        if getattr(settings, name) not in choices:
            raise OmniInputError(f"--{name} {getattr(settings, name)!r}: use one of {', '.join(choices)}")


def write_haystack(spec: HaystackSpec, progress: bool = True) -> Path:
    """Write `spec.n` records to `spec.out/{split}.json` (a JSON list, one record a line, replaced
    atomically) and their images as PNGs under `spec.out/images/`. Returns the JSON path."""
    from tqdm import tqdm

    tokenizer = Tokenizer.from_file(spec.tokenizer) if spec.tokenizer is not None else None
    count = TokenCount(tokenizer, spec.image_tokens)
    out = Path(spec.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for index in tqdm(range(spec.n), desc=f"haystack {spec.split}", unit="record",
                      disable=not progress or spec.n < 100):
        record, images = make_record(index, spec.seed, spec.split, count, spec.length, needle=spec.needle,
                                     keys=spec.keys, questions=spec.questions, depth=spec.depth, filler=spec.filler,
                                     n_images=spec.images, objects=spec.objects, image_size=spec.image_size)
        for image, name in zip(images, record.get("image", [])):
            image.save(out / name, format="PNG")
        records.append(record)
    path = out / f"{spec.split}.json"
    write_records(path, records)
    return path
