"""In-context learning on ShapeWorld end to end: the demo's recipe, then a stage of episodes, then
accuracy against shots.

`omnilm demo-icl` runs it. The demo's stages (clip, align, instruct) train the model of `omnilm
demo` with one change, a tokenizer trained on the episodes' chats too, whose pieces make up the
nonsense words of `omnilm.data.icl`. A last stage, from the
instruct stage's model, trains on episodes (new words bound to colours or shapes, drawn afresh
for every episode, 0 to 8 shots, several queries each) mixed with the demo's own questions, so
that the model keeps what it knew. Then it measures, on held-out images: the ordinary questions
before and after the episodes (the instruct stage's model is the demo's, trained without
episodes) and `omnilm eval icl`'s grid on held-out words. Why each default is what it is:
docs/icl.md. Everything lands under `out/`:

    out/data/        the demo's data, icl_train.json (the episodes), icl_mix.json (what stage icl
                     reads), images/ (the episodes' image pool among them), tokenizer/
    out/clip/ out/align/ out/instruct/ out/icl/   each stage's run (instruct's model is the demo's)
    out/icl_start/   the instruct stage's model with a token convolution grown on (--token-conv)
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
from typing import Any

from omnilm.config import MAX_KERNEL
from omnilm.data.icl import ATTRIBUTES, VALUES, Episode, icl_rng, index_pool, make_episode, write_pool
from omnilm.data.llava_json import read_records, write_records
from omnilm.data.tokenizer import Tokenizer, train_tokenizer
from omnilm.errors import OmniInputError
from omnilm.eval.icl import IclEvalArgs, evaluate_icl, format_icl, summary, write_outputs
from omnilm.eval.vqa import evaluate_vqa, format_vqa_results, write_predictions
from omnilm.io import write_json
from omnilm.recipes.recipe import QUESTION_FAMILIES, Recipe, train_stages, write_data
from omnilm.settings import check_output_folder, check_range, setting, to_dict
from omnilm.train import Hyperparams, TrainArgs, train
from omnilm.train.stages import corpus


@dataclass(kw_only=True)
class IclRecipe(Recipe):
    """What `omnilm demo-icl` trains and measures: the demo's recipe and a stage of episodes."""

    n_episodes: int = setting(12000, "training episodes: an attribute, 2 to 5 words, 0 to --max-shots shots each")
    queries: int = setting(2, "queries per training episode after its shots (every shot is a turn whose answer "
                              "trains too)")
    max_shots: int = setting(8, "most shots per word in a training episode")
    max_images: int = setting(24, "most shots in all in a training episode (5 words get at most 4 each): longer "
                                  "episodes cost more than they teach")
    ambiguous: float = setting(0.1, "share of training episodes whose first shots confound colour and shape")
    real: float = setting(0.1, "share of training episodes that use the attribute's own names")
    shuffled: float = setting(0.1, "share of training episodes that use the own names on the wrong values (the "
                                   "answer must follow the prompt, not the image)")
    replay: float = setting(0.25, "share of stage icl's records that are the demo's own questions")
    pool: int = setting(3000, "single-object images the training episodes draw from")
    vocab_size: int = setting(512, "the BPE's vocabulary, trained on the demo's chats and the episodes'")
    token_conv: int = setting(20, "stage icl gives the decoder a short causal convolution over the last K tokens "
                                  "before each attention, zero-initialised (TextConfig.token_conv; 0: none): it puts "
                                  "a turn's image beside its answer and a word's pieces beside the next, so that one "
                                  "attention layer matches images and copies words (docs/icl.md)", metavar="K")
    icl: Hyperparams = setting(
        help="stage icl, from the instruct stage's model",
        factory=lambda: Hyperparams(steps=400, batch_size=32, lr=2e-3, warmup=40, optimizer="muon",
                                    group_by_length=True))
    cache_features: float = setting(1.0, "keep up to GIB gibibytes of the frozen tower's features in stage icl, so "
                                         "that each pool image runs through it once", metavar="GIB")
    eval_n: int = setting(100, "held-out episodes per cell of the evaluation grid (2- and 5-way, 0 to 8 shots, "
                               "both attributes, the novel words and each control: 80 cells)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, ("n_episodes", "queries", "max_shots", "pool", "eval_n"), low=1)
        check_range(self, ("max_images",), low=2)
        check_range(self, ("ambiguous", "real", "shuffled"), 0, 1)
        check_range(self, ("replay",), 0, 0.9, what=": the rest of stage icl's records are episodes")
        check_range(self, ("cache_features",), low=0)
        check_range(self, ("token_conv",), 0, MAX_KERNEL)
        if self.ambiguous + self.real + self.shuffled > 1:
            raise OmniInputError("--ambiguous, --real and --shuffled are shares of the episodes: give at most 1 in all")


# The command line's view of the recipe (omnilm.settings): stage icl starts from the instruct stage's
# model, whose projector it keeps, and reads the episodes and the demo's question families.
ICL_FLAGS = dict(skip=("icl.whiten_projector", "icl.tasks"))


def draw_training_episode(recipe: IclRecipe, rng: random.Random) -> Episode:
    attribute = rng.choice(ATTRIBUTES)
    ways = rng.randint(2, min(5, len(VALUES[attribute])))
    shots = rng.randint(0, min(recipe.max_shots, recipe.max_images // ways))
    u = rng.random()
    variant = ("ambiguous" if u < recipe.ambiguous else "real" if u < recipe.ambiguous + recipe.real
               else "shuffled" if u < recipe.ambiguous + recipe.real + recipe.shuffled else "novel")
    return Episode(attribute, ways, shots, variant, "train", recipe.queries)


def write_episodes(data: Path, recipe: IclRecipe, train_json: Path) -> tuple[Path, Path]:
    """The training episodes (icl_train.json) and stage icl's records (icl_mix.json: the episodes and
    a --replay share of the demo's question records), the image pool under data/images/."""
    by_value = index_pool(write_pool(data, "train", recipe.seed, recipe.pool))
    episodes = []
    for index in range(recipe.n_episodes):
        rng = icl_rng("train", recipe.seed, index)
        episodes.append(make_episode(rng, by_value, draw_training_episode(recipe, rng), f"icl-train-{index:06d}"))
    episodes_json = data / "icl_train.json"
    write_records(episodes_json, episodes)
    questions = [r for r in read_records(train_json) if r.get("task") != "caption"]
    n_replay = min(len(questions), round(len(episodes) * recipe.replay / (1 - recipe.replay)))
    mix = episodes + random.Random(f"icl-replay:{recipe.seed}").sample(questions, n_replay)
    mix_json = data / "icl_mix.json"
    write_records(mix_json, mix)
    return episodes_json, mix_json


def icl_tokenizer(train_json: Path, episodes_json: Path, recipe: IclRecipe) -> Tokenizer:
    """A BPE trained on the demo's chats and the episodes' as the model reads them: the nonsense
    words of training split into pieces that held-out words are made of too."""
    texts = corpus(read_records(train_json) + read_records(episodes_json), recipe.system_prompt)
    return train_tokenizer(texts, vocab_size=recipe.vocab_size, system_prompt=recipe.system_prompt)


def run_icl_recipe(out: str | Path, recipe: IclRecipe | None = None) -> dict[str, Any]:
    """Run the recipe; returns timings, the evaluations and the final model's folder."""
    recipe = recipe or IclRecipe()
    out = Path(out)
    check_output_folder(out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = out / "data"
    train_json, test_json, clip_json = write_data(data, recipe)
    episodes_json, mix_json = write_episodes(data, recipe, train_json)
    icl_tokenizer(train_json, episodes_json, recipe).save(data / "tokenizer")
    timings = {"data": time.perf_counter() - t0}

    summary_, stage_timings, clip_eval = train_stages(out, recipe, data, train_json, test_json, clip_json)
    timings.update(stage_timings)
    test = read_records(test_json)
    t = time.perf_counter()
    before, _ = evaluate_vqa(summary_["model"].eval(), summary_["processor"], test, data, progress=recipe.progress)
    timings["eval (before)"] = time.perf_counter() - t

    for folder in ("icl_start", "icl", "model", "icl_eval"):  # the recipe owns out/: a rerun starts afresh
        shutil.rmtree(out / folder, ignore_errors=True)
    start = out / "instruct" / "model"
    if recipe.token_conv:  # the demo's model, with a convolution that starts as the identity
        start = out / "icl_start"
        grown = summary_["model"]
        grown.add_token_conv(recipe.token_conv)
        grown.save_pretrained(start)
        summary_["processor"].save_pretrained(start)
    run = train(TrainArgs(**{**vars(recipe.icl), "stage": "instruct", "data": mix_json, "image_folder": data,
                             "out": out / "icl", "init": start, "seed": recipe.seed,
                             "tasks": (*QUESTION_FAMILIES, "icl"), "cache_features": recipe.cache_features,
                             "progress": recipe.progress}))
    timings["icl"] = run["seconds"]
    shutil.copytree(out / "icl" / "model", out / "model")
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
