"""A small model learns to retrieve from its prompt, then is measured far past its training length.

`omnilm demo --task haystack` runs it. Issue 24's recipe, in progress: the data, the training and
the grids are here; the defaults are still being tuned towards the issue's recall targets (see
docs/long-context.md, "Results"). Everything lands under `out/`:

    out/data/        train.json: haystack records of up to `length` tokens, `keys` needles each and
                     `questions` of them asked as a multi-turn chat (every answer supervised), and
                     tokenizer/ (a BPE trained on the rendered records)
    out/instruct/    the training run: metrics.jsonl, loss.png, checkpoints/, model/
    out/niah/        one `omnilm eval niah` grid per RoPE choice: plain, and each inference-time scaling

Retrieval appears abruptly after a plateau and depends on dense supervision (many questions per
sequence, MQAR in the Zoology paper) and short sequences early on: record lengths are drawn from
`min_length` to `length`. Length generalisation comes from randomized positions during training
(`--random-positions`, Ruoss et al. 2023) and, at evaluation, from the scalings omnilm's RoPE has.
"""

from __future__ import annotations

import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omnilm.config import OmniConfig
from omnilm.data import train_tokenizer
from omnilm.data.haystack import MAX_IMAGE_QUESTIONS, NEEDLES, TokenCount, make_record
from omnilm.data.llava_json import write_records
from omnilm.data.shapeworld import write_shapeworld
from omnilm.data.tokenizer import Tokenizer
from omnilm.errors import OmniInputError
from omnilm.eval.niah import NiahArgs, run_niah
from omnilm.recipes.recipe import Recipe, train_clip_tower
from omnilm.settings import check_output_folder, check_range, check_seed, setting, to_dict
from omnilm.train import Hyperparams, TrainArgs, train
from omnilm.train.stages import corpus

SCALINGS = ("linear", "dynamic", "yarn")
PRESET = "tiny"  # the vision tower (image needles) and the defaults the decoder's sizes override


@dataclass(kw_only=True)
class HaystackRecipe:
    """What `omnilm demo-haystack` trains and measures."""

    seed: int = setting(0, "seed of the data, the weights and the batch order")
    needle: str = setting("text", "text: the model learns text needles ('remember: <key> is <colour> <shape>.'); "
                                  "image: a CLIP-trained tower and image needles among the filler, with text needles "
                                  "in --text-share of the records", choices=NEEDLES)
    length: int = setting(256, "training length L in tokens: the longest record, and the model's max_seq_len")
    min_length: int = setting(64, "the shortest training record: lengths are drawn uniformly from here to L")
    n_train: int = setting(6000, "training records")
    keys: int = setting(8, "most text needles per training record: each record draws 1 to this many (fewer where "
                           "they do not fit)")
    questions: int = setting(8, "most text needles asked per training record, one a turn")
    images: int = setting(8, "most images per image-needle record (each draws 2 to this many, 1 to "
                             f"{MAX_IMAGE_QUESTIONS} of them asked about); the grids put this many in L tokens, and "
                             "as many more as a prompt is longer")
    objects: int = setting(1, "shapes per haystack image (1 to 4)")
    text_share: float = setting(0.5, "--needle image: the share of training records with text needles instead")
    system_prompt: str = setting("Answer from the prompt.", "the chat's system prompt, saved with the tokenizer ('' "
                                                           "leaves it out): a short one leaves more of L to the "
                                                           "haystack than Vicuna's")
    vocab_size: int = setting(512, "the BPE's vocabulary")
    llm_layers: int = setting(2, "decoder layers")
    dim: int = setting(128, "decoder width (heads of 16: dim / 16 query heads, half as many key/value heads)")
    clip_images: int = setting(8000, "--needle image: single-object scenes the vision tower's CLIP stage trains on")
    clip: Hyperparams = setting(help="--needle image: the vision tower's CLIP stage (the demo's)",
                                factory=lambda: Recipe().clip)
    training: Hyperparams = setting(help="the training run", factory=lambda: Hyperparams(
        steps=1500, batch_size=32, lr=2e-3, warmup=100, optimizer="muon", random_positions=16, position_chunks=4))
    eval_lengths: tuple[str, ...] = setting(("1x", "2x", "4x", "8x", "16x"), "context lengths of the grids")
    eval_depths: int = setting(11, "needle depths of the grids")
    eval_samples: int = setting(20, "prompts per cell")
    scalings: tuple[str, ...] = setting(SCALINGS, "inference-time RoPE scalings evaluated beside plain RoPE, each "
                                                  "length with its own factor, its multiple of L")
    several: int = setting(4, "text needles in the several-keys and several-questions grids (one asked, then all "
                              "of them), at 1x and 4x with the last of --scalings (0: no such grids)")
    progress: bool = setting(True, "progress bars (--no-progress: none)")

    def __post_init__(self) -> None:
        check_seed(self)
        check_range(self, ("length", "min_length", "n_train", "keys", "questions", "vocab_size", "llm_layers",
                           "clip_images"), low=1)
        check_range(self, ("dim",), low=16)
        check_range(self, ("images",), low=2)
        check_range(self, ("objects",), 1, 4)
        check_range(self, ("text_share",), 0, 1)
        check_range(self, ("several",), low=0)
        if self.needle not in NEEDLES:
            raise OmniInputError(f"--needle {self.needle!r}: use one of {', '.join(NEEDLES)}")
        if self.min_length > self.length:
            raise OmniInputError(f"--min-length {self.min_length} is above --length {self.length}: give at most L")
        if self.questions > self.keys:
            raise OmniInputError(f"--questions {self.questions} asks more needles than --keys {self.keys}")
        unknown = sorted(set(self.scalings) - set(SCALINGS))
        if unknown:
            raise OmniInputError(f"--scalings {','.join(unknown)}: choose among {', '.join(SCALINGS)}")


def architecture(recipe: HaystackRecipe) -> dict[str, Any]:
    """The tiny preset's decoder resized (and its vision tower for image needles, text-only
    otherwise): OmniConfig.from_preset overrides."""
    heads = recipe.dim // 16
    text = {"n_layers": recipe.llm_layers, "dim": recipe.dim, "n_heads": heads, "n_kv_heads": max(1, heads // 2),
            "mlp_dim": recipe.dim * 8 // 3, "max_seq_len": recipe.length}
    return {"text": text} if recipe.needle == "image" else {"vision": None, "text": text}


def write_data(data: Path, recipe: HaystackRecipe) -> Path:
    """The training records (and their images), counted in the tokens of a BPE trained on them.
    Two passes: records measured in characters train the tokenizer, then the records are drawn
    again to its lengths."""
    rng = random.Random(recipe.seed)
    image_seq_len = OmniConfig.from_preset(PRESET).image_seq_len
    shapes = []
    for _ in range(recipe.n_train):
        image = recipe.needle == "image" and rng.random() >= recipe.text_share
        n = rng.randint(2, recipe.images) if image else rng.randint(1, recipe.keys)
        asked = rng.randint(1, min(n, MAX_IMAGE_QUESTIONS)) if image else recipe.questions
        shortest = max(recipe.min_length, recipe.length // 2) if image else recipe.min_length  # room for 2 images
        shapes.append((rng.randint(shortest, recipe.length), image, n, asked))

    def record(i: int, count: TokenCount, length: int, image: bool, n: int, asked: int) -> tuple[dict, list]:
        # A short record holds fewer needles: as many of the drawn ones as fit (each with its question).
        for k in range(n, 1 if image else 0, -1):
            try:
                if image:
                    return make_record(i, recipe.seed, "train", count, length, needle="image", n_images=k,
                                       questions=min(k, asked), objects=recipe.objects)
                return make_record(i, recipe.seed, "train", count, length, keys=k, questions=min(k, asked))
            except OmniInputError:
                if k == (2 if image else 1):
                    raise
        raise AssertionError("unreachable")

    def records(count: TokenCount, save_images: bool) -> list[dict]:
        out = []
        for i, shape in enumerate(shapes):
            made, images = record(i, count, *shape)
            if save_images:
                for picture, name in zip(images, made.get("image", [])):
                    picture.save(data / name, format="PNG")
            out.append(made)
        return out

    (data / "images").mkdir(parents=True, exist_ok=True)
    train_json = data / "train.json"
    write_records(train_json, records(TokenCount(None, image_seq_len, recipe.system_prompt), False))
    tokenizer = train_tokenizer(corpus(train_json, recipe.system_prompt), recipe.vocab_size, recipe.system_prompt)
    tokenizer.save(data / "tokenizer")
    write_records(train_json, records(TokenCount(Tokenizer.from_file(data / "tokenizer"), image_seq_len), True))
    return train_json


def run_haystack(out: str | Path, recipe: HaystackRecipe | None = None) -> dict[str, Any]:
    """Write the data, train (the vision tower first, for image needles), and evaluate the grids;
    returns timings and each grid's report."""
    recipe = recipe or HaystackRecipe()
    out = Path(out)
    check_output_folder(out, "--out")
    for part in ("clip", "instruct", "niah"):  # the recipe owns out/: a rerun starts afresh
        shutil.rmtree(out / part, ignore_errors=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    data = out / "data"
    train_json = write_data(data, recipe)
    vision, clip_eval = None, None
    if recipe.needle == "image":
        size = OmniConfig.from_preset(PRESET).vision.image_size
        shared = dict(image_size=size, n_objects=1, progress=recipe.progress)
        clip_json = write_shapeworld(data, recipe.clip_images, recipe.seed, "clip", **shared)
        clip_test = write_shapeworld(data, 100, recipe.seed, "clip_test", **shared)
    timings["data"] = time.perf_counter() - t0
    if recipe.needle == "image":
        stage = Recipe(preset=PRESET, seed=recipe.seed, clip=recipe.clip, progress=recipe.progress)
        vision, clip_eval, timings["clip"] = train_clip_tower(out / "clip", clip_json, clip_test, data,
                                                              data / "tokenizer", stage)
    summary = train(TrainArgs(**{**vars(recipe.training), "stage": "instruct", "data": train_json,
                                 "image_folder": data, "tokenizer": data / "tokenizer", "preset": PRESET,
                                 "config": architecture(recipe), "vision": vision,
                                 "whiten_projector": vision is not None, "seed": recipe.seed,
                                 "out": out / "instruct", "progress": recipe.progress}))
    timings["train"] = summary["seconds"]
    model = out / "instruct" / "model"
    t0 = time.perf_counter()
    reports = {name: run_niah(args, progress=recipe.progress) for name, args in grids(recipe, model, out / "niah")}
    timings["eval"] = time.perf_counter() - t0
    return {"recipe": to_dict(recipe), "timings": timings, "reports": reports, "model": model, "clip_eval": clip_eval}


def grids(recipe: HaystackRecipe, model: Path, out: Path) -> list[tuple[str, NiahArgs]]:
    """The recipe's `omnilm eval niah` runs, by name: plain RoPE and each scaling at every length,
    with the recipe's needle; then, with the last scaling, several keys and several questions at
    1x and 4x."""
    common = dict(checkpoint=model, depths=recipe.eval_depths, samples=recipe.eval_samples, seed=recipe.seed)
    needle = dict(needle=recipe.needle, images=recipe.images, scale_images=True, objects=recipe.objects)
    runs = []
    for scaling in (None, *recipe.scalings):
        name = scaling or "plain"
        runs.append((name, NiahArgs(**common, **needle, lengths=recipe.eval_lengths, out=out / name,
                                    rope_scaling=None if scaling is None else f"{scaling}:auto")))
    if recipe.several:
        scaling = f"{recipe.scalings[-1]}:auto" if recipe.scalings else None
        for name, asked in (("keys", 1), ("questions", recipe.several)):
            runs.append((f"{recipe.several}-{name}", NiahArgs(
                **common, lengths=("1x", "4x"), keys=recipe.several, questions=asked, rope_scaling=scaling,
                out=out / f"{recipe.several}-{name}")))
    return runs
