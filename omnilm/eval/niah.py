"""Needle-in-a-haystack retrieval over a grid of context lengths and depths, as Gemini 1.5 reports it.

For every context length (prompt tokens in the model's own tokenizer, chat template and system
prompt included) and each of D evenly spaced depths (11: 0%, 10%, ..., 100%), N prompts are built
by `omnilm.data.haystack.build_haystack` with a needle at that depth and a question after the
haystack, answered greedily, and scored by exact match after `normalize_answer`, as `omnilm
eval` scores. `--keys K` hides K text needles (the unasked ones distractors, RULER's multi-key
task); `--questions Q` asks Q of them, one a turn, each after the model's own earlier answers,
and scores every answer. Every prompt has its own generator, so a cell's prompts are independent
samples and the same flags give the same prompts. Written to the output folder:

    niah.csv            length, depth, samples (answers), correct, recall: one row per cell
    niah.png            the heatmap (x context length, y depth, green 100% to red 0%)
    predictions.jsonl   every prompt's question, answer and prediction

and printed: recall per length with its 95% Wilson score interval (answers of one prompt count
as independent, which makes the interval a little narrow with --questions above 1).

Video needles (`--needle video`, a model that reads video): the lengths are clips' frame counts,
each frame one or two still ShapeWorld shapes; the frame at the cell's depth also shows a cross,
and the question asks its colour (`omnilm.data.shapeworld.video.make_video_needle`). Audio needles
(`--needle audio`, a model that hears) are the same in sound: clips of that many 2 s windows of
tones, the window at the cell's depth also holding a bell whose pitch is asked
(`omnilm.data.shapeworld.audio.make_audio_needle`).

Past the training length. Plain RoPE reads no length, so the checkpoint's `max_seq_len` (which
`generate` will not run past) is raised to the longest prompt; a YaRN or Llama 3 scaling that does
not name its original length gets the checkpoint's, so that raising it changes nothing else.
Dynamic NTK is the exception: it reads `max_seq_len` as the trained length and runs past it
without being raised. `--rope-scaling` replaces the checkpoint's scaling for the evaluation;
`--logn` adds log-n attention scaling past the trained length (`TextConfig.logn_attention`).
Long prompts are prefilled in chunks (`generate(..., prefill_chunk=N)`), so that memory grows
with the prompt, not with its square.
"""

from __future__ import annotations

import json
import random
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

from omnilm.config import TextConfig
from omnilm.data.collate import to_device
from omnilm.data.haystack import (FILLERS, MAX_IMAGE_QUESTIONS, NEEDLE_HELP, NEEDLES, OBJECTS_HELP, TokenCount,
                                  build_haystack, check_choices, check_image_needles)
from omnilm.data.processor import Processor
from omnilm.data.shapeworld.audio import MAX_NEEDLE_WINDOWS, make_audio_needle
from omnilm.data.shapeworld.video import MAX_NEEDLE_FRAMES, make_video_needle
from omnilm.errors import OmniInputError
from omnilm.eval.vqa import normalize_answer
from omnilm.infer import generate
from omnilm.io import atomic_write, write_csv, write_text
from omnilm.model import OmniModel
from omnilm.model.hf import read_config
from omnilm.model.layers import resolve_device
from omnilm.settings import check_output_folder, check_range, check_seed, setting

ROPE_SCALINGS = ("linear", "dynamic", "yarn")
NIAH_NEEDLES = (*NEEDLES, "video", "audio")
# Needles in a clip of --lengths frames or windows: the most each may have, and what a length counts.
CLIP_NEEDLES = {"video": (MAX_NEEDLE_FRAMES, "frames"), "audio": (MAX_NEEDLE_WINDOWS, "windows")}
AUTO = "auto"  # --rope-scaling TYPE:auto: the factor of each length is length / trained length (at least 1)
CSV_FIELDS = ["length", "depth", "samples", "correct", "recall"]  # niah.csv, a row per cell
MAX_DEPTHS = 101  # 1% apart: needles are placed between sentences, so finer steps would repeat places


@dataclass(kw_only=True)
class NiahArgs:
    """`omnilm eval niah`: needle-in-a-haystack recall over context lengths and needle depths."""

    checkpoint: Path = setting(help="model folder (omnilm, or Hugging Face LLaMA / LLaVA) with its tokenizer.json",
                               positional=True)
    lengths: tuple[str, ...] = setting(("1x", "2x", "4x", "8x", "16x"),
                                       "context lengths, comma-separated: prompt tokens in the model's tokenizer "
                                       "(template and question included), or Nx: N times the checkpoint's "
                                       "max_seq_len, its training length")
    depths: int = setting(11, "needle depths, evenly spaced from 0 (start of the haystack) to 1 (just before the "
                              "question): 11 is every 10%")
    samples: int = setting(20, "prompts per length and depth, each with its own key (or images) and filler")
    needle: str = setting("text", NEEDLE_HELP + " (models with a vision tower); video: clips of --lengths frames "
                                                "(a number each), one frame of which also shows a cross, asked 'What "
                                                "colour is the cross?' (video models); audio: clips of --lengths 2 s "
                                                "windows of tones, one of which also holds a bell, asked 'What is "
                                                "the pitch of the bell?' (audio models)", choices=NIAH_NEEDLES)
    keys: int = setting(1, "text needles per prompt, each with its own key: the unasked ones are distractors")
    questions: int = setting(1, "needles asked per prompt, one a turn, each turn after the model's own earlier "
                                "answers; every answer is scored (text: at most --keys; image: at most "
                                f"{MAX_IMAGE_QUESTIONS}). The grid's depth is the first asked needle's, the others "
                                "sit at random")
    images: int = setting(4, "images per prompt with --needle image", metavar="F")
    scale_images: bool = setting(False, "--images is per training length: a prompt N times longer holds N times "
                                        "as many images")
    objects: int | None = setting(None, OBJECTS_HELP)
    filler: str = setting("auto", "the haystack: shapeworld (captions of random scenes), english (sentences from a "
                                  "small built-in vocabulary), or auto: shapeworld for an omnilm checkpoint, english "
                                  "for a Hugging Face one", choices=("auto", *FILLERS))
    rope_scaling: str | None = setting(None, "replace the checkpoint's RoPE scaling for this evaluation: "
                                             "linear:F (position interpolation), dynamic:F (dynamic NTK) or yarn:F "
                                             "(YaRN), F the factor >= 1, e.g. linear:4, or auto: each length's "
                                             "multiple of the trained length (1 up to it)", metavar="TYPE:FACTOR")
    logn: bool = setting(False, "log-n attention scaling past the trained length L: the query at position p > L has "
                                "its logits multiplied by log(p + 1) / log(L) (Qwen's logn_attn), so attention over "
                                "more keys stays as sharp as over L; alone or with --rope-scaling")
    out: Path = setting(Path("runs/niah"), "folder for niah.csv, niah.png and predictions.jsonl")
    prefill_chunk: int = setting(1024, "prompt tokens run through the model at a time, so that long prompts fit in "
                                       "memory")
    max_new_tokens: int = setting(16, "longest answer generated")
    seed: int = setting(0, "seed of the prompts")
    device: str = setting("auto", "auto (CUDA when there is one), cpu, cuda, cuda:1, ...")
    dtype: str | None = setting(None, "weight dtype (default: float32)", choices=("float32", "bfloat16", "float16"))

    def __post_init__(self) -> None:
        check_choices(self, ("auto", *FILLERS), needles=NIAH_NEEDLES)
        if self.needle in CLIP_NEEDLES:  # frames or windows, not tokens; the other settings shape text and images
            most, unit = CLIP_NEEDLES[self.needle]
            counts = [int(n) if str(n).isdigit() else 0 for n in self.lengths]
            if not all(1 <= n <= most for n in counts):
                raise OmniInputError(f"--lengths {','.join(map(str, self.lengths))}: with --needle {self.needle} give "
                                     f"{unit} per clip, 1 to {most} each, e.g. --lengths 2,4,8")
        check_range(self, ("samples", "prefill_chunk", "max_new_tokens"), low=1)
        check_range(self, ("depths",), 2, MAX_DEPTHS, what=" (1% apart at most)")
        if self.needle == "image":
            check_image_needles(self)
        elif self.questions > self.keys:
            raise OmniInputError(f"--questions {self.questions} asks more needles than the --keys {self.keys} a "
                                 "prompt holds: ask at most --keys")
        check_seed(self)
        parse_lengths(self.lengths, 1)  # the syntax now; Nx once the checkpoint's length is known
        if self.rope_scaling is not None:
            parse_rope_scaling(self.rope_scaling)
        resolve_device(self.device)
        check_output_folder(self.out, "--out")


def parse_lengths(lengths: tuple[str, ...], trained: int) -> list[int]:
    """Token counts from "4096" or "4x" (times `trained`), sorted and without repeats."""
    if not lengths:
        raise OmniInputError("--lengths is empty: give context lengths in tokens, e.g. 1024,4096 or 1x,4x")
    out = set()
    for item in lengths:
        match = re.fullmatch(r"(\d+)(x?)", item.strip().lower())
        if match is None or int(match[1]) < 1:
            raise OmniInputError(f"--lengths {item!r} is not a length: give a number of tokens (4096) or a multiple "
                                 "of the training length (4x), at least 1")
        out.add(int(match[1]) * (trained if match[2] else 1))
    return sorted(out)


def parse_rope_scaling(text: str) -> dict:
    """"linear:4" -> {"rope_type": "linear", "factor": 4.0}, as transformers writes rope_scaling;
    "linear:auto" -> factor "auto": each length's own multiple of the trained length (see `Grid`)."""
    kind, _, factor = text.partition(":")
    try:
        value = AUTO if factor == AUTO else float(factor)
    except ValueError:
        value = float("nan")
    if kind not in ROPE_SCALINGS or not (value == AUTO or 1 <= value < float("inf")):
        raise OmniInputError(f"--rope-scaling {text!r}: give TYPE:FACTOR with TYPE one of {', '.join(ROPE_SCALINGS)} "
                             "and a factor >= 1 (or auto: each length's multiple of the trained one), e.g. linear:4")
    return {"rope_type": kind, "factor": value}


def extend_context(text_cfg: TextConfig, rope_scaling: dict | None, longest: int) -> None:
    """Let `text_cfg` (the loaded model's TextConfig, changed in place) run prompts of `longest`
    tokens (answers included), with `rope_scaling` instead of its own when given (see the module
    docstring)."""
    trained = text_cfg.max_seq_len
    scaling = dict(rope_scaling if rope_scaling is not None else text_cfg.rope_scaling or {})
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in ("yarn", "llama3") and not scaling.get("original_max_position_embeddings"):
        scaling["original_max_position_embeddings"] = trained
    text_cfg.rope_scaling = scaling or None
    if kind != "dynamic":
        text_cfg.max_seq_len = max(trained, longest)


def wilson_interval(correct: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (Wilson 1927): with p = correct / n and z the
    normal quantile of the confidence, (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n).
    Unlike p -+ z sqrt(p(1-p)/n) it stays inside [0, 1] and is not empty at 0 or n correct."""
    if n == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = correct / n
    centre = p + z * z / (2 * n)
    spread = z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
    return max(0.0, (centre - spread) / (1 + z * z / n)), min(1.0, (centre + spread) / (1 + z * z / n))


def depth_grid(n: int) -> list[float]:
    return [i / (n - 1) for i in range(n)]


def default_filler(checkpoint: str | Path) -> str:
    """ShapeWorld captions for an omnilm checkpoint (omnilm.json beside the weights), English otherwise."""
    return "shapeworld" if (Path(checkpoint) / "omnilm.json").is_file() else "english"


# --- the grid ---------------------------------------------------------------------------------


def run_niah(run: NiahArgs, progress: bool = True) -> str:
    """Evaluate `run.checkpoint` over the grid and write the outputs; returns the printed report.
    Every flag that needs the tokenizer (lengths too short to hold the needle, more depths than
    the shortest haystack has places) is checked before the weights load."""
    config, _, _ = read_config(run.checkpoint)
    if run.needle == "image" and config.vision is None:
        raise OmniInputError(f"--needle image needs a model that reads images; {run.checkpoint} is text-only: "
                             "use --needle text")
    if run.needle == "video" and config.video_token_id is None:
        raise OmniInputError(f"--needle video needs a model that reads videos; {run.checkpoint} has no video_token_id: "
                             "use --needle text or image")
    if run.needle == "audio" and config.audio is None:
        raise OmniInputError(f"--needle audio needs a model that hears; {run.checkpoint} has no audio encoder: "
                             "use --needle text or image")
    processor = Processor.for_model(config, run.checkpoint)
    trained = config.text.max_seq_len
    filler = default_filler(run.checkpoint) if run.filler == "auto" else run.filler
    if run.needle in CLIP_NEEDLES:
        model = OmniModel.from_pretrained(run.checkpoint, device=resolve_device(run.device), dtype=run.dtype).eval()
        return clip_niah(model, processor, run, progress)[0]
    grid = Grid(run, filler, TokenCount(processor.tokenizer, processor.image_seq_len), trained)
    grid.check()
    lengths = grid.lengths
    model = OmniModel.from_pretrained(run.checkpoint, device=resolve_device(run.device), dtype=run.dtype).eval()
    scaling = parse_rope_scaling(run.rope_scaling) if run.rope_scaling else None
    if scaling is not None and scaling["factor"] == AUTO:
        scaling, grid.scale_each_length = {**scaling, "factor": 1.0}, True  # Grid.evaluate sets it per length
    # The model's own answers to earlier questions may run longer than the reference ones.
    extend_context(model.config.text, scaling, lengths[-1] + run.questions * run.max_new_tokens)
    if run.logn:
        model.config.text.logn_attention = trained
    predictions = grid.evaluate(model, processor, progress)
    rows = cells(predictions, lengths, grid.depths)
    out = Path(run.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "niah.csv", rows, CSV_FIELDS)
    write_text(out / "predictions.jsonl", "".join(json.dumps(p) + "\n" for p in predictions))
    scaling = run.rope_scaling or _shown_scaling(config.text.rope_scaling)
    scaling += " + log-n attention" if run.logn else ""
    needles = run.needle
    if run.needle == "text" and run.keys > 1:
        needles = f"text, {run.keys} keys, {run.questions} asked"
    elif run.needle == "image":
        needles = f"image, {run.images}{' per trained length' if run.scale_images else ''}, {run.questions} asked"
    title = (f"needle in a haystack ({needles}, {filler} filler), trained length {trained}, rope {scaling}: "
             f"recall {sum(p['correct'] for p in predictions) / len(predictions):.1%}")
    plot_heatmap(rows, out / "niah.png", title)
    return "\n".join([title, "", format_niah(rows), "", f"wrote {out / 'niah.csv'}, {out / 'niah.png'} and "
                                                        f"{out / 'predictions.jsonl'}"])


def clip_niah(model, processor: Processor, run: NiahArgs, progress: bool = True) -> tuple[str, list[dict]]:
    """`run`'s video or audio haystack grid on `model`, written to `run.out` (niah.csv, niah.png,
    predictions.jsonl): the printed report, and the rows."""
    grid = ClipGrid(run)
    predictions = grid.evaluate(model, processor, progress)
    rows = cells(predictions, grid.lengths, grid.depths)
    out = Path(run.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "niah.csv", rows, CSV_FIELDS)
    write_text(out / "predictions.jsonl", "".join(json.dumps(p) + "\n" for p in predictions))
    title = clip_niah_title(predictions, processor, run.needle)
    plot_heatmap(rows, out / "niah.png", title, xlabel=f"clip length ({CLIP_NEEDLES[run.needle][1]})")
    report = "\n".join([title, "", format_niah(rows), "", f"wrote {out / 'niah.csv'}, {out / 'niah.png'} and "
                                                          f"{out / 'predictions.jsonl'}"])
    return report, rows


def clip_niah_title(predictions: list[dict], processor: Processor, needle: str = "video") -> str:
    what = (f"a cross in one frame, its colour asked), {processor.video_frame_len} tokens a frame" if needle == "video"
            else f"a bell in one 2 s window, its pitch asked), {processor.audio_seq_len} tokens a window")
    return (f"{needle} needle in a haystack ({what}: "
            f"recall {sum(p['correct'] for p in predictions) / len(predictions):.1%}")


class ClipGrid:
    """The clips of every (frames or windows, depth, sample) for `--needle video` or `audio`, each
    from a generator of its own."""

    def __init__(self, run: NiahArgs):
        self.run = run
        self.lengths = sorted({int(n) for n in run.lengths})
        self.depths = depth_grid(run.depths)

    def evaluate(self, model, processor: Processor, progress: bool = True) -> list[dict]:
        """Greedy answers to every clip's question, scored; in grid order (frames, depth, sample)."""
        from tqdm import tqdm

        device = next(model.parameters()).device
        eos = processor.tokenizer.eos_id
        keys = [(n, depth, s) for n in self.lengths for depth in self.depths for s in range(self.run.samples)]
        predictions = []
        needle = self.run.needle
        where = "needle_frame" if needle == "video" else "needle_window"  # the needle's place, in the predictions
        for i, (n, depth, sample) in enumerate(tqdm(keys, desc=f"{needle} niah", unit="clip", disable=not progress)):
            if needle == "video":
                clip = make_video_needle(i, self.run.seed, "niah", n_frames=n, depth=depth)
                record, media = clip.records[0], {"videos": [[clip.frames]]}
            else:
                clip = make_audio_needle(i, self.run.seed, "niah", n_windows=n, depth=depth)
                record, media = clip.record, {"audios": [[clip.samples]]}
            chat = record["conversations"][:1]
            batch = to_device(processor([chat], **media), device)
            new = generate(model, **batch, max_new_tokens=self.run.max_new_tokens, stop_token_ids=[eos],
                           prefill_chunk=self.run.prefill_chunk)[0].tolist()
            prediction = processor.decode(new[:new.index(eos)] if eos in new else new).strip()
            answer = record["conversations"][1]["value"]
            predictions.append({"length": n, "depth": round(depth, 4), "sample": sample,
                                "tokens": batch["input_ids"].shape[1],
                                where: record[where],
                                "question": chat[0]["value"].split("\n", 1)[1], "answer": answer,
                                "prediction": prediction,
                                "correct": normalize_answer(prediction) == normalize_answer(answer)})
        return predictions


def _shown_scaling(scaling: dict | None) -> str:
    if not scaling:
        return "unscaled"
    return f"{scaling.get('rope_type', scaling.get('type'))}:{scaling.get('factor', '')}".rstrip(":")


class Grid:
    """The prompts of every (length, depth, sample), each from a generator of its own."""

    def __init__(self, run: NiahArgs, filler: str, count: TokenCount, trained: int):
        """`run`'s lengths (its Nx multiples of `trained`, the checkpoint's max_seq_len) and depths,
        with prompts of `filler` measured by `count`."""
        self.run, self.filler, self.count = run, filler, count
        self.lengths, self.depths = parse_lengths(run.lengths, trained), depth_grid(run.depths)
        self.trained = trained  # TYPE:auto scalings divide each length by it
        self.scale_each_length = False

    def images(self, length: int) -> int:
        """Images in a prompt of `length` tokens: --images, or with --scale-images as many more as
        the prompt is longer than the trained length (never fewer)."""
        if not self.run.scale_images:
            return self.run.images
        return max(self.run.images, round(self.run.images * length / self.trained))

    def prompt(self, length: int, depth: float, sample: int):
        run = self.run
        rng = random.Random(f"niah:{run.seed}:{run.needle}:{run.keys}:{run.questions}:{length}:{depth:.6f}:{sample}")
        return build_haystack(rng, self.count, length, needle=run.needle, keys=run.keys, questions=run.questions,
                              depth=depth, filler=self.filler, n_images=self.images(length), objects=run.objects,
                              split="test", prompt=True)

    def check(self) -> None:
        """Every length holds the needle and question, and the shortest has a place for every depth."""
        for length in self.lengths:
            try:
                hay = self.prompt(length, 0.0, 0)
            except OmniInputError as e:
                raise OmniInputError(f"--lengths: {e}") from None
            if length == self.lengths[0] and hay.n_filler + 1 < len(self.depths):
                raise OmniInputError(f"--depths {len(self.depths)} asks for more needle places than a {length}-token "
                                     f"prompt has: its {hay.n_filler} filler sentences leave {hay.n_filler + 1}; "
                                     "lower --depths or raise the shortest of --lengths")

    def evaluate(self, model, processor: Processor, progress: bool = True) -> list[dict]:
        """Greedy answers to every prompt's questions, scored; in grid order (length, depth, sample,
        question). Question k is asked after the model's own answers to the k - 1 before it."""
        from tqdm import tqdm

        device = next(model.parameters()).device
        eos = processor.tokenizer.eos_id
        keys = [(length, depth, s) for length in self.lengths for depth in self.depths for s in range(self.run.samples)]
        predictions = []
        text_cfg, trained = model.config.text, self.trained
        for length, depth, sample in tqdm(keys, desc="niah", unit="prompt", disable=not progress):
            if self.scale_each_length:  # TYPE:auto: each length its own factor
                text_cfg.rope_scaling = {**text_cfg.rope_scaling, "factor": max(1.0, length / trained)}
            hay = self.prompt(length, depth, sample)
            chat = []
            for k, answer in enumerate(hay.answers):
                chat.append(hay.conversations[2 * k])
                batch = to_device(processor([chat], images=[hay.images]), device)
                new = generate(model, **batch, max_new_tokens=self.run.max_new_tokens, stop_token_ids=[eos],
                               prefill_chunk=self.run.prefill_chunk)[0].tolist()
                prediction = processor.decode(new[:new.index(eos)] if eos in new else new).strip()
                chat.append({"from": "gpt", "value": prediction})
                predictions.append({"length": length, "depth": round(depth, 4), "sample": sample, "question_index": k,
                                    "tokens": batch["input_ids"].shape[1], "images": len(hay.images),
                                    "needle_depth": round(hay.depths[k], 4),
                                    "question": chat[-2]["value"].rsplit("\n", 1)[-1], "answer": answer,
                                    "prediction": prediction,
                                    "correct": normalize_answer(prediction) == normalize_answer(answer)})
        return predictions


# --- results ----------------------------------------------------------------------------------


def cells(predictions: list[dict], lengths: list[int], depths: list[float]) -> list[dict]:
    """One row per (length, depth): samples, correct and recall."""
    rows = []
    for length in lengths:
        for depth in depths:
            hits = [p["correct"] for p in predictions if p["length"] == length and p["depth"] == round(depth, 4)]
            rows.append({"length": length, "depth": round(depth, 4), "samples": len(hits), "correct": sum(hits),
                         "recall": sum(hits) / len(hits) if hits else 0.0})
    return rows


def format_niah(rows: list[dict]) -> str:
    """Recall per length, and over all, with 95% Wilson intervals, as markdown."""
    lines = ["| length | answers | recall | 95% interval |", "|---:|---:|---:|---:|"]
    by_length: dict[int, list[dict]] = {}
    for row in rows:
        by_length.setdefault(row["length"], []).append(row)
    for name, group in [*((str(length), group) for length, group in by_length.items()), ("**all**", rows)]:
        n, correct = sum(r["samples"] for r in group), sum(r["correct"] for r in group)
        low, high = wilson_interval(correct, n)
        lines.append(f"| {name} | {n} | {correct / n:.1%} | {low:.1%} - {high:.1%} |")
    return "\n".join(lines)


def plot_heatmap(rows: list[dict], png: str | Path, title: str, xlabel: str = "context length (tokens)") -> None:
    """Recall per cell, x context length, y depth (0% at the top), green 100% to red 0%, as Gemini's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    lengths = list(dict.fromkeys(r["length"] for r in rows))
    depths = list(dict.fromkeys(r["depth"] for r in rows))
    recall = np.array([[next(r["recall"] for r in rows if r["length"] == x and r["depth"] == y) for x in lengths]
                       for y in depths])
    fig, ax = plt.subplots(figsize=(2 + 0.8 * len(lengths), 1.5 + 0.35 * len(depths)), dpi=110)
    image = ax.imshow(recall, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            ax.text(j, i, f"{recall[i, j]:.0%}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(lengths)), labels=[str(x) for x in lengths])
    ax.set_yticks(range(len(depths)), labels=[f"{d:.0%}" for d in depths])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("needle depth")
    ax.set_title(textwrap.fill(title, 90), fontsize=8)
    fig.colorbar(image, ax=ax, label="recall")
    fig.tight_layout()
    atomic_write(png, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
