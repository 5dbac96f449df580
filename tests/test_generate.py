"""Generation against references: cached decoding == full forward, greedy ids == transformers'
`generate`, sampling filters == transformers' warpers, stop tokens, streaming, errors."""

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import one_line_error, tiny_hf_configs, tiny_hf_model

from omnilm import OmniConfig, OmniModel
from omnilm.infer import decode_one_token, generate, prefill, sample, stream
from omnilm.infer.generate import decode_static, top_k_filter, top_p_filter
from omnilm.model import StaticKVCache

tf = pytest.importorskip("transformers")


# --- helpers ----------------------------------------------------------------------------------


def tiny_model(token_conv: int = 0) -> OmniModel:
    torch.manual_seed(0)
    model = OmniModel.from_preset("tiny", text=dict(n_layers=2, token_conv=token_conv), vision=dict(n_layers=2))
    return with_random_convs(model).eval()


def with_random_convs(model: OmniModel) -> OmniModel:
    """Token convolutions start at zero (the identity): give them weights that change the logits."""
    with torch.no_grad():
        for layer in model.llm.layers:
            if layer.token_conv is not None:
                layer.token_conv.weight.normal_(std=0.5)
    return model


def tiny_batch(model: OmniModel):
    """Two left-padded prompts: row 0 holds two images, row 1 one image after 6 pads."""
    L, img = model.config.image_seq_len, model.config.image_token_id
    g = torch.Generator().manual_seed(1)
    T = 2 * L + 12
    ids = torch.randint(4, model.config.text.vocab_size, (2, T), generator=g)
    mask = torch.ones_like(ids)
    ids[0, 2:2 + L] = img
    ids[0, L + 10:2 * L + 10] = img
    ids[1, :6], mask[1, :6] = model.config.text.pad_token_id, 0
    ids[1, 8:8 + L] = img
    size = model.config.vision.image_size
    pixels = torch.randn(3, 3, size, size, generator=g)  # row-major: row 0's two, then row 1's
    return ids, pixels, mask


def chain_model(succ: dict[int, int], vocab: int = 64, **text) -> OmniModel:
    """A text model whose greedy next token is succ[current token], whatever came before.

    Every block adds zero (o_proj and down_proj are zero), embeddings are one-hot, and the
    head scores succ[i] after i; a token without a successor scores all ties, so 0 wins.
    """
    cfg = OmniConfig(text=dict(vocab_size=vocab, dim=vocab, n_layers=1, n_heads=2, n_kv_heads=1, mlp_dim=8,
                               max_seq_len=64, eos_token_id=2, pad_token_id=0, **text), vision=None)
    model = OmniModel.from_config(cfg).eval()
    with torch.no_grad():
        for layer in model.llm.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.llm.embed_tokens.weight.copy_(torch.eye(vocab))
        model.lm_head.weight.zero_()
        for a, b in succ.items():
            model.lm_head.weight[b, a] = 1.0
    return model


class ByteTokenizer:
    """Stand-in tokenizer: each id is a fixed byte string; special ids decode to nothing."""

    def __init__(self, pieces: dict[int, bytes], special: tuple[int, ...] = (0, 1, 2)):
        self.pieces, self.special = pieces, special

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        kept = [i for i in ids if not (skip_special_tokens and i in self.special)]
        return b"".join(self.pieces.get(i, b"") for i in kept).decode("utf-8", errors="replace")


def _assert_same_greedy(hf_model, ours: OmniModel, prompt_len: int, **inputs) -> torch.Tensor:
    # transformers fills finished rows with its pad id (0 in these configs); ours reads the same config.
    out = hf_model.generate(**inputs, max_new_tokens=20, do_sample=False, output_scores=True,
                            return_dict_in_generate=True)
    expected = out.sequences[:, prompt_len:]
    # Not knife-edge: on every step, top-1 beats top-2 by far more than fp32 noise.
    top2 = torch.stack(out.scores, 1).topk(2, dim=-1).values
    assert (top2[..., 0] - top2[..., 1]).min() > 1e-4
    got = generate(ours, inputs["input_ids"], inputs.get("pixel_values"), inputs["attention_mask"], max_new_tokens=20)
    assert got.tolist() == expected.tolist()
    return got


# --- 1. cached decoding equals the full forward -----------------------------------------------


@pytest.mark.parametrize("token_conv", [0, 4])
@pytest.mark.parametrize("padded", [True, False])
def test_prefill_and_decode_equal_full_forward(padded, token_conv):
    model = tiny_model(token_conv)
    ids, pixels, mask = tiny_batch(model)
    if not padded:  # one prompt, no attention_mask: the path of a single chat
        ids, pixels, mask = ids[:1], pixels[:2], None
    B, T = ids.shape
    cont = torch.randint(4, 512, (B, 6), generator=torch.Generator().manual_seed(2))
    full_mask = torch.cat([mask, torch.ones_like(cont)], dim=1) if padded else None
    with torch.inference_mode():
        full = model(torch.cat([ids, cont], 1), pixels, full_mask).logits  # (B, T+6, V)

        cache = model.new_cache(B, T + 6)
        steps = [prefill(model, ids, pixels, mask, cache)]
        for j in range(5):
            step_mask = full_mask[:, :T + j + 1] if padded else None
            steps.append(decode_one_token(model, cont[:, j:j + 1], step_mask, cache))
    torch.testing.assert_close(torch.stack(steps, 1), full[:, T - 1:T + 5], atol=1e-5, rtol=0)


@pytest.mark.parametrize("token_conv", [0, 4])
@pytest.mark.parametrize("padded", [True, False])
def test_static_cache_decoding_equals_full_forward(padded, token_conv):
    """The compiled loop's step, run eagerly: fixed shapes (every cache column read under a mask)
    and tensor positions give the logits of the growing cache."""
    model = tiny_model(token_conv)
    ids, pixels, mask = tiny_batch(model)
    if not padded:
        ids, pixels, mask = ids[:1], pixels[:2], None
    B, T = ids.shape
    cont = torch.randint(4, 512, (B, 6), generator=torch.Generator().manual_seed(2))
    full_mask = torch.cat([mask, torch.ones_like(cont)], dim=1) if padded else None
    with torch.inference_mode():
        full = model(torch.cat([ids, cont], 1), pixels, full_mask).logits
        cache = model.new_cache(B, T + 40)  # longer than needed: the unwritten columns stay hidden
        steps = [prefill(model, ids, pixels, mask, cache)]
        static = StaticKVCache(cache, mask)
        steps += [decode_static(model, cont[:, j:j + 1], static) for j in range(5)]
    torch.testing.assert_close(torch.stack(steps, 1), full[:, T - 1:T + 5], atol=1e-5, rtol=0)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile builds its CPU kernels with a C++ compiler, and none is installed")
def test_compiled_decoding_gives_the_eager_tokens():
    """torch.compile of the decoding step (one graph for all steps): the eager loop's tokens, on a
    left-padded batch with images, grouped-query attention and a token convolution, and again from
    the cached graph for a second prompt of the same shape."""
    model = tiny_model(token_conv=4)
    ids, pixels, mask = tiny_batch(model)
    eager = generate(model, ids, pixels, mask, max_new_tokens=12, stop_token_ids=[])
    compiled = generate(model, ids, pixels, mask, max_new_tokens=12, stop_token_ids=[], compile=True)
    assert compiled.tolist() == eager.tolist()
    text = (ids != model.config.image_token_id) & mask.bool()
    ids2 = ids.clone()
    ids2[text] = 4 + ids[text] * 7 % 400  # other words, same shapes
    assert (generate(model, ids2, pixels, mask, max_new_tokens=12, stop_token_ids=[], compile=True).tolist()
            == generate(model, ids2, pixels, mask, max_new_tokens=12, stop_token_ids=[]).tolist())


def test_compiled_decoding_refuses_fusion_that_reads_images_at_every_step():
    torch.manual_seed(0)
    model = OmniModel.from_preset("tiny", fusion="late").eval()
    ids = torch.randint(4, 300, (1, 8))
    one_line_error(lambda: generate(model, ids, max_new_tokens=2, compile=True), "late fusion", "without compile")


def test_chunked_prefill_equals_full_forward():
    model = tiny_model()
    ids, pixels, mask = tiny_batch(model)
    B, T = ids.shape
    c = model.config.image_seq_len + 8  # no image run crosses it: chunk 1 holds row 0's first image and row 1's
    one = torch.ones(B, 1, dtype=mask.dtype)
    next_tok = torch.tensor([[5], [6]])
    with torch.inference_mode():
        full = model(torch.cat([ids, next_tok], 1), pixels, torch.cat([mask, one], 1)).logits  # (B, T+1, V)
        cache = model.new_cache(B, T + 1)
        first = model(ids[:, :c], pixels[[0, 2]], mask[:, :c], cache=cache).logits
        second = model(ids[:, c:], pixels[[1]], mask, cache=cache).logits
        # The same through prefill / decode_one_token, on a fresh cache.
        cache = model.new_cache(B, T + 1)
        last_of_first = prefill(model, ids[:, :c], pixels[[0, 2]], mask[:, :c], cache)
        last = prefill(model, ids[:, c:], pixels[[1]], mask, cache)
        stepped = decode_one_token(model, next_tok, torch.cat([mask, one], 1), cache)
    real = mask.bool()
    torch.testing.assert_close(torch.cat([first, second], 1)[real], full[:, :T][real], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.stack([last_of_first, last, stepped], 1), full[:, [c - 1, T - 1, T]],
                               atol=1e-5, rtol=0)


# --- 2. greedy ids equal transformers' generate -----------------------------------------------


def test_greedy_matches_hf_llama(tmp_path):
    hf_model = tiny_hf_model("llama")  # O(1)-scale random weights, grouped-query attention
    hf_model.save_pretrained(tmp_path)
    ours = OmniModel.from_pretrained(tmp_path).eval()
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[1, :7], mask[1, :7] = 0, 0
    _assert_same_greedy(hf_model, ours, 24, input_ids=ids, attention_mask=mask)
    # One prompt without padding: every decode step attends to all cached keys.
    _assert_same_greedy(hf_model, ours, 24, input_ids=ids[:1], attention_mask=mask[:1])


def test_greedy_matches_hf_llava_two_images(tmp_path):
    torch.manual_seed(0)
    # transformers' own init, seed 0: row 1 greedily emits the image token id mid-generation, which
    # must be embedded as an ordinary token when fed back (no pixel_values in decode steps).
    hf_model = tf.LlavaForConditionalGeneration(tiny_hf_configs()[2]).eval()
    hf_model.save_pretrained(tmp_path)
    ours = OmniModel.from_pretrained(tmp_path).eval()
    L, img = ours.config.image_seq_len, ours.config.image_token_id  # 16, 299
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, img - 1, (2, 50), generator=g)
    mask = torch.ones_like(ids)
    ids[0, 3:3 + L] = img
    ids[0, 25:25 + L] = img  # two images in one prompt
    ids[1, :5], mask[1, :5] = 0, 0
    ids[1, 10:10 + L] = img
    pixels = torch.randn(3, 3, 32, 32, generator=g)
    new = _assert_same_greedy(hf_model, ours, 50, input_ids=ids, pixel_values=pixels, attention_mask=mask)
    assert (new == img).any()
    _assert_same_greedy(hf_model, ours, 50, input_ids=ids[:1], pixel_values=pixels[:2], attention_mask=mask[:1])


# --- 3. sampling ------------------------------------------------------------------------------


def test_sampling_is_reproducible_and_degenerates_to_greedy():
    model = tiny_model()
    ids, pixels, mask = tiny_batch(model)

    def run(seed, **kw):
        return generate(model, ids, pixels, mask, max_new_tokens=8, do_sample=True,
                        generator=torch.Generator().manual_seed(seed), **kw)

    a = run(0, temperature=0.7, top_k=50, top_p=0.9)
    assert torch.equal(a, run(0, temperature=0.7, top_k=50, top_p=0.9))
    assert not torch.equal(a, run(1, temperature=0.7, top_k=50, top_p=0.9))
    greedy = generate(model, ids, pixels, mask, max_new_tokens=8)
    assert torch.equal(run(0, top_k=1, temperature=5.0), greedy)
    assert torch.equal(run(0, top_p=1e-6), greedy)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_top_k_top_p_keep_the_same_tokens_as_hf_warpers(temperature):
    g = torch.Generator().manual_seed(0)
    # Integer-valued logits make ties common, so the boundary rules are exercised.
    logits = torch.cat([torch.randn(4, 100, generator=g) * 3, torch.randint(-4, 4, (4, 100), generator=g).float()])
    temp = tf.TemperatureLogitsWarper(temperature)
    for k in [1, 2, 5, 37, 100, 500]:
        ref = tf.TopKLogitsWarper(k)(None, temp(None, logits.clone()))
        assert torch.equal(top_k_filter(logits / temperature, k).isfinite(), ref.isfinite()), k
    for p in [1e-9, 0.05, 0.3, 0.5, 0.9, 0.999]:
        ref = tf.TopPLogitsWarper(p)(None, temp(None, logits.clone()))
        assert torch.equal(top_p_filter(logits / temperature, p).isfinite(), ref.isfinite()), p
        both = tf.TopPLogitsWarper(p)(None, tf.TopKLogitsWarper(10)(None, temp(None, logits.clone())))
        assert torch.equal(top_p_filter(top_k_filter(logits / temperature, 10), p).isfinite(), both.isfinite())


def test_a_vanishing_temperature_samples_the_argmax():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    for temperature in (1e-300, 1e-45, 1e-8):
        assert torch.equal(sample(logits, True, temperature, top_k=10, top_p=0.9), logits.argmax(-1))


def test_sample_draws_from_the_filtered_distribution():
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, -1.0, -3.0]]).expand(40000, -1)
    draws = sample(logits, do_sample=True, temperature=0.8, top_k=4, top_p=0.9,
                   generator=torch.Generator().manual_seed(0))
    probs = top_p_filter(top_k_filter(logits[:1] / 0.8, 4), 0.9).softmax(-1)[0]
    freq = torch.bincount(draws, minlength=6).float() / len(draws)
    assert (probs[4:] == 0).all() and (freq[4:] == 0).all()
    torch.testing.assert_close(freq, probs, atol=0.01, rtol=0)
    assert torch.equal(sample(logits[:2], do_sample=False), torch.zeros(2, dtype=torch.long))


# --- 4. stop tokens ---------------------------------------------------------------------------


def test_stop_tokens_pad_finished_rows_and_end_early():
    model = chain_model({9: 10, 10: 11, 11: 12, 12: 2, 19: 20, 20: 21, 21: 22, 22: 23, 23: 24, 24: 2})
    ids = torch.tensor([[0, 0, 5, 9], [7, 8, 5, 19]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    # Default stop: the config's eos (2); finished rows get the config's pad (0).
    out = generate(model, ids, attention_mask=mask, max_new_tokens=20)
    assert out.tolist() == [[10, 11, 12, 2, 0, 0], [20, 21, 22, 23, 24, 2]]
    out = generate(model, ids, attention_mask=mask, max_new_tokens=20, stop_token_ids=[11, 22], pad_token_id=7)
    assert out.tolist() == [[10, 11, 7], [20, 21, 22]]
    # A list of eos ids in the config, no pad: finished rows get the first eos, as transformers.
    model.config.text.eos_token_id, model.config.text.pad_token_id = [22, 11], None
    assert generate(model, ids, attention_mask=mask, max_new_tokens=20).tolist() == [[10, 11, 22], [20, 21, 22]]
    # Without a stop, all max_new_tokens come back.
    assert generate(model, ids, attention_mask=mask, max_new_tokens=3, stop_token_ids=[]).shape == (2, 3)


def test_stop_token_on_a_real_model_with_images():
    model = tiny_model()
    ids, pixels, mask = tiny_batch(model)
    free = generate(model, ids, pixels, mask, max_new_tokens=12, stop_token_ids=[])
    row = free[0].tolist()
    k = next(i for i in range(2, 12) if row[i] not in row[:i])  # first fresh token from step 3 on
    stop = row[k]
    pad = next(i for i in range(4, 512) if i not in free)  # a pad id the model never emits here
    out = generate(model, ids, pixels, mask, max_new_tokens=12, stop_token_ids=stop, pad_token_id=pad)
    expected = []
    for r in free.tolist():
        n = r.index(stop) + 1 if stop in r else len(r)
        expected.append(r[:n] + [pad] * (len(r) - n))
    n_steps = max(len(r) - r.count(pad) for r in expected)  # ends early only when both rows stopped
    assert out.tolist() == [r[:n_steps] for r in expected]
    assert out[0, k].item() == stop and (out[0, k + 1:] == pad).all()


# --- 5. streaming -----------------------------------------------------------------------------


def test_stream_holds_back_split_characters():
    # 9 -> h, é split over two tokens, 😀 over three, "!", then eos.
    model = chain_model({9: 10, 10: 11, 11: 12, 12: 13, 13: 14, 14: 15, 15: 16, 16: 2})
    tok = ByteTokenizer({10: b"h", 11: b"\xc3", 12: b"\xa9", 13: b"\xf0\x9f", 14: b"\x98", 15: b"\x80", 16: b"!"})
    ids = torch.tensor([[5, 9]])
    pieces = list(stream(model, tok, ids, max_new_tokens=20))
    assert pieces == ["h", "é", "😀", "!"]
    assert "".join(pieces) == tok.decode(generate(model, ids, max_new_tokens=20)[0].tolist())


def test_stream_joins_to_generate_when_sampling():
    model = tiny_model()
    ids, pixels, mask = tiny_batch(model)
    ids, pixels, mask = ids[1:], pixels[2:], mask[1:]
    # Arbitrary bytes: some ids are lone UTF-8 lead or continuation bytes.
    tok = ByteTokenizer({i: bytes([i % 256]) for i in range(512)})
    kw = dict(max_new_tokens=30, do_sample=True, temperature=2.0, stop_token_ids=[])
    pieces = list(stream(model, tok, ids, pixels, mask, generator=torch.Generator().manual_seed(3), **kw))
    new = generate(model, ids, pixels, mask, generator=torch.Generator().manual_seed(3), **kw)
    assert "".join(pieces) == tok.decode(new[0].tolist())
    assert all(pieces)


def test_stream_with_the_real_tokenizer():
    tokenizer_mod = pytest.importorskip("omnilm.data.tokenizer")
    tok = tokenizer_mod.train_tokenizer(["hello world, hello shapes"] * 4, vocab_size=300)
    new = tok.encode("hé😀 ok", add_bos=False)
    assert len(set(new)) == len(new)
    prompt = tok.encode("hello", add_bos=True)
    succ = dict(zip([prompt[-1]] + new, new + [tok.eos_id]))
    model = chain_model(succ, vocab=tok.vocab_size)
    pieces = list(stream(model, tok, torch.tensor([prompt]), max_new_tokens=20))
    assert "".join(pieces) == "hé😀 ok" and not any("\ufffd" in p for p in pieces)


# --- 6. errors and modes ----------------------------------------------------------------------


def test_errors_are_one_line():
    model = chain_model({})  # max_seq_len 64
    one_line_error(lambda: generate(model, torch.zeros(1, 60, dtype=torch.long), max_new_tokens=10),
                   match=r"60 tokens.*= 70.*max_seq_len=64.*shorten")
    ids = torch.zeros(1, 3, dtype=torch.long)
    one_line_error(lambda: generate(model, ids, do_sample=True, temperature=0.0), match="temperature=0.0 must be > 0")
    one_line_error(lambda: generate(model, ids, do_sample=True, top_p=0.0), match=r"top_p=0.0 must be in \(0, 1\]")
    one_line_error(lambda: generate(model, ids, do_sample=True, top_p=1.5), match="top_p=1.5")
    one_line_error(lambda: generate(model, ids, do_sample=True, top_k=0), match="top_k=0 must be an integer >= 1")
    right_padded = torch.tensor([[1, 1, 0]])
    one_line_error(lambda: generate(model, ids, attention_mask=right_padded), match="pad .* on the left")
    one_line_error(lambda: list(stream(model, None, torch.zeros(2, 3, dtype=torch.long))), match="one prompt")
    assert generate(model, ids, max_new_tokens=0).shape == (1, 0)


def test_generate_restores_training_flags_and_needs_no_grad():
    model = tiny_model()
    ids, pixels, mask = tiny_batch(model)
    expected = generate(model, ids, pixels, mask, max_new_tokens=4)
    model.train()
    model.vision.eval()  # a frozen tower stays as it was
    out = generate(model, ids, pixels, mask, max_new_tokens=4)
    assert torch.equal(out, expected) and not out.requires_grad
    assert model.training and model.llm.training and not model.vision.training


# --- chunked prefill ------------------------------------------------------------------------------


@pytest.mark.parametrize("token_conv", [0, 4])
@pytest.mark.parametrize("chunk, length", [(1, 50), (7, 201), (64, 650), (1024, 1500)])
def test_chunked_prefill_then_decoding_equals_one_full_pass(chunk, length, token_conv):
    """A prompt run through the model `chunk` tokens at a time (lengths that chunks do not divide),
    each chunk attending to the cache with the causal triangle aligned bottom-right and no (T, S)
    mask, gives the full pass's logits and then the same greedy tokens; with token convolutions,
    each chunk's reach back into the one before (chunk 1 and 3 are shorter than its kernel)."""
    torch.manual_seed(0)
    model = OmniModel.from_preset("tiny", text=dict(n_layers=2, max_seq_len=2048, token_conv=token_conv),
                                  vision=dict(n_layers=2))
    model = with_random_convs(model).eval()
    ids = torch.randint(3, model.config.text.vocab_size, (1, length))
    ids[ids == model.config.image_token_id] += 1
    whole, chunked = model.new_cache(1, length), model.new_cache(1, length)
    with torch.no_grad():
        reference = prefill(model, ids, None, None, whole)
        logits = prefill(model, ids, None, None, chunked, chunk=chunk)
    assert (logits - reference).abs().max().item() <= 1e-4
    assert torch.equal(whole.k, chunked.k) or (whole.k - chunked.k).abs().max().item() <= 1e-4
    assert torch.equal(generate(model, ids, max_new_tokens=8, prefill_chunk=chunk), generate(model, ids, max_new_tokens=8))


def test_token_convolution_is_a_causal_depthwise_conv_added_to_the_attention_input():
    """TextConfig.token_conv: each layer's normed input plus a causal depthwise convolution (as
    torch's Conv1d, padded on the left); zero at initialisation, so the model starts as the plain one;
    padding on the left contributes nothing; no transformers class has it."""
    from omnilm.config import ConfigError
    from omnilm.model.hf_config import hf_incompatibility
    from omnilm.model.layers import KVCache

    text = dict(n_layers=2, pad_token_id=0)
    torch.manual_seed(0)
    plain = OmniModel.from_config(replace(OmniConfig.from_preset("tiny", text=text), vision=None)).eval()
    torch.manual_seed(0)
    model = OmniModel.from_config(replace(OmniConfig.from_preset("tiny", text=text | dict(token_conv=3)),
                                          vision=None)).eval()
    ids = torch.randint(4, model.config.text.vocab_size, (1, 40))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)
        with_random_convs(model)
        conv = model.llm.layers[0].token_conv
        D = model.config.text.dim
        reference = torch.nn.Conv1d(D, D, 3, padding=2, groups=D, bias=False)
        reference.weight.copy_(conv.weight)
        x = torch.randn(2, 9, D)
        torch.testing.assert_close(conv(x), x + reference(x.transpose(1, 2))[..., :9].transpose(1, 2))

        padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], 1)
        mask = (torch.arange(45) >= 5).long()[None]
        torch.testing.assert_close(model(padded, attention_mask=mask).logits[:, 5:], model(ids).logits, atol=1e-5, rtol=0)
        assert not torch.equal(model(ids).logits, plain(ids).logits)
    assert torch.equal(generate(model, padded, attention_mask=mask, max_new_tokens=6), generate(model, ids, max_new_tokens=6))
    assert "token convolution" in hf_incompatibility(model.config)
    t = model.config.text
    one_line_error(lambda: prefill(model, ids, None, None, KVCache(2, 1, t.n_kv_heads, t.head_dim, 40)),
                   match="token convolution.*model.new_cache")
    with pytest.raises(ConfigError, match="text.token_conv"):
        OmniConfig.from_preset("tiny", text=dict(token_conv=-1))


def test_chunked_prefill_keeps_each_image_whole():
    """Chunks of 7 would cut the images' 9 tokens: each chunk grows to the end of the image, which is
    encoded once, and the logits are the full pass's (two images, joint fusion)."""
    model = tiny_model()
    cfg = model.config
    L = cfg.image_seq_len
    ids = torch.randint(3, cfg.text.vocab_size, (1, 2 * L + 30), generator=torch.Generator().manual_seed(1))
    ids[ids == cfg.image_token_id] += 1
    ids[0, 5:5 + L] = cfg.image_token_id
    ids[0, 20 + L:20 + 2 * L] = cfg.image_token_id
    pixels = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = prefill(model, ids, pixels, None, model.new_cache(1, ids.shape[1]))
        logits = prefill(model, ids, pixels, None, model.new_cache(1, ids.shape[1]), chunk=7)
    assert (logits - reference).abs().max().item() <= 1e-4
    with pytest.raises(Exception, match="one at a time"):
        prefill(model, ids.repeat(2, 1), pixels.repeat(2, 1, 1, 1), None, model.new_cache(2, ids.shape[1]), chunk=7)


def test_chunked_attention_builds_no_mask_of_the_prompt(monkeypatch):
    """The long path allocates nothing of (chunk x context): SDPA is never handed a mask."""
    import torch.nn.functional as F

    seen = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("attn_mask"))
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = OmniModel.from_preset("tiny", text=dict(n_layers=2), vision=dict(n_layers=2)).eval()
    ids = torch.randint(3, 300, (1, 300))
    ids[ids == model.config.image_token_id] += 1
    with torch.no_grad():
        prefill(model, ids, None, None, model.new_cache(1, 300), chunk=64)
    assert seen and all(mask is None for mask in seen)


def test_chunked_prefill_of_a_text_only_model():
    model = OmniModel.from_config(replace(OmniConfig.from_preset("tiny", text=dict(n_layers=2)), vision=None)).eval()
    ids = torch.randint(4, model.config.text.vocab_size, (1, 100))
    with torch.no_grad():
        reference = prefill(model, ids, None, None, model.new_cache(1, 100))
        logits = prefill(model, ids, None, None, model.new_cache(1, 100), chunk=9)
    assert (logits - reference).abs().max().item() <= 1e-4


def test_log_n_attention_scales_each_query_past_its_length():
    """TextConfig.logn_attention = 64: queries up to position 62 are as before; past it each is
    multiplied by log(p + 1) / log(64), as scaling q_proj's output by hand does (RoPE is linear),
    and chunked prefill keeps it (each chunk's queries at their own positions)."""
    import math

    from omnilm.config import ConfigError
    from omnilm.model.hf_config import hf_incompatibility

    torch.manual_seed(0)
    model = OmniModel.from_config(replace(OmniConfig.from_preset("tiny", text=dict(n_layers=2)), vision=None)).eval()
    ids = torch.randint(4, model.config.text.vocab_size, (1, 200))
    factor = (torch.arange(1, 201).float().log() / math.log(64)).clamp(min=1.0)
    with torch.no_grad():
        plain = model(ids).logits
        hooks = [layer.self_attn.q_proj.register_forward_hook(lambda m, i, out: out * factor[None, :, None])
                 for layer in model.llm.layers]
        by_hand = model(ids).logits
        for hook in hooks:
            hook.remove()
        model.config.text.logn_attention = 64
        scaled = model(ids).logits
        chunked = prefill(model, ids, None, None, model.new_cache(1, 200), chunk=48)
    assert torch.equal(scaled[:, :63], plain[:, :63]) and (scaled[:, 100:] - plain[:, 100:]).abs().max() > 1e-3
    assert (scaled - by_hand).abs().max().item() <= 1e-5
    assert (chunked.reshape(1, -1) - scaled[:, -1]).abs().max().item() <= 1e-4
    assert "log-n" in hf_incompatibility(model.config)
    with pytest.raises(ConfigError, match="text.logn_attention"):
        OmniConfig.from_preset("tiny", text=dict(logn_attention=1))


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak memory is read from Linux's /proc")
def test_a_long_prompt_prefills_in_linear_memory():
    """8,192 tokens in chunks of 1,024 on the tiny model: the peak resident memory rises by the KV
    cache (32 MiB) and one chunk's activations, about 90 MiB in all; a whole (T x T) mask, as float,
    would be 256 MiB alone. benchmarks/long_context.py runs to 128k tokens (+800 MiB, linear)."""
    model = OmniModel.from_preset("tiny", text=dict(max_seq_len=8192), vision=dict(n_layers=2)).eval()
    ids = torch.randint(4, model.config.text.vocab_size, (1, 8192), generator=torch.Generator().manual_seed(0))

    def peak_mib() -> float:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024

    Path("/proc/self/clear_refs").write_text("5")  # the peak starts again from here
    before = peak_mib()
    with torch.no_grad():
        prefill(model, ids, None, None, model.new_cache(1, 8192), chunk=1024)
    assert peak_mib() - before < 200
