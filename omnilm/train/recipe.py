"""LLaVA-1.5's recipe end to end on ShapeWorld: data -> tokenizer -> CLIP -> align -> instruct -> eval.

`omnilm demo` runs it with the defaults below (about 9 minutes on 2 CPU cores), and
`benchmarks/recipe.py` runs it against instruction tuning alone. Everything lands under `out/`:

    out/data/        train.json, test.json, clip.json, images/   (ShapeWorld, disjoint seeds)
    out/tokenizer/   BPE trained on the rendered training chats
    out/clip/ out/align/ out/instruct/   each stage: metrics.jsonl, loss.png, checkpoints/, model/
    out/model/       the final model (transformers LlavaForConditionalGeneration loads it)
    out/eval.json, out/predictions.jsonl, out/clip_eval.json
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from omnilm.config import OmniConfig
from omnilm.io import write_json
from omnilm.train.loop import TrainArgs, train


@dataclass
class Recipe:
    preset: str = "tiny"
    seed: int = 0
    # Images; each gives a caption record and a question record. With 6,000 the decoder memorised
    # them (97.6% on training questions, 89.3% held out, colour on 4-object scenes 100 against 74):
    # 1,300 steps of 32 see each of 24,000 about twice, and held-out accuracy rose to 94.4%
    # (docs/shapeworld-recipe.md, eighth round). Drawing them takes about 10 s.
    n_train: int = 24000
    n_test: int = 300  # held-out images: about 650 questions
    # Shapes sit near their cell's centre. The tiny ViT sees each cell as one 32 px patch, and a ViT
    # is not translation-invariant inside a patch: shapes anywhere in the cell (jitter 1) cap what a
    # linear probe reads of shape from its features at 67%, against 98% at 0.3 (docs/shapeworld-recipe.md).
    jitter: float = 0.25
    # Every training image is asked every question family it allows (5 or 6 turns), not 1 to 4:
    # more answers per image for the same steps. The test split keeps the mixed conversations.
    questions: str = "all"
    # CLIP trains on scenes of this many objects (None: the training scenes, 1 to 4 objects). With
    # one object a caption names one shape, colour, size and cell, and the contrastive loss cannot
    # be met without all four; on busy scenes, counts and sizes alone tell most captions apart.
    clip_objects: int | None = 1
    clip_images: int = 8000
    clip_steps: int = 600
    clip_batch: int = 64
    clip_lr: float = 1e-3
    # The ViT's patch embedding trains at a tenth of clip_lr. At the full rate the patches' part of
    # each token outgrows the learned positions tenfold, an object's cell falls under 2% of its
    # token's variance, and CLIP learns position in some runs only (zero-shot 0.09-0.93); at a
    # tenth, 20-37%, and 0.91-1.00 in every run (docs/shapeworld-recipe.md, seventh round).
    clip_patch_lr: float | None = 1e-4
    align_steps: int = 50
    align_batch: int = 32
    align_lr: float = 2e-3
    # As many as fit in the demo's ten minutes with a margin, the larger training set's drawing
    # included: the look-up of the object a question names is learned late in the stage. With 24,000
    # images, 1,300 steps reached 94.4% and 1,450 95.7% (2 threads; docs/shapeworld-recipe.md, eighth round).
    instruct_steps: int = 1300
    instruct_batch: int = 32
    instruct_lr: float = 2e-3
    # Muon for the decoder blocks' matrices, AdamW for the rest (omnilm.train.optim.MuonAdamW). With
    # AdamW the decoder learns to find the object a question names only after thousands of steps;
    # with Muon, within this stage: 84.9% against 58.4% (docs/shapeworld-recipe.md, fifth round).
    instruct_optimizer: str = "muon"
    # Questions only. LLaVA-1.5's stage-2 mix includes descriptions, and they teach positions (every
    # caption names each object's cell), but they take half the records: with them 76.9%, without 84.9%.
    instruct_tasks: tuple[str, ...] = ("colour", "shape", "count", "position", "existence", "spatial", "multi_turn")
    projector_lr: float | None = None
    # The CLIP tower stays frozen in stage 2, as in LLaVA. Trained at the LLM's rate it collapses into
    # a constant attention sink; at a tenth of it, it does no better than frozen (docs/shapeworld-recipe.md).
    train_vision: bool = False
    vision_lr: float | None = None
    # The projector starts by whitening the vision features (omnilm.model.connector.whiten_): shape
    # carries a few percent of their variance, colour and size most of it, and an unwhitened
    # projector learns the small directions last.
    whiten_projector: bool = True
    # The chat's system prompt, saved with the tokenizer (so `omnilm chat` and eval use it too); ""
    # leaves it out. Vicuna's 29-token prompt (None) is the same in every record, yet a randomly
    # initialised decoder must learn to look past it: with this one, 600 instruct steps reached 57.6%
    # against 50.4% (docs/shapeworld-recipe.md, third round), and each step is shorter.
    system_prompt: str | None = "Answer about the image."
    # The decoder's depth (None: the preset's 4). Two layers take 1.75x less time a step, and steps
    # are what the look-up needs: with Muon, 4 layers and 750 steps reached 65.3%, 2 and 1,300 84.9%.
    llm_layers: int | None = 2
    # Which of the tower's hidden states the projector reads (0: the embeddings, i: block i's output;
    # None: the preset's -2, LLaVA's penultimate layer). With the patch embedding at clip_patch_lr the
    # penultimate layer keeps a quarter of its variance for the cell; layer 1 (91.0%) and the
    # penultimate (88.9%) are within one run's spread, so the demo keeps LLaVA's choice
    # (docs/shapeworld-recipe.md, sixth and seventh rounds).
    vision_feature_layer: int | None = None
    stages: tuple[str, ...] = ("clip", "align", "instruct")  # instruct always runs; clip and align may be left out
    progress: bool = True

    def scaled(self, factor: float) -> Recipe:
        """The same recipe with every stage's steps multiplied by `factor` (benchmarks' --scale)."""
        return replace(self, clip_steps=round(self.clip_steps * factor), align_steps=round(self.align_steps * factor),
                       instruct_steps=round(self.instruct_steps * factor))


def train_clip_tower(out: Path, clip_json: Path, test_json: Path, image_folder: Path, tokenizer: Path,
                     recipe: Recipe) -> tuple[Path, dict[str, Any], float]:
    """Stage clip as the recipe runs it (its steps, batch and learning rates, the patch embedding's
    included) on `clip_json`. Returns the CLIP model's folder, which `TrainArgs.vision` takes, its
    zero-shot evaluation on `test_json`, and the seconds it trained."""
    from omnilm.eval.clip import evaluate_clip_checkpoint

    summary = train(TrainArgs(stage="clip", data=clip_json, image_folder=image_folder, out=out, tokenizer=tokenizer,
                              preset=recipe.preset, seed=recipe.seed, steps=recipe.clip_steps,
                              batch_size=recipe.clip_batch, lr=recipe.clip_lr, patch_lr=recipe.clip_patch_lr,
                              warmup=recipe.clip_steps // 10, progress=recipe.progress))
    return out / "model", evaluate_clip_checkpoint(out / "model", test_json, image_folder), summary["seconds"]


def run_recipe(out: str | Path, recipe: Recipe = Recipe()) -> dict[str, Any]:
    """Run the recipe; returns timings, the CLIP and VQA evaluations and the final model."""
    from omnilm.data import Processor
    from omnilm.data.llava_json import read_records
    from omnilm.data.shapeworld import write_shapeworld
    from omnilm.eval.vqa import evaluate_vqa, write_predictions
    from omnilm.train.stages import chat_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    data = out / "data"
    size = OmniConfig.from_preset(recipe.preset).vision.image_size  # draw at the model's resolution
    shared = dict(image_size=size, jitter=recipe.jitter, progress=recipe.progress)
    train_json = write_shapeworld(data, recipe.n_train, recipe.seed, "train", questions=recipe.questions, **shared)
    test_json = write_shapeworld(data, recipe.n_test, recipe.seed, "test", **shared)
    clip_json = train_json
    if "clip" in recipe.stages and recipe.clip_objects is not None:
        clip_json = write_shapeworld(data, recipe.clip_images, recipe.seed, "clip", n_objects=recipe.clip_objects,
                                     **shared)
    tokenizer = chat_tokenizer(train_json, recipe.system_prompt)
    tokenizer.save(out / "tokenizer")
    timings["data"] = time.perf_counter() - t0

    for stage in ("clip", "align", "instruct", "model"):  # the recipe owns out/: a rerun starts afresh
        shutil.rmtree(out / stage, ignore_errors=True)
    common = dict(data=train_json, image_folder=data, tokenizer=out / "tokenizer", preset=recipe.preset,
                  seed=recipe.seed, progress=recipe.progress)
    architecture: dict[str, Any] = {"text": {"n_layers": recipe.llm_layers}} if recipe.llm_layers is not None else {}
    if recipe.vision_feature_layer is not None:
        architecture["vision_feature_layer"] = recipe.vision_feature_layer
    result: dict[str, Any] = {"recipe": asdict(recipe)}
    vision = None
    if "clip" in recipe.stages:
        vision, result["clip_eval"], timings["clip"] = train_clip_tower(out / "clip", clip_json, test_json, data,
                                                                        out / "tokenizer", recipe)
        write_json(out / "clip_eval.json", result["clip_eval"])
    init = None
    if "align" in recipe.stages:
        summary = train(TrainArgs(stage="align", out=out / "align", vision=vision, steps=recipe.align_steps,
                                  batch_size=recipe.align_batch, lr=recipe.align_lr, warmup=recipe.align_steps // 10,
                                  whiten_projector=recipe.whiten_projector, config_overrides=architecture, **common))
        timings["align"] = summary["seconds"]
        init, vision = out / "align" / "model", None
    summary = train(TrainArgs(stage="instruct", out=out / "instruct", init=init, vision=vision,
                              steps=recipe.instruct_steps, batch_size=recipe.instruct_batch, lr=recipe.instruct_lr,
                              projector_lr=recipe.projector_lr, vision_lr=recipe.vision_lr,
                              warmup=recipe.instruct_steps // 20, whiten_projector=recipe.whiten_projector and init is None,
                              train_vision=recipe.train_vision, tasks=list(recipe.instruct_tasks),
                              optimizer=recipe.instruct_optimizer,
                              config_overrides=architecture if init is None else {}, **common))
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

