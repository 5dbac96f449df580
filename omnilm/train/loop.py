"""The training loop, visible: one function for every stage of LLaVA-1.5's recipe.

    clip      vision encoder + small text encoder, contrastive (CLIP, Radford et al. 2021): no
              pretrained CLIP can be downloaded here, and LLaVA assumes one
    align     stage 1, feature alignment: only the projector trains, on captions
    instruct  stage 2, visual instruction tuning: projector + LLM train (vision frozen by default)

A stage is a model, the parameters it trains, a dataset and a loss; `train` runs any of them:
LR as a function of the step, inline gradient accumulation, clipping, a progress bar, metrics
to JSONL, atomic safetensors checkpoints and an exact `resume`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from omnilm.cost import RunCost
from omnilm.data.collate import to_device
from omnilm.errors import OmniInputError
from omnilm.interpret.routing import plot_load
from omnilm.io import atomic_write, write_text
from omnilm.model.flops import training_flops
from omnilm.model.layers import resolve_device
from omnilm.model.moe import MoE
from omnilm.settings import to_dict
from omnilm.train.args import TrainArgs
from omnilm.train.checkpoint import (checkpoint_config, checkpoint_step, clean_interrupted_saves,
                                     discard_unfinished_checkpoints, has_checkpoint, is_published,
                                     is_sharded_checkpoint, latest_checkpoint, load_sharded_checkpoint,
                                     load_trainer_state, publish_model, save_checkpoint, save_sharded_checkpoint)
from omnilm.train.distributed import (Ranks, all_sum, all_sum_logged, clip_grad_norm, is_sharded, skeleton, start,
                                      stop, wrap)
from omnilm.train.optim import bf16_is_fast, build_optimizer, describe_split, lr_factor, set_lr
from omnilm.train.stages import build_stage

# --- deterministic batches ----------------------------------------------------------------------


class BatchStream:
    """Micro-batch k of a run is a pure function of (seed, k): a fresh permutation per epoch, drop
    the ragged tail. Resuming at step s therefore continues with exactly the batches it would have seen.

    With `lengths` (tokens per record), each run of GROUP batches of the permutation is sorted by
    length and cut into batches again, and the epoch's batches are shuffled: records of a batch have
    similar lengths, so less of it is padding (LLaVA's group_by_modality_length, HF's group_by_length)."""

    GROUP = 16

    def __init__(self, n: int, batch_size: int, seed: int, lengths: list[int] | None = None):
        if n < batch_size:
            raise OmniInputError(f"the dataset has {n} records but --batch-size is {batch_size}: use a smaller batch")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.lengths = None if lengths is None else torch.as_tensor(lengths)
        self.per_epoch = n // batch_size
        self._epoch, self._perm = -1, None

    def indices(self, k: int) -> list[int]:
        epoch, j = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
            if self.lengths is not None:
                self._perm = self._grouped(self._perm[:self.per_epoch * self.batch_size], g)
        return self._perm[j * self.batch_size:(j + 1) * self.batch_size].tolist()

    def _grouped(self, perm: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        lengths = self.lengths[perm]
        size = self.GROUP * self.batch_size
        chunks = [perm[i:i + size][lengths[i:i + size].argsort(descending=True, stable=True)]
                  for i in range(0, len(perm), size)]
        batches = torch.cat(chunks).view(self.per_epoch, self.batch_size)
        return batches[torch.randperm(self.per_epoch, generator=g)].flatten()


# --- the loop ----------------------------------------------------------------------------------


def train(args: TrainArgs) -> dict[str, Any]:
    """Run a stage; returns a summary (final loss, steps, time). Writes under `args.out`:
    metrics.jsonl, loss.png, checkpoints/ and model/ (the final model, save_pretrained format).

    A run killed at any moment continues with `resume` (or, killed before its first checkpoint was
    finished, with a plain rerun) to the same losses and weights; see `omnilm.train.checkpoint`.
    A non-finite loss, gradient norm or learning rate stops the run before that step is applied.
    Under torchrun with `parallel` set, every rank runs this; rank 0 alone writes (distributed.py)."""
    ranks, device = start(args.parallel, resolve_device(args.device))
    done = False
    try:
        summary = _train(args, device, ranks)
        done = True
        return summary
    finally:
        stop(ranks, wait=done)


def _train(args: TrainArgs, device: torch.device, ranks: Ranks) -> dict[str, Any]:
    from tqdm import tqdm

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.expert_parallel not in (1, ranks.world):
        raise OmniInputError(f"--expert-parallel {args.expert_parallel} splits the experts over all the processes, and "
                             f"torchrun started {ranks.world}: start {args.expert_parallel} (--nproc-per-node), or "
                             f"pass --expert-parallel {ranks.world}")
    if args.batch_size < ranks.world:
        raise OmniInputError(f"--batch-size {args.batch_size} is the global batch, shared by {ranks.world} ranks: "
                             f"give at least {ranks.world}")
    use_bf16 = args.bf16 if args.bf16 is not None else bf16_is_fast(device)
    torch.manual_seed(args.seed)

    run_config = to_dict(args)
    if ranks.is_main:
        clean_interrupted_saves(out)
    end = args.steps if args.stop_after is None else min(args.steps, args.stop_after)
    if args.resume:
        resume_from = latest_checkpoint(out)
        _check_same_run(checkpoint_config(resume_from), run_config, resume_from)
        if checkpoint_step(resume_from) >= end:
            if end == args.steps and not is_published(out, resume_from):  # killed while writing model/
                return _finish(args, out, resume_from, device)
            raise OmniInputError(f"{resume_from} is already at step {checkpoint_step(resume_from)}, and this run ends "
                                 f"at {end}: nothing to do")
    else:
        resume_from = None
        if has_checkpoint(out):
            raise OmniInputError(f"{out} already holds checkpoints of an earlier run: pass --resume to continue it, "
                                 "or use a new --out (or delete its checkpoints/)")
        if ranks.is_main:
            discard_unfinished_checkpoints(out)
    # A sharded checkpoint's weights are read after the model is built (and sharded) as a fresh run builds it.
    sharded_resume = resume_from is not None and is_sharded_checkpoint(resume_from)
    stage = build_stage(args, None if sharded_resume else resume_from)
    model = stage.model.to(device)  # in train mode, frozen parts in eval: the stage decides
    if args.expert_parallel > 1 and not any(isinstance(m, MoE) for m in model.modules()):
        raise OmniInputError(f"--expert-parallel {args.expert_parallel} splits the experts of MoE layers, and this "
                             "model has none: drop it")
    # Rank 0 gathers a sharded model's final weights into this copy, on the meta device until then.
    will_shard = ranks.world > 1 and (args.parallel == "fsdp" or args.expert_parallel > 1)
    export = (skeleton(model), stage.processor) if will_shard else None
    # What the steps call; `model` is what is saved.
    forward = wrap(model, args.parallel, ranks, device, use_bf16, args.expert_parallel)
    if args.compile:  # batches differ in length: one graph with a symbolic length, not one per length
        forward = torch.compile(forward, dynamic=True)
    sharded = is_sharded(model)
    if sharded and resume_from is not None and not sharded_resume:
        raise OmniInputError(f"{resume_from} was written by one process or by ddp, and holds the optimizer state "
                             f"whole: resume it with --parallel none or ddp (checkpoints of a sharded run resume "
                             "under any --parallel)")
    optimizer = build_optimizer(model, args.lr, args.weight_decay, stage.group_lrs, kind=args.optimizer)
    writes = ranks.is_main
    if args.progress and writes:
        print(f"stage {args.stage}: {describe_split(optimizer)}", flush=True)

    def save(step: int, final: bool = False) -> Path | None:
        if sharded:
            return save_sharded_checkpoint(out, step, model, optimizer, run_config, ranks, export if final else None)
        return save_checkpoint(out, step, model, stage.processor, optimizer, run_config) if writes else None

    start = 0
    if sharded_resume:
        start = load_sharded_checkpoint(resume_from, model, optimizer)
    elif resume_from is not None:
        start = load_trainer_state(resume_from, optimizer)
    lengths = stage.dataset.token_lengths() if args.group_by_length else None
    stream = BatchStream(len(stage.dataset), args.batch_size, args.seed, lengths)
    params = [p for p in model.parameters() if p.requires_grad]
    cost = RunCost(device, torch.bfloat16 if use_bf16 else next(model.parameters()).dtype)

    metrics_path = out / "metrics.jsonl"
    kept = []
    if resume_from is not None and metrics_path.exists():  # drop rows logged after the checkpoint
        kept = [line for line in metrics_path.read_text().splitlines() if _logged_step(line) <= start]
    if writes:
        write_text(metrics_path, "".join(line + "\n" for line in kept))  # atomic: a kill here loses no rows
    with (metrics_path.open("a") if writes else open(os.devnull, "w")) as metrics_file:
        bar = tqdm(total=args.steps, initial=start, desc=f"{args.stage}", unit="step",
                   disable=not (args.progress and writes), dynamic_ncols=True)
        losses: list[float] = []
        last_saved = resume_from
        t_start = time.perf_counter()
        for step in range(start, end):
            t0 = time.perf_counter()
            set_lr(optimizer, lr_factor(step, args.steps, min(args.warmup, args.steps), args.min_lr_ratio))
            batches = [to_device(stage.collate([stage.dataset[i] for i in
                                                ranks.share(stream.indices(step * args.grad_accum + m))]), device)
                       for m in range(args.grad_accum)]
            # Each micro-batch counts by its number of targets, counted over every rank's share: k
            # micro-batches of b records, shared by n ranks, equal one batch of k*b on one process (a
            # mean of per-batch, or per-rank, means would not).
            weights = [stage.n_targets(b) for b in batches]
            total = all_sum(sum(weights), ranks, device)
            step_loss, tokens, extra = 0.0, 0, {}
            for batch, weight in zip(batches, weights):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    loss, logged = stage.loss(forward, batch)
                share = weight / total
                (loss * share * ranks.world).backward()  # DDP averages the ranks' gradients: a sum is wanted
                step_loss += loss.item() * share
                tokens += int(batch["attention_mask"].sum())
                _accumulate(extra, logged, share)
            step_loss, tokens = all_sum(step_loss, ranks, device), int(all_sum(tokens, ranks, device))
            extra = all_sum_logged(extra, ranks, device)
            grad_norm = clip_grad_norm(params, args.clip_grad, model)
            # Checked before the step is applied, so that no non-finite weight is ever trained on or saved.
            problem = _non_finite(step_loss, grad_norm, optimizer)
            if problem:
                bar.close()
                raise OmniInputError(_stopped_message(step + 1, problem, last_saved))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            dt = time.perf_counter() - t0
            flops = [training_flops(model, b["input_ids"], b["attention_mask"], w) for b, w in zip(batches, weights)]
            cost.step(flops, tokens, dt)
            losses.append(step_loss)
            record = {"step": step + 1, "loss": round(step_loss, 8), "lr": optimizer.param_groups[0]["lr"],
                      "grad_norm": round(grad_norm, 4), "tokens_per_s": round(tokens / dt, 1), "step_s": round(dt, 4),
                      **_rounded(extra)}
            metrics_file.write(json.dumps(record) + "\n")
            if (step + 1) % args.log_every == 0:
                metrics_file.flush()  # so `tail -f metrics.jsonl` follows the run
            bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tokens / dt:,.0f}", refresh=False)
            bar.update(1)
            if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < end:
                metrics_file.flush()  # the checkpoint's steps are on disk before it is
                last_saved = save(step + 1)
        bar.close()

    final = save(end, final=end == args.steps)
    spent = cost.summary(lambda x: all_sum(x, ranks, device), ranks.world)
    if writes:
        write_text(out / "cost.json", json.dumps(spent, indent=1) + "\n")
        plot_loss(out / "metrics.jsonl", out / "loss.png", title=f"stage {args.stage}")
        plot_routing(out / "metrics.jsonl", out / "routing.png", title=f"stage {args.stage}")
        if end == args.steps:  # last, so that a whole model/ means a finished run
            publish_model(out, final)
    return {"stage": args.stage, "steps": end, "losses": losses, "final_loss": losses[-1] if losses else None,
            "seconds": time.perf_counter() - t_start, "cost": spent, "model": model, "processor": stage.processor}


def _finish(args: TrainArgs, out: Path, final: Path, device: torch.device) -> dict[str, Any]:
    """The end of a run killed after its last checkpoint: plots and model/ from that checkpoint."""
    t_start = time.perf_counter()
    stage = build_stage(args, final)
    plot_loss(out / "metrics.jsonl", out / "loss.png", title=f"stage {args.stage}")
    plot_routing(out / "metrics.jsonl", out / "routing.png", title=f"stage {args.stage}")
    publish_model(out, final)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"stage": args.stage, "steps": args.steps, "losses": [], "final_loss": rows[-1]["loss"] if rows else None,
            "seconds": time.perf_counter() - t_start, "model": stage.model.to(device), "processor": stage.processor}


def _non_finite(loss: float, grad_norm: float, optimizer: torch.optim.Optimizer) -> str | None:
    """What about to be applied is not a finite number (inf, nan), in words; None if all is."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        return f"the loss is {loss} (gradient norm {grad_norm})"
    for group in optimizer.param_groups:
        for key in ("lr", "weight_decay"):
            if not math.isfinite(group.get(key, 0.0)):
                return f"the {key} of parameter group {group.get('name', '?')} is {group[key]}"
    return None


def _stopped_message(step: int, problem: str, last_saved: Path | None) -> str:
    # --resume refuses a changed --lr (it would not be the same run), so a lower rate means a new --out.
    if last_saved is None:
        after = "then rerun (no checkpoint was saved before it)"
    else:
        after = (f"then start a new --out, or, if the cause is gone, --resume (from checkpoints/{last_saved.name}, "
                 "left as it was)")
    return (f"training stopped at step {step}: {problem}, so nothing of this step was applied or saved; "
            f"lower --lr (or raise --warmup) or check the data, {after}")


def _accumulate(total: dict[str, Any], logged: dict[str, Any], share: float) -> None:
    """Add one micro-batch's logged numbers (scalars, or lists of lists as an MoE's load) weighted by `share`."""
    for key, value in logged.items():
        if isinstance(value, list):
            old = total.get(key)
            total[key] = [[(old[i][j] if old else 0.0) + share * v for j, v in enumerate(row)]
                          for i, row in enumerate(value)]
        else:
            total[key] = total.get(key, 0.0) + share * value


def _rounded(logged: dict[str, Any]) -> dict[str, Any]:
    return {key: [[round(v, 4) for v in row] for row in value] if isinstance(value, list) else round(value, 6)
            for key, value in logged.items()}


def _logged_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):  # a line cut short by a crash
        return float("inf")


# Settings a resumed run may change: they do not alter what it computes. Nor do the number and layout
# of the processes (a sharded checkpoint loads into any) or where the run folder is (it may have moved).
RESUMABLE_CHANGES = {"resume", "stop_after", "device", "progress", "log_every", "save_every", "bf16", "parallel",
                     "expert_parallel", "out"}


def _check_same_run(saved: dict[str, Any], now: dict[str, Any], where: Path) -> None:
    # A setting added after the checkpoint was written counts as its default.
    defaults = {f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(TrainArgs)
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    saved = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}
    changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k])
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed[:4])
        raise OmniInputError(f"--resume from {where} with different settings ({details}): resume with the "
                             "original ones, or start a new run in a new --out")


def plot_routing(metrics: Path, png: Path, title: str = "", last: int = 50) -> None:
    """An MoE run's expert load (layers x experts), averaged over its last `last` logged steps."""
    rows = [row for row in map(json.loads, metrics.read_text().splitlines()) if "load" in row]
    if not rows:
        return  # a dense model, or a stage without routing
    rows = rows[-last:]
    load = torch.tensor([row["load"] for row in rows]).mean(0)
    aux = sum(row["aux_loss"] for row in rows) / len(rows)
    dropped = sum(row["dropped"] for row in rows) / len(rows)
    plot_load(load.tolist(), png, title=f"{title}: expert load, last {len(rows)} steps\n"
                                        f"aux loss {aux:.3f}, dropped {100 * dropped:.1f}%")


def plot_loss(metrics: Path, png: Path, title: str = "") -> None:
    """Loss against step from a metrics.jsonl, drawn with matplotlib (headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(png, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
