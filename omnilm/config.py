"""Model configuration: small typed dataclasses, saved as JSON beside the weights.

A model is an `OmniConfig`: a `TextConfig` (the LLaMA decoder), an optional `VisionConfig`
(the CLIP ViT; None for a text-only model) and the few settings that join them. Presets are
plain `name -> kwargs` dicts; `OmniConfig.from_preset(name, **overrides)` builds one.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FUSIONS = ("joint", "early", "late", "cross_attention")
VIDEO_POOL_MODES = ("average", "max", "concat")  # OmniConfig.video_pool_mode
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
# The activations omnilm.model.layers.ACTIVATIONS implements (this module imports no model code).
ACTIVATION_NAMES = ("gelu", "quick_gelu", "silu")
# Weight-only quantisation (QuantConfig): its methods, and the parts of a model it may quantise
# ("projector": every connector into the decoder's width, of images, video frames and audio).
QUANT_METHODS = ("int8",)
QUANT_MODULES = ("llm", "lm_head", "vision", "audio", "projector")
# The label that carries no loss: prompt, image and padding tokens (PyTorch cross_entropy's default).
IGNORE_INDEX = -100
# The image normalisation OpenAI's CLIP was trained with (and every LLaVA-1.5 checkpoint uses).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Upper bounds far beyond any real model, so that a typo (an extra digit, a byte count) fails here
# rather than as an allocation, an overflow or a hang while the model is built.
MAX_WIDTH = 2**20  # dim, mlp_dim, head_dim, expert_dim, embed_dim
MAX_VOCAB = 2**24  # vocab_size, token ids
MAX_COUNT = 2**14  # layers, heads, experts, latents
MAX_POSITIONS = 2**30  # max_seq_len (no table of that size is built)
MAX_KERNEL = 64  # token_conv: a short convolution, a few tokens
MAX_IMAGE = 2**16  # image_size, patch_size in pixels


class ConfigError(ValueError):
    """A config field of the wrong type or out of range: `field` is its dotted name ("text.dim"),
    `value` what it held, `need` what it must be, so that a reader of another format (a
    transformers config.json) can name its own key instead."""

    def __init__(self, field: str, value: Any, need: str):
        self.field, self.value, self.need = field, value, need
        super().__init__(self.with_field(field))

    def with_field(self, field: str) -> str:
        """The message, naming the field `field` (as another file format spells it)."""
        return f"{field}={_short(self.value)} {self.need}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def is_int(v: Any) -> bool:
    """An int, and not a bool (JSON's true is no size)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_finite_number(v: Any) -> bool:
    """An int or float (not a bool) that is finite, an int too large for a float included as not."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:  # an int past float's range
        return False


def _check_int(field: str, v: Any, lo: int | None = 1, hi: int = MAX_WIDTH, optional: bool = False) -> None:
    """An int in [lo, hi] (lo None: any int up to hi, its lower bound checked elsewhere), or None if optional."""
    if optional and v is None:
        return
    if not is_int(v) or (lo is not None and v < lo) or v > hi:
        what = f"an integer from {lo} to {hi}" if lo is not None else f"an integer (at most {hi})"
        raise ConfigError(field, v, f"must be {what}" + (", or null" if optional else ""))


def _check_number(field: str, v: Any, positive: bool = False, optional: bool = False) -> float | None:
    """A finite number (> 0 if positive), returned as a float; None if optional."""
    if optional and v is None:
        return None
    if not is_finite_number(v) or (positive and not v > 0):
        need = "a finite number > 0" if positive else "a finite number"
        raise ConfigError(field, v, f"must be {need}" + (", or null" if optional else ""))
    return float(v)


def _check_bool(field: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise ConfigError(field, v, "must be true or false")


def _check_choice(field: str, v: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(v, str) or v not in choices:
        raise ConfigError(field, v, f"must be one of {', '.join(repr(c) for c in choices)}")


def _check_id(field: str, v: Any, vocab_size: int) -> None:
    # A token id indexes the embedding (generation feeds eos and pad back in), so it must lie inside it.
    if v is not None and (not is_int(v) or not 0 <= v < vocab_size):
        raise ConfigError(field, v, f"must be a token id from 0 to {vocab_size - 1} (the vocabulary), or null")


def _check_heads(prefix: str, dim: int, n_heads: int) -> None:
    # Attention splits the width into n_heads equal heads (dim // n_heads each, as transformers' CLIP).
    if dim % n_heads:
        raise ConfigError(f"{prefix}dim", dim, f"is not a multiple of n_heads={n_heads}: attention splits the width "
                                               "into equal heads; change dim or n_heads")


@dataclass
class VisionConfig:
    """CLIP ViT encoder (Radford et al. 2021), as in HF `CLIPVisionConfig`."""

    image_size: int = 336
    patch_size: int = 14
    n_channels: int = 3
    dim: int = 1024
    n_layers: int = 24
    n_heads: int = 16
    mlp_dim: int = 4096
    norm_eps: float = 1e-5
    act: str = "quick_gelu"
    # Preprocessing constants travel with the encoder they were trained with (OpenAI CLIP).
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD

    def __post_init__(self) -> None:
        w = "vision."
        _check_int(w + "image_size", self.image_size, hi=MAX_IMAGE)
        _check_int(w + "patch_size", self.patch_size, hi=MAX_IMAGE)
        if self.image_size < self.patch_size:
            raise ConfigError(w + "image_size", self.image_size, f"is smaller than patch_size={self.patch_size}: "
                                                                 "an image must hold at least one patch")
        if self.n_channels != 3 or not is_int(self.n_channels):
            raise ConfigError(w + "n_channels", self.n_channels, "must be 3: omnilm's image processor makes RGB images")
        for name, hi in (("dim", MAX_WIDTH), ("n_layers", MAX_COUNT), ("n_heads", MAX_COUNT), ("mlp_dim", MAX_WIDTH)):
            _check_int(w + name, getattr(self, name), hi=hi)
        _check_heads(w, self.dim, self.n_heads)
        self.norm_eps = _check_number(w + "norm_eps", self.norm_eps, positive=True)
        _check_choice(w + "act", self.act, ACTIVATION_NAMES)
        for name in ("image_mean", "image_std"):
            v = getattr(self, name)
            if not isinstance(v, (list, tuple)) or len(v) != 3 or not all(map(is_finite_number, v)):
                raise ConfigError(w + name, v, "must be 3 finite numbers, one per RGB channel")
            if name == "image_std" and not all(x > 0 for x in v):
                raise ConfigError(w + name, v, "must be > 0 in every channel: pixels are divided by it")
            setattr(self, name, tuple(float(x) for x in v))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VisionConfig:
        _check_fields(cls, d, "vision config")
        return cls(**d)

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


@dataclass
class AudioConfig:
    """Whisper's audio encoder (Radford et al. 2022), as in HF `WhisperConfig`'s encoder_* fields
    and Voxtral's `audio_config`; defaults: Voxtral's (Whisper large-v3's encoder)."""

    n_mels: int = 128  # num_mel_bins
    dim: int = 1280  # d_model
    n_layers: int = 32  # encoder_layers
    n_heads: int = 20  # encoder_attention_heads
    mlp_dim: int = 5120  # encoder_ffn_dim
    # Encoder frames per window (Whisper's 30 s at 50 a second); the log-mel window is twice as
    # long, since the second convolution has stride 2.
    max_source_positions: int = 1500
    norm_eps: float = 1e-5  # transformers' Whisper leaves nn.LayerNorm's default; no config field
    act: str = "gelu"  # activation_function, of the feed-forward only (the convolutions' GELU is fixed)
    # Consecutive encoder frames Voxtral's projector joins into one audio token (12.5 a second).
    # transformers reads it as audio_config.intermediate_size // d_model, tied to encoder_ffn_dim.
    frames_per_token: int = 4

    def __post_init__(self) -> None:
        a = "audio."
        for name, hi in (("n_mels", MAX_WIDTH), ("dim", MAX_WIDTH), ("n_layers", MAX_COUNT), ("n_heads", MAX_COUNT),
                         ("mlp_dim", MAX_WIDTH), ("max_source_positions", MAX_WIDTH),  # rows of positions
                         ("frames_per_token", MAX_COUNT)):
            _check_int(a + name, getattr(self, name), hi=hi)
        _check_heads(a, self.dim, self.n_heads)
        if self.dim % 2 or self.dim < 4:
            raise ConfigError(a + "dim", self.dim, "must be even and at least 4: positions start as a sine and a "
                                                   "cosine of each of dim/2 >= 2 frequencies")
        if self.max_source_positions % self.frames_per_token:
            raise ConfigError(a + "max_source_positions", self.max_source_positions,
                              f"is not a multiple of frames_per_token={self.frames_per_token}: an audio token must "
                              "not join frames of two windows")
        self.norm_eps = _check_number(a + "norm_eps", self.norm_eps, positive=True)
        _check_choice(a + "act", self.act, ACTIVATION_NAMES)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AudioConfig:
        _check_fields(cls, d, "audio config")
        return cls(**d)

    @property
    def window_frames(self) -> int:
        """Log-mel frames the encoder takes per window (3000 = 30 s at Whisper's hop of 10 ms)."""
        return 2 * self.max_source_positions

    @property
    def tokens_per_window(self) -> int:
        """Audio tokens one window becomes after Voxtral's projector (375 for 30 s)."""
        return self.max_source_positions // self.frames_per_token

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


@dataclass
class TextConfig:
    """LLaMA decoder (Touvron et al. 2023), as in HF `LlamaConfig`."""

    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    head_dim: int | None = None  # None: dim // n_heads
    mlp_dim: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None, or a dict as transformers writes it: {"rope_type": "linear"|"dynamic"|"yarn"|"llama3",
    # "factor": ..., plus that type's own keys}.
    rope_scaling: dict | None = None
    max_seq_len: int = 4096
    # Log-n attention scaling (Qwen's logn_attn; "scalable softmax", arXiv 2501.19399, at inference):
    # None, or a length n0: the query at position p > n0 is multiplied by log(p + 1) / log(n0), so
    # that attention stays as sharp over more keys as over the n0 the model was trained with.
    logn_attention: int | None = None
    # A short causal depthwise convolution over each layer's attention input, added to it (omnilm's
    # own: layers.TokenConv, a Canon layer): 0 none, or its kernel in tokens (the haystack recipe's 6
    # lets one layer of attention match a key a few tokens before its value). No HF export.
    token_conv: int = 0
    # The last N ids are words whose embedding and output rows are fixed random directions that
    # training never moves (OmniModel.add_tokens): in-context learning's made-up words, so that
    # a word no training record used reads and writes like those that were. No effect on inference.
    fixed_tokens: int = 0
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2  # a list: any of them ends generation (Llama 3)
    pad_token_id: int | None = None
    # Sparse mixture of experts (omnilm.model.moe); n_experts = 0 is a dense decoder.
    n_experts: int = 0
    n_experts_per_token: int = 2  # top-k; "switch" takes 1 (top-1 "topk" renormalises every weight to 1,
    # so that only the router losses would train the router)
    moe_every: int = 1  # layers n-1, 2n-1, ... are MoE: 1 is every layer (Mixtral), 2 every other (Switch, GShard)
    expert_dim: int | None = None  # each expert's hidden width; None: mlp_dim
    n_shared_experts: int = 0  # experts every token uses, beside the routed ones (DeepSeekMoE, Qwen-MoE)
    router: str = "topk"  # "topk": softmax, top-k, renormalised (Mixtral); "switch": top-1, weighted by its probability
    capacity_factor: float | None = None  # expert capacity = factor * tokens * k / n_experts; None: never drop
    router_jitter: float = 0.0  # training only: the router's input times U(1 - j, 1 + j) (Switch; Mixtral's
    # transformers code also jitters the experts' input)
    # Router loss weights. Each loss is averaged over the MoE layers before weighting, so a coefficient
    # means the same at any depth (Switch sums over layers instead: its alpha is this / n_moe_layers).
    router_aux_loss_coef: float = 0.01  # load balancing (Switch Transformer)
    router_z_loss_coef: float = 0.001  # router z-loss (ST-MoE)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TextConfig:
        _check_fields(cls, d, "text config")
        return cls(**d)

    def __post_init__(self) -> None:
        self._check_types()
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}; "
                "grouped-query attention needs each key/value head to serve a whole group of query heads"
            )
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ConfigError("text.dim", self.dim, f"is not a multiple of n_heads={self.n_heads}: set head_dim "
                                                        "explicitly, or change dim or n_heads")
            self.head_dim = self.dim // self.n_heads
        if self.expert_dim is None:
            self.expert_dim = self.mlp_dim
        for name in ("bos_token_id", "pad_token_id"):
            _check_id(f"text.{name}", getattr(self, name), self.vocab_size)
        eos = self.eos_token_id
        for i, token in enumerate(eos if isinstance(eos, list) else [eos]):
            _check_id("text.eos_token_id" + (f"[{i}]" if isinstance(eos, list) else ""), token, self.vocab_size)
        self._check_rope()
        if self.n_experts:
            self._check_moe()

    def _check_types(self) -> None:
        # Types and ranges first: every later check and the model's constructors do arithmetic on them.
        for name, hi in (("vocab_size", MAX_VOCAB), ("dim", MAX_WIDTH), ("n_layers", MAX_COUNT), ("n_heads", MAX_COUNT),
                         ("n_kv_heads", MAX_COUNT), ("mlp_dim", MAX_WIDTH), ("max_seq_len", MAX_POSITIONS)):
            _check_int(f"text.{name}", getattr(self, name), hi=hi)
        _check_int("text.head_dim", self.head_dim, optional=True)
        _check_int("text.logn_attention", self.logn_attention, optional=True, lo=2, hi=MAX_POSITIONS)
        _check_int("text.token_conv", self.token_conv, lo=0, hi=MAX_KERNEL)
        _check_int("text.fixed_tokens", self.fixed_tokens, lo=0, hi=self.vocab_size)
        _check_int("text.expert_dim", self.expert_dim, optional=True)
        self.norm_eps = _check_number("text.norm_eps", self.norm_eps, positive=True)
        self.rope_theta = _check_number("text.rope_theta", self.rope_theta, positive=True)
        if self.rope_theta <= 1:
            raise ConfigError("text.rope_theta", self.rope_theta, "must be > 1: it is the base of RoPE's wavelengths "
                                                                  "(LLaMA's is 10000)")
        for name in ("attention_bias", "mlp_bias", "tie_embeddings"):
            _check_bool(f"text.{name}", getattr(self, name))
        _check_int("text.n_experts", self.n_experts, lo=0, hi=MAX_COUNT)
        _check_int("text.n_shared_experts", self.n_shared_experts, lo=0, hi=MAX_COUNT)
        for name in ("n_experts_per_token", "moe_every"):  # their ranges: _check_moe
            _check_int(f"text.{name}", getattr(self, name), lo=None, hi=MAX_COUNT)
        self.capacity_factor = _check_number("text.capacity_factor", self.capacity_factor, optional=True)
        for name in ("router_jitter", "router_aux_loss_coef", "router_z_loss_coef"):
            setattr(self, name, _check_number(f"text.{name}", getattr(self, name)))

    def _check_rope(self) -> None:
        s = self.rope_scaling
        if s is None:
            return
        example = "{'rope_type': 'linear', 'factor': 2.0}"
        if not isinstance(s, dict):
            raise ConfigError("text.rope_scaling", s, f"must be null or an object such as {example}")
        kind = s.get("rope_type", s.get("type", "default"))
        if not isinstance(kind, str) or kind not in ROPE_TYPES:
            raise ConfigError("text.rope_scaling", s, f"has rope_type {kind!r}; omnilm supports {', '.join(ROPE_TYPES)}")

        def need(key: str, what: str) -> ConfigError:
            return ConfigError("text.rope_scaling", s, f"needs {key} to be {what} for rope_type {kind!r}")

        if kind in ("linear", "dynamic", "llama3") or s.get("factor") is not None:
            if not is_finite_number(s.get("factor")) or not s["factor"] > 0:
                raise need("factor", "a finite number > 0")
        original = s.get("original_max_position_embeddings")
        if original is not None and (not is_int(original) or not 1 <= original <= MAX_POSITIONS):
            raise need("original_max_position_embeddings", "a positive integer (or absent)")
        if kind == "dynamic" and self.head_dim <= 2:
            raise need("head_dim", "> 2")  # the base grows by a power dim / (dim - 2)
        if kind == "llama3":
            low, high = s.get("low_freq_factor"), s.get("high_freq_factor")
            if not (is_finite_number(low) and is_finite_number(high) and 0 < low < high):
                raise need("low_freq_factor and high_freq_factor", "finite numbers with 0 < low < high")
        if kind == "yarn":
            for key in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor"):
                if s.get(key) is not None and not (is_finite_number(s[key]) and s[key] > 0):
                    raise need(key, "a finite number > 0 (or absent)")
            if not isinstance(s.get("truncate", True), bool):
                raise need("truncate", "true or false")

    def _check_moe(self) -> None:
        if self.router not in ("topk", "switch"):
            raise ValueError(f"router={self.router!r}: use 'topk' (Mixtral) or 'switch' (top-1, Switch Transformer)")
        if self.router == "switch" and self.n_experts_per_token != 1:
            raise ValueError(f"switch routing sends each token to one expert: set n_experts_per_token=1, "
                             f"not {self.n_experts_per_token}")
        if not 1 <= self.n_experts_per_token <= self.n_experts:
            raise ValueError(f"n_experts_per_token={self.n_experts_per_token} must be between 1 and "
                             f"n_experts={self.n_experts}")
        if self.moe_every < 1 or self.moe_every > self.n_layers:
            raise ValueError(f"moe_every={self.moe_every} must be between 1 and n_layers={self.n_layers}")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor={self.capacity_factor} must be > 0 (or None: never drop tokens)")
        for name in ("router_jitter", "router_aux_loss_coef", "router_z_loss_coef"):
            if getattr(self, name) < 0:
                raise ConfigError(f"text.{name}", getattr(self, name), "must be >= 0")

    def is_moe_layer(self, i: int) -> bool:
        """Whether decoder layer `i` holds a mixture of experts instead of the dense MLP."""
        return self.n_experts > 0 and (i + 1) % self.moe_every == 0


@dataclass
class QuantConfig:
    """Weight-only quantisation (omnilm.model.quantize): the linear layers of the model's `modules`
    (with "llm", the token embedding and the MoE experts too; with "vision", the patch convolution)
    hold `method` integer weights with one float scale per output channel. Set by `quantize_int8`;
    a checkpoint with it loads as that model."""

    method: str = "int8"
    modules: list[str] = field(default_factory=lambda: ["llm", "lm_head"])

    def __post_init__(self) -> None:
        _check_choice("quantization.method", self.method, QUANT_METHODS)
        if (not isinstance(self.modules, list) or not self.modules or len(set(self.modules)) != len(self.modules)
                or any(m not in QUANT_MODULES for m in self.modules)):
            raise ConfigError("quantization.modules", self.modules,
                              f"must list, once each, some of {', '.join(map(repr, QUANT_MODULES))}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        _check_fields(cls, d, "quantization config")
        return cls(**d)


@dataclass
class OmniConfig:
    """The assembled model: vision encoder -> projector -> decoder (LLaVA-1.5, Liu et al. 2023)."""

    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig | None = field(default_factory=VisionConfig)
    image_token_id: int = 32000
    # Which CLIP layer feeds the projector: -2 is the penultimate layer's output, as LLaVA-1.5.
    vision_feature_layer: int = -2
    # "default" drops the class token (LLaVA-1.5); "full" keeps it.
    vision_feature_select: str = "default"
    projector_act: str = "gelu"
    projector_bias: bool = True
    # How image and text meet (omnilm.model.fusion; docs/fusion.md):
    #   "joint"            LLaVA: vision features, projected, stand in the sequence at the marker
    #   "early"            Fuyu: raw patches, linearly embedded, in the sequence; no vision encoder
    #                      (`vision` then only describes the input: size, patch, normalisation)
    #   "late"             the decoder reads text only; each image's pooled features join its final
    #                      hidden states through a learned gate, at and after the image's marker
    #   "cross_attention"  Flamingo: a perceiver resampler makes `n_latents` vectors per image, read
    #                      by tanh-gated cross-attention blocks before every `cross_attention_every`-th
    #                      decoder layer; `attend` picks the images a token reads: the latest one
    #                      ("previous") or every one so far ("all")
    fusion: str = "joint"
    # Video (LLaVA-NeXT-Video, Zhang et al. 2024): the frames go through the vision tower one by one,
    # each frame's grid of features is pooled over video_pool_stride x video_pool_stride patches
    # before the projector, and the frames' tokens stand in order at the video marker. None: no video.
    #   video_pool_mode  "average" or "max" (LLaVA-NeXT-Video's weightless spatial_pool_mode), or
    #                    "concat": the s x s patches' features side by side, s^2 times as wide (Qwen2-VL's
    #                    patch merger), so that a token still says which of its patches holds what
    #   video_motion     each frame's tokens joined by the change of their s x s patches since the
    #                    video's frame before (zero for its first), side by side (s^2 Dv more): a token
    #                    sees motion, and where in it, as a frame alone does not (two-stream networks'
    #                    frame differences; averaged, the change would not say which way: docs/video.md)
    #   video_motion_halo  with motion, a token sees the change of this many patches more on each side
    #                    ((s + 2h)^2 Dv motion features): a step across the border of two tokens shows
    #                    whole in each of them, where without the halo it shows as two halves that each
    #                    look like a step the other way
    #   video_motion_moments  with motion, the window's change summed three ways instead of laid
    #                    out patch by patch (3 Dv): as it is, weighted by each patch's column and by
    #                    its row (centred); a step shows as a sign (right: +shape in the column
    #                    moment), wherever it falls in the window
    # A video wider than an image gets a projector of its own (`video_projector`); only the default
    # (average or max, no motion) is LLaVA-NeXT-Video's.
    video_token_id: int | None = None
    video_pool_stride: int = 2
    video_pool_mode: str = "average"
    video_motion: bool = False
    video_motion_halo: int = 0
    video_motion_moments: bool = False
    # Audio (Voxtral, Mistral AI 2025): a Whisper encoder (`audio`) reads each window of log-mel
    # frames; Voxtral's projector joins `audio.frames_per_token` frames into one token, through
    # audio_projector_act, and the windows' tokens stand in order at the audio marker. None: no audio.
    audio: AudioConfig | None = None
    audio_token_id: int | None = None
    audio_projector_act: str = "gelu"
    n_latents: int = 8
    resampler_layers: int = 2
    cross_attention_every: int = 2
    attend: str = "previous"
    # None: float weights. Set by omnilm.model.quantize (`omnilm quantize`), never by training.
    quantization: QuantConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.text, dict):
            self.text = TextConfig.from_dict(self.text)
        if isinstance(self.vision, dict):
            self.vision = VisionConfig.from_dict(self.vision)
        if isinstance(self.audio, dict):
            self.audio = AudioConfig.from_dict(self.audio)
        if isinstance(self.quantization, dict):
            self.quantization = QuantConfig.from_dict(self.quantization)
        if not isinstance(self.text, TextConfig):
            raise ConfigError("text", self.text, "must be an object of text (decoder) settings")
        if self.vision is not None and not isinstance(self.vision, VisionConfig):
            raise ConfigError("vision", self.vision, "must be an object of vision settings, or null (text-only)")
        # joint and early fusion overwrite the image id's embedding, so it may lie past the vocabulary.
        _check_int("image_token_id", self.image_token_id, lo=0, hi=MAX_VOCAB)
        _check_int("vision_feature_layer", self.vision_feature_layer, lo=None, hi=MAX_COUNT)
        _check_choice("projector_act", self.projector_act, ACTIVATION_NAMES)
        _check_bool("projector_bias", self.projector_bias)
        for name in ("n_latents", "resampler_layers", "cross_attention_every"):  # their ranges: _check_fusion
            _check_int(name, getattr(self, name), lo=None, hi=MAX_COUNT)
        # Checked here, not in TextConfig, which also describes a lone MoE layer (no attention).
        if self.text.head_dim % 2:
            raise ConfigError("text.head_dim", self.text.head_dim, "must be even: rotary embeddings turn pairs of "
                                                                   "channels")
        self._check_fusion()
        self._check_video()
        self._check_audio()
        self._check_quantization()
        if self.vision_feature_select not in ("default", "full"):
            raise ValueError(
                f"vision_feature_select={self.vision_feature_select!r}: use 'default' (drop the class token) or 'full'"
            )
        if self.vision is not None:
            n = self.vision.n_layers
            if not -n - 1 <= self.vision_feature_layer <= n:
                raise ValueError(
                    f"vision_feature_layer={self.vision_feature_layer} is outside the encoder's "
                    f"{n} layers; use an index in [-{n + 1}, {n}] (-2 = penultimate, LLaVA-1.5)"
                )

    def _check_fusion(self) -> None:
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion={self.fusion!r}: use one of {', '.join(FUSIONS)}")
        if self.fusion != "joint" and self.vision is None:
            raise ValueError(f"fusion={self.fusion!r} needs a vision config (image size and patches); "
                             "a text-only model has fusion='joint'")
        if self.fusion in ("late", "cross_attention") and not 0 <= self.image_token_id < self.text.vocab_size:
            raise ValueError(f"fusion={self.fusion!r} keeps each image marker as a text token, so image_token_id "
                             f"({self.image_token_id}) must lie inside the vocabulary (0..{self.text.vocab_size - 1})")
        if self.attend not in ("previous", "all"):
            raise ValueError(f"attend={self.attend!r}: use 'previous' (the latest image) or 'all' (every image so far)")
        if self.n_latents < 1 or self.resampler_layers < 1:
            raise ValueError(f"n_latents={self.n_latents} and resampler_layers={self.resampler_layers} must be >= 1")
        if self.fusion == "cross_attention" and not 1 <= self.cross_attention_every <= self.text.n_layers:
            raise ValueError(f"cross_attention_every={self.cross_attention_every} must be between 1 and "
                             f"n_layers={self.text.n_layers}")

    def _check_video(self) -> None:
        _check_int("video_token_id", self.video_token_id, lo=0, hi=MAX_VOCAB, optional=True)
        _check_int("video_pool_stride", self.video_pool_stride, hi=MAX_COUNT)
        _check_choice("video_pool_mode", self.video_pool_mode, VIDEO_POOL_MODES)
        _check_bool("video_motion", self.video_motion)
        _check_int("video_motion_halo", self.video_motion_halo, lo=0, hi=MAX_COUNT)
        _check_bool("video_motion_moments", self.video_motion_moments)
        for name, value in (("video_motion_halo", self.video_motion_halo),
                            ("video_motion_moments", self.video_motion_moments)):
            if value and not self.video_motion:
                raise ConfigError(name, value, "shapes the motion features: set video_motion=True too, or leave "
                                               "it off")
        if self.video_token_id is None:
            return
        if self.vision is None or self.fusion != "joint":
            raise ConfigError("video_token_id", self.video_token_id, "needs a vision tower and fusion='joint': video "
                                                                     "frames stand in the sequence as LLaVA's images do")
        if self.video_token_id == self.image_token_id:
            raise ConfigError("video_token_id", self.video_token_id, "is the image_token_id too: give videos a marker "
                                                                     "of their own")
        if self.vision_feature_select != "default":
            raise ConfigError("video_token_id", self.video_token_id, "needs vision_feature_select='default': frames "
                                                                     "are pooled over their patch grid, without the "
                                                                     "class token")
        side = self.vision.image_size // self.vision.patch_size
        if side % self.video_pool_stride:
            raise ConfigError("video_pool_stride", self.video_pool_stride,
                              f"does not divide the frames' grid of {side} x {side} patches: give a stride that "
                              f"does (LLaVA-NeXT-Video's is 2), or images of another size")

    def _check_audio(self) -> None:
        if self.audio is not None and not isinstance(self.audio, AudioConfig):
            raise ConfigError("audio", self.audio, "must be an object of audio encoder settings, or null (no audio)")
        _check_int("audio_token_id", self.audio_token_id, lo=0, hi=MAX_VOCAB, optional=True)
        _check_choice("audio_projector_act", self.audio_projector_act, ACTIVATION_NAMES)
        if (self.audio is None) != (self.audio_token_id is None):
            has, lacks = ("audio", "audio_token_id") if self.audio is not None else ("audio_token_id", "audio")
            raise ConfigError(lacks, None, f"must be set too, since {has} is: an audio model needs both its encoder "
                                           "and the id of its <audio> marker")
        if self.audio is None:
            return
        if self.fusion != "joint":
            raise ConfigError("fusion", self.fusion, "must be 'joint' in a model with audio: audio tokens stand in the "
                                                     "sequence at their marker")
        others = {"image_token_id": self.image_token_id if self.vision is not None else None,
                  "video_token_id": self.video_token_id}
        for name, token in others.items():
            if token == self.audio_token_id:
                raise ConfigError("audio_token_id", self.audio_token_id, f"is the {name} too: give audio a marker of "
                                                                         "its own")

    def _check_quantization(self) -> None:
        q = self.quantization
        if q is None:
            return
        if not isinstance(q, QuantConfig):
            raise ConfigError("quantization", q, "must be an object of quantization settings, or null (float weights)")
        missing = [name for name in q.modules if name not in self.quantizable()]
        if missing:
            what = "projector" if missing[0] == "projector" else f"{missing[0]} encoder"
            raise ConfigError("quantization.modules", q.modules, f"names {missing[0]!r}, but the model has no {what}")
        if self.text.tie_embeddings and ("llm" in q.modules) != ("lm_head" in q.modules):
            raise ConfigError("quantization.modules", q.modules, "must name both 'llm' and 'lm_head' or neither: "
                                                                 "they share one matrix (text.tie_embeddings)")

    def quantizable(self) -> list[str]:
        """The parts of QUANT_MODULES this model has, in that order: what `omnilm quantize` quantises
        unless told. (Early fusion has a projector, its patch embedding, and no vision tower; late and
        cross-attention fusion have a tower and no projector.)"""
        has = {"vision": self.vision is not None and self.fusion != "early", "audio": self.audio is not None,
               "projector": self.vision is not None and self.fusion in ("joint", "early") or self.audio is not None}
        return [name for name in QUANT_MODULES if has.get(name, True)]

    @property
    def audio_seq_len(self) -> int:
        """Number of sequence tokens one audio window becomes (0 for a model without audio)."""
        return self.audio.tokens_per_window if self.audio is not None else 0

    @property
    def video_frame_len(self) -> int:
        """Number of sequence tokens one video frame becomes: its pooled grid of vision tokens."""
        if self.video_token_id is None:
            return 0
        return (self.vision.image_size // self.vision.patch_size // self.video_pool_stride) ** 2

    @property
    def video_feature_dim(self) -> int:
        """Width of what the projector reads of a video frame's token: the vision width (s^2 times
        it for "concat" pooling), then with motion (s + 2 h)^2 times the vision width more (its
        motion features, `video_motion_dim`; h the halo), or 3 times with moments; 0 for a model
        without video."""
        if self.video_token_id is None:
            return 0
        looks = self.vision.dim * (self.video_pool_stride ** 2 if self.video_pool_mode == "concat" else 1)
        return looks + self.video_motion_dim

    @property
    def video_motion_dim(self) -> int:
        """Width of a video token's motion features, the last of `video_feature_dim` (0 without)."""
        if not self.video_motion or self.video_token_id is None:
            return 0
        if self.video_motion_moments:
            return 3 * self.vision.dim
        return self.vision.dim * (self.video_pool_stride + 2 * self.video_motion_halo) ** 2

    @property
    def image_seq_len(self) -> int:
        """Number of sequence tokens one image becomes: its vision tokens (joint), its patches plus
        a row break after each row (early), or the marker alone (late, cross_attention)."""
        if self.vision is None:
            return 0
        if self.fusion == "early":
            side = self.vision.image_size // self.vision.patch_size
            return side * (side + 1)
        if self.fusion in ("late", "cross_attention"):
            return 1
        return self.vision.n_patches + (self.vision_feature_select == "full")

    # --- (de)serialisation -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OmniConfig:
        _check_top_level(d)
        d = dict(d)
        d.pop("format", None)
        _check_fields(cls, d, "omnilm config")
        if d.get("vision") is not None:
            d["vision"] = VisionConfig.from_dict(_check_object(d["vision"], "vision"))
        if d.get("audio") is not None:
            d["audio"] = AudioConfig.from_dict(_check_object(d["audio"], "audio"))
        if "text" in d:
            d["text"] = TextConfig.from_dict(_check_object(d["text"], "text"))
        if d.get("quantization") is not None:
            d["quantization"] = QuantConfig.from_dict(_check_object(d["quantization"], "quantization"))
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"format": "omnilm", **self.to_dict()}, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> OmniConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> OmniConfig:
        """Build a preset; `overrides` set top-level fields, and `text=`/`vision=`/`audio=` dicts update the towers.

        >>> OmniConfig.from_preset("tiny", text=dict(n_layers=2), image_token_id=3)
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        d = json.loads(json.dumps(PRESETS[name]))  # deep copy
        for key, value in overrides.items():
            if key in ("text", "vision", "audio") and isinstance(value, dict) and d.get(key) is not None:
                d[key].update(value)
            else:
                d[key] = value
        return cls.from_dict(d)


def _check_top_level(d: Any) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise ValueError(f"the config is {_short(d)}, not an object of settings; save the model again")
    return d


def _check_object(d: Any, what: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise ConfigError(what, d, "must be an object (a dict of settings)")
    return d


def _check_fields(cls: type, d: dict[str, Any], what: str) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {what} field(s) {unknown}; valid fields: {sorted(names)}")


# --- presets --------------------------------------------------------------------------------

_CLIP_L14_336 = dict(image_size=336, patch_size=14, dim=1024, n_layers=24, n_heads=16, mlp_dim=4096)

PRESETS: dict[str, dict[str, Any]] = {
    # The exact architectures of llava-hf/llava-1.5-{7b,13b}-hf: CLIP ViT-L/14 at 336 px and
    # Vicuna-v1.5 (LLaMA-2) with a vocabulary padded to 32064 (32000 + <image> + <pad> + 62).
    "llava-1.5-7b": dict(
        text=dict(vocab_size=32064, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_dim=11008,
                  pad_token_id=32001),
        vision=_CLIP_L14_336,
        image_token_id=32000,
    ),
    "llava-1.5-13b": dict(
        text=dict(vocab_size=32064, dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, mlp_dim=13824,
                  pad_token_id=32001),
        vision=_CLIP_L14_336,
        image_token_id=32000,
    ),
    # Trains on a laptop CPU in minutes: 96 px images in 32 px patches (ViT-B/32's patch), so
    # each of the 9 image tokens is one cell of ShapeWorld's 3x3 grid; a 4-layer decoder with
    # grouped-query attention.
    "tiny": dict(
        text=dict(vocab_size=512, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, mlp_dim=688,
                  max_seq_len=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        vision=dict(image_size=96, patch_size=32, dim=192, n_layers=4, n_heads=6, mlp_dim=768),
        image_token_id=3,
    ),
    # Mixtral-8x7B (mistralai/Mixtral-8x7B-v0.1), text only: 8 experts of width 14336 in every
    # layer, 2 per token; 46.7B parameters in all, 12.9B used per token.
    "mixtral-8x7b": dict(
        text=dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, mlp_dim=14336, norm_eps=1e-5,
                  rope_theta=1e6, max_seq_len=32768, n_experts=8, n_experts_per_token=2, router_aux_loss_coef=0.02),
        vision=None,
    ),
}
# tiny with a sparse decoder: 8 experts of half the dense width, 2 per token, so a token uses as
# many feed-forward parameters as in tiny (plus the router's 8 x 256 per layer) from 2x the total.
PRESETS["tiny-moe"] = {**PRESETS["tiny"], "text": {**PRESETS["tiny"]["text"], "n_experts": 8, "n_experts_per_token": 2,
                                                 "expert_dim": 344}}


# --- CLIP (stage clip trains one; its vision tower starts the LLaVA model) -------------------


@dataclass
class ClipTextConfig:
    """CLIP's causal text transformer, as HF `CLIPTextConfig` (defaults: OpenAI CLIP's)."""

    vocab_size: int = 49408
    dim: int = 512
    n_layers: int = 12
    n_heads: int = 8
    mlp_dim: int = 2048
    max_len: int = 77
    norm_eps: float = 1e-5
    act: str = "quick_gelu"
    bos_token_id: int | None = 49406
    eos_token_id: int = 49407  # the text is pooled at its first end-of-text token
    pad_token_id: int | None = 1

    def __post_init__(self) -> None:
        for name, hi in (("vocab_size", MAX_VOCAB), ("dim", MAX_WIDTH), ("n_layers", MAX_COUNT), ("n_heads", MAX_COUNT),
                         ("mlp_dim", MAX_WIDTH), ("max_len", MAX_WIDTH)):  # max_len rows of positions
            _check_int(f"text.{name}", getattr(self, name), hi=hi)
        _check_heads("text.", self.dim, self.n_heads)
        self.norm_eps = _check_number("text.norm_eps", self.norm_eps, positive=True)
        _check_choice("text.act", self.act, ACTIVATION_NAMES)
        for name in ("bos_token_id", "pad_token_id"):
            _check_id(f"text.{name}", getattr(self, name), self.vocab_size)
        if self.eos_token_id is None:  # CLIP pools the text at its end-of-text token
            raise ConfigError("text.eos_token_id", None, "must be the end-of-text id the text is pooled at, not null")
        _check_id("text.eos_token_id", self.eos_token_id, self.vocab_size)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


@dataclass
class ClipConfig:
    """Both towers and the joint space they are projected into."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: ClipTextConfig = field(default_factory=ClipTextConfig)
    embed_dim: int = 512
    logit_scale_init: float = math.log(1 / 0.07)  # CLIP's initial temperature, 0.07
    # The ViT's learned positions start N(0, position_init_std), as large as a patch's embedding:
    # at the N(0, 0.02) of every other weight they drown under the patches and a tower trained
    # from scratch never learns where anything is (docs/shapeworld-recipe.md, sixth round).
    position_init_std: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.vision, dict):
            self.vision = VisionConfig.from_dict(self.vision)
        if isinstance(self.text, dict):
            _check_fields(ClipTextConfig, self.text, "clip text config")
            self.text = ClipTextConfig(**self.text)
        if not isinstance(self.vision, VisionConfig):
            raise ConfigError("vision", self.vision, "must be an object of vision settings")
        if not isinstance(self.text, ClipTextConfig):
            raise ConfigError("text", self.text, "must be an object of CLIP text settings")
        _check_int("embed_dim", self.embed_dim)
        self.logit_scale_init = _check_number("logit_scale_init", self.logit_scale_init)
        self.position_init_std = _check_number("position_init_std", self.position_init_std)
        if self.position_init_std < 0:
            raise ConfigError("position_init_std", self.position_init_std, "must be >= 0 (a standard deviation)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClipConfig:
        d = dict(_check_top_level(d))
        _check_fields(cls, d, "clip config")
        return cls(**d)

    @classmethod
    def tiny(cls, embed_dim: int = 128, **text: Any) -> ClipConfig:
        """The `tiny` preset's vision tower and a 2-layer, 128-wide text tower; `text` overrides
        its fields (`omnilm.data.captions.text_ids_for(tokenizer)` fits it to a tokenizer)."""
        fields = dict(vocab_size=513, dim=128, n_layers=2, n_heads=4, mlp_dim=512, max_len=77,
                      bos_token_id=1, eos_token_id=512, pad_token_id=0)
        fields.update(text)
        return cls(vision=OmniConfig.from_preset("tiny").vision, text=ClipTextConfig(**fields), embed_dim=embed_dim)
