"""Connectors: how a modality encoder's features enter the decoder's embedding space."""

from __future__ import annotations

import torch
from torch import nn

from omnilm.config import OmniConfig
from omnilm.model.fusion import PatchEmbedding
from omnilm.model.layers import MLP


def build_projector(cfg: OmniConfig) -> nn.Module | None:
    """What writes an image into the decoder's sequence, by fusion mode: for "joint", LLaVA-1.5's
    two-layer MLP projector (Liu et al. 2023, "Improved Baselines"): vision width -> text width ->
    text width, GELU between (LLaVA-1.0 used a single linear layer; the MLP is one of the 1.5
    changes that raised accuracy). For "early", Fuyu's linear patch embedding. None for a
    text-only model, and for late and cross-attention fusion, which keep images out of the sequence."""
    if cfg.vision is None or cfg.fusion in ("late", "cross_attention"):
        return None
    if cfg.fusion == "early":
        return PatchEmbedding(cfg.vision, cfg.text.dim)
    return MLP(cfg.vision.dim, cfg.text.dim, cfg.text.dim, cfg.projector_act, bias=cfg.projector_bias)


@torch.no_grad()
def whiten_(projector: nn.Module, features: torch.Tensor, eps: float = 1e-6) -> None:
    """Initialise the projector's first layer to PCA-whiten `features` (M, Dv): its first k =
    min(Dv, hidden) outputs become the features' top-k principal components scaled to unit
    variance (and centred, when the layer has a bias); the remaining outputs keep their
    initialisation. With hidden < Dv the Dv - hidden weakest directions get no whitened output.
    Directions with under `eps` of the largest variance are scaled as if they had that much.

    Gradient descent learns a direction of its input at a speed that grows with that direction's
    variance. Features from a small or freshly trained encoder put most of their variance in
    a few attributes (in ShapeWorld: colour and size), so a projector fed them as they are
    learns the rest (shape) many times more slowly. Whitened, every direction starts equal."""
    fc1 = projector.fc1
    x = features.reshape(-1, features.shape[-1]).double()
    mean = x.mean(0)
    values, vectors = torch.linalg.eigh(torch.cov((x - mean).T))  # ascending
    if not values.max() > 0:
        raise ValueError("the features do not vary at all: whitening needs images that differ")
    k = min(fc1.out_features, x.shape[1])
    values, vectors = values.flip(0)[:k], vectors.flip(1)[:, :k]
    w = (vectors / (values.clamp(min=0) + eps * values.max()).sqrt()).T  # (k, Dv)
    fc1.weight[:k] = w.to(fc1.weight)
    if fc1.bias is not None:
        fc1.bias[:k] = -(w @ mean).to(fc1.bias)
