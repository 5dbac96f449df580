"""Training on several processes with PyTorch's own distributed stack, launched by torchrun.

    torchrun --nproc-per-node N -m omnilm train ... --parallel ddp

Each process (rank) is started by torchrun with RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous
in its environment; `start` joins the process group (NCCL on CUDA, gloo on CPU). With DDP every
rank holds the whole model, reads its share of each global batch, and the gradients are averaged
across ranks after each backward pass. The loss is normalised by the global number of supervised
tokens (`all_sum` of every rank's count), so N processes take exactly the steps one process takes
on the same global batch, whatever each rank's share of the tokens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from omnilm.errors import OmniInputError
from omnilm.model.moe import MoE

PARALLEL = ("none", "ddp")


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        """The rank that logs, shows progress and writes checkpoints."""
        return self.rank == 0

    def share(self, items: list) -> list:
        """This rank's part of a global batch: its contiguous slice (sizes differ by one at most), so
        that with a batch of b on n ranks, rank r's micro-batch is the r-th micro-batch of b / n
        that one process accumulating n of them would take."""
        n = len(items)
        return items[n * self.rank // self.world:n * (self.rank + 1) // self.world]


def launched_world() -> int:
    """How many processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def start(parallel: str, device: torch.device) -> Ranks:
    """Join the process group torchrun set up, as `parallel` asks; Ranks() for a single process."""
    world = launched_world()
    if parallel == "none":
        if world > 1:
            raise OmniInputError(f"torchrun started {world} processes but --parallel is none: pass --parallel ddp")
        return Ranks()
    if world == 1 and "RANK" not in os.environ:
        raise OmniInputError(f"--parallel {parallel} runs under torchrun: torchrun --nproc-per-node N -m omnilm train ...")
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size())


def stop(ranks: Ranks, wait: bool = True) -> None:
    """Leave the process group; with `wait`, once every rank is done (so that rank 0's last writes are
    complete). A rank that failed does not wait: torchrun then stops the others."""
    if ranks.world > 1 and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def all_sum(value: float, ranks: Ranks, device: torch.device) -> float:
    """`value` summed over the ranks (itself on one process), in float64."""
    if ranks.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t)


def wrap(model: nn.Module, parallel: str, ranks: Ranks, device: torch.device) -> nn.Module:
    """What the training step calls: `model` itself, or a DDP wrapper around it (which averages the
    gradients over the ranks). Parameters, the optimizer and checkpoints stay with `model`."""
    if parallel == "none" or ranks.world == 1:
        return model
    # An MoE layer may route no token to an expert in a batch: its parameters then get no gradient.
    moe = any(isinstance(m, MoE) for m in model.modules())
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=moe)
