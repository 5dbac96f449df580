"""Training checkpoints that resume exactly: weights, optimizer moments, step and RNG state.

Layout (no pickle anywhere; tensors in safetensors, the rest in JSON):

    OUT/checkpoints/step-000100/model/               the model's and its processor's save_pretrained folder
    OUT/checkpoints/step-000100/adapter/             a LoRA run's adapter (peft's format); model/ is then the base
    OUT/checkpoints/step-000100/optimizer.safetensors optimizer moments, one tensor per (param, key)
    OUT/checkpoints/step-000100/trainer_state.json   step, param groups, RNG states, run config
    OUT/checkpoints/latest                           the name of the newest complete checkpoint

A checkpoint is written into `step-N.tmp/` and renamed when complete, and `latest` moves only
after that, so a crash mid-save leaves the previous checkpoint in charge. A checkpoints/ folder
without `latest` holds no finished checkpoint (the run died during its first save): a plain rerun
starts afresh. The final `OUT/model/` is a copy of the last checkpoint's model folder, renamed into
place when complete, so a run killed while writing it is finished by `--resume`. What a killed save
leaves behind (`step-N.tmp/`, `model.tmp/`, `.NAME.*.tmp` files) is removed when a run starts.
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
from omnilm.io import atomic_write, write_text
from omnilm.model import OmniModel
from omnilm.train.lora import load_adapter, lora_layers, merge_lora, save_adapter, trained_in_full, without_lora


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
    if lora_layers(model):  # the base model as it was, and the adapter (with the projector) beside it
        with without_lora(model):
            model.save_pretrained(tmp / "model")
        save_adapter(model, tmp / ADAPTER, full=trained_in_full(model))
    else:
        model.save_pretrained(tmp / "model")
    processor.save_pretrained(tmp / "model")
    tensors, groups = _flatten_optimizer(optimizer)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    # Through atomic_write for its file mode: safetensors creates its files 0600, as mkstemp does.
    atomic_write(tmp / "optimizer.safetensors", lambda file: save_file(tensors, file))
    state = {"step": step, "param_groups": groups, "python_rng": _jsonable(random.getstate()),
             "run_config": run_config}
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2, default=str) + "\n")
    _remove(final)
    os.rename(tmp, final)
    write_text(root / "latest", final.name + "\n")
    for old in sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))[:-keep]:
        _remove(old)
    return final


def _remove(folder: Path) -> None:
    # Renamed first, so that a kill mid-delete leaves a `.tmp` folder the next start removes, not half a checkpoint.
    if folder.exists():
        doomed = folder.with_name(folder.name + ".old.tmp")
        shutil.rmtree(doomed, ignore_errors=True)
        os.rename(folder, doomed)
        shutil.rmtree(doomed)


def clean_interrupted_saves(out: Path) -> None:
    """Remove what a run killed mid-save left in `out`: unfinished checkpoint folders, the unfinished
    copy of the final model, temporary files of atomic writes."""
    out = Path(out)
    # In OUT itself only the names of the files a run writes there: OUT may be a folder of the user's.
    for tmp in [*(out / "checkpoints").glob(".*.tmp"), *(out / "model").glob(".*.tmp"),
                *out.glob(".metrics.jsonl.*.tmp"), *out.glob(".loss.png.*.tmp")]:
        tmp.unlink(missing_ok=True)
    for tmp in [*(out / "checkpoints").glob("step-*.tmp"), out / MODEL_TMP, out / ADAPTER_TMP]:
        shutil.rmtree(tmp, ignore_errors=True)


def has_checkpoint(out: Path) -> bool:
    """Whether `out` holds a finished checkpoint: one that `latest` names."""
    return (Path(out) / "checkpoints" / "latest").exists()


def discard_unfinished_checkpoints(out: Path) -> None:
    """Step folders without `latest` are a first save that never finished: remove them (and an
    emptied checkpoints/), so that a plain rerun starts afresh."""
    root = Path(out) / "checkpoints"
    for unfinished in root.glob("step-*"):
        shutil.rmtree(unfinished) if unfinished.is_dir() else unfinished.unlink()
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()


def latest_checkpoint(out: Path) -> Path:
    root = Path(out) / "checkpoints"
    pointer = root / "latest"
    if not pointer.is_file() and root.is_dir():
        raise OmniInputError(f"nothing to resume in {out}: checkpoints/ holds no finished checkpoint (the run stopped "
                             "during its first save); rerun without --resume, which starts it afresh")
    if not pointer.is_file():
        raise OmniInputError(f"nothing to resume in {out}: no checkpoints/latest; start without --resume")
    path = root / pointer.read_text().strip()
    if not path.is_dir():
        raise OmniInputError(f"{pointer} names {path.name}, which is missing; delete {pointer} or restore the folder")
    return path


def checkpoint_step(path: Path) -> int:
    """How many optimizer steps checkpoint `path` holds."""
    return int(json.loads((Path(path) / "trainer_state.json").read_text())["step"])


MODEL_TMP = "model.tmp"  # OUT/model while it is being written
ADAPTER = "adapter"  # a LoRA run's adapter, in a checkpoint and in OUT
ADAPTER_TMP = "adapter.tmp"


def publish_model(out: Path, checkpoint: Path) -> Path:
    """Copy `checkpoint`'s model folder (the model with its processor's files) to OUT/model: into
    OUT/model.tmp, renamed when complete, so that OUT/model is only ever absent or whole. A LoRA
    run's adapter goes to OUT/adapter first, and OUT/model gets it merged into the weights."""
    out, checkpoint = Path(out), Path(checkpoint)
    tmp, final = out / MODEL_TMP, out / "model"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(checkpoint / "model", tmp)
    if (checkpoint / ADAPTER).is_dir():
        shutil.rmtree(out / ADAPTER_TMP, ignore_errors=True)
        shutil.copytree(checkpoint / ADAPTER, out / ADAPTER_TMP)
        shutil.rmtree(out / ADAPTER, ignore_errors=True)
        os.rename(out / ADAPTER_TMP, out / ADAPTER)
        model = OmniModel.from_pretrained(tmp)
        load_adapter(model, out / ADAPTER)
        merge_lora(model).save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    return final


def is_published(out: Path, checkpoint: Path) -> bool:
    """Whether OUT/model holds every file of `checkpoint`'s model folder, at the same size (an older
    omnilm wrote OUT/model in place, and a kill left it partly written)."""
    src, dst = Path(checkpoint) / "model", Path(out) / "model"
    return dst.is_dir() and all((dst / f.relative_to(src)).is_file() and
                                (dst / f.relative_to(src)).stat().st_size == f.stat().st_size
                                for f in src.rglob("*") if f.is_file())


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
