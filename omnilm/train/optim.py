"""AdamW with parameter groups, and the learning-rate schedule as a plain function of the step."""

from __future__ import annotations

import math

import torch
from torch import nn


def lr_factor(step: int, total: int, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to `min_ratio` of the peak at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0,
                    group_lrs: dict[str, float] | None = None, betas=(0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of `model`.

    `group_lrs` maps a top-level module name (e.g. "projector") to its own peak LR, as LLaVA
    trains its projector faster than the LLM. Matrices decay; norms, biases and embeddings
    (1-D or looked up, not multiplied) do not. Each group keeps its peak in "base_lr".
    """
    group_lrs = group_lrs or {}
    looked_up = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        top = name.split(".")[0]
        decay = p.ndim >= 2 and id(p) not in looked_up
        groups.setdefault((top if top in group_lrs else "", decay), []).append(p)
    if not groups:
        raise ValueError("no trainable parameters: check which parts of the model the stage trains")
    param_groups = []
    for (top, decay), params in sorted(groups.items()):
        peak = group_lrs.get(top, lr)
        param_groups.append({"params": params, "lr": peak, "base_lr": peak, "name": top or "model",
                             "weight_decay": weight_decay if decay else 0.0})
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas)


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
