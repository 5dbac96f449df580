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

from omnilm.data import train_tokenizer
from omnilm.data.haystack import TokenCount, make_record
from omnilm.data.llava_json import write_records
from omnilm.data.tokenizer import Tokenizer
from omnilm.errors import OmniInputError
from omnilm.eval.niah import NiahArgs, run_niah
from omnilm.settings import check_output_folder, check_range, check_seed, setting, to_dict
from omnilm.train import Hyperparams, TrainArgs, train
from omnilm.train.stages import corpus

SCALINGS = ("linear", "dynamic", "yarn")


@dataclass(kw_only=True)
class HaystackRecipe:
    """What `omnilm demo --task haystack` trains and measures."""

    seed: int = setting(0, "seed of the data, the weights and the batch order")
    length: int = setting(256, "training length L in tokens: the longest record, and the model's max_seq_len")
    min_length: int = setting(64, "the shortest training record: lengths are drawn uniformly from here to L")
    n_train: int = setting(6000, "training records")
    keys: int = setting(8, "most needles per training record: each record draws 1 to this many (fewer where "
                           "they do not fit)")
    questions: int = setting(8, "most needles asked per training record, one a turn")
    vocab_size: int = setting(512, "the BPE's vocabulary")
    llm_layers: int = setting(2, "decoder layers")
    dim: int = setting(128, "decoder width (heads of 16: dim / 16 query heads, half as many key/value heads)")
    training: Hyperparams = setting(help="the training run", factory=lambda: Hyperparams(
        steps=1500, batch_size=32, lr=2e-3, warmup=100, optimizer="muon", random_positions=16, position_chunks=4))
    eval_lengths: tuple[str, ...] = setting(("1x", "2x", "4x", "8x", "16x"), "context lengths of the grids")
    eval_depths: int = setting(11, "needle depths of the grids")
    eval_samples: int = setting(20, "prompts per cell")
    scalings: tuple[str, ...] = setting(SCALINGS, "inference-time RoPE scalings evaluated beside plain RoPE, each "
                                                  "length with its own factor, its multiple of L")
    progress: bool = setting(True, "progress bars (--no-progress: none)")

    def __post_init__(self) -> None:
        check_seed(self)
        check_range(self, ("length", "min_length", "n_train", "keys", "questions", "vocab_size", "llm_layers"), low=1)
        check_range(self, ("dim",), low=16)
        if self.min_length > self.length:
            raise OmniInputError(f"--min-length {self.min_length} is above --length {self.length}: give at most L")
        if self.questions > self.keys:
            raise OmniInputError(f"--questions {self.questions} asks more needles than --keys {self.keys}")
        unknown = sorted(set(self.scalings) - set(SCALINGS))
        if unknown:
            raise OmniInputError(f"--scalings {','.join(unknown)}: choose among {', '.join(SCALINGS)}")


def architecture(recipe: HaystackRecipe) -> dict[str, Any]:
    """A text-only decoder (the tiny preset's, resized): OmniConfig.from_preset overrides."""
    heads = recipe.dim // 16
    return {"vision": None, "text": {"n_layers": recipe.llm_layers, "dim": recipe.dim, "n_heads": heads,
                                     "n_kv_heads": max(1, heads // 2), "mlp_dim": recipe.dim * 8 // 3,
                                     "max_seq_len": recipe.length}}


def write_data(data: Path, recipe: HaystackRecipe) -> Path:
    """The training records, counted in the tokens of a BPE trained on them. Two passes: records
    measured in characters train the tokenizer, then the records are drawn again to its lengths."""
    rng = random.Random(recipe.seed)
    shapes = [(rng.randint(recipe.min_length, recipe.length), rng.randint(1, recipe.keys))
              for _ in range(recipe.n_train)]

    def record(i: int, count: TokenCount, length: int, keys: int) -> dict:
        # A short record holds fewer needles: as many of the drawn ones as fit (each with its question).
        for k in range(keys, 0, -1):
            try:
                return make_record(i, recipe.seed, "train", count, length, keys=k,
                                   questions=min(k, recipe.questions))[0]
            except OmniInputError:
                if k == 1:
                    raise
        raise AssertionError("unreachable")

    def records(count: TokenCount) -> list[dict]:
        return [record(i, count, length, keys) for i, (length, keys) in enumerate(shapes)]

    data.mkdir(parents=True, exist_ok=True)
    train_json = data / "train.json"
    write_records(train_json, records(TokenCount(None)))
    tokenizer = train_tokenizer(corpus(train_json), vocab_size=recipe.vocab_size)
    tokenizer.save(data / "tokenizer")
    write_records(train_json, records(TokenCount(Tokenizer.from_file(data / "tokenizer"))))
    return train_json


def run_haystack(out: str | Path, recipe: HaystackRecipe | None = None) -> dict[str, Any]:
    """Write the data, train, and evaluate the grids; returns timings and each grid's report."""
    recipe = recipe or HaystackRecipe()
    out = Path(out)
    check_output_folder(out, "--out")
    for part in ("instruct", "niah"):  # the recipe owns out/: a rerun starts afresh
        shutil.rmtree(out / part, ignore_errors=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    train_json = write_data(out / "data", recipe)
    timings["data"] = time.perf_counter() - t0
    summary = train(TrainArgs(**{**vars(recipe.training), "stage": "instruct", "data": train_json,
                                 "image_folder": out / "data", "tokenizer": out / "data" / "tokenizer",
                                 "preset": "tiny", "config": architecture(recipe), "seed": recipe.seed,
                                 "out": out / "instruct", "progress": recipe.progress}))
    timings["train"] = summary["seconds"]
    model = out / "instruct" / "model"
    reports = {}
    t0 = time.perf_counter()
    for scaling in (None, *recipe.scalings):
        name = scaling or "plain"
        reports[name] = run_niah(NiahArgs(checkpoint=model, lengths=recipe.eval_lengths, depths=recipe.eval_depths,
                                          samples=recipe.eval_samples, out=out / "niah" / name, seed=recipe.seed,
                                          rope_scaling=None if scaling is None else f"{scaling}:auto"),
                                 progress=recipe.progress)
    timings["eval"] = time.perf_counter() - t0
    return {"recipe": to_dict(recipe), "timings": timings, "reports": reports, "model": model}
