"""Training memory per rank, counted from a model's parameter shapes (build it on the meta device:
nothing is allocated), for --parallel none, ddp or fsdp and --expert-parallel.

What is counted, in bytes, for the rank that holds the most (rank 0):

    params      every parameter, trained or frozen, in `dtype`
    grads       the trained parameters (requires_grad), in `dtype`
    optimizer   AdamW's two moments (exp_avg, exp_avg_sq) per trained element, in `dtype` as
                torch.optim.AdamW keeps them (fp32 for the fp32 weights omnilm trains); its
                per-tensor `step` counters live on the CPU and are left out
    gathered    fsdp: the parameters gathered whole at once, in `gather_dtype`: the root unit
                (everything outside the decoder and vision layers: embeddings, head, projector,
                norms), which FSDP2 keeps gathered from the forward pass to the end of backward,
                plus the largest decoder or vision layer. FSDP2 prefetches the next layer's
                gather while a layer runs, which can hold a second layer: not counted. (ddp
                holds no second copy of the gradients: wrap sets gradient_as_bucket_view.)

Sharding follows omnilm.train.distributed: none and ddp hold everything whole on every rank; fsdp
(FSDP2's fully_shard per decoder layer, per vision layer, then the root) splits parameters,
gradients and optimizer state along dim 0 over the ranks, each tensor padded to a multiple of the
world size: a rank holds ceil(dim0 / N) rows of each tensor (rank 0 exactly that, the last ranks
as much or less). With expert parallelism (E = N: omnilm train splits the experts over all the
ranks) each rank holds n_experts / N experts of every MoE layer, whole: FSDP leaves them alone.
A world of one is a single process whatever `parallel` says (wrap then leaves the model alone).

Activations, autocast's bf16 weight copies, FSDP's unsharded gradients during backward, and the
CUDA allocator's caching are not counted: this counts what the shapes fix, it does not estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import nn

from omnilm.errors import OmniInputError
from omnilm.model.moe import Experts
from omnilm.train.lora import lora_layers
from omnilm.train.stages import mark_trainable

MODES = ("none", "ddp", "fsdp")


@dataclass(frozen=True)
class RankMemory:
    """Bytes on one rank (see the module docstring for what each holds)."""

    params: int
    grads: int
    optimizer: int
    gathered: int

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))


def train_as_instruct(model: nn.Module) -> nn.Module:
    """Set requires_grad as stage instruct does (`omnilm.train.stages.mark_trainable`): projector +
    LLM (vision frozen), or, when `model` has LoRA layers (`apply_lora`), the LoRA updates + the projector."""
    mark_trainable(model, "instruct")
    return model


def rank_memory(model: nn.Module, world: int = 1, parallel: str = "none", expert_parallel: int = 1,
                dtype: torch.dtype = torch.float32, gather_dtype: torch.dtype | None = None) -> RankMemory:
    """The training memory of the fullest rank of `world` (module docstring), from `model`'s shapes
    and requires_grad flags; parameters, gradients and AdamW's moments in `dtype`, fsdp's gathered
    layers in `gather_dtype` (default `dtype`; bf16 under the CUDA mixed-precision policy)."""
    if parallel not in MODES:
        raise ValueError(f"unknown parallel mode {parallel!r}; choose one of {', '.join(MODES)}")
    if world < 1:
        raise OmniInputError(f"--nproc is {world}: give the number of training processes, at least 1")
    if expert_parallel < 1:
        raise OmniInputError(f"--expert-parallel is {expert_parallel}: give the ranks each expert is split over, "
                             "at least 1")
    if parallel == "none" and world > 1:
        raise OmniInputError(f"{world} ranks need --parallel ddp or fsdp")
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    if expert_parallel > 1:
        if not experts:
            raise OmniInputError("--expert-parallel splits MoE experts, and this model has none (a dense decoder)")
        if expert_parallel != world or experts[0].n % expert_parallel:
            raise OmniInputError(f"--expert-parallel {expert_parallel} splits the experts over all the ranks, as "
                                 f"omnilm train does: it must equal the number of ranks ({world}) and divide the "
                                 f"experts per layer ({experts[0].n})")
    if world == 1:
        parallel = "none"
    expert_ids = {id(p) for m in experts for p in m.parameters()}

    def local(p: nn.Parameter) -> list[int]:  # the shape a rank holds before FSDP: its experts only
        shape = list(p.shape) or [1]
        if id(p) in expert_ids:
            shape[0] //= expert_parallel
        return shape

    def held(p: nn.Parameter) -> int:  # elements on rank 0
        shape = local(p)
        if parallel == "fsdp" and not (expert_parallel > 1 and id(p) in expert_ids):
            shape[0] = math.ceil(shape[0] / world)
        return math.prod(shape)

    size = dtype.itemsize
    params = list(model.parameters())  # tied weights once
    trained = [p for p in params if p.requires_grad]
    gathered = 0
    if parallel == "fsdp":
        layers = [*model.llm.layers, *(model.vision.layers if getattr(model, "vision", None) is not None else ())]
        # Expert-parallel slices are not FSDP's: they stay whole on their rank, and are never gathered.
        gathered = {id(p) for p in params} - (expert_ids if expert_parallel > 1 else set())
        in_layers = {id(p) for layer in layers for p in layer.parameters()}
        root = sum(math.prod(local(p)) for p in params if id(p) not in in_layers and id(p) in gathered)
        largest = max((sum(math.prod(local(p)) for p in layer.parameters() if id(p) in gathered) for layer in layers),
                      default=0)
        gathered = (root + largest) * (gather_dtype or dtype).itemsize
    n_trained = sum(held(p) for p in trained)
    return RankMemory(params=sum(held(p) for p in params) * size, grads=n_trained * size,
                      optimizer=2 * n_trained * size, gathered=gathered)


GIB = 2 ** 30


def memory_table(model: nn.Module, nproc: int, expert_parallel: int = 1) -> str:
    """`omnilm info --nproc N`: per-rank GiB for stage instruct (requires_grad as `train_as_instruct`
    sets it) on one process, and on `nproc` ranks with ddp and with fsdp; fp32 weights, fsdp's gathers
    in bf16 (the CUDA mixed-precision policy)."""
    train_as_instruct(model)
    n_lora = len(lora_layers(model))
    projector = " + projector" if getattr(model, "projector", None) is not None else ""
    trains = (f"LoRA on {n_lora} layers{projector} trained" if n_lora else f"LLM{projector} trained")
    trains += ", vision frozen" if getattr(model, "vision", None) is not None else ""
    rows = [("none", 1, 1), ("ddp", nproc, expert_parallel), ("fsdp", nproc, expert_parallel)]
    lines = [f"per-rank training memory, stage instruct ({trains}), GiB"
             + (f", experts split over {expert_parallel} ranks on ddp and fsdp" if expert_parallel > 1 else "") + ":",
             "computed from the model's shapes, fp32 weights + AdamW, activations not included",
             "| parallel | ranks | parameters | gradients | optimizer | gathered | total |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for parallel, world, ep in rows:
        m = rank_memory(model, world, parallel, ep, gather_dtype=torch.bfloat16)
        lines.append(f"| {parallel} | {world} | " + " | ".join(f"{b / GIB:.2f}" for b in (
            m.params, m.grads, m.optimizer, m.gathered, m.total)) + " |")
    lines.append("gathered: the parameters fsdp holds whole at once, in bf16: the root (embeddings, head, "
                 "projector, norms) and the largest layer")
    return "\n".join(lines)
