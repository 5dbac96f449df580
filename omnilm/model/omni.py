"""OmniModel: vision encoder -> projector -> LLaMA decoder, assembled (LLaVA-1.5, "joint" fusion),
and the other fusion modes of `config.fusion` on the same decoder (omnilm.model.fusion).

This is the one module that knows both towers: it decides where images go (for joint and early
fusion exactly at the image-token positions, any number of images per sequence and per batch;
for late and cross-attention fusion beside the sequence, readable from their markers on), where
videos go (LLaVA-NeXT-Video: each frame through the tower, pooled, at the video-token positions),
where audio goes (Voxtral: each window of log-mel frames through the Whisper encoder, projected, at
the audio-token positions) and computes the loss. Shape letters: B batch, T tokens, N images, L
tokens per image, D text width, V vocab, W audio windows, M mel bins, F mel frames a window.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from omnilm.config import IGNORE_INDEX, OmniConfig, is_int
from omnilm.errors import OmniInputError
from omnilm.model import hf
from omnilm.model.audio import VoxtralProjector, WhisperEncoder
from omnilm.model.connector import build_projector, build_video_projector
from omnilm.model.fusion import Media, build_fusion
from omnilm.model.layers import KVCache, RaggedKVCache, TokenConv, build_initialised
from omnilm.model.llm import LlamaDecoder
from omnilm.model.moe import Routing
from omnilm.model.vision import FeatureCache, VisionTransformer


NO_VIDEO = "this model takes no video (its config has no video_token_id): pass frames as images, or use a video model"
NO_AUDIO = "this model takes no audio (its config has no audio encoder): pass no input_features, or use an audio model"
# How a marker's error names the media it stands for, and what to do when their counts differ.
_MEDIA_HINTS = {"image": "expand each <image> marker to {L} tokens and pass one image per marker",
                "video frame": "expand each <video> marker to {L} tokens a frame and pass every frame of each video",
                "audio window": "expand each <audio> marker to {L} tokens a window and pass every window of each audio"}


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # (B, T, V); None from a `loss_only` call
    loss: torch.Tensor | None = None  # with labels: lm_loss, plus the router losses of an MoE model
    lm_loss: torch.Tensor | None = None  # the next-token cross-entropy alone
    # One per MoE layer, in order: with labels or output_routing (else empty, as for a dense model).
    routing: list[Routing] = field(default_factory=list)


class OmniModel(nn.Module):
    def __init__(self, config: OmniConfig):
        super().__init__()
        self.config = config
        # Early fusion has no vision encoder: its projector embeds raw patches.
        self.vision = VisionTransformer(config.vision) if config.vision is not None and config.fusion != "early" else None
        self.feature_cache: FeatureCache | None = None  # a frozen tower's features, remembered (not saved)
        self.projector = build_projector(config)
        self.video_projector = build_video_projector(config)  # None where frames share the image projector
        a = config.audio
        self.audio = WhisperEncoder(a) if a is not None else None
        self.audio_projector = (VoxtralProjector(a.dim, config.text.dim, a.frames_per_token, config.audio_projector_act)
                                if a is not None else None)
        self.fusion = build_fusion(config)  # late and cross_attention only
        self.llm = LlamaDecoder(config.text)
        self.lm_head = nn.Linear(config.text.dim, config.text.vocab_size, bias=False)
        if config.text.tie_embeddings:
            self.lm_head.weight = self.llm.embed_tokens.weight

    # --- construction --------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: OmniConfig, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None) -> OmniModel:
        """A randomly initialised model. On device "meta" nothing is allocated."""
        def finish(model: OmniModel) -> None:
            if config.text.tie_embeddings:  # to_empty re-creates parameters, which unties them
                model.lm_head.weight = model.llm.embed_tokens.weight
            if model.audio is not None:  # Whisper's positions are fixed sinusoids, not random weights
                model.audio.reset_positions()

        return build_initialised(cls, config, device, dtype, finish)

    @classmethod
    def from_preset(cls, name: str, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None, **overrides: Any) -> OmniModel:
        """Build a preset by name (see `omnilm.config.PRESETS`); `overrides` set config fields."""
        return cls.from_config(OmniConfig.from_preset(name, **overrides), device=device, dtype=dtype)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None) -> OmniModel:
        """Load an omnilm folder or a Hugging Face one (LLaVA, LLaMA or CLIP vision)."""
        return hf.load_pretrained(cls, path, device=device, dtype=dtype)

    def save_pretrained(self, path: str | Path, max_shard_size: int | str = "5GB") -> None:
        """Write a folder that omnilm loads, and transformers too when its classes describe the model
        (LLaVA, LLaMA, Mixtral: joint fusion; see hf_config.hf_incompatibility). Safetensors, atomic."""
        hf.save_pretrained(self, path, max_shard_size=max_shard_size)

    def add_token_conv(self, kernel: int) -> None:
        """Give the decoder a token convolution of `kernel` before each attention
        (`TextConfig.token_conv`), zero-initialised: the model computes what it did, and training
        goes on from there with the convolution. A decoder that has one already is refused."""
        t = self.config.text
        if t.token_conv:
            raise OmniInputError(f"the decoder has a token convolution already (text.token_conv {t.token_conv})")
        t.token_conv = replace(t, token_conv=kernel).token_conv  # the copy checks the kernel first
        p = self.llm.embed_tokens.weight
        for layer in self.llm.layers:
            layer.token_conv = TokenConv(t.dim, kernel).to(device=p.device, dtype=p.dtype)

    def add_tokens(self, n: int, fixed: bool = False, seed: int = 0, dims: int | None = None) -> None:
        """Grow the vocabulary by `n` ids whose embedding and output rows are random directions, drawn
        from `seed` at the mean length of the rows already there. With `fixed`, training never moves
        them (`TextConfig.fixed_tokens`, the last ids; train.stages.hold_fixed_tokens): words that get
        such ids are alike to the model, used in training or not, and only what a prompt says of one
        can tell it apart. Trained ids cannot follow fixed ones. With `dims`, the directions lie in
        one random subspace of that many dimensions (the same for embedding and output rows): an
        attention head copies such a token through a value path that spans more of where the tokens
        live (docs/icl.md)."""
        t = self.config.text
        old = self.llm.embed_tokens.weight
        if not is_int(n) or n < 1:
            raise OmniInputError(f"add_tokens({n!r}): give a number of tokens from 1")
        if dims is not None and not (is_int(dims) and 1 <= dims <= t.dim):
            raise OmniInputError(f"add_tokens(dims={dims!r}): give 1 to the model's width, {t.dim}")
        if t.fixed_tokens and not fixed:
            raise OmniInputError(f"the vocabulary ends in {t.fixed_tokens} fixed tokens (text.fixed_tokens): add the "
                                 "tokens that train before them")
        generator = torch.Generator().manual_seed(seed)
        if dims is None or dims == t.dim:
            directions = torch.randn(n, t.dim, generator=generator)
        else:
            basis, _ = torch.linalg.qr(torch.randn(t.dim, dims, generator=generator))  # (dim, dims), orthonormal
            directions = torch.randn(n, dims, generator=generator) @ basis.T
        directions = (directions / directions.norm(dim=1, keepdim=True)).to(device=old.device, dtype=old.dtype)

        def grown(weight: torch.Tensor) -> nn.Parameter:
            length = weight.detach().norm(dim=1).mean()
            return nn.Parameter(torch.cat([weight.detach(), directions * length]))

        embed = grown(old)
        head = embed if t.tie_embeddings else grown(self.lm_head.weight)
        checked = replace(t, vocab_size=t.vocab_size + n, fixed_tokens=t.fixed_tokens + n * fixed)  # in the limits
        t.vocab_size, t.fixed_tokens = checked.vocab_size, checked.fixed_tokens
        self.llm.embed_tokens = nn.Embedding(t.vocab_size, t.dim, _weight=embed)
        self.lm_head = nn.Linear(t.dim, t.vocab_size, bias=False, device=old.device, dtype=old.dtype)
        self.lm_head.weight = head

    def num_parameters(self, active_only: bool = False) -> int:
        """All parameters (shared, tied tensors once); with `active_only`, those one token uses:
        everything outside the routed experts, plus `n_experts_per_token` of them in each MoE layer."""
        total = sum(p.numel() for p in self.parameters())
        if not active_only:
            return total
        t = self.config.text
        for layer in self.llm.layers:
            if layer.is_moe:
                experts = layer.mlp.experts
                per_expert = (experts.gate_up_proj.numel() + experts.down_proj.numel()) // t.n_experts
                total -= per_expert * (t.n_experts - t.n_experts_per_token)
        return total

    def describe(self) -> str:
        """The architecture in a few lines, and the parameter count (`omnilm info`)."""
        c, t, v = self.config, self.config.text, self.config.vision
        lines = [f"text:   {t.n_layers} layers, dim {t.dim}, {t.n_heads} heads / {t.n_kv_heads} kv heads, "
                 f"mlp {t.mlp_dim}, vocab {t.vocab_size}, rope theta {t.rope_theta:g}"]
        if v is not None and c.fusion == "early":
            lines.append(f"vision: none (early fusion): {v.image_size}px images in {v.patch_size}px patches, linearly "
                         f"embedded with a row break per row, {c.image_seq_len} tokens per image")
        elif v is not None:
            lines.append(f"vision: CLIP ViT {v.n_layers} layers, dim {v.dim}, {v.image_size}px / {v.patch_size}px "
                         f"patches, feature layer {c.vision_feature_layer}, {c.image_seq_len} tokens per image")
        if c.video_token_id is not None:
            halo = f" and {c.video_motion_halo} patch(es) around" if c.video_motion_halo else ""
            moments = " (its moments)" if c.video_motion_moments else ""
            motion = (f", with the change of their patches{halo}{moments} since the frame before"
                      if c.video_motion else "")
            lines.append(f"video:  frames through the vision tower, {c.video_pool_stride}x{c.video_pool_stride} "
                         f"{c.video_pool_mode} pooled{motion}, {c.video_frame_len} tokens per frame")
        if c.audio is not None:
            a = c.audio
            lines.append(f"audio:  Whisper encoder {a.n_layers} layers, dim {a.dim}, {a.n_mels} mel bins, windows "
                         f"of {a.window_frames} frames ({a.window_frames / 100:g} s), {a.frames_per_token} frames a "
                         f"token, {c.audio_seq_len} tokens per window")
        if c.fusion == "late":
            lines.append("fusion: late: pooled images join the last hidden states through a gate (the marker is 1 token)")
        elif c.fusion == "cross_attention":
            lines.append(f"fusion: cross-attention: {c.n_latents} resampler latents per image ({c.resampler_layers} "
                         f"layers), gated blocks before every {c.cross_attention_every} decoder layers, attend={c.attend}")
        if not t.n_experts:
            return "\n".join([*lines, f"parameters: {self.num_parameters():,}"])
        where = "every layer" if t.moe_every == 1 else f"one layer in {t.moe_every}"
        lines.append(f"moe:    {t.n_experts} experts of width {t.expert_dim} in {where}, {t.router} routing, "
                     f"{t.n_experts_per_token} per token" + (f", {t.n_shared_experts} shared" if t.n_shared_experts else "")
                     + (f", capacity factor {t.capacity_factor:g}" if t.capacity_factor else ""))
        lines.append(f"parameters: {self.num_parameters():,} ({self.num_parameters(active_only=True):,} active per token)")
        return "\n".join(lines)

    # --- forward -------------------------------------------------------------------------------

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images as the decoder takes them, (N, 3, H, W) -> (N, L, D): the projected vision tokens
        (joint), the embedded patches and row breaks (early), one pooled vector (late) or the
        resampler's latents (cross_attention)."""
        if self.config.fusion == "early":
            return self.projector(self._check_pixels(pixel_values))
        feats = self.image_features(pixel_values)
        return self.fusion.encode(feats) if self.fusion is not None else self.projector(feats)

    def _check_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        v = self.config.vision
        if v is None:
            raise OmniInputError("this model has no vision encoder (text-only); pass no images")
        if tuple(pixel_values.shape[-3:]) != (v.n_channels, v.image_size, v.image_size):
            raise OmniInputError(
                f"pixel_values are {tuple(pixel_values.shape)} but the model takes (N, {v.n_channels}, "
                f"{v.image_size}, {v.image_size}): preprocess the images with this model's processor"
            )
        return pixel_values

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """What the projector reads: the chosen CLIP layer's tokens, (N, 3, H, W) -> (N, L, Dv)."""
        if self.vision is None and self.config.vision is not None:
            raise OmniInputError("an early-fusion model has no vision encoder: its projector reads raw patches")
        self._check_pixels(pixel_values)
        layer = self.config.vision_feature_layer
        feats = (self.feature_cache(self.vision, pixel_values, layer) if self.feature_cache is not None
                 else self.vision(pixel_values, layer=layer))  # (N, 1+P, Dv)
        if self.config.vision_feature_select == "default":
            feats = feats[:, 1:]  # drop the class token
        return feats

    def encode_videos(self, pixel_values_videos: torch.Tensor) -> torch.Tensor:
        """Videos as the decoder takes them, (V, F, 3, H, W) -> (V, F * (g / s)^2, D): each frame's
        grid of g x g vision features pooled over s x s patches (s = `video_pool_stride`), then
        projected, the frames in order (LLaVA-NeXT-Video)."""
        if not isinstance(pixel_values_videos, torch.Tensor):
            raise OmniInputError("encode_videos takes one (videos, frames, 3, height, width) tensor; videos of "
                                 "different lengths go to forward as a list")
        feats = self._encode_video_frames(pixel_values_videos)  # checks the model and the shape
        return feats.unflatten(0, tuple(pixel_values_videos.shape[:2])).flatten(1, 2)

    def video_features(self, pixel_values_videos: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """What the projector reads of videos ((V, F, 3, H, W), or a list of (F_i, 3, H, W)): every
        frame's g x g grid of tower features pooled over s x s patches as `video_pool_mode` says
        (for "concat" the patches side by side, row-major), with `video_motion` joined by the change
        of each token's s x s patches (and `video_motion_halo` patches more on each side) since the
        video's frame before, zero for a video's first frame and beyond the frame's edge: side by
        side, row-major, as "concat" lays them, or with `video_motion_moments` summed as it is, by
        column and by row (each patch's change weighted by its column or row, centred on the
        window's middle); (sum F_i, (g / s)^2, video_feature_dim)."""
        frames, lengths = _video_frames(pixel_values_videos, self.config)
        patches = self.image_features(frames)
        looks = self._pool(patches, self.config.video_pool_mode)
        if not self.config.video_motion:
            return looks
        grid = self._grid(patches)
        change = []
        for video in grid.split(lengths):  # a video's first frame has no frame before it
            change += [torch.zeros_like(video[:1]), video[1:] - video[:-1]]
        s, halo = self.config.video_pool_stride, self.config.video_motion_halo
        window = s + 2 * halo  # each token's patches and its halo, (N, Dv * window^2, (g/s)^2)
        windows = F.unfold(F.pad(torch.cat(change), (halo,) * 4), window, stride=s)
        windows = windows.unflatten(1, (grid.shape[1], window * window))  # (N, Dv, window^2, (g/s)^2)
        if self.config.video_motion_moments:
            at = torch.arange(window, dtype=windows.dtype, device=windows.device) - (window - 1) / 2
            weights = torch.stack([torch.ones(window, window).to(at), at.expand(window, window),  # row-major:
                                   at[:, None].expand(window, window)])  # sum, by column, by row
            motion = torch.einsum("ndpl,kp->nlkd", windows, weights.flatten(1)).flatten(2)
        else:
            motion = windows.permute(0, 3, 2, 1).flatten(2)
        return torch.cat([looks, motion], dim=-1)

    def _grid(self, patches: torch.Tensor) -> torch.Tensor:
        """(N, g*g, Dv) patch features -> (N, Dv, g, g)."""
        side = self.config.vision.image_size // self.config.vision.patch_size
        return patches.transpose(1, 2).unflatten(2, (side, side))

    def _pool(self, patches: torch.Tensor, mode: str) -> torch.Tensor:
        """(N, g*g, Dv) patch features -> (N, (g/s)^2, Dv), or (N, (g/s)^2, s*s*Dv) for "concat"."""
        side, s = self.config.vision.image_size // self.config.vision.patch_size, self.config.video_pool_stride
        grid = self._grid(patches)
        if mode == "concat":  # (N, Dv, g/s, s, g/s, s) -> (N, g/s, g/s, s, s, Dv)
            blocks = grid.unflatten(2, (side // s, s)).unflatten(4, (side // s, s)).permute(0, 2, 4, 3, 5, 1)
            return blocks.flatten(3).flatten(1, 2)
        pool = F.avg_pool2d if mode == "average" else F.max_pool2d
        return pool(grid, s).flatten(2).transpose(1, 2)

    def encode_audio(self, input_features: torch.Tensor) -> torch.Tensor:
        """Audio windows as the decoder takes them, (W, M, F) log-mel windows -> (W, F / 2 / K, D):
        each window through the Whisper encoder, K consecutive frames joined and projected (Voxtral)."""
        if self.audio is None:
            raise OmniInputError(NO_AUDIO)
        if not isinstance(input_features, torch.Tensor):
            raise OmniInputError(f"input_features are a {type(input_features).__name__}: give one (windows, mel bins, "
                                 "frames) tensor, every audio's windows in marker order")
        return self.audio_projector(self.audio(input_features))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              pixel_values_videos: torch.Tensor | list[torch.Tensor] | None = None,
              input_features: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (B, T, D) with image features written at the image-token positions (joint,
        early), video features at the video-token positions and audio at the audio-token positions;
        late and cross-attention fusion keep each image marker as a text token."""
        markers = self._markers(pixel_values, pixel_values_videos, input_features)
        where = [input_ids == token for token, *_ in markers]
        for (token, *_), is_marker in zip(markers, where):
            # A marker id may lie outside a text vocabulary (any row will do: features overwrite it);
            # inside it, keep its own row, as HF does when generation feeds the id back without media.
            if token >= self.config.text.vocab_size:
                input_ids = input_ids.masked_fill(is_marker, 0)
        x = self.llm.embed_tokens(input_ids)
        if self.fusion is not None:  # late, cross_attention: the marker stays text
            return x
        for (_, pixels, encode, what, _), is_marker in zip(markers, where):
            if pixels is not None:
                x = _scatter(x, is_marker, encode(pixels), what)
        return x

    def _encode_video_frames(self, pixel_values_videos) -> torch.Tensor:
        """Every frame of `pixel_values_videos` as the decoder takes it, (sum F_i, (g / s)^2, D)."""
        projector = self.video_projector if self.video_projector is not None else self.projector
        return projector(self.video_features(pixel_values_videos))

    def _markers(self, pixel_values: torch.Tensor | None,
                 pixel_values_videos: torch.Tensor | list[torch.Tensor] | None,
                 input_features: torch.Tensor | None = None) -> list[tuple]:
        """(marker id, its media or None, their encoder, their name, the forward argument) for images
        (in a model with a vision tower, or given), videos in a video model and audio in an audio
        model; videos or audio given to any other model are refused."""
        c = self.config
        markers = []
        if c.vision is not None or pixel_values is not None:
            markers.append((c.image_token_id, pixel_values, self.encode_images, "image", "pixel_values"))
        if c.video_token_id is not None:
            markers.append((c.video_token_id, pixel_values_videos, self._encode_video_frames, "video frame",
                            "pixel_values_videos"))
        elif pixel_values_videos is not None:
            raise OmniInputError(NO_VIDEO)
        if c.audio_token_id is not None:
            markers.append((c.audio_token_id, input_features, self.encode_audio, "audio window", "input_features"))
        elif input_features is not None:
            raise OmniInputError(NO_AUDIO)
        return markers

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None, *,
                pixel_values_videos: torch.Tensor | list[torch.Tensor] | None = None,
                input_features: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | RaggedKVCache | None = None,
                logits_to_keep: int = 0, logits_at: torch.Tensor | None = None,
                output_routing: bool = False, loss_only: bool = False) -> ModelOutput:
        """Logits (B, T, V) for `input_ids` (B, T), and the next-token loss when `labels` are given.

        `pixel_values` (N, 3, H, W) lists the images in the order of their markers across the batch;
        `pixel_values_videos` (V, F, 3, H, W) the videos in the order of theirs (each marker expanded to
        F * `config.video_frame_len` tokens), or a list of (F_i, 3, H, W) for videos of different
        lengths; `input_features` (W, M, F) the audio windows (log-mel, `omnilm.data.audio.log_mel`) in
        the order of theirs (each window `config.audio_seq_len` tokens). With a `cache`, `input_ids` are
        the new tokens and `attention_mask` covers the cached ones too. `logits_to_keep=n` computes
        logits for the last n positions only (prefill needs one row, not a (B, T, V) tensor);
        `logits_at` (B,) computes one position per row, (B, 1, V): the last real token of each prompt
        in a right-padded batch. An MoE model reports each layer's routing in `.routing` when there
        are labels (its losses join the loss) or `output_routing` is set. `loss_only` (with labels)
        computes the output head at the positions that have a target alone and returns no logits:
        the same loss, for a fraction of the head's work where answers are a few tokens of many.
        """
        markers = self._markers(pixel_values, pixel_values_videos, input_features)
        if cache is None or cache.seen == 0:  # markers without their media
            for token, media, _, what, argument in markers:
                n_markers = int((input_ids == token).sum()) if media is None else 0
                if n_markers:
                    what = what.split()[0]  # "video frame": the marker is a video's
                    raise OmniInputError(f"input_ids hold {n_markers} {what} tokens but no {argument} were given: "
                                         f"pass the {what if what == 'audio' else what + 's'}")
        x = self.embed(input_ids, pixel_values, pixel_values_videos, input_features)
        routing: list[Routing] | None = [] if labels is not None or output_routing else None
        start = cache.seen if cache is not None else 0
        T = input_ids.shape[1]
        # (T,), or (B, T) for a RaggedKVCache, whose rows stand at positions of their own.
        query_positions = cache.positions(T) if cache is not None else torch.arange(T, device=input_ids.device)
        media = self._media(input_ids, pixel_values, cache, start)
        before_layer = None
        if self.config.fusion == "cross_attention":
            before_layer = self.fusion.before_layer(media, query_positions)
        h = self.llm(x, attention_mask=attention_mask, position_ids=position_ids, cache=cache, routing=routing,
                     before_layer=before_layer)
        if self.config.fusion == "late":
            h = self.fusion(h, media, query_positions)
        if loss_only and labels is None:
            raise ValueError("loss_only computes the loss: pass labels")
        if (logits_to_keep or logits_at is not None) and labels is not None:
            raise ValueError("labels need every position's logits: leave logits_to_keep at 0")
        if logits_at is not None:
            h = h[torch.arange(h.shape[0], device=h.device), logits_at][:, None]
        elif logits_to_keep:
            h = h[:, -logits_to_keep:]
        if loss_only:
            # Token t predicts token t+1; -100 marks tokens without a target.
            targets = labels[:, 1:]
            kept = targets != IGNORE_INDEX
            logits = None
            lm_loss = F.cross_entropy(self.lm_head(h[:, :-1][kept]).float(), targets[kept])
        else:
            logits = self.lm_head(h)
            if labels is None:
                return ModelOutput(logits=logits, routing=routing or [])
            lm_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                      ignore_index=IGNORE_INDEX)
        loss = lm_loss
        if routing:  # each router loss is averaged over the MoE layers, then weighted
            t = self.config.text
            loss = loss + t.router_aux_loss_coef * torch.stack([r.aux_loss for r in routing]).mean()
            loss = loss + t.router_z_loss_coef * torch.stack([r.z_loss for r in routing]).mean()
        return ModelOutput(logits=logits, loss=loss, lm_loss=lm_loss, routing=routing)

    def _media(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, cache: KVCache | None,
               start: int) -> Media | None:
        """The images late and cross-attention fusion read beside the sequence: this call's, after
        those already in the cache (which keeps them for the decoding steps)."""
        if self.fusion is None:
            return None
        media = None
        if pixel_values is not None:
            media = Media.locate(input_ids, self.config.image_token_id, self.encode_images(pixel_values), start)
        if cache is None:
            return media
        if media is not None:
            cache.media = media if cache.media is None else cache.media.extend(media)
        return cache.media

    # --- inference -----------------------------------------------------------------------------

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        t = self.config.text
        p = self.llm.norm.weight  # float in every model (the linear layers' weights may be int8)
        return KVCache(t.n_layers, batch, t.n_kv_heads, t.head_dim, max_len, dtype=p.dtype, device=p.device,
                       conv_dim=t.dim if t.token_conv else 0)


def _video_frames(videos, config) -> tuple[torch.Tensor, list[int]]:
    """All frames of `videos`, (V, F, 3, H, W) or a list of (F_i, 3, H, W), as one (sum F_i, 3, H, W),
    and each video's frame count."""
    if config.video_token_id is None:
        raise OmniInputError(NO_VIDEO)
    if isinstance(videos, (list, tuple)) and videos and all(isinstance(v, torch.Tensor) and v.ndim == 4
                                                             for v in videos):
        return torch.cat(list(videos)), [len(v) for v in videos]
    if isinstance(videos, torch.Tensor) and videos.ndim == 5:
        return videos.flatten(0, 1), [videos.shape[1]] * videos.shape[0]
    shape = tuple(videos.shape) if isinstance(videos, torch.Tensor) else f"a {type(videos).__name__}"
    raise OmniInputError(f"pixel_values_videos are {shape}: give (videos, frames, 3, height, width), or a list of "
                         "(frames, 3, height, width) for videos of different lengths")


def _scatter(x: torch.Tensor, is_marker: torch.Tensor, feats: torch.Tensor, what: str) -> torch.Tensor:
    """Write `feats` (N, L, D), N images (video frames, audio windows) of L tokens, into the positions
    `is_marker` (B, T) of x (B, T, D), in row-major order: item i fills the i-th run of L marker tokens."""
    n_tokens, (N, L) = int(is_marker.sum()), feats.shape[:2]
    if n_tokens != N * L:
        raise OmniInputError(
            f"input_ids hold {n_tokens} {what.split()[0]} tokens, room for {n_tokens / L:g} {what}(s) of {L} tokens, "
            f"but {N} {what}(s) were given: " + _MEDIA_HINTS[what].format(L=L)
        )
    return x.masked_scatter(is_marker[..., None], feats.to(x.dtype))
