"""A frozen tower's cached features (`--cache-features`) against running the tower every step, on
`omnilm demo-video`'s training: ShapeWorld clips and haystack clips, the same model and batches.

Each arm trains the recipe's model from the same start for `--steps` steps (two epochs of the
clips by default, so that the second one meets every frame again) and reads the seconds of every
step from its metrics; the table gives the median step of each epoch and their ratio (> 1: the
cache faster). The arms run one after the other in this process, on 2 threads, nothing else
running. Their losses start equal and then drift apart, as any change of float rounding makes them
(a frame's features computed in another batch differ in the last bits).

    python benchmarks/feature_cache.py [--clips 600] [--needles 200] [--steps 0 (two epochs)]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from pathlib import Path

import torch

from omnilm.data.llava_json import read_records
from omnilm.data.tokenizer import Tokenizer
from omnilm.recipes.video import PRESET, VideoRecipe, write_data
from omnilm.train import TrainArgs, train


def run(data: Path, train_json: Path, recipe: VideoRecipe, steps: int, cache: float, out: Path) -> list[dict]:
    video_token_id = Tokenizer.from_file(data / "tokenizer").video_token_id
    train(TrainArgs(**{**vars(recipe.instruct), "steps": steps, "stage": "instruct", "data": train_json,
                       "image_folder": data, "out": out, "tokenizer": data / "tokenizer", "preset": PRESET,
                       "seed": 0, "progress": False, "config": recipe.architecture(video_token_id),
                       "video_frames": 0, "cache_features": cache, "log_every": 1}))
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=600, help="training clips (one conversation each)")
    ap.add_argument("--needles", type=int, default=200, help="haystack clips of 1 to 32 frames")
    ap.add_argument("--steps", type=int, default=0, help="steps per arm (0: two epochs)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    recipe = VideoRecipe(n_train=args.clips, n_needles=args.needles, n_test=1, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        train_json, _ = write_data(data, recipe)
        per_epoch = math.ceil(len(read_records(train_json)) / recipe.instruct.batch_size)
        steps = args.steps or 2 * per_epoch
        arms = {name: run(data, train_json, recipe, steps, cache, Path(tmp) / name)
                for name, cache in (("tower every step", 0.0), ("cached features", 4.0))}
    print(f"{per_epoch} steps an epoch of batch {recipe.instruct.batch_size}, {steps} steps, {args.threads} threads\n")
    print("| arm | epoch 1 median step s | epoch 2 median step s | loss, step 1 | mean loss, last 10 steps |\n"
          "|---|---:|---:|---:|---:|")
    medians = {}
    for name, rows in arms.items():
        first = statistics.median(r["step_s"] for r in rows[:per_epoch])
        second = statistics.median(r["step_s"] for r in rows[per_epoch:])
        medians[name] = second
        print(f"| {name} | {first:.3f} | {second:.3f} | {rows[0]['loss']:.4f} | "
              f"{statistics.mean(r['loss'] for r in rows[-10:]):.4f} |")
    print(f"\nepoch 2: cached features {medians['tower every step'] / medians['cached features']:.2f}x as fast")


if __name__ == "__main__":
    main()
