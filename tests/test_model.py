"""The assembled model on its own: presets, meta construction, image placement and its errors."""

import pytest
import torch
from conftest import one_line_error, rss_bytes

from omnilm import OmniConfig, OmniInputError, OmniModel
from omnilm.config import IGNORE_INDEX


def small_model(**overrides) -> OmniModel:
    torch.manual_seed(0)
    return OmniModel.from_preset("tiny", text=dict(n_layers=2), vision=dict(n_layers=2), **overrides).eval()


def test_meta_preset_allocates_nothing():
    before = rss_bytes()
    model = OmniModel.from_preset("llava-1.5-13b", device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert rss_bytes() - before < 200 * 2**20  # 13B fp32 parameters would be 53 GB


def test_preset_overrides_and_unknown_fields():
    model = OmniModel.from_preset("tiny", device="meta", text=dict(n_layers=2), image_token_id=5)
    assert len(model.llm.layers) == 2 and model.config.image_token_id == 5
    assert model.config.vision.n_layers == OmniConfig.from_preset("tiny").vision.n_layers
    with pytest.raises(ValueError, match="unknown text config field.*n_layer"):
        OmniModel.from_preset("tiny", device="meta", text=dict(n_layer=2))
    with pytest.raises(ValueError, match="unknown preset 'llava-9b'"):
        OmniModel.from_preset("llava-9b", device="meta")


def test_tied_embeddings_share_one_tensor():
    model = OmniModel.from_preset("tiny", text=dict(tie_embeddings=True))
    assert model.lm_head.weight is model.llm.embed_tokens.weight
    untied = OmniModel.from_preset("tiny")
    assert untied.num_parameters() - model.num_parameters() == model.lm_head.weight.numel()


def _prompt_with_images(model: OmniModel, n_markers: int, T: int = 160) -> torch.Tensor:
    L, img = model.config.image_seq_len, model.config.image_token_id
    ids = torch.randint(4, model.config.text.vocab_size, (1, T))
    for i in range(n_markers):
        ids[0, 2 + i * (L + 3): 2 + i * (L + 3) + L] = img
    return ids


def test_images_land_at_their_markers_in_order():
    model = small_model()
    ids = _prompt_with_images(model, 2)
    size = model.config.vision.image_size
    a, b = torch.randn(2, 3, size, size).unbind(0)
    with torch.no_grad():
        x_ab = model.embed(ids, torch.stack([a, b]))
        x_ba = model.embed(ids, torch.stack([b, a]))
        feats = model.encode_images(torch.stack([a, b]))
    L = model.config.image_seq_len
    pos = (ids[0] == model.config.image_token_id).nonzero().squeeze(1)
    torch.testing.assert_close(x_ab[0, pos[:L]], feats[0])
    torch.testing.assert_close(x_ab[0, pos[L:]], feats[1])
    torch.testing.assert_close(x_ba[0, pos[:L]], feats[1])
    text = ids[0] != model.config.image_token_id
    torch.testing.assert_close(x_ab[0, text], x_ba[0, text])  # text embeddings untouched


@pytest.mark.parametrize("n_images", [1, 3])
def test_wrong_image_count_is_one_line_error(n_images):
    model = small_model()
    ids = _prompt_with_images(model, 2)
    size = model.config.vision.image_size
    with pytest.raises(OmniInputError) as e:
        model(ids, torch.randn(n_images, 3, size, size))
    msg = str(e.value)
    assert "\n" not in msg and f"{n_images} image(s)" in msg and f"{2 * model.config.image_seq_len} image tokens" in msg


def test_images_of_the_wrong_size_are_one_line_error():
    model = small_model()
    with pytest.raises(OmniInputError, match=r"pixel_values are \(1, 3, 32, 32\).*\(N, 3, 96, 96\).*processor") as e:
        model(_prompt_with_images(model, 1), torch.randn(1, 3, 32, 32))
    assert "\n" not in str(e.value)


def test_bf16_model_is_allocated_in_bf16():
    model = OmniModel.from_preset("tiny", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.llm.layers[0].input_layernorm.weight.float().eq(1).all()  # initialised, not garbage


def test_markers_without_images_is_an_error():
    model = small_model()
    with pytest.raises(OmniInputError, match="no pixel_values"):
        model(_prompt_with_images(model, 1))


def test_logits_at_gives_each_rows_own_position():
    torch.manual_seed(0)
    model = OmniModel.from_preset("tiny", text=dict(n_layers=1), vision=None).eval()
    ids = torch.randint(4, 100, (3, 7))
    at = torch.tensor([6, 2, 4])
    with torch.no_grad():
        full = model(ids).logits
        picked = model(ids, logits_at=at).logits
    assert picked.shape == (3, 1, full.shape[-1])
    torch.testing.assert_close(picked[:, 0], full[torch.arange(3), at])


def test_loss_ignores_masked_labels():
    model = small_model()
    ids = torch.randint(4, 512, (2, 12))
    labels = ids.clone()
    labels[:, :6] = IGNORE_INDEX
    out = model(ids, labels=labels)
    logp = out.logits[:, :-1].log_softmax(-1)
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)[:, 5:]  # targets at positions 6.. only
    torch.testing.assert_close(out.loss, nll.mean())


def test_loss_only_is_the_same_loss_and_gradients_without_logits():
    # Training's path: the head runs at the positions with a target alone.
    model = small_model()
    ids = torch.randint(4, 512, (2, 12))
    labels = ids.clone()
    labels[0, :7] = IGNORE_INDEX
    labels[1, 3:9] = IGNORE_INDEX
    full = model(ids, labels=labels)
    full.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    out = model(ids, labels=labels, loss_only=True)
    out.loss.backward()
    assert out.logits is None
    torch.testing.assert_close(out.loss, full.loss)
    for name, p in model.named_parameters():
        if name in grads:
            torch.testing.assert_close(p.grad, grads[name], msg=name)
    with pytest.raises(ValueError, match="pass labels"):
        model(ids, loss_only=True)



def test_cpu_training_picks_the_math_kernel_for_short_sequences_only():
    from torch.nn.attention import SDPBackend

    from omnilm.model.layers import CPU_MATH_ATTENTION_MAX_LEN, sdpa_backend

    short, long = (torch.randn(2, 4, n, 16) for n in (CPU_MATH_ATTENTION_MAX_LEN, CPU_MATH_ATTENTION_MAX_LEN + 1))
    assert sdpa_backend(short.requires_grad_(), short) == SDPBackend.MATH
    assert sdpa_backend(long.requires_grad_(), long) is None
    with torch.no_grad():  # inference keeps PyTorch's choice
        assert sdpa_backend(short, short) is None


def test_the_math_kernel_gives_the_flash_kernels_outputs_and_gradients(monkeypatch):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from omnilm.model import layers
    from omnilm.model.layers import Attention, decoder_mask, sdpa_backend

    torch.manual_seed(0)
    attention = Attention(dim=64, n_heads=4, n_kv_heads=2, head_dim=16, bias=False)
    x = torch.randn(3, 40, 64)
    real = torch.arange(40)[None, :] < torch.tensor([[40], [35], [10]])  # right padding
    mask = decoder_mask(real.long(), 40, 0)
    assert sdpa_backend(x.requires_grad_(), x) == SDPBackend.MATH  # what runs unforced below

    def forward_backward() -> list[torch.Tensor]:
        leaf = x.detach().requires_grad_()
        attention.zero_grad()
        y = attention(leaf, mask=mask)
        (y * real[..., None]).square().sum().backward()
        return [y.detach(), leaf.grad, *(p.grad for p in attention.parameters())]

    ours = forward_backward()
    monkeypatch.setattr(layers, "CPU_MATH_ATTENTION_MAX_LEN", 0)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        flash = forward_backward()
    assert not torch.equal(ours[0], flash[0])  # two kernels ran: they round differently
    for a, b in zip(ours, flash):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cls, fields, words", [
    ("TextConfig", dict(dim=0), "text.dim=0 must be an integer"),
    ("TextConfig", dict(n_heads="8"), "text.n_heads='8'"),
    ("TextConfig", dict(vocab_size=True), "text.vocab_size=True"),
    ("TextConfig", dict(norm_eps=float("nan")), "text.norm_eps=nan must be a finite number > 0"),
    ("TextConfig", dict(rope_theta=1.0), "text.rope_theta=1.0 must be > 1"),
    ("TextConfig", dict(pad_token_id=32000), "text.pad_token_id=32000 must be a token id from 0 to 31999"),
    ("TextConfig", dict(eos_token_id=[2, -1]), "text.eos_token_id[1]=-1"),
    ("TextConfig", dict(dim=100), "text.dim=100 is not a multiple of n_heads=32"),
    ("TextConfig", dict(rope_scaling="linear"), "text.rope_scaling='linear' must be null or an object"),
    ("TextConfig", dict(rope_scaling={"rope_type": "linear"}), "needs factor"),
    ("TextConfig", dict(attention_bias="no"), "text.attention_bias='no' must be true or false"),
    ("TextConfig", dict(n_experts="8"), "text.n_experts='8'"),
    ("VisionConfig", dict(image_std=(1, 0, 1)), "vision.image_std=(1, 0, 1) must be > 0"),
    ("VisionConfig", dict(image_mean="abc"), "vision.image_mean='abc' must be 3 finite numbers"),
    ("VisionConfig", dict(patch_size=400), "at least one patch"),
    ("VisionConfig", dict(dim=100), "vision.dim=100 is not a multiple of n_heads=16"),
    ("VisionConfig", dict(act="relu"), "vision.act='relu' must be one of"),
    ("ClipTextConfig", dict(eos_token_id=None), "text.eos_token_id=None"),
    ("ClipConfig", dict(embed_dim=-1), "embed_dim=-1"),
    ("OmniConfig", dict(image_token_id=-1), "image_token_id=-1"),
    ("OmniConfig", dict(text=[1]), "text=[1] must be an object"),
    ("OmniConfig", dict(projector_bias="yes"), "projector_bias='yes'"),
    ("OmniConfig", dict(text=dict(head_dim=7)), "text.head_dim=7 must be even"),
])
def test_config_values_are_checked_before_any_tensor(cls, fields, words):
    # Each wrong value fails at the config, naming its field as omnilm.json spells it and what it must be.
    from omnilm import config

    with pytest.raises(config.ConfigError) as info:
        getattr(config, cls)(**fields)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_config_names_agree_with_the_model_code():
    from omnilm.config import ACTIVATION_NAMES
    from omnilm.model.layers import ACTIVATIONS

    assert set(ACTIVATION_NAMES) == set(ACTIVATIONS)


def test_the_feature_cache_runs_a_frozen_tower_once_per_image_until_its_weights_change():
    from omnilm.model.vision import FeatureCache

    model = small_model().requires_grad_(False)
    size = model.config.vision.image_size
    images = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    batch = images[[0, 1, 0, 2]]
    plain = model.image_features(batch)
    runs = []
    model.vision.register_forward_hook(lambda module, inputs, output: runs.append(len(inputs[0])))
    model.feature_cache = FeatureCache(2**30)
    torch.testing.assert_close(model.image_features(batch), plain, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.image_features(batch[[3, 2, 1, 0]]), plain[[3, 2, 1, 0]], rtol=0, atol=1e-6)
    assert runs == [4] and len(model.feature_cache) == 3  # the second batch came from the cache alone
    model.image_features(images[[3, 0]])
    assert runs == [4, 1] and (model.feature_cache.hits, model.feature_cache.misses) == (5, 5)

    with torch.no_grad():  # new weights (a load, a step): the cache starts again
        model.vision.pre_layrnorm.weight.mul_(2.0)
    model.feature_cache, cached = None, model.feature_cache
    changed = model.image_features(batch)
    model.feature_cache = cached
    assert (changed - plain).abs().max() > 1e-3
    torch.testing.assert_close(model.image_features(batch), changed, rtol=0, atol=1e-6)
    assert runs[-1] == 4 and len(cached) == 3

    row = plain[0].numel() * plain.element_size() + model.config.vision.dim * plain.element_size()
    model.feature_cache = FeatureCache(max_bytes=row)  # room for one image: the rest are encoded each time
    torch.testing.assert_close(model.image_features(batch), changed, rtol=0, atol=1e-6)
    assert len(model.feature_cache) == 1 and model.feature_cache.bytes <= row
    model.vision.train()
    with pytest.raises(RuntimeError, match="this tower trains"):
        model.image_features(batch)


def test_a_grown_token_convolution_starts_as_the_identity_and_round_trips(tmp_path):
    model = small_model()
    ids = torch.randint(4, 512, (2, 10))
    with torch.no_grad():
        before = model(ids).logits
        model.add_token_conv(5)
        torch.testing.assert_close(model(ids).logits, before)  # zero-initialised: the same function
        for layer in model.llm.layers:
            layer.token_conv.weight.normal_()
        after = model(ids).logits
    assert not torch.allclose(after, before)
    model.save_pretrained(tmp_path)
    again = OmniModel.from_pretrained(tmp_path).eval()
    assert again.config.text.token_conv == 5
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, after)
    one_line_error(lambda: model.add_token_conv(3), "token convolution already", "token_conv 5")
    with pytest.raises(ValueError, match="token_conv"):
        small_model().add_token_conv(1000)


def test_add_tokens_grows_the_vocabulary_and_keeps_fixed_rows_apart(tmp_path):
    # New ids get random rows as long as the others; the old ids' logits are what they were; fixed ids
    # are the vocabulary's tail, counted in text.fixed_tokens, and saved so.
    model = small_model().eval()
    ids = torch.randint(4, 512, (2, 10))
    with torch.no_grad():
        before = model(ids).logits
    vocab, width = model.config.text.vocab_size, model.config.text.dim
    model.add_tokens(3)
    model.add_tokens(5, fixed=True, seed=1)
    t = model.config.text
    assert (t.vocab_size, t.fixed_tokens) == (vocab + 8, 5)
    assert model.llm.embed_tokens.weight.shape == model.lm_head.weight.shape == (vocab + 8, width)
    with torch.no_grad():
        after = model(ids).logits
        new = model(torch.tensor([[vocab, vocab + 7]])).logits
    torch.testing.assert_close(after[..., :vocab], before)
    assert torch.isfinite(new).all()
    rows = model.llm.embed_tokens.weight.detach()
    lengths = rows[vocab:].norm(dim=1)
    torch.testing.assert_close(lengths, torch.full_like(lengths, lengths[0].item()))  # one length: the old mean
    assert abs(lengths[0] - rows[:vocab].norm(dim=1).mean()) < 1e-4
    assert not torch.allclose(rows[vocab], rows[vocab + 3])
    model.save_pretrained(tmp_path)
    again = OmniModel.from_pretrained(tmp_path)
    assert again.config.text.fixed_tokens == 5
    torch.testing.assert_close(again.lm_head.weight, model.lm_head.weight)
    one_line_error(lambda: model.add_tokens(2), "fixed tokens", "before them")
    one_line_error(lambda: model.add_tokens(0), "add_tokens(0)")


def test_add_tokens_in_a_subspace():
    # dims=4: the new rows, embedding and output alike, span 4 dimensions, at the old rows' mean length.
    model = small_model()
    vocab, width = model.config.text.vocab_size, model.config.text.dim
    model.add_tokens(50, fixed=True, dims=4)
    for weight in (model.llm.embed_tokens.weight, model.lm_head.weight):
        rows = weight.detach()[vocab:]
        assert torch.linalg.matrix_rank(rows) == 4
        torch.testing.assert_close(rows.norm(dim=1), torch.full((50,), weight.detach()[:vocab].norm(dim=1).mean().item()))
    embed, head = model.llm.embed_tokens.weight.detach()[vocab:], model.lm_head.weight.detach()[vocab:]
    torch.testing.assert_close(embed / embed.norm(dim=1, keepdim=True), head / head.norm(dim=1, keepdim=True))
    for dims in (0, width + 1):
        one_line_error(lambda: small_model().add_tokens(3, dims=dims), f"dims={dims}", str(width))
