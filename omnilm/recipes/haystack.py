"""A small model learns to retrieve from its prompt, then is measured far past its training length.

`omnilm demo-haystack` runs it (text needles, about 12 minutes on 2 CPU cores; image needles
with `--needle image`). Why each default is what it is, with the runs that
chose it: docs/long-context.md, "Results". Everything lands under `out/`:

    out/data/        train.json: haystack records of `min_length` to `length` tokens, up to `keys`
                     text needles each, all asked as a multi-turn chat (every answer supervised), or
                     with --needle image also records of 2 to `images` images; the images; and
                     tokenizer/ (a BPE trained on the rendered records)
    out/clip/        --needle image: the vision tower's CLIP stage on single-object scenes
    out/instruct/    the training run: metrics.jsonl, loss.png, checkpoints/, model/
    out/niah/<grid>/ one `omnilm eval niah` grid per RoPE choice, then several keys and questions

Retrieval appears abruptly after a plateau and depends on dense supervision (many questions per
sequence, MQAR in the Zoology paper), short records early on and Muon. Length generalisation comes
from PoSE during training (`position_chunks`: pieces of consecutive positions with random skips
between them, over `random_positions` times the record's length) and from log-n attention scaling
at evaluation (`+logn`); the RoPE scalings are measured beside them. Telling several keys apart
takes a short convolution before each attention (`token_conv`), which puts the end of a key
beside its value and the end of the question beside the answer.
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
from omnilm.data.shapeworld import MAX_OBJECTS, write_shapeworld
from omnilm.data.tokenizer import Tokenizer
from omnilm.errors import OmniInputError
from omnilm.eval.niah import MAX_DEPTHS, ROPE_SCALINGS, Grid, NiahArgs, run_niah
from omnilm.recipes.recipe import Recipe, train_clip_tower
from omnilm.settings import check_output_folder, check_range, check_seed, setting, to_dict
from omnilm.train import Hyperparams, TrainArgs, train
from omnilm.train.stages import corpus

ROPES = ("plain", *ROPE_SCALINGS)  # plain RoPE, or an inference-time scaling at each length's factor
LOGN = "+logn"  # a grid name's suffix: log-n attention scaling on top
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
    images: int = setting(4, "most images per image-needle record (each draws 2 to this many, 1 to "
                             f"{MAX_IMAGE_QUESTIONS} of them asked about); the grids put this many in L tokens, and "
                             "as many more as a prompt is longer")
    objects: int = setting(1, f"shapes per haystack image (1 to {MAX_OBJECTS})")
    text_share: float = setting(0.1, "--needle image: the share of training records with text needles instead (at "
                                     "0.5 the image needles stayed near 64% at 1x: docs/long-context.md)")
    system_prompt: str = setting("Answer from the prompt.", "the chat's system prompt, saved with the tokenizer ('' "
                                                           "leaves it out): a short one leaves more of L to the "
                                                           "haystack than Vicuna's")
    vocab_size: int = setting(512, "the BPE's vocabulary")
    llm_layers: int = setting(2, "decoder layers")
    dim: int = setting(128, "decoder width")
    token_conv: int = setting(6, "kernel of a short causal convolution before each layer's attention "
                                 "(TextConfig.token_conv; 0: none): it puts a key's last pieces beside its value and "
                                 "the question's key beside the answer, where one attention layer can match them")
    head_dim: int = setting(32, "width of each attention head: dim / head_dim query heads, half as many key/value "
                                "heads")
    clip_images: int = setting(8000, "--needle image: single-object scenes the vision tower's CLIP stage trains on")
    clip: Hyperparams = setting(help="--needle image: the vision tower's CLIP stage (the demo's)",
                                factory=lambda: Recipe().clip)
    training: Hyperparams = setting(help="the training run", factory=lambda: Hyperparams(
        steps=2000, batch_size=32, lr=2e-3, warmup=100, optimizer="muon", random_positions=16, position_chunks=4))
    eval_lengths: tuple[str, ...] = setting(("1x", "2x", "4x", "8x", "16x"), "context lengths of the grids")
    eval_depths: int = setting(11, "needle depths of the text grids")
    crowded_depths: int = setting(6, "needle depths of the grids whose prompts hold more than one needle (images, "
                                     "several keys): they leave fewer places between the filler's sentences at 1x")
    grids: tuple[str, ...] = setting(("plain+logn", "plain", "linear", "dynamic", "yarn"),
                                     "what each grid evaluates with: plain RoPE or an inference-time scaling (linear, "
                                     "dynamic, yarn: each length at its own factor, its multiple of L), +logn for "
                                     "log-n attention scaling on top; the first is the main grid")
    eval_samples: int = setting(20, "prompts per cell of the main grid")
    compare_samples: int = setting(5, "prompts per cell of the other grids")
    several: int = setting(4, "text needles in the several-keys and several-questions grids (one asked, then all "
                              "of them), at 1x and 4x as the main grid (0: no such grids)")
    progress: bool = setting(True, "progress bars (--no-progress: none)")

    def __post_init__(self) -> None:
        check_seed(self)
        check_range(self, ("length", "min_length", "n_train", "keys", "questions", "vocab_size", "llm_layers",
                           "clip_images"), low=1)
        check_range(self, ("head_dim",), low=2)
        check_range(self, ("dim",), low=self.head_dim)
        if self.dim % self.head_dim or self.head_dim % 2:
            raise OmniInputError(f"--dim {self.dim} is not a multiple of an even --head-dim {self.head_dim}: give "
                                 "a width that whole heads make up, e.g. --dim 128 --head-dim 32")
        check_range(self, ("images",), low=2)
        check_range(self, ("objects",), 1, MAX_OBJECTS)
        check_range(self, ("text_share",), 0, 1)
        check_range(self, ("several",), low=0)
        check_range(self, ("eval_depths", "crowded_depths"), 2, MAX_DEPTHS)
        if self.needle not in NEEDLES:
            raise OmniInputError(f"--needle {self.needle!r}: use one of {', '.join(NEEDLES)}")
        if self.min_length > self.length:
            raise OmniInputError(f"--min-length {self.min_length} is above --length {self.length}: give at most L")
        if self.questions > self.keys:
            raise OmniInputError(f"--questions {self.questions} asks more needles than --keys {self.keys}")
        check_range(self, ("eval_samples", "compare_samples"), low=1)
        self.grids = tuple(self.grids)
        unknown = [g for g in self.grids if g.removesuffix(LOGN) not in ROPES]
        if unknown or not self.grids:
            raise OmniInputError(f"--grids {','.join(unknown or self.grids) or 'is empty'}: give one or more of "
                                 f"{', '.join(ROPES)}, each maybe with {LOGN} (e.g. plain{LOGN},yarn)")


def architecture(recipe: HaystackRecipe) -> dict[str, Any]:
    """The tiny preset's decoder resized (and its vision tower for image needles, text-only
    otherwise): OmniConfig.from_preset overrides."""
    heads = recipe.dim // recipe.head_dim
    text = {"n_layers": recipe.llm_layers, "dim": recipe.dim, "n_heads": heads, "n_kv_heads": max(1, heads // 2),
            "mlp_dim": recipe.dim * 8 // 3, "max_seq_len": recipe.length, "token_conv": recipe.token_conv}
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
        # A short record holds fewer needles: as many of the drawn ones as fit (each with its question),
        # down to the fewest a record has (two images: the needle and another; one text needle).
        fewest = 2 if image else 1
        for k in range(n, fewest - 1, -1):
            needles = dict(needle="image", n_images=k, objects=recipe.objects) if image else dict(keys=k)
            try:
                return make_record(i, recipe.seed, "train", count, length, questions=min(k, asked), **needles)
            except OmniInputError:
                if k == fewest:
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
    model = out / "instruct" / "model"
    runs = grids(recipe, model, out / "niah")
    check_grids(runs, Tokenizer.from_file(data / "tokenizer"), recipe.length)  # before minutes of training
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
    t0 = time.perf_counter()
    reports = {name: run_niah(args, progress=recipe.progress) for name, args in runs}
    timings["eval"] = time.perf_counter() - t0
    return {"recipe": to_dict(recipe), "timings": timings, "reports": reports, "model": model, "clip_eval": clip_eval}


def grids(recipe: HaystackRecipe, model: Path, out: Path) -> list[tuple[str, NiahArgs]]:
    """The recipe's `omnilm eval niah` runs, by name: each of `recipe.grids` at every length with
    the recipe's needle (the first with `eval_samples` prompts a cell, the others with
    `compare_samples`); then, as the first, several keys and several questions at 1x and 4x."""

    def rope(grid: str) -> dict[str, Any]:
        kind = grid.removesuffix(LOGN)
        return {"rope_scaling": None if kind == "plain" else f"{kind}:auto", "logn": grid.endswith(LOGN)}

    depths = recipe.crowded_depths if recipe.needle == "image" else recipe.eval_depths
    runs = [(grid, NiahArgs(checkpoint=model, needle=recipe.needle, images=recipe.images, scale_images=True,
                            objects=recipe.objects, depths=depths, lengths=recipe.eval_lengths, seed=recipe.seed,
                            samples=recipe.eval_samples if i == 0 else recipe.compare_samples, out=out / grid,
                            **rope(grid)))
            for i, grid in enumerate(recipe.grids)]
    if recipe.several:
        for name, asked in (("keys", 1), ("questions", recipe.several)):
            grid = f"{recipe.several}-{name}"
            runs.append((grid, NiahArgs(checkpoint=model, depths=recipe.crowded_depths, lengths=("1x", "4x"),
                                        keys=recipe.several, questions=asked, samples=recipe.eval_samples,
                                        seed=recipe.seed, out=out / grid, **rope(recipe.grids[0]))))
    return runs


def check_grids(runs: list[tuple[str, NiahArgs]], tokenizer: Tokenizer, trained: int) -> None:
    """Every grid's lengths hold its needles and its shortest prompt has a place for each depth
    (what `omnilm eval niah` checks once the model exists), for a model trained at `trained`
    tokens with `tokenizer`."""
    count = TokenCount(tokenizer, OmniConfig.from_preset(PRESET).image_seq_len)
    for name, run in runs:
        try:
            Grid(run, "shapeworld", count, trained).check()
        except OmniInputError as e:
            raise OmniInputError(f"grid {name}: {e}") from None
