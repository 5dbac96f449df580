"""Training on several processes with PyTorch's own distributed stack, launched by torchrun.

    torchrun --nproc-per-node N -m omnilm train ... --parallel ddp|fsdp

Each process (rank) is started by torchrun with RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous
in its environment; `start` joins the process group (NCCL on CUDA, gloo on CPU). Every rank reads
its share of each global batch, and the loss is normalised by the global number of supervised
tokens (`all_sum` of every rank's count), so N processes take exactly the steps one process takes
on the same global batch, whatever each rank's share of the tokens.

    ddp    every rank holds the whole model; DistributedDataParallel averages the gradients
    fsdp   FSDP2: `fully_shard` on each decoder layer, each vision layer, then the root, so that
           parameters, gradients and optimizer state are split over the ranks and a layer's
           parameters are gathered only while it runs (bf16 compute, fp32 reduction on CUDA)

With either, an MoE layer routes as one process would on the global batch (its capacity, losses and
load are sums over the ranks: omnilm.train.expert_parallel.sync_routing), and `--expert-parallel N`
further splits each MoE layer's experts over the N ranks (`shard_experts`): DDP and FSDP leave those
parameters alone, and their gradient, the sum of what every rank's tokens brought, is divided by N
as DDP divides the others'. These collectives run inside the forward and backward passes, on a
process group of their own, so that they never interleave with DDP's or FSDP's.

Parameters of an FSDP model are DTensors: the optimizer is built after `wrap`, the gradient norm
is gathered from the shards (`clip_grad_norm`), and checkpoints are written by every rank through
torch.distributed.checkpoint (omnilm.train.checkpoint), expert slices as DTensors too (`shard_view`).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.nn.parallel import DistributedDataParallel

from omnilm.errors import OmniInputError
from omnilm.model.moe import MoE
from omnilm.train.expert_parallel import expert_parameters, shard_experts, sync_routing

PARALLEL = ("none", "ddp", "fsdp")


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


def start(parallel: str, device: torch.device) -> tuple[Ranks, torch.device]:
    """Join the process group torchrun set up, as `parallel` asks; Ranks() for a single process. Returns
    the ranks and this rank's device: on CUDA, GPU LOCAL_RANK of its machine."""
    world = launched_world()
    if parallel == "none":
        if world > 1:
            raise OmniInputError(f"torchrun started {world} processes but --parallel is none: pass --parallel ddp "
                                 "or fsdp")
        return Ranks(), device
    if world == 1 and "RANK" not in os.environ:
        raise OmniInputError(f"--parallel {parallel} runs under torchrun: torchrun --nproc-per-node N -m omnilm train ...")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size()), device


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


def all_sum_logged(logged: dict[str, Any], ranks: Ranks, device: torch.device) -> dict[str, Any]:
    """Logged numbers (scalars, or lists of lists as an MoE's expert load) summed over the ranks, in
    one all-reduce; the same keys on every rank."""
    if ranks.world == 1 or not logged:
        return logged
    keys = sorted(logged)
    values = [torch.as_tensor(logged[key], dtype=torch.float64) for key in keys]
    total = torch.cat([v.flatten() for v in values]).to(device)
    dist.all_reduce(total)
    parts = total.cpu().split([v.numel() for v in values])
    return {key: part.view(v.shape).tolist() if isinstance(logged[key], list) else float(part)
            for key, v, part in zip(keys, values, parts)}


def wrap(model: nn.Module, parallel: str, ranks: Ranks, device: torch.device, bf16: bool = False,
         expert_parallel: int = 1) -> nn.Module:
    """What the training step calls: `model` itself, a DDP wrapper around it (which averages the
    gradients over the ranks), or, for fsdp, `model` sharded in place; an MoE's routing synced, its
    experts split over the ranks with `expert_parallel` > 1. Parameters, the optimizer and
    checkpoints stay with `model`; build the optimizer after this call (FSDP replaces the parameters)."""
    if parallel == "none" or ranks.world == 1:
        return model
    moe = any(isinstance(m, MoE) for m in model.modules())
    if moe:
        group = dist.new_group()  # every rank creates it, in the same order
        if expert_parallel > 1:
            shard_experts(model, group)
        else:
            sync_routing(model, group)
    experts = expert_parameters(model)
    for p in experts.values():
        p.register_hook(lambda grad: grad / ranks.world)
    if parallel == "fsdp":
        return shard(model, device, bf16, ignored=set(experts.values()))
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(experts))
    # A rank's micro-batch may hold no image (LLaVA's data has text-only conversations): the projector
    # then takes no part in its forward pass, which DDP must be told to expect.
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=True, gradient_as_bucket_view=True)


def shard(model: nn.Module, device: torch.device, bf16: bool = False,
          ignored: set[nn.Parameter] = frozenset()) -> nn.Module:
    """FSDP2 over every rank: each decoder and vision layer its own unit, what remains (embeddings,
    projector, norms, head) the root's; `ignored` parameters stay as they are. With `bf16` on CUDA,
    layers compute in bf16 from fp32 shards and gradients are reduced in fp32 (on CPU, all fp32)."""
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if bf16 and device.type == "cuda" else MixedPrecisionPolicy())
    for tower in (getattr(model, "llm", None), getattr(model, "vision", None)):
        for layer in getattr(tower, "layers", ()):
            fully_shard(layer, mp_policy=policy, ignored_params=set(ignored))
    fully_shard(model, mp_policy=policy, ignored_params=set(ignored))
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether `model`'s parameters are split over ranks (its state is then saved by every rank)."""
    return isinstance(model, FSDPModule) or bool(expert_parameters(model))


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A tensor whole: a DTensor gathered from its shards (every rank must call this), else itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_view(model: nn.Module) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """A function of (parameter name, tensor of that parameter: its weights or optimizer state) that
    views an expert-parallel slice as the DTensor it is a shard of (dim 0 split over the ranks, same
    storage), so that torch.distributed.checkpoint saves and loads it in its place in the whole
    tensor; other tensors pass as they are (FSDP's are DTensors already)."""
    params = expert_parameters(model)
    if not params:
        return lambda name, t: t
    mesh = init_device_mesh(next(iter(params.values())).device.type, (dist.get_world_size(),))

    def view(name: str, t: torch.Tensor) -> torch.Tensor:
        p = params.get(name)
        return DTensor.from_local(t, mesh, [Shard(0)], run_check=False) if p is not None and t.shape == p.shape else t
    return view


def clip_grad_norm(params: list[nn.Parameter], max_norm: float, model: nn.Module | None = None) -> float:
    """Scale the gradients of `params` to a total 2-norm of at most `max_norm`; return the norm before.
    The norm is that of the whole model's gradients, the same on every rank: FSDP's shards are
    gathered, and the squares of the expert-parallel slices of `model` summed over the ranks."""
    own = {id(p) for p in expert_parameters(model).values()} if model is not None else set()
    shared = [p for p in params if id(p) not in own]
    norm = full_tensor(torch.nn.utils.get_total_norm([p.grad for p in shared if p.grad is not None]))
    mine = [p for p in params if id(p) in own]
    if mine:
        square = torch.nn.utils.get_total_norm([p.grad for p in mine if p.grad is not None]).square()
        dist.all_reduce(square)
        norm = (norm.square() + square).sqrt()
    for group in (shared, mine):  # DTensors and plain tensors are scaled apart
        if group:
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, norm)
    return float(norm)


def skeleton(model: nn.Module) -> nn.Module:
    """A copy of `model` with every parameter and buffer on the meta device (no memory): the structure
    that rank 0 fills with the gathered weights of a sharded model to save it whole."""
    memo: dict[int, torch.Tensor] = {}
    for t in (*model.parameters(), *model.buffers()):
        empty = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty
    return copy.deepcopy(model, memo)
