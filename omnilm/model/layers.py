"""Building blocks shared by every tower: norms, rotary embeddings, attention, MLPs, KV cache.

Shape letters: B batch, T query length, S key length (past + current), D model width,
H query heads, Hkv key/value heads, hd head dim.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from omnilm.config import TextConfig
from omnilm.errors import OmniInputError

# Longest key length at which, on CPU and under autograd, SDPA runs its math kernel instead of
# its flash kernel, whose CPU backward is slower on short sequences (`python benchmarks/attention.py`;
# the timings: docs/results.md, "Attention kernels on CPU").
CPU_MATH_ATTENTION_MAX_LEN = 128


def sdpa_backend(q: torch.Tensor, k: torch.Tensor) -> SDPBackend | None:
    """The SDPA kernel to force for this call, None to let PyTorch choose: the math kernel for
    short sequences trained on CPU (see CPU_MATH_ATTENTION_MAX_LEN)."""
    training = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    if q.device.type == "cpu" and training and k.shape[-2] <= CPU_MATH_ATTENTION_MAX_LEN:
        return SDPBackend.MATH
    return None


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    # OpenAI CLIP's sigmoid approximation of GELU; CLIP weights were trained with it.
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": F.gelu, "quick_gelu": quick_gelu, "silu": F.silu}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the gain, as LLaMA (and HF) do, so bf16 matches.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


# --- rotary position embeddings (Su et al. 2021) ----------------------------------------------


def rope_frequencies(cfg: TextConfig, seq_len: int, device=None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (hd/2,) and the cos/sin scale for `cfg`'s rope scaling.

    Scalings follow transformers' definitions: `linear` (position interpolation), `dynamic`
    (NTK-aware base growth once `seq_len` exceeds `max_seq_len`), `yarn` (Peng et al. 2023)
    and `llama3` (wavelength-banded interpolation).
    """
    dim, base = cfg.head_dim, cfg.rope_theta
    scaling = dict(cfg.rope_scaling or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim

    if kind == "default":
        return 1.0 / base**exponents, 1.0
    factor = scaling.get("factor")
    if kind == "linear":
        return 1.0 / base**exponents / factor, 1.0
    if kind == "dynamic":
        # The base grows only when the sequence outgrows the trained length.
        n = max(seq_len, cfg.max_seq_len)
        base = base * ((factor * n / cfg.max_seq_len) - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / base**exponents, 1.0

    original = scaling.get("original_max_position_embeddings") or cfg.max_seq_len
    if kind == "yarn":
        if factor is None:
            factor = cfg.max_seq_len / original

        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attn_factor = scaling.get("attention_factor")
        if attn_factor is None:
            m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
            attn_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
        beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

        def correction_dim(n_rotations: float) -> float:
            # The dimension whose wavelength completes `n_rotations` turns over the original context.
            return dim * math.log(original / (n_rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
        extrapolate = 1 - ramp  # 1: keep the frequency (high freq), 0: interpolate (low freq)
        pos_freqs = base**exponents
        inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
        return inv_freq, float(attn_factor)
    if kind == "llama3":
        inv_freq = 1.0 / base**exponents
        low_wavelen = original / scaling["low_freq_factor"]
        high_wavelen = original / scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - scaling["low_freq_factor"]) / (
            scaling["high_freq_factor"] - scaling["low_freq_factor"]
        )
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    raise ValueError(f"unsupported rope scaling {kind!r}; omnilm supports default, linear, dynamic, yarn, llama3")


class Rope(NamedTuple):
    """What a decoder's positions do to its queries and keys: cos and sin tables (B, T, hd) in fp32,
    and, with log-n attention scaling, each query's factor (B, T) (None: 1 everywhere)."""

    cos: torch.Tensor
    sin: torch.Tensor
    query_scale: torch.Tensor | None = None


def rope_cos_sin(cfg: TextConfig, positions: torch.Tensor) -> Rope:
    """RoPE's tables for integer `positions` (B, T), and `cfg.logn_attention`'s query factors."""
    seq_len = int(positions.max()) + 1 if cfg.rope_scaling else 0  # only `dynamic` reads it
    inv_freq, scale = rope_frequencies(cfg, seq_len, positions.device)
    freqs = positions.float()[..., None] * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # LLaMA-HF layout: rotate the two halves
    query_scale = None
    if cfg.logn_attention:  # log(p + 1) / log(n0) past n0, 1 up to it
        query_scale = ((positions.float() + 1).log() / math.log(cfg.logn_attention)).clamp(min=1.0)
    return Rope(emb.cos() * scale, emb.sin() * scale, query_scale)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, hd) by cos/sin (B, T, hd)."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# --- attention --------------------------------------------------------------------------------


class KVCache:
    """Pre-allocated keys and values for all layers: (L, B, Hkv, max_len, hd) each.

    Layers write their new keys at [seen, seen + T) and read [0, seen + T); the decoder calls
    `advance(T)` once all layers have run. With `conv_dim` (a decoder with `TextConfig.token_conv`)
    it also keeps each layer's token-convolution inputs, (L, B, 1, max_len, D), read by `window`.
    """

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device=None, conv_dim: int = 0):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.x = torch.zeros(shape[:2] + (1, max_len, conv_dim), dtype=dtype, device=device) if conv_dim else None
        self.max_len = max_len
        self.seen = 0
        # Images a fusion mode reads from beside the sequence (late, cross_attention): set by the
        # model when the prompt's images are encoded, read again at every decoding step.
        self.media = None

    def _room(self, T: int) -> int:
        return _room(self.seen + T, self.max_len)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self._room(k.shape[2])
        self.k[layer, :, :, self.seen:end] = k
        self.v[layer, :, :, self.seen:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def window(self, layer: int, x: torch.Tensor, back: int) -> torch.Tensor:
        """Store `x` (B, T, D), the inputs of `layer`'s token convolution at the next T positions, and
        return them after the `back` inputs before them (B, back + T, D): zeros before the sequence."""
        end = self._room(x.shape[1])
        store = _conv_store(self.x)[layer, :, 0]  # (B, max_len, D)
        store[:, self.seen:end] = x
        begin = self.seen - back
        return F.pad(store[:, max(begin, 0):end], (0, 0, max(-begin, 0), 0))

    def advance(self, n: int) -> None:
        self.seen += n

    def positions(self, T: int) -> torch.Tensor:
        """Sequence indices (T,) of the next T tokens, the same in every row."""
        return torch.arange(self.seen, self.seen + T, device=self.k.device)


def _room(end: int, max_len: int) -> int:
    """`end`, the position a write reaches, once checked against the cache's length."""
    if end > max_len:
        raise OmniInputError(f"KV cache holds {max_len} positions but {end} are needed: allocate a longer cache")
    return end


def _conv_store(x: torch.Tensor | list[torch.Tensor] | None) -> torch.Tensor | list[torch.Tensor]:
    if x is None:
        raise OmniInputError("this decoder has a token convolution (text.token_conv) but its cache keeps no inputs "
                             "for it: make the cache with model.new_cache, or give it conv_dim=text.dim")
    return x


class RaggedKVCache:
    """The cache of a serving engine's running batch: rows that each hold a sequence of their own
    length, decoded together. Row b writes its T new tokens at [lengths[b], lengths[b] + T) and
    attends to its own positions only; positions are per row, with no padding anywhere.

    `k`, `v` (L, B, Hkv, max_len, hd) are usually views of a larger store that the engine owns;
    `media` the rows' images for late and cross-attention fusion (one `Media` for the batch);
    `x` (L, B, 1, max_len, D) the token-convolution inputs of a decoder with `TextConfig.token_conv`.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor, lengths: list[int], media=None,
                 x: torch.Tensor | None = None):
        self.k, self.v, self.media, self.x = k, v, media, x
        self.max_len = k.shape[3]
        self.lengths = torch.tensor(lengths, dtype=torch.long, device=k.device)
        self._shortest, self._longest = min(lengths), max(lengths)  # on the host: no device sync per layer

    @property
    def seen(self) -> int:
        """The shortest row's length: 0 only when some row starts empty."""
        return self._shortest

    def positions(self, T: int) -> torch.Tensor:
        """Each row's sequence indices (B, T) for its next T tokens."""
        return self.lengths[:, None] + torch.arange(T, device=self.lengths.device)

    def mask(self, T: int) -> torch.Tensor | None:
        """(B, 1, T, S): the query at row b's position p sees that row's keys 0..p, nothing beyond.
        None for rows of one length, as `decoder_mask` gives without padding (the causal triangle
        aligned bottom-right is then every row's), so that a batch of one computes what `generate` does."""
        if self._shortest == self._longest:
            return None
        keys = torch.arange(self._longest + T, device=self.lengths.device)
        return (keys[None, None, :] <= self.positions(T)[:, :, None])[:, None]

    def _room(self, T: int) -> int:
        return _room(self._longest + T, self.max_len)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, _, T, _ = k.shape
        end = self._room(T)
        rows = torch.arange(B, device=k.device)[:, None]
        cols = self.positions(T)
        self.k[layer][rows, :, cols] = k.transpose(1, 2)  # (B, T, Hkv, hd) into each row's own columns
        self.v[layer][rows, :, cols] = v.transpose(1, 2)
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def window(self, layer: int, x: torch.Tensor, back: int) -> torch.Tensor:
        """As `KVCache.window`, each row at its own position."""
        B, T, _ = x.shape
        self._room(T)
        store = _conv_store(self.x)[layer, :, 0]  # (B, max_len, D)
        rows = torch.arange(B, device=x.device)[:, None]
        store[rows, self.positions(T)] = x
        read = self.lengths[:, None] + torch.arange(-back, T, device=x.device)  # (B, back + T)
        return store[rows, read.clamp(min=0)] * (read >= 0)[..., None].to(x.dtype)

    def advance(self, n: int) -> None:
        self.lengths += n
        self._shortest += n
        self._longest += n


class StaticKVCache:
    """A prefilled `KVCache` seen by a compiled decoding step (as in PyTorch's gpt-fast, 2023): every
    index is a tensor and every shape fixed, so one graph serves each step and nothing asks the
    host where the sequence stands.

    It starts from a copy of the prefilled cache. The next token of every row goes to column `column`
    (a (1,) tensor, the same in all rows: prompts are left-padded to one length) and has position
    `position[b]` (B,), row b's real tokens so far. Attention reads all `max_len` columns under a
    mask that hides padding and the columns not written yet, so its shapes never change; keys the
    mask hides weigh nothing, and the answer is the growing cache's.
    """

    def __init__(self, cache: KVCache, attention_mask: torch.Tensor | None = None):
        # A tensor of its own per layer: a compiled step that writes into views of one (L, ...) store
        # copies the whole store at each write.
        self.k, self.v = [k.clone() for k in cache.k], [v.clone() for v in cache.v]
        self.x = [x.clone() for x in cache.x] if cache.x is not None else None
        self.media, self.max_len = cache.media, cache.max_len
        B, device = cache.k.shape[1], cache.k.device
        seen = cache.seen
        if attention_mask is None:
            attention_mask = torch.ones(B, seen, dtype=torch.long, device=device)
        if attention_mask.shape != (B, seen):
            raise OmniInputError(f"attention_mask {tuple(attention_mask.shape)} does not cover the {seen} cached "
                                 f"positions of {B} rows: pass the prompt's mask, (batch, cached positions)")
        self.real = torch.ones(B, cache.max_len, dtype=torch.bool, device=device)
        self.real[:, :seen] = attention_mask.bool()
        self.column = torch.tensor([seen], device=device)
        self.position = attention_mask.long().sum(-1)

    def positions(self, T: int) -> torch.Tensor:
        """Each row's position ids (B, T) for its next T tokens."""
        return self.position[:, None] + torch.arange(T, device=self.position.device)

    def mask(self, T: int) -> torch.Tensor:
        """(B, 1, T, max_len): the query in column c sees the real columns up to c."""
        keys = torch.arange(self.max_len, device=self.real.device)
        queries = self.column + torch.arange(T, device=self.real.device)  # (T,)
        return (self.real[:, None, :] & (keys <= queries[:, None]))[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        columns = self.column + torch.arange(k.shape[2], device=k.device)
        self.k[layer].index_copy_(2, columns, k)
        self.v[layer].index_copy_(2, columns, v)
        return self.k[layer], self.v[layer]

    def window(self, layer: int, x: torch.Tensor, back: int) -> torch.Tensor:
        """As `KVCache.window`, at `column`."""
        store = _conv_store(self.x)[layer][:, 0]  # (B, max_len, D)
        store.index_copy_(1, self.column + torch.arange(x.shape[1], device=x.device), x)
        read = self.column + torch.arange(-back, x.shape[1], device=x.device)  # (back + T,)
        return store[:, read.clamp(min=0)] * (read >= 0)[None, :, None].to(x.dtype)

    def advance(self, n: int) -> None:
        self.column += n
        self.position += n


class TokenConv(nn.Module):
    """A short causal convolution along the sequence, added to its input: channel c of token t
    becomes x[t, c] + sum_j w[c, 0, j] x[t - kernel + 1 + j, c], over that token and the kernel - 1
    before it (depthwise, no bias; zeros before the sequence's start). Zero-initialised: it starts as
    the identity.

    Before attention it gives each position its neighbours' tokens, so that one attention layer can
    match a key written a few tokens before the value it tags, the associative recall that attention
    alone learns slowly, through a two-layer induction circuit (Canon layers, Allen-Zhu 2025, arXiv
    2512.17351; the short convolutions of H3, Fu et al. 2023; Primer's depthwise convolutions, So et
    al. 2021). docs/long-context.md, "Token convolutions".
    """

    def __init__(self, dim: int, kernel: int):
        super().__init__()
        self.kernel = kernel
        self.weight = nn.Parameter(torch.zeros(dim, 1, kernel))  # nn.Conv1d's layout, groups = dim

    def forward(self, x: torch.Tensor, tokens: torch.Tensor | None = None, cache: KVCache | RaggedKVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D). `tokens` (B, T) marks real tokens (padding contributes nothing);
        a `cache` brings the inputs of the positions before x and keeps x's for the next call."""
        real = x if tokens is None else x * tokens[..., None].to(x.dtype)
        back = self.kernel - 1
        window = F.pad(real, (0, 0, back, 0)) if cache is None else cache.window(layer, real, back)
        return x + F.conv1d(window.transpose(1, 2), self.weight, groups=x.shape[-1]).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head attention with grouped-query heads (Ainslie et al. 2023) through SDPA.

    Serves the CLIP encoder (bias, no rotary, no mask), the LLaMA decoder (rotary, causal,
    KV cache) and cross-attention (keys and values from a `context` (B, S, D) instead of x:
    the perceiver resampler and Flamingo's gated layers). `mask` is boolean (B, 1, T, S), True
    where a query may attend. Inside `record_attention` it also hands out its probabilities.
    """

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, bias: bool):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=bias)
        # Inside `record_attention` a list: attention is then computed explicitly and its
        # probabilities appended here. None everywhere else: SDPA, and nothing is kept.
        self.recorded: list[torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, rope: Rope | None = None,
                mask: torch.Tensor | None = None, is_causal: bool = False,
                cache: KVCache | None = None, layer: int = 0, context: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        kv = x if context is None else context
        S = kv.shape[1]
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(kv).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, S, hd)
        v = self.v_proj(kv).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, rope.cos, rope.sin), apply_rope(k, rope.cos, rope.sin)
            if rope.query_scale is not None:
                q = q * rope.query_scale[:, None, :, None].to(q.dtype)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, Hkv, S, hd)
        if self.recorded is not None:  # inside record_attention: what SDPA computes, its probabilities kept
            probs = attention_probs(q, k, mask, is_causal)
            self.recorded.append(probs)
            y = probs.to(v.dtype) @ v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        else:
            # SDPA broadcasts each key/value head over its group of query heads itself (no copy).
            kwargs = {"enable_gqa": True} if self.n_kv_heads != self.n_heads else {}
            backend = sdpa_backend(q, k)
            with sdpa_kernel(backend) if backend is not None else nullcontext():
                if is_causal and mask is None:
                    y = causal_attention(q, k, v, **kwargs)
                else:
                    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kwargs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


def attention_probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None,
                    is_causal: bool = False) -> torch.Tensor:
    """The probabilities SDPA weighs the values with, written out: softmax(q k^T / sqrt(hd) + mask),
    (B, H, T, S) in fp32, for q (B, H, T, hd) and k (B, Hkv, S, hd). Query head h reads key head
    h // (H / Hkv), as SDPA's `enable_gqa` does; `is_causal` without a mask aligns the triangle
    bottom-right, as `causal_attention` does (T queries, the last of S positions)."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = q.float() @ k.float().transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    T, S = scores.shape[-2:]
    if is_causal and mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1)


@contextmanager
def record_attention(model: nn.Module) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Inside the block, every `Attention` of `model` computes softmax(q k^T / sqrt(hd) + mask) @ v
    itself instead of calling SDPA (the same outputs, to float rounding) and appends the
    probabilities (B, H, T, S) of each call to `records[name]`, named as in `model.named_modules()`.
    They stay in the autograd graph when gradients are on, so a gradient with respect to them is
    one of the model's output. Outside the block nothing changes and nothing is computed."""
    modules = [(name, m) for name, m in model.named_modules() if isinstance(m, Attention)]
    records: dict[str, list[torch.Tensor]] = {}
    for name, m in modules:
        m.recorded = records.setdefault(name, [])
    try:
        yield records
    finally:
        for _, m in modules:
            m.recorded = None


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, enable_gqa: bool = False) -> torch.Tensor:
    """Causal attention of T queries, the last T of the S keys' positions (a prompt's next chunk over
    the cache, or all of it when T == S): query i sees keys 0 .. S - T + i, the triangle aligned
    bottom-right. Memory stays linear in S: no (T, S) mask is built.

    SDPA's `is_causal` aligns the triangle top-left, right only when T == S; a single query sees
    every key. For 1 < T < S, CUDA's kernels take `causal_lower_right`; on the CPU, whose flash
    kernel is top-left only, the queries attend to the cached keys (no mask) and to their own chunk
    (top-left is right there) apart, and the two are merged by their log-sum-exps."""
    T, S = q.shape[-2], k.shape[-2]
    if T == S or T == 1:
        return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=enable_gqa)
    if q.device.type != "cpu" or not _cpu_lse_attention_works(q.dtype):
        # CUDA: flash or memory-efficient kernels; elsewhere torch builds the mask (quadratic memory).
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(T, S), enable_gqa=enable_gqa)
    if enable_gqa:  # the CPU kernel below wants as many key/value heads as query heads
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    past = S - T
    out_past, lse_past = _cpu_flash(q, k[..., :past, :], v[..., :past, :], causal=False)
    out_own, lse_own = _cpu_flash(q, k[..., past:, :], v[..., past:, :], causal=True)
    lse = torch.logaddexp(lse_past, lse_own)
    return (out_past * (lse_past - lse).exp()[..., None].to(q.dtype)
            + out_own * (lse_own - lse).exp()[..., None].to(q.dtype))


def _cpu_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA's CPU flash kernel, which also returns each query's log-sum-exp (B, H, T)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)


@functools.cache
def _cpu_lse_attention_works(dtype: torch.dtype) -> bool:
    # A private op whose signature may change by release: try it once on a tiny problem.
    try:
        q, k = torch.randn(1, 2, 3, 8, dtype=dtype), torch.randn(1, 2, 5, 8, dtype=dtype)
        out, lse = _cpu_flash(q, k, k, causal=False)
        return out.shape == q.shape and lse.shape == (1, 2, 3) and bool(torch.isfinite(lse).all())
    except (AttributeError, RuntimeError, NotImplementedError, TypeError):
        return False


def decoder_mask(attention_mask: torch.Tensor | None, T: int, start: int,
                 device: torch.device | None = None) -> torch.Tensor | None:
    """Boolean (B, 1, T, S) mask for T queries at absolute positions [start, start + T).

    None means no padding: `Attention` then runs `causal_attention`, which needs no mask whether or
    not a cache holds earlier positions. `attention_mask` (B, S) marks real tokens with 1 over past
    and current positions, as in transformers.
    """
    S = start + T
    padded = attention_mask is not None and not bool(attention_mask[:, :S].all())
    if not padded:
        return None
    q = torch.arange(start, S, device=device)[:, None]
    k = torch.arange(S, device=device)[None, :]
    allowed = (k <= q)[None]  # (1, T, S)
    if padded:
        # Padding keys are never attended; a padding query attends to itself only, so no
        # softmax row is empty (its output is discarded anyway).
        allowed = (allowed & attention_mask[:, None, :S].bool()) | (k == q)[None]
    return allowed[:, None]


# --- feed-forward -----------------------------------------------------------------------------


class SwiGLU(nn.Module):
    """LLaMA's gated feed-forward (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MLP(nn.Module):
    """Two linear layers with an activation between: CLIP's feed-forward and LLaVA's projector."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, act: str, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim, bias=bias)
        self.act = activation(act)
        self.fc2 = nn.Linear(hidden_dim, out_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """Reset every parameter the way LLaMA/LLaVA initialise: norms to 1, biases to 0, the rest N(0, std);
    and gates (parameters named `*_gate`, Flamingo's tanh gates) and token convolutions to 0, so that
    they start closed."""
    for m in module.modules():
        for name, p in m.named_parameters(recurse=False):
            if isinstance(m, (nn.LayerNorm, RMSNorm)) and name == "weight":
                nn.init.ones_(p)
            elif name == "bias" or name.endswith("_gate") or isinstance(m, TokenConv):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, std=std)


def build_initialised(cls, config, device=None, dtype=None, finish=None):
    """`cls(config)` built on the meta device, allocated once on `device` in `dtype`, initialised
    with `init_weights`, then `finish(model)` for what a model sets up its own way. On device
    "meta" nothing is allocated or initialised."""
    with torch.device("meta"):
        model = cls(config)
    if dtype is not None:
        model.to(dtype)  # still on meta: the real tensors are allocated once, in this dtype
    device = torch.device(device or "cpu")
    if device.type != "meta":
        model.to_empty(device=device)
        init_weights(model)
        if finish is not None:
            finish(model)
    return model


@contextmanager
def eval_mode(model: nn.Module):
    """Eval mode inside the block; afterwards every module gets its own training flag back."""
    # Restore each module's own flag afterwards: a frozen tower may be in eval while the rest trains.
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def resolve_device(name: str) -> torch.device:
    """The device `name` names ("auto": CUDA when there is one, else the CPU), refused in one line
    when it is not a device or not on this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise OmniInputError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise OmniInputError(f"--device {name}: this machine has no CUDA device; use cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise OmniInputError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                                 "use cuda:0 or another index below that")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise OmniInputError(f"--device {name}: MPS is not available here; use cpu (or auto)")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise OmniInputError(f"--device {name}: omnilm runs on cpu, cuda or mps")
    return device
