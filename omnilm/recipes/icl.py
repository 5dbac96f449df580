"""In-context learning on ShapeWorld end to end: the demo's recipe, then four lessons of episodes,
then accuracy against shots.

`omnilm demo-icl` runs it. The demo's stages (clip, align, instruct) train the model of `omnilm
demo`, unchanged. Its decoder is then given a token convolution and every made-up word of
`omnilm.data.icl` as one token whose rows never train, and four lessons (LESSONS), each from the
model of the one before, teach the binding: capital letters bound to colours or shapes named in
words (the look-up forms there, after a long plateau), the same with images, made-up words in place
of the letters, and all of it (2 to 5 words, 0 to 8 shots, every variant, each turn asking for the
attribute and each answer naming what the image shows before the word, "red dax", as the evaluation
does); a quarter of every lesson is the demo's own questions, so that the model keeps what it knew.
Then it measures, on held-out images: the ordinary questions before and after the lessons (the
instruct stage's model is the demo's, trained without episodes) and `omnilm eval icl`'s grid on
held-out words. Why each default is what it is: docs/icl.md. Everything lands under `out/`:

    out/data/        the demo's data and tokenizer, icl_<lesson>.json (each lesson's records),
                     images/ (the episodes' image pool among them)
    out/clip/ out/align/ out/instruct/   the demo's stages (instruct's model is the demo's)
    out/icl_start/   the instruct stage's model with the convolution and the word tokens
    out/lookup/ out/look/ out/words/ out/icl/   each lesson's run
    out/model/       the final model
    out/eval.json    ordinary questions, before (the instruct stage's model) and after
    out/icl_eval/    icl.csv, icl.png, predictions.jsonl (omnilm eval icl)
"""

from __future__ import annotations

import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from omnilm.config import MAX_KERNEL, OmniConfig
from omnilm.data.icl import ALL_WORDS, ATTRIBUTES, Episode, icl_rng, index_pool, make_episode, write_pool
from omnilm.data.llava_json import read_records, write_records
from omnilm.errors import OmniInputError
from omnilm.eval.icl import IclEvalArgs, evaluate_icl, format_icl, summary, write_outputs
from omnilm.eval.vqa import evaluate_vqa, format_vqa_results, write_predictions
from omnilm.io import write_json
from omnilm.recipes.recipe import QUESTION_FAMILIES, Recipe, start_run, train_stages
from omnilm.settings import check_range, setting, to_dict
from omnilm.train import Hyperparams, TrainArgs, train


class Lesson(NamedTuple):
    name: str
    words: str  # the labels: letters, or the training words
    images: float  # share of the episodes shown as images (the rest in words)
    ask: bool  # each turn asks for the attribute named ("What colour?"), else "What is this?"
    describe: bool  # each answer names what its image shows, then the word ("red dax")


# What each lesson teaches, in order (docs/icl.md, "Lessons"): the look-up on labels the model
# already writes and on keys it reads as words, then keyed by images, then copying made-up words,
# then all of it with the demo's questions replayed. The first three ask "What is this?": asked for
# the attribute, lesson 1's look-up formed some 250 steps later and lesson 3 ended at a loss of 0.32
# instead of 0.09; the last asks for the attribute, as the evaluation does (5-way colour at 4 shots
# 85 to 98%, docs/icl.md "The attribute named in every turn"), and its answers name what the image
# shows before the word, so that the word is a look-up in text on the name just said (shape 2-way at
# 1 shot 81 to 99%, docs/icl.md "Naming what it sees, then the word").
LESSONS = (Lesson("lookup", "letters", 0.0, False, False), Lesson("look", "letters", 1.0, False, False),
           Lesson("words", "train", 0.0, False, False), Lesson("icl", "train", 0.7, True, True))


CONTEXT = 2048  # the longest prompt the lessons' model reads (icl_start)


def _lesson(steps: int, batch_size: int = 32, **kw: Any) -> Hyperparams:
    return Hyperparams(steps=steps, batch_size=batch_size, lr=2e-3, optimizer="muon", group_by_length=True, **kw)


@dataclass(kw_only=True)
class IclRecipe(Recipe):
    """What `omnilm demo-icl` trains and measures: the demo's recipe and four lessons of episodes."""

    queries: int = setting(4, "queries per training episode after its shots (every shot is a turn whose answer "
                              "trains too)")
    max_shots: int = setting(8, "most shots per word in a training episode of the last lesson (the first three "
                                "show 1 to 4)")
    max_images: int = setting(20, "most shots in all in a training episode of the last lesson: 5 words get up to "
                                  "4 each, 2 words the 8 of --max-shots (at 12, 5-way episodes of 4 shots were "
                                  "longer than any trained, and scored 80%)")
    ambiguous: float = setting(0.1, "share of the last lesson's episodes whose first shots confound colour and shape")
    real: float = setting(0.25, "share of the last lesson's episodes that use the attribute's own names; as many "
                                "as --shuffled, or the model learns that an own name means another value (at 0.1 "
                                "beside 0.25, real names with no shots: 40% 2-way colour)")
    shuffled: float = setting(0.25, "share of the last lesson's episodes that use the own names on the wrong values "
                                    "(the answer must follow the prompt, not the image: at 0.1, 38% of the "
                                    "answers after shots did)")
    replay: float = setting(0.25, "share of every lesson's records that are the demo's own questions: the "
                                  "look-up still forms, later by this share, and the questions stay")
    pool: int = setting(3000, "single-object images the training episodes draw from")
    token_conv: int = setting(20, "the lessons give the decoder a short causal convolution over the last K tokens "
                                  "before each attention, zero-initialised (TextConfig.token_conv; 0: none): it puts "
                                  "a turn's image beside its answer (docs/icl.md)", metavar="K")
    word_dims: int = setting(64, "the made-up words' fixed rows are random directions in one subspace of D "
                                 "dimensions (0: the decoder's whole width): copied from the prompt far sooner "
                                 "(docs/icl.md)", metavar="D")
    lookup: Hyperparams = setting(
        help="lesson 1, from the instruct stage's model: capital letters bound to colours or shapes named in words",
        factory=lambda: _lesson(1600, warmup=30, min_lr_ratio=0.5))
    look: Hyperparams = setting(help="lesson 2: the same with images", factory=lambda: _lesson(500, warmup=10))
    words: Hyperparams = setting(help="lesson 3: made-up words (one fixed token each) in place of the letters, in "
                                      "words", factory=lambda: _lesson(450, warmup=10))
    icl: Hyperparams = setting(
        help="lesson 4: made-up words, images and words, 2 to 5 of them, every variant, each turn asking for the "
             "attribute and each answer naming what the image shows before the word",
        factory=lambda: _lesson(1000, warmup=10))
    cache_features: float = setting(1.0, "keep up to GIB gibibytes of the frozen tower's features in the lessons, so "
                                         "that each pool image runs through it once", metavar="GIB")
    eval_n: int = setting(100, "held-out episodes per cell of the evaluation grid (2- and 5-way, 0 to 8 shots, "
                               "both attributes, the novel words and each control: 80 cells)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, ("queries", "max_shots", "pool", "eval_n"), low=1)
        check_range(self, ("max_images",), low=2)
        check_range(self, ("ambiguous", "real", "shuffled"), 0, 1)
        check_range(self, ("replay",), 0, 0.9, what=": the rest of each lesson's records are episodes")
        check_range(self, ("cache_features",), low=0)
        check_range(self, ("token_conv",), 0, MAX_KERNEL)
        check_range(self, ("word_dims",), 0, OmniConfig.from_preset(self.preset).text.dim,
                    what=": the decoder's width is the most")
        if self.ambiguous + self.real + self.shuffled > 1:
            raise OmniInputError("--ambiguous, --real and --shuffled are shares of the episodes: give at most 1 in all")


# The command line's view of the recipe (omnilm.settings): each lesson starts from the model before
# it, whose projector it keeps, and reads its own episodes (and the demo's question families).
ICL_FLAGS = dict(skip=tuple(f"{lesson.name}.{field}" for lesson in LESSONS for field in ("whiten_projector", "tasks")))


def draw_training_episode(recipe: IclRecipe, lesson: str, rng: random.Random) -> Episode:
    """One episode of `lesson` (LESSONS): the first three 2-way, 1 to 4 shots, novel labels; the
    last 2 to 5 ways (two in five 2-way), 0 to --max-shots shots, every variant."""
    row = next(row for row in LESSONS if row.name == lesson)
    attribute = rng.choice(ATTRIBUTES)
    form = "image" if rng.random() < row.images else "text"
    if lesson != "icl":
        ways, shots, variant = 2, rng.randint(1, 4), "novel"
    else:
        ways = rng.choice((2, 2, 3, 4, 5))
        shots = rng.randint(0, min(recipe.max_shots, recipe.max_images // ways))
        u = rng.random()
        variant = ("ambiguous" if u < recipe.ambiguous else "real" if u < recipe.ambiguous + recipe.real
                   else "shuffled" if u < recipe.ambiguous + recipe.real + recipe.shuffled else "novel")
    return Episode(attribute, ways, shots, variant, row.words, recipe.queries, form, row.ask, row.describe)


def write_lessons(data: Path, recipe: IclRecipe, train_json: Path) -> dict[str, Path]:
    """Each lesson's records (icl_<lesson>.json: one episode per record a step reads, mixed with a
    --replay share of the demo's question records), the image pool under data/images/."""
    by_value = index_pool(write_pool(data, "train", recipe.seed, recipe.pool))
    questions = [r for r in read_records(train_json) if r.get("task") != "caption"]
    paths = {}
    for lesson in (row.name for row in LESSONS):
        hp: Hyperparams = getattr(recipe, lesson)
        n = hp.steps * hp.batch_size * hp.grad_accum
        records = []
        for index in range(round(n * (1 - recipe.replay))):
            rng = icl_rng(f"train-{lesson}", recipe.seed, index)
            records.append(make_episode(rng, by_value, draw_training_episode(recipe, lesson, rng),
                                        f"icl-{lesson}-{index:06d}"))
        n_replay = min(len(questions), n - len(records))
        records += random.Random(f"icl-replay:{lesson}:{recipe.seed}").sample(questions, n_replay)
        paths[lesson] = data / f"icl_{lesson}.json"
        write_records(paths[lesson], records)
    return paths


def icl_start(model, processor, recipe: IclRecipe, folder: Path) -> None:
    """The instruct stage's model ready for the lessons, saved in `folder`: a token convolution that
    starts as the identity (--token-conv), and every made-up word, training's and held-out, as one
    token whose rows are fixed random directions (OmniModel.add_tokens): a held-out word is then read
    and written like a training one. A word's token, like a letter's, follows BPE's " " token, so
    that both are written from the same place, where the first lessons build the look-up (docs/icl.md:
    a word written from ":" instead did not learn from the letters' look-up). Prompts of up to
    CONTEXT tokens: the grid's longest (5-way 8 shots, ambiguous, each answer naming colour and shape)
    come to 1,018 with the demo's tokenizer and more with a smaller one; rotary positions learn
    nothing per position, and no lesson's record is longer than 615."""
    if recipe.token_conv:
        model.add_token_conv(recipe.token_conv)
    model.config.text.max_seq_len = max(model.config.text.max_seq_len, CONTEXT)
    processor.tokenizer.add_words(ALL_WORDS)
    model.add_tokens(len(ALL_WORDS), fixed=True, seed=recipe.seed, dims=recipe.word_dims or None)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def run_icl_recipe(out: str | Path, recipe: IclRecipe | None = None) -> dict[str, Any]:
    """Run the recipe; returns timings, the evaluations and the final model's folder."""
    recipe = recipe or IclRecipe()
    out = Path(out)
    data, (train_json, test_json, clip_json), seconds = start_run(out, recipe)
    t0 = time.perf_counter()
    lessons = write_lessons(data, recipe, train_json)
    timings = {"data": seconds + time.perf_counter() - t0}

    summary_, stage_timings, clip_eval = train_stages(out, recipe, data, train_json, test_json, clip_json)
    timings.update(stage_timings)
    test = read_records(test_json)
    t = time.perf_counter()
    before, _ = evaluate_vqa(summary_["model"].eval(), summary_["processor"], test, data, progress=recipe.progress)
    timings["eval (before)"] = time.perf_counter() - t

    folders = ("icl_start", *(lesson.name for lesson in LESSONS), "model", "icl_eval")
    for folder in folders:  # the recipe owns out/: a rerun starts afresh
        shutil.rmtree(out / folder, ignore_errors=True)
    icl_start(summary_["model"], summary_["processor"], recipe, out / "icl_start")
    start = out / "icl_start"
    for lesson in (row.name for row in LESSONS):
        run = train(TrainArgs(**{**vars(getattr(recipe, lesson)), "stage": "instruct", "data": lessons[lesson],
                                 "image_folder": data, "out": out / lesson, "init": start, "seed": recipe.seed,
                                 "tasks": (*QUESTION_FAMILIES, "icl"), "cache_features": recipe.cache_features,
                                 "progress": recipe.progress}))
        timings[lesson] = run["seconds"]
        start = out / lesson / "model"
    shutil.copytree(start, out / "model")
    model, processor = run["model"].eval(), run["processor"]

    t = time.perf_counter()
    after, predictions = evaluate_vqa(model, processor, test, data, progress=recipe.progress)
    write_predictions(predictions, out / "predictions.jsonl")
    write_json(out / "eval.json", {"before": before, "after": after})
    timings["eval (after)"] = time.perf_counter() - t

    t = time.perf_counter()
    grid = IclEvalArgs(checkpoint=out / "model", out=out / "icl_eval", n=recipe.eval_n, seed=recipe.seed)
    rows, icl_predictions = evaluate_icl(model, processor, grid, recipe.progress)
    write_outputs(rows, icl_predictions, grid.out)
    timings["eval icl"] = time.perf_counter() - t
    result = {"recipe": to_dict(recipe), "eval": {"before": before, "after": after}, "icl": rows,
              "summary": summary(rows), "clip_eval": clip_eval, "timings": timings, "model": out / "model",
              "report": format_icl(rows), "questions": format_vqa_results(after)}
    write_json(out / "results.json", {k: v for k, v in result.items() if k != "model"} | {"model": str(out / "model")})
    return result
