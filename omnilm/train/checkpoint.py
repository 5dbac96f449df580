"""Training checkpoints that resume exactly: weights, optimizer moments, step and RNG state.

Layout (no pickle anywhere; tensors in safetensors, the rest in JSON):

    OUT/checkpoints/step-000100/model/               the model's and its processor's save_pretrained folder
    OUT/checkpoints/step-000100/optimizer.safetensors optimizer moments, one tensor per (param, key)
    OUT/checkpoints/step-000100/trainer_state.json   step, param groups, RNG states, run config
    OUT/checkpoints/latest                           the name of the newest complete checkpoint

A checkpoint is written into `step-N.tmp/` and renamed when complete, and `latest` moves only
after that, so a crash mid-save leaves the previous checkpoint in charge.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from omnilm.errors import OmniInputError
from omnilm.io import write_text


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    sd = optimizer.state_dict()
    tensors = {f"state.{idx}.{key}": value.detach().cpu().contiguous()
               for idx, entry in sd["state"].items() for key, value in entry.items()}
    return tensors, sd["param_groups"]


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], param_groups: list[dict]) -> dict[str, Any]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": param_groups}


def save_checkpoint(out: Path, step: int, model, processor, optimizer: torch.optim.Optimizer,
                    run_config: dict[str, Any], keep: int = 2) -> Path:
    """Write the state after `step` optimizer steps (the model with its processor's files, so that
    the checkpoint is a model folder too); keep the newest `keep` checkpoints."""
    root = Path(out) / "checkpoints"
    final = root / f"step-{step:06d}"
    tmp = root / f"step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp / "model")
    processor.save_pretrained(tmp / "model")
    tensors, groups = _flatten_optimizer(optimizer)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, tmp / "optimizer.safetensors")
    state = {"step": step, "param_groups": groups, "python_rng": _jsonable(random.getstate()),
             "run_config": run_config}
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2, default=str) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    write_text(root / "latest", final.name + "\n")
    for old in sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))[:-keep]:
        shutil.rmtree(old)
    return final


def latest_checkpoint(out: Path) -> Path:
    root = Path(out) / "checkpoints"
    pointer = root / "latest"
    if not pointer.is_file():
        raise OmniInputError(f"nothing to resume in {out}: no checkpoints/latest; start without --resume")
    path = root / pointer.read_text().strip()
    if not path.is_dir():
        raise OmniInputError(f"{pointer} names {path.name}, which is missing; delete {pointer} or restore the folder")
    return path


def checkpoint_config(path: Path) -> dict[str, Any]:
    """The run settings (TrainArgs, as JSON) a checkpoint was written with."""
    return json.loads((Path(path) / "trainer_state.json").read_text())["run_config"]


def load_trainer_state(path: Path, optimizer: torch.optim.Optimizer) -> int:
    """Restore optimizer moments and RNG state from checkpoint `path`; return its step."""
    state = json.loads((path / "trainer_state.json").read_text())
    saved, now = _group_sizes(state["param_groups"]), _group_sizes(optimizer.param_groups)
    if saved != now:
        raise OmniInputError(
            f"{path} holds optimizer state for parameter groups of {saved} parameters, but this run's optimizer "
            f"has groups of {now}: the checkpoint splits the model between AdamW and Muon otherwise (an earlier "
            "omnilm wrote it); finish the run with that version, or start a new --out")
    tensors = load_file(path / "optimizer.safetensors")
    torch.set_rng_state(tensors.pop("rng.torch"))
    cuda_rng = tensors.pop("rng.cuda", None)
    if cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_rng)
    optimizer.load_state_dict(_unflatten_optimizer(tensors, state["param_groups"]))
    random.setstate(_tuples(state["python_rng"]))
    return int(state["step"])


def _group_sizes(param_groups: list[dict]) -> list[int]:
    return [len(group["params"]) for group in param_groups]


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x
