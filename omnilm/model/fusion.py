"""Where images meet text: the fusion modes beside LLaVA's projector (OmniConfig.fusion).

The seed names three ways to fuse modalities (early, late, joint) plus cross-attention, where
text supplies the queries and images the keys and values. `OmniModel` implements all four on
one decoder; ../docs/fusion.md compares them on the same data.

    joint            connector.build_projector: vision features, projected, at the markers (LLaVA)
    early            PatchEmbedding: raw patches, one linear map, a row break per row (Fuyu)
    late             LateFusion: pooled image vectors join the decoder's last hidden states
    cross_attention  CrossAttentionFusion: perceiver resampler + tanh-gated cross-attention (Flamingo)

Late and cross-attention keep each image outside the sequence: its marker stays a single text
token, and the image's vectors travel beside the sequence in a `Media` (kept in the KV cache for
decoding). Which images a token may read follows the markers: those at or before its position.

Shape letters: B batch, T tokens, N images, M images per row (padded), L vectors per image,
D text width, Dv vision width, P vision tokens per image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from omnilm.config import OmniConfig, VisionConfig
from omnilm.errors import OmniInputError
from omnilm.model.layers import MLP, Attention, RMSNorm, SwiGLU

# Learned "which image is this" vectors for late and cross-attention fusion ("the second image").
MAX_IMAGES = 16
_NO_IMAGE = torch.iinfo(torch.long).max  # the marker position of a padding slot: after every token


@dataclass
class Media:
    """Each row's images, in marker order, for the modes that read them beside the sequence.

    features (B, M, L, D), zero where a row has fewer than M images; positions (B, M): the
    sequence index of each image's marker (the index in input_ids, padding included), or
    `_NO_IMAGE` for an empty slot, so that positions ascend along each row.
    """

    features: torch.Tensor
    positions: torch.Tensor

    @classmethod
    def locate(cls, input_ids: torch.Tensor, marker_id: int, feats: torch.Tensor, start: int = 0) -> Media:
        """Give the images `feats` (N, L, D), in marker order across the batch (row-major, as
        pixel_values come), to the markers of `input_ids` (B, T), whose first token is at
        sequence index `start`."""
        is_marker = input_ids == marker_id
        n_markers, N = int(is_marker.sum()), feats.shape[0]
        if n_markers != N:
            raise OmniInputError(f"input_ids hold {n_markers} image markers but {N} images were given: "
                                 "pass one image per <image> marker, in marker order across the batch")
        B = input_ids.shape[0]
        per_row = is_marker.sum(1)
        M = int(per_row.max()) if N else 0
        _check_count(M)
        rows, cols = is_marker.nonzero(as_tuple=True)  # row-major: the order of the images
        slots = (is_marker.cumsum(1) - 1)[rows, cols]
        features = feats.new_zeros(B, M, *feats.shape[1:])
        positions = torch.full((B, M), _NO_IMAGE, dtype=torch.long, device=input_ids.device)
        features[rows, slots] = feats
        positions[rows, slots] = cols + start
        return cls(features, positions)

    @property
    def empty(self) -> bool:
        return self.features.shape[1] == 0

    def ordered(self, order: nn.Embedding) -> torch.Tensor:
        """The features with each image's learned ordinal vector added (row m of `order` to the
        m-th image of every row), so that a query can ask for "the second image"."""
        return self.features + order.weight[:self.features.shape[1], None].to(self.features)

    @classmethod
    def stack(cls, rows: list[Media | None]) -> Media | None:
        """One batch from each row's own images (a serving batch: each row a request prefilled
        alone, None for a row without images); None when no row has any."""
        known = [m for m in rows if m is not None and not m.empty]
        if not known:
            return None
        M = max(m.features.shape[1] for m in known)
        like = known[0]
        features = like.features.new_zeros(len(rows), M, *like.features.shape[2:])
        positions = torch.full((len(rows), M), _NO_IMAGE, dtype=torch.long, device=like.positions.device)
        for b, m in enumerate(rows):
            if m is not None and not m.empty:
                n = m.features.shape[1]
                features[b, :n], positions[b, :n] = m.features[0], m.positions[0]
        return cls(features, positions)

    def extend(self, later: Media) -> Media:
        """These images followed by `later` ones (a prompt prefilled in chunks)."""
        positions = torch.cat([self.positions, later.positions], 1)
        order = positions.argsort(dim=1, stable=True)  # real positions first, in sequence order
        features = torch.cat([self.features, later.features.to(self.features)], 1)
        idx = order.view(*order.shape, *([1] * (features.ndim - 2))).expand_as(features)
        keep = int((positions != _NO_IMAGE).sum(1).max())
        _check_count(keep)
        return Media(features.gather(1, idx)[:, :keep], positions.gather(1, order)[:, :keep])


def _check_count(n_images: int) -> None:
    if n_images > MAX_IMAGES:
        raise OmniInputError(f"a prompt holds {n_images} images; this fusion mode tells at most {MAX_IMAGES} apart: "
                             "split the prompt")


def media_mask(positions: torch.Tensor, query_positions: torch.Tensor, attend: str) -> torch.Tensor:
    """(B, T, M) True where the token at sequence index query_positions[t] (or [b, t]: rows at
    positions of their own) may read image m of its row: every image whose marker is at or before
    it ("all"), or only the latest one ("previous")."""
    queries = query_positions if query_positions.ndim == 2 else query_positions[None]
    seen = positions[:, None, :] <= queries[:, :, None]  # a prefix of each row's images
    if attend == "all":
        return seen
    latest = seen.sum(-1, keepdim=True) - 1  # -1: no image yet
    return torch.arange(positions.shape[1], device=positions.device) == latest


def _attend_media(attn: Attention, x: torch.Tensor, media: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Cross-attention from x (B, T, D) to media vectors (B, M, L, D), image m readable where
    allowed (B, T, M); a token with no readable image gets exactly 0."""
    B, M, L, _ = media.shape
    keys = allowed.repeat_interleave(L, dim=2)  # (B, T, M*L)
    has_any = keys.any(-1, keepdim=True)
    # A row of all-False would make softmax NaN, and 0 * NaN is NaN: let it read anything, then zero it.
    y = attn(x, mask=(keys | ~has_any)[:, None], context=media.reshape(B, M * L, -1))
    return y * has_any.to(y.dtype)


# --- early: raw patches into the sequence (Fuyu) -------------------------------------------------


class PatchEmbedding(nn.Module):
    """Fuyu's image input: each patch's raw pixels through one linear layer, straight into the
    decoder's width, with a learned row-break vector after every row of patches, so that the
    decoder, which sees a flat sequence, can tell where rows end. No vision encoder."""

    def __init__(self, vision: VisionConfig, dim: int):
        super().__init__()
        self.patch_size, self.side = vision.patch_size, vision.image_size // vision.patch_size
        self.proj = nn.Linear(vision.n_channels * vision.patch_size**2, dim)
        self.row_break = nn.Parameter(torch.empty(dim))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, side * (side + 1), D): row by row, each row's patches then a break."""
        N, C, p, s = pixel_values.shape[0], pixel_values.shape[1], self.patch_size, self.side
        # Each patch flattened pixel by pixel, channels innermost (y, x, c), as Fuyu's processor does.
        pixels = pixel_values.to(self.row_break.dtype)[:, :, :s * p, :s * p]
        patches = pixels.reshape(N, C, s, p, s, p).permute(0, 2, 4, 3, 5, 1)
        x = self.proj(patches.reshape(N, s, s, p * p * C))  # (N, s, s, D)
        breaks = self.row_break.to(x.dtype).expand(N, s, 1, x.shape[-1])
        return torch.cat([x, breaks], dim=2).flatten(1, 2)


# --- late: pooled images meet the decoder's last hidden states ----------------------------------


class LateFusion(nn.Module):
    """Late fusion: the decoder reads text only; each image is pooled to one vector by its own
    tower, and joins the decoder's final hidden states right before the output head.

    A token reads the images at or before its position through one attention step (its hidden
    state asks, the pooled images and their ordinal answer), and a learned sigmoid gate decides,
    per token and channel, how much of that to add: h + g * c. Where an image lands changes
    nothing before it."""

    def __init__(self, cfg: OmniConfig):
        super().__init__()
        t = cfg.text
        self.pool = MLP(cfg.vision.dim, t.dim, t.dim, cfg.projector_act, bias=cfg.projector_bias)
        self.order = nn.Embedding(MAX_IMAGES, t.dim)
        self.attn = Attention(t.dim, t.n_heads, t.n_heads, t.head_dim, bias=False)
        self.norm = RMSNorm(t.dim, t.norm_eps)
        self.gate = nn.Linear(2 * t.dim, t.dim)

    def encode(self, feats: torch.Tensor) -> torch.Tensor:
        """Vision tokens (N, P, Dv) -> one vector per image (N, 1, D)."""
        return self.pool(feats.mean(1, keepdim=True))

    def forward(self, h: torch.Tensor, media: Media | None, query_positions: torch.Tensor) -> torch.Tensor:
        if media is None or media.empty:
            return h
        images = media.ordered(self.order)  # (B, M, 1, D)
        c = _attend_media(self.attn, self.norm(h), images, media_mask(media.positions, query_positions, "all"))
        g = torch.sigmoid(self.gate(torch.cat([h, c], dim=-1)))
        return h + g * c


# --- cross-attention: perceiver resampler and gated blocks (Flamingo) ---------------------------


class PerceiverResampler(nn.Module):
    """A fixed number of learned latents read an image's vision tokens (Jaegle et al. 2021;
    Flamingo, Alayrac et al. 2022): each layer, the latents attend to [tokens; latents] and pass
    an MLP. Any number of tokens in, `n_latents` vectors of the text width out."""

    def __init__(self, cfg: OmniConfig):
        super().__init__()
        v = cfg.vision
        self.latents = nn.Parameter(torch.empty(cfg.n_latents, v.dim))
        self.layers = nn.ModuleList(ResamplerLayer(v) for _ in range(cfg.resampler_layers))
        self.norm = nn.LayerNorm(v.dim, eps=v.norm_eps)
        self.proj = nn.Linear(v.dim, cfg.text.dim)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """(N, P, Dv) -> (N, n_latents, D)."""
        x = self.latents.to(feats.dtype).expand(feats.shape[0], -1, -1)
        for layer in self.layers:
            x = layer(x, feats)
        return self.proj(self.norm(x))


class ResamplerLayer(nn.Module):
    def __init__(self, v: VisionConfig):
        super().__init__()
        self.norm_media = nn.LayerNorm(v.dim, eps=v.norm_eps)
        self.norm_latents = nn.LayerNorm(v.dim, eps=v.norm_eps)
        self.attn = Attention(v.dim, v.n_heads, v.n_heads, v.head_dim, bias=False)
        self.norm_mlp = nn.LayerNorm(v.dim, eps=v.norm_eps)
        self.mlp = MLP(v.dim, v.mlp_dim, v.dim, "gelu", bias=False)

    def forward(self, latents: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        q = self.norm_latents(latents)
        latents = latents + self.attn(q, context=torch.cat([self.norm_media(feats), q], dim=1))
        return latents + self.mlp(self.norm_mlp(latents))


class GatedCrossAttentionBlock(nn.Module):
    """Flamingo's GATED XATTN-DENSE: x + tanh(a) * xattn(x, media), then + tanh(b) * ffw. The
    gates start at 0 (`init_weights` zeroes every `*_gate`), so a fresh block is the identity and
    the decoder starts as the plain language model."""

    def __init__(self, cfg: OmniConfig):
        super().__init__()
        t = cfg.text
        self.norm = RMSNorm(t.dim, t.norm_eps)
        self.attn = Attention(t.dim, t.n_heads, t.n_kv_heads, t.head_dim, bias=False)
        self.attn_gate = nn.Parameter(torch.empty(1))
        self.norm_mlp = RMSNorm(t.dim, t.norm_eps)
        self.mlp = SwiGLU(t.dim, t.mlp_dim)
        self.mlp_gate = nn.Parameter(torch.empty(1))

    def forward(self, x: torch.Tensor, media: torch.Tensor | None, allowed: torch.Tensor | None) -> torch.Tensor:
        """`media` None: no image anywhere in the batch, so the attention adds exactly 0 (as it does for
        a row without images in a batch with some): only the gated feed-forward applies."""
        if media is not None:
            x = x + torch.tanh(self.attn_gate).to(x.dtype) * _attend_media(self.attn, self.norm(x), media, allowed)
        return x + torch.tanh(self.mlp_gate).to(x.dtype) * self.mlp(self.norm_mlp(x))


class CrossAttentionFusion(nn.Module):
    """The resampler and one gated block before every `cross_attention_every`-th decoder layer
    (before layers 0, n, 2n, ...). The decoder's own layers stay as they are."""

    def __init__(self, cfg: OmniConfig):
        super().__init__()
        self.every, self.attend = cfg.cross_attention_every, cfg.attend
        self.resampler = PerceiverResampler(cfg)
        self.order = nn.Embedding(MAX_IMAGES, cfg.text.dim)
        n_blocks = len(range(0, cfg.text.n_layers, self.every))
        self.blocks = nn.ModuleList(GatedCrossAttentionBlock(cfg) for _ in range(n_blocks))

    def encode(self, feats: torch.Tensor) -> torch.Tensor:
        """Vision tokens (N, P, Dv) -> latents (N, n_latents, D)."""
        return self.resampler(feats)

    def before_layer(self, media: Media | None, query_positions: torch.Tensor):
        """The hook `LlamaDecoder` calls before each layer: a gated block where one stands. The blocks
        run with or without images, so a row's result never depends on what else is in its batch."""
        latents = allowed = None
        if media is not None and not media.empty:
            latents = media.ordered(self.order)
            allowed = media_mask(media.positions, query_positions, self.attend)

        def hook(i: int, x: torch.Tensor) -> torch.Tensor:
            if i % self.every:
                return x
            return self.blocks[i // self.every](x, None if latents is None else latents.to(x.dtype), allowed)

        return hook


def build_fusion(cfg: OmniConfig) -> nn.Module | None:
    """The module a fusion mode keeps beside the decoder (None for joint and early)."""
    return {"late": LateFusion, "cross_attention": CrossAttentionFusion}.get(cfg.fusion, lambda _: None)(cfg)

