"""The optimizers: which parameters Muon takes, and that the pair behaves as one optimizer."""

import copy

import pytest
import torch
from conftest import one_line_error

from omnilm import OmniModel
from omnilm.train.loop import TrainArgs
from omnilm.train.optim import MuonAdamW, build_optimizer, lr_factor, set_lr

SMALL = dict(text=dict(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, mlp_dim=128, vocab_size=100),
             vision=dict(n_layers=2, dim=64, n_heads=4, mlp_dim=128))


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


def test_muon_without_block_matrices_to_train_is_plain_adamw():
    model = small_model()
    model.llm.requires_grad_(False)  # stage align: the projector alone
    model.lm_head.requires_grad_(False)
    assert type(build_optimizer(model, 1e-3, kind="muon")) is torch.optim.AdamW


def test_muon_state_dict_reloads_into_a_fresh_pair():
    torch.manual_seed(0)
    model = small_model()
    params = [p for p in model.parameters() if p.requires_grad]

    def step(opt):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()

    opt = build_optimizer(model, 1e-3, kind="muon")
    step(opt)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    sd = copy.deepcopy(opt.state_dict())  # its tensors are the live moments otherwise
    assert sorted(sd["state"]) == list(range(len(params)))  # numbered as one optimizer's
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
