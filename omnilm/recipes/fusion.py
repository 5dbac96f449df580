"""`omnilm bench fusion`: the four fusion modes trained on the same data, compared.

Each mode (and a text-only baseline that never sees the images) is trained by the same
instruct stage on the same interleaved ShapeWorld data, with the same seed, step budget and
optimizer, then scored on the same held-out questions, single- and multi-image. Joint, late and
cross-attention read the same vision tower, frozen: one CLIP ViT trained first by the demo's stage
clip (as LLaVA and Flamingo start from a pretrained encoder; with `clip=False` a random ViT);
early fusion has none.

    out/data/                 train.json, test.json, clip.json, images/, tokenizer/
    out/clip/                 stage clip (model/ is the tower the modes read), clip_eval.json
    out/<mode>/               the instruct run (metrics.jsonl, loss.png, model/), eval.json, predictions.jsonl
    out/results.json          every figure below
    DOCS/fusion_table.md, DOCS/fusion.png   (with --docs DOCS) the table and bar chart docs/fusion.md shows
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from omnilm.data.collate import to_device
from omnilm.data.llava_json import read_records
from omnilm.data.shapeworld import FAMILIES, MULTI_FAMILIES
from omnilm.config import OmniConfig
from omnilm.errors import OmniInputError
from omnilm.eval.clip import format_clip_results
from omnilm.eval.vqa import evaluate_vqa, questions, write_predictions
from omnilm.infer import generate
from omnilm.io import write_json, write_text
from omnilm.recipes.recipe import Recipe, architecture, stage_args, train_clip_tower, write_data
from omnilm.settings import check_output_folder, check_range, setting
from omnilm.train import train

MODES = ("text_only", "joint", "early", "late", "cross_attention")
ENCODER_MODES = ("joint", "late", "cross_attention")  # the modes that read a vision tower
TASKS = ("caption", *FAMILIES, *MULTI_FAMILIES, "multi_turn")


def bench_recipe() -> Recipe:
    """The demo's recipe as the bench runs it: instruct for 700 steps, which keeps five modes, CLIP
    and data under 30 minutes on 2 CPU cores (the multi-image look-up comes later: docs/fusion.md);
    cross-attention's tanh gates at their own rate, as they start at 0 and Adam moves a scalar about
    its learning rate a step; records of similar length batched together, as multi-image chats are
    up to three times as long as single-image ones."""
    recipe = Recipe()
    return replace(recipe, stages=("clip", "instruct"), instruct=replace(recipe.instruct, steps=700, warmup=35, gate_lr=0.02, group_by_length=True,
                                            tasks=None, whiten_projector=False))


@dataclass(kw_only=True)
class FusionBench:
    """The fusion benchmark: the demo's recipe (`recipe`, instruct as `bench_recipe` sets it) plus
    what is the bench's own."""

    out: Path = setting(Path("runs/bench-fusion"), "run folder")
    modes: tuple[str, ...] = setting(MODES, f"comma-separated subset of {','.join(MODES)}")
    cross_attention_every: int = setting(1, "a gated cross-attention block before every N-th decoder layer (1: "
                                            "every layer, Flamingo-3B's spacing)", metavar="N")
    # Half the examples single-image (a chat of every question family, and a caption record that
    # only --captions trains on), half multi-image (a question, or a chat, then follow-up questions).
    multi_image: float = setting(0.5, "fraction of examples with 2 to 4 interleaved images", metavar="P")
    captions: bool = setting(False, "also train on the caption records (default: questions only, as the demo's "
                                    "instruct stage)")
    clip: bool = setting(True, "train the vision tower that joint, late and cross-attention read first, with the "
                               "demo's stage clip (--no-clip: the modes read a random frozen tower)")
    docs: Path | None = setting(None, "also write fusion_table.md and fusion.png into this folder (e.g. docs)")
    recipe: Recipe = setting(help="the demo's recipe", factory=bench_recipe)

    def __post_init__(self) -> None:
        # Checked here, before any data is written, so that the library and the CLI refuse alike.
        self.out = Path(self.out)
        self.modes = tuple(self.modes)
        unknown = [m for m in self.modes if m not in MODES]
        if not self.modes:
            raise OmniInputError(f"--modes is empty; give some of {', '.join(MODES)}")
        if unknown:
            raise OmniInputError(f"--modes: unknown {', '.join(unknown)}; choose from {', '.join(MODES)}")
        if "cross_attention" in self.modes:  # the config checks it; here, before any data is written
            try:
                OmniConfig.from_preset(self.recipe.preset, **architecture(self.recipe), fusion="cross_attention",
                                       cross_attention_every=self.cross_attention_every)
            except ValueError as e:
                raise OmniInputError(f"--cross-attention-every: {e}") from None
        check_range(self, ("multi_image",), 0, 1)
        check_output_folder(self.out, "--out")
        if self.docs is not None:
            check_output_folder(self.docs, "--docs")
        # The recipe's data for this bench: stage clip's scenes only where a tower is trained.
        self.recipe = replace(self.recipe, stages=("clip", "instruct") if self.trains_clip else ("instruct",))

    @property
    def trains_clip(self) -> bool:
        """Whether the bench trains a CLIP tower first: asked to, and a mode that reads one."""
        return self.clip and any(mode in ENCODER_MODES for mode in self.modes)


# The command line's view of the bench (omnilm.settings): the recipe's instruct settings unprefixed
# (--steps, --lr), its stage clip's as --clip-*; what each mode decides for itself, and the stages
# the bench does not run, get no flag.
BENCH_FLAGS = dict(
    prefixes={"recipe": "", "recipe.instruct": "", "recipe.clip": "clip-"},
    skip=("recipe.align", "recipe.stages", "recipe.questions", "recipe.clip_objects", "recipe.vision_feature_layer",
          *(f"recipe.{stage}.{name}" for stage in ("clip", "instruct")
            for name in ("tasks", "whiten_projector", "train_vision", "vision_lr")),
          *(f"recipe.clip.{name}" for name in ("projector_lr", "gate_lr", "group_by_length")),
          "recipe.instruct.patch_lr"),
)


def _strip_images(records: list[dict]) -> list[dict]:
    """The text-only baseline's view: the same chats with every image and marker removed."""
    out = []
    for r in records:
        r = {k: v for k, v in r.items() if k != "image"}
        r["conversations"] = [{**t, "value": " ".join(t["value"].replace("<image>", " ").split())}
                              for t in r["conversations"]]
        out.append(r)
    return out


def make_data(bench: FusionBench) -> tuple[Path, Path]:
    """ShapeWorld with multi-image examples, its text-only copy, one tokenizer for all, and (when
    the bench `trains_clip`) the single-object scenes of stage clip."""
    train_json, test_json, _ = write_data(bench.out / "data", bench.recipe, multi_image=bench.multi_image)
    for path in (train_json, test_json):
        write_json(path.with_name(path.stem + "_text.json"), _strip_images(read_records(path)))
    return train_json, test_json


def _generation_latency(model, processor, record: dict, folder: Path, repeats: int = 7) -> float:
    """Median seconds for a greedy 8-token answer to one held-out multi-image prompt, batch 1."""
    q = questions([record])[-1]
    device = next(model.parameters()).device
    inputs = to_device(processor([q["chat"]], images=[[str(folder / name) for name in q["images"]]]), device)
    times = []
    for _ in range(repeats + 1):  # the first warms up
        t = time.perf_counter()
        generate(model, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"], max_new_tokens=8,
                 stop_token_ids=[])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def run_mode(bench: FusionBench, mode: str, train_json: Path, test_json: Path,
             vision: Path | None = None) -> dict[str, Any]:
    """Train `mode` (reading the CLIP tower `vision` if it has a vision encoder), score it, time it."""
    recipe = bench.recipe
    data = bench.out / "data"
    text_only = mode == "text_only"
    if text_only:
        train_json, test_json = (p.with_name(p.stem + "_text.json") for p in (train_json, test_json))
    overrides = {"vision": None} if text_only else {"fusion": mode}
    if mode == "cross_attention":
        overrides["cross_attention_every"] = bench.cross_attention_every
    out = bench.out / mode
    summary = train(stage_args(
        recipe.instruct, stage="instruct", data=train_json, image_folder=data, out=out, preset=recipe.preset,
        tokenizer=data / "tokenizer", vision=vision if mode in ENCODER_MODES else None, seed=recipe.seed,
        projector_lr=None if text_only else recipe.instruct.projector_lr,
        gate_lr=recipe.instruct.gate_lr if mode == "cross_attention" else None,
        tasks=TASKS if bench.captions else tuple(t for t in TASKS if t != "caption"),
        whiten_projector=mode in ("joint", "late"), config={**architecture(recipe), **overrides},
        progress=recipe.progress, resume=False))
    model, processor = summary["model"].eval(), summary["processor"]
    records = read_records(test_json)
    evaluation, predictions = evaluate_vqa(model, processor, records, data, progress=recipe.progress)
    write_predictions(predictions, out / "predictions.jsonl")
    write_json(out / "eval.json", evaluation)
    steps = [json.loads(line)["step_s"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    multi = next(r for r in read_records(bench.out / "data" / "test.json") if isinstance(r.get("image"), list))
    if text_only:
        multi = _strip_images([multi])[0]
    return {
        "mode": mode,
        "eval": evaluation,
        "parameters": model.num_parameters(),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "tokens_per_image": model.config.image_seq_len,
        "step_s": statistics.median(steps[len(steps) // 10:]),  # past the warm-up steps
        "latency_s": _generation_latency(model, processor, multi, data),
        "train_s": summary["seconds"],
    }


def _group(evaluation: dict, families) -> tuple[float, int]:
    tasks = evaluation["tasks"]
    n = sum(tasks[f]["n"] for f in families if f in tasks)
    right = sum(tasks[f]["n"] * tasks[f]["accuracy"] for f in families if f in tasks)
    return (right / n if n else float("nan")), n


def format_fusion_table(results: list[dict[str, Any]]) -> str:
    """The Markdown table: per-task accuracy, single- and multi-image means, sizes and speed."""
    tasks = [t for t in (*FAMILIES, *MULTI_FAMILIES) if any(t in r["eval"]["tasks"] for r in results)]
    head = ["mode", *[t.removeprefix("multi_") + (" (multi)" if t.startswith("multi_") else "") for t in tasks],
            "single-image", "multi-image", "trainable / total params", "tokens per image", "train step", "latency (8 tokens)"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in results:
        accs = [f"{100 * r['eval']['tasks'][t]['accuracy']:.1f}" if t in r["eval"]["tasks"] else "–" for t in tasks]
        single, multi = _group(r["eval"], FAMILIES)[0], _group(r["eval"], MULTI_FAMILIES)[0]
        lines.append("| " + " | ".join([
            r["mode"], *accs, f"**{100 * single:.1f}**", f"**{100 * multi:.1f}**",
            f"{r['trainable'] / 1e6:.2f} M / {r['parameters'] / 1e6:.2f} M", str(r["tokens_per_image"] or "–"),
            f"{r['step_s']:.3f} s", f"{1000 * r['latency_s']:.0f} ms"]) + " |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Grouped bars: per mode, accuracy on each single-image family and each multi-image one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in (*FAMILIES, *MULTI_FAMILIES) if any(t in r["eval"]["tasks"] for r in results)]
    fig, ax = plt.subplots(figsize=(12, 4))
    width = 0.8 / len(results)
    for i, r in enumerate(results):
        ys = [100 * r["eval"]["tasks"].get(t, {}).get("accuracy", 0.0) for t in tasks]
        ax.bar([j + i * width for j in range(len(tasks))], ys, width, label=r["mode"])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks, rotation=20, ha="right")
    ax.set_ylabel("held-out exact match (%)")
    ax.set_ylim(0, 100)
    ax.legend(ncol=len(results), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 1.15))
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def run_fusion_bench(bench: FusionBench) -> list[dict[str, Any]]:
    """Train and score every mode of `bench.modes`; print the table; with `bench.docs`, write
    docs/fusion.md's table file (`fusion_table.md`) and `fusion.png` there."""
    t0 = time.perf_counter()
    bench.out.mkdir(parents=True, exist_ok=True)
    train_json, test_json = make_data(bench)
    vision = None
    if bench.trains_clip:
        print(f"fusion bench: training the CLIP tower ({bench.recipe.clip.steps} steps) ...", flush=True)
        shutil.rmtree(bench.out / "clip", ignore_errors=True)
        data = bench.out / "data"
        vision, clip_eval, _ = train_clip_tower(bench.out / "clip", data / "clip.json", test_json, data,
                                                data / "tokenizer", bench.recipe)
        write_json(bench.out / "clip_eval.json", clip_eval)
        print(format_clip_results(clip_eval), flush=True)
    results = []
    steps = bench.recipe.instruct.steps
    for mode in bench.modes:
        print(f"fusion bench: training {mode} ({steps} steps) ...", flush=True)
        shutil.rmtree(bench.out / mode, ignore_errors=True)
        results.append(run_mode(bench, mode, train_json, test_json, vision))
        write_json(bench.out / "results.json", results)
    table = format_fusion_table(results)
    minutes = (time.perf_counter() - t0) / 60
    print(f"\n{table}\n\n{len(results)} runs of {steps} steps in {minutes:.1f} min (data included)")
    if bench.docs is not None:
        bench.docs.mkdir(parents=True, exist_ok=True)
        write_text(bench.docs / "fusion_table.md", table + "\n")
        plot(results, bench.docs / "fusion.png")
    return results
