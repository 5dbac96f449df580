"""Per-rank training memory (omnilm.train.memory) against sums over the parameters done by hand here,
on meta-device models (nothing allocated), and `omnilm info --nproc`."""

import math

import pytest
import torch
from conftest import cli_error, one_line_error, run_cli

from omnilm.model import OmniModel
from omnilm.train.lora import LoraSettings, apply_lora
from omnilm.train.memory import rank_memory, train_as_instruct


def tiny(preset: str = "tiny") -> OmniModel:
    # dims 512, 256, 192, 688, 768, 9, 1: none divides by 3, so fsdp over 3 ranks pads most tensors
    return train_as_instruct(OmniModel.from_preset(preset, device="meta"))


def numel(params) -> int:
    return sum(p.numel() for p in params)


def sharded(params, n: int) -> int:
    """Elements of rank 0 under FSDP2: ceil(dim0 / n) rows of every tensor."""
    return sum(math.ceil((p.shape[0] if p.ndim else 1) / n) * math.prod(p.shape[1:]) for p in params)


def test_none_and_ddp_hold_everything_and_fsdp_holds_a_padded_nth():
    model = tiny()
    params = dict(model.named_parameters())
    trained = [p for p in params.values() if p.requires_grad]
    vision = [p for name, p in params.items() if name.startswith("vision.")]
    # stage instruct: everything but the vision tower trains
    assert numel(trained) == numel(params.values()) - numel(vision) and numel(vision) > 0
    assert not any(p.requires_grad for p in vision)

    none = rank_memory(model)
    assert (none.params, none.grads, none.optimizer, none.gathered) == (
        4 * numel(params.values()), 4 * numel(trained), 8 * numel(trained), 0)
    assert none.total == 4 * numel(params.values()) + 12 * numel(trained)

    ddp = rank_memory(model, 3, "ddp")
    assert (ddp.params, ddp.grads, ddp.optimizer) == (none.params, none.grads, none.optimizer)
    assert ddp.gathered == 0  # its all-reduce buckets are the gradients (gradient_as_bucket_view)

    fsdp = rank_memory(model, 3, "fsdp", gather_dtype=torch.bfloat16)
    assert fsdp.params == 4 * sharded(params.values(), 3) > none.params / 3  # padding: more than a third
    assert fsdp.grads == 4 * sharded(trained, 3)
    assert fsdp.optimizer == 8 * sharded(trained, 3)
    layers = {}  # "llm.layers.0" -> its elements
    for name, p in params.items():
        if name.startswith(("llm.layers.", "vision.layers.")):
            key = ".".join(name.split(".")[:3])
            layers[key] = layers.get(key, 0) + p.numel()
    root = numel(p for name, p in params.items() if not name.startswith(("llm.layers.", "vision.layers.")))
    assert len(layers) == 8 and root > 0
    assert fsdp.gathered == 2 * (root + max(layers.values()))  # bf16: the root and the largest layer, whole
    assert rank_memory(model, 3, "fsdp").gathered == 2 * fsdp.gathered  # gathered in the fp32 of the weights

    assert rank_memory(model, 1, "fsdp") == rank_memory(model, 1, "ddp") == none  # one rank: nothing wrapped
    bf16 = rank_memory(model, dtype=torch.bfloat16)  # AdamW keeps its moments in the parameters' dtype
    assert (bf16.params, bf16.grads, bf16.optimizer) == (none.params // 2, none.grads // 2, none.optimizer // 2)


def test_lora_trains_the_updates_and_the_projector_only():
    full = rank_memory(tiny())
    model = OmniModel.from_preset("tiny", device="meta")
    apply_lora(model, LoraSettings(lora_r=4))
    train_as_instruct(model)
    lora = [p for name, p in model.named_parameters() if ".lora_A." in name or ".lora_B." in name]
    projector = list(model.projector.parameters())
    assert len(lora) == 2 * 7 * 4  # A and B on q, k, v, o, gate, up, down of the 4 decoder layers
    trained = numel(lora) + numel(projector)
    assert numel(p for p in model.parameters() if p.requires_grad) == trained
    m = rank_memory(model)
    assert (m.grads, m.optimizer) == (4 * trained, 8 * trained)
    assert m.params == 4 * numel(model.parameters()) > full.params  # the base weights stay, plus A and B
    assert m.grads < full.grads / 10
    fsdp = rank_memory(model, 2, "fsdp")
    assert fsdp.grads == 4 * (sharded(lora, 2) + sharded(projector, 2))


def test_expert_parallel_splits_each_moe_layers_experts():
    model = tiny("tiny-moe")
    experts = [p for name, p in model.named_parameters() if ".experts." in name]
    others = [p for name, p in model.named_parameters() if ".experts." not in name]
    assert len(experts) == 8 and all(p.shape[0] == 8 for p in experts)  # gate_up and down of 4 layers, 8 experts
    ddp = rank_memory(model, 4, "ddp", expert_parallel=4)
    assert ddp.params == 4 * (numel(others) + numel(experts) // 4)
    assert ddp.gathered == 0
    # fsdp over 4 ranks with the experts split over them: 2 whole experts per rank, as many rows as fsdp
    # alone gives each rank; what shrinks is the layer gathered whole, which no longer holds experts
    fsdp = rank_memory(model, 4, "fsdp", expert_parallel=4)
    assert fsdp.params == 4 * (sharded(others, 4) + numel(experts) // 4)
    alone = rank_memory(model, 4, "fsdp")
    assert (fsdp.params, fsdp.grads, fsdp.optimizer) == (alone.params, alone.grads, alone.optimizer)
    layers = {}  # "llm.layers.0" -> its elements other than the experts
    for name, p in model.named_parameters():
        if name.startswith(("llm.layers.", "vision.layers.")) and ".experts." not in name:
            key = ".".join(name.split(".")[:3])
            layers[key] = layers.get(key, 0) + p.numel()
    root = numel(p for name, p in model.named_parameters() if not name.startswith(("llm.layers.", "vision.layers.")))
    assert fsdp.gathered == 4 * (root + max(layers.values())) < alone.gathered
    one_line_error(lambda: rank_memory(model, 4, "ddp", expert_parallel=2), "--expert-parallel 2 splits the experts")
    one_line_error(lambda: rank_memory(tiny(), 4, "fsdp", expert_parallel=2), "has none")


def test_info_prints_the_memory_table(capsys):
    code, out, err = run_cli(["info", "--preset", "llava-1.5-7b", "--nproc", "8"], capsys)
    assert code == 0, err
    assert "parameters: 7,063,427,072" in out
    assert "computed from the model's shapes, fp32 weights + AdamW, activations not included" in out
    # 7,063,427,072 weights (26.31 GiB in fp32), 6,759,698,432 trained (the vision tower's 303,728,640 frozen)
    assert "| none | 1 | 26.31 | 25.18 | 50.37 | 0.00 | 101.86 |" in out
    assert "| ddp | 8 | 26.31 | 25.18 | 50.37 | 0.00 | 101.86 |" in out
    assert "| fsdp | 8 | 3.29 | 3.15 | 6.30 | 0.91 | 13.64 |" in out
    code, out, err = run_cli(["info", "--preset", "llava-1.5-7b", "--nproc", "8", "--lora-r", "128"], capsys)
    assert code == 0, err
    assert "319,815,680 LoRA parameters" in out  # the LoRA line still counts the updates alone
    assert "| none | 1 | 27.50 | 1.27 | 2.54 | 0.00 | 31.31 |" in out  # LoRA + the projector's 21M train


@pytest.mark.parametrize("argv, parts", [
    (["--nproc", "0"], ["--nproc is 0", "at least 1"]),
    (["--nproc", "-2"], ["--nproc is -2"]),
    (["--nproc", "two"], ["--nproc", "invalid int value"]),
    (["--expert-parallel", "2"], ["give --nproc N too"]),
    (["--nproc", "8", "--expert-parallel", "0"], ["--expert-parallel is 0", "at least 1"]),
    (["--nproc", "8", "--expert-parallel", "2"], ["has none"]),
])
def test_info_refuses_a_bad_nproc_in_one_line(capsys, argv, parts):
    code, out, err = run_cli(["info", "--preset", "llava-1.5-7b", *argv], capsys)
    cli_error(code, err, *parts)
    assert out == ""  # nothing printed before the error
