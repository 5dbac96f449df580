"""Does LLaVA's recipe pay? The full recipe (clip -> align -> instruct) against instruction tuning
alone from a randomly initialised vision encoder, at the same total number of optimizer steps,
same data, seed and model. Prints held-out accuracy per task family for both, the CLIP zero-shot
figures, and wall time per stage.

    python benchmarks/recipe.py [--out runs/bench-recipe] [--scale 1.0]

`--scale` multiplies every stage's steps (0.25 for a quick look). About 2 × the demo's time.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench-recipe")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps by this")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from omnilm.eval.clip import format_clip_results
    from omnilm.recipes.recipe import Recipe, run_recipe

    base = Recipe(seed=args.seed, progress=False)
    full = base.scaled(args.scale)
    budget = full.clip.steps + full.align.steps + full.instruct.steps
    alone = dataclasses.replace(full, stages=("instruct",), instruct=full.instruct.scaled(budget / full.instruct.steps))

    results = {}
    for name, recipe in [("clip -> align -> instruct", full), ("instruct only (random vision)", alone)]:
        print(f"running: {name} ...", flush=True)
        results[name] = run_recipe(Path(args.out) / name.split()[0], recipe)

    tasks = sorted(next(iter(results.values()))["eval"]["tasks"])
    tower = f"trains at lr {base.instruct.vision_lr or base.instruct.lr}" if base.instruct.train_vision else "is frozen"
    print(f"\nSame total budget: {budget} optimizer steps; in instruct the vision encoder {tower} in both, "
          f"and the projector starts {'whitened' if base.instruct.whiten_projector else 'at random'}.\n")
    print("| recipe | " + " | ".join(tasks) + " | overall | wall time |")
    print("|---|" + "---:|" * (len(tasks) + 2))
    for name, r in results.items():
        accs = " | ".join(f"{100 * r['eval']['tasks'][t]['accuracy']:.1f}" for t in tasks)
        print(f"| {name} | {accs} | **{100 * r['eval']['accuracy']:.1f}** | {sum(r['timings'].values()):.0f}s |")
    clip = results["clip -> align -> instruct"].get("clip_eval")
    if clip:
        print("\nCLIP zero-shot (held-out captions) after stage clip:")
        print(format_clip_results(clip))


if __name__ == "__main__":
    main()
