"""Hugging Face interop: read and write LLaVA, LLaMA and CLIP folders (safetensors only, never pickle).

`OmniModel.from_pretrained` and `OmniModel.save_pretrained` call `load_pretrained` and
`save_pretrained` here; `load_vision_encoder` reads a CLIP (or LLaVA) folder's vision tower.

A folder's config is `omnilm.json` when present (our exact config, written by us), else its
`config.json` converted: model_type "llava" (CLIP + projector + LLaMA), "llama" (text-only),
"clip_vision_model" or "clip" (vision tower only). Weights are `model.safetensors` or the shards
listed in `model.safetensors.index.json`; every known key layout loads (see KEYS_FROM_HF).

We write the layout of the llava-hf hub checkpoints (the transformers 4.x names). Every
transformers version with LLaVA reads it, 5.x included, and 5.x itself re-saves a hub
checkpoint in that layout. (A LLaVA that 5.x builds from scratch is saved with
`vision_tower.encoder...`, without `vision_model.`, which 4.x cannot read.)
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from omnilm.config import OmniConfig, TextConfig, VisionConfig
from omnilm.errors import OmniInputError
from omnilm.model.layers import ACTIVATIONS
from omnilm.model.vision import VisionTransformer

# --- key layouts ------------------------------------------------------------------------------
#
# Checkpoint key -> omnilm key. For each folder kind, the first prefix rule that matches renames
# the key's prefix; then every layer rule applies. A key no rule matches keeps its name, so a
# file in omnilm's own names loads too.
#
#   LLaVA   transformers 4.x (hub)  vision_tower.vision_model.encoder.layers.N.self_attn.out_proj
#                                   multi_modal_projector.linear_{1,2}
#                                   language_model.model.{embed_tokens,layers,norm}, language_model.lm_head
#           transformers 4.52-4.57  model.vision_tower.vision_model..., model.multi_modal_projector...,
#                                   model.language_model.{embed_tokens,layers,norm}, lm_head
#           transformers 5.x        as 4.x, but a freshly built model drops `vision_model.`
#                                   (in memory it is model.vision_tower.encoder..., as 4.52)
#   LLaMA   model.{embed_tokens,layers,norm}, lm_head
#   CLIP    vision_model.{embeddings,pre_layrnorm,encoder.layers,post_layernorm} (4.x, CLIPModel),
#           the same without `vision_model.` (5.x CLIPVisionModel)

KEYS_FROM_HF: dict[str, list[tuple[str, str]]] = {
    "llava": [
        (r"(model\.)?vision_tower\.(vision_model\.)?", "vision."),
        (r"(model\.)?multi_modal_projector\.linear_1\.", "projector.fc1."),
        (r"(model\.)?multi_modal_projector\.linear_2\.", "projector.fc2."),
        (r"(language_model\.)?lm_head\.", "lm_head."),
        (r"(model\.)?language_model\.(model\.)?", "llm."),
    ],
    "llama": [
        (r"model\.", "llm."),
    ],
    "clip": [
        (r"(vision_model\.)?(?=embeddings\.|pre_layrnorm\.|encoder\.|post_layernorm\.)", "vision."),
    ],
}
LAYER_RULES = [
    (r"^vision\.encoder\.layers\.", "vision.layers."),  # CLIP keeps its blocks under `encoder.`
    (r"\.self_attn\.out_proj\.", ".self_attn.o_proj."),  # CLIP's name for the output projection
]
# Harmless keys some checkpoints carry: buffers transformers recomputes, and CLIP's text side.
IGNORED_KEYS = re.compile(r"(rotary_emb\.inv_freq|position_ids)$"
                          r"|^(text_model\.|text_projection\.|visual_projection\.|logit_scale$)")

# omnilm key -> the key we write (first match wins).
KEYS_TO_HF: dict[str, list[tuple[str, str]]] = {
    "llava": [
        (r"vision\.layers\.(\d+)\.self_attn\.o_proj\.",
         r"vision_tower.vision_model.encoder.layers.\1.self_attn.out_proj."),
        (r"vision\.layers\.", "vision_tower.vision_model.encoder.layers."),
        (r"vision\.", "vision_tower.vision_model."),
        (r"projector\.fc1\.", "multi_modal_projector.linear_1."),
        (r"projector\.fc2\.", "multi_modal_projector.linear_2."),
        (r"llm\.", "language_model.model."),
        (r"lm_head\.", "language_model.lm_head."),
    ],
    "llama": [
        (r"llm\.", "model."),
    ],
}


def key_from_hf(key: str, kind: str) -> str:
    """The omnilm name of checkpoint key `key` in a folder of `kind` ("llava", "llama", "clip")."""
    for pattern, repl in KEYS_FROM_HF[kind]:
        new = re.sub("^" + pattern, repl, key, count=1)
        if new != key:
            key = new
            break
    for pattern, repl in LAYER_RULES:
        key = re.sub(pattern, repl, key)
    return key


def key_to_hf(key: str, kind: str) -> str:
    for pattern, repl in KEYS_TO_HF[kind]:
        new = re.sub("^" + pattern, repl, key, count=1)
        if new != key:
            return new
    return key


# --- configs ----------------------------------------------------------------------------------

# transformers' defaults for fields a config.json may leave out.
LLAMA_DEFAULTS: dict[str, Any] = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    hidden_act="silu", max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0,
    attention_bias=False, mlp_bias=False, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=None,
)
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


def _rope_from_hf(d: dict[str, Any]) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from 4.x `rope_theta` + `rope_scaling` or 5.x `rope_parameters`."""
    # transformers 5 also lets `rope_scaling` win over `rope_parameters` when both are there.
    params = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
    theta = params.pop("rope_theta", None) or d.get("rope_theta") or LLAMA_DEFAULTS["rope_theta"]
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if kind not in ROPE_TYPES:
        raise OmniInputError(f"config.json asks for rope scaling {kind!r}; omnilm supports {', '.join(ROPE_TYPES)}")
    return float(theta), (None if kind == "default" else {"rope_type": kind, **params})


def text_config_from_hf(d: dict[str, Any]) -> TextConfig:
    """A transformers LlamaConfig dict -> TextConfig."""
    get = _getter(d, LLAMA_DEFAULTS)
    if get("hidden_act") != "silu":
        raise OmniInputError(f"text hidden_act {get('hidden_act')!r} is not LLaMA's silu; omnilm cannot load it")
    eos = get("eos_token_id")
    theta, scaling = _rope_from_hf(d)
    try:
        return TextConfig(
            vocab_size=get("vocab_size"), dim=get("hidden_size"), n_layers=get("num_hidden_layers"),
            n_heads=get("num_attention_heads"), n_kv_heads=get("num_key_value_heads") or get("num_attention_heads"),
            head_dim=d.get("head_dim"), mlp_dim=get("intermediate_size"), norm_eps=get("rms_norm_eps"),
            rope_theta=theta, rope_scaling=scaling, max_seq_len=get("max_position_embeddings"),
            attention_bias=get("attention_bias"), mlp_bias=get("mlp_bias"), tie_embeddings=get("tie_word_embeddings"),
            bos_token_id=get("bos_token_id"), eos_token_id=eos[0] if isinstance(eos, list) else eos,  # first stop id
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
    if model_type == "llama":
        return OmniConfig(text=text_config_from_hf(d), vision=None)
    if model_type != "llava":
        raise OmniInputError(f"config.json has model_type {model_type!r}; omnilm loads llava and llama "
                             "(and clip / clip_vision_model with load_vision_encoder)")
    text = dict(d.get("text_config") or {})
    if text.get("model_type", "llama") != "llama":
        raise OmniInputError(f"this LLaVA's language model is {text['model_type']!r}; omnilm's decoder is LLaMA")
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


def text_config_to_hf(t: TextConfig) -> dict[str, Any]:
    scaling = dict(t.rope_scaling) if t.rope_scaling else None
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
        return {"architectures": ["LlamaForCausalLM"], **text, "dtype": dtype_name}
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


# --- reading a folder -------------------------------------------------------------------------


def _folder(path: str | Path) -> Path:
    folder = Path(path)
    if not folder.exists():
        raise OmniInputError(f"no such folder: {folder}")
    if not folder.is_dir():
        raise OmniInputError(f"{folder} is a file; pass the folder that holds config.json and the weights")
    return folder


def _read_json(file: Path) -> dict[str, Any]:
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OmniInputError(f"{file} is not valid JSON ({e}); download or save the model again") from None


def read_config(path: str | Path) -> tuple[OmniConfig | VisionConfig, str, str]:
    """(config, kind, source) of a model folder. kind is "llava", "llama" or "clip" (a
    VisionConfig); source is the file the config came from."""
    folder = _folder(path)
    if (folder / "omnilm.json").is_file():
        try:
            cfg = OmniConfig.load(folder / "omnilm.json")
        except (ValueError, TypeError) as e:
            raise OmniInputError(f"{folder / 'omnilm.json'}: {e}") from None
        return cfg, ("llava" if cfg.vision is not None else "llama"), "omnilm.json"
    if not (folder / "config.json").is_file():
        raise OmniInputError(f"{folder} has no config.json (nor omnilm.json): pass a folder saved by omnilm or transformers")
    d = _read_json(folder / "config.json")
    if d.get("model_type") in ("clip", "clip_vision_model"):
        vision = d.get("vision_config", d) if d["model_type"] == "clip" else d
        cfg: OmniConfig | VisionConfig = vision_config_from_hf(vision or {})
        kind = "clip"
    else:
        cfg = config_from_hf(d)
        kind = "llava" if cfg.vision is not None else "llama"
    # The image normalisation lives in the image processor's file, when there is one.
    vision_cfg = cfg if isinstance(cfg, VisionConfig) else cfg.vision
    pre = folder / "preprocessor_config.json"
    if vision_cfg is not None and pre.is_file():
        p = _read_json(pre)
        for key in ("image_mean", "image_std"):
            if isinstance(p.get(key), list) and len(p[key]) == vision_cfg.n_channels:
                setattr(vision_cfg, key, tuple(float(x) for x in p[key]))
    return cfg, kind, "config.json"


def _weight_files(folder: Path) -> list[Path]:
    # Same order of preference as transformers: one file, then an index of shards.
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(_read_json(index).get("weight_map", {}).values()))
        for name in names:
            if not (folder / name).is_file():
                raise OmniInputError(f"{index.name} lists {name}, which is not in {folder}: the download is incomplete")
        if not names:
            raise OmniInputError(f"{index} has an empty weight_map; download or save the model again")
        return [folder / name for name in names]
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise OmniInputError(
            f"{folder} holds only pickle weights ({pickles[0]}); omnilm reads safetensors only, since unpickling "
            "can run code: convert once with transformers (from_pretrained, then save_pretrained writes model.safetensors)"
        )
    raise OmniInputError(f"{folder} has no model.safetensors nor model.safetensors.index.json: the weights are missing")


def _few(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _read_weights(folder: Path, kind: str, dtype: torch.dtype | str | None,
                  device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a folder under omnilm names, cast and moved; and each name's checkpoint key."""
    from safetensors import SafetensorError, safe_open

    state: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for file in _weight_files(folder):
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    if IGNORED_KEYS.search(key):
                        continue
                    name = key_from_hf(key, kind)
                    if name in state:
                        raise OmniInputError(
                            f"{file.name}: {key} and {origin[name]} are both {name}; the checkpoint mixes two layouts")
                    t = f.get_tensor(key)
                    if dtype != "auto" and t.is_floating_point():
                        t = t.to(dtype or torch.float32)
                    state[name], origin[name] = t.to(device), key
        except SafetensorError as e:
            raise OmniInputError(
                f"cannot read {file} ({e}): the file is truncated or corrupt; download or save it again"
            ) from None
    return state, origin


def _assign(module: nn.Module, state: dict[str, torch.Tensor], origin: dict[str, str], folder: Path,
            source: str, skip: tuple[str, ...] = ()) -> None:
    """Check `state` against `module`'s parameters (names, shapes), then load it without a copy."""
    expected = {k: v for k, v in module.state_dict().items() if k not in skip}
    missing = [k for k in expected if k not in state]
    if missing:
        raise OmniInputError(
            f"{folder}: the checkpoint is missing {len(missing)} weight(s) that {source} implies ({_few(missing)}); "
            f"is {source} the right one, and the download complete?"
        )
    unexpected = [origin.get(k, k) for k in state if k not in expected]
    if unexpected:
        raise OmniInputError(
            f"{folder}: the checkpoint has {len(unexpected)} unexpected weight(s) that {source} does not describe "
            f"({_few(unexpected)}); is {source} the right one?"
        )
    for k, want in expected.items():
        if state[k].shape != want.shape:
            raise OmniInputError(
                f"{source} does not match the weights: {k} ({origin[k]}) is {tuple(state[k].shape)} in the checkpoint, "
                f"the config implies {tuple(want.shape)}"
            )
    module.load_state_dict(state, strict=False, assign=True)  # only `skip` is left out; the caller fills it


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | str | None:
    if isinstance(dtype, str) and dtype != "auto":
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise OmniInputError(f"dtype {dtype!r} is not a torch dtype; use e.g. float32, bfloat16, float16 or 'auto'")
        return getattr(torch, dtype)
    return dtype


def load_pretrained(cls: type, path: str | Path, device: str | torch.device | None = None,
                    dtype: torch.dtype | str | None = None):
    """An OmniModel (`cls`) from an omnilm or transformers LLaVA / LLaMA folder.

    `dtype`: None loads float32 (as transformers does); "auto" keeps the checkpoint's dtype;
    a torch dtype (or its name) casts to it. The folder's tokenizer.json, if any, becomes
    `model.tokenizer`.
    """
    folder = _folder(path)
    cfg, kind, source = read_config(folder)
    if kind == "clip":
        raise OmniInputError(f"{folder} holds a CLIP encoder, not a language model: "
                             "read it with omnilm.model.hf.load_vision_encoder(path)")
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = cls(cfg)
    state, origin = _read_weights(folder, kind, _dtype(dtype), device)
    tied = cfg.text.tie_embeddings
    if tied:
        # A tied checkpoint may store the head or not; either way it is the embedding matrix.
        state.pop("lm_head.weight", None)
    _assign(model, state, origin, folder, source, skip=("lm_head.weight",) if tied else ())
    if tied:
        model.lm_head.weight = model.llm.embed_tokens.weight
    if (folder / "tokenizer.json").is_file():
        try:
            from omnilm.data.tokenizer import Tokenizer
        except ImportError:  # the data package is optional here
            return model.eval()
        model.tokenizer = Tokenizer.from_file(folder)
        check_tokenizer(cfg, model.tokenizer, folder)
    return model.eval()


def check_tokenizer(cfg: OmniConfig, tokenizer, where: str | Path) -> None:
    """The tokenizer's <image> must be the id the model replaces with image features."""
    if cfg.vision is not None and tokenizer.image_token_id != cfg.image_token_id:
        raise OmniInputError(
            f"{where}: the tokenizer's <image> is id {tokenizer.image_token_id} but the model's image_token_id is "
            f"{cfg.image_token_id}; set config image_token_id to the tokenizer's id"
        )


def load_vision_encoder(path: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | str | None = None) -> VisionTransformer:
    """The CLIP ViT of a CLIP, CLIP-vision or LLaVA folder (e.g. to start a LLaVA from a
    pretrained encoder). `dtype` as in `load_pretrained`."""
    folder = _folder(path)
    cfg, kind, source = read_config(folder)
    vision_cfg = cfg if isinstance(cfg, VisionConfig) else cfg.vision
    if vision_cfg is None:
        raise OmniInputError(f"{folder} holds a text-only model; it has no vision encoder")
    with torch.device("meta"):
        encoder = VisionTransformer(vision_cfg)
    state, origin = _read_weights(folder, kind, _dtype(dtype), torch.device(device or "cpu"))
    if kind != "clip":  # a whole LLaVA: keep its vision tower
        state = {k: v for k, v in state.items() if k.startswith("vision.")}
    state = {k.removeprefix("vision."): v for k, v in state.items()}
    origin = {k.removeprefix("vision."): v for k, v in origin.items()}
    _assign(encoder, state, origin, folder, source)
    return encoder.eval()


# --- writing a folder -------------------------------------------------------------------------

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """Bytes in `size`: an int, or a string such as "5GB", "500MB", "2GiB" (GB = 10^9, as transformers)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(size).upper())
    if not m or (m.group(2) or "B") not in _UNITS:
        raise OmniInputError(f"max_shard_size={size!r} is not a size; use bytes (an int) or a string like '500MB'")
    return int(float(m.group(1)) * _UNITS[m.group(2) or "B"])


def _atomic_write(file: Path, write: Callable[[str], None]) -> None:
    # Write beside the target, then rename: a crash leaves the old file or the new one, never half.
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_text(file: Path, text: str) -> None:
    _atomic_write(file, lambda tmp: Path(tmp).write_text(text))


def save_pretrained(model, path: str | Path, max_shard_size: int | str = "5GB") -> None:
    """Write `model` as a transformers folder (LLaVA, or LLaMA when text-only) plus omnilm.json.

    Shards of at most `max_shard_size` (a tensor larger than that gets its own shard), each written
    atomically; the index last. A tied head is stored once, as the embedding matrix.
    """
    from safetensors.torch import save_file

    cfg: OmniConfig = model.config
    if getattr(model, "tokenizer", None) is not None:
        check_tokenizer(cfg, model.tokenizer, "save_pretrained")  # before anything is written
    limit = parse_size(max_shard_size)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    kind = "llava" if cfg.vision is not None else "llama"

    tensors: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.text.tie_embeddings:
            continue
        if t.is_meta:
            raise OmniInputError(f"cannot save {name}: it is on the meta device (no values); load or initialise it first")
        tensors[key_to_hf(name, kind)] = t.detach()

    shards: list[list[str]] = [[]]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    for name, keys in zip(names, shards):
        data, storages = {}, set()
        for key in keys:
            t = tensors[key].to("cpu")
            # safetensors refuses strided views and tensors sharing memory: give those their own copy.
            ptr = t.untyped_storage().data_ptr()
            if not t.is_contiguous() or ptr in storages:
                t = t.clone(memory_format=torch.contiguous_format)
            storages.add(ptr)
            data[key] = t
        _atomic_write(folder / name, lambda tmp, data=data: save_file(data, tmp, metadata={"format": "pt"}))
    index = folder / "model.safetensors.index.json"
    if n > 1:
        weight_map = {key: name for name, keys in zip(names, shards) for key in keys}
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        _write_text(index, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    # Weight files of an earlier save in this folder would be read instead of (or with) ours.
    stale = [p for p in folder.glob("model*.safetensors") if p.name not in names
             and re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors", p.name)]
    if n == 1 and index.exists():
        stale.append(index)
    for old in stale:
        old.unlink()

    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    _write_text(folder / "config.json", json.dumps(config_to_hf(cfg, dtype), indent=2) + "\n")
    _atomic_write(folder / "omnilm.json", cfg.save)
    if cfg.vision is not None:
        _write_text(folder / "preprocessor_config.json", json.dumps(_image_processor_to_hf(cfg.vision), indent=2) + "\n")
    if getattr(model, "tokenizer", None) is not None:
        model.tokenizer.save(folder)
        if cfg.vision is not None:  # with both halves, transformers' AutoProcessor can load a LlavaProcessor
            _write_text(folder / "processor_config.json", json.dumps(_processor_to_hf(cfg), indent=2) + "\n")


def _image_processor_to_hf(vision: VisionConfig) -> dict[str, Any]:
    from omnilm.data.image import ImageProcessor

    return ImageProcessor.from_vision_config(vision).to_hf_dict()


def _processor_to_hf(cfg: OmniConfig) -> dict[str, Any]:
    # LlavaProcessor expands each <image> to (image_size / patch_size)^2 + num_additional_image_tokens
    # tokens, minus one for the "default" strategy: exactly cfg.image_seq_len.
    return {
        "processor_class": "LlavaProcessor",
        "patch_size": cfg.vision.patch_size,
        "vision_feature_select_strategy": cfg.vision_feature_select,
        "num_additional_image_tokens": 1,
        "image_token": "<image>",
    }
