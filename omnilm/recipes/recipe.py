"""LLaVA-1.5's recipe end to end on ShapeWorld: data -> tokenizer -> CLIP -> align -> instruct -> eval.

`omnilm demo` runs it with the defaults below (about 9 minutes on 2 CPU cores), and
`benchmarks/recipe.py` runs it against instruction tuning alone. Why each default is what it is,
with the runs that chose it: docs/shapeworld-recipe.md. Everything lands under `out/`:

    out/data/        train.json, test.json, clip.json, images/ (ShapeWorld, disjoint seeds), and
                     tokenizer/ (a BPE trained on the rendered training chats)
    out/clip/ out/align/ out/instruct/   each stage: metrics.jsonl, loss.png, checkpoints/, model/
    out/model/       the final model (transformers LlavaForConditionalGeneration loads it)
    out/eval.json, out/predictions.jsonl, out/clip_eval.json
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from omnilm.config import PRESETS, OmniConfig
from omnilm.data.llava_json import read_records
from omnilm.data.shapeworld import JITTER, QUESTION_MIXES, write_shapeworld
from omnilm.errors import OmniInputError
from omnilm.eval.clip import evaluate_clip_checkpoint
from omnilm.eval.vqa import evaluate_vqa, write_predictions
from omnilm.io import write_json
from omnilm.settings import check_output_folder, check_range, check_seed, setting, to_dict
from omnilm.train import Hyperparams, TrainArgs, train
from omnilm.train.stages import chat_tokenizer

QUESTION_FAMILIES = ("colour", "shape", "count", "position", "existence", "spatial", "multi_turn")


@dataclass(kw_only=True)
class Recipe:
    """The demo's recipe: its data, its model and one `Hyperparams` per stage."""

    preset: str = setting("tiny", "architecture: tiny, or tiny-moe (a sparse decoder)")
    seed: int = setting(0, "seed of the data, the weights and the batch order")
    # Each image gives a caption record and a question record; a smaller set is memorised.
    n_train: int = setting(24000, "training images (docs/shapeworld-recipe.md, eighth round)")
    n_test: int = setting(300, "held-out images (about 650 questions)")
    jitter: float = setting(JITTER, "how far shapes stray from their cell's centre (0 centred, 1 anywhere): the "
                                    "tiny ViT sees a cell as one patch, and is not translation-invariant inside it")
    questions: str = setting("all", "per training image, every question family it allows (all) or 1 to 4 of them "
                                    "(mixed); the test split keeps the mixed conversations", choices=("mixed", "all"))
    clip_objects: int | None = setting(
        1, "objects per stage-clip scene (0: the training scenes, 1 to 4 objects): with one, a caption names one "
           "shape, colour, size and cell, and the contrastive loss cannot be met without all four")
    clip_images: int = setting(8000, "single-object scenes for stage clip")
    system_prompt: str | None = setting(
        "Answer about the image.", "the chat's system prompt, saved with the tokenizer ('' leaves it out): a short "
                                   "one is learned past sooner than Vicuna's and makes each step shorter")
    llm_layers: int | None = setting(2, "decoder layers (the tiny preset has 4): fewer layers make shorter steps, "
                                        "and steps are what the look-up of the named object needs")
    vision_feature_layer: int | None = setting(None, "the tower's hidden state the projector reads (default: the "
                                                     "preset's -2, LLaVA's penultimate layer)")
    stages: tuple[str, ...] = setting(("clip", "align", "instruct"),
                                      "stages to run: instruct always runs; clip and align may be left out")
    clip: Hyperparams = setting(
        help="stage clip", factory=lambda: Hyperparams(steps=600, batch_size=64, lr=1e-3, patch_lr=1e-4, warmup=60))
    align: Hyperparams = setting(
        help="stage 1", factory=lambda: Hyperparams(steps=50, batch_size=32, lr=2e-3, warmup=5, whiten_projector=True))
    # Muon, and questions only: with AdamW or with captions in the mix the decoder finds the object
    # a question names far later (docs/shapeworld-recipe.md, fifth round).
    instruct: Hyperparams = setting(
        help="stage 2", factory=lambda: Hyperparams(steps=1300, batch_size=32, lr=2e-3, warmup=65, optimizer="muon",
                                                   tasks=QUESTION_FAMILIES, whiten_projector=True))
    progress: bool = setting(True, "progress bars (--no-progress: none)")

    def __post_init__(self) -> None:
        # Checked here, before any data is written or any stage trains.
        self.stages = tuple(self.stages)
        if "instruct" not in self.stages or not set(self.stages) <= {"clip", "align", "instruct"}:
            raise OmniInputError(f"--stages {','.join(self.stages)}: give instruct, with clip and/or align before it")
        if self.preset not in PRESETS:
            raise OmniInputError(f"unknown --preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.llm_layers is not None and self.llm_layers < 1:
            raise OmniInputError(f"--llm-layers is {self.llm_layers}: give the decoder at least one layer")
        if self.clip_objects is not None and not 0 <= self.clip_objects <= 4:
            raise OmniInputError(f"--clip-objects is {self.clip_objects}: give 1 to 4 (or 0: the training scenes)")
        if self.questions not in QUESTION_MIXES:
            raise OmniInputError(f"--questions {self.questions!r}: choose one of {', '.join(QUESTION_MIXES)}")
        check_seed(self)
        check_range(self, ("n_test",), low=1)
        check_range(self, ("jitter",), 0, 1)
        # Each training image gives one caption (clip, align) and one question record (instruct).
        sizes = {"clip": self.clip_images if self.clip_objects else self.n_train, "align": self.n_train,
                 "instruct": self.n_train}
        for stage in self.stages:
            batch = getattr(self, stage).batch_size
            if sizes[stage] < batch:
                raise OmniInputError(f"stage {stage} draws batches of {batch} from {sizes[stage]} records: give "
                                     f"more images (--n-train, --clip-images) or a smaller --{stage}-batch-size")

    def scaled(self, factor: float) -> Recipe:
        """The same recipe with every stage's steps multiplied by `factor` (benchmarks' --scale)."""
        return replace(self, clip=self.clip.scaled(factor), align=self.align.scaled(factor),
                       instruct=self.instruct.scaled(factor))


def stage_args(hp: Hyperparams, **where: Any) -> TrainArgs:
    """A stage's `TrainArgs`: its `Hyperparams` and where it reads and writes (`where` may override)."""
    return TrainArgs(**{**vars(hp), **where})


def train_clip_tower(out: Path, clip_json: Path, test_json: Path, image_folder: Path, tokenizer: Path,
                     recipe: Recipe) -> tuple[Path, dict[str, Any], float]:
    """Stage clip as the recipe runs it (`recipe.clip`) on `clip_json`. Returns the CLIP model's
    folder, which `TrainArgs.vision` takes, its zero-shot evaluation on `test_json`, and the
    seconds it trained."""
    summary = train(stage_args(recipe.clip, stage="clip", data=clip_json, image_folder=image_folder, out=out,
                               tokenizer=tokenizer, preset=recipe.preset, seed=recipe.seed, progress=recipe.progress))
    return out / "model", evaluate_clip_checkpoint(out / "model", test_json, image_folder), summary["seconds"]


def write_data(out: Path, recipe: Recipe, multi_image: float = 0.0) -> tuple[Path, Path, Path]:
    """The recipe's ShapeWorld under `out` (train, test and, for stage clip, single-object scenes)
    drawn at the preset's resolution, and a tokenizer trained on the training chats in `out/tokenizer`.
    Returns the train, test and clip JSON files."""
    size = OmniConfig.from_preset(recipe.preset).vision.image_size
    shared = dict(image_size=size, jitter=recipe.jitter, progress=recipe.progress)
    train_json = write_shapeworld(out, recipe.n_train, recipe.seed, "train", questions=recipe.questions,
                                  multi_image=multi_image, **shared)
    test_json = write_shapeworld(out, recipe.n_test, recipe.seed, "test", multi_image=multi_image, **shared)
    clip_json = train_json
    if "clip" in recipe.stages and recipe.clip_objects:
        clip_json = write_shapeworld(out, recipe.clip_images, recipe.seed, "clip", n_objects=recipe.clip_objects,
                                     **shared)
    chat_tokenizer(train_json, recipe.system_prompt).save(out / "tokenizer")
    return train_json, test_json, clip_json


def architecture(recipe: Recipe) -> dict[str, Any]:
    """What the recipe changes of its preset (OmniConfig.from_preset overrides)."""
    overrides: dict[str, Any] = {"text": {"n_layers": recipe.llm_layers}} if recipe.llm_layers is not None else {}
    if recipe.vision_feature_layer is not None:
        overrides["vision_feature_layer"] = recipe.vision_feature_layer
    return overrides


def start_run(out: Path, recipe: Recipe) -> tuple[Path, tuple[Path, Path, Path], float]:
    """A recipe run's start: `out` checked and made, the recipe's data written to out/data
    (`write_data`). Returns that folder, the train, test and clip JSON files, and the seconds taken."""
    check_output_folder(out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = out / "data"
    return data, write_data(data, recipe), time.perf_counter() - t0


def run_recipe(out: str | Path, recipe: Recipe | None = None) -> dict[str, Any]:
    """Run the recipe; returns timings, the CLIP and VQA evaluations and the final model."""
    recipe = recipe or Recipe()
    out = Path(out)
    data, (train_json, test_json, clip_json), seconds = start_run(out, recipe)
    timings = {"data": seconds}
    result: dict[str, Any] = {"recipe": to_dict(recipe)}
    summary, stage_timings, clip_eval = train_stages(out, recipe, data, train_json, test_json, clip_json)
    timings.update(stage_timings)
    if clip_eval is not None:
        result["clip_eval"] = clip_eval
    model, processor = summary["model"].eval(), summary["processor"]
    shutil.rmtree(out / "model", ignore_errors=True)
    shutil.copytree(out / "instruct" / "model", out / "model")

    t = time.perf_counter()
    evaluation, predictions = evaluate_vqa(model, processor, read_records(test_json), data, progress=recipe.progress)
    write_predictions(predictions, out / "predictions.jsonl")
    write_json(out / "eval.json", evaluation)
    timings["eval"] = time.perf_counter() - t
    result.update(eval=evaluation, predictions=predictions, timings=timings, model=model, processor=processor,
                  test_json=test_json, image_folder=data)
    return result


def train_stages(out: Path, recipe: Recipe, data: Path, train_json: Path, test_json: Path,
                 clip_json: Path) -> tuple[dict[str, Any], dict[str, float], dict[str, Any] | None]:
    """The recipe's stages on data `write_data` wrote (its tokenizer in `data/tokenizer`), each under
    out/<stage>/ (a rerun starts afresh). Returns stage instruct's summary (its model and processor),
    each stage's seconds, and stage clip's zero-shot evaluation (None without that stage)."""
    for stage in ("clip", "align", "instruct"):
        shutil.rmtree(out / stage, ignore_errors=True)
    common = dict(data=train_json, image_folder=data, tokenizer=data / "tokenizer", preset=recipe.preset,
                  seed=recipe.seed, progress=recipe.progress)
    timings: dict[str, float] = {}
    vision, clip_eval = None, None
    if "clip" in recipe.stages:
        vision, clip_eval, timings["clip"] = train_clip_tower(out / "clip", clip_json, test_json, data,
                                                              data / "tokenizer", recipe)
        write_json(out / "clip_eval.json", clip_eval)
    init = None
    if "align" in recipe.stages:
        summary = train(stage_args(recipe.align, stage="align", out=out / "align", vision=vision,
                                   config=architecture(recipe), **common))
        timings["align"] = summary["seconds"]
        init, vision = out / "align" / "model", None
    # After align the projector exists: instruct whitens (and shapes) only a fresh model.
    summary = train(stage_args(recipe.instruct, stage="instruct", out=out / "instruct", init=init, vision=vision,
                               whiten_projector=recipe.instruct.whiten_projector and init is None,
                               config=architecture(recipe) if init is None else {}, **common))
    timings["instruct"] = summary["seconds"]
    return summary, timings, clip_eval
