"""Exact-match visual question answering on LLaVA-format records, per task family.

Every assistant turn of every record is one question: the model sees the conversation up to
that turn, with the reference answers of earlier turns (teacher forcing, as multi-turn VQA is
usually scored), and answers greedily. A prediction is right when it equals the reference after
`normalize_answer`. Questions are batched, left-padded, and decoded with the KV cache.

Records are checked by `omnilm.data.llava_json.check_records`, the validator training uses, over
the whole file and before anything is generated: structure, that every question fits the
model's context with its answer, and that every image and video decodes.

Videos can be shown as they are, with their frames shuffled, or by their first frame alone
(`frames`): the controls that tell a model reading time from one reading a single picture. Audio
can be heard as it is or replaced by silence of the same length (`audio`): the control that tells
a model that listens from one that guesses from the question.

What the answers cost is counted beside them (`omnilm.cost.RunCost`, a batch for a step): the FLOPs
each answer needed (`batch_generate_flops`), the batches' seconds (their images read and their
answers generated), MFU against this machine's measured matmul peak, and joules per generated
token with the meter that measured them.
"""

from __future__ import annotations

import json
import random
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omnilm.cost import RunCost
from omnilm.data.chat import render_chat
from omnilm.data.collate import to_device
from omnilm.data.llava_json import Problem, check_records, media_names
from omnilm.data.tokenizer import AUDIO_TOKEN, IMAGE_TOKEN, VIDEO_TOKEN
from omnilm.data.video import Video
from omnilm.infer import generate
from omnilm.model.flops import batch_generate_flops
from omnilm.model.layers import resolve_device
from omnilm.settings import check_output_file, check_range, setting


FRAME_CONTROLS = ("all", "shuffled", "first")
AUDIO_CONTROLS = ("heard", "silence")
_MARKER_LINES = (IMAGE_TOKEN, VIDEO_TOKEN, AUDIO_TOKEN)


def control_frames(video: Video, frames: str, seed: str) -> Video:
    """`video` as a control shows it: "all" as it is, "shuffled" in an order drawn from `seed` (never
    the true one, for two or more frames), "first" its first frame alone. Shuffled frames keep the
    times of the places they are shown at: timestamps say nothing of the true order."""
    if frames == "all":
        return video
    if frames == "first":
        return replace(video, frames=video.frames[:1], indices=video.indices[:1])
    order = list(range(len(video.frames)))
    rng = random.Random(seed)
    while len(order) > 1 and order == sorted(order):
        rng.shuffle(order)
    return replace(video, frames=video.frames[order])


@dataclass(kw_only=True)
class EvalArgs:
    """`omnilm eval`: exact-match accuracy of a checkpoint on LLaVA-format questions."""

    checkpoint: Path = setting(help="model folder (omnilm or Hugging Face LLaVA) with its tokenizer", positional=True)
    data: Path = setting(help="LLaVA-format JSON; every assistant turn of a non-caption record is a question")
    image_folder: Path = setting(help="folder the records' image paths are relative to")
    predictions: Path | None = setting(None, "write one JSON line per question here")
    json: Path | None = setting(None, "write the summary here as JSON: accuracy per task (and object count) and "
                                      "the generation's cost (FLOPs, seconds, MFU, J/token and how it was measured)")
    batch_size: int = setting(64, "questions per generation batch")
    max_new_tokens: int = setting(16, "longest answer generated")
    device: str = setting("auto", "auto (CUDA when there is one), cpu, cuda, cuda:1, ...")
    skip_bad: bool = setting(False, "leave out (and count) malformed records instead of stopping at the first")
    frames: str = setting("all", "what the model sees of each video: all its sampled frames in order, the same "
                                 "frames shuffled, or the first frame only (controls: a model that reads time falls "
                                 "to chance on motion without the order)", choices=FRAME_CONTROLS)
    audio: str = setting("heard", "what the model hears of each audio: the audio, or silence as long (the control: "
                                  "a model that listens cannot answer over silence)", choices=AUDIO_CONTROLS)

    def __post_init__(self) -> None:
        check_range(self, ("batch_size", "max_new_tokens"), low=1)
        resolve_device(self.device)
        if self.predictions is not None:
            check_output_file(self.predictions, "--predictions")
        if self.json is not None:
            check_output_file(self.json, "--json")


def questions(records: list[dict], skip_tasks: tuple[str, ...] = ("caption",)) -> list[dict]:
    """One entry per assistant turn: its chat prefix, reference answer, task and the images its
    prefix has shown (a chat may bring images in later turns). The question is the turn's text
    with image markers shown as "<image>" only where they stand inside a sentence. Records are
    checked first (image files are not read): a bad one, or none to ask, raises OmniInputError."""
    checked = check_records(records, None, skip_tasks=skip_tasks)
    return _questions([records[i] for i in checked.kept])


def _questions(records: list[dict], last_only: bool = False) -> list[dict]:
    out = []
    for rec in records:
        turns = rec["conversations"]  # a leading system turn stays part of every question's chat
        answers = [i for i, t in enumerate(turns) if t["from"] in ("gpt", "assistant")]
        turn_tasks = rec.get("turn_tasks") or [rec.get("task") or "all"] * len(answers)
        images, videos, audios = (list(media_names(rec, kind)) for kind in ("image", "video", "audio"))
        for n, i in enumerate(answers):
            if last_only and n < len(answers) - 1:
                continue
            shown, seen, heard = (sum(t["value"].count(marker) for t in turns[:i]) for marker in _MARKER_LINES)
            question = " ".join(line for line in turns[i - 1]["value"].split("\n")
                                if line.strip() not in _MARKER_LINES)
            out.append({"id": rec.get("id"), "task": turn_tasks[n], "question": question.strip(),
                        "answer": turns[i]["value"], "chat": turns[:i], "images": images[:shown],
                        "videos": videos[:seen], "audios": audios[:heard], "n_objects": rec.get("n_objects")})
    return out


_ANSWER_SYNONYMS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                    "seven": "7", "eight": "8", "nine": "9", "centre": "center",
                    "1st": "first", "2nd": "second", "3rd": "third", "4th": "fourth"}


def normalize_answer(text: str) -> str:
    """What exact match compares: lower case, spaces collapsed, trailing punctuation and
    quotes stripped, number words "zero".."nine" as digits ("Two." -> "2") and "1st".."4th"
    as ordinal words ("2nd" -> "second")."""
    text = " ".join(str(text).lower().split()).strip(" \"'`").rstrip(".!?,;:").strip(" \"'`")
    return " ".join(_ANSWER_SYNONYMS.get(word, word) for word in text.split())


@torch.inference_mode()
def evaluate_vqa(model, processor, records: list[dict], image_folder: str | Path, batch_size: int = 64,
                 max_new_tokens: int = 8, progress: bool = True, skip_bad: bool = False,
                 frames: str = "all", audio: str = "heard",
                 last_only: bool = False) -> tuple[dict[str, Any], list[dict]]:
    """Accuracy per task family and overall, what generating the answers cost (under "cost": a
    `RunCost.summary`, its tokens the generated ones, each answer's stop token included), and one
    prediction per question.

    Every non-caption record is checked before anything is generated, its images decoded: the
    first bad one raises OmniInputError naming the file (for `read_records` output), the record
    and the field. With `skip_bad` bad records are left out instead and counted in the
    summary's "skipped" (which `format_vqa_results` prints). `frames` shows videos whole or as a
    control (`control_frames`); `audio` "silence" replaces every audio by as many zero samples.
    `last_only` asks each record's last question alone, the turns before it all context (the
    shots of an in-context episode)."""
    from tqdm import tqdm

    folder = Path(image_folder)
    checked = check_records(records, folder, processor=processor, skip_tasks=("caption",), skip_bad=skip_bad,
                            check=_prompt_fits(model, processor, max_new_tokens))
    items = _questions([records[i] for i in checked.kept], last_only)
    device = next(model.parameters()).device
    eos = processor.tokenizer.eos_id
    cost = RunCost(device, model.llm.norm.weight.dtype)  # the norm: float in every model, int8 ones too
    predictions = []
    for start in tqdm(range(0, len(items), batch_size), desc="eval", unit="batch", disable=not progress):
        t0 = time.perf_counter()
        chunk = items[start:start + batch_size]
        videos = [[control_frames(processor.read_video(folder / p), frames, f"{q['id']}/{k}")
                   for k, p in enumerate(q["videos"])] for q in chunk]
        audios = [[_control_audio(processor.read_audio(folder / p), audio) for p in q["audios"]] for q in chunk]
        batch = processor([q["chat"] for q in chunk], images=[[str(folder / p) for p in q["images"]] for q in chunk],
                          videos=videos if any(videos) else None, audios=audios if any(audios) else None)
        batch = to_device(batch, device)
        new = generate(model, **batch, max_new_tokens=max_new_tokens, stop_token_ids=[eos]).tolist()
        seconds = time.perf_counter() - t0
        needed = [ids.index(eos) + 1 if eos in ids else len(ids) for ids in new]  # after eos: a finished row's pad
        flops = batch_generate_flops(model.config, batch["input_ids"], batch.get("attention_mask"), needed)
        cost.step([flops.forward], sum(needed), seconds)
        for q, ids in zip(chunk, new):
            ids = ids[:ids.index(eos)] if eos in ids else ids
            prediction = processor.decode(ids).strip()
            predictions.append({"id": q["id"], "task": q["task"], "question": q["question"], "answer": q["answer"],
                                "prediction": prediction,
                                "correct": normalize_answer(prediction) == normalize_answer(q["answer"])})
            if q["n_objects"] is not None:
                predictions[-1]["n_objects"] = q["n_objects"]
    summary = summarize(predictions) | {"cost": cost.summary()}
    if checked.skipped:
        summary["skipped"] = checked.counts()
    return summary, predictions


def _control_audio(samples: np.ndarray, audio: str) -> np.ndarray:
    """`samples` as the control `audio` plays them: as they are ("heard"), or silence as long."""
    return samples if audio == "heard" else np.zeros_like(samples)


def _prompt_fits(model, processor, max_new_tokens: int):
    # A record's longest prompt is its last question's; generation would refuse it mid-run, naming no record.
    text_cfg = model.config.text
    if (text_cfg.rope_scaling or {}).get("rope_type") == "dynamic":  # dynamic NTK runs past max_seq_len
        return None
    tokenizer, limit = processor.tokenizer, text_cfg.max_seq_len

    def fits(record: dict, paths: list) -> Problem | None:
        turns = record["conversations"]
        last = max(i for i, t in enumerate(turns) if t["from"] in ("gpt", "assistant"))
        prompt, _ = render_chat(turns[:last], add_generation_prompt=True, system=tokenizer.system_prompt)
        ids = tokenizer.encode(prompt)
        n = len(ids) + ids.count(tokenizer.image_token_id) * (processor.image_seq_len - 1)
        if n + max_new_tokens <= limit:
            return None
        images = f" ({len(paths)} images of {processor.image_seq_len} tokens each)" if paths else ""
        return Problem("too long", "conversations", (
            f"asks its last question in a prompt of {n} tokens{images}; with max_new_tokens={max_new_tokens} "
            f"that passes the model's max_seq_len={limit}: shorten the record or lower max_new_tokens"))

    return fits


def summarize(predictions: list[dict]) -> dict[str, Any]:
    """Accuracy per task family and overall; for records that say how many objects their scene
    holds (ShapeWorld's `n_objects`), also per family and object count, under "objects"."""
    per_task: dict[str, list[bool]] = defaultdict(list)
    per_objects: dict[str, dict[int, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for p in predictions:
        per_task[p["task"]].append(p["correct"])
        if p.get("n_objects") is not None:
            per_objects[p["task"]][p["n_objects"]].append(p["correct"])
            per_objects["overall"][p["n_objects"]].append(p["correct"])
    tasks = {t: _accuracy(v) for t, v in sorted(per_task.items())}
    n = len(predictions)
    summary = {"tasks": tasks, "n": n, "accuracy": sum(p["correct"] for p in predictions) / n if n else 0.0}
    if per_objects:
        summary["objects"] = {t: {k: _accuracy(v) for k, v in sorted(by_k.items())}
                              for t, by_k in sorted(per_objects.items(), key=lambda kv: kv[0] == "overall")}
    return summary


def _accuracy(correct: list[bool]) -> dict[str, Any]:
    return {"n": len(correct), "accuracy": sum(correct) / len(correct)}


def format_vqa_results(summary: dict[str, Any]) -> str:
    """The summary as markdown: accuracy per family, then (when known) per number of objects."""
    lines = ["| task | questions | accuracy |", "|---|---:|---:|"]
    for task, r in summary["tasks"].items():
        lines.append(f"| {task} | {r['n']} | {100 * r['accuracy']:.1f}% |")
    lines.append(f"| **overall** | {summary['n']} | **{100 * summary['accuracy']:.1f}%** |")
    if summary.get("skipped"):
        lines += ["", summary["skipped"]["report"]]
    if summary.get("objects"):
        counts = sorted({k for by_k in summary["objects"].values() for k in by_k})
        lines += ["", "Accuracy by objects in the scene (questions in brackets):", "",
                  "| task | " + " | ".join(f"{k} object{'s' * (k > 1)}" for k in counts) + " |",
                  "|---|" + "---:|" * len(counts)]
        for task, by_k in summary["objects"].items():
            cells = [f"{100 * by_k[k]['accuracy']:.1f}% ({by_k[k]['n']})" if k in by_k else "–" for k in counts]
            name = f"**{task}**" if task == "overall" else task
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_predictions(predictions: list[dict], path: str | Path) -> None:
    with Path(path).open("w") as f:
        for p in predictions:
            f.write(json.dumps({k: p[k] for k in ("id", "task", "n_objects", "question", "answer", "prediction")
                                if k in p}) + "\n")
