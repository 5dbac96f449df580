"""Config conversion between transformers' config.json dicts and omnilm's dataclasses.

LLaVA (`LlavaConfig`: text_config + vision_config), LLaVA-NeXT-Video (`LlavaNextVideoConfig`:
LLaVA plus a video marker and a spatial pool), LLaMA (`LlamaConfig`), Mixtral (`MixtralConfig`, as
a text model or as LLaVA's language model), CLIP vision (`CLIPVisionConfig`) and both CLIP towers
(`CLIPConfig`), Voxtral (`VoxtralConfig`: a Whisper encoder's audio_config + text_config) and a
Whisper encoder (`WhisperConfig`, `VoxtralEncoderConfig`); and the processor files beside them
(`preprocessor_config.json`, `processor_config.json`). Fields a config.json leaves out take
transformers' defaults.

A LLaVA-NeXT-Video folder is read for its video path, which is LLaVA-1.5's tower and projector on
pooled frames; its still images are read as LLaVA-1.5 reads them (one view at the tower's
resolution), not with LLaVA-NeXT's "anyres" tiles, so `image_grid_pinpoints` is not used.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from omnilm.config import (ROPE_TYPES, AudioConfig, ClipConfig, ClipTextConfig, ConfigError, OmniConfig, TextConfig,
                           VisionConfig)
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
# omnilm field -> the config.json key it is read from, where the names differ, so that an error
# names the key the user sees in the file.
TEXT_KEYS = dict(dim="hidden_size", n_layers="num_hidden_layers", n_heads="num_attention_heads",
                 n_kv_heads="num_key_value_heads", mlp_dim="intermediate_size", norm_eps="rms_norm_eps",
                 max_seq_len="max_position_embeddings", tie_embeddings="tie_word_embeddings",
                 n_experts="num_local_experts", n_experts_per_token="num_experts_per_tok",
                 router_jitter="router_jitter_noise")
VISION_KEYS = dict(n_channels="num_channels", dim="hidden_size", n_layers="num_hidden_layers",
                   n_heads="num_attention_heads", mlp_dim="intermediate_size", norm_eps="layer_norm_eps", act="hidden_act")
LLAVA_KEYS = dict(image_token_id="image_token_index", vision_feature_select="vision_feature_select_strategy",
                  projector_act="projector_hidden_act", projector_bias="multimodal_projector_bias",
                  video_token_id="video_token_index", video_pool_stride="spatial_pool_stride",
                  video_pool_mode="spatial_pool_mode")
LLAVA_MODEL_TYPES = ("llava", "llava_next_video")
CLIP_TEXT_KEYS = {**VISION_KEYS, "max_len": "max_position_embeddings"}
# What VoxtralConfig puts under a text_config that leaves them out (Voxtral-Mini-3B's decoder).
VOXTRAL_TEXT_DEFAULTS: dict[str, Any] = dict(
    vocab_size=131072, hidden_size=3072, intermediate_size=8192, num_hidden_layers=30, num_key_value_heads=8,
    max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=1e8, head_dim=128,
)
# VoxtralEncoderConfig's defaults (Whisper large-v3's encoder); WhisperConfig spells the fields
# d_model, encoder_layers, encoder_attention_heads, encoder_ffn_dim, which VoxtralEncoderConfig maps.
WHISPER_ENCODER_DEFAULTS: dict[str, Any] = dict(
    hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, num_mel_bins=128,
    max_source_positions=1500, activation_function="gelu",
)
WHISPER_ALIASES = dict(d_model="hidden_size", encoder_layers="num_hidden_layers",
                       encoder_attention_heads="num_attention_heads", encoder_ffn_dim="intermediate_size")
AUDIO_KEYS = dict(n_mels="num_mel_bins", dim="hidden_size", n_layers="num_hidden_layers",
                  n_heads="num_attention_heads", mlp_dim="intermediate_size", act="activation_function",
                  frames_per_token="intermediate_size")
VOXTRAL_KEYS = dict(audio_token_id="audio_token_id", audio_projector_act="projector_hidden_act")
CLIP_KEYS = dict(embed_dim="projection_dim", logit_scale_init="logit_scale_init_value")


def build_config(make: Callable[[], Any], where: str, section: str = "", keys: dict[str, str] | None = None,
                 nested: dict[str, tuple[str, dict[str, str]]] | None = None) -> Any:
    """`make()`, a config's own ValueError turned into a one-line OmniInputError that names the file
    (`where`) and, for one bad field, its config.json key (`section` + the name `keys` maps it to;
    a field of a nested config, "text.dim", takes the section and keys `nested["text"]` gives)."""
    try:
        return make()
    except OmniInputError:
        raise
    except ConfigError as e:
        head, _, name = e.field.rpartition(".")
        if nested and head in nested:
            section, keys = nested[head]
        elif keys is None:  # an omnilm file: its dotted field names are the file's own
            raise OmniInputError(f"{where}: {e}") from None
        base = name.split("[")[0]  # eos_token_id[1]: one id of a list
        raise OmniInputError(f"{where}: {e.with_field(section + keys.get(base, base) + name[len(base):])}") from None
    except ValueError as e:  # a check across fields (heads vs key/value heads, fusion vs vocabulary)
        raise OmniInputError(f"{where}: {e}") from None


def _object(d: Any, where: str, name: str) -> dict[str, Any]:
    # Every conversion below reads its dict with .get: anything else must fail here, by name.
    if not isinstance(d, dict):
        text = repr(d) if len(repr(d)) <= 60 else repr(d)[:57] + "..."
        raise OmniInputError(f"{where}: {name} is {text}, not an object of settings; fix it or save the model again")
    return d


def _getter(d: dict[str, Any], defaults: dict[str, Any]) -> Callable[[str], Any]:
    # transformers writes null for "use the default" (num_key_value_heads, head_dim); ids keep their null.
    def get(key: str) -> Any:
        if key.endswith("_token_id"):
            return d.get(key, defaults.get(key))
        return d[key] if d.get(key) is not None else defaults.get(key)
    return get


def _rope_from_hf(d: dict[str, Any], default_theta: float, where: str = "config.json",
                  section: str = "") -> tuple[Any, dict | None]:
    """(rope_theta, rope_scaling) from 4.x `rope_theta` + `rope_scaling` or 5.x `rope_parameters`."""
    for key in ("rope_scaling", "rope_parameters"):
        if d.get(key) is not None:
            _object(d[key], where, section + key)
    # transformers 5 also lets `rope_scaling` win over `rope_parameters` when both are there.
    params = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
    theta = params.pop("rope_theta", None)
    theta = theta if theta is not None else d.get("rope_theta")
    theta = theta if theta is not None else default_theta
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if not isinstance(kind, str) or kind not in ROPE_TYPES:
        raise OmniInputError(f"{where}: {section}rope_scaling asks for rope scaling {kind!r}; omnilm supports "
                             f"{', '.join(ROPE_TYPES)}")
    return theta, (None if kind == "default" else {"rope_type": kind, **params})


def text_config_from_hf(d: dict[str, Any], where: str = "config.json", section: str = "") -> TextConfig:
    """A transformers LlamaConfig or MixtralConfig dict -> TextConfig; errors name `where` and `section`
    (the key path in config.json: "text_config." inside a LLaVA)."""
    d = _object(d, where, section.rstrip(".") or "the config")
    mixtral = d.get("model_type") == "mixtral"
    get = _getter(d, MIXTRAL_DEFAULTS if mixtral else LLAMA_DEFAULTS)
    if get("hidden_act") != "silu":
        raise OmniInputError(f"{where}: {section}hidden_act {get('hidden_act')!r} is not LLaMA's silu; "
                             "omnilm cannot load it")
    theta, scaling = _rope_from_hf(d, get("rope_theta"), where, section)
    moe = {}
    if mixtral:  # every layer is a top-k MoE whose experts are intermediate_size wide
        # transformers' Mixtral has no z-loss: a loaded Mixtral trains as it would there.
        moe = dict(n_experts=get("num_local_experts"), n_experts_per_token=get("num_experts_per_tok"),
                   router_aux_loss_coef=get("router_aux_loss_coef"), router_jitter=get("router_jitter_noise"),
                   router_z_loss_coef=0.0)
        if moe["n_experts"] == 0:  # omnilm would read 0 as a dense decoder, which a Mixtral never is
            raise OmniInputError(f"{where}: {section}num_local_experts=0 must be at least 1: every layer of a Mixtral "
                                 "is a mixture of experts")
    n_kv_heads = get("num_key_value_heads")  # null or absent: as many as the query heads
    text = build_config(lambda: TextConfig(**moe,
        vocab_size=get("vocab_size"), dim=get("hidden_size"), n_layers=get("num_hidden_layers"),
        n_heads=get("num_attention_heads"), n_kv_heads=n_kv_heads if n_kv_heads is not None else get("num_attention_heads"),
        head_dim=d.get("head_dim"), mlp_dim=get("intermediate_size"), norm_eps=get("rms_norm_eps"),
        rope_theta=theta, rope_scaling=scaling, max_seq_len=get("max_position_embeddings"),
        attention_bias=get("attention_bias"), mlp_bias=get("mlp_bias"), tie_embeddings=get("tie_word_embeddings"),
        bos_token_id=get("bos_token_id"), eos_token_id=get("eos_token_id"),
        pad_token_id=get("pad_token_id"),
    ), where, section, TEXT_KEYS)
    window = d.get("sliding_window")
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
        raise OmniInputError(f"{where}: {section}sliding_window={window!r} must be a positive integer or null")
    if window is not None and window < text.max_seq_len:
        raise OmniInputError(f"{where} asks for sliding-window attention ({window} tokens), which omnilm does not "
                             "implement; set sliding_window to null to attend to the whole context")
    return text


def _square(value: Any, name: str, where: str, section: str) -> Any:
    if isinstance(value, (list, tuple)):
        if not value or any(v != value[0] for v in value):
            raise OmniInputError(f"{where}: {section}{name}={list(value)} is not square; omnilm's CLIP takes square "
                                 "images: give one size")
        value = value[0]
    return value  # its type and range: VisionConfig's checks


def vision_config_from_hf(d: dict[str, Any], defaults: dict[str, Any] = CLIP_VISION_DEFAULTS,
                          where: str = "config.json", section: str = "") -> VisionConfig:
    """A transformers CLIPVisionConfig dict -> VisionConfig; errors name `where` and `section`."""
    d = _object(d, where, section.rstrip(".") or "the config")
    get = _getter(d, defaults)
    act = get("hidden_act")
    if not isinstance(act, str) or act not in ACTIVATIONS:
        raise OmniInputError(f"{where}: {section}hidden_act {act!r} is not supported; "
                             f"use one of {', '.join(sorted(ACTIVATIONS))}")
    image_size = _square(get("image_size"), "image_size", where, section)
    patch_size = _square(get("patch_size"), "patch_size", where, section)
    return build_config(lambda: VisionConfig(
        image_size=image_size, patch_size=patch_size, n_channels=get("num_channels"), dim=get("hidden_size"),
        n_layers=get("num_hidden_layers"), n_heads=get("num_attention_heads"), mlp_dim=get("intermediate_size"),
        norm_eps=get("layer_norm_eps"), act=act,
    ), where, section, VISION_KEYS)


def config_from_hf(d: dict[str, Any], where: str = "config.json") -> OmniConfig:
    """A transformers config.json dict (model_type "llava", "llava_next_video", "llama" or "mixtral")
    -> OmniConfig; every error is a one-line OmniInputError naming `where` (the file) and the key."""
    d = _object(d, where, "the config")
    model_type = d.get("model_type")
    if model_type in TEXT_MODEL_TYPES:
        text_cfg = text_config_from_hf(d, where)
        return build_config(lambda: OmniConfig(text=text_cfg, vision=None), where, nested={"text": ("", TEXT_KEYS)})
    if model_type == "voxtral":
        return voxtral_config_from_hf(d, where)
    if model_type not in LLAVA_MODEL_TYPES:
        raise OmniInputError(f"{where} has model_type {model_type!r}; omnilm loads llava, llava_next_video, voxtral, "
                             "llama and mixtral (and clip / clip_vision_model with load_vision_encoder)")
    video = model_type == "llava_next_video"
    if video and d.get("spatial_pool_mode", "average") not in ("average", "max"):
        raise OmniInputError(f"{where}: spatial_pool_mode={d['spatial_pool_mode']!r}; omnilm pools video frames "
                             "without weights, by \"average\" (the mode LLaVA-NeXT-Video was trained with) or \"max\"")
    text = d.get("text_config")
    text = dict(_object(text if text is not None else {}, where, "text_config"))
    text.setdefault("model_type", "llama")
    if text["model_type"] not in TEXT_MODEL_TYPES:
        raise OmniInputError(f"{where}: this LLaVA's language model is {text['model_type']!r}; omnilm's decoder is "
                             "LLaMA or Mixtral")
    # LlavaConfig ties the embeddings when either level asks for it.
    outer = d.get("tie_word_embeddings")
    if outer is not None and not isinstance(outer, bool):
        raise OmniInputError(f"{where}: tie_word_embeddings={outer!r} must be true or false")
    if outer:
        text["tie_word_embeddings"] = True
    layer = d.get("vision_feature_layer", -2)
    if isinstance(layer, list):
        raise OmniInputError(f"{where}: vision_feature_layer={layer} concatenates several CLIP layers; omnilm takes "
                             "one (an int)")
    act = d.get("projector_hidden_act", "gelu")
    if not isinstance(act, str) or act not in ACTIVATIONS:
        raise OmniInputError(f"{where}: projector_hidden_act {act!r} is not supported; "
                             f"use one of {', '.join(sorted(ACTIVATIONS))}")
    text_cfg = text_config_from_hf(text, where, "text_config.")
    # As LlavaConfig: no vision_config at all is CLIP ViT-L/14-336; a partial one fills CLIP's defaults.
    vision = d.get("vision_config")
    vision_cfg = (vision_config_from_hf(vision, where=where, section="vision_config.") if vision is not None
                  else vision_config_from_hf({}, LLAVA_VISION_DEFAULTS, where))
    image_key = "image_token_index" if "image_token_index" in d or "image_token_id" not in d else "image_token_id"
    video_key = "video_token_index" if "video_token_index" in d or "video_token_id" not in d else "video_token_id"
    return build_config(lambda: OmniConfig(
        text=text_cfg,
        vision=vision_cfg,
        # LlavaNextVideoConfig's defaults: the video marker 32000, the image marker after it.
        image_token_id=d.get(image_key, 32001 if video else 32000),
        video_token_id=d.get(video_key, 32000) if video else None,
        video_pool_stride=d.get("spatial_pool_stride", 2) if video else 2,
        video_pool_mode=d.get("spatial_pool_mode", "average") if video else "average",
        vision_feature_layer=layer,
        vision_feature_select=d.get("vision_feature_select_strategy", "default"),
        projector_act=act,
        projector_bias=d.get("multimodal_projector_bias", True),
    ), where, "", {**LLAVA_KEYS, "image_token_id": image_key, "video_token_id": video_key},
        nested={"text": ("text_config.", TEXT_KEYS), "vision": ("vision_config.", VISION_KEYS)})


def audio_config_from_hf(d: dict[str, Any], where: str = "config.json", section: str = "") -> AudioConfig:
    """A VoxtralEncoderConfig (or WhisperConfig) dict -> AudioConfig; Voxtral's projector joins
    intermediate_size // hidden_size frames, so the encoder's feed-forward width must be a multiple
    of its width."""
    d = _object(d, where, section.rstrip(".") or "the config")
    d = {WHISPER_ALIASES.get(k, k): v for k, v in d.items()}
    get = _getter(d, WHISPER_ENCODER_DEFAULTS)
    dim, ffn = get("hidden_size"), get("intermediate_size")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (dim, ffn)) or ffn % dim:
        raise OmniInputError(f"{where}: {section}intermediate_size={ffn!r} must be a multiple of hidden_size={dim!r}: "
                             "Voxtral joins intermediate_size / hidden_size encoder frames into one audio token")
    return build_config(lambda: AudioConfig(
        n_mels=get("num_mel_bins"), dim=dim, n_layers=get("num_hidden_layers"), n_heads=get("num_attention_heads"),
        mlp_dim=ffn, max_source_positions=get("max_source_positions"), act=get("activation_function"),
        frames_per_token=ffn // dim,
    ), where, section, AUDIO_KEYS)


def voxtral_config_from_hf(d: dict[str, Any], where: str = "config.json") -> OmniConfig:
    """A VoxtralConfig dict -> OmniConfig: no vision tower, the Whisper encoder and a LLaMA decoder."""
    text = d.get("text_config")
    text = {**VOXTRAL_TEXT_DEFAULTS, **_object(text if text is not None else {}, where, "text_config")}
    text.setdefault("model_type", "llama")
    if text["model_type"] not in TEXT_MODEL_TYPES:
        raise OmniInputError(f"{where}: this Voxtral's language model is {text['model_type']!r}; omnilm's decoder is "
                             "LLaMA or Mixtral")
    audio = d.get("audio_config")
    audio_cfg = audio_config_from_hf(audio if audio is not None else {}, where, "audio_config.")
    text_cfg = text_config_from_hf(text, where, "text_config.")
    return build_config(lambda: OmniConfig(
        text=text_cfg, vision=None, audio=audio_cfg,
        audio_token_id=d.get("audio_token_id", 24),  # VoxtralConfig's default id (Voxtral-Mini's [AUDIO])
        audio_projector_act=d.get("projector_hidden_act", "gelu"),
    ), where, "", VOXTRAL_KEYS, nested={"text": ("text_config.", TEXT_KEYS), "audio": ("audio_config.", AUDIO_KEYS)})


def hf_incompatibility(cfg: OmniConfig) -> str | None:
    """Why transformers has no class for `cfg` (None when LLaVA, LLaVA-NeXT-Video, Voxtral, LLaMA or
    Mixtral describes it)."""
    if cfg.quantization is not None:
        return f"transformers reads no omnilm {cfg.quantization.method} weights (omnilm quantize)"
    if cfg.audio is not None and cfg.vision is not None:
        return "transformers has no class that reads both images and audio (Voxtral hears, LLaVA sees)"
    if cfg.audio is not None and cfg.audio.mlp_dim != cfg.audio.frames_per_token * cfg.audio.dim:
        return ("Voxtral reads audio.frames_per_token from the encoder's feed-forward width: it needs audio.mlp_dim "
                "== frames_per_token * audio.dim")
    if cfg.fusion != "joint":
        return f"LLaVA fuses jointly; transformers has no class for fusion={cfg.fusion!r}"
    if cfg.video_token_id is not None and cfg.video_pool_mode == "concat":
        return "LLaVA-NeXT-Video pools video frames by average or max, not video_pool_mode='concat'"
    if cfg.video_token_id is not None and cfg.video_motion:
        return "LLaVA-NeXT-Video reads no motion features (video_motion)"
    t = cfg.text
    if t.logn_attention:
        return "LLaMA has no log-n attention scaling (text.logn_attention)"
    if t.token_conv:
        return "LLaMA has no token convolution (text.token_conv)"
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


def audio_config_to_hf(a: AudioConfig) -> dict[str, Any]:
    """AudioConfig -> a VoxtralEncoderConfig dict (the encoder's feed-forward width is also the
    projector's input, frames_per_token * hidden_size: hf_incompatibility checks it)."""
    return {"model_type": "voxtral_encoder", "num_mel_bins": a.n_mels, "hidden_size": a.dim,
            "num_hidden_layers": a.n_layers, "num_attention_heads": a.n_heads, "intermediate_size": a.mlp_dim,
            "max_source_positions": a.max_source_positions, "activation_function": a.act, "scale_embedding": False,
            "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0, "layerdrop": 0.0}


def config_to_hf(cfg: OmniConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """OmniConfig -> a transformers config.json dict: LlavaForConditionalGeneration (or
    LlavaNextVideoForConditionalGeneration with video), VoxtralForConditionalGeneration with audio,
    or LlamaForCausalLM (MixtralForCausalLM) for a text-only model."""
    dtype_name = str(dtype).removeprefix("torch.")
    text = text_config_to_hf(cfg.text)
    if cfg.audio is not None:  # hf_incompatibility has checked that Voxtral describes it
        return {"architectures": ["VoxtralForConditionalGeneration"], "model_type": "voxtral",
                "audio_config": audio_config_to_hf(cfg.audio), "text_config": text,
                "audio_token_id": cfg.audio_token_id, "projector_hidden_act": cfg.audio_projector_act,
                "hidden_size": cfg.text.dim, "dtype": dtype_name}
    if cfg.vision is None:
        arch = "MixtralForCausalLM" if cfg.text.n_experts else "LlamaForCausalLM"
        return {"architectures": [arch], **text, "dtype": dtype_name}
    # transformers' LLaVA-NeXT-Video initialises `image_newline` (its anyres row separator, which
    # omnilm neither uses nor writes) when it loads the folder; videos do not touch it.
    video = {} if cfg.video_token_id is None else {
        "architectures": ["LlavaNextVideoForConditionalGeneration"],
        "model_type": "llava_next_video",
        "video_token_index": cfg.video_token_id,
        "spatial_pool_mode": cfg.video_pool_mode,
        "spatial_pool_stride": cfg.video_pool_stride,
    }
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
        **video,
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


def clip_text_config_from_hf(d: dict[str, Any], where: str = "config.json",
                             section: str = "text_config.") -> ClipTextConfig:
    """A transformers CLIPTextConfig dict -> ClipTextConfig; errors name `where` and `section`."""
    d = _object(d, where, section.rstrip(".") or "the config")

    def get(key: str) -> Any:  # transformers writes null for "the default"; ids keep their null
        if key.endswith("_token_id"):
            return d.get(key, CLIP_TEXT_DEFAULTS[key])
        return d[key] if d.get(key) is not None else CLIP_TEXT_DEFAULTS[key]

    eos = get("eos_token_id")
    if not isinstance(eos, int) or isinstance(eos, bool):
        raise OmniInputError(f"{where}: {section}eos_token_id={eos!r}: CLIP pools the text at one end-of-text id; "
                             "set an int")
    return build_config(lambda: ClipTextConfig(
        vocab_size=get("vocab_size"), dim=get("hidden_size"), n_layers=get("num_hidden_layers"),
        n_heads=get("num_attention_heads"), mlp_dim=get("intermediate_size"), max_len=get("max_position_embeddings"),
        norm_eps=get("layer_norm_eps"), act=get("hidden_act"), bos_token_id=get("bos_token_id"),
        eos_token_id=eos, pad_token_id=get("pad_token_id"),
    ), where, section, CLIP_TEXT_KEYS)


def clip_config_from_hf(d: dict[str, Any], vision: VisionConfig, where: str = "config.json") -> ClipConfig:
    """A transformers CLIPConfig dict, its vision tower already read (`vision`), -> ClipConfig."""
    d = _object(d, where, "the config")
    text = d.get("text_config")
    text = clip_text_config_from_hf(text if text is not None else {}, where)
    embed_dim, scale = d.get("projection_dim"), d.get("logit_scale_init_value")  # null: transformers' default
    return build_config(lambda: ClipConfig(vision=vision, text=text, embed_dim=512 if embed_dim is None else embed_dim,
                                           logit_scale_init=math.log(1 / 0.07) if scale is None else scale),
                        where, "", CLIP_KEYS)
