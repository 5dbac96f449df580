"""int8 weight-only quantisation, applied from outside the model (gpt-fast's way): `quantize_int8`
swaps the linear layers of chosen parts of an OmniModel, the ViT's patch convolution, the decoder's
token embedding and its MoE experts for int8 twins; the model classes never know. By default every
part the model has is quantised (`OmniConfig.quantizable`). `OmniModel.save_pretrained` writes the
twins' tensors as they are, and `OmniModel.from_pretrained` rebuilds the twins from the config's
`quantization`.

Symmetric, one scale per output channel: a weight row w becomes q = round(w / s) in [-127, 127]
with s = max|w| / 127, so each entry is off by at most s / 2. The scale factors out of the sum
over inputs, y = (x @ q^T) * s + b: a matmul on the integers, then one multiply per output (for a
convolution, a row is one output channel's kernel).

Left in floating point: the MoE routers (read as fp32 weights by `MoE.route`, and tiny), Whisper's
two convolutions (a fraction of a percent of an audio model), the late and cross-attention fusion
blocks, norms and position tables. Shape letters: N output channels, K input features, C input
channels, E experts, V vocabulary, D width.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from omnilm.config import QuantConfig
from omnilm.errors import OmniInputError
from omnilm.model.moe import Experts, MoE

# The model's attributes a part of QuantConfig.modules names, where they are not the part's own name.
SUBMODULES = {"projector": ("projector", "video_projector", "audio_projector")}
# PyTorch's CPU int8 kernel is a matrix-vector loop, vectorised for bfloat16 only (float32 and
# float16 run a scalar loop, 2-20x slower than the dequantised matmul; measured with torch 2.13 on
# AVX512, 1 thread). Its time grows with the rows: past about 8, converting the weight once and
# calling the BLAS matmul is faster. So it serves bf16 decoding; prefill takes the matmul.
KERNEL_MAX_ROWS = 8


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., N, K) float weight -> its int8 rows (..., N, K) and their scales (..., N), in the weight's dtype."""
    w = weight.detach().float()
    # The scale is rounded to the weight's dtype first, so that q is computed with the scale used.
    scale = (w.abs().amax(dim=-1) / 127).to(weight.dtype)
    q = torch.round(w / scale.float().clamp(min=torch.finfo(torch.float32).tiny)[..., None])  # zero rows stay 0
    return q.clamp(-127, 127).to(torch.int8), scale


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ (weight (N, K) int8 * scale (N,))^T -> (..., N), in x's dtype."""
    scale = scale.to(x.dtype)
    if _kernel_fits(x):
        y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).contiguous(), weight, scale)
        return y.view(*x.shape[:-1], -1)
    return F.linear(x, weight.to(x.dtype)) * scale


def _kernel_fits(x: torch.Tensor) -> bool:
    """Whether `torch._weight_int8pack_mm` serves x (..., K) well (KERNEL_MAX_ROWS). It has no gradient:
    an input that needs one (attention maps by gradient, say) takes the matmul."""
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.numel() <= KERNEL_MAX_ROWS * x.shape[-1]
            and not (x.requires_grad and torch.is_grad_enabled()))


class Int8Linear(nn.Module):
    """nn.Linear with int8 weights: `weight` (N, K) int8, `scale` (N,) and `bias` (N,) float."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: nn.Parameter | None):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int8_linear(x, self.weight, self.scale)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        N, K = self.weight.shape
        return f"in_features={K}, out_features={N}, bias={self.bias is not None}, int8"


class Int8Embedding(nn.Module):
    """nn.Embedding with int8 rows: `weight` (V, D) int8 and `scale` (V,) float, one per row (the rows
    and scales of a tied output head: `quantize_rows` treats both alike)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (...,) -> (..., D)
        return F.embedding(ids, self.weight).to(self.scale.dtype) * self.scale[ids].unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, {self.weight.shape[1]}, int8"


class Int8Conv2d(nn.Module):
    """nn.Conv2d with int8 weights: `weight` (N, C, kh, kw) int8, `scale` (N,) and `bias` (N,) float.
    Each output channel's scale factors out of its sum, as in Int8Linear: the convolution runs on the
    integers (exact in any float dtype), then one multiply per output."""

    def __init__(self, conv: nn.Conv2d, weight: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.bias = conv.bias
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, N, h, w)
        y = F.conv2d(x, self.weight.to(x.dtype), None, self.stride, self.padding, self.dilation, self.groups)
        y = y * self.scale.to(x.dtype)[:, None, None]
        return y if self.bias is None else y + self.bias[:, None, None]

    def extra_repr(self) -> str:
        N, C, kh, kw = self.weight.shape
        return f"{C * self.groups}, {N}, kernel_size=({kh}, {kw}), stride={self.stride}, int8"


class Int8Experts(nn.Module):
    """`Experts` with int8 weights: gate_up_proj (E, 2F, D) and down_proj (E, D, F) int8, with
    gate_up_scale (E, 2F) and down_scale (E, D). One expert at a time, the idle ones skipped: a
    decoding step reads the weights of its k experts only."""

    def __init__(self, experts: Experts):
        super().__init__()
        self.n, self.hidden_dim = experts.n, experts.hidden_dim
        for name in ("gate_up", "down"):
            q, scale = quantize_rows(getattr(experts, f"{name}_proj"))
            self.register_buffer(f"{name}_proj", q)
            self.register_buffer(f"{name}_scale", scale)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (M, D): rows grouped by expert, counts (E,) rows per expert, in order -> (M, D)."""
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        out = []
        for e, rows in enumerate(x.to(dtype).split(counts.tolist())):
            if len(rows):
                gate, up = int8_linear(rows, self.gate_up_proj[e], self.gate_up_scale[e]).chunk(2, dim=-1)
                out.append(int8_linear(F.silu(gate) * up, self.down_proj[e], self.down_scale[e]))
        return torch.cat(out) if out else x.new_zeros(0, x.shape[-1], dtype=dtype)


def quantize_int8(model: nn.Module, modules: Sequence[str] | None = None) -> nn.Module:
    """Quantise `model` (an OmniModel) in place to int8 weights, and return it: every nn.Linear and
    nn.Conv2d of the parts named in `modules` ("llm", "lm_head", "vision", "audio", "projector";
    None: every part the model has), and with "llm" the token embedding and the MoE experts (see the
    module docstring for what stays float). Its config's `quantization` records what, so that the
    saved checkpoint loads back as this model. An int8 model is for inference: it does not train."""
    q = model.config.quantization
    if q is not None:
        raise OmniInputError(f"the model is quantised already ({q.method} weights in {', '.join(q.modules)}): "
                             "quantise the float checkpoint it came from")
    modules = model.config.quantizable() if modules is None else list(modules)
    try:  # the config checks that the model has the parts named
        checked = replace(model.config, quantization=QuantConfig("int8", modules))
    except ValueError as e:
        raise OmniInputError(f"cannot quantise: {e}") from None
    swap_int8(model, checked.quantization.modules)
    model.config.quantization = checked.quantization
    return model


def swap_int8(model: nn.Module, modules: Sequence[str]) -> None:
    """The swap alone, on any device: `from_pretrained` runs it on a model built on the meta device,
    so that the checkpoint's int8 tensors have their places. A tied head and token embedding share one
    int8 matrix, as they shared one float matrix."""
    routers = {f"{name}.gate" for name, m in model.named_modules() if isinstance(m, MoE)}
    done: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # id(float weight) -> (it, q, scale)

    def int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Its int8 twin, of its shape (a kernel's rows flattened), and one scale per output channel."""
        if id(weight) not in done:  # `done` holds the weight, so that its id is not reused meanwhile
            q, scale = quantize_rows(weight.flatten(1))
            done[id(weight)] = (weight, q.view(weight.shape), scale)
        return done[id(weight)][1:]

    roots = [root for part in modules for root in SUBMODULES.get(part, (part,)) if getattr(model, root) is not None]
    for root in roots:
        for name, module in list(model.get_submodule(root).named_modules(prefix=root)):
            if isinstance(module, nn.Linear) and name not in routers:
                twin = Int8Linear(*int8(module.weight), module.bias)
            elif isinstance(module, nn.Conv2d):
                twin = Int8Conv2d(module, *int8(module.weight))
            elif isinstance(module, nn.Embedding) and name == "llm.embed_tokens":
                twin = Int8Embedding(*int8(module.weight))
            elif isinstance(module, Experts):
                twin = Int8Experts(module)
            else:
                continue
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, twin)
