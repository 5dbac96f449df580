"""Sparse mixture of experts: parity with transformers' Mixtral (logits, greedy ids, checkpoints both
ways), parameter counts, the fast dispatch against the plain loop, capacity and token dropping, the
router losses against transformers' formula, and balancing under training."""

import json

import pytest
import torch
import transformers as tf
from conftest import one_line_error, randomize_
from test_generate import _assert_same_greedy
from test_hf import hf_llama_logits, max_diff, our_logits, text_batch

from omnilm import OmniConfig, OmniModel
from omnilm.config import TextConfig
from omnilm.model import moe as moe_module
from omnilm.model.moe import MoE, load_balancing_loss

TOL = 1e-4


def tiny_mixtral(seed: int = 0, **overrides) -> tf.MixtralForCausalLM:
    cfg = tf.MixtralConfig(**(dict(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, rope_theta=5000.0, rms_norm_eps=3e-5,
        max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0) | overrides))
    torch.manual_seed(seed)
    return randomize_(tf.MixtralForCausalLM(cfg), seed).eval()


def moe_layer(seed: int = 0, **text) -> MoE:
    cfg = TextConfig(**(dict(vocab_size=50, dim=32, n_layers=1, n_heads=4, n_kv_heads=4, mlp_dim=48,
                             n_experts=6, n_experts_per_token=2) | text))
    torch.manual_seed(seed)
    layer = MoE(cfg)
    randomize_(layer, seed)
    return layer


# --- parity with transformers' Mixtral ----------------------------------------------------------


def test_mixtral_logits_and_greedy_match_transformers(tmp_path):
    hf = tiny_mixtral()
    hf.save_pretrained(tmp_path)  # per-expert w1/w2/w3 tensors, as on the hub
    ours = OmniModel.from_pretrained(tmp_path)
    t = ours.config.text
    assert (t.n_experts, t.n_experts_per_token, t.expert_dim, t.n_kv_heads, t.router) == (4, 2, 96, 2, "topk")
    ids, mask = text_batch(300)
    assert max_diff(our_logits(ours, ids, mask), hf_llama_logits(hf, ids, mask), mask) <= TOL
    _assert_same_greedy(hf, ours, ids.shape[1], input_ids=ids, attention_mask=mask)
    _assert_same_greedy(hf, ours, ids.shape[1], input_ids=ids[:1], attention_mask=mask[:1])


def test_mixtral_save_loads_in_transformers(tmp_path):
    torch.manual_seed(0)
    cfg = OmniConfig(text=dict(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=96,
                               rope_theta=5000.0, max_seq_len=128, n_experts=4, n_experts_per_token=2),
                     vision=None)
    ours = randomize_(OmniModel.from_config(cfg)).eval()
    ours.save_pretrained(tmp_path)
    hf = tf.MixtralForCausalLM.from_pretrained(tmp_path).eval()
    ids, mask = text_batch(300)
    assert max_diff(hf_llama_logits(hf, ids, mask), our_logits(ours, ids, mask), mask) <= TOL
    again = OmniModel.from_pretrained(tmp_path)
    assert max_diff(our_logits(again, ids, mask), our_logits(ours, ids, mask), mask) == 0.0


def test_llava_with_a_mixtral_decoder_loads_in_transformers(tmp_path):
    torch.manual_seed(0)
    ours = randomize_(OmniModel.from_preset("tiny-moe", text=dict(n_layers=2), vision=dict(n_layers=2))).eval()
    ours.save_pretrained(tmp_path)
    hf = tf.LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    L = ours.config.image_seq_len
    ids = torch.randint(4, 500, (1, L + 8), generator=torch.Generator().manual_seed(0))
    ids[0, 2:2 + L] = ours.config.image_token_id
    pixels = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        theirs = hf(input_ids=ids, pixel_values=pixels).logits
    assert (our_logits(ours, ids, torch.ones_like(ids), pixels) - theirs).abs().max() <= TOL


def test_mixtral_preset_parameter_counts():
    ours = OmniModel.from_preset("mixtral-8x7b", device="meta")
    with torch.device("meta"):
        hf = tf.MixtralForCausalLM(tf.MixtralConfig(max_position_embeddings=32768))
    total = sum(p.numel() for p in hf.parameters())
    assert ours.num_parameters() == total == 46_702_792_704
    # A token uses 2 of the 8 experts: drop 6 experts' SwiGLU weights in each of the 32 layers.
    assert ours.num_parameters(active_only=True) == total - 32 * 6 * 3 * 4096 * 14336 == 12_879_925_248
    dense = OmniModel.from_preset("tiny", device="meta")
    sparse = OmniModel.from_preset("tiny-moe", device="meta")
    assert sparse.num_parameters(active_only=True) - dense.num_parameters() == 4 * 8 * 256  # the routers
    # In all, each of the 4 layers holds 8 experts of width 344 instead of one MLP of width 688.
    assert sparse.num_parameters() - dense.num_parameters() == 4 * (3 * 256 * (8 * 344 - 688) + 8 * 256)


def test_moe_that_transformers_cannot_describe_saves_in_omnilm_form(tmp_path):
    torch.manual_seed(0)
    cfg = OmniConfig.from_preset("tiny-moe", text=dict(n_layers=2, router="switch", n_experts_per_token=1,
                                                       capacity_factor=1.0, n_shared_experts=1, moe_every=2))
    model = OmniModel.from_config(cfg).eval()
    model.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists() and (tmp_path / "omnilm.json").exists()
    again = OmniModel.from_pretrained(tmp_path)
    assert again.config == cfg
    ids = torch.randint(4, 500, (2, 30))
    torch.testing.assert_close(our_logits(again, ids, torch.ones_like(ids)), our_logits(model, ids, torch.ones_like(ids)),
                               rtol=0, atol=0)


def test_config_errors_are_one_line(tmp_path):
    for bad, part in [(dict(router="switch"), "n_experts_per_token=1"), (dict(n_experts_per_token=9), "between 1"),
                      (dict(router="expert-choice"), "router="), (dict(capacity_factor=0.0), "capacity_factor")]:
        with pytest.raises(ValueError, match=part):
            TextConfig(n_experts=8, n_layers=2, **bad)
    hf = tiny_mixtral(sliding_window=16)
    hf.save_pretrained(tmp_path)
    one_line_error(lambda: OmniModel.from_pretrained(tmp_path), "sliding-window", "sliding_window to null")


# --- the layer ----------------------------------------------------------------------------------


def uneven_inputs(layer: MoE, n: int = 40, seed: int = 1) -> torch.Tensor:
    """Inputs whose routing is lopsided: expert 0 is favoured and the last expert gets no token."""
    with torch.no_grad():
        layer.gate.weight[-1] = -10 * layer.gate.weight[0].abs().sum() * torch.sign(layer.gate.weight[0])
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, layer.gate.in_features, generator=g) + 0.5 * torch.sign(layer.gate.weight[0]).detach()
    return x.requires_grad_()


@pytest.mark.parametrize("variant", [
    dict(),  # Mixtral: top-2, renormalised
    dict(n_experts_per_token=1, router="switch", capacity_factor=1.0),  # Switch, with dropping
    dict(capacity_factor=0.5, n_shared_experts=2),  # top-2 with heavy dropping, shared experts
])
@pytest.mark.parametrize("grouped", [True, False])
def test_fast_dispatch_equals_the_plain_loop(variant, grouped, monkeypatch):
    moe_module._grouped_mm_works.cache_clear()
    with torch.no_grad():  # the capability probe must not be fooled by a no-grad first call
        probe = moe_module._grouped_mm_works("cpu", torch.float32)
    if grouped and not probe:
        pytest.skip("this PyTorch has no grouped GEMM on CPU")
    if not grouped:
        monkeypatch.setattr(moe_module, "_grouped_mm_works", lambda *a: False)
    calls = []
    if hasattr(torch, "_grouped_mm"):
        real = torch._grouped_mm
        monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer = moe_layer(**variant)
    x = uneven_inputs(layer)
    mask = torch.ones(x.shape[0], dtype=torch.bool)
    mask[:5] = False  # padding: routed nowhere
    y, routing = layer(x, mask)
    wanted = torch.bincount(layer.route(x)[2][mask].flatten(), minlength=layer.n_experts)
    assert wanted[-1] == 0 and wanted.max() > 2 * wanted.float().mean()  # uneven, and an expert without tokens
    assert (routing.experts[:5] == -1).all()
    if not variant.get("n_shared_experts"):
        assert y[:5].abs().max() == 0
    expected = layer.reference_forward(x, mask)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *layer.parameters()], g)
    ref_grads = torch.autograd.grad(expected, [x, *layer.parameters()], g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert bool(calls) == grouped  # the path under test is the one that ran


def test_capacity_keeps_first_choices_before_second_ones():
    layer = moe_layer(n_experts=2, n_experts_per_token=2, capacity_factor=2 / 3)  # 2 places per expert
    chosen = torch.tensor([[0, 1], [1, 0], [0, 1]])
    # expert 0: first choices of tokens 0 and 2 beat token 1's second choice; expert 1: token 1's
    # first choice, then the earlier of the two second choices (token 0).
    _, keep = layer.dispatch_order(chosen, None)
    assert keep.tolist() == [[True, True], [True, False], [True, False]]
    _, keep = layer.dispatch_order(chosen, torch.tensor([False, True, True]))  # token 0 is padding
    assert keep.tolist() == [[False, False], [True, True], [True, True]]
    layer.eval()  # at inference nothing is dropped
    assert layer.dispatch_order(chosen, None)[1].all()


@pytest.mark.parametrize("dims", [dict(dim=32, expert_dim=48), dict(dim=18, expert_dim=20)])  # aligned, not
def test_bf16_autocast_and_odd_widths(dims):
    layer = moe_layer(**dims, mlp_dim=dims["expert_dim"], n_heads=2, n_kv_heads=2, n_shared_experts=1)
    x = torch.randn(2, 9, dims["dim"], requires_grad=True)
    expected = layer.reference_forward(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, routing = layer(x)
    assert y.dtype == torch.float32 and routing.aux_loss.dtype == torch.float32
    torch.testing.assert_close(y, expected, atol=0.05 * expected.abs().max().item(), rtol=0)
    y.square().mean().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in layer.parameters())


def test_capacity_drops_the_overflow_in_priority_order():
    layer = moe_layer(n_experts=4, n_experts_per_token=1, router="switch", capacity_factor=1.0)
    with torch.no_grad():  # every token prefers expert 2
        layer.gate.weight.zero_()
        layer.gate.weight[2, 0] = 1.0
    x = torch.randn(8, 32)
    x[:, 0] = 5.0
    y, routing = layer(x)
    # capacity = 1.0 * 8 tokens * 1 / 4 experts = 2: the first two tokens are served, six dropped.
    assert routing.experts.flatten().tolist() == [2, 2, -1, -1, -1, -1, -1, -1]
    assert routing.dropped.item() == pytest.approx(6 / 8)
    assert routing.load.tolist() == [0.0, 0.0, 1.0, 0.0]
    assert y[2:].abs().max() == 0  # a dropped token adds nothing: the residual carries it through
    assert y[:2].abs().min() > 0
    layer.eval()  # inference drops nothing: a token's output does not depend on the batch
    y_eval, routing = layer(x)
    assert routing.dropped.item() == 0 and (routing.experts == 2).all()
    torch.testing.assert_close(y_eval[:1], layer(x[:1])[0])


def test_load_balancing_loss_equals_transformers_formula():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2 * 9, 6, generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0
    probs = logits.softmax(-1)
    chosen = probs.topk(2, dim=-1).indices
    ours = load_balancing_loss(probs, chosen)
    ours_masked = load_balancing_loss(probs, chosen, mask.flatten().bool())
    assert ours.item() == pytest.approx(load_balancing_loss_func((logits,), 6, 2).item(), abs=1e-6)
    assert ours_masked.item() == pytest.approx(load_balancing_loss_func((logits,), 6, 2, mask).item(), abs=1e-6)
    # Perfect balance is the minimum, k: two tokens' top-2 choices cover 4 experts evenly.
    uniform = torch.full((2, 4), 0.25)
    assert load_balancing_loss(uniform, torch.tensor([[0, 1], [2, 3]])).item() == pytest.approx(2.0)


def _train_and_measure_balance(aux_coef: float) -> float:
    torch.manual_seed(0)
    cfg = OmniConfig(text=dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=32, n_experts=4,
                               n_experts_per_token=1, router="switch", router_aux_loss_coef=aux_coef,
                               router_z_loss_coef=0.0), vision=None)
    model = OmniModel.from_config(cfg)
    with torch.no_grad():  # start lopsided: expert 0's router row points where the inputs are
        for layer in model.llm.layers:
            layer.mlp.gate.weight[0] += 0.5
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        ids = torch.randint(0, 64, (8, 16), generator=g)
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        routing = model(torch.randint(0, 64, (16, 16), generator=g), output_routing=True).routing
    load = torch.stack([r.load for r in routing])  # (layers, experts)
    return (load.max(-1).values / load.min(-1).values.clamp(min=1e-3)).max().item()


def test_load_balancing_loss_evens_out_the_experts():
    off, on = _train_and_measure_balance(0.0), _train_and_measure_balance(0.5)
    assert on < off / 10 and on < 5.0, (on, off)


def test_router_losses_join_the_training_loss_and_skip_padding():
    torch.manual_seed(0)
    model = OmniModel.from_preset("tiny-moe", text=dict(n_layers=2), vision=None)
    ids = torch.randint(4, 500, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    out = model(ids, attention_mask=mask, labels=ids)
    t = model.config.text
    aux = torch.stack([r.aux_loss for r in out.routing]).mean()
    z = torch.stack([r.z_loss for r in out.routing]).mean()
    torch.testing.assert_close(out.loss, out.lm_loss + t.router_aux_loss_coef * aux + t.router_z_loss_coef * z)
    assert len(out.routing) == 2 and all((r.experts.view(2, 12, -1)[1, :5] == -1).all() for r in out.routing)
    assert all(r.load.sum().item() == pytest.approx(1.0) for r in out.routing)


def test_cached_decoding_equals_the_full_forward():
    torch.manual_seed(0)
    model = OmniModel.from_preset("tiny-moe", text=dict(n_layers=2), vision=dict(n_layers=1)).eval()
    L, img = model.config.image_seq_len, model.config.image_token_id
    ids = torch.randint(4, 500, (2, L + 10))
    ids[:, 4:4 + L] = img
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    pixels = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        full = model(ids, pixels, mask).logits
        cache = model.new_cache(2, ids.shape[1])
        T = ids.shape[1] - 3
        first = model(ids[:, :T], pixels, mask[:, :T], cache=cache).logits
        rest = [model(ids[:, t:t + 1], None, mask[:, :t + 1], cache=cache).logits for t in range(T, ids.shape[1])]
    got = torch.cat([first, *rest], 1)
    assert max_diff(got, full, mask) <= 1e-5


# --- training and inspection -------------------------------------------------------------------


def test_moe_training_logs_routing_resumes_exactly_and_is_inspectable(tmp_path, capsys):
    from test_train import SMALL, args, shapeworld  # noqa: F401  (shapeworld: the fixture, by name)

    from omnilm.cli import main
    from omnilm.data.shapeworld import write_shapeworld
    from omnilm.data import train_tokenizer
    from omnilm.train.loop import train
    from omnilm.train.stages import corpus

    root = tmp_path / "sw"
    train_json = write_shapeworld(root, 24, seed=0, split="train")
    train_tokenizer(corpus(train_json), vocab_size=400).save(root / "tokenizer")
    moe = {**SMALL, "text": {**SMALL["text"], "n_experts": 4, "n_experts_per_token": 2, "expert_dim": 64}}
    straight = train(args(root, tmp_path / "straight", steps=4, config=moe))["losses"]
    first = train(args(root, tmp_path / "resumed", steps=4, stop_after=2, config=moe))["losses"]
    rest = train(args(root, tmp_path / "resumed", steps=4, resume=True, config=moe))["losses"]
    assert first + rest == straight

    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert len(row["load"]) == 2 and all(len(layer) == 4 for layer in row["load"])
        assert all(sum(layer) == pytest.approx(1.0, abs=1e-3) for layer in row["load"])
        assert row["aux_loss"] >= 2.0 - 1e-4 and row["z_loss"] > 0 and row["dropped"] == 0  # aux >= k
        assert row["loss"] > row["lm_loss"]
    assert (tmp_path / "straight" / "routing.png").stat().st_size > 0

    model = tmp_path / "straight" / "model"
    image = next((root / "images").iterdir())
    main(["inspect", "routing", str(model), "--image", str(image), "How many shapes are there?",
          "--png", str(tmp_path / "r.png")])
    table = capsys.readouterr().out
    assert "| layer 0 | layer 1 |" in table and table.count("`<image>`") == 9 and "` ASSISTANT`" in table
    assert (tmp_path / "r.png").stat().st_size > 0
    dense = tmp_path / "dense"
    OmniModel.from_preset("tiny", text=dict(n_layers=1), vision=dict(n_layers=1)).save_pretrained(dense)
    with pytest.raises(SystemExit):
        main(["inspect", "routing", str(dense), "hello"])
    assert "dense decoder" in capsys.readouterr().err
