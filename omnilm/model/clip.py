"""CLIP (Radford et al. 2021): a ViT and a text transformer trained so matching images and captions
land close together in one vector space. Weight-compatible with HF `CLIPModel`.

No pretrained CLIP can be downloaded here, so stage `clip` trains one on ShapeWorld captions; its
vision tower then starts the LLaVA model (`omnilm.model.hf.load_vision_encoder` reads the folder
`ClipModel.save_pretrained` writes). Captions become token ids in `omnilm.data.captions`.

Shape letters: N images or texts, T tokens, D tower width, E joint embedding dim.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from omnilm.config import ClipConfig, ClipTextConfig
from omnilm.errors import OmniInputError
from omnilm.model import hf
from omnilm.model.layers import build_initialised, decoder_mask
from omnilm.model.vision import EncoderLayer, VisionTransformer

# transformers treats eos_token_id == 2 as a config from before its PR #24773 and then pools at the
# highest id of each row (OpenAI's <|endoftext|> was the last id of its vocabulary); we follow it.
LEGACY_EOS_ID = 2


# --- model ------------------------------------------------------------------------------------


class TextEmbedding(nn.Module):
    def __init__(self, cfg: ClipTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.position_embedding = nn.Embedding(cfg.max_len, cfg.dim)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        # Absolute positions 0..T-1 whatever the padding, as transformers: pad on the right.
        return self.token_embedding(input_ids) + self.position_embedding.weight[:T]  # (N, T, D)


class TextTransformer(nn.Module):
    """CLIP's text tower: pre-LN causal transformer; the text is its final state at end-of-text."""

    def __init__(self, cfg: ClipTextConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = TextEmbedding(cfg)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_layers))
        self.final_layer_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states (N, T, D); `attention_mask` (N, T) marks real tokens with 1."""
        T = input_ids.shape[1]
        if T > self.config.max_len:
            raise OmniInputError(f"text of {T} tokens is longer than the text tower's max_len={self.config.max_len}")
        x = self.embeddings(input_ids)
        mask = decoder_mask(attention_mask, T, 0, x.device)  # None: plain causal attention, SDPA's fused path
        for block in self.layers:
            x = block(x, mask=mask, is_causal=mask is None)
        return self.final_layer_norm(x)

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The final state (N, D) at each row's end-of-text token: CLIP's text representation."""
        x = self.forward(input_ids, attention_mask)
        eos = self.config.eos_token_id
        if eos == LEGACY_EOS_ID:
            index = input_ids.int().argmax(-1)  # the highest id, as transformers does for this config
        else:
            index = (input_ids == eos).int().argmax(-1)  # the first end-of-text token
        return x[torch.arange(x.shape[0], device=x.device), index]


class ClipModel(nn.Module):
    def __init__(self, config: ClipConfig):
        super().__init__()
        self.config = config
        self.vision = VisionTransformer(config.vision)
        self.text = TextTransformer(config.text)
        self.visual_projection = nn.Linear(config.vision.dim, config.embed_dim, bias=False)
        self.text_projection = nn.Linear(config.text.dim, config.embed_dim, bias=False)
        # log of the inverse temperature, learned (CLIP section 2.5)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))

    @classmethod
    def from_config(cls, config: ClipConfig, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None) -> ClipModel:
        """A randomly initialised model. On device "meta" nothing is allocated."""
        def finish(model: ClipModel) -> None:
            with torch.no_grad():
                model.logit_scale.fill_(config.logit_scale_init)  # a temperature, not a weight
                model.vision.embeddings.position_embedding.weight.normal_(0.0, config.position_init_std)

        return build_initialised(cls, config, device, dtype, finish)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | str | None = None) -> ClipModel:
        """A ClipModel from a transformers CLIPModel folder (ours or one transformers wrote); `dtype`
        as in `OmniModel.from_pretrained`."""
        return hf.load_clip(cls, path, device=device, dtype=dtype)

    def save_pretrained(self, path: str | Path, max_shard_size: int | str = "5GB") -> None:
        """Write a transformers CLIPModel folder: config.json and safetensors (atomic; shards past
        `max_shard_size`). The tokenizer is the processor's to save (`omnilm.data`)."""
        hf.save_clip(self, path, max_shard_size=max_shard_size)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Unit-length image embeddings (N, E) of images (N, 3, H, W)."""
        return F.normalize(self.visual_projection(self.vision.pooled(pixel_values)), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Unit-length text embeddings (N, E) of `omnilm.data.captions.tokenize_captions` output."""
        return F.normalize(self.text_projection(self.text.pooled(input_ids, attention_mask)), dim=-1)

    def similarity(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Scaled cosine similarities (N_images, N_texts): logits_per_image."""
        # CLIP clips the scale at 100 so training cannot make the softmax arbitrarily sharp.
        scale = self.logit_scale.clamp(max=math.log(100)).exp()
        return scale * image_embeds @ text_embeds.t()

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, logits_per_image (N, N)) for N matching image-caption pairs: the symmetric
        InfoNCE loss, the mean of image->text and text->image cross-entropy, pair i being class i."""
        logits = self.similarity(self.encode_image(pixel_values), self.encode_text(input_ids, attention_mask))
        if logits.shape[0] != logits.shape[1]:
            raise OmniInputError(f"{logits.shape[0]} images but {logits.shape[1]} captions: pass one caption per image")
        target = torch.arange(logits.shape[0], device=logits.device)
        loss = (F.cross_entropy(logits.float(), target) + F.cross_entropy(logits.t().float(), target)) / 2
        return loss, logits
