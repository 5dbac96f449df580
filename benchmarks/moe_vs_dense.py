"""Dense against sparse: the ShapeWorld recipe with the `tiny` decoder and with `tiny-moe` (8 experts,
2 per token, each half as wide: the same parameters per token, twice as many in all), same data,
seed and step budget. Prints held-out accuracy per task family, parameters (total and active per
token), and stage instruct's median training step time, model FLOPs utilisation and energy per
token (its cost.json: omnilm.cost).

    python benchmarks/moe_vs_dense.py [--out runs/bench-moe] [--scale 1.0]

`--scale` multiplies every stage's steps (0.25 for a quick look). About 2 × the demo's time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench-moe")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps by this")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from omnilm.recipes.recipe import Recipe, run_recipe

    base = Recipe(seed=args.seed, progress=False).scaled(args.scale)
    results = {}
    for preset in ("tiny", "tiny-moe"):
        print(f"running: {preset} ...", flush=True)
        out = Path(args.out) / preset
        r = run_recipe(out, dataclasses.replace(base, preset=preset))
        rows = [json.loads(line) for line in (out / "instruct" / "metrics.jsonl").read_text().splitlines()]
        r["step_s"] = statistics.median(row["step_s"] for row in rows)
        r["cost"] = json.loads((out / "instruct" / "cost.json").read_text())
        results[preset] = r

    tasks = sorted(results["tiny"]["eval"]["tasks"])
    print(f"\nSame data, seed and budget: clip {base.clip.steps}, align {base.align.steps}, "
          f"instruct {base.instruct.steps} steps.\n")
    print("| preset | parameters | active per token | instruct step | MFU | J/token | " + " | ".join(tasks)
          + " | overall |")
    print("|---|---:|---:|---:|---:|---:|" + "---:|" * (len(tasks) + 1))
    for preset, r in results.items():
        m, cost = r["model"], r["cost"]
        accs = " | ".join(f"{100 * r['eval']['tasks'][t]['accuracy']:.1f}" for t in tasks)
        print(f"| {preset} | {m.num_parameters() / 1e6:.2f} M | {m.num_parameters(active_only=True) / 1e6:.2f} M "
              f"| {r['step_s']:.3f} s | {100 * cost['mfu']:.2f}% | {cost['joules_per_token']:.3g} | {accs} "
              f"| **{100 * r['eval']['accuracy']:.1f}** |")
    print(f"\nMFU against torch.mm's {cost['peak_dtype']} peak measured here; energy: {cost['energy_method']} "
          f"({cost['energy_note']})")
    print(f"\nRouting plots: {Path(args.out) / 'tiny-moe' / 'instruct' / 'routing.png'}")


if __name__ == "__main__":
    main()
