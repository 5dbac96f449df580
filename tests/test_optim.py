"""The optimizers: which parameters Muon takes, and that the pair behaves as one optimizer."""

import copy

import pytest
import torch
from conftest import one_line_error

from omnilm import OmniModel
from omnilm.train import TrainArgs
from omnilm.model.layers import Attention
from omnilm.train import optim
from omnilm.train.optim import (MuonAdamW, build_optimizer, check_split, describe_split, human_count, lr_factor,
                                set_lr, split_sizes)

SMALL = dict(text=dict(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, mlp_dim=128, vocab_size=100),
             vision=dict(n_layers=2, dim=64, n_heads=4, mlp_dim=128))
MOE = dict(n_experts=4, n_experts_per_token=2, expert_dim=32)


def small_model(**overrides) -> OmniModel:
    model = OmniModel.from_preset("tiny", **(SMALL | overrides))
    model.vision.requires_grad_(False)  # frozen, as in the instruct stage
    return model


def test_muon_takes_the_decoder_block_matrices_and_adamw_the_rest():
    model = small_model()
    opt = build_optimizer(model, 1e-3, kind="muon")
    assert isinstance(opt, MuonAdamW)
    adamw, muon = opt.parts
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, torch.optim.Muon)
    names = {id(p): name for name, p in model.named_parameters()}
    in_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    in_adamw = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    expected = {n for n, p in model.named_parameters() if n.startswith("llm.layers.") and p.ndim == 2}
    assert in_muon == expected and "llm.layers.0.self_attn.q_proj.weight" in in_muon
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert in_muon | in_adamw == trainable and not in_muon & in_adamw  # each trainable parameter once
    assert {"llm.embed_tokens.weight", "lm_head.weight", "projector.fc1.weight", "llm.layers.0.input_layernorm.weight"} <= in_adamw
    # One schedule drives both: every group carries its peak in base_lr.
    set_lr(opt, lr_factor(0, 10, 2))
    assert all(g["lr"] == pytest.approx(g["base_lr"] / 2) for g in opt.param_groups)


def test_muon_takes_cross_attentions_gated_blocks_as_decoder_layers():
    """The gated blocks stand between the decoder's layers and hold an attention and a feed-forward
    each: their matrices are Muon's, as the resampler's layers are; gates, latents, the ordinal
    table and the resampler's output projection are AdamW's."""
    model = small_model(fusion="cross_attention", cross_attention_every=1)
    opt = build_optimizer(model, 1e-3, kind="muon")
    adamw, muon = opt.parts
    names = {id(p): name for name, p in model.named_parameters()}
    in_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    in_adamw = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    blocks = ("llm.layers.", "fusion.blocks.", "fusion.resampler.layers.")
    expected = {n for n, p in model.named_parameters() if n.startswith(blocks) and p.ndim == 2}
    assert in_muon == expected
    assert {"fusion.blocks.1.attn.q_proj.weight", "fusion.blocks.1.mlp.down_proj.weight"} <= in_muon
    assert {"fusion.blocks.0.attn_gate", "fusion.blocks.0.mlp_gate", "fusion.resampler.latents",
            "fusion.resampler.proj.weight", "fusion.order.weight", "fusion.blocks.0.norm.weight"} <= in_adamw


def test_muon_orthogonalises_each_moe_expert_matrix_on_its_own():
    """Stacked expert weights: each expert's gate, up and down matrix moves as torch.optim.Muon moves
    that matrix alone, as it moves a dense SwiGLU's three linear layers."""
    torch.manual_seed(0)
    model = small_model(text=SMALL["text"] | MOE)
    opt = build_optimizer(model, 1e-2, weight_decay=0.1, kind="muon")
    experts = [layer.mlp.experts for layer in model.llm.layers]
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not held & {id(p) for e in experts for p in e.parameters()}  # the stacks only through their views
    matrices = [m for e in experts for m in e.matrices()]
    assert len(matrices) == 2 * 3 * 4 and {stacked[index].shape for stacked, index in matrices} == {(32, 64), (64, 32)}
    alone = [torch.nn.Parameter(stacked.detach()[index].clone()) for stacked, index in matrices]
    reference = optim.Muon(alone, lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw",
                           ns_dtype=opt.parts[-1].ns_dtype)
    start = [stacked.detach()[index].clone() for stacked, index in matrices]
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.randn_like(p) if p.requires_grad else None
        for a, (stacked, index) in zip(alone, matrices):
            a.grad = stacked.grad[index].clone()
        opt.step()
        reference.step()
        opt.zero_grad()
    for a, s, (stacked, index) in zip(alone, start, matrices):
        torch.testing.assert_close(stacked.detach()[index], a.detach(), rtol=1e-6, atol=1e-7)
        assert not torch.equal(stacked.detach()[index], s)


MATRICES = [(8, 24), (24, 8), (16, 16)]  # wide, tall (iterated transposed) and square


def twin_muons(ns_dtype, **kw):
    """Our Muon with `ns_dtype` and torch.optim.Muon, each over its own copy of three matrices."""
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(*shape)) for shape in MATRICES]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    kw = dict(lr=0.02, weight_decay=0.1) | kw
    return ours, optim.Muon(ours, ns_dtype=ns_dtype, **kw), theirs, torch.optim.Muon(theirs, **kw)


def step_both(ours, a, theirs, b, steps=4):
    for _ in range(steps):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        a.step()
        b.step()


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr_fn", [None, "original", "match_rms_adamw"])
def test_muon_in_bf16_is_torch_muon_to_the_bit(nesterov, adjust_lr_fn):
    """With the iteration in bf16, our step is torch.optim.Muon's, and each reads the other's state."""
    ours, a, theirs, b = twin_muons(torch.bfloat16, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    step_both(ours, a, theirs, b)
    assert all(torch.equal(p, q) for p, q in zip(ours, theirs))
    a.load_state_dict(copy.deepcopy(b.state_dict()))  # a checkpoint of either resumes under the other
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    step_both(ours, a, theirs, b, steps=2)
    assert all(torch.equal(p, q) for p, q in zip(ours, theirs))


def test_muon_in_fp32_differs_from_torch_by_bf16_rounding_only():
    """The fp32 iteration moves each matrix as torch's bf16 one does, to within what bf16's rounding
    adds up to over five iterations (1.3 to 1.8% of the update here), and orthogonalises as well:
    the update's singular values lie in the band the quintic iteration leaves them in (0.68 to
    1.14 here, in either dtype)."""
    ours, a, theirs, b = twin_muons(torch.float32)
    start = [p.detach().clone() for p in ours]
    step_both(ours, a, theirs, b, steps=1)
    for p, q, p0 in zip(ours, theirs, start):
        mine, torchs = p.detach() - p0 * (1 - 0.02 * 0.1), q.detach() - p0 * (1 - 0.02 * 0.1)
        assert not torch.equal(mine, torchs)
        assert (mine - torchs).norm() / torchs.norm() < 0.05
    # Without Nesterov the update is the momentum buffer itself, in fp32 no copy: the iteration
    # must leave it as torch's leaves its own.
    ours, a, theirs, b = twin_muons(torch.float32, nesterov=False)
    step_both(ours, a, theirs, b, steps=2)
    assert all(torch.equal(a.state[p]["momentum_buffer"], b.state[q]["momentum_buffer"]) for p, q in zip(ours, theirs))
    update = optim.orthogonalize(torch.randn(24, 64), (3.4445, -4.7750, 2.0315), 5, 1e-7, torch.float32)
    singular = torch.linalg.svdvals(update)
    assert update.dtype == torch.float32 and 0.5 < singular.min() and singular.max() < 1.3


@pytest.mark.parametrize("fast", [True, False])
def test_muon_iterates_in_bf16_only_where_bf16_is_fast(monkeypatch, fast):
    monkeypatch.setattr(optim, "bf16_is_fast", lambda device: fast)
    muon = build_optimizer(small_model(), 1e-3, kind="muon").parts[-1]
    assert isinstance(muon, optim.Muon) and muon.ns_dtype == (torch.bfloat16 if fast else torch.float32)


def test_muon_without_block_matrices_to_train_is_plain_adamw():
    model = small_model()
    model.llm.requires_grad_(False)  # stage align: the projector alone
    model.lm_head.requires_grad_(False)
    assert type(build_optimizer(model, 1e-3, kind="muon")) is torch.optim.AdamW


@pytest.mark.parametrize("moe", [False, True])
def test_muon_state_dict_reloads_into_a_fresh_pair(moe):
    torch.manual_seed(0)
    model = small_model(text=SMALL["text"] | MOE) if moe else small_model()
    params = [p for p in model.parameters() if p.requires_grad]

    def step(opt):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()

    opt = build_optimizer(model, 1e-3, kind="muon")
    step(opt)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    sd = copy.deepcopy(opt.state_dict())  # its tensors are the live moments otherwise
    held = sum(len(g["params"]) for g in opt.param_groups)  # an MoE's expert matrices one by one
    assert sorted(sd["state"]) == list(range(held)) and (held > len(params)) == moe  # numbered as one optimizer's
    rng = torch.get_rng_state()
    step(opt)
    after_two = {k: v.clone() for k, v in model.state_dict().items()}

    model.load_state_dict(saved)
    fresh = build_optimizer(model, 1e-3, kind="muon")
    fresh.load_state_dict(sd)
    torch.set_rng_state(rng)
    step(fresh)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, after_two[k], rtol=0, atol=0, msg=k)


def test_unknown_optimizer_is_a_one_line_error(tmp_path):
    one_line_error(lambda: TrainArgs(stage="instruct", data=tmp_path, image_folder=tmp_path, out=tmp_path,
                                     optimizer="sgd"), "--optimizer", "adamw, muon")


def test_group_lrs_take_the_longest_matching_module_path():
    model = small_model()
    model.vision.requires_grad_(True)  # a trainable tower, as in stage clip or with --train-vision
    opt = build_optimizer(model, 1e-3, group_lrs={"vision": 1e-4, "vision.embeddings.patch_embedding": 1e-5,
                                                  "projector": 2e-3})
    names = {id(p): name for name, p in model.named_parameters()}
    peak = {names[id(p)]: g["base_lr"] for g in opt.param_groups for p in g["params"]}
    assert peak["vision.embeddings.patch_embedding.weight"] == 1e-5
    assert peak["vision.embeddings.position_embedding.weight"] == 1e-4  # "vision", not the patch path
    assert peak["vision.layers.0.mlp.fc1.weight"] == 1e-4
    assert peak["projector.fc1.weight"] == 2e-3
    assert peak["llm.layers.0.mlp.up_proj.weight"] == 1e-3
    assert {g["name"] for g in opt.param_groups} == {"model", "vision", "vision.embeddings.patch_embedding", "projector"}



# --- the split checks itself --------------------------------------------------------------------


class NewBlock(torch.nn.Module):
    """A transformer block of a type BLOCKS does not name: an attention and a feed-forward matrix."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.attn = Attention(dim, 2, 2, dim // 2, bias=False)
        self.norm = torch.nn.LayerNorm(dim)
        self.fc = torch.nn.Linear(dim, dim)


class TinyNewModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 16)
        self.blocks = torch.nn.ModuleList(NewBlock() for _ in range(2))
        self.head = torch.nn.Linear(16, 10, bias=False)


def test_a_block_type_missing_from_blocks_stops_muon(monkeypatch):
    """Found by structure (a ModuleList element holding an Attention), the new block's matrices may not
    fall to AdamW; named in BLOCKS, they are Muon's."""
    model = TinyNewModel()
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.q_proj\.weight .*add NewBlock to omnilm\.train\.optim\.BLOCKS"):
        build_optimizer(model, 1e-3, kind="muon")
    build_optimizer(model, 1e-3, kind="adamw")  # AdamW for all is a split of its own: no complaint
    monkeypatch.setattr(optim, "BLOCKS", optim.BLOCKS + (NewBlock,))
    opt = build_optimizer(model, 1e-3, kind="muon")
    in_muon = {id(p) for g in opt.parts[-1].param_groups for p in g["params"]}
    assert in_muon == {id(p) for b in model.blocks for p in b.parameters() if p.ndim == 2}
    monkeypatch.undo()
    model.blocks.requires_grad_(False)  # frozen, the block asks nothing of Muon
    assert type(build_optimizer(model, 1e-3, kind="muon")) is torch.optim.AdamW


PRESETS = {"joint": ("tiny", {}), "early": ("tiny", dict(fusion="early")), "late": ("tiny", dict(fusion="late")),
           "cross_attention": ("tiny", dict(fusion="cross_attention", cross_attention_every=1)),
           "tiny-moe": ("tiny-moe", {})}


def preset_model(preset: str) -> OmniModel:
    name, overrides = PRESETS[preset]
    model = OmniModel.from_preset(name, **(SMALL | overrides))
    if model.vision is not None:
        model.vision.requires_grad_(False)  # frozen, as in the instruct stage
    return model


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("kind", ["adamw", "muon"])
@pytest.mark.parametrize("train_vision", [False, True])
def test_every_trainable_parameter_is_in_exactly_one_group(preset, kind, train_vision):
    model = preset_model(preset)
    if model.vision is not None:
        model.vision.requires_grad_(train_vision)
    opt = build_optimizer(model, 1e-3, kind=kind)  # the checks pass
    views = {id(view): (stacked, index) for stacked, index, view in getattr(opt, "views", ())}
    stacks = {id(s): s for s, _ in views.values()}
    held = [id(views[id(p)][0]) if id(p) in views else id(p) for g in opt.param_groups for p in g["params"]]
    direct = [key for key in held if key not in stacks]
    assert len(direct) == len(set(direct))  # once each
    assert set(held) == {id(p) for p in model.parameters() if p.requires_grad}
    for stacked in stacks.values():  # a stack through views that tile it
        covered = torch.zeros(stacked.shape, dtype=torch.int)
        for s, index in views.values():
            if s is stacked:
                covered[index] += 1
        assert bool((covered == 1).all())
    assert bool(views) == (preset == "tiny-moe" and kind == "muon")


def test_a_parameter_in_two_groups_or_in_none_is_refused():
    model = small_model()
    opt = build_optimizer(model, 1e-3, kind="muon")
    adamw, muon = opt.parts
    lost = muon.param_groups[0]["params"].pop()
    with pytest.raises(ValueError, match=r"in no optimizer group: llm\.layers"):
        check_split(model, opt, "muon")
    adamw.param_groups[0]["params"].append(lost)  # in AdamW instead: a block matrix there
    with pytest.raises(ValueError, match=r"llm\.layers\.\d\..* add DecoderLayer to omnilm\.train\.optim\.BLOCKS"):
        check_split(model, opt, "muon")
    muon.param_groups[0]["params"].append(lost)  # and in Muon too
    with pytest.raises(ValueError, match="in more than one optimizer group"):
        check_split(model, opt, "muon")
    plain = build_optimizer(model, 1e-3)
    model.projector.requires_grad_(False)  # held, but frozen
    with pytest.raises(ValueError, match=r"projector\..* not a trainable parameter"):
        check_split(model, plain, "adamw")


def test_expert_stacks_are_held_through_views_that_cover_them():
    model = preset_model("tiny-moe")
    opt = build_optimizer(model, 1e-3, kind="muon")
    muon = opt.parts[-1]
    dropped = opt.views.pop()  # the view still in Muon's groups, no longer known as the stack's
    with pytest.raises(ValueError, match="a tensor, which is not a trainable parameter"):
        check_split(model, opt, "muon")
    opt.views.append(dropped)
    check_split(model, opt, "muon")
    for group in muon.param_groups:  # one expert matrix leaves Muon: the stack is held in part
        group["params"] = [p for p in group["params"] if p is not dropped[2]]
    with pytest.raises(ValueError, match=r"views of llm\.layers\.\d\.mlp\.experts\.down_proj .* must cover it once"):
        check_split(model, opt, "muon")


@pytest.mark.parametrize("kind", ["adamw", "muon"])
@pytest.mark.parametrize("preset", ["joint", "tiny-moe"])
def test_describe_split_sums_the_groups(kind, preset):
    model = preset_model(preset)
    opt = build_optimizer(model, 1e-3, kind=kind)
    parts = opt.parts[::-1] if kind == "muon" else [opt]  # Muon's first
    sums = [(sum(p.numel() for g in part.param_groups for p in g["params"]),
             sum(len(g["params"]) for g in part.param_groups)) for part in parts]
    assert [size[1:] for size in split_sizes(opt)] == sums
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if kind == "adamw":
        (n, k), = sums
        assert n == total
        assert describe_split(opt) == f"optimizer: adamw {human_count(n)} parameters in {k} tensors"
    else:
        (m, i), (a, j) = sums
        assert m + a == total
        dense = 7 * len(model.llm.layers)  # q, k, v, o, gate, up, down
        assert i > dense if preset == "tiny-moe" else i == dense  # each expert's matrices one by one
        assert describe_split(opt) == (f"optimizer: muon {human_count(m)} parameters in {i} matrices, "
                                       f"adamw {human_count(a)} in {j} tensors")


def test_human_count():
    assert [human_count(n) for n in (999, 12_345, 450_000, 1_234_567, 2_500_000_000)] == \
        ["999", "12.3K", "0.45M", "1.23M", "2.50B"]


def test_muon_needs_torch_2_9(monkeypatch):
    monkeypatch.delattr(torch.optim, "Muon")
    one_line_error(lambda: build_optimizer(small_model(), 1e-3, kind="muon"), "torch>=2.9", "--optimizer adamw")
    build_optimizer(small_model(), 1e-3)  # AdamW needs no Muon
