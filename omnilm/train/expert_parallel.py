"""Expert parallelism: the experts of each MoE layer split across the processes torchrun started.

    shard_experts(model)   # every rank, after joining the process group: rank r keeps its n/world experts
    sync_routing(model)    # data parallelism alone: every rank keeps all experts, the routing is made global

Data parallelism copies every expert to every process, yet the experts are most of an MoE model's
weights (Mixtral 8x7B: 45 of its 47B). Here each process keeps n/world experts of every layer,
expert e on rank e // (n/world); a token's rows travel to its experts' ranks and back by
all-to-all (GShard; DeepSpeed's `_AllToAll`, Megatron's `MoEAlltoAllTokenDispatcher`). The router,
the shared experts and everything outside the MoE layers stay replicated, data parallel.

Both equal one process running the layer on every rank's tokens, rank 0's first: capacity, the
dropping order, the router losses and the logged load are sums over the ranks (`MoE.sync`, a
`RankSync`). Its sum is differentiable, and its backward sums the incoming gradients over the
ranks in turn: a loss that every rank computes alike from those sums, backpropagated by rank r
with weight w_r, gives rank r's router (w_0 + w_1 + ...) times the gradient that rank r's tokens
bring it in one process. The training loop weights rank r's loss by share_r * world, which sum
to world, and DDP averages the ranks' gradients: the one-process gradient. An expert's weights
live on one rank, and DDP must leave them alone (`expert_parameters`): their gradient, the sum of
what every rank's rows bring back, is world times the one-process gradient under those weights.

The two collectives with a backward are written here, around dist.all_reduce and
dist.all_to_all_single: torch.distributed.nn.functional is deprecated in torch 2.13, and the
functional collectives' autograd all-to-all aborts at exit on gloo in about 1 run in 5.
Every rank must run every forward and backward pass of a model so prepared, together and in the
same order (as the ranks of a training step do): a forward on one rank alone would wait forever.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from omnilm.errors import OmniInputError
from omnilm.model.moe import Experts, MoE

Group = dist.ProcessGroup | None  # None: the default group of all the processes


class _AllReduceSum(torch.autograd.Function):
    """t summed over the group's ranks; backward: the gradient summed over the ranks."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        out = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _AllToAll(torch.autograd.Function):
    """Rows of x, `send[r]` of them for rank r in order, go to their ranks; `recv[r]` rows come from
    rank r, in rank order. Backward: the transposed exchange sends each row's gradient home."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int], group: Group) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return _all_to_all(x, send, recv, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return _all_to_all(grad, ctx.recv, ctx.send, ctx.group), None, None, None


def _all_to_all(x: torch.Tensor, send: list[int], recv: list[int], group: Group) -> torch.Tensor:
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
    return out


class RankSync:
    """`MoE.sync` over a process group (omnilm.model.moe.RoutingSync): sums over its ranks."""

    def __init__(self, group: Group = None):
        self.group = group

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return _AllReduceSum.apply(t, self.group)

    def before(self, t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, t.detach().contiguous(), group=self.group)
        return sum(parts[:dist.get_rank(self.group)], torch.zeros_like(t))


def sync_routing(model: nn.Module, group: Group = None) -> None:
    """Make every MoE layer of `model` route as one process would on all the group's tokens."""
    sync = RankSync(group)
    for m in model.modules():
        if isinstance(m, MoE):
            m.sync = sync


def experts_per_rank(n_experts: int, world: int) -> int:
    """How many of an MoE layer's `n_experts` each of `world` ranks holds; OmniInputError if they do
    not divide evenly."""
    if n_experts % world:
        divisors = [str(d) for d in range(1, n_experts + 1) if n_experts % d == 0]
        counts = ", ".join(divisors[:-1]) + " or " + divisors[-1] if len(divisors) > 1 else divisors[0]
        raise OmniInputError(f"expert parallelism on {world} processes: the {n_experts} experts of each MoE layer "
                             f"do not divide among {world} ranks; run {counts} processes")
    return n_experts // world


class ShardedExperts(Experts):
    """This rank's slice of an `Experts`: experts [rank * n, (rank + 1) * n) of its n * world, under
    the same parameter names (gate_up_proj (n, 2F, D), down_proj (n, D, F)). The forward takes and
    returns what Experts' does, for all n * world experts: the rows go to their expert's rank, which
    runs them through its experts as Experts does, and come back. Being an Experts, its matrices()
    are this rank's experts', for Muon (omnilm.train.optim)."""

    def __init__(self, full: Experts, group: Group = None):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        n = experts_per_rank(full.n, world)
        with torch.device("meta"):  # the parameters are replaced by the slices right away
            super().__init__(n, full.gate_up_proj.shape[-1], full.hidden_dim)
        self.group, self.world, self.rank = group, world, rank
        mine = slice(rank * n, (rank + 1) * n)
        for name in ("gate_up_proj", "down_proj"):
            p = getattr(full, name)
            setattr(self, name, nn.Parameter(p.detach()[mine].clone(), requires_grad=p.requires_grad))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (M, D): rows grouped by expert, counts (n * world,) rows per expert, in order -> (M, D)."""
        n, world = self.n, self.world
        got = torch.empty_like(counts)  # got[s * n + j]: rows rank s sends my expert j
        dist.all_to_all_single(got, counts.contiguous(), group=self.group)
        got = got.view(world, n)
        send, recv = counts.view(world, n).sum(1).tolist(), got.sum(1).tolist()
        rows = _AllToAll.apply(x, send, recv, self.group)
        # The rows arrive by rank, then by expert; the experts take them by expert (then by rank).
        expert = torch.arange(n, device=x.device).repeat(world).repeat_interleave(got.flatten())
        order = torch.argsort(expert, stable=True)
        out = super().forward(rows[order], got.sum(0))[torch.argsort(order)]
        return _AllToAll.apply(out, recv, send, self.group)


def shard_experts(model: nn.Module, group: Group = None) -> None:
    """Expert parallelism for every MoE layer of `model`: its experts become this rank's
    ShardedExperts (the weights copied from the full ones, which every rank holds alike), and its
    routing is synced over the group. Checks every layer before changing any."""
    world = dist.get_world_size(group)
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    for m in layers:
        experts_per_rank(m.n_experts, world)
    for m in layers:
        m.experts = ShardedExperts(m.experts, group)
    sync_routing(model, group)


def expert_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters each rank holds a different slice of, by name: DDP must neither broadcast
    nor average them (DistributedDataParallel._set_params_and_buffers_to_ignore_for_model)."""
    return {f"{name}.{p_name}": p for name, m in model.named_modules() if isinstance(m, ShardedExperts)
            for p_name, p in m.named_parameters()}


def gather_experts(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (n * world, ...) expert weights by state-dict name, on every rank (a collective:
    every rank calls it), to save in place of the slices."""
    full = {}
    for name, m in model.named_modules():
        if isinstance(m, ShardedExperts):
            for p_name, p in m.named_parameters():
                parts = [torch.empty_like(p) for _ in range(m.world)]
                dist.all_gather(parts, p.detach().contiguous(), group=m.group)
                full[f"{name}.{p_name}"] = torch.cat(parts)
    return full
