"""FLOPs from the architecture: what a forward pass, a training step or a decoding step of an
`OmniConfig` costs, for model FLOPs utilisation (MFU; Chowdhery et al. 2022, PaLM, appendix B).

Counted as `torch.utils.flop_counter.FlopCounterMode` counts: every matrix product, 2 FLOPs per
multiply-add: linear layers (x @ W), convolutions (the ViT's patches, Whisper's front, a token
convolution), the grouped products of the experts, and attention's two products (scores Q K^T and
their mix of the values), for the whole T x S score matrix, causal or not (as FlopCounterMode and
PaLM's MFU count it; a causal kernel computes about half of it). Left out, as FlopCounterMode leaves
them out: norms, activations, softmax, rotary embeddings, residual additions, biases (it counts
addmm as mm), Flamingo's tanh gates (a scalar times the states), pooling, embedding look-ups and the
cross-entropy; left out here besides: a video's motion moments (a few FLOPs per feature) and LoRA
adapters (a few per thousand of the layers they adapt).

Decoder layer, per token, with S keys (T queries over past + T keys):

    attention  2 D (H + 2 Hkv) hd  +  2 H hd D  +  4 H hd S
    MLP        6 D F  (SwiGLU: gate, up, down)
    MoE        2 D E (router)  +  6 D F_e k (the k active experts)  +  6 D F_e n_shared
    head       2 D V, at each position that gets logits

A training step is the forward and its backward. The backward of x @ W costs the forward twice
over: once for the gradient of x, once for that of W (Kaplan et al. 2020), so a step where every
weight trains is 3x the forward. A frozen part costs less: a weight that does not train gets no
gradient, and a part with nothing trained upstream of it (a frozen vision tower; in late fusion,
the frozen decoder of a run that trains the image side) gets no backward at all; attention's
products, with no weights, cost twice their forward wherever a gradient flows. `Flops.training`
applies this to the parts (encoders, connector, decoder, head), from the share of each part's
parameters that train (`trained_shares`).

Shape letters: T tokens, S keys, D text width, Dv vision width, H heads, Hkv key/value heads,
hd head dim, F MLP width, E experts, k experts per token, V vocabulary, P patches, L latents.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from omnilm.config import AudioConfig, OmniConfig, VisionConfig
from omnilm.errors import OmniInputError

# The parts of a model. A part's backward needs the gradient of its inputs when anything upstream
# of it (or in it) trains: upstream is the parts before it in a chain, except in late fusion,
# where the decoder reads text alone and the pooled images meet its states in the head.
PARTS = ("encoders", "connector", "decoder", "head")
CHAIN = {part: PARTS[:i + 1] for i, part in enumerate(PARTS)}
LATE = {**CHAIN, "decoder": ("decoder",)}
# Module paths of OmniModel by part (the longest prefix wins); the rest is the decoder: the LLM
# and the cross-attention blocks. The images' ordinal vectors join them in the connector. Late
# fusion's attention is the head's, but for its queries, which read the decoder's states alone.
_PART_OF = {"vision": "encoders", "audio": "encoders", "projector": "connector", "video_projector": "connector",
            "audio_projector": "connector", "fusion.resampler": "connector", "fusion.pool": "connector",
            "fusion.order": "connector", "fusion.attn": "head", "fusion.attn.q_proj": "decoder",
            "fusion.gate": "head", "lm_head": "head"}
_LONGEST_FIRST = sorted(_PART_OF, key=len, reverse=True)


def _by_part() -> dict[str, int]:
    return dict.fromkeys(PARTS, 0)


@dataclass(frozen=True)
class Flops:
    """Forward FLOPs by part: `weights[part]`, the products of an activation with a weight (x @ W,
    convolutions); `inputs[part]`, those of the raw input (pixels, log-mel frames) with a weight,
    whose gradient nobody needs; `activations[part]`, those of two activations (attention's
    scores and values). `upstream` says which parts feed which (CHAIN, or LATE for late fusion)."""

    weights: dict[str, int] = field(default_factory=_by_part)
    inputs: dict[str, int] = field(default_factory=_by_part)
    activations: dict[str, int] = field(default_factory=_by_part)
    upstream: dict[str, tuple[str, ...]] = field(default_factory=lambda: CHAIN)

    @property
    def forward(self) -> int:
        return sum(sum(d.values()) for d in (self.weights, self.inputs, self.activations))

    def training(self, trained: Mapping[str, float] | None = None) -> int:
        """FLOPs of a training step: forward and backward. `trained` gives the share (0..1) of each
        part's parameters that train (`trained_shares(model)`); None: everything trains, about 3x
        the forward. A trained part's first layer is still charged the gradient of its input where
        nothing upstream trains (the projector's, behind a frozen tower), which autograd skips:
        1 FLOP in 6,000 of LLaVA-1.5-7B's step."""
        shares = {part: 1.0 if trained is None else float(trained.get(part, 0.0)) for part in PARTS}
        total = self.forward
        for part in PARTS:
            if any(shares[p] > 0 for p in self.upstream[part]):
                total += round((self.weights[part] + self.inputs[part]) * shares[part]) + self.weights[part]
                total += 2 * self.activations[part]
        return total

    def __add__(self, other: Flops) -> Flops:
        return Flops(*({p: mine[p] + theirs[p] for p in PARTS} for mine, theirs in
                       ((self.weights, other.weights), (self.inputs, other.inputs),
                        (self.activations, other.activations))), self.upstream)

    def __mul__(self, n: int) -> Flops:
        return Flops(*({p: v * n for p, v in d.items()} for d in (self.weights, self.inputs, self.activations)),
                     self.upstream)


class _Count:
    """Adds up a forward pass, one product at a time, into a `Flops`."""

    def __init__(self, config: OmniConfig):
        self.flops = Flops(upstream=LATE if config.fusion == "late" else CHAIN)

    def linear(self, part: str, rows: int, d_in: int, d_out: int, raw: bool = False) -> None:
        """x (rows, d_in) @ W (d_in, d_out); `raw`: x is the input data (pixels, log-mel frames)."""
        (self.flops.inputs if raw else self.flops.weights)[part] += 2 * rows * d_in * d_out

    def attention(self, part: str, heads: int, head_dim: int, queries: int, keys: int) -> None:
        self.flops.activations[part] += 4 * heads * head_dim * queries * keys  # Q K^T, then P V

    def self_attention(self, part: str, dim: int, heads: int, kv_heads: int, head_dim: int, queries: int,
                       keys: int, kv_rows: int | None = None) -> None:
        """Projections q, k, v, o and the products; keys and values from `kv_rows` vectors (default:
        the queries' own rows; cross-attention: the media's)."""
        kv_rows = queries if kv_rows is None else kv_rows
        self.linear(part, queries, dim, heads * head_dim)
        self.linear(part, kv_rows, dim, 2 * kv_heads * head_dim)
        self.attention(part, heads, head_dim, queries, keys)
        self.linear(part, queries, heads * head_dim, dim)


def forward_flops(config: OmniConfig, seq_len: int, n_images: int = 0, n_frames: int = 0, n_windows: int = 0,
                  n_logits: int | None = None) -> Flops:
    """FLOPs of one forward pass over a sequence of `seq_len` tokens (image, video and audio tokens
    included, as they stand in it) that holds `n_images` images, `n_frames` video frames and
    `n_windows` audio windows, with logits at `n_logits` positions (None: every one; training's
    `loss_only` computes them at the targets alone, prefill at the last position)."""
    _check_counts(seq_len=seq_len, n_images=n_images, n_frames=n_frames, n_windows=n_windows)
    c = _Count(config)
    _media(c, config, n_images, n_frames, n_windows)
    _decoder(c, config, seq_len, seq_len, n_images)
    c.linear("head", seq_len if n_logits is None else n_logits, config.text.dim, config.text.vocab_size)
    return c.flops


def decode_flops(config: OmniConfig, context_len: int, n_images: int = 0) -> Flops:
    """FLOPs of one decoding step: a new token over a KV cache of `context_len` tokens whose prompt
    held `n_images` images (late and cross-attention fusion read them again at every step; joint
    and early fusion's are in the cache already), logits at that token."""
    _check_counts(context_len=context_len, n_images=n_images)
    c = _Count(config)
    _decoder(c, config, 1, context_len + 1, n_images)
    c.linear("head", 1, config.text.dim, config.text.vocab_size)
    return c.flops


def generate_flops(config: OmniConfig, prompt_len: int, new_tokens: int, n_images: int = 0, n_frames: int = 0,
                   n_windows: int = 0) -> Flops:
    """FLOPs of `omnilm.infer.generate` for one prompt: prefill (logits at its last position), then
    a decoding step for each new token after the first."""
    total = forward_flops(config, prompt_len, n_images, n_frames, n_windows, n_logits=1)
    for i in range(max(new_tokens - 1, 0)):
        total = total + decode_flops(config, prompt_len + i, n_images)
    return total


def batch_generate_flops(config: OmniConfig, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                         new_tokens: list[int]) -> Flops:
    """FLOPs of `omnilm.infer.generate` over a batch (B, T): each row's `generate_flops` at its real
    length (`attention_mask`'s ones), its media counted from their markers (as `batch_flops`), for
    the `new_tokens[b]` tokens row b needed (its stop token included). The steps a finished row idles
    through while others go on are left out, as padding is: work that counts for nothing."""
    rows = zip(_rows(config, input_ids, attention_mask), new_tokens, strict=True)
    return sum((generate_flops(config, length, new, *media) for (length, media), new in rows), _Count(config).flops)


def flops_per_token(config: OmniConfig, seq_len: int, n_images: int = 0, training: bool = False) -> float:
    """FLOPs per token of a sequence of `seq_len` tokens holding `n_images` images (their encoding
    included), forward alone or a whole training step (everything trained)."""
    flops = forward_flops(config, seq_len, n_images)
    return (flops.training() if training else flops.forward) / seq_len


def batch_flops(config: OmniConfig, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                n_logits: int | None = None) -> Flops:
    """FLOPs of a forward pass over a batch (B, T), each row at its real length (`attention_mask`'s
    ones: padding is work that counts for nothing), its images, video frames and audio windows
    counted from their markers; logits at `n_logits` positions of the batch (None: every real one)."""
    rows = _rows(config, input_ids, attention_mask)
    head = _Count(config)
    head.linear("head", sum(length for length, _ in rows) if n_logits is None else n_logits, config.text.dim,
                config.text.vocab_size)
    total = head.flops
    for length, media in rows:
        total = total + forward_flops(config, length, *media, n_logits=0)
    return total


def _rows(config: OmniConfig, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[tuple[int, list]]:
    """Each row of a batch (B, T) as (its real length: `attention_mask`'s ones, its images, video
    frames and audio windows counted from their markers)."""
    B, T = input_ids.shape
    lengths = attention_mask.sum(1).tolist() if attention_mask is not None else [T] * B
    media = [_markers(input_ids, *spec).tolist() for spec in _media_specs(config)]
    return [(int(length), [m[row] for m in media]) for row, length in enumerate(lengths)]


def training_flops(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   n_logits: int | None = None) -> int | None:
    """FLOPs of a training step of `model` on a batch (`batch_flops`), its frozen parts as they are
    (`trained_shares`); None for a model other than an OmniModel (stage clip's CLIP)."""
    config = getattr(model, "config", None)
    if not isinstance(config, OmniConfig):
        return None
    return batch_flops(config, input_ids, attention_mask, n_logits).training(trained_shares(model))


def trained_shares(model: nn.Module) -> dict[str, float]:
    """The share of each part's parameters (of an `OmniModel`, LoRA-wrapped or not) that train,
    by number, for `Flops.training`. A part without parameters (no vision tower) gets 0."""
    n, trained = dict.fromkeys(PARTS, 0), dict.fromkeys(PARTS, 0)
    for name, p in model.named_parameters(remove_duplicate=False):  # a tied head counts as the head too
        part = next((_PART_OF[prefix] for prefix in _LONGEST_FIRST if name.startswith(prefix + ".")), "decoder")
        n[part] += p.numel()
        trained[part] += p.numel() if p.requires_grad else 0
    return {part: trained[part] / n[part] if n[part] else 0.0 for part in PARTS}


# --- the pieces ---------------------------------------------------------------------------------------


def _check_counts(**counts: int) -> None:
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise OmniInputError(f"{name}={value!r}: give a whole number >= 0")


def _media_specs(config: OmniConfig) -> list[tuple[int | None, int]]:
    """(marker id, tokens per item) of images, video frames and audio windows, None where the model
    takes none."""
    return [(config.image_token_id if config.vision is not None else None, config.image_seq_len),
            (config.video_token_id, config.video_frame_len), (config.audio_token_id, config.audio_seq_len)]


def _markers(input_ids: torch.Tensor, token: int | None, span: int) -> torch.Tensor:
    """Items per row (B,): each row's marker tokens over the tokens an item stands for."""
    if token is None:
        return torch.zeros(input_ids.shape[0], dtype=torch.long)
    return (input_ids == token).sum(1) // span


def _media(c: _Count, config: OmniConfig, n_images: int, n_frames: int, n_windows: int) -> None:
    """Encoders and connectors: each image, video frame and audio window on its way in."""
    v, t = config.vision, config.text
    if (n_images or n_frames) and v is None:
        raise OmniInputError("this model has no vision tower (text-only): count no images or video frames")
    if n_frames and config.video_token_id is None:
        raise OmniInputError("this model takes no video (its config has no video_token_id): count no frames")
    if n_windows and config.audio is None:
        raise OmniInputError("this model takes no audio (its config has no audio encoder): count no windows")
    side = v.image_size // v.patch_size if v is not None else 0
    if config.fusion == "early":  # Fuyu: one linear map of each patch's pixels, no encoder
        c.linear("connector", n_images * side * side, v.n_channels * v.patch_size ** 2, t.dim, raw=True)
    elif n_images:
        tokens = _vision_tower(c, v, config.vision_feature_layer, n_images)
        kept = tokens - (config.vision_feature_select == "default")  # the class token dropped
        if config.fusion == "joint":
            c.linear("connector", n_images * kept, v.dim, t.dim)  # LLaVA's two-layer MLP
            c.linear("connector", n_images * kept, t.dim, t.dim)
        elif config.fusion == "late":  # each image averaged, then an MLP
            c.linear("connector", n_images, v.dim, t.dim)
            c.linear("connector", n_images, t.dim, t.dim)
        else:  # cross_attention: the perceiver resampler's latents read [tokens; latents]
            L = config.n_latents
            for _ in range(config.resampler_layers):
                c.self_attention("connector", v.dim, v.n_heads, v.n_heads, v.head_dim, n_images * L, kept + L,
                                 kv_rows=n_images * (kept + L))
                c.linear("connector", n_images * L, v.dim, v.mlp_dim)
                c.linear("connector", n_images * L, v.mlp_dim, v.dim)
            c.linear("connector", n_images * L, v.dim, t.dim)
    if n_frames:
        _vision_tower(c, v, config.vision_feature_layer, n_frames)
        c.linear("connector", n_frames * config.video_frame_len, config.video_feature_dim, t.dim)
        c.linear("connector", n_frames * config.video_frame_len, t.dim, t.dim)
    if n_windows:
        a = config.audio
        _audio_encoder(c, a, n_windows)
        tokens = n_windows * a.tokens_per_window  # Voxtral: K frames side by side, Linear, act, Linear
        c.linear("connector", tokens, a.frames_per_token * a.dim, t.dim)
        c.linear("connector", tokens, t.dim, t.dim)


def _vision_tower(c: _Count, v: VisionConfig, feature_layer: int, n: int) -> int:
    """CLIP ViT over `n` images up to the feature layer (the blocks past it do not run); returns
    the tokens per image (class token and patches)."""
    tokens = v.n_patches + 1
    c.linear("encoders", n * v.n_patches, v.n_channels * v.patch_size ** 2, v.dim, raw=True)  # patch convolution
    for _ in range(feature_layer % (v.n_layers + 1)):
        c.self_attention("encoders", v.dim, v.n_heads, v.n_heads, v.head_dim, n * tokens, tokens)  # image by image
        c.linear("encoders", n * tokens, v.dim, v.mlp_dim)
        c.linear("encoders", n * tokens, v.mlp_dim, v.dim)
    return tokens


def _audio_encoder(c: _Count, a: AudioConfig, n: int) -> None:
    """Whisper's encoder over `n` windows: two width-3 convolutions (the second at stride 2), blocks."""
    T = a.max_source_positions
    c.linear("encoders", n * a.window_frames, 3 * a.n_mels, a.dim, raw=True)
    c.linear("encoders", n * T, 3 * a.dim, a.dim)
    for _ in range(a.n_layers):
        c.linear("encoders", n * T, a.dim, 4 * a.dim)  # q, k, v, out
        c.attention("encoders", a.n_heads, a.head_dim, n * T, T)
        c.linear("encoders", n * T, a.dim, a.mlp_dim)
        c.linear("encoders", n * T, a.mlp_dim, a.dim)


def _decoder(c: _Count, config: OmniConfig, T: int, S: int, n_images: int) -> None:
    """The decoder's layers over T new tokens with S keys each, and what fusion adds to them."""
    t = config.text
    hd = t.head_dim
    for i in range(t.n_layers):
        if config.fusion == "cross_attention" and i % config.cross_attention_every == 0:
            if n_images:  # Flamingo's gated block: the tokens read the images' latents
                media = n_images * config.n_latents
                c.self_attention("decoder", t.dim, t.n_heads, t.n_kv_heads, hd, T, media, kv_rows=media)
            _swiglu(c, T, t.dim, t.mlp_dim)
        if t.token_conv:  # depthwise: each channel its own kernel
            c.linear("decoder", T * t.dim, t.token_conv, 1)
        c.self_attention("decoder", t.dim, t.n_heads, t.n_kv_heads, hd, T, S)
        if not t.is_moe_layer(i):
            _swiglu(c, T, t.dim, t.mlp_dim)
            continue
        c.linear("decoder", T, t.dim, t.n_experts)  # the router
        for _ in range(t.n_experts_per_token):
            _swiglu(c, T, t.dim, t.expert_dim)
        if t.n_shared_experts:
            _swiglu(c, T, t.dim, t.n_shared_experts * t.expert_dim)
    if config.fusion == "late" and n_images:  # the last states read the pooled images, then a gate
        c.linear("decoder", T, t.dim, t.n_heads * hd)  # the queries, from the decoder's states alone
        c.linear("head", n_images, t.dim, 2 * t.n_heads * hd)
        c.attention("head", t.n_heads, hd, T, n_images)
        c.linear("head", T, t.n_heads * hd, t.dim)
        c.linear("head", T, 2 * t.dim, t.dim)


def _swiglu(c: _Count, rows: int, dim: int, hidden: int) -> None:
    c.linear("decoder", rows, dim, 2 * hidden)  # gate and up
    c.linear("decoder", rows, hidden, dim)
