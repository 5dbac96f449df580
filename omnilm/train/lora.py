"""LoRA (Hu et al. 2021), put around an omnilm model from outside, and its adapters in PEFT's format.

A targeted `nn.Linear` y = Wx + b is replaced by `LoraLinear`, which keeps it frozen as
`base_layer` and adds a trainable low-rank update: y = Wx + b + s * B(A(dropout(x))), with A (r x in)
random, B (out x r) zero (so training starts from the base model), s = alpha / r, or alpha / sqrt(r)
with rsLoRA (Kalajdzievski 2023). The model's own code does not change; `merge_lora` folds every
update back into plain `nn.Linear` layers (W + s * B @ A) for export.

Adapters are written the way peft writes them (`adapter_config.json` and `adapter_model.safetensors`
with the keys of transformers' module names: `base_model.model.model.language_model.layers.0.self_attn.
q_proj.lora_A.weight` for LlavaForConditionalGeneration), so that `peft.PeftModel.from_pretrained`
loads them onto the transformers model, and adapters peft made load here. Modules trained in full
beside the adapter (LLaVA's projector) travel as peft's `modules_to_save`.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from omnilm.errors import OmniInputError
from omnilm.io import atomic_write, read_json, write_json
from omnilm.model.hf import hf_kind
from omnilm.settings import check_range, setting

# The language model's linear layers: attention and the dense MLP (the LoRA paper's and LLaVA's choice).
DEFAULT_TARGETS = r"llm\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"

# omnilm module path prefix -> transformers' (5.x, in memory), by model kind; the first that matches
# a whole path component wins, in either direction.
_TO_HF = {
    "llava": [("llm", "model.language_model"), ("projector.fc1", "model.multi_modal_projector.linear_1"),
              ("projector.fc2", "model.multi_modal_projector.linear_2"), ("projector", "model.multi_modal_projector"),
              ("lm_head", "lm_head")],
    "llama": [("llm", "model"), ("lm_head", "lm_head")],
}
_PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@dataclass(kw_only=True)
class LoraSettings:
    """Which linear layers get a low-rank update, and its shape."""

    lora_r: int = setting(0, "LoRA rank: train rank-r updates of the targeted linear layers instead of their "
                             "weights (0: no LoRA, train the weights)")
    lora_alpha: float = setting(16.0, "LoRA scale numerator: updates are scaled by alpha / r")
    lora_dropout: float = setting(0.0, "dropout on the input of each LoRA update")
    lora_targets: str = setting(DEFAULT_TARGETS, "regular expression over omnilm module paths that get LoRA "
                                                 "(default: the language model's attention and MLP)", metavar="REGEX")
    lora_rslora: bool = setting(False, "rank-stabilised scaling, alpha / sqrt(r) (Kalajdzievski 2023)")

    def __post_init__(self) -> None:
        check_range(self, ("lora_r",), low=0)
        check_range(self, ("lora_alpha",), above=0)
        check_range(self, ("lora_dropout",), 0, 1)
        try:
            re.compile(self.lora_targets)
        except re.error as e:
            raise OmniInputError(f"--lora-targets {self.lora_targets!r} is not a regular expression ({e})") from None

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.lora_r) if self.lora_rslora else self.lora_r)


class LoraLinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable rank-r update (see the module docstring)."""

    def __init__(self, base: nn.Linear, settings: LoraSettings):
        super().__init__()
        self.settings = settings
        self.base_layer = base.requires_grad_(False)
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(base.in_features, settings.lora_r, bias=False, **like)
        self.lora_B = nn.Linear(settings.lora_r, base.out_features, bias=False, **like)
        self.dropout = nn.Dropout(settings.lora_dropout) if settings.lora_dropout else nn.Identity()
        self.scaling = settings.scaling
        if not base.weight.is_meta:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as peft: A random, B zero
            nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base layer with the update folded into its weight."""
        base = self.base_layer
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
        base.weight.copy_((base.weight.float() + delta).to(base.weight.dtype))
        return base


def apply_lora(model: nn.Module, settings: LoraSettings) -> list[str]:
    """Wrap every `nn.Linear` of `model` whose path fully matches `settings.lora_targets` in a
    `LoraLinear`; returns the wrapped paths. The rest of the model is left as it is: which other
    parameters train is the caller's choice (`lora_trainable`)."""
    if settings.lora_r < 1:
        raise OmniInputError("LoRA needs --lora-r of at least 1")
    pattern = re.compile(settings.lora_targets)
    names = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and pattern.fullmatch(name)]
    if not names:
        raise OmniInputError(f"--lora-targets {settings.lora_targets!r} matches no linear layer of the model: "
                             "match module paths such as llm.layers.0.self_attn.q_proj")
    for name in names:
        _replace(model, name, LoraLinear(model.get_submodule(name), settings))
    return names


def lora_trainable(model: nn.Module, full: tuple[str, ...] = ()) -> None:
    """Train the LoRA updates and the modules under the paths `full` (trained in full, such as the
    projector); freeze everything else."""
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_A." in name or ".lora_B." in name
                         or any(name == f or name.startswith(f + ".") for f in full))


def lora_layers(model: nn.Module) -> list[str]:
    """The paths of `model`'s LoRA layers."""
    return [name for name, module in model.named_modules() if isinstance(module, LoraLinear)]


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base layer and put the plain `nn.Linear` back (in place)."""
    for name in lora_layers(model):
        _replace(model, name, model.get_submodule(name).merged())
    return model


@contextmanager
def without_lora(model: nn.Module):
    """Inside the block, `model` holds its base layers where the LoRA layers were (the model as it
    was before `apply_lora`: what `save_pretrained` writes); afterwards the LoRA layers are back."""
    wrapped = {name: model.get_submodule(name) for name in lora_layers(model)}
    for name, module in wrapped.items():
        _replace(model, name, module.base_layer)
    try:
        yield model
    finally:
        for name, module in wrapped.items():
            _replace(model, name, module)


# --- the PEFT format ----------------------------------------------------------------------------


def _swap_prefix(path: str, pairs: list[tuple[str, str]]) -> str | None:
    """`path` with the first prefix of `pairs` it starts with (as whole components) swapped for its
    partner; None when none does."""
    for old, new in pairs:
        if path == old or path.startswith(old + "."):
            return new + path[len(old):]
    return None


def to_hf_path(path: str, kind: str) -> str:
    """The transformers module path of omnilm module `path` (LLaVA's or LLaMA's, as loaded in memory)."""
    hf = _swap_prefix(path, _TO_HF[kind])
    if hf is None:
        raise OmniInputError(f"{path} has no counterpart in transformers' {kind} model that a PEFT adapter can name: "
                             "put LoRA on the language model (the default --lora-targets)")
    return hf


def from_hf_path(path: str, kind: str) -> str:
    """The omnilm module path of transformers module `path` (the inverse of `to_hf_path`)."""
    omni = _swap_prefix(path, [(hf, omni) for omni, hf in _TO_HF[kind]])
    if omni is None:
        raise OmniInputError(f"the adapter names {path}, which omnilm's {kind} model does not have: "
                             "load adapters made for LlavaForConditionalGeneration or LlamaForCausalLM")
    return omni


def trained_in_full(model: nn.Module) -> tuple[str, ...]:
    """The top-level modules with trainable parameters besides the LoRA updates (LLaVA's projector):
    what an adapter carries in full, as peft's `modules_to_save`."""
    return tuple(sorted({name.split(".")[0] for name, p in model.named_parameters()
                         if p.requires_grad and ".lora_" not in name}))


def save_adapter(model: nn.Module, folder: str | Path, full: tuple[str, ...] = (),
                 base_model: str | None = None) -> None:
    """Write `model`'s LoRA updates, and the modules under `full` (trained in full), as a peft
    adapter folder: adapter_config.json and adapter_model.safetensors, written atomically."""
    kind, folder = hf_kind(model.config), Path(folder)
    wrapped = lora_layers(model)
    if not wrapped:
        raise OmniInputError("the model has no LoRA layers to save: apply_lora first")
    settings = model.get_submodule(wrapped[0]).settings
    tensors = {}
    for name in wrapped:
        module, hf = model.get_submodule(name), _PEFT_PREFIX + to_hf_path(name, kind)
        tensors[f"{hf}.lora_A.weight"] = module.lora_A.weight.detach().contiguous()
        tensors[f"{hf}.lora_B.weight"] = module.lora_B.weight.detach().contiguous()
    for path in full:
        for pname, p in model.get_submodule(path).named_parameters():
            owner, _, leaf = f"{path}.{pname}".rpartition(".")
            tensors[f"{_PEFT_PREFIX}{to_hf_path(owner, kind)}.{leaf}"] = p.detach().contiguous()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": settings.lora_r, "lora_alpha": settings.lora_alpha, "lora_dropout": settings.lora_dropout,
        "use_rslora": settings.lora_rslora, "target_modules": [to_hf_path(n, kind) for n in wrapped],
        "modules_to_save": [to_hf_path(p, kind).rpartition(".")[2] for p in full] or None,
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
    }
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_json(folder / ADAPTER_CONFIG, config)


def load_adapter(model: nn.Module, folder: str | Path) -> LoraSettings:
    """Put the peft adapter in `folder` onto `model` (LoRA layers where it names them, its
    `modules_to_save` weights in place); returns its settings."""
    folder, kind = Path(folder), hf_kind(model.config)
    for file in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / file).is_file():
            raise OmniInputError(f"{folder} has no {file}: give a folder written by peft or `omnilm train --lora-r`")
    config = read_json(folder / ADAPTER_CONFIG)
    if config.get("peft_type") != "LORA":
        raise OmniInputError(f"{folder / ADAPTER_CONFIG}: peft_type is {config.get('peft_type')!r}; omnilm loads "
                             "LORA adapters")
    for key, wanted in (("bias", "none"), ("fan_in_fan_out", False)):
        if config.get(key, wanted) != wanted:
            raise OmniInputError(f"{folder / ADAPTER_CONFIG}: {key} is {config[key]!r}; omnilm loads adapters with "
                                 f"{key} {wanted!r}")
    tensors = load_file(folder / ADAPTER_WEIGHTS)
    lora = {}  # omnilm module path -> {"lora_A": tensor, "lora_B": tensor}
    full: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        name = key.removeprefix(_PEFT_PREFIX)
        match = re.fullmatch(r"(.+)\.(lora_A|lora_B)(?:\.default)?\.weight", name)
        if match:
            lora.setdefault(from_hf_path(match.group(1), kind), {})[match.group(2)] = t
        else:
            module, _, param = name.rpartition(".")
            full[f"{from_hf_path(module.replace('.modules_to_save.default', ''), kind)}.{param}"] = t
    settings = LoraSettings(lora_r=int(config["r"]), lora_alpha=float(config["lora_alpha"]),
                            lora_dropout=float(config.get("lora_dropout") or 0.0),
                            lora_targets="|".join(re.escape(name) for name in lora),
                            lora_rslora=bool(config.get("use_rslora")))
    apply_lora(model, settings)
    with torch.no_grad():
        for name, weights in lora.items():
            module = model.get_submodule(name)
            for part in ("lora_A", "lora_B"):
                target = getattr(module, part).weight
                if part not in weights or weights[part].shape != target.shape:
                    raise OmniInputError(f"{folder / ADAPTER_WEIGHTS}: {name}.{part} is "
                                         f"{tuple(weights[part].shape) if part in weights else 'missing'}, the model "
                                         f"needs {tuple(target.shape)}: the adapter was made for another model")
                target.copy_(weights[part])
        params = dict(model.named_parameters())
        for name, t in full.items():
            if name not in params or params[name].shape != t.shape:
                raise OmniInputError(f"{folder / ADAPTER_WEIGHTS}: {name} does not fit the model: the adapter was "
                                     "made for another model")
            params[name].copy_(t)
    return settings
