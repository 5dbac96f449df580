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


def build_video_projector(cfg: OmniConfig) -> nn.Module | None:
    """The projector of video frames where they are wider than an image's features ("concat"
    pooling, motion; OmniConfig.video_feature_dim): LLaVA's MLP from that width. None where frames
    share the image projector, as LLaVA-NeXT-Video's do."""
    if cfg.video_token_id is None or cfg.video_feature_dim == cfg.vision.dim:
        return None
    return MLP(cfg.video_feature_dim, cfg.text.dim, cfg.text.dim, cfg.projector_act, bias=cfg.projector_bias)


@torch.no_grad()
def whiten_(projector: nn.Module, features: torch.Tensor, eps: float = 1e-6,
            standardize_from: int | None = None) -> None:
    """Initialise the projector's first layer to PCA-whiten `features` (M, Dv): its first Dv
    outputs become the features' principal components scaled to unit variance (and centred, when
    the layer has a bias); the remaining outputs keep their initialisation. Directions with under
    `eps` of the largest variance are scaled as if they had that much.

    Gradient descent learns a direction of its input at a speed that grows with that direction's
    variance. Features from a small or freshly trained encoder put most of their variance in
    a few attributes (in ShapeWorld: colour and size), so a projector fed them as they are
    learns the rest (shape) many times more slowly. Whitened, every direction starts equal.

    Features from index `standardize_from` on (a video's motion features: mostly zero, and their
    rare large values would dominate a whitening) are standardised instead (zero mean, unit
    variance), through the layer's own random weights, into the outputs the whitened ones leave.
    A layer too narrow to whiten its features (fewer outputs than them, or none left for the rest)
    standardises every feature: keeping only the strongest directions would drop the weak ones."""
    fc1 = projector.fc1
    x = features.reshape(-1, features.shape[-1]).double()
    if not x.std(0).max() > 0:
        raise ValueError("the features do not vary at all: whitening needs images that differ")
    width = x.shape[1] if standardize_from is None else standardize_from
    room = fc1.out_features - width  # outputs left for the standardised features
    if room < 0 or (room == 0 and width < x.shape[1]):
        _standardize(fc1, x, slice(None), slice(None), eps)
        return
    mean = x[:, :width].mean(0)
    values, vectors = torch.linalg.eigh(torch.cov((x[:, :width] - mean).T))  # ascending
    values, vectors = values.flip(0), vectors.flip(1)
    w = (vectors / (values.clamp(min=0) + eps * values.max()).sqrt()).T  # (width, width)
    fc1.weight[:width] = 0
    fc1.weight[:width, :width] = w.to(fc1.weight)
    if fc1.bias is not None:
        fc1.bias[:width] = -(w @ mean).to(fc1.bias)
    if width < x.shape[1]:
        fc1.weight[width:, :width] = 0
        _standardize(fc1, x, slice(width, None), slice(width, None), eps)


def _standardize(fc1: nn.Linear, x: torch.Tensor, rows: slice, cols: slice, eps: float) -> None:
    """Make outputs `rows` of `fc1` read features `cols` of `x` standardised, their weights kept."""
    mean, std = x[:, cols].mean(0), x[:, cols].std(0)
    w = fc1.weight[rows, cols].double() / std.clamp(min=eps ** 0.5 * std.max())
    fc1.weight[rows, cols] = w.to(fc1.weight)
    if fc1.bias is not None:
        fc1.bias[rows] -= (w @ mean).to(fc1.bias)
