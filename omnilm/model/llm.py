"""LLaMA decoder (Touvron et al. 2023), the language model of LLaVA-1.5 (Vicuna), and its sparse
variant: with `n_experts > 0` chosen layers swap the dense MLP for a mixture of experts (Mixtral).

Weight-compatible with HF `LlamaModel` and `MixtralModel`. It takes input embeddings, so the
assembled model can splice image features in before the first block. Shape letters: B batch,
T tokens, D width.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from omnilm.config import TextConfig
from omnilm.model.layers import (Attention, KVCache, RaggedKVCache, RMSNorm, StaticKVCache, SwiGLU, TokenConv,
                                 decoder_mask, rope_cos_sin)
from omnilm.model.moe import MoE, Routing


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.token_conv = TokenConv(cfg.dim, cfg.token_conv) if cfg.token_conv else None
        self.self_attn = Attention(cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, bias=cfg.attention_bias)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.is_moe = cfg.is_moe_layer(index)
        self.mlp = MoE(cfg) if self.is_moe else SwiGLU(cfg.dim, cfg.mlp_dim, bias=cfg.mlp_bias)

    def forward(self, x, rope, mask, cache: KVCache | None, layer: int, tokens: torch.Tensor | None = None,
                stats: bool = False) -> tuple[torch.Tensor, Routing | None]:
        """The next hidden states, and with `stats` an MoE layer's Routing (returned, not appended to a
        list argument: a wrapper such as FSDP may pass the layer copies of its arguments)."""
        h = self.input_layernorm(x)
        if self.token_conv is not None:
            h = self.token_conv(h, tokens, cache, layer)
        x = x + self.self_attn(h, rope, mask, is_causal=True, cache=cache, layer=layer)
        if not self.is_moe:
            return x + self.mlp(self.post_attention_layernorm(x)), None
        out, routing = self.mlp(self.post_attention_layernorm(x), tokens, stats=stats)
        return x + out, routing


class LlamaDecoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                cache: KVCache | RaggedKVCache | StaticKVCache | None = None, routing: list[Routing] | None = None,
                before_layer: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Final hidden states (B, T, D) for input embeddings x (B, T, D).

        `attention_mask` (B, S) covers the cached positions and the new ones (1 = real token); a
        `RaggedKVCache` (a serving batch) or a `StaticKVCache` (a compiled decoding step) brings its
        own positions and mask instead.
        Without `position_ids`, positions count real tokens only, so a left-padded prompt gets
        the same positions as the unpadded one. Each MoE layer appends its `Routing` to `routing`
        when a list is given (padding tokens go to no expert and count in no statistic).
        `before_layer(i, x)`, when given, transforms the hidden states before layer i: where
        cross-attention fusion inserts its gated blocks, leaving the decoder's own weights as they are.
        """
        B, T, _ = x.shape
        if isinstance(cache, (RaggedKVCache, StaticKVCache)):  # the cache knows positions and mask
            position_ids, mask, tokens = cache.positions(T), cache.mask(T), None
        else:
            start = cache.seen if cache is not None else 0
            if position_ids is None:
                if attention_mask is not None:
                    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:start + T]
                else:
                    position_ids = torch.arange(start, start + T, device=x.device).expand(B, T)
            mask = decoder_mask(attention_mask, T, start, x.device)
            tokens = attention_mask[:, start:start + T] if attention_mask is not None else None
        rope = rope_cos_sin(self.config, position_ids)
        for i, layer in enumerate(self.layers):
            if before_layer is not None:
                x = before_layer(i, x)
            x, stats = layer(x, rope, mask, cache, i, tokens, routing is not None)
            if stats is not None:
                routing.append(stats)
        if cache is not None:
            cache.advance(T)
        return self.norm(x)
