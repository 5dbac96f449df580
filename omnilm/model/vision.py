"""CLIP ViT image encoder (Radford et al. 2021; Dosovitskiy et al. 2021), LLaVA-1.5's vision tower.

Weight-compatible with HF `CLIPVisionModel`. Shape letters: N images, P patches, D width.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from omnilm.config import VisionConfig
from omnilm.model.layers import MLP, Attention


class VisionEmbeddings(nn.Module):
    """Class token + non-overlapping patches (conv without bias) + learned absolute positions."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(cfg.dim))
        self.patch_embedding = nn.Conv2d(cfg.n_channels, cfg.dim, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.n_patches + 1, cfg.dim)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        N = pixel_values.shape[0]
        patches = self.patch_embedding(pixel_values.to(self.class_embedding.dtype))  # (N, D, h, w)
        patches = patches.flatten(2).transpose(1, 2)  # (N, P, D)
        cls = self.class_embedding.expand(N, 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight  # (N, 1+P, D)


class EncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block. Bidirectional over all patches in the ViT; the CLIP text
    tower (omnilm.model.clip) reuses it with a causal `mask`. `cfg` is any config with dim,
    n_heads, head_dim, mlp_dim, norm_eps and act."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.self_attn = Attention(cfg.dim, cfg.n_heads, cfg.n_heads, cfg.head_dim, bias=True)
        self.layer_norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg.dim, cfg.mlp_dim, cfg.dim, cfg.act)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask=mask, is_causal=is_causal)
        return x + self.mlp(self.layer_norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)  # sic: HF's name, kept for weight compatibility
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_layers))
        self.post_layernorm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)  # for the pooled class token only

    def forward(self, pixel_values: torch.Tensor, layer: int = -1) -> torch.Tensor:
        """Hidden states (N, 1+P, D) after `layer` blocks, indexed as HF's `hidden_states` tuple.

        0 is the embedding output, i the output of block i, negative counts from the end
        (-1 = last, -2 = penultimate, LLaVA-1.5's choice). Blocks past `layer` are not run.
        """
        n_run = layer % (len(self.layers) + 1)
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        for block in self.layers[:n_run]:
            x = block(x)
        return x

    def hidden_states(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """All L+1 hidden states, as HF's `output_hidden_states=True` returns them."""
        states = [self.pre_layrnorm(self.embeddings(pixel_values))]
        for block in self.layers:
            states.append(block(states[-1]))
        return states

    def pooled(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Post-LayerNorm class token (N, D): CLIP's image representation."""
        return self.post_layernorm(self.forward(pixel_values)[:, 0])


class FeatureCache:
    """A frozen tower's hidden states of each distinct image, remembered by its pixels.

    A stage that trains everything but the vision tower (LLaVA's stage 2, the video recipe) meets
    every frame once an epoch and gets the same features each time: with this cache it runs the
    tower on each distinct image once. Keys are a digest of the preprocessed pixels and the layer,
    so nothing about where an image came from needs to reach the model. The cache refuses a tower
    that trains, and empties itself when the tower's weights change in place (a load, an optimizer
    step): the sum of the parameters' version counters is part of what it checks. Entries are kept
    until `max_bytes` is reached; images beyond it are encoded every time.
    """

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes is {max_bytes}: give zero or more bytes")
        self.max_bytes, self.bytes = max_bytes, 0
        self.hits = self.misses = 0
        self._entries: dict[bytes, torch.Tensor] = {}
        self._weights_version: int | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def __call__(self, tower: VisionTransformer, pixel_values: torch.Tensor, layer: int = -1) -> torch.Tensor:
        """`tower(pixel_values, layer=layer)`, each image's row from the cache where it is there."""
        if tower.training or torch.is_grad_enabled() and any(p.requires_grad for p in tower.parameters()):
            raise RuntimeError("FeatureCache holds a frozen tower's features: this tower trains (set it to eval "
                               "mode and requires_grad False, or drop the cache)")
        version = sum(p._version for p in tower.parameters())
        if version != self._weights_version:
            self.clear()
            self._weights_version = version
        keys = [self._key(image, layer) for image in pixel_values]
        missing = [i for i, key in enumerate(keys) if key not in self._entries]
        self.hits, self.misses = self.hits + len(keys) - len(missing), self.misses + len(missing)
        if not missing:
            return torch.stack([self._entries[key] for key in keys])
        with torch.no_grad():
            fresh = tower(pixel_values[missing], layer=layer)
        rows = dict(zip(missing, fresh))
        for i, row in rows.items():
            size = row.numel() * row.element_size()
            if keys[i] not in self._entries and self.bytes + size <= self.max_bytes:
                self._entries[keys[i]] = row.clone()  # not a view: the batch it came from can go
                self.bytes += size
        return torch.stack([rows[i] if i in rows else self._entries[key] for i, key in enumerate(keys)])

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    @staticmethod
    def _key(image: torch.Tensor, layer: int) -> bytes:
        pixels = image.detach().to("cpu", copy=False).contiguous()
        digest = hashlib.blake2b(pixels.view(torch.uint8).numpy().tobytes(), digest_size=16)
        digest.update(f"{layer}:{pixels.dtype}:{tuple(pixels.shape)}".encode())
        return digest.digest()
