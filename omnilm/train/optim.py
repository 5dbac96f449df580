"""The optimizers (AdamW with parameter groups; Muon for the transformer blocks' matrices with AdamW
for the rest) and the learning-rate schedule as a plain function of the step."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from omnilm.errors import OmniInputError
from omnilm.model.fusion import GatedCrossAttentionBlock, ResamplerLayer
from omnilm.model.layers import Attention
from omnilm.model.llm import DecoderLayer
from omnilm.model.moe import Experts
from omnilm.model.vision import EncoderLayer


def lr_factor(step: int, total: int, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to `min_ratio` of the peak at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


OPTIMIZERS = ("adamw", "muon")


# The transformer blocks whose weight matrices Muon takes: the decoder's layers, the ViT's (and the
# CLIP text tower's), the perceiver resampler's, and cross-attention's gated blocks, which stand
# between the decoder's layers and do there what a decoder layer does (attention, then a feed-forward).
# A block type missing here leaves its matrices to AdamW, which slows them (docs/fusion.md, "The
# comparison", on cross-attention's gated blocks); `check_split` refuses such a split.
BLOCKS = (DecoderLayer, EncoderLayer, ResamplerLayer, GatedCrossAttentionBlock)

# What makes a module a transformer block for `check_split`, whatever BLOCKS says: an element of an
# nn.ModuleList with one of these among its descendants. omnilm's attention is layers.Attention
# (self- and cross-attention alike); nn.MultiheadAttention is there for blocks built on torch's.
ATTENTION = (Attention, nn.MultiheadAttention)


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0,
                    group_lrs: dict[str, float] | None = None, betas=(0.9, 0.95), kind: str = "adamw"):
    """AdamW over the trainable parameters of `model`, or with `kind="muon"`, Muon for the weight
    matrices inside transformer blocks (`BLOCKS`), each MoE expert's included, and AdamW for the
    rest (see `MuonAdamW`).

    `group_lrs` maps a module path ("projector", "vision.embeddings.patch_embedding") to its own
    peak LR, the longest matching path winning: LLaVA trains its projector faster than the LLM.
    Matrices decay; norms, biases and embeddings (1-D or looked up, not multiplied) do not. Each
    group keeps its peak in "base_lr" and its module path (or "model") in "name". The split checks
    itself before it is returned (`check_split`); `describe_split` puts it in one line for the log.
    """
    if kind not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {kind!r}; choose one of {', '.join(OPTIMIZERS)}")
    if kind == "muon" and not hasattr(torch.optim, "Muon"):
        raise OmniInputError(f"--optimizer muon needs torch.optim.Muon, which torch>=2.9 has (this is torch "
                             f"{torch.__version__}): upgrade torch, or use --optimizer adamw")
    group_lrs = group_lrs or {}
    looked_up = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    matrices, expert_matrices = block_matrices(model) if kind == "muon" else (set(), {})
    groups: dict[tuple[bool, str, bool], list[nn.Parameter]] = {}
    views: list[tuple[nn.Parameter, tuple, nn.Parameter]] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        path = max((prefix for prefix in group_lrs if name == prefix or name.startswith(prefix + ".")), key=len,
                   default="")
        decay = p.ndim >= 2 and id(p) not in looked_up
        if id(p) in expert_matrices:  # Muon takes 2-D parameters: each expert's matrix as a view of the stack
            for index in expert_matrices[id(p)]:
                views.append((p, index, nn.Parameter(p.detach()[index])))  # shares p's storage
                groups.setdefault((True, path, decay), []).append(views[-1][2])
            continue
        groups.setdefault((id(p) in matrices, path, decay), []).append(p)
    if not groups:
        raise ValueError("no trainable parameters: check which parts of the model the stage trains")
    param_groups: dict[bool, list[dict]] = {False: [], True: []}
    for (orthogonalized, path, decay), params in sorted(groups.items()):
        peak = group_lrs.get(path, lr)
        param_groups[orthogonalized].append({"params": params, "lr": peak, "base_lr": peak, "name": path or "model",
                                             "weight_decay": weight_decay if decay else 0.0})
    adamw = torch.optim.AdamW(param_groups[False], lr=lr, betas=betas) if param_groups[False] else None
    if not param_groups[True]:
        check_split(model, adamw, kind)
        return adamw
    # "match_rms_adamw" scales each update to the RMS an AdamW update has (0.2 * sqrt(max(m, n))),
    # so one learning rate serves both halves (Liu et al. 2025, "Muon is scalable for LLM training").
    device = param_groups[True][0]["params"][0].device
    muon = Muon(param_groups[True], lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw",
                ns_dtype=torch.bfloat16 if bf16_is_fast(device) else torch.float32)
    optimizer = MuonAdamW(muon, adamw, views)
    check_split(model, optimizer, kind)
    return optimizer


def block_matrices(model: nn.Module) -> tuple[set[int], dict[int, list[tuple]]]:
    """What Muon takes of `model`: the ids of the 2-D weights inside its transformer blocks, and
    the stacked 3-D weights of the MoE experts there, each with the indices of its expert matrices
    (`Experts.matrices`). Embeddings, the output head, connectors (the projector, the resampler's
    output projection, late fusion's attention), norms, biases and gates are not in a block."""
    blocks = [m for m in model.modules() if isinstance(m, BLOCKS)]
    matrices = {id(p) for block in blocks for p in block.parameters() if p.ndim == 2}
    experts = {id(m): m for block in blocks for m in block.modules() if isinstance(m, Experts)}
    stacks: dict[int, list[tuple]] = {}
    for e in experts.values():
        for stacked, index in e.matrices():
            stacks.setdefault(id(stacked), []).append(index)
    return matrices, stacks


def transformer_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of each transformer block of `model` by structure, not by type: an element of
    an nn.ModuleList that holds an attention module (`ATTENTION`) among its descendants."""
    found = []
    for path, m in model.named_modules():
        if isinstance(m, nn.ModuleList):
            for i, element in enumerate(m):
                inner = element.modules()
                next(inner)  # the element itself
                if any(isinstance(d, ATTENTION) for d in inner):
                    found.append((f"{path}.{i}" if path else str(i), element))
    return found


def check_split(model: nn.Module, optimizer, kind: str) -> None:
    """Raise ValueError unless `optimizer` (from `build_optimizer(model, ..., kind=kind)`) holds every
    trainable parameter of `model` in exactly one group, and nothing else, an MoE expert stack
    counting as held through its per-matrix views (`MuonAdamW.views`), which must add up to it; and,
    with kind "muon", unless Muon holds every trainable weight matrix (2-D, not an embedding's) and
    expert stack of every transformer block found by structure (`transformer_blocks`), so a block
    type missing from `BLOCKS` does not fall silently to AdamW."""
    names = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
    trainable = {id(p): p for p in model.parameters() if p.requires_grad}
    parts = getattr(optimizer, "parts", [optimizer] if optimizer is not None else [])
    stack_of = {id(view): stacked for stacked, _, view in getattr(optimizer, "views", ())}
    held: dict[int, int] = {}  # id of a parameter -> how many groups hold it
    through_views: dict[int, int] = {}  # id of an expert stack -> elements its views in the groups hold
    muon: set[int] = set()
    for part in parts:
        is_muon = hasattr(torch.optim, "Muon") and isinstance(part, torch.optim.Muon)
        for group in part.param_groups:
            for p in group["params"]:
                stacked = stack_of.get(id(p))
                if stacked is None:
                    held[id(p)] = held.get(id(p), 0) + 1
                else:
                    through_views[id(stacked)] = through_views.get(id(stacked), 0) + p.numel()
                if is_muon:
                    muon.add(id(p) if stacked is None else id(stacked))
    for key in held:  # a view the optimizer does not map to its stack shows here, as a foreign tensor
        if key not in trainable:
            raise ValueError(f"the optimizer holds {names.get(key, 'a tensor')}, which is not a trainable parameter "
                             "of the model")
    for key in held:
        if held[key] > 1 or key in through_views:
            raise ValueError(f"{names[key]} is in more than one optimizer group (itself, or itself and its expert "
                             "matrices' views); each trainable parameter belongs to exactly one group")
    for key, elements in through_views.items():
        if key not in trainable:
            raise ValueError(f"the optimizer holds views of {names.get(key, 'a tensor')}, which is not a trainable "
                             "parameter of the model")
        if elements != trainable[key].numel():
            raise ValueError(f"the views of {names[key]} in the optimizer's groups hold {elements} elements of its "
                             f"{trainable[key].numel()}; they must cover it once")
    missing = [names[key] for key in trainable if key not in held and key not in through_views]
    if missing:
        raise ValueError(f"trainable parameters in no optimizer group: {', '.join(missing)}")
    if kind != "muon":
        return
    looked_up = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for path, block in transformer_blocks(model):
        stacks = {id(p) for m in block.modules() if isinstance(m, Experts) for p in m.parameters()}
        for name, p in block.named_parameters():
            if (id(p) in trainable and id(p) not in muon and id(p) not in looked_up
                    and (p.ndim == 2 or id(p) in stacks)):
                raise ValueError(f"{path}.{name} is a weight matrix of a transformer block ({type(block).__name__}: "
                                 "an nn.ModuleList element holding attention) but AdamW trains it, not Muon: add "
                                 f"{type(block).__name__} to omnilm.train.optim.BLOCKS")


def split_sizes(optimizer) -> list[tuple[str, int, int]]:
    """(kind, parameters, tensors) of each part of `optimizer`, Muon's first: the elements and the
    tensors its groups hold ("muon" counts an MoE expert stack's matrices one by one)."""
    parts = getattr(optimizer, "parts", [optimizer])
    sizes = [(type(part).__name__.lower(), sum(p.numel() for g in part.param_groups for p in g["params"]),
              sum(len(g["params"]) for g in part.param_groups)) for part in parts]
    return sorted(sizes, key=lambda size: size[0] != "muon")


def human_count(n: int) -> str:
    """1234567 -> "1.23M", 450000 -> "0.45M", 12345 -> "12.3K", 999 -> "999"."""
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e5:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return str(n)


def describe_split(optimizer) -> str:
    """One line for the log: "optimizer: muon 1.23M parameters in 40 matrices, adamw 0.45M in 30
    tensors", or "optimizer: adamw 1.68M parameters in 70 tensors"."""
    pieces = [f"{kind} {human_count(n)}{' parameters' if i == 0 else ''} in {k} "
              f"{'matrices' if kind == 'muon' else 'tensors'}"
              for i, (kind, n, k) in enumerate(split_sizes(optimizer))]
    return "optimizer: " + ", ".join(pieces)


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bf16 matrix products beat fp32 here: CUDA with bf16, or a CPU with bf16 matrix units
    (AVX512-BF16 or AMX; on an AVX2-only CPU a bf16 product is emulated, some 28 times slower at the
    decoder's 256 x 688). It decides the training's autocast and Muon's iteration (`Muon`)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class Muon(torch.optim.Muon):
    """torch.optim.Muon with its Newton-Schulz iteration in `ns_dtype`.

    torch runs the iteration in bf16, which is right on a GPU and wrong on a CPU without bf16
    matrix units: on an AVX2-only EPYC the demo's instruct step spent 3.2 s in it and 0.4 s in the
    forward and backward passes (docs/training.md, "Muon on a CPU"). With `ns_dtype=torch.float32`
    the whole optimizer step takes 0.09 s there. The step is torch's, operation for
    operation (in bf16 it equals torch.optim.Muon's to the bit: tests/test_optim.py), and the state
    is torch's, so checkpoints resume under either.
    """

    def __init__(self, params, *, ns_dtype: torch.dtype = torch.bfloat16, **kw):
        super().__init__(params, **kw)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            momentum, lr = group["momentum"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = orthogonalize(update, group["ns_coefficients"], group["ns_steps"], group["eps"],
                                       self.ns_dtype)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * muon_lr_ratio(group["adjust_lr_fn"], p.shape))
        return loss


def orthogonalize(update: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """Muon's quintic Newton-Schulz iteration (Jordan et al. 2024), as torch.optim.Muon runs it, in
    `dtype`: the update scaled to a spectral norm of at most 1, its singular values then pushed
    towards 1 (to between about 0.5 and 1.5), on the wide orientation of the matrix."""
    a, b, c = coefficients
    x = update.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # not in place: in the update's dtype x is the update (Muon's buffer)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def muon_lr_ratio(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch.optim.Muon's learning-rate scale for a matrix of `shape`: "match_rms_adamw" gives the
    update the RMS of an AdamW update, 0.2 * sqrt(max(rows, columns)); "original" (or None) is
    Jordan et al.'s sqrt(max(1, rows / columns))."""
    rows, columns = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, columns))
    if adjust_lr_fn in (None, "original"):
        return math.sqrt(max(1, rows / columns))
    return 1.0


class MuonAdamW:
    """Muon (torch.optim.Muon: momentum, then the update orthogonalised by a Newton-Schulz
    iteration; Jordan et al. 2024) for the transformer blocks' matrices, AdamW for everything else,
    behind one optimizer's interface: `step`, `zero_grad`, `param_groups` (Muon's last) and a
    `state_dict` laid out as a single optimizer's, so checkpoints resume it unchanged.

    Why it is here: an update of AdamW follows the gradient's dominant directions, and in a small
    decoder trained from scratch the directions that matter late (which image token a question
    names) are weak ones. Muon gives every direction of a matrix's update the same size, which is
    what let the demo's decoder learn that look-up (docs/shapeworld-recipe.md, "Fifth round: Muon
    learns the look-up").

    Stacked MoE expert weights reach Muon as views, one 2-D parameter per expert matrix sharing
    the stack's storage: each step hands every view its slice of the stack's gradient, and Muon's
    in-place update of the view is the update of the stack.
    """

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer | None,
                 views: list[tuple[nn.Parameter, tuple, nn.Parameter]] = ()):
        self.parts = [o for o in (adamw, muon) if o is not None]
        self.views = list(views)  # (stacked parameter, index, the view Muon holds)

    @property
    def param_groups(self) -> list[dict]:
        return [group for part in self.parts for group in part.param_groups]

    def step(self) -> None:
        for stacked, index, view in self.views:
            view.grad = None if stacked.grad is None else stacked.grad[index]
        for part in self.parts:
            part.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)
        for _, _, view in self.views:
            view.grad = None  # a slice of the stack's gradient, which the parts do not own

    def state_dict(self) -> dict:
        """One optimizer's layout: parameters numbered on across the parts, in `param_groups` order."""
        state, groups, offset = {}, [], 0
        for part in self.parts:
            sd = part.state_dict()
            state.update({offset + i: entry for i, entry in sd["state"].items()})
            groups += [dict(group, params=[offset + i for i in group["params"]]) for group in sd["param_groups"]]
            offset += sum(len(group["params"]) for group in sd["param_groups"])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        groups, offset = iter(state_dict["param_groups"]), 0
        for part in self.parts:
            mine = [next(groups) for _ in part.param_groups]
            n = sum(len(group["params"]) for group in mine)
            part.load_state_dict({
                "state": {int(i) - offset: entry for i, entry in state_dict["state"].items() if offset <= int(i) < offset + n},
                "param_groups": [dict(group, params=[i - offset for i in group["params"]]) for group in mine],
            })
            offset += n


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
