"""What the clip recipes (`demo-video`, `demo-audio`) share once their data is written: instruct
stages, each from the model of the one before, then held-out accuracy under each control and the
haystack grid, written under `out/`."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from omnilm.data.llava_json import read_records
from omnilm.eval.niah import NiahArgs, clip_niah
from omnilm.eval.vqa import evaluate_vqa, write_predictions
from omnilm.io import write_json
from omnilm.train import TrainArgs, train


def train_and_measure(out: Path, data: Path, stages: list[tuple[str, Path, dict[str, Any]]], test_json: Path,
                      controls: tuple[str, ...], control: str, haystack: dict[str, Any],
                      progress: bool = True) -> dict[str, Any]:
    """Train `stages` in turn, each (name, records json, TrainArgs fields beyond data, folders and
    progress) an instruct stage under out/name, every one after the first from the model of the one
    before (whose projector it keeps: never whitened afresh); keep the last model as `out/model`, answer `test_json` once under each of `controls`
    (`evaluate_vqa(..., **{control: c})`; the first one's predictions written to predictions.jsonl,
    every one's accuracy to eval.json), then the haystack grid `haystack` gives (NiahArgs fields
    beyond the checkpoint and out/niah). Returns the evaluations, the haystack's report and rows, the
    model's folder and each step's seconds."""
    for stage in ("model", "niah", *(name for name, _, _ in stages)):  # the recipe owns out/: a rerun starts afresh
        shutil.rmtree(out / stage, ignore_errors=True)
    timings, start = {}, {}
    for name, records, settings in stages:
        summary = train(TrainArgs(**{"stage": "instruct", "data": records, "image_folder": data, "out": out / name,
                                     "tokenizer": data / "tokenizer", "progress": progress, **settings, **start}))
        timings[name] = summary["seconds"]
        start = {"init": out / name / "model", "whiten_projector": False}
    model, processor = summary["model"].eval(), summary["processor"]
    shutil.copytree(start["init"], out / "model")

    evaluations = {}
    for shown in controls:
        t = time.perf_counter()
        evaluations[shown], predictions = evaluate_vqa(model, processor, read_records(test_json), data,
                                                       progress=progress, **{control: shown})
        timings[f"eval ({shown})"] = time.perf_counter() - t
        if shown == controls[0]:
            write_predictions(predictions, out / "predictions.jsonl")
    write_json(out / "eval.json", evaluations)

    t = time.perf_counter()
    grid = NiahArgs(checkpoint=out / "model", out=out / "niah", max_new_tokens=4, **haystack)
    report, rows = clip_niah(model, processor, grid, progress)
    timings["haystack"] = time.perf_counter() - t
    return {"eval": evaluations, "haystack": rows, "haystack_report": report, "model": out / "model",
            "timings": timings}
