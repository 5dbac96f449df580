"""Whisper's audio encoder (Radford et al. 2022) and Voxtral's audio projector (Mistral AI 2025).

Weight-compatible with transformers' `WhisperEncoder`, which is also Voxtral's `audio_tower` (there
with a parameter-free `avg_pooler` that its forward never calls), and `VoxtralMultiModalProjector`.
The encoder reads log-mel windows from omnilm.data.audio.log_mel.

Shape letters: B windows, M mel bins, F mel frames (2T), T encoder frames, D width, H heads,
hd head dim, K frames per audio token, E text width.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import sdpa_kernel

from omnilm.config import AudioConfig
from omnilm.errors import OmniInputError
from omnilm.model.layers import activation, sdpa_backend


def sinusoids(T: int, D: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """(T, D) Whisper's fixed positions: the sines, then the cosines, of D/2 frequencies spaced
    geometrically from 1 down to 1/max_timescale radians per frame."""
    rates = torch.exp(-math.log(max_timescale) / (D // 2 - 1) * torch.arange(D // 2))  # (D/2,)
    angles = torch.arange(T)[:, None] * rates[None, :]  # (T, D/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class WhisperAttention(nn.Module):
    """Bidirectional multi-head self-attention through SDPA. Its own module rather than
    layers.Attention because Whisper's layout differs: keys have no bias (it would add the same
    amount to every score of a query, which softmax ignores) and the output is `out_proj`."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        # The queries are scaled before the product, as transformers does, so that half precision rounds alike.
        heads = (B, T, self.n_heads, self.head_dim)
        q = (self.q_proj(x) * self.head_dim**-0.5).view(heads).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(heads).transpose(1, 2)
        v = self.v_proj(x).view(heads).transpose(1, 2)
        backend = sdpa_backend(q, k)
        with sdpa_kernel(backend) if backend is not None else nullcontext():
            y = F.scaled_dot_product_attention(q, k, v, scale=1.0)  # (B, H, T, hd)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


class WhisperEncoderLayer(nn.Module):
    """Pre-LayerNorm block: x + attn(ln(x)), then x + fc2(act(fc1(ln(x)))). fc1 and fc2 sit on the
    block itself, as transformers names them (layers.MLP would put them under `mlp.`)."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.self_attn = WhisperAttention(cfg.dim, cfg.n_heads)
        self.final_layer_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp_dim)
        self.act = activation(cfg.act)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        x = x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))
        if x.dtype == torch.float16:
            # As transformers: keep fp16 activations finite, so that the next LayerNorm gives no NaN.
            big = torch.finfo(torch.float16).max - 1000
            x = x.clamp(-big, big)
        return x


class WhisperEncoder(nn.Module):
    """Two convolutions over the log-mel frames (the second halves the rate to 50 frames a second),
    fixed positions, pre-LayerNorm blocks and a final LayerNorm. Takes whole windows only: the
    positions have exactly max_source_positions rows, and Whisper was never trained on padding masks."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.config = cfg
        self.conv1 = nn.Conv1d(cfg.n_mels, cfg.dim, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(cfg.dim, cfg.dim, kernel_size=3, stride=2, padding=1)
        # Sinusoids, frozen, as OpenAI's Whisper keeps them; an nn.Embedding because transformers stores them so.
        self.embed_positions = nn.Embedding(cfg.max_source_positions, cfg.dim)
        self.embed_positions.requires_grad_(False)
        self.reset_positions()
        self.layers = nn.ModuleList(WhisperEncoderLayer(cfg) for _ in range(cfg.n_layers))
        self.layer_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)

    @torch.no_grad()
    def reset_positions(self) -> None:
        """Write the sinusoids into the positions (a no-op on the meta device)."""
        if not self.embed_positions.weight.is_meta:
            self.embed_positions.weight.copy_(sinusoids(self.config.max_source_positions, self.config.dim))

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, M, F) log-mel windows, F = cfg.window_frames -> (B, T, D) frames, T = F / 2."""
        n_mels, n_frames = self.config.n_mels, self.config.window_frames
        if mel.ndim != 3 or tuple(mel.shape[1:]) != (n_mels, n_frames):
            raise OmniInputError(f"audio features of shape {tuple(mel.shape)}: the encoder takes windows of shape "
                                 f"(B, {n_mels}, {n_frames}), {n_mels} mel bins by {n_frames} frames; cut or pad the "
                                 "audio into windows with omnilm.data.audio.log_mel")
        x = F.gelu(self.conv1(mel.to(self.conv1.weight.dtype)))  # (B, D, F)
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (B, T, D)
        # Summed in the positions' dtype when it is wider (Voxtral keeps them in fp32 in a bf16 model).
        x = (x + self.embed_positions.weight).to(x.dtype)
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)


class VoxtralProjector(nn.Module):
    """Voxtral's audio-to-text projector: K consecutive encoder frames side by side as one K*D
    vector (12.5 audio tokens a second for K = 4), then Linear, GELU, Linear, without biases."""

    def __init__(self, audio_dim: int, text_dim: int, frames_per_token: int = 4, act: str = "gelu"):
        super().__init__()
        self.frames_per_token = frames_per_token
        self.linear_1 = nn.Linear(frames_per_token * audio_dim, text_dim, bias=False)
        self.act = activation(act)
        self.linear_2 = nn.Linear(text_dim, text_dim, bias=False)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, D) encoder frames -> (B, T/K, E) audio tokens; `.flatten(0, 1)` gives transformers'
        (B*T/K, E), whose reshape of the batch's frames is row-major too."""
        B, T, D = frames.shape
        K = self.frames_per_token
        if T % K:
            raise ValueError(f"{T} frames per window is not a multiple of frames_per_token={K}")
        x = frames.reshape(B, T // K, K * D)  # frame t's D values, then frame t+1's, ...
        return self.linear_2(self.act(self.linear_1(x)))
