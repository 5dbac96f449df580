"""Sparse mixture-of-experts feed-forward: the layer behind Gemini 1.5 Pro and Mixtral.

A router scores every token against `n_experts` SwiGLU experts and sends it to a few of them,
so the parameter count grows with the number of experts while the compute per token stays
that of `k` experts (Shazeer et al. 2017). Two routers:

    topk     softmax over experts, keep the k best, renormalise their weights (Mixtral, Jiang et al. 2024)
    switch   top-1, the output weighted by the expert's probability (Switch Transformer, Fedus et al. 2021)

Either can cap each expert, while training, at `capacity_factor * tokens * k / n_experts`
assignments (GShard, Switch): the overflow is dropped, first choices before second ones and
earlier tokens before later ones, and a dropped assignment adds nothing, so a token dropped by
all its experts reaches the next layer through the residual connection alone (plus the shared
experts). At inference nothing is dropped: a token's output must not depend on the other
tokens in the batch, and cached decoding must equal the full forward. Optional shared experts
see every token (DeepSeekMoE, Qwen-MoE). Training adds two losses per layer, both over real
(unpadded) tokens only:

    load balancing   n_experts * sum_e f_e * P_e  (f_e: share of assignments, P_e: mean probability)
    router z-loss    mean over tokens of logsumexp(router logits)^2  (ST-MoE, Zoph et al. 2022)

Dispatch: sort the (token, expert) assignments by expert, gather the tokens once, run all
experts as two grouped matrix multiplies (`torch._grouped_mm`, or one matmul per expert where
that is missing), and scatter back with `index_add_`. `reference_forward` is the plain
per-expert loop the fast path is tested against. Shape letters: N tokens, D width, E experts,
F expert width, k experts per token, M kept assignments.

Capacity, the two losses and the logged load are functions of the whole batch. Under data
parallelism each process sees a part of it, so `MoE.sync`, installed from outside
(omnilm.train.expert_parallel), sums their counts over the processes: each then computes what one
process computes on all the processes' tokens, and this module stays free of torch.distributed.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from omnilm.config import TextConfig
from omnilm.model.layers import SwiGLU


class RoutingSync(Protocol):
    """Sums over the data-parallel processes, for `MoE.sync`. Every process must make the same calls
    in the same order, as the ranks of a training step do."""

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """t summed over the processes, differentiably: the backward pass sums the gradients over
        the processes in turn (each one's loss then counts once in every process's gradient)."""

    def before(self, t: torch.Tensor) -> torch.Tensor:
        """t summed over the processes of lower rank (zeros on rank 0); no gradient."""


@dataclass
class Routing:
    """What one MoE layer did in a forward pass: the losses to add and the numbers to log."""

    aux_loss: torch.Tensor  # () load-balancing loss (differentiable)
    z_loss: torch.Tensor  # () router z-loss (differentiable)
    load: torch.Tensor  # (E,) share of the real tokens' kept assignments each expert received
    dropped: torch.Tensor  # () share of the real tokens' assignments dropped for capacity
    experts: torch.Tensor  # (N, k) chosen expert per token and choice, -1 where dropped or padding
    weights: torch.Tensor  # (N, k) their combine weights


def load_balancing_loss(probs: torch.Tensor, chosen: torch.Tensor, mask: torch.Tensor | None = None,
                        sync: RoutingSync | None = None) -> torch.Tensor:
    """Switch's auxiliary loss, n_experts * sum_e f_e * P_e, over the tokens where `mask` is true
    (and, with `sync`, over every process's tokens: the sums below are taken over them all).

    probs (N, E) router softmax; chosen (N, k) the experts picked (before any capacity drop);
    f_e counts the k choices of every token, so it sums to k (Mixtral's convention). Its minimum,
    k, is reached when both the assignments and the probabilities are uniform."""
    n_experts = probs.shape[-1]
    real = torch.ones(probs.shape[0], device=probs.device) if mask is None else mask.float()
    f = torch.zeros(n_experts, device=probs.device).scatter_add_(
        0, chosen.flatten(), real.repeat_interleave(chosen.shape[-1]))
    p = (probs.float() * real[:, None]).sum(0)
    n = real.sum()
    if sync is not None:  # one collective for the three sums; only p carries a gradient
        f, p, n = sync.sum(torch.cat([f, p, n[None]])).split([n_experts, n_experts, 1])
    n = n.clamp(min=1)
    return n_experts * torch.sum(f / n * p / n)


def router_z_loss(logits: torch.Tensor, mask: torch.Tensor | None = None,
                  sync: RoutingSync | None = None) -> torch.Tensor:
    """ST-MoE's z-loss: the mean squared log-partition of the router logits, keeping them small
    (with `sync`, the mean over every process's tokens)."""
    # Summed in float64: z^2 is large (tens), and one process's sum and the ranks' partial sums then
    # round to the same float32.
    z = torch.logsumexp(logits.float(), dim=-1).double().square()
    real = torch.ones_like(z) if mask is None else mask.double()
    total = torch.stack([(z * real).sum(), real.sum()])
    if sync is not None:
        total = sync.sum(total)
    return (total[0] / total[1].clamp(min=1)).float()


class Experts(nn.Module):
    """`n` SwiGLU experts stored as stacked weights, in the layout of transformers' MixtralExperts:
    gate_up_proj (E, 2F, D) holds each expert's gate rows, then its up rows; down_proj is (E, D, F)."""

    def __init__(self, n: int, dim: int, hidden_dim: int):
        super().__init__()
        self.n, self.hidden_dim = n, hidden_dim
        self.gate_up_proj = nn.Parameter(torch.empty(n, 2 * hidden_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(n, dim, hidden_dim))

    def matrices(self) -> list[tuple[nn.Parameter, tuple]]:
        """Each expert's weight matrices as (stacked parameter, index): gate, up and down of expert 0,
        then of expert 1, ... The matrices a dense SwiGLU layer holds as three linear layers, which
        Muon orthogonalises one by one (omnilm.train.optim)."""
        f = self.hidden_dim
        return [m for e in range(self.n) for m in ((self.gate_up_proj, (e, slice(0, f))),
                                                    (self.gate_up_proj, (e, slice(f, 2 * f))), (self.down_proj, (e,)))]

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (M, D): rows grouped by expert, counts (E,) rows per expert, in order -> (M, D)."""
        # The grouped GEMMs are not on autocast's list: cast as autocast would cast a linear layer.
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        x = x.to(dtype)
        gate, up = grouped_mm(x, self.gate_up_proj.to(dtype), counts).chunk(2, dim=-1)
        return grouped_mm(F.silu(gate) * up, self.down_proj.to(dtype), counts)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows [c_0 + ... + c_{e-1}, c_0 + ... + c_e) of x (M, D) times w[e]^T, for w (E, F, D) -> (M, F)."""
    # torch._grouped_mm wants rows on 16-byte boundaries and at least one row.
    aligned = x.shape[-1] * x.element_size() % 16 == 0 and w.shape[-2] * w.element_size() % 16 == 0
    if aligned and x.shape[0] > 0 and _grouped_mm_works(x.device.type, x.dtype):
        offsets = counts.cumsum(0).to(torch.int32)
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offsets)
    return torch.cat([xe @ we.T for xe, we in zip(x.split(counts.tolist()), w)])


@functools.cache
def _grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    # torch._grouped_mm is private and its device/dtype support grows by release: try it once,
    # forward and backward, on a tiny problem with an empty group, and keep the answer.
    # The first call may come from inside no_grad, inference_mode or autocast: probe outside them.
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device_type, enabled=False):
            x = torch.ones(3, 16, device=device_type, dtype=dtype, requires_grad=True)
            w = torch.ones(3, 16, 16, device=device_type, dtype=dtype, requires_grad=True)
            offsets = torch.tensor([1, 1, 3], device=device_type, dtype=torch.int32)
            y = torch._grouped_mm(x, w.transpose(-2, -1), offs=offsets)
            y.backward(torch.ones_like(y))
            return bool(torch.allclose(y.float(), torch.full_like(y.float(), 16.0)))
    except (RuntimeError, NotImplementedError, TypeError):
        return False


class MoE(nn.Module):
    """The feed-forward of an MoE decoder layer: router, routed experts, optional shared experts."""

    # None: the batch is this process's tokens. Under data parallelism, a RoutingSync installed by
    # omnilm.train.expert_parallel.sync_routing: capacity, the dropping order, the losses and the
    # logged load then count every process's tokens, rank 0's first, as one process would.
    sync: RoutingSync | None = None

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_experts, cfg.n_experts_per_token
        self.router, self.capacity_factor, self.jitter = cfg.router, cfg.capacity_factor, cfg.router_jitter
        self.gate = nn.Linear(cfg.dim, cfg.n_experts, bias=False)  # the router; Mixtral's name
        self.experts = Experts(cfg.n_experts, cfg.dim, cfg.expert_dim)
        self.shared_experts = (SwiGLU(cfg.dim, cfg.n_shared_experts * cfg.expert_dim, bias=cfg.mlp_bias)
                               if cfg.n_shared_experts else None)

    # --- routing -------------------------------------------------------------------------------

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Router logits (N, E) in fp32, probabilities (N, E), chosen experts (N, k), their weights (N, k)."""
        h = x.float()
        if self.training and self.jitter > 0:
            h = h * torch.empty_like(h).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        with torch.autocast(x.device.type, enabled=False):  # routing decisions are made in fp32
            logits = F.linear(h, self.gate.weight.float())
        probs = logits.softmax(dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        if self.router == "topk":
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, probs, chosen, weights

    def capacity(self, n_tokens: int) -> int:
        return max(1, math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                stats: bool = True) -> tuple[torch.Tensor, Routing | None]:
        """x (..., D) -> (output (..., D), its Routing, or None without `stats`). `mask` (...) marks
        real tokens: padding goes to no routed expert (the shared ones still see it)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        mask = mask.reshape(-1).bool() if mask is not None else None
        logits, probs, chosen, weights = self.route(x)
        assignment, keep = self.dispatch_order(chosen, mask)
        N, k = chosen.shape
        token = assignment // k  # assignment a is (token a // k, choice a % k)
        counts = torch.bincount(chosen.flatten()[assignment], minlength=self.n_experts)
        out = self.experts(x[token], counts)
        # Combine in fp32: under autocast the k expert outputs arrive in bf16.
        out = out.float() * weights.flatten()[assignment, None]
        y = torch.zeros(N, shape[-1], device=x.device, dtype=torch.float32).index_add_(0, token, out)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        routing = self._routing(logits, probs, chosen, weights, keep, mask) if stats else None
        return y.reshape(shape).to(x.dtype), routing

    def dispatch_order(self, chosen: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept assignments (flat indices into chosen (N, k)) grouped by expert, and a (N, k)
        keep mask. Within an expert, first choices come before second ones and earlier tokens before
        later ones: that is the order capacity keeps them in."""
        N, k = chosen.shape
        flat = chosen.flatten()
        choice = torch.arange(k, device=chosen.device).repeat(N)
        token = torch.arange(N, device=chosen.device).repeat_interleave(k)
        order = torch.argsort(flat * (N * k) + choice * N + token)  # unique keys: expert, choice, token
        keep = torch.ones(N * k, dtype=torch.bool, device=chosen.device)
        if mask is not None:
            keep &= mask.repeat_interleave(k)
        if self.training and self.capacity_factor is not None:
            # An assignment's place in its expert's queue counts the real assignments ahead of it:
            # those of earlier choices (on every process), those of its choice on processes of lower
            # rank, then those of its choice here before it. Alone, the second term is zero.
            E = self.n_experts
            group = flat * k + choice  # (expert, choice): the sort above keeps each group together
            counts = torch.zeros(E * k, dtype=torch.long, device=chosen.device).scatter_add_(0, group, keep.long())
            lower = torch.zeros_like(counts)
            if self.sync is not None:
                counts, lower = self.sync.sum(counts), self.sync.before(counts)
            counts, lower = counts.view(E, k), lower.view(E, k)
            ahead = (counts.cumsum(1) - counts + lower).flatten()  # (E * k,) queued before this rank's group
            # Each real token makes one assignment per choice: the first choices count the tokens.
            cap = self.capacity(int(counts[:, 0].sum()))
            ranked = keep[order]
            group_sorted = group[order]
            seen = torch.cumsum(ranked.long(), 0)  # real assignments up to and including each position
            first = torch.searchsorted(group_sorted, torch.arange(E * k, device=chosen.device))
            before = torch.cat([seen.new_zeros(1), seen])[first]  # real assignments ahead of each group's
            place = ahead[group_sorted] + seen - 1 - before[group_sorted]
            over = ranked & (place >= cap)
            keep[order[over]] = False
        kept = order[keep[order]]
        return kept, keep.view(N, k)

    def _routing(self, logits, probs, chosen, weights, keep, mask) -> Routing:
        real = torch.ones_like(keep) if mask is None else mask[:, None].expand_as(keep)
        lost = real & ~keep  # real assignments that capacity dropped
        counts = torch.zeros(self.n_experts, device=chosen.device).scatter_add_(0, chosen.flatten(), keep.flatten().float())
        tally = torch.cat([counts, lost.sum().float()[None], real.sum().float()[None]])
        if self.sync is not None:
            tally = self.sync.sum(tally)
        counts, n_lost, n_real = tally.split([self.n_experts, 1, 1])
        return Routing(
            aux_loss=load_balancing_loss(probs, chosen, mask, self.sync),
            z_loss=router_z_loss(logits, mask, self.sync),
            load=counts / counts.sum().clamp(min=1),
            dropped=(n_lost / n_real.clamp(min=1))[0],
            experts=chosen.masked_fill(~keep, -1).detach(),
            weights=weights.masked_fill(~keep, 0.0).detach(),
        )

    # --- the plain path, for tests ---------------------------------------------------------------

    def reference_forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The same function computed the obvious way: every expert on every token it kept, one by one."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        mask = mask.reshape(-1).bool() if mask is not None else None
        _, _, chosen, weights = self.route(x)
        _, keep = self.dispatch_order(chosen, mask)
        y = torch.zeros_like(x)
        H = self.experts.hidden_dim
        for e in range(self.n_experts):
            w_gate, w_up = self.experts.gate_up_proj[e, :H], self.experts.gate_up_proj[e, H:]
            for n in range(x.shape[0]):
                for j in range(self.top_k):
                    if keep[n, j] and chosen[n, j] == e:
                        h = F.silu(x[n] @ w_gate.T) * (x[n] @ w_up.T)
                        y[n] = y[n] + weights[n, j] * (h @ self.experts.down_proj[e].T)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.reshape(shape)
