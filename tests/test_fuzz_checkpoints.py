"""Fuzzing checkpoint folders: every way a folder can be broken (configs field by field, whole
files, weights, shards, tokenizers, paths) ends in a one-line OmniInputError that names the file
and the problem, or in the command line's one-line `error: ...` and exit 2; what is valid loads.

The cases form one table, generated where they repeat: every config field x the wrong values for
its kind (a string, zero, a negative, NaN, a huge number, ...), every config file x broken JSON.
"""

import json
import math
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from conftest import one_line_error, run_cli
from PIL import Image
from safetensors.torch import load_file, save_file

from omnilm import OmniModel
from omnilm.config import ClipConfig, ClipTextConfig, OmniConfig, VisionConfig
from omnilm.data import Processor, train_tokenizer
from omnilm.model.clip import ClipModel
from omnilm.model.hf import load_vision_encoder
from omnilm.model.hf_config import vision_config_to_hf

TEXT = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=64, max_seq_len=512)
VISION = dict(image_size=32, patch_size=16, dim=32, n_layers=2, n_heads=4, mlp_dim=64)
DELETE = object()  # set_json's value that removes the field


# --- the base folders, built once ---------------------------------------------------------------


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> Path:
    """One valid folder per kind: omni (omnilm.json + config.json), llava / llama / mixtral
    (config.json only), llama_sharded, clip (CLIPModel) and clip_vision (CLIPVisionModel);
    the language models with their tokenizer. Also data/ for `omnilm eval`."""
    root = tmp_path_factory.mktemp("bases")
    tokenizer = train_tokenizer(["What colour is the circle? a red circle and a blue square"] * 4, vocab_size=300)
    ids = dict(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
               pad_token_id=tokenizer.pad_id)

    def save(name: str, config: OmniConfig, drop_omnilm_json: bool = True, **kwargs) -> None:
        torch.manual_seed(0)
        model = OmniModel.from_config(config)
        model.save_pretrained(root / name, **kwargs)
        Processor.for_model(model, tokenizer=tokenizer).save_pretrained(root / name)
        if drop_omnilm_json:  # read through transformers' config.json
            (root / name / "omnilm.json").unlink()

    omni = OmniConfig(text={**TEXT, **ids}, vision=dict(VISION), image_token_id=tokenizer.image_token_id)
    save("omni", omni, drop_omnilm_json=False)
    save("llava", omni)
    save("llama", OmniConfig(text={**TEXT, **ids}, vision=None))
    save("llama_sharded", OmniConfig(text={**TEXT, **ids}, vision=None), max_shard_size="20KB")
    save("mixtral", OmniConfig(text={**TEXT, **ids, "n_experts": 4, "n_experts_per_token": 2}, vision=None))

    clip = ClipConfig(vision=VisionConfig(**VISION), embed_dim=16, text=ClipTextConfig(
        vocab_size=tokenizer.vocab_size, dim=32, n_layers=1, n_heads=4, mlp_dim=64, max_len=16,
        bos_token_id=1, eos_token_id=2, pad_token_id=0))
    ClipModel.from_config(clip).save_pretrained(root / "clip")
    (root / "clip_vision").mkdir()
    (root / "clip_vision" / "config.json").write_text(json.dumps(vision_config_to_hf(clip.vision)))
    weights = load_file(root / "clip" / "model.safetensors")
    save_file({k: v for k, v in weights.items() if k.startswith("vision_model.")},
              root / "clip_vision" / "model.safetensors")

    (root / "data").mkdir()
    Image.new("RGB", (32, 32), "red").save(root / "data" / "red.png")
    (root / "data" / "q.json").write_text(json.dumps([{"id": "0", "image": "red.png", "task": "colour",
        "conversations": [{"from": "human", "value": "<image>\nWhat colour is the circle?"},
                          {"from": "gpt", "value": "red"}]}]))
    return root


# --- mutations -----------------------------------------------------------------------------------


def set_json(file: str, path: str, value: Any) -> Callable[[Path], None]:
    """Set (or with DELETE remove) the dotted `path` of JSON `file`; path "" replaces the whole file."""
    def mutate(folder: Path) -> None:
        if not path:
            (folder / file).write_text(json.dumps(value))
            return
        d = json.loads((folder / file).read_text())
        *parents, key = path.split(".")
        node = d
        for p in parents:
            node = node[p]
        if value is DELETE:
            node.pop(key, None)
        else:
            node[key] = value
        (folder / file).write_text(json.dumps(d))  # NaN and Infinity as Python's json writes them
    return mutate


def write(file: str, content: str | bytes) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        (folder / file).write_bytes(content.encode() if isinstance(content, str) else content)
    return mutate


def remove(*files: str) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        for f in files:
            (folder / f).unlink()
    return mutate


def weights(edit: Callable[[dict], dict], file: str = "model.safetensors") -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        save_file(edit(load_file(folder / file)), folder / file)
    return mutate


def retype(key: str, dtype: torch.dtype) -> Callable[[Path], None]:
    return weights(lambda sd: sd | {key: sd[key].to(dtype)})


def truncate(file: str, fraction: float) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        data = (folder / file).read_bytes()
        (folder / file).write_bytes(data[:int(len(data) * fraction)])
    return mutate


def add_tokens(n: int) -> Callable[[Path], None]:
    """n more added tokens in tokenizer.json: a tokenizer larger than the model's embedding."""
    def mutate(folder: Path) -> None:
        d = json.loads((folder / "tokenizer.json").read_text())
        top = max(t["id"] for t in d["added_tokens"])
        d["added_tokens"] += [dict(d["added_tokens"][0], id=top + 1000 + i, content=f"<extra_{i}>") for i in range(n)]
        (folder / "tokenizer.json").write_text(json.dumps(d))
    return mutate


def shard(folder: Path, i: int) -> Path:
    return sorted(folder.glob("model-*-of-*.safetensors"))[i]


def chain(*mutations: Callable[[Path], None]) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        for m in mutations:
            m(folder)
    return mutate


def nothing(folder: Path) -> None:
    pass


# --- the table -----------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    base: str
    mutate: Callable[[Path], None]
    load: str  # a key of LOADERS, or "info" / "chat" / "eval" (the command line)
    expect: tuple[str, ...] | None  # parts of the one-line error; None: it loads (runs)
    warns: str | None = None  # a warning the load must give


LOADERS: dict[str, Callable[[Path], Any]] = {
    "omni": OmniModel.from_pretrained,
    "clip": ClipModel.from_pretrained,
    "encoder": load_vision_encoder,
    "processor": lambda folder: Processor.for_model(OmniModel.from_pretrained(folder), folder),
    "int32": lambda folder: OmniModel.from_pretrained(folder, dtype="int32"),
    "float12": lambda folder: OmniModel.from_pretrained(folder, dtype="float12"),
}

NAN, INF = float("nan"), float("inf")
# Wrong values per kind of field. None is left out: in config.json it means transformers' default.
BAD = {
    "size": [("string", "64"), ("zero", 0), ("negative", -1), ("fraction", 2.5), ("nan", NAN), ("huge", 10**12),
             ("bool", True), ("list", [64, 32])],
    "positive": [("string", "1e-5"), ("zero", 0), ("negative", -1e-5), ("nan", NAN), ("inf", INF), ("list", [1e-5])],
    "id": [("string", "1"), ("negative", -1), ("past-vocab", 10**6), ("fraction", 1.5), ("bool", True)],
    "bool": [("string", "yes"), ("int", 1)],
    "act": [("unknown", "relu"), ("int", 5), ("list", ["gelu"])],
}
SHORT = {"size": [("string", "64"), ("zero", 0), ("negative", -3), ("huge", 10**12)],
         "positive": [("string", "x"), ("negative", -1.0), ("nan", NAN)]}


def field_cases(base: str, file: str, load: str, fields: dict[str, str], table=BAD,
                first: Callable[[Path], None] = nothing) -> list[Case]:
    """Each field of `file` broken in turn with each wrong value of its kind (after `first`); the
    error names both."""
    cases = []
    for path, kind in fields.items():
        for name, value in table[kind]:
            cases.append(Case(f"{base}:{file}:{path}={name}", base, chain(first, set_json(file, path, value)), load,
                              (file, path)))
    return cases


LLAVA_FIELDS = {
    **{f"text_config.{k}": "size" for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                             "num_attention_heads", "num_key_value_heads", "max_position_embeddings")},
    **{f"vision_config.{k}": "size" for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                               "num_attention_heads", "image_size", "patch_size")},
    "text_config.rms_norm_eps": "positive", "vision_config.layer_norm_eps": "positive",
    "text_config.bos_token_id": "id", "text_config.eos_token_id": "id", "text_config.pad_token_id": "id",
    "text_config.attention_bias": "bool", "text_config.mlp_bias": "bool", "text_config.tie_word_embeddings": "bool",
    "multimodal_projector_bias": "bool", "tie_word_embeddings": "bool",
    "text_config.hidden_act": "act", "vision_config.hidden_act": "act", "projector_hidden_act": "act",
}
OMNILM_FIELDS = {
    **{f"text.{k}": "size" for k in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "mlp_dim", "head_dim",
                                      "max_seq_len")},
    **{f"vision.{k}": "size" for k in ("image_size", "patch_size", "dim", "n_layers", "n_heads", "mlp_dim")},
    "text.norm_eps": "positive", "text.rope_theta": "positive", "vision.norm_eps": "positive",
}
CLIP_FIELDS = {
    **{f"text_config.{k}": "size" for k in ("vocab_size", "hidden_size", "num_attention_heads", "max_position_embeddings")},
    "text_config.layer_norm_eps": "positive", "projection_dim": "size",
    "vision_config.image_size": "size", "vision_config.hidden_size": "size",
}
CLIP_VISION_FIELDS = {"image_size": "size", "patch_size": "size", "hidden_size": "size", "num_hidden_layers": "size",
                      "layer_norm_eps": "positive"}


def generated_cases() -> list[Case]:
    cases = field_cases("llava", "config.json", "omni", LLAVA_FIELDS)
    # transformers 5 reads rope_theta inside rope_parameters, which we write too: without it, the old key.
    cases += field_cases("llama", "config.json", "omni", {"rope_theta": "positive"},
                         first=set_json("config.json", "rope_parameters", DELETE))
    cases += field_cases("omni", "omnilm.json", "omni", OMNILM_FIELDS, SHORT)
    cases += field_cases("clip", "config.json", "clip", CLIP_FIELDS, SHORT)
    cases += field_cases("clip_vision", "config.json", "encoder", CLIP_VISION_FIELDS, SHORT)
    cases += field_cases("mixtral", "config.json", "omni", {"num_local_experts": "size", "router_jitter_noise": "positive",
                                                             "router_aux_loss_coef": "positive"}, SHORT)
    # Every config file holding something other than an object, or no JSON at all.
    contents = [("array", "[1, 2]", "holds an array"), ("number", "3", "holds a number"),
                ("string", '"llava"', "holds a string"), ("null", "null", "holds null"),
                ("invalid", '{"model_type": "llava",', "is not valid JSON"), ("empty", "", "is not valid JSON"),
                ("binary", b"\xff\xfe\x00", "is not valid JSON")]
    for base, file, load in [("llava", "config.json", "omni"), ("omni", "omnilm.json", "omni"),
                             ("clip", "config.json", "clip"), ("clip_vision", "config.json", "encoder")]:
        for name, content, words in contents:
            cases.append(Case(f"{base}:{file}:{name}", base, write(file, content), load, (file, words)))
    # Every nested object that is not one.
    for path, value in [("text_config", [1]), ("text_config", "llama"), ("vision_config", [1]), ("vision_config", 7),
                        ("text_config.rope_scaling", "linear"), ("text_config.rope_scaling", [2.0]),
                        ("text_config.rope_parameters", "default")]:
        cases.append(Case(f"llava:config.json:{path}={value!r}", "llava", set_json("config.json", path, value), "omni",
                          ("config.json", path, "not an object")))
    return cases


def rope(scaling: dict) -> Callable[[Path], None]:
    return set_json("config.json", "rope_scaling", scaling)


def mixtral_expert(e: int, w: str, edit: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Path], None]:
    key = f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight"
    return weights(lambda sd: {k: edit(v) if k == key else v for k, v in sd.items()})


def crafted_cases() -> list[Case]:
    c = []
    # Valid folders load, through every door.
    for base, load in [("omni", "omni"), ("llava", "omni"), ("llama", "omni"), ("mixtral", "omni"),
                       ("llama_sharded", "omni"), ("clip", "clip"), ("clip_vision", "encoder"), ("llava", "encoder"),
                       ("omni", "processor"), ("llava", "processor"), ("llama", "processor"), ("omni", "info"),
                       ("llava", "chat"), ("llama", "chat"), ("omni", "eval")]:
        c.append(Case(f"{base}:valid:{load}", base, nothing, load, None))
    c += [
        # config.json: values that are of the right type but wrong together, or unsupported
        Case("llava:model_type=mistral", "llava", set_json("config.json", "model_type", "mistral"), "omni",
             ("config.json", "model_type 'mistral'")),
        Case("llava:model_type=list", "llava", set_json("config.json", "model_type", ["llava"]), "omni",
             ("config.json", "model_type ['llava']")),
        Case("llava:model_type=absent", "llava", set_json("config.json", "model_type", DELETE), "omni",
             ("config.json", "model_type None")),
        Case("llava:text model_type=gpt2", "llava", set_json("config.json", "text_config.model_type", "gpt2"), "omni",
             ("config.json", "'gpt2'")),
        Case("llava:heads not a multiple of kv heads", "llava",
             set_json("config.json", "text_config.num_key_value_heads", 3), "omni", ("config.json", "n_kv_heads=3")),
        Case("llava:vision width not a multiple of heads", "llava",
             set_json("config.json", "vision_config.num_attention_heads", 5), "omni",
             ("config.json", "vision_config.hidden_size=32", "n_heads=5")),
        Case("llava:image smaller than a patch", "llava", set_json("config.json", "vision_config.patch_size", 64), "omni",
             ("config.json", "vision_config.image_size=32", "patch_size=64")),
        Case("llava:image not square", "llava", set_json("config.json", "vision_config.image_size", [32, 16]), "omni",
             ("config.json", "vision_config.image_size=[32, 16]", "not square")),
        Case("llava:grey images", "llava", set_json("config.json", "vision_config.num_channels", 1), "omni",
             ("config.json", "vision_config.num_channels=1", "RGB")),
        Case("llava:odd head_dim", "llava", set_json("config.json", "text_config.head_dim", 7), "omni",
             ("config.json", "text_config.head_dim=7", "even")),
        Case("llava:eos list with a bad id", "llava", set_json("config.json", "text_config.eos_token_id", [2, 10**6]),
             "omni", ("config.json", "text_config.eos_token_id[1]=1000000")),
        Case("llava:image_token_index=-1", "llava", set_json("config.json", "image_token_index", -1), "omni",
             ("config.json", "image_token_index=-1")),
        Case("llava:image_token_index=string", "llava", set_json("config.json", "image_token_index", "3"), "omni",
             ("config.json", "image_token_index='3'")),
        Case("llava:vision_feature_layer=99", "llava", set_json("config.json", "vision_feature_layer", 99), "omni",
             ("config.json", "vision_feature_layer=99")),
        Case("llava:vision_feature_layer=string", "llava", set_json("config.json", "vision_feature_layer", "-2"), "omni",
             ("config.json", "vision_feature_layer='-2'")),
        Case("llava:vision_feature_layer=list", "llava", set_json("config.json", "vision_feature_layer", [-2, -1]),
             "omni", ("config.json", "vision_feature_layer=[-2, -1]", "one")),
        Case("llava:feature select=cls", "llava", set_json("config.json", "vision_feature_select_strategy", "cls"),
             "omni", ("config.json", "vision_feature_select")),
        Case("llava:null pad id loads", "llava", set_json("config.json", "text_config.pad_token_id", None), "omni", None),
        Case("llava:null head_dim loads", "llava", set_json("config.json", "text_config.head_dim", None), "omni", None),
        # RoPE scaling of the right shape but wrong contents
        Case("llama:rope linear without factor", "llama", rope({"rope_type": "linear"}), "omni",
             ("config.json", "rope_scaling", "factor")),
        Case("llama:rope factor string", "llama", rope({"rope_type": "dynamic", "factor": "2"}), "omni",
             ("config.json", "rope_scaling", "factor")),
        Case("llama:rope factor zero", "llama", rope({"rope_type": "linear", "factor": 0}), "omni",
             ("config.json", "rope_scaling", "factor")),
        Case("llama:rope llama3 without bands", "llama", rope({"rope_type": "llama3", "factor": 8.0}), "omni",
             ("config.json", "rope_scaling", "low_freq_factor")),
        Case("llama:rope yarn bad beta", "llama", rope({"rope_type": "yarn", "factor": 4.0, "beta_fast": "x"}), "omni",
             ("config.json", "rope_scaling", "beta_fast")),
        Case("llama:rope unknown type", "llama", rope({"rope_type": "longrope", "factor": 2.0}), "omni",
             ("config.json", "'longrope'")),
        Case("llama:rope type list", "llama", rope({"rope_type": ["linear"]}), "omni", ("config.json", "['linear']")),
        Case("llama:rope_theta=1", "llama", set_json("config.json", "rope_parameters.rope_theta", 1), "omni",
             ("config.json", "rope_theta=1.0")),
        Case("llama:rope linear loads", "llama", rope({"rope_type": "linear", "factor": 2.0}), "omni", None),
        # Mixtral's own fields
        Case("mixtral:top-k past experts", "mixtral", set_json("config.json", "num_experts_per_tok", 9), "omni",
             ("config.json", "n_experts_per_token=9")),
        Case("mixtral:sliding window", "mixtral", set_json("config.json", "sliding_window", 16), "omni",
             ("config.json", "sliding-window")),
        Case("mixtral:sliding window string", "mixtral", set_json("config.json", "sliding_window", "all"), "omni",
             ("config.json", "sliding_window='all'")),
        # omnilm.json: nested and cross-field problems
        Case("omni:text=list", "omni", set_json("omnilm.json", "text", [1]), "omni", ("omnilm.json", "text=[1]")),
        Case("omni:vision=string", "omni", set_json("omnilm.json", "vision", "clip"), "omni",
             ("omnilm.json", "vision='clip'")),
        Case("omni:unknown field", "omni", set_json("omnilm.json", "text.n_layer", 2), "omni",
             ("omnilm.json", "unknown text config field", "n_layer")),
        Case("omni:image_mean string", "omni", set_json("omnilm.json", "vision.image_mean", "abc"), "omni",
             ("omnilm.json", "vision.image_mean='abc'")),
        Case("omni:image_mean two numbers", "omni", set_json("omnilm.json", "vision.image_mean", [0.5, 0.5]), "omni",
             ("omnilm.json", "vision.image_mean")),
        Case("omni:image_std zero", "omni", set_json("omnilm.json", "vision.image_std", [0.5, 0, 0.5]), "omni",
             ("omnilm.json", "vision.image_std", "> 0")),
        Case("omni:image_std nan", "omni", set_json("omnilm.json", "vision.image_std", [0.5, NAN, 0.5]), "omni",
             ("omnilm.json", "vision.image_std")),
        Case("omni:fusion=middle", "omni", set_json("omnilm.json", "fusion", "middle"), "omni",
             ("omnilm.json", "fusion='middle'")),
        Case("omni:eos past vocab", "omni", set_json("omnilm.json", "text.eos_token_id", 10**6), "omni",
             ("omnilm.json", "text.eos_token_id=1000000")),
        Case("omni:tie string", "omni", set_json("omnilm.json", "text.tie_embeddings", "no"), "omni",
             ("omnilm.json", "text.tie_embeddings='no'")),
        Case("omni:n_experts string", "omni", set_json("omnilm.json", "text.n_experts", "4"), "omni",
             ("omnilm.json", "text.n_experts='4'")),
        Case("omni:projector_act", "omni", set_json("omnilm.json", "projector_act", "tanh"), "omni",
             ("omnilm.json", "projector_act='tanh'")),
        # CLIP's own fields
        Case("clip:eos string", "clip", set_json("config.json", "text_config.eos_token_id", "2"), "clip",
             ("config.json", "text_config.eos_token_id='2'")),
        Case("clip:eos past vocab", "clip", set_json("config.json", "text_config.eos_token_id", 10**6), "clip",
             ("config.json", "text_config.eos_token_id=1000000")),
        Case("clip:text_config list", "clip", set_json("config.json", "text_config", [1]), "clip",
             ("config.json", "text_config is [1]")),
        Case("clip:logit scale nan", "clip", set_json("config.json", "logit_scale_init_value", NAN), "clip",
             ("config.json", "logit_scale_init_value=nan")),
        Case("clip:vision_config string", "clip", set_json("config.json", "vision_config", "vit"), "clip",
             ("config.json", "vision_config is 'vit'")),
        Case("clip_vision:as a language model", "clip_vision", nothing, "omni", ("CLIP encoder", "load_vision_encoder")),
        Case("llama:no vision encoder", "llama", nothing, "encoder", ("text-only",)),
        Case("llava:not a CLIPModel", "llava", nothing, "clip", ("not a CLIPModel folder",)),
        # Missing files and paths
        Case("llava:no config.json", "llava", remove("config.json"), "omni", ("no config.json",)),
        Case("clip:no config.json", "clip", remove("config.json"), "clip", ("no config.json",)),
        Case("omni:a file, not a folder", "omni", nothing, "omni@model.safetensors", ("is a file",)),
        Case("omni:no such folder", "omni", nothing, "omni@nope", ("no such folder",)),
        # Weights: missing, extra, misshapen, of the wrong dtype, not finite
        Case("llama:missing weight", "llama", weights(lambda sd: {k: v for k, v in sd.items() if k != "model.norm.weight"}),
             "omni", ("missing 1 weight(s)", "llm.norm.weight")),
        Case("llama:extra weight", "llama", weights(lambda sd: sd | {"model.extra.weight": torch.ones(2)}), "omni",
             ("1 unexpected weight(s)", "model.extra.weight")),
        Case("llama:misshapen weight", "llama", weights(lambda sd: sd | {"model.norm.weight": torch.ones(31)}), "omni",
             ("does not match the weights", "model.norm.weight", "(31,)")),
        *[Case(f"llama:{dtype} weight", "llama", retype("model.norm.weight", getattr(torch, dtype)), "omni",
               ("model.norm.weight", f"is {dtype}", "floating-point weight"))
          for dtype in ("int32", "int64", "bool", "uint8")],
        Case("llama:int64 embedding", "llama", retype("model.embed_tokens.weight", torch.int64), "omni",
             ("model.embed_tokens.weight", "is int64")),
        Case("clip:int logit_scale", "clip", retype("logit_scale", torch.int32), "clip", ("logit_scale", "is int32")),
        Case("llama:float64 weights load", "llama", retype("model.norm.weight", torch.float64), "omni", None),
        Case("llama:float16 weights load", "llama", retype("model.embed_tokens.weight", torch.float16), "omni", None),
        Case("llama:int position_ids are ignored", "llama",
             weights(lambda sd: sd | {"model.rotary_emb.inv_freq": torch.ones(4), "position_ids": torch.arange(4)}),
             "omni", None),
        Case("llama:nan weight loads with a warning", "llama",
             weights(lambda sd: sd | {"model.norm.weight": torch.full((32,), NAN)}), "omni", None, warns="NaN or inf"),
        Case("llama:int32 dtype requested", "llama", nothing, "int32", ("int32", "not a floating-point type")),
        Case("llama:unknown dtype requested", "llama", nothing, "float12", ("float12", "not a torch dtype")),
        Case("mixtral:missing expert", "mixtral", weights(lambda sd: {
            k: v for k, v in sd.items() if k != "model.layers.0.block_sparse_moe.experts.1.w2.weight"}), "omni",
             ("no w2 weight for expert(s) 1",)),
        Case("mixtral:expert of another dtype", "mixtral", mixtral_expert(1, "w1", lambda t: t.to(torch.int32)), "omni",
             ("w1 weights", "differ in dtype")),
        Case("mixtral:expert of another shape", "mixtral", mixtral_expert(1, "w3", lambda t: t[:-1]), "omni",
             ("w3 weights", "differ in shape")),
        Case("clip_vision:missing weight", "clip_vision", weights(lambda sd: {
            k: v for k, v in sd.items() if "post_layernorm" not in k}), "encoder", ("missing 2 weight(s)",)),
        # Weight files: truncated, empty, garbage, pickle only, absent
        Case("llama:truncated safetensors", "llama", truncate("model.safetensors", 0.5), "omni",
             ("model.safetensors", "truncated or corrupt")),
        Case("llama:header only", "llama", truncate("model.safetensors", 0.01), "omni",
             ("model.safetensors", "truncated or corrupt")),
        Case("llama:empty safetensors", "llama", write("model.safetensors", b""), "omni",
             ("model.safetensors", "truncated or corrupt")),
        Case("llama:garbage safetensors", "llama", write("model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json"),
             "omni", ("model.safetensors", "truncated or corrupt")),
        Case("clip:truncated safetensors", "clip", truncate("model.safetensors", 0.7), "clip",
             ("model.safetensors", "truncated or corrupt")),
        Case("llama:pickle only", "llama", chain(remove("model.safetensors"), write("pytorch_model.bin", b"x")), "omni",
             ("pytorch_model.bin", "safetensors only")),
        Case("llama:no weights", "llama", remove("model.safetensors"), "omni", ("weights are missing",)),
        # Shards and their index
        Case("sharded:missing shard", "llama_sharded", lambda f: shard(f, 1).unlink(), "omni",
             ("model-00002-of-", "incomplete")),
        Case("sharded:index array", "llama_sharded", write("model.safetensors.index.json", "[]"), "omni",
             ("model.safetensors.index.json", "holds an array")),
        Case("sharded:index invalid", "llama_sharded", write("model.safetensors.index.json", "{"), "omni",
             ("model.safetensors.index.json", "not valid JSON")),
        Case("sharded:weight_map string", "llama_sharded",
             set_json("model.safetensors.index.json", "weight_map", "model.safetensors"), "omni", ("weight_map must map",)),
        Case("sharded:weight_map outside the folder", "llama_sharded",
             set_json("model.safetensors.index.json", "weight_map", {"a": "../model.safetensors"}), "omni",
             ("weight_map must map",)),
        Case("sharded:weight_map numbers", "llama_sharded",
             set_json("model.safetensors.index.json", "weight_map", {"a": 1}), "omni", ("weight_map must map",)),
        Case("sharded:weight_map empty", "llama_sharded", set_json("model.safetensors.index.json", "weight_map", {}),
             "omni", ("empty weight_map",)),
        Case("sharded:truncated shard", "llama_sharded", lambda f: truncate(shard(f, 0).name, 0.5)(f), "omni",
             ("model-00001-of-", "truncated or corrupt")),
        # Tokenizers: absent, broken, larger than the embedding, special tokens that are not in it
        Case("omni:no tokenizer", "omni", remove("tokenizer.json"), "processor", ("has no tokenizer.json",)),
        Case("omni:tokenizer invalid", "omni", write("tokenizer.json", "{"), "processor",
             ("tokenizer.json", "cannot read tokenizer")),
        Case("omni:tokenizer empty", "omni", write("tokenizer.json", ""), "processor",
             ("tokenizer.json", "cannot read tokenizer")),
        Case("omni:tokenizer too large", "omni", add_tokens(40), "processor",
             ("the tokenizer has", "tokens but the model embeds", "trained with")),
        Case("llama:tokenizer too large", "llama", add_tokens(1), "processor", ("tokens but the model embeds",)),
        Case("omni:eos not in the tokenizer", "omni", chain(set_json("tokenizer_config.json", "eos_token", "<nope>"),
                                                            set_json("special_tokens_map.json", "eos_token", "<nope>")),
             "processor", ("eos_token '<nope>'", "tokenizer_config.json")),
        Case("omni:image token mismatch", "omni", set_json("omnilm.json", "image_token_id", 5), "processor",
             ("<image> is id", "image_token_id is 5")),
        # The command line: one line and exit 2
        Case("cli:info config array", "llava", write("config.json", "[]"), "info", ("config.json", "holds an array")),
        Case("cli:info bad field", "llava", set_json("config.json", "text_config.hidden_size", "64"), "info",
             ("config.json", "text_config.hidden_size='64'")),
        Case("cli:info clip", "clip", nothing, "info", ("CLIP encoder",)),
        Case("cli:info a file", "llava", nothing, "info@config.json", ("is a file",)),
        Case("cli:chat tokenizer too large", "llava", add_tokens(40), "chat", ("tokens but the model embeds",)),
        Case("cli:chat no tokenizer", "llama", remove("tokenizer.json"), "chat", ("has no tokenizer.json",)),
        Case("cli:chat int weights", "llama", retype("lm_head.weight", torch.int32), "chat", ("lm_head.weight", "int32")),
        Case("cli:eval broken config", "llava", set_json("config.json", "vision_config.patch_size", 0), "eval",
             ("config.json", "vision_config.patch_size=0")),
        Case("cli:eval truncated weights", "omni", truncate("model.safetensors", 0.5), "eval", ("truncated or corrupt",)),
    ]
    return c


CASES = generated_cases() + crafted_cases()


def test_the_table_is_large_and_its_ids_unique():
    assert len(CASES) >= 90
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_broken_checkpoint(case: Case, bases: Path, tmp_path: Path, capsys):
    folder = tmp_path / case.base
    shutil.copytree(bases / case.base, folder)
    case.mutate(folder)
    load, _, inside = case.load.partition("@")  # "omni@model.safetensors": pass that path instead
    target = folder / inside if inside else folder

    if load in ("info", "chat", "eval"):
        argv = {"info": ["info", target], "chat": ["chat", target, "What colour?", "--max-new-tokens", "2"],
                "eval": ["eval", target, "--data", bases / "data" / "q.json", "--image-folder", bases / "data",
                         "--max-new-tokens", "2"]}[load]
        code, out, err = run_cli(argv + (["--device", "cpu"] if load != "info" else []), capsys)
        if case.expect is None:
            assert code == 0, err
            return
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
        for part in case.expect:
            assert part in lines[0], (part, lines[0])
        return

    loader = LOADERS[load]
    if case.expect is not None:
        one_line_error(lambda: loader(target), *case.expect)
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = loader(target)
    messages = [str(w.message) for w in caught]
    if case.warns is not None:
        assert any(case.warns in m for m in messages), messages
    else:
        assert not messages, messages
    if isinstance(loaded, torch.nn.Module):
        assert all(p.dtype == torch.float32 and not p.is_meta for p in loaded.parameters())


def test_a_valid_load_keeps_every_weight(bases: Path):
    # The table's "loads" cases check dtypes; here the values themselves, through a save and a load.
    model = OmniModel.from_pretrained(bases / "omni")
    again = OmniModel.from_pretrained(bases / "llava")  # the same weights, read through config.json
    for (name, p), q in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(p, q), name
    assert math.isclose(model.config.text.rope_theta, again.config.text.rope_theta)
