"""Connectors: how a modality encoder's features enter the decoder's embedding space."""

from __future__ import annotations

from torch import nn

from omnilm.config import OmniConfig
from omnilm.model.layers import MLP


def build_projector(cfg: OmniConfig) -> nn.Module:
    """LLaVA-1.5's two-layer MLP projector (Liu et al. 2023, "Improved Baselines"): vision width ->
    text width -> text width, GELU between. LLaVA-1.0 used a single linear layer; the MLP is one
    of the 1.5 changes that raised accuracy."""
    assert cfg.vision is not None
    return MLP(cfg.vision.dim, cfg.text.dim, cfg.text.dim, cfg.projector_act, bias=cfg.projector_bias)
