"""`omnilm demo` (what `make demo` runs): a multimodal model learns on your CPU in minutes.

It generates ShapeWorld, trains the `tiny` preset through LLaVA-1.5's recipe (CLIP pretraining,
feature alignment, visual instruction tuning), evaluates on held-out images, prints the accuracy
per task family, and answers three questions about held-out images.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from omnilm.eval.clip import format_clip_results
from omnilm.eval.vqa import format_vqa_results
from omnilm.recipes.recipe import Recipe, run_recipe


def run_demo(out: str | Path = "runs/demo", recipe: Recipe | None = None) -> dict:
    t0 = time.perf_counter()
    out = Path(out)
    recipe = recipe or Recipe()
    steps = " -> ".join(f"{stage} ({getattr(recipe, stage).steps} steps)" for stage in recipe.stages)
    print(f"omnilm demo: ShapeWorld, preset {recipe.preset!r}: {recipe.n_train} training images, {recipe.n_test} "
          f"held-out.\nStages: {steps}, then exact-match evaluation. Output: {out}/\n", flush=True)
    result = run_recipe(out, recipe)

    if "clip_eval" in result:
        print("\nCLIP zero-shot on held-out captions (stage clip):")
        print(format_clip_results(result["clip_eval"]))
    print("\nHeld-out exact-match accuracy (stage instruct, greedy):")
    print(format_vqa_results(result["eval"]))

    print("\nThree questions about held-out images:")
    images = {r["id"]: r["image"] for r in json.loads(Path(result["test_json"]).read_text())}
    for p in _three_examples(result["predictions"]):
        image = result["image_folder"] / images[p["id"]]
        print(f"  [{image}] {p['question']}\n    model: {p['prediction']!r}   reference: {p['answer']!r}")
    t = result["timings"]
    print(f"\n{', '.join(f'{k} {v:.0f}s' for k, v in t.items())}; total {time.perf_counter() - t0:.0f}s. "
          f"Model: {out / 'model'} (try: omnilm chat {out / 'model'} --image IMAGE \"How many shapes are there?\")")
    return result


def _three_examples(predictions: list[dict]) -> list[dict]:
    # Single-question records of three different families, so the answers show different skills.
    seen, picked = set(), []
    for p in predictions:
        if p["task"] not in seen and not str(p["id"]).endswith("multi_turn"):
            seen.add(p["task"])
            picked.append(p)
        if len(picked) == 3:
            break
    return picked
