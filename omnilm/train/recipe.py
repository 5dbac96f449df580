"""LLaVA-1.5's recipe end to end on ShapeWorld: data -> tokenizer -> CLIP -> align -> instruct -> eval.

`omnilm demo` runs it with the defaults below (about 7 minutes on 2 CPU cores), and
`benchmarks/recipe.py` runs it against instruction tuning alone. Everything lands under `out/`:

    out/data/        train.json, test.json, images/        (ShapeWorld, disjoint seeds)
    out/tokenizer/   BPE trained on the rendered training chats
    out/clip/ out/align/ out/instruct/   each stage: metrics.jsonl, loss.png, checkpoints/, model/
    out/model/       the final model (transformers LlavaForConditionalGeneration loads it)
    out/eval.json, out/predictions.jsonl, out/clip_eval.json
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omnilm.config import OmniConfig
from omnilm.io import write_json
from omnilm.train.loop import TrainArgs, train


@dataclass
class Recipe:
    preset: str = "tiny"
    seed: int = 0
    n_train: int = 6000  # images; each gives a caption record and a question record
    n_test: int = 300  # held-out images: about 650 questions
    clip_steps: int = 600
    clip_batch: int = 64
    clip_lr: float = 1e-3
    align_steps: int = 50
    align_batch: int = 32
    align_lr: float = 2e-3
    instruct_steps: int = 700
    instruct_batch: int = 32
    instruct_lr: float = 1e-3
    # LLaVA-1.5's stage-2 mix includes descriptions; here captions give the randomly initialised
    # LLM dense, image-dependent targets beside the short answers.
    instruct_tasks: tuple[str, ...] = ("caption", "colour", "shape", "count", "position", "existence", "spatial",
                                       "multi_turn")
    projector_lr: float | None = None
    # The vision tower keeps learning in stage 2, 10x slower than the LLM: a CLIP trained for a
    # minute does not yet encode shape, and at the LLM's rate it collapses (docs/shapeworld-recipe.md).
    train_vision: bool = True
    vision_lr: float | None = 1e-4
    stages: tuple[str, ...] = ("clip", "align", "instruct")  # instruct always runs; clip and align may be left out
    progress: bool = True


def run_recipe(out: str | Path, recipe: Recipe = Recipe()) -> dict[str, Any]:
    """Run the recipe; returns timings, the CLIP and VQA evaluations and the final model."""
    from omnilm.data import Processor, train_tokenizer
    from omnilm.data.llava_json import read_records
    from omnilm.data.shapeworld import write_shapeworld
    from omnilm.eval.clip import evaluate_clip_checkpoint
    from omnilm.eval.vqa import evaluate_vqa, write_predictions
    from omnilm.train.stages import corpus

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    data = out / "data"
    size = OmniConfig.from_preset(recipe.preset).vision.image_size  # draw at the model's resolution
    train_json = write_shapeworld(data, recipe.n_train, recipe.seed, "train", image_size=size)
    test_json = write_shapeworld(data, recipe.n_test, recipe.seed, "test", image_size=size)
    tokenizer = train_tokenizer(corpus(train_json))
    tokenizer.save(out / "tokenizer")
    timings["data"] = time.perf_counter() - t0

    for stage in ("clip", "align", "instruct", "model"):  # the recipe owns out/: a rerun starts afresh
        shutil.rmtree(out / stage, ignore_errors=True)
    common = dict(data=train_json, image_folder=data, tokenizer=out / "tokenizer", preset=recipe.preset,
                  seed=recipe.seed, progress=recipe.progress)
    result: dict[str, Any] = {"recipe": asdict(recipe)}
    vision = None
    if "clip" in recipe.stages:
        summary = train(TrainArgs(stage="clip", out=out / "clip", steps=recipe.clip_steps, batch_size=recipe.clip_batch,
                                  lr=recipe.clip_lr, warmup=recipe.clip_steps // 10, **common))
        timings["clip"] = summary["seconds"]
        vision = out / "clip" / "model"
        result["clip_eval"] = evaluate_clip_checkpoint(vision, test_json, data)
        write_json(out / "clip_eval.json", result["clip_eval"])
    init = None
    if "align" in recipe.stages:
        summary = train(TrainArgs(stage="align", out=out / "align", vision=vision, steps=recipe.align_steps,
                                  batch_size=recipe.align_batch, lr=recipe.align_lr, warmup=recipe.align_steps // 10,
                                  **common))
        timings["align"] = summary["seconds"]
        init, vision = out / "align" / "model", None
    summary = train(TrainArgs(stage="instruct", out=out / "instruct", init=init, vision=vision,
                              steps=recipe.instruct_steps, batch_size=recipe.instruct_batch, lr=recipe.instruct_lr,
                              projector_lr=recipe.projector_lr, vision_lr=recipe.vision_lr,
                              warmup=recipe.instruct_steps // 20,
                              train_vision=recipe.train_vision, tasks=list(recipe.instruct_tasks), **common))
    timings["instruct"] = summary["seconds"]
    model = summary["model"].eval()
    shutil.copytree(out / "instruct" / "model", out / "model")

    t = time.perf_counter()
    processor = Processor.for_model(model)
    evaluation, predictions = evaluate_vqa(model, processor, read_records(test_json), data, progress=recipe.progress)
    write_predictions(predictions, out / "predictions.jsonl")
    write_json(out / "eval.json", evaluation)
    timings["eval"] = time.perf_counter() - t
    result.update(eval=evaluation, predictions=predictions, timings=timings, model=model, processor=processor,
                  test_json=test_json, image_folder=data)
    return result

