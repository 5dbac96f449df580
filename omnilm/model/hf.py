"""Hugging Face interop: read and write LLaVA, LLaVA-NeXT-Video, Voxtral, LLaMA and CLIP folders
(safetensors only, never pickle), and read Whisper's encoder.

`OmniModel.from_pretrained` and `OmniModel.save_pretrained` call `load_pretrained` and
`save_pretrained` here, `ClipModel`'s call `load_clip` and `save_clip`; `load_vision_encoder`
reads a CLIP (or LLaVA) folder's vision tower, `load_audio_encoder` a Whisper (or Voxtral) folder's
audio encoder, and `save_audio_encoder` writes one as transformers' `VoxtralEncoder`. Weights and
configs only: the tokenizer files beside them are the processor's (`omnilm.data.Processor`).

A folder's config is `omnilm.json` when present (our exact config, written by us), else its
`config.json` converted: model_type "llava" (CLIP + projector + LLaMA), "llava_next_video" (the
same, with a video marker and pooled frames; saved so when the model reads videos), "voxtral" (a
Whisper encoder + projector + LLaMA: an audio model), "llama" (text-only), "clip_vision_model" or
"clip" (vision tower only), "whisper" (its encoder only). Weights are `model.safetensors` or the shards
listed in `model.safetensors.index.json`; every known key layout loads (see KEYS_FROM_HF).
An int8 model (`omnilm.model.quantize`) is saved in omnilm's names only, each quantised layer's
int8 `weight` beside its float `scale`; its omnilm.json's `quantization` rebuilds those layers.

We write the layout of the llava-hf hub checkpoints (the transformers 4.x names). Every
transformers version with LLaVA reads it, 5.x included, and 5.x itself re-saves a hub
checkpoint in that layout. (A LLaVA that 5.x builds from scratch is saved with
`vision_tower.encoder...`, without `vision_model.`, which 4.x cannot read.)
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from omnilm.config import AudioConfig, ClipConfig, OmniConfig, VisionConfig
from omnilm.errors import OmniInputError
from omnilm.io import atomic_write, read_json, write_json
from omnilm.model.audio import WhisperEncoder
from omnilm.model.hf_config import (audio_config_from_hf, audio_config_to_hf, build_config, clip_config_from_hf,
                                    clip_config_to_hf, config_from_hf, config_to_hf, hf_incompatibility,
                                    vision_config_from_hf)
from omnilm.model.quantize import swap_int8
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
#   CLIP, both towers ("clip_model", omnilm.model.clip): vision_model.*, text_model.{embeddings,
#           encoder.layers,final_layer_norm}, visual_projection, text_projection, logit_scale
#   Voxtral audio_tower.{conv1,conv2,embed_positions,layers,layer_norm}, multi_modal_projector.linear_{1,2},
#           language_model.model.*, language_model.lm_head (on disk; model.audio_tower... in memory)
#   Whisper model.encoder.* (WhisperForConditionalGeneration), encoder.* (WhisperModel): the encoder is
#           read alone (`load_audio_encoder`), its decoder left out; a VoxtralEncoder folder
#           (`save_audio_encoder`) holds the encoder's keys bare: conv1, conv2, embed_positions, layers, layer_norm

KEYS_FROM_HF: dict[str, list[tuple[str, str]]] = {
    "llava": [
        (r"(model\.)?vision_tower\.(vision_model\.)?", "vision."),
        (r"(model\.)?multi_modal_projector\.linear_1\.", "projector.fc1."),
        (r"(model\.)?multi_modal_projector\.linear_2\.", "projector.fc2."),
        (r"(language_model\.)?lm_head\.", "lm_head."),
        (r"(model\.)?language_model\.(model\.)?", "llm."),
    ],
    "voxtral": [
        (r"(model\.)?audio_tower\.", "audio."),
        (r"(model\.)?multi_modal_projector\.", "audio_projector."),
        (r"(language_model\.)?lm_head\.", "lm_head."),
        (r"(model\.)?language_model\.(model\.)?", "llm."),
    ],
    "whisper": [
        (r"(model\.)?encoder\.", "audio."),
        (r"(?=conv1\.|conv2\.|embed_positions\.|layers\.|layer_norm\.)", "audio."),  # a VoxtralEncoder folder
    ],
    "llama": [
        (r"model\.", "llm."),
    ],
    "clip": [
        (r"(vision_model\.)?(?=embeddings\.|pre_layrnorm\.|encoder\.|post_layernorm\.)", "vision."),
    ],
    "clip_model": [
        (r"vision_model\.", "vision."),
        (r"text_model\.", "text."),
    ],
}
LAYER_RULES = [
    (r"^(vision|text)\.encoder\.layers\.", r"\1.layers."),  # CLIP keeps its blocks under `encoder.`
    # CLIP's name for the output projection (Whisper's too, which omnilm keeps)
    (r"^((?:vision|text)\.layers\.\d+\.self_attn)\.out_proj\.", r"\1.o_proj."),
    (r"\.block_sparse_moe\.", ".mlp."),  # Mixtral's MoE block (then _stack_experts merges its experts)
]
# Mixtral on disk keeps one SwiGLU per expert: block_sparse_moe.experts.E.{w1 (gate), w2 (down),
# w3 (up)}.weight. omnilm (like transformers 5 in memory) stacks them: experts.gate_up_proj (E, 2F, D)
# and experts.down_proj (E, D, F). The router is block_sparse_moe.gate.weight (E, D) in both.
EXPERT_KEY = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(w1|w2|w3)\.weight$")
# Harmless keys some checkpoints carry: buffers transformers recomputes, and CLIP's text side
# (kept only when both CLIP towers are read, kind "clip_model").
IGNORED_KEYS = re.compile(r"(rotary_emb\.inv_freq|position_ids)$")
# Whisper's text decoder, beside the encoder `load_audio_encoder` reads.
WHISPER_DECODER_KEYS = re.compile(r"^(model\.)?decoder\.|^proj_out\.")
CLIP_TEXT_KEYS = re.compile(r"^(text_model\.|text_projection\.|visual_projection\.|logit_scale$)")
# LLaVA-NeXT's row separator for its "anyres" image tiles: omnilm reads images as LLaVA-1.5 does.
ANYRES_KEYS = re.compile(r"^(model\.)?image_newline$")
# The dtypes whose weights are checked for NaN and inf: those torch.isfinite runs on (not float8).
FINITE_CHECKED = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

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
    "voxtral": [
        (r"audio\.", "audio_tower."),
        (r"audio_projector\.", "multi_modal_projector."),
        (r"llm\.", "language_model.model."),
        (r"lm_head\.", "language_model.lm_head."),
    ],
    "llama": [
        (r"llm\.", "model."),
    ],
    "clip_model": [
        (r"(vision|text)\.layers\.(\d+)\.self_attn\.o_proj\.", r"\1_model.encoder.layers.\2.self_attn.out_proj."),
        (r"(vision|text)\.layers\.", r"\1_model.encoder.layers."),
        (r"(vision|text)\.", r"\1_model."),
    ],
}


def key_from_hf(key: str, kind: str) -> str:
    """The omnilm name of checkpoint key `key` in a folder of `kind` ("llava", "voxtral", "llama", "clip",
    "clip_model", "whisper")."""
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


# --- reading a folder -------------------------------------------------------------------------


def _folder(path: str | Path) -> Path:
    folder = Path(path)
    if not folder.exists():
        raise OmniInputError(f"no such folder: {folder}")
    if not folder.is_dir():
        raise OmniInputError(f"{folder} is a file; pass the folder that holds config.json and the weights")
    return folder



def _json_object(file: Path) -> dict:
    """A JSON file that must hold an object (a dict): anything else is a one-line error naming it."""
    d = read_json(file)
    if not isinstance(d, dict):
        kind = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean"}.get(type(d), "null")
        raise OmniInputError(f"{file} holds {kind}, not an object of settings; fix it, or download or save the model again")
    return d


def hf_kind(cfg: OmniConfig) -> str:
    """The transformers class a model of `cfg` is saved as: "voxtral" with an audio encoder (and no
    vision tower), "llava" with a vision tower, else "llama"."""
    if cfg.audio is not None and cfg.vision is None:
        return "voxtral"
    return "llava" if cfg.vision is not None else "llama"


def read_config(path: str | Path) -> tuple[OmniConfig | VisionConfig | AudioConfig, str, str]:
    """(config, kind, source) of a model folder. kind is "llava", "voxtral", "llama", "clip" (a
    VisionConfig) or "whisper" (an AudioConfig); source is the file the config came from. Every
    problem with the config file is a one-line OmniInputError naming the file and the field."""
    folder = _folder(path)
    if (folder / "omnilm.json").is_file():
        file = folder / "omnilm.json"
        d = _json_object(file)
        cfg = build_config(lambda: OmniConfig.from_dict(d), str(file))
        return cfg, hf_kind(cfg), "omnilm.json"
    file = folder / "config.json"
    if not file.is_file():
        raise OmniInputError(f"{folder} has no config.json (nor omnilm.json): pass a folder saved by omnilm or transformers")
    d = _json_object(file)
    if d.get("model_type") in ("clip", "clip_vision_model"):
        clip = d["model_type"] == "clip"
        vision = d.get("vision_config") if clip else d
        cfg: OmniConfig | VisionConfig = vision_config_from_hf(vision if vision is not None else {}, where=str(file),
                                                               section="vision_config." if clip else "")
        kind = "clip"
    elif d.get("model_type") in ("whisper", "voxtral_encoder"):
        return audio_config_from_hf(d, str(file)), "whisper", "config.json"
    else:
        cfg = config_from_hf(d, str(file))
        kind = hf_kind(cfg)
    # The image normalisation lives in the image processor's file, when there is one. Values that
    # are not 3 finite numbers (std > 0) are left out here: the image processor reads the same file
    # and reports them (omnilm.data.image).
    vision_cfg = cfg if isinstance(cfg, VisionConfig) else cfg.vision
    pre = folder / "preprocessor_config.json"
    if vision_cfg is not None and pre.is_file():
        p = read_json(pre)
        for key in ("image_mean", "image_std"):
            if isinstance(p, dict) and p.get(key) is not None:
                try:
                    vision_cfg = dataclasses.replace(vision_cfg, **{key: p[key]})
                except ValueError:
                    continue
        if isinstance(cfg, VisionConfig):
            cfg = vision_cfg
        else:
            cfg.vision = vision_cfg
    return cfg, kind, "config.json"


def _weight_files(folder: Path) -> list[Path]:
    # Same order of preference as transformers: one file, then an index of shards.
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _json_object(index).get("weight_map", {})
        if not isinstance(weight_map, dict) or not all(isinstance(n, str) and n == Path(n).name and n not in ("", ".", "..")
                                                       for n in weight_map.values()):
            raise OmniInputError(f"{index}: weight_map must map each key to a shard file name in {folder}; "
                                 "download or save the model again")
        names = sorted(set(weight_map.values()))
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


def weights_size(path: str | Path) -> int:
    """Bytes of a checkpoint folder's weight files (the one file, or the shards its index lists)."""
    return sum(file.stat().st_size for file in _weight_files(_folder(path)))


def _few(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def read_weights(folder: Path, kind: str, dtype: torch.dtype | str | None,
                 device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a folder under omnilm names, cast and moved; and each name's checkpoint key."""
    from safetensors import SafetensorError, safe_open

    dtype = _dtype(dtype)
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for file in _weight_files(folder):
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    if (IGNORED_KEYS.search(key) or (kind != "clip_model" and CLIP_TEXT_KEYS.search(key))
                            or (kind == "llava" and ANYRES_KEYS.match(key))
                            or (kind == "whisper" and WHISPER_DECODER_KEYS.match(key))):
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
        except OSError as e:  # unreadable (permissions, a folder of that name), not corrupt
            raise OmniInputError(f"cannot read {file}: {e.strerror or e}; check that it is a readable file") from None
    _stack_experts(state, origin, folder)
    return state, origin


def _stack_experts(state: dict[str, torch.Tensor], origin: dict[str, str], folder: Path) -> None:
    """Merge Mixtral's per-expert w1/w2/w3 tensors into omnilm's stacked expert weights, in place."""
    groups: dict[str, dict[str, dict[int, str]]] = {}
    for name in [n for n in state if EXPERT_KEY.match(n)]:
        prefix, e, w = EXPERT_KEY.match(name).groups()
        groups.setdefault(prefix, {"w1": {}, "w2": {}, "w3": {}})[w][int(e)] = name
    for prefix, parts in groups.items():
        n = 1 + max(max(p) for p in parts.values() if p)
        for w, names in parts.items():
            if sorted(names) != list(range(n)):
                missing = sorted(set(range(n)) - set(names))
                raise OmniInputError(f"{folder}: {prefix} has {n} experts but no {w} weight for expert(s) "
                                     f"{_few([str(m) for m in missing])}; the checkpoint is incomplete")
        for w, names in parts.items():
            dtypes = {str(state[name].dtype).removeprefix("torch.") for name in names.values()}
            if len(dtypes) > 1:  # torch.cat would promote them silently
                raise OmniInputError(f"{folder}: the {w} weights of {origin[names[0]].replace('.0.', '.*.')} differ "
                                     f"in dtype ({', '.join(sorted(dtypes))}); every expert must be the same dtype")
            shapes = {tuple(state[name].shape) for name in names.values()}
            if len(shapes) > 1:
                raise OmniInputError(f"{folder}: the {w} weights of {origin[names[0]].replace('.0.', '.*.')} differ "
                                     f"in shape ({', '.join(map(str, sorted(shapes)))}); every expert must be the same size")
        pattern = {w: origin[names[0]].replace(f".0.{w}.", f".*.{w}.") for w, names in parts.items()}
        take = {w: [state.pop(parts[w][e]) for e in range(n)] for w in parts}
        for name in (nm for p in parts.values() for nm in p.values()):
            origin.pop(name)
        if take["w1"][0].shape != take["w3"][0].shape:
            raise OmniInputError(f"{folder}: {pattern['w1']} is {tuple(take['w1'][0].shape)} but {pattern['w3']} is "
                                 f"{tuple(take['w3'][0].shape)}; an expert's gate and up projections must match")
        state[prefix + ".gate_up_proj"] = torch.stack([torch.cat([g, u]) for g, u in zip(take["w1"], take["w3"])])
        state[prefix + ".down_proj"] = torch.stack(take["w2"])
        origin[prefix + ".gate_up_proj"] = f"{pattern['w1']} + {pattern['w3']}"
        origin[prefix + ".down_proj"] = pattern["w2"]


def _unstack_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of _stack_experts, on checkpoint keys: Mixtral's hub layout, as transformers writes it."""
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if key.endswith(".mlp.gate.weight"):
            out[key.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = t
        elif key.endswith(".mlp.experts.gate_up_proj"):
            base = key.replace(".mlp.experts.gate_up_proj", ".block_sparse_moe.experts")
            gate, up = t.chunk(2, dim=1)
            for e in range(t.shape[0]):
                out[f"{base}.{e}.w1.weight"], out[f"{base}.{e}.w3.weight"] = gate[e], up[e]
        elif key.endswith(".mlp.experts.down_proj"):
            base = key.replace(".mlp.experts.down_proj", ".block_sparse_moe.experts")
            for e in range(t.shape[0]):
                out[f"{base}.{e}.w2.weight"] = t[e]
        else:
            out[key] = t
    return out


def assign_weights(module: nn.Module, state: dict[str, torch.Tensor], origin: dict[str, str], folder: Path,
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
        got = state[k]
        if got.is_floating_point() != want.is_floating_point():
            kind = "floating-point" if want.is_floating_point() else "integer"
            name = origin.get(k, k) if origin.get(k, k) == k else f"{origin[k]} ({k})"
            raise OmniInputError(
                f"{folder}: {name} is {str(got.dtype).removeprefix('torch.')} in the checkpoint, where the model has a "
                f"{kind} weight; save the checkpoint again with {kind} weights"
            )
        if got.shape != want.shape:
            raise OmniInputError(
                f"{source} does not match the weights: {k} ({origin[k]}) is {tuple(got.shape)} in the checkpoint, "
                f"the config implies {tuple(want.shape)}"
            )
    # Loading them still lets one inspect a diverged checkpoint, but every output would be NaN: say so.
    broken = [origin.get(k, k) for k, t in state.items()
              if t.dtype in FINITE_CHECKED and not bool(torch.isfinite(t).all())]
    if broken:
        warnings.warn(f"{folder}: {len(broken)} weight(s) hold NaN or inf ({_few(broken)}); the model loads, but its "
                      "outputs will not be numbers: was the checkpoint saved after training diverged?", stacklevel=3)
    module.load_state_dict(state, strict=False, assign=True)  # only `skip` is left out; the caller fills it


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | str | None:
    if isinstance(dtype, str) and dtype != "auto":
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise OmniInputError(f"dtype {dtype!r} is not a torch dtype; use e.g. float32, bfloat16, float16 or 'auto'")
        dtype = getattr(torch, dtype)
    if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:  # weights cast to ints would be garbage
        raise OmniInputError(f"dtype {str(dtype).removeprefix('torch.')} is not a floating-point type; "
                             "use e.g. float32, bfloat16, float16 or 'auto'")
    return dtype


def load_pretrained(cls: type, path: str | Path, device: str | torch.device | None = None,
                    dtype: torch.dtype | str | None = None):
    """An OmniModel (`cls`) from an omnilm or transformers LLaVA / LLaMA folder.

    `dtype`: None loads float32 (as transformers does); "auto" keeps the checkpoint's dtype;
    a torch dtype (or its name) casts to it. The tokenizer files beside the weights are the
    processor's (`omnilm.data.Processor.for_model`).
    """
    folder = _folder(path)
    cfg, kind, source = read_config(folder)
    if kind == "clip":
        raise OmniInputError(f"{folder} holds a CLIP encoder, not a language model: "
                             "read it with omnilm.model.hf.load_vision_encoder(path)")
    if kind == "whisper":
        raise OmniInputError(f"{folder} holds a Whisper model, whose encoder omnilm reads alone: "
                             "read it with omnilm.model.hf.load_audio_encoder(path)")
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = cls(cfg)
        if cfg.quantization is not None:  # int8 layers where the checkpoint holds int8 weights
            swap_int8(model, cfg.quantization.modules)
    state, origin = read_weights(folder, kind, dtype, device)
    tied = cfg.text.tie_embeddings
    if tied:
        # A tied checkpoint may store the head or not; either way it is the embedding matrix.
        state.pop("lm_head.weight", None)
    assign_weights(model, state, origin, folder, source, skip=("lm_head.weight",) if tied else ())
    if tied:
        model.lm_head.weight = model.llm.embed_tokens.weight
    return model.eval()


def load_vision_encoder(path: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | str | None = None) -> VisionTransformer:
    """The CLIP ViT of a CLIP, CLIP-vision or LLaVA folder (e.g. to start a LLaVA from a
    pretrained encoder). `dtype` as in `load_pretrained`."""
    folder = _folder(path)
    cfg, kind, source = read_config(folder)
    vision_cfg = cfg if isinstance(cfg, VisionConfig) else getattr(cfg, "vision", None)
    if vision_cfg is None:
        what = "an audio model" if kind in ("voxtral", "whisper") else "a text-only model"
        raise OmniInputError(f"{folder} holds {what}; it has no vision encoder")
    with torch.device("meta"):
        encoder = VisionTransformer(vision_cfg)
    state, origin = read_weights(folder, kind, dtype, torch.device(device or "cpu"))
    if kind != "clip":  # a whole LLaVA: keep its vision tower
        state = {k: v for k, v in state.items() if k.startswith("vision.")}
    state = {k.removeprefix("vision."): v for k, v in state.items()}
    origin = {k.removeprefix("vision."): v for k, v in origin.items()}
    assign_weights(encoder, state, origin, folder, source)
    return encoder.eval()


def load_audio_encoder(path: str | Path, device: str | torch.device | None = None,
                       dtype: torch.dtype | str | None = None) -> WhisperEncoder:
    """The Whisper encoder of a Whisper, Voxtral or omnilm audio model folder (e.g. to start an audio
    model from a pretrained encoder). `dtype` as in `load_pretrained`."""
    folder = _folder(path)
    cfg, kind, source = read_config(folder)
    audio_cfg = cfg if isinstance(cfg, AudioConfig) else getattr(cfg, "audio", None)
    if audio_cfg is None:
        raise OmniInputError(f"{folder} holds a model without an audio encoder")
    with torch.device("meta"):
        encoder = WhisperEncoder(audio_cfg)
    state, origin = read_weights(folder, kind, dtype, torch.device(device or "cpu"))
    state = {k.removeprefix("audio."): v for k, v in state.items() if k.startswith("audio.")}
    origin = {k.removeprefix("audio."): v for k, v in origin.items() if k.startswith("audio.")}
    assign_weights(encoder, state, origin, folder, source)
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




def write_weights(tensors: dict[str, torch.Tensor], folder: Path, max_shard_size: int | str = "5GB") -> None:
    """Write `tensors` (checkpoint key -> tensor) as model.safetensors, or as shards of at most
    `max_shard_size` plus their index; each file atomically, the index last. Weight files of an
    earlier save in `folder` are removed."""
    from safetensors.torch import save_file

    limit = parse_size(max_shard_size)
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
        atomic_write(folder / name, lambda tmp, data=data: save_file(data, tmp, metadata={"format": "pt"}))
    index = folder / "model.safetensors.index.json"
    if n > 1:
        weight_map = {key: name for name, keys in zip(names, shards) for key in keys}
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        write_json(index, {"metadata": {"total_size": total}, "weight_map": weight_map})
    # Weight files of an earlier save in this folder would be read instead of (or with) ours.
    stale = [p for p in folder.glob("model*.safetensors") if p.name not in names
             and re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors", p.name)]
    if n == 1 and index.exists():
        stale.append(index)
    for old in stale:
        old.unlink()


def _tensors_to_write(model: nn.Module, rename, skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """`model`'s state dict under the names `rename(name)` gives, refusing meta tensors (no values)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if name in skip:
            continue
        if t.is_meta:
            raise OmniInputError(f"cannot save {name}: it is on the meta device (no values); load or initialise it first")
        tensors[rename(name)] = t.detach()
    return tensors


def save_pretrained(model, path: str | Path, max_shard_size: int | str = "5GB") -> None:
    """Write `model` as a transformers folder (LLaVA, or LLaMA when text-only) plus omnilm.json;
    the processor's files (tokenizer, preprocessor_config.json) are `Processor.save_pretrained`'s.

    Shards of at most `max_shard_size` (a tensor larger than that gets its own shard), each written
    atomically; the index last. A tied head is stored once, as the embedding matrix.
    """
    cfg: OmniConfig = model.config
    limit = parse_size(max_shard_size)  # a bad size fails before anything is written
    kind = hf_kind(cfg)
    # A model transformers has no class for (Switch routing, shared experts, fusion other than
    # joint, ...) keeps omnilm's own names and omnilm.json only; omnilm loads it back the same.
    hf_format = hf_incompatibility(cfg) is None
    tensors = _tensors_to_write(model, (lambda name: key_to_hf(name, kind)) if hf_format else (lambda name: name),
                                skip=("lm_head.weight",) if cfg.text.tie_embeddings else ())
    if hf_format and cfg.text.n_experts:
        tensors = _unstack_experts(tensors)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)

    write_weights(tensors, folder, limit)

    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if hf_format:
        write_json(folder / "config.json", config_to_hf(cfg, dtype))
    elif (folder / "config.json").is_file():
        (folder / "config.json").unlink()  # an earlier save's would describe other weights
    atomic_write(folder / "omnilm.json", cfg.save)


def save_audio_encoder(encoder: WhisperEncoder, path: str | Path, max_shard_size: int | str = "5GB") -> None:
    """Write a WhisperEncoder as transformers' `VoxtralEncoder` folder (model_type "voxtral_encoder":
    the encoder alone, as `VoxtralEncoder.from_pretrained` and `load_audio_encoder` read it)."""
    dtype = str(encoder.conv1.weight.dtype).removeprefix("torch.")
    _write_transformers_folder(path, _tensors_to_write(encoder, lambda name: name),
                               {"architectures": ["VoxtralEncoder"], **audio_config_to_hf(encoder.config),
                                "dtype": dtype}, max_shard_size)


def _write_transformers_folder(path: str | Path, tensors: dict[str, torch.Tensor], config: dict,
                               max_shard_size: int | str) -> None:
    """A folder transformers reads alone: the weights (`write_weights`) and config.json. An
    omnilm.json left by an earlier save of a LLaVA here would be read instead of config.json, so it
    goes."""
    parse_size(max_shard_size)  # a bad size fails before anything is written
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    write_weights(tensors, folder, max_shard_size)
    write_json(folder / "config.json", config)
    (folder / "omnilm.json").unlink(missing_ok=True)


# --- CLIP, both towers ------------------------------------------------------------------------


def save_clip(model, path: str | Path, max_shard_size: int | str = "5GB") -> None:
    """Write a ClipModel as a transformers CLIPModel folder: config.json and model.safetensors (HF key
    names, each file written atomically; shards past `max_shard_size`)."""
    cfg: ClipConfig = model.config
    tensors = _tensors_to_write(model, lambda name: key_to_hf(name, "clip_model"))
    _write_transformers_folder(path, tensors, clip_config_to_hf(cfg, model.logit_scale.dtype), max_shard_size)


def load_clip(cls: type, path: str | Path, device: str | torch.device | None = None,
              dtype: torch.dtype | str | None = None):
    """A ClipModel (`cls`) from a transformers CLIPModel folder (ours or one transformers wrote);
    `dtype` as in `load_pretrained`."""
    vision, kind, source = read_config(path)  # also checks the folder; image mean/std included
    folder = Path(path)
    d = _json_object(folder / "config.json") if kind == "clip" else {}
    if d.get("model_type") != "clip":
        raise OmniInputError(f"{folder} is not a CLIPModel folder (config.json model_type 'clip', with both towers); "
                             "for a vision tower alone use omnilm.model.hf.load_vision_encoder")
    cfg = clip_config_from_hf(d, vision, str(folder / "config.json"))
    with torch.device("meta"):
        model = cls(cfg)
    state, origin = read_weights(folder, "clip_model", dtype, torch.device(device or "cpu"))
    assign_weights(model, state, origin, folder, source)
    return model.eval()
