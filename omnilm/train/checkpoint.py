"""Training checkpoints that resume exactly: weights, optimizer moments, step and RNG state.

Layout (no pickle anywhere; tensors in safetensors, the rest in JSON):

    OUT/checkpoints/step-000100/model/               the model's and its processor's save_pretrained folder
    OUT/checkpoints/step-000100/adapter/             a LoRA run's adapter (peft's format); model/ is then the base
    OUT/checkpoints/step-000100/optimizer.safetensors optimizer moments, one tensor per (param, key)
    OUT/checkpoints/step-000100/trainer_state.json   step, param groups, RNG states, run config
    OUT/checkpoints/latest                           the name of the newest complete checkpoint

A sharded run (--parallel fsdp, or --expert-parallel) has no rank holding the whole model: every rank writes its shards
of the weights and of the optimizer moments through torch.distributed.checkpoint, as safetensors
files with their place in the whole tensors in each file's header (HuggingFaceStorageWriter; no
pickle), and rank 0 the JSON state:

    OUT/checkpoints/step-000100/sharded/             shard-0000K-model-00001-of-00001.safetensors, one per rank
    OUT/checkpoints/step-000100/rng.safetensors      the RNG state
    OUT/checkpoints/step-000100/trainer_state.json

Such a checkpoint loads into any number of processes (each reads the slices it holds: resharding),
one included. The final one also holds model/ (and adapter/), gathered whole, so OUT/model is a
plain model folder as after a one-process run.

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
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.tensor import DTensor

from omnilm.errors import OmniInputError
from omnilm.io import atomic_write, write_text
from omnilm.model import OmniModel
from omnilm.train.distributed import Ranks, full_tensor, shard_view
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
    final, tmp = _folders(out, step)
    _begin(tmp)
    _write_model(tmp, model, processor)
    tensors, groups = _flatten_optimizer(optimizer)
    # Through atomic_write for its file mode: safetensors creates its files 0600, as mkstemp does.
    atomic_write(tmp / "optimizer.safetensors", lambda file: save_file(tensors | _rng_state(), file))
    _write_state(tmp, step, groups, run_config)
    return _commit(final, tmp, keep)


def _folders(out: Path, step: int) -> tuple[Path, Path]:
    """Checkpoint `step`'s folder under OUT/checkpoints, and the one it is written in first."""
    final = Path(out) / "checkpoints" / f"step-{step:06d}"
    return final, final.with_name(final.name + ".tmp")


def _begin(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)


def _rng_state() -> dict[str, torch.Tensor]:
    return {"rng.torch": torch.get_rng_state(),
            **({"rng.cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})}


def _write_model(folder: Path, model: nn.Module, processor) -> None:
    if lora_layers(model):  # the base model as it was, and the adapter (with the projector) beside it
        with without_lora(model):
            model.save_pretrained(folder / "model")
        save_adapter(model, folder / ADAPTER, full=trained_in_full(model))
    else:
        model.save_pretrained(folder / "model")
    processor.save_pretrained(folder / "model")


def _write_state(folder: Path, step: int, groups: list[dict], run_config: dict[str, Any]) -> None:
    state = {"step": step, "param_groups": groups, "python_rng": _jsonable(random.getstate()),
             "run_config": run_config}
    (folder / "trainer_state.json").write_text(json.dumps(state, indent=2, default=str) + "\n")


def _commit(final: Path, tmp: Path, keep: int) -> Path:
    root = final.parent
    _remove(final)
    os.rename(tmp, final)
    write_text(root / "latest", final.name + "\n")
    for old in sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))[:-keep]:
        _remove(old)
    return final


SHARDED = "sharded"  # a sharded run's weights and optimizer moments, through torch.distributed.checkpoint


def save_sharded_checkpoint(out: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                            run_config: dict[str, Any], ranks: Ranks, export: tuple[nn.Module, Any] | None = None,
                            keep: int = 2) -> Path:
    """Every rank calls this: each writes its shards, rank 0 the rest. With `export` (a skeleton of the
    model on the meta device, and the processor) the weights are also gathered, one tensor at a time,
    into the skeleton on rank 0 and written as model/ (and adapter/) as a one-process run would."""
    final, tmp = _folders(out, step)
    if ranks.is_main:
        _begin(tmp)
    _barrier(ranks)
    tensors, groups = _sharded_state(model, optimizer)
    dcp.save(tensors, storage_writer=dcp.HuggingFaceStorageWriter(str(tmp / SHARDED), save_distributed=True))
    if export is not None:
        skeleton, processor = export
        whole = {}
        view = shard_view(model)
        for name, t in model.state_dict().items():
            t = full_tensor(view(name, t))  # a collective: every rank, in the same order
            if ranks.is_main:
                whole[name] = t.detach().cpu()
        if ranks.is_main:
            skeleton.load_state_dict(whole, assign=True)
            _write_model(tmp, skeleton, processor)
    if ranks.is_main:
        atomic_write(tmp / "rng.safetensors", lambda file: save_file(_rng_state(), file))
        _write_state(tmp, step, groups, run_config)
        _commit(final, tmp, keep)
    _barrier(ranks)  # the checkpoint is complete for every rank before any goes on
    return final


def is_sharded_checkpoint(path: Path) -> bool:
    return (Path(path) / SHARDED).is_dir()


def _sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The model's and the optimizer's tensors under flat names (model.FQN, optim.FQN.KEY), as this
    rank holds them (DTensor shards, or whole tensors), and the optimizer's parameter groups."""
    optim = get_optimizer_state_dict(model, optimizer)  # creates the moments of a fresh optimizer
    view = shard_view(model)
    tensors = {f"model.{name}": view(name, t) for name, t in model.state_dict().items()}
    tensors |= {f"optim.{fqn}.{key}": view(fqn, t) for fqn, entry in optim["state"].items() for key, t in entry.items()}
    return tensors, optim["param_groups"]


def load_sharded_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Restore weights, optimizer moments and RNG state from the sharded checkpoint `path` into
    `model` (sharded over any number of ranks, or whole on one process); return its step."""
    state = json.loads((path / "trainer_state.json").read_text())
    tensors, groups = _sharded_state(model, optimizer)
    _check_groups(path, state["param_groups"], groups)
    with warnings.catch_warnings():  # on one process, which reads every rank's shards: as intended
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.load(tensors, storage_reader=dcp.HuggingFaceStorageReader(str(path / SHARDED)))  # in place
    params = dict(model.named_parameters())
    optim = {"state": {}, "param_groups": state["param_groups"]}
    for name, t in tensors.items():
        if name.startswith("optim."):
            fqn, key = name[len("optim."):].rsplit(".", 1)
            # An expert slice's view goes back to the plain tensor its parameter is.
            local = isinstance(t, DTensor) and not isinstance(params[fqn], DTensor)
            optim["state"].setdefault(fqn, {})[key] = t.to_local() if local else t
    set_optimizer_state_dict(model, optimizer, optim)
    _restore_rng(load_file(path / "rng.safetensors"), state)
    return int(state["step"])


def _barrier(ranks: Ranks) -> None:
    if ranks.world > 1:
        dist.barrier()


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
    _check_groups(path, state["param_groups"], optimizer.param_groups)
    tensors = load_file(path / "optimizer.safetensors")
    rng = {name: tensors.pop(name) for name in ("rng.torch", "rng.cuda") if name in tensors}
    optimizer.load_state_dict(_unflatten_optimizer(tensors, state["param_groups"]))
    _restore_rng(rng, state)
    return int(state["step"])


def _check_groups(path: Path, saved_groups: list[dict], groups: list[dict]) -> None:
    saved, now = _group_sizes(saved_groups), _group_sizes(groups)
    if saved != now:
        raise OmniInputError(
            f"{path} holds optimizer state for parameter groups of {saved} parameters, but this run's optimizer "
            f"has groups of {now}: the checkpoint splits the model between AdamW and Muon otherwise (an earlier "
            "omnilm wrote it); finish the run with that version, or start a new --out")


def _restore_rng(tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    random.setstate(_tuples(state["python_rng"]))


def _group_sizes(param_groups: list[dict]) -> list[int]:
    return [len(group["params"]) for group in param_groups]


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x
