"""Config conversion between transformers' config.json dicts and omnilm's dataclasses.

LLaVA (`LlavaConfig`: text_config + vision_config), LLaMA (`LlamaConfig`), Mixtral
(`MixtralConfig`, as a text model or as LLaVA's language model), CLIP vision
(`CLIPVisionConfig`) and both CLIP towers (`CLIPConfig`); and the processor files beside them
(`preprocessor_config.json`, `processor_config.json`). Fields a config.json leaves out take
transformers' defaults.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from omnilm.config import ClipConfig, ClipTextConfig, OmniConfig, TextConfig, VisionConfig
from omnilm.errors import OmniInputError
from omnilm.model.layers import ACTIVATIONS

# --- configs ----------------------------------------------------------------------------------

# transformers' defaults for fields a config.json may leave out.
LLAMA_DEFAULTS: dict[str, Any] = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    hidden_act="silu", max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0,
    attention_bias=False, mlp_bias=False, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=None,
)
# MixtralConfig's defaults where they differ from LlamaConfig's (Mixtral-8x7B).
MIXTRAL_DEFAULTS: dict[str, Any] = {**LLAMA_DEFAULTS, **dict(
    intermediate_size=14336, num_key_value_heads=8, max_position_embeddings=4096 * 32, rms_norm_eps=1e-5,
    rope_theta=1e6, num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.001, router_jitter_noise=0.0,
)}
TEXT_MODEL_TYPES = ("llama", "mixtral")
CLIP_VISION_DEFAULTS: dict[str, Any] = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, num_channels=3,
    image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5,
)
# What LlavaConfig builds when config.json has no vision_config: CLIP ViT-L/14 at 336 px.
LLAVA_VISION_DEFAULTS = {**CLIP_VISION_DEFAULTS, **dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    image_size=336, patch_size=14,
)}
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


def _getter(d: dict[str, Any], defaults: dict[str, Any]) -> Callable[[str], Any]:
    # transformers writes null for "use the default" (num_key_value_heads, head_dim); ids keep their null.
    def get(key: str) -> Any:
        if key.endswith("_token_id"):
            return d.get(key, defaults.get(key))
        return d[key] if d.get(key) is not None else defaults.get(key)
    return get


def _rope_from_hf(d: dict[str, Any], default_theta: float) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from 4.x `rope_theta` + `rope_scaling` or 5.x `rope_parameters`."""
    # transformers 5 also lets `rope_scaling` win over `rope_parameters` when both are there.
    params = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
    theta = params.pop("rope_theta", None) or d.get("rope_theta") or default_theta
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if kind not in ROPE_TYPES:
        raise OmniInputError(f"config.json asks for rope scaling {kind!r}; omnilm supports {', '.join(ROPE_TYPES)}")
    return float(theta), (None if kind == "default" else {"rope_type": kind, **params})


def text_config_from_hf(d: dict[str, Any]) -> TextConfig:
    """A transformers LlamaConfig or MixtralConfig dict -> TextConfig."""
    mixtral = d.get("model_type") == "mixtral"
    get = _getter(d, MIXTRAL_DEFAULTS if mixtral else LLAMA_DEFAULTS)
    if get("hidden_act") != "silu":
        raise OmniInputError(f"text hidden_act {get('hidden_act')!r} is not LLaMA's silu; omnilm cannot load it")
    window = d.get("sliding_window")
    if window is not None and window < get("max_position_embeddings"):
        raise OmniInputError(f"config.json asks for sliding-window attention ({window} tokens), which omnilm does not "
                             "implement; set sliding_window to null to attend to the whole context")
    theta, scaling = _rope_from_hf(d, get("rope_theta"))
    moe = {}
    if mixtral:  # every layer is a top-k MoE whose experts are intermediate_size wide
        # transformers' Mixtral has no z-loss: a loaded Mixtral trains as it would there.
        moe = dict(n_experts=get("num_local_experts"), n_experts_per_token=get("num_experts_per_tok"),
                   router_aux_loss_coef=get("router_aux_loss_coef"), router_jitter=get("router_jitter_noise"),
                   router_z_loss_coef=0.0)
    try:
        return TextConfig(**moe,
            vocab_size=get("vocab_size"), dim=get("hidden_size"), n_layers=get("num_hidden_layers"),
            n_heads=get("num_attention_heads"), n_kv_heads=get("num_key_value_heads") or get("num_attention_heads"),
            head_dim=d.get("head_dim"), mlp_dim=get("intermediate_size"), norm_eps=get("rms_norm_eps"),
            rope_theta=theta, rope_scaling=scaling, max_seq_len=get("max_position_embeddings"),
            attention_bias=get("attention_bias"), mlp_bias=get("mlp_bias"), tie_embeddings=get("tie_word_embeddings"),
            bos_token_id=get("bos_token_id"), eos_token_id=get("eos_token_id"),
            pad_token_id=get("pad_token_id"),
        )
    except ValueError as e:  # TextConfig's own checks (heads vs key/value heads)
        raise OmniInputError(f"config.json: {e}") from None


def _square(value: Any, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise OmniInputError(f"vision {name} {list(value)} is not square; omnilm's CLIP takes square images")
        value = value[0]
    return int(value)


def vision_config_from_hf(d: dict[str, Any], defaults: dict[str, Any] = CLIP_VISION_DEFAULTS) -> VisionConfig:
    """A transformers CLIPVisionConfig dict -> VisionConfig."""
    get = _getter(d, defaults)
    act = get("hidden_act")
    if act not in ACTIVATIONS:
        raise OmniInputError(f"vision hidden_act {act!r} is not supported; use one of {', '.join(sorted(ACTIVATIONS))}")
    return VisionConfig(
        image_size=_square(get("image_size"), "image_size"), patch_size=_square(get("patch_size"), "patch_size"),
        n_channels=get("num_channels"), dim=get("hidden_size"), n_layers=get("num_hidden_layers"),
        n_heads=get("num_attention_heads"), mlp_dim=get("intermediate_size"), norm_eps=get("layer_norm_eps"), act=act,
    )


def config_from_hf(d: dict[str, Any]) -> OmniConfig:
    """A transformers config.json dict (model_type "llava" or "llama") -> OmniConfig."""
    model_type = d.get("model_type")
    if model_type in TEXT_MODEL_TYPES:
        return OmniConfig(text=text_config_from_hf(d), vision=None)
    if model_type != "llava":
        raise OmniInputError(f"config.json has model_type {model_type!r}; omnilm loads llava, llama and mixtral "
                             "(and clip / clip_vision_model with load_vision_encoder)")
    text = dict(d.get("text_config") or {})
    text.setdefault("model_type", "llama")
    if text["model_type"] not in TEXT_MODEL_TYPES:
        raise OmniInputError(f"this LLaVA's language model is {text['model_type']!r}; omnilm's decoder is "
                             "LLaMA or Mixtral")
    # LlavaConfig ties the embeddings when either level asks for it.
    text["tie_word_embeddings"] = bool(d.get("tie_word_embeddings") or text.get("tie_word_embeddings"))
    layer = d.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise OmniInputError(f"vision_feature_layer={layer} concatenates several CLIP layers; omnilm takes one (an int)")
    act = d.get("projector_hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise OmniInputError(f"projector_hidden_act {act!r} is not supported; use one of {', '.join(sorted(ACTIVATIONS))}")
    text_cfg = text_config_from_hf(text)
    # As LlavaConfig: no vision_config at all is CLIP ViT-L/14-336; a partial one fills CLIP's defaults.
    vision = d.get("vision_config")
    vision_cfg = vision_config_from_hf(vision) if vision else vision_config_from_hf({}, LLAVA_VISION_DEFAULTS)
    try:
        return OmniConfig(
            text=text_cfg,
            vision=vision_cfg,
            image_token_id=d.get("image_token_index", d.get("image_token_id", 32000)),
            vision_feature_layer=layer,
            vision_feature_select=d.get("vision_feature_select_strategy", "default"),
            projector_act=act,
            projector_bias=d.get("multimodal_projector_bias", True),
        )
    except ValueError as e:  # OmniConfig's own checks
        raise OmniInputError(f"config.json: {e}") from None


def hf_incompatibility(cfg: OmniConfig) -> str | None:
    """Why transformers has no class for `cfg` (None when LLaVA, LLaMA or Mixtral describes it)."""
    if cfg.fusion != "joint":
        return f"LLaVA fuses jointly; transformers has no class for fusion={cfg.fusion!r}"
    t = cfg.text
    if not t.n_experts:
        return None
    if t.moe_every != 1:
        return "Mixtral has a mixture of experts in every layer (moe_every=1)"
    if t.router != "topk":
        return "Mixtral routes with top-k softmax (router='topk')"
    if t.n_shared_experts:
        return "Mixtral has no shared experts"
    if t.capacity_factor is not None:
        return "Mixtral drops no tokens (capacity_factor=None)"
    if t.mlp_bias:
        return "Mixtral's experts have no biases"
    return None


def text_config_to_hf(t: TextConfig) -> dict[str, Any]:
    scaling = dict(t.rope_scaling) if t.rope_scaling else None
    moe = {}
    if t.n_experts:  # hf_incompatibility has checked that Mixtral describes it
        moe = {"model_type": "mixtral", "intermediate_size": t.expert_dim, "num_local_experts": t.n_experts,
               "num_experts_per_tok": t.n_experts_per_token, "router_aux_loss_coef": t.router_aux_loss_coef,
               "router_jitter_noise": t.router_jitter, "output_router_logits": False, "sliding_window": None}
    return {
        "model_type": "llama",
        "vocab_size": t.vocab_size,
        "hidden_size": t.dim,
        "intermediate_size": t.mlp_dim,
        "num_hidden_layers": t.n_layers,
        "num_attention_heads": t.n_heads,
        "num_key_value_heads": t.n_kv_heads,
        "head_dim": t.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": t.max_seq_len,
        "rms_norm_eps": t.norm_eps,
        # transformers 5 reads rope_parameters (and prefers rope_scaling when that is set);
        # 4.x (from 4.43, which added "rope_type") reads rope_theta and rope_scaling.
        "rope_theta": t.rope_theta,
        "rope_scaling": scaling,
        "rope_parameters": {**(scaling or {"rope_type": "default"}), "rope_theta": t.rope_theta},
        "attention_bias": t.attention_bias,
        "attention_dropout": 0.0,
        "mlp_bias": t.mlp_bias,
        "tie_word_embeddings": t.tie_embeddings,
        "bos_token_id": t.bos_token_id,
        "eos_token_id": t.eos_token_id,
        "pad_token_id": t.pad_token_id,
        "initializer_range": 0.02,
        "use_cache": True,
        **moe,
    }


def vision_config_to_hf(v: VisionConfig) -> dict[str, Any]:
    return {
        "model_type": "clip_vision_model",
        "hidden_size": v.dim,
        "intermediate_size": v.mlp_dim,
        "num_hidden_layers": v.n_layers,
        "num_attention_heads": v.n_heads,
        "num_channels": v.n_channels,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "hidden_act": v.act,
        "layer_norm_eps": v.norm_eps,
        "attention_dropout": 0.0,
    }


def config_to_hf(cfg: OmniConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """OmniConfig -> a transformers config.json dict: LlavaForConditionalGeneration, or
    LlamaForCausalLM for a text-only model."""
    dtype_name = str(dtype).removeprefix("torch.")
    text = text_config_to_hf(cfg.text)
    if cfg.vision is None:
        arch = "MixtralForCausalLM" if cfg.text.n_experts else "LlamaForCausalLM"
        return {"architectures": [arch], **text, "dtype": dtype_name}
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "text_config": text,
        "vision_config": vision_config_to_hf(cfg.vision),
        "image_token_index": cfg.image_token_id,
        "image_seq_length": cfg.image_seq_len,
        "vision_feature_layer": cfg.vision_feature_layer,
        "vision_feature_select_strategy": cfg.vision_feature_select,
        "projector_hidden_act": cfg.projector_act,
        "multimodal_projector_bias": cfg.projector_bias,
        "tie_word_embeddings": cfg.text.tie_embeddings,
        "dtype": dtype_name,
    }

# --- processor files ------------------------------------------------------------------------------


def preprocessor_config(size: int, crop_size: int, image_mean, image_std, pad_to_square: bool = False) -> dict[str, Any]:
    """A `preprocessor_config.json` that transformers' `AutoImageProcessor` loads to CLIP's preprocessing
    (LLaVA's, with `pad_to_square`): resize the shortest edge to `size`, centre-crop, normalise."""
    d = {
        "image_processor_type": "LlavaImageProcessor" if pad_to_square else "CLIPImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": size},
        "resample": 3,  # PIL bicubic
        "do_center_crop": True,
        "crop_size": {"height": crop_size, "width": crop_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(image_mean),
        "image_std": list(image_std),
    }
    if pad_to_square:
        d["do_pad"] = True
    return d


def processor_config_to_hf(cfg: OmniConfig) -> dict[str, Any]:
    """`processor_config.json`, with which `AutoProcessor` builds a LlavaProcessor. It expands each
    <image> to (image_size / patch_size)^2 + num_additional_image_tokens tokens, minus one for the
    "default" strategy: exactly cfg.image_seq_len."""
    return {
        "processor_class": "LlavaProcessor",
        "patch_size": cfg.vision.patch_size,
        "vision_feature_select_strategy": cfg.vision_feature_select,
        "num_additional_image_tokens": 1,
        "image_token": "<image>",
    }


# --- CLIP, both towers (CLIPModel) ---------------------------------------------------------------

# transformers' CLIPTextConfig defaults, for fields a config.json leaves out.
CLIP_TEXT_DEFAULTS: dict[str, Any] = dict(
    vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
)


def clip_config_to_hf(cfg: ClipConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """ClipConfig -> a transformers CLIPModel config.json dict."""
    t = cfg.text
    text = {
        "model_type": "clip_text_model",
        "vocab_size": t.vocab_size,
        "hidden_size": t.dim,
        "intermediate_size": t.mlp_dim,
        "num_hidden_layers": t.n_layers,
        "num_attention_heads": t.n_heads,
        "max_position_embeddings": t.max_len,
        "hidden_act": t.act,
        "layer_norm_eps": t.norm_eps,
        "attention_dropout": 0.0,
        "bos_token_id": t.bos_token_id,
        "eos_token_id": t.eos_token_id,
        "pad_token_id": t.pad_token_id,
        "projection_dim": cfg.embed_dim,
    }
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "text_config": text,
        "vision_config": {**vision_config_to_hf(cfg.vision), "projection_dim": cfg.embed_dim},
        "projection_dim": cfg.embed_dim,
        "logit_scale_init_value": cfg.logit_scale_init,
        "dtype": str(dtype).removeprefix("torch."),
    }


def clip_text_config_from_hf(d: dict[str, Any]) -> ClipTextConfig:
    """A transformers CLIPTextConfig dict -> ClipTextConfig."""
    def get(key: str) -> Any:  # transformers writes null for "the default"; ids keep their null
        if key.endswith("_token_id"):
            return d.get(key, CLIP_TEXT_DEFAULTS[key])
        return d[key] if d.get(key) is not None else CLIP_TEXT_DEFAULTS[key]

    eos = get("eos_token_id")
    if not isinstance(eos, int):
        raise OmniInputError(f"text eos_token_id={eos!r}: CLIP pools the text at one end-of-text id; set an int")
    if get("hidden_act") not in ACTIVATIONS:
        raise OmniInputError(f"text hidden_act {get('hidden_act')!r} is not supported; "
                             f"use one of {', '.join(sorted(ACTIVATIONS))}")
    return ClipTextConfig(
        vocab_size=get("vocab_size"), dim=get("hidden_size"), n_layers=get("num_hidden_layers"),
        n_heads=get("num_attention_heads"), mlp_dim=get("intermediate_size"), max_len=get("max_position_embeddings"),
        norm_eps=get("layer_norm_eps"), act=get("hidden_act"), bos_token_id=get("bos_token_id"),
        eos_token_id=eos, pad_token_id=get("pad_token_id"),
    )
