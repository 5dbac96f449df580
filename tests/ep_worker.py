"""Run by tests/test_expert_parallel.py under torchrun (2 processes, gloo, CPU, fp32): MoE layers with
their experts sharded across the ranks (expert parallel) or copied on each with synced routing (data
parallel), against one process running the same layer on every rank's tokens, rank 0's first.

Every rank builds the same seeded full layer and all the ranks' tokens, so it computes the
one-process reference itself. The one-process loss is L = task(all tokens) + aux + z, with task a
fixed random projection of the outputs; rank r backpropagates L_r = task(its tokens) + (aux + z) / world,
so that the L_r sum to L. The one-process gradient is then, for the replicated parameters (router,
shared experts, experts under data parallelism), the sum of the ranks' gradients; for a sharded
expert, its owner's gradient; for the input, each rank's rows. Rank 0 writes, as JSON to argv[1],
{case: {quantity: [largest gap over the ranks, largest magnitude in one process], or a number the
case relies on}}.
"""

import copy
import json
import sys

import torch
import torch.distributed as dist
from conftest import randomize_

from omnilm.config import TextConfig
from omnilm.model.moe import MoE
from omnilm.train.expert_parallel import (RankSync, ShardedExperts, _AllReduceSum, expert_parameters, gather_experts,
                                          shard_experts, sync_routing)

DIM, TOKENS = 32, (13, 9)  # width; tokens on rank 0, on rank 1


def full_layer(seed: int, **text) -> MoE:
    cfg = TextConfig(**(dict(vocab_size=50, dim=DIM, n_layers=1, n_heads=4, n_kv_heads=4, mlp_dim=48, expert_dim=48,
                             n_experts=4) | text))
    torch.manual_seed(seed)
    layer = randomize_(MoE(cfg), seed).train()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # unit-variance expert outputs (randomize_ scales a stacked weight by all its experts)
        for w in (layer.experts.gate_up_proj, layer.experts.down_proj):
            w.copy_(torch.randn(w.shape, generator=g) / w.shape[-1] ** 0.5)
    return layer


def inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All the ranks' tokens (N, D), a padding mask (N,) with padding on both ranks, a projection (N, D)."""
    g = torch.Generator().manual_seed(seed)
    n = sum(TOKENS)
    mask = torch.ones(n, dtype=torch.bool)
    mask[[1, 5, TOKENS[0] + 2]] = False
    return torch.randn(n, DIM, generator=g), mask, torch.randn(n, DIM, generator=g) / DIM ** 0.5


def run(layer: MoE, x: torch.Tensor, mask: torch.Tensor, proj: torch.Tensor, world: int):
    """Forward and backward of L = task + (aux + z) / world: (output, routing, L, the size of its
    terms (the scale of its rounding), x.grad)."""
    x = x.detach().clone().requires_grad_()
    y, routing = layer(x, mask)
    task, router = (y * proj).sum(), (routing.aux_loss + routing.z_loss) / world
    (task + router).backward()
    return y.detach(), routing, (task + router).detach(), (task.abs() + router).detach(), x.grad


def all_sum(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().clone()
    dist.all_reduce(t)
    return t


def compare(full: MoE, ranked: MoE, x, mask, proj) -> tuple[dict[str, list[float]], object, object]:
    """[gap between one process and the ranks (the largest over the ranks), the one-process value's
    largest magnitude] by quantity; and both routings (one process's, this rank's)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    sharded = isinstance(ranked.experts, ShardedExperts)
    mine = slice(sum(TOKENS[:rank]), sum(TOKENS[:rank + 1]))
    y, routing, loss, size, x_grad = run(full, x, mask, proj, 1)
    y_r, routing_r, loss_r, _, x_grad_r = run(ranked, x[mine], mask[mine], proj[mine], world)
    pairs = {
        "output": (y_r, y[mine]),
        "aux_loss": (routing_r.aux_loss, routing.aux_loss),
        "z_loss": (routing_r.z_loss, routing.z_loss),
        "loss": (all_sum(loss_r), loss),
        "load": (routing_r.load, routing.load),
        "dropped": (routing_r.dropped, routing.dropped),
        "experts": (routing_r.experts, routing.experts[mine]),
        "grad x": (x_grad_r, x_grad[mine]),
    }
    reference = dict(full.named_parameters())
    n = full.n_experts // world
    for name, p in ranked.named_parameters():
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        if sharded and name.startswith("experts."):
            pairs[f"grad {name}"] = (grad, reference[name].grad[rank * n:(rank + 1) * n])
        else:
            pairs[f"grad {name}"] = (all_sum(grad), reference[name].grad)
    if sharded:
        whole = gather_experts(ranked)
        assert sorted(whole) == sorted(expert_parameters(ranked)) == ["experts.down_proj", "experts.gate_up_proj"]
        for k in whole:
            pairs[f"gathered {k}"] = (whole[k], reference[k])
    gaps = torch.tensor([float((a.detach().double() - b.detach().double()).abs().max()) for a, b in pairs.values()])
    dist.all_reduce(gaps, op=dist.ReduceOp.MAX)
    scales = [float(b.detach().double().abs().max()) for _, b in pairs.values()]
    scales[list(pairs).index("loss")] = float(size)  # the loss is a sum: its terms set the rounding
    return {k: [g, s] for k, g, s in zip(pairs, gaps.tolist(), scales)}, routing, routing_r


def case(seed: int, prepare, steer=None, **text) -> tuple[dict, object, object]:
    """One comparison: a seeded full layer against a copy that `prepare` readies for the ranks.
    `steer(chosen)`, given the full layer's choices (N, k) for all the tokens, returns the tokens to
    make padding."""
    full = full_layer(seed, **text)
    x, mask, proj = inputs(seed)
    if steer is not None:
        with torch.no_grad():
            mask &= ~steer(full.route(x)[2])
    ranked = copy.deepcopy(full)
    prepare(ranked)
    return compare(full, ranked, x, mask, proj)


class LocalBackwardSync(RankSync):
    """A mutation: sums forward like RankSync, but the backward keeps each rank's own gradient."""

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return t + (_AllReduceSum.apply(t.detach(), self.group) - t.detach())


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}

    gaps, routing, _ = case(0, shard_experts, n_experts_per_token=1, capacity_factor=1.0)
    results["a: expert parallel, top-1, capacity"] = gaps | {"share dropped": float(routing.dropped)}

    gaps, _, _ = case(1, shard_experts, n_experts_per_token=2, n_shared_experts=1)
    results["b: expert parallel, top-2, shared experts"] = gaps

    def away_from_expert_0_on_rank_1(chosen):  # rank 1's tokens that would go to expert 0 become padding
        on_rank_1 = torch.arange(len(chosen)) >= TOKENS[0]
        return on_rank_1 & (chosen == 0).any(-1)

    gaps, routing, routing_r = case(2, shard_experts, away_from_expert_0_on_rank_1, n_experts_per_token=2,
                                    capacity_factor=1.0)
    sent = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(sent, torch.tensor([float((routing_r.experts == 0).sum())]))
    results["c: expert parallel, rank 1 sends expert 0 nothing"] = gaps | {
        "rows rank 0 sends expert 0": float(sent[0]), "rows rank 1 sends expert 0": float(sent[1]),
        "share dropped": float(routing.dropped)}

    def rank_1_idle(chosen):  # rank 1 all padding; rank 0 keeps only tokens bound for rank 0's experts
        return (chosen >= 2).any(-1) | (torch.arange(len(chosen)) >= TOKENS[0])

    gaps, routing, _ = case(3, shard_experts, rank_1_idle, n_experts_per_token=1)
    results["e: expert parallel, rank 1 sends and receives nothing"] = gaps | {
        "rows for rank 1's experts": float((routing.experts >= 2).sum()),
        "real tokens on rank 0": float((routing.experts[:TOKENS[0]] >= 0).sum()),
        "real tokens on rank 1": float((routing.experts[TOKENS[0]:] >= 0).sum())}

    dp = dict(n_experts_per_token=2, capacity_factor=0.75, n_shared_experts=1)
    gaps, routing, _ = case(4, sync_routing, **dp)
    results["d: data parallel, synced routing, capacity"] = gaps | {"share dropped": float(routing.dropped)}

    # Case d again with the sync mutated: none at all, and one whose backward does not sum.
    results["mutation: no sync"] = case(4, lambda layer: None, **dp)[0]
    results["mutation: backward not summed"] = case(4, lambda layer: setattr(layer, "sync", LocalBackwardSync()),
                                                     **dp)[0]

    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
