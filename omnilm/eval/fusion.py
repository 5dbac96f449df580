"""`omnilm bench fusion`: the four fusion modes trained on the same data, compared.

Each mode (and a text-only baseline that never sees the images) is trained by the same
instruct stage on the same interleaved ShapeWorld data, with the same seed, step budget and
optimizer, then scored on the same held-out questions, single- and multi-image. Joint, late and
cross-attention read the same vision tower, frozen: one CLIP ViT trained first by the demo's stage
clip (as LLaVA and Flamingo start from a pretrained encoder; with `clip_steps=0` a random ViT);
early fusion has none.

    out/data/                 train.json, test.json, clip.json, images/, tokenizer/
    out/clip/                 stage clip (model/ is the tower the modes read), clip_eval.json
    out/<mode>/               the instruct run (metrics.jsonl, loss.png, model/), eval.json, predictions.jsonl
    out/results.json          every figure below
    docs/fusion.md, docs/fusion.png   (with --docs) the table and the bar chart the README shows
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from omnilm.data.shapeworld import FAMILIES, MULTI_FAMILIES
from omnilm.errors import OmniInputError
from omnilm.io import write_json, write_text
from omnilm.train.recipe import Recipe

MODES = ("text_only", "joint", "early", "late", "cross_attention")
ENCODER_MODES = ("joint", "late", "cross_attention")  # the modes that read a vision tower
TASKS = ["caption", *FAMILIES, *MULTI_FAMILIES, "multi_turn"]


@dataclass
class FusionBench:
    out: Path = Path("runs/bench-fusion")
    modes: tuple[str, ...] = MODES
    # 700 steps keep the whole bench under 30 minutes on 2 CPU cores, CLIP and data included: the
    # follow-up questions lengthen the multi-image chats, and cross-attention's block before every
    # layer costs a third more a step (800 steps took 25.8 min before either). The multi-image look-up
    # is learned late: joint passes 85% on those questions at 4,000 steps, 25 min by itself (docs/fusion.md).
    steps: int = 700
    # The rest of the instruct stage as the demo's recipe trains it: Muon for the decoder's matrices
    # (omnilm.train.optim.MuonAdamW), its learning rate and batch, a 2-layer decoder.
    batch_size: int = Recipe.instruct_batch
    lr: float = Recipe.instruct_lr
    optimizer: str = Recipe.instruct_optimizer  # "muon" or "adamw", for every mode alike
    # Each mode's connector (joint's projector, early's patch embedding, late's pooling and gate, the
    # resampler and gated blocks of cross-attention) may learn faster than the decoder, as LLaVA's projector.
    connector_lr: float | None = None
    # Cross-attention's tanh gates start at 0 and Adam moves a scalar about its LR a step: at the
    # decoder's 2e-3 they would take most of the run to open (omnilm.train.stages._gate_lr).
    gate_lr: float | None = 0.02
    cross_attention_every: int = 1  # a gated block before every decoder layer (Flamingo-3B's spacing)
    # Captions teach where objects are, but they are a third of the records and the look-up the
    # questions need comes later with them (as in the demo's recipe, docs/shapeworld-recipe.md).
    captions: bool = False
    # Single-image chats are some 70 tokens, multi-image ones up to 200: batches of similar lengths
    # waste less on padding (a quarter of a random batch's tokens is padding).
    group_by_length: bool = True
    # Examples: half single-image (a chat of every question family, and a caption record that only
    # --captions trains on), half multi-image (a question, or a chat, then follow-up questions).
    n_train: int = Recipe.n_train
    n_test: int = 300
    multi_image: float = 0.5
    jitter: float = Recipe.jitter  # shapes near their cell's centre, as in the demo
    # Stage clip as in the demo (single-object scenes, the patch embedding at a tenth of the rate);
    # 0 steps: the modes read a random frozen tower instead.
    clip_steps: int = Recipe.clip_steps
    clip_images: int = Recipe.clip_images
    seed: int = 0
    preset: str = "tiny"
    llm_layers: int | None = Recipe.llm_layers  # the decoder's depth (None: the preset's)
    system_prompt: str | None = Recipe.system_prompt
    progress: bool = True

    def __post_init__(self) -> None:
        # Checked here, before any data is written, so that the library and the CLI refuse alike.
        unknown = [m for m in self.modes if m not in MODES]
        if unknown:
            raise OmniInputError(f"--modes: unknown {', '.join(unknown)}; choose from {', '.join(MODES)}")
        if self.llm_layers is not None and self.llm_layers < 1:
            raise OmniInputError(f"--llm-layers is {self.llm_layers}: give the decoder at least one layer")
        if self.clip_steps < 0:
            raise OmniInputError(f"--clip-steps is {self.clip_steps}: give 0 (a random tower) or more")
        if self.gate_lr is not None and not self.gate_lr > 0:
            raise OmniInputError(f"--gate-lr is {self.gate_lr}: it must be > 0")
        from omnilm.config import OmniConfig

        layers = self.llm_layers or OmniConfig.from_preset(self.preset).text.n_layers
        if not 1 <= self.cross_attention_every <= layers:
            raise OmniInputError(f"--cross-attention-every is {self.cross_attention_every}: give 1 to {layers} "
                                 f"(the decoder's layers)")
        if self.clip_steps and self.clip_images < Recipe.clip_batch:
            raise OmniInputError(f"--clip-images is {self.clip_images}: stage clip draws batches of "
                                 f"{Recipe.clip_batch}, so give at least that many (or --clip-steps 0)")

    @property
    def trains_clip(self) -> bool:
        """Whether the bench trains a CLIP tower first: some steps, and a mode that reads one."""
        return self.clip_steps > 0 and any(mode in ENCODER_MODES for mode in self.modes)

    def clip_recipe(self) -> Recipe:
        """The demo's recipe with this bench's preset, seed and CLIP budget (`train_clip_tower` reads it)."""
        return Recipe(preset=self.preset, seed=self.seed, clip_steps=self.clip_steps, clip_images=self.clip_images,
                      jitter=self.jitter, progress=self.progress)


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
    from omnilm.config import OmniConfig
    from omnilm.data.llava_json import read_records
    from omnilm.data.shapeworld import write_shapeworld
    from omnilm.train.stages import chat_tokenizer

    data = bench.out / "data"
    size = OmniConfig.from_preset(bench.preset).vision.image_size
    shared = dict(image_size=size, jitter=bench.jitter, multi_image=bench.multi_image, progress=bench.progress)
    train_json = write_shapeworld(data, bench.n_train, bench.seed, "train", questions="all", **shared)
    test_json = write_shapeworld(data, bench.n_test, bench.seed, "test", **shared)
    for path in (train_json, test_json):
        write_json(path.with_name(path.stem + "_text.json"), _strip_images(read_records(path)))
    if bench.trains_clip:
        recipe = bench.clip_recipe()
        write_shapeworld(data, recipe.clip_images, bench.seed, "clip", n_objects=recipe.clip_objects,
                         image_size=size, jitter=bench.jitter, progress=bench.progress)
    chat_tokenizer(train_json, bench.system_prompt).save(data / "tokenizer")
    return train_json, test_json


def _generation_latency(model, processor, record: dict, folder: Path, repeats: int = 7) -> float:
    """Median seconds for a greedy 8-token answer to one held-out multi-image prompt, batch 1."""
    from omnilm.data.collate import to_device
    from omnilm.eval.vqa import questions

    q = questions([record])[-1]
    device = next(model.parameters()).device
    inputs = to_device(processor([q["chat"]], images=[[str(folder / name) for name in q["images"]]]), device)
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first warms up
            t = time.perf_counter()
            model.generate(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"], max_new_tokens=8,
                           stop_token_ids=[])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def run_mode(bench: FusionBench, mode: str, train_json: Path, test_json: Path,
             vision: Path | None = None) -> dict[str, Any]:
    """Train `mode` (reading the CLIP tower `vision` if it has a vision encoder), score it, time it."""
    from omnilm.data import Processor
    from omnilm.data.llava_json import read_records
    from omnilm.eval.vqa import evaluate_vqa, write_predictions
    from omnilm.train.loop import TrainArgs, train

    data = bench.out / "data"
    text_only = mode == "text_only"
    if text_only:
        train_json, test_json = (p.with_name(p.stem + "_text.json") for p in (train_json, test_json))
    overrides = {"vision": None} if text_only else {"fusion": mode}
    if mode == "cross_attention":
        overrides["cross_attention_every"] = bench.cross_attention_every
    if bench.llm_layers is not None:
        overrides["text"] = {"n_layers": bench.llm_layers}
    out = bench.out / mode
    summary = train(TrainArgs(
        stage="instruct", data=train_json, image_folder=data, out=out, preset=bench.preset,
        tokenizer=data / "tokenizer", vision=vision if mode in ENCODER_MODES else None, steps=bench.steps,
        batch_size=bench.batch_size, lr=bench.lr,
        optimizer=bench.optimizer, projector_lr=None if text_only else bench.connector_lr,
        gate_lr=bench.gate_lr if mode == "cross_attention" else None, warmup=bench.steps // 20, seed=bench.seed,
        tasks=TASKS if bench.captions else [t for t in TASKS if t != "caption"], whiten_projector=mode in ("joint", "late"),
        group_by_length=bench.group_by_length, config_overrides=overrides, progress=bench.progress, resume=False))
    model = summary["model"].eval()
    processor = Processor.for_model(model)
    records = read_records(test_json)
    evaluation, predictions = evaluate_vqa(model, processor, records, data, progress=bench.progress)
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


def format_table(results: list[dict[str, Any]]) -> str:
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


def run_fusion_bench(bench: FusionBench, docs: Path | None = None) -> list[dict[str, Any]]:
    """Train and score every mode of `bench.modes`; print the table; with `docs`, write
    docs/fusion.md's table file (`fusion_table.md`) and `fusion.png` there."""
    t0 = time.perf_counter()
    bench.out.mkdir(parents=True, exist_ok=True)
    train_json, test_json = make_data(bench)
    vision = None
    if bench.trains_clip:
        from omnilm.eval.clip import format_clip_results
        from omnilm.train.recipe import train_clip_tower

        print(f"fusion bench: training the CLIP tower ({bench.clip_steps} steps) ...", flush=True)
        shutil.rmtree(bench.out / "clip", ignore_errors=True)
        data = bench.out / "data"
        vision, clip_eval, _ = train_clip_tower(bench.out / "clip", data / "clip.json", test_json, data,
                                                data / "tokenizer", bench.clip_recipe())
        write_json(bench.out / "clip_eval.json", clip_eval)
        print(format_clip_results(clip_eval), flush=True)
    results = []
    for mode in bench.modes:
        print(f"fusion bench: training {mode} ({bench.steps} steps) ...", flush=True)
        shutil.rmtree(bench.out / mode, ignore_errors=True)
        results.append(run_mode(bench, mode, train_json, test_json, vision))
        write_json(bench.out / "results.json", results)
    table = format_table(results)
    minutes = (time.perf_counter() - t0) / 60
    print(f"\n{table}\n\n{len(results)} runs of {bench.steps} steps in {minutes:.1f} min (data included)")
    if docs is not None:
        docs.mkdir(parents=True, exist_ok=True)
        write_text(docs / "fusion_table.md", table + "\n")
        plot(results, docs / "fusion.png")
    return results
