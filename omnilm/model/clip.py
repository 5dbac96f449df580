"""CLIP (Radford et al. 2021): a ViT and a text transformer trained so matching images and captions
land close together in one vector space. Weight-compatible with HF `CLIPModel`.

No pretrained CLIP can be downloaded here, so stage `clip` trains one on ShapeWorld captions; its
vision tower then starts the LLaVA model (`omnilm.model.hf.load_vision_encoder` reads the folder
`save_clip` writes).

Shape letters: N images or texts, T tokens, D tower width, E joint embedding dim.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from omnilm.config import OmniConfig, VisionConfig, _check_fields
from omnilm.errors import OmniInputError
from omnilm.io import write_json
from omnilm.model import hf
from omnilm.model.hf_config import vision_config_to_hf
from omnilm.model.layers import ACTIVATIONS, build_initialised, decoder_mask
from omnilm.model.vision import EncoderLayer, VisionTransformer

# transformers treats eos_token_id == 2 as a config from before its PR #24773 and then pools at the
# highest id of each row (OpenAI's <|endoftext|> was the last id of its vocabulary); we follow it.
LEGACY_EOS_ID = 2


# --- config -----------------------------------------------------------------------------------


@dataclass
class ClipTextConfig:
    """CLIP's causal text transformer, as HF `CLIPTextConfig` (defaults: OpenAI CLIP's)."""

    vocab_size: int = 49408
    dim: int = 512
    n_layers: int = 12
    n_heads: int = 8
    mlp_dim: int = 2048
    max_len: int = 77
    norm_eps: float = 1e-5
    act: str = "quick_gelu"
    bos_token_id: int | None = 49406
    eos_token_id: int = 49407  # the text is pooled at its first end-of-text token
    pad_token_id: int | None = 1

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


@dataclass
class ClipConfig:
    """Both towers and the joint space they are projected into."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: ClipTextConfig = field(default_factory=ClipTextConfig)
    embed_dim: int = 512
    logit_scale_init: float = math.log(1 / 0.07)  # CLIP's initial temperature, 0.07
    # The ViT's learned positions start N(0, position_init_std). At the N(0, 0.02) of every other
    # weight they are some 50 times smaller than a patch's embedding: a tower trained from scratch
    # on ShapeWorld never learned where anything is (zero-shot position at chance, an object's cell
    # read from its token 14-18% of the time). As large as the patch embedding, the cell is read
    # from the token at every layer (100%), and CLIP's zero-shot position reaches 0.93-1.00 in some
    # runs at 600 steps and in all three tried at 1,200 (docs/shapeworld-recipe.md, sixth round).
    position_init_std: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**self.vision)
        if isinstance(self.text, dict):
            self.text = ClipTextConfig(**self.text)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClipConfig:
        d = dict(d)
        _check_fields(cls, d, "clip config")
        if isinstance(d.get("vision"), dict):
            d["vision"] = VisionConfig.from_dict(d["vision"])
        if isinstance(d.get("text"), dict):
            _check_fields(ClipTextConfig, d["text"], "clip text config")
            d["text"] = ClipTextConfig(**d["text"])
        return cls(**d)

    @classmethod
    def tiny(cls, tokenizer=None, embed_dim: int = 128, **text: Any) -> ClipConfig:
        """The `tiny` preset's vision tower and a 2-layer, 128-wide text tower. With `tokenizer`
        the text vocabulary and special ids follow it (see `end_of_text_id`); `text` overrides fields."""
        fields = dict(vocab_size=513, dim=128, n_layers=2, n_heads=4, mlp_dim=512, max_len=77,
                      bos_token_id=1, eos_token_id=512, pad_token_id=0)
        if tokenizer is not None:
            fields.update(text_ids_for(tokenizer))
        fields.update(text)
        return cls(vision=OmniConfig.from_preset("tiny").vision, text=ClipTextConfig(**fields), embed_dim=embed_dim)


# --- text encoding ----------------------------------------------------------------------------


def end_of_text_id(tokenizer) -> int:
    """The id that ends every caption and marks where the text is pooled: one past `tokenizer`'s
    vocabulary, so it is the highest id of any row. Not the tokenizer's </s>: omnilm's is id 2,
    which transformers takes for a legacy config and pools at the highest id instead (see
    LEGACY_EOS_ID); the highest id satisfies both rules, as OpenAI's <|endoftext|> did."""
    return tokenizer.vocab_size


def text_ids_for(tokenizer) -> dict[str, Any]:
    """ClipTextConfig fields a text tower needs to read `tokenize_captions(tokenizer, ...)`."""
    eot = end_of_text_id(tokenizer)
    return dict(vocab_size=eot + 1, eos_token_id=eot, bos_token_id=tokenizer.bos_id,
                pad_token_id=tokenizer.pad_id if tokenizer.pad_id is not None else 0)


def tokenize_captions(tokenizer, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions -> (input_ids, attention_mask), both (N, T) long, right-padded to the longest row.

    Each row is BOS, the caption's tokens, then `end_of_text_id(tokenizer)`. Training and
    evaluation both tokenize through here, so they agree on the format.
    """
    eot = end_of_text_id(tokenizer)
    rows = [[*tokenizer.encode(text, add_bos=True), eot] for text in texts]
    for text, row in zip(texts, rows):
        if len(row) > max_len:
            raise OmniInputError(
                f"caption {text[:60]!r} is {len(row)} tokens with BOS and end-of-text, over the text tower's "
                f"max_len={max_len}: shorten it or build the text tower with a larger max_len"
            )
    T = max(map(len, rows), default=0)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    input_ids = torch.full((len(rows), T), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, :len(row)] = torch.tensor(row)
        attention_mask[i, :len(row)] = 1
    return input_ids, attention_mask


def check_tokenizer(cfg: ClipTextConfig, tokenizer, where: str | Path) -> None:
    """Captions tokenized with `tokenizer` must end in the id the text tower pools at."""
    eot = end_of_text_id(tokenizer)
    if eot != cfg.eos_token_id:
        raise OmniInputError(
            f"{where}: captions tokenized with this tokenizer end in id {eot}, but the text tower pools at "
            f"eos_token_id={cfg.eos_token_id}; build the text config with text_ids_for(tokenizer)"
        )


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
        self.tokenizer = None  # set by load_clip when the folder holds one; saved by save_clip

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
        """`load_clip(path, device, dtype)`."""
        return load_clip(path, device=device, dtype=dtype)

    def save_pretrained(self, path: str | Path, max_shard_size: int | str = "5GB") -> None:
        """`save_clip(self, path)`: a transformers CLIPModel folder, with `self.tokenizer` if set."""
        save_clip(self, path, max_shard_size=max_shard_size)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Unit-length image embeddings (N, E) of images (N, 3, H, W)."""
        return F.normalize(self.visual_projection(self.vision.pooled(pixel_values)), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Unit-length text embeddings (N, E) of `tokenize_captions` output."""
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


# --- Hugging Face CLIPModel folders -----------------------------------------------------------

# transformers' CLIPTextConfig defaults, for fields a config.json leaves out.
CLIP_TEXT_DEFAULTS: dict[str, Any] = dict(
    vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
)


def config_to_hf(cfg: ClipConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """ClipConfig -> a transformers CLIPModel config.json dict."""
    t = cfg.text
    text = {
        "model_type": "clip_text_model",
        "vocab_size": t.vocab_size,
        "hidden_size": t.dim,
        "intermediate_size": t.mlp_dim,
        "num_hidden_layers": t.n_layers,
        "num_attention_heads": t.n_heads,
        "max_position_embeddings": t.max_len,
        "hidden_act": t.act,
        "layer_norm_eps": t.norm_eps,
        "attention_dropout": 0.0,
        "bos_token_id": t.bos_token_id,
        "eos_token_id": t.eos_token_id,
        "pad_token_id": t.pad_token_id,
        "projection_dim": cfg.embed_dim,
    }
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "text_config": text,
        "vision_config": {**vision_config_to_hf(cfg.vision), "projection_dim": cfg.embed_dim},
        "projection_dim": cfg.embed_dim,
        "logit_scale_init_value": cfg.logit_scale_init,
        "dtype": str(dtype).removeprefix("torch."),
    }


def text_config_from_hf(d: dict[str, Any]) -> ClipTextConfig:
    """A transformers CLIPTextConfig dict -> ClipTextConfig."""
    def get(key: str) -> Any:  # transformers writes null for "the default"; ids keep their null
        if key.endswith("_token_id"):
            return d.get(key, CLIP_TEXT_DEFAULTS[key])
        return d[key] if d.get(key) is not None else CLIP_TEXT_DEFAULTS[key]

    eos = get("eos_token_id")
    if not isinstance(eos, int):
        raise OmniInputError(f"text eos_token_id={eos!r}: CLIP pools the text at one end-of-text id; set an int")
    if get("hidden_act") not in ACTIVATIONS:
        raise OmniInputError(f"text hidden_act {get('hidden_act')!r} is not supported; "
                             f"use one of {', '.join(sorted(ACTIVATIONS))}")
    return ClipTextConfig(
        vocab_size=get("vocab_size"), dim=get("hidden_size"), n_layers=get("num_hidden_layers"),
        n_heads=get("num_attention_heads"), mlp_dim=get("intermediate_size"), max_len=get("max_position_embeddings"),
        norm_eps=get("layer_norm_eps"), act=get("hidden_act"), bos_token_id=get("bos_token_id"),
        eos_token_id=eos, pad_token_id=get("pad_token_id"),
    )


def save_clip(model: ClipModel, path: str | Path, tokenizer=None, max_shard_size: int | str = "5GB") -> None:
    """Write `model` as a transformers CLIPModel folder: config.json, model.safetensors (HF key
    names, each file written atomically; shards past `max_shard_size`), preprocessor_config.json,
    and the tokenizer files when there is a tokenizer (`tokenizer`, else `model.tokenizer`)."""
    from omnilm.data.image import ImageProcessor

    cfg: ClipConfig = model.config
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    if tokenizer is not None:
        check_tokenizer(cfg.text, tokenizer, "save_clip")  # before anything is written
    tensors = {}
    for name, t in model.state_dict().items():
        if t.is_meta:
            raise OmniInputError(f"cannot save {name}: it is on the meta device (no values); load or initialise it first")
        tensors[hf.key_to_hf(name, "clip_model")] = t.detach()
    hf.parse_size(max_shard_size)  # a bad size fails before anything is written
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    hf.write_weights(tensors, folder, max_shard_size)
    dtype = model.logit_scale.dtype
    write_json(folder / "config.json", config_to_hf(cfg, dtype))
    preprocessor = ImageProcessor.from_vision_config(cfg.vision).to_hf_dict()
    write_json(folder / "preprocessor_config.json", preprocessor)
    # An omnilm.json left by an earlier save of a LLaVA here would be read instead of config.json.
    (folder / "omnilm.json").unlink(missing_ok=True)
    if tokenizer is not None:
        tokenizer.save(folder)


def load_clip(path: str | Path, device: str | torch.device | None = None,
              dtype: torch.dtype | str | None = None) -> ClipModel:
    """A ClipModel from a transformers CLIPModel folder (ours or one transformers wrote).
    `dtype` as in `omnilm.model.hf.load_pretrained`; the folder's tokenizer.json, if any, becomes
    `model.tokenizer` (save_clip and evaluate_clip check that it fits the text tower)."""
    vision, kind, source = hf.read_config(path)  # also checks the folder; image mean/std included
    folder = Path(path)
    d = json.loads((folder / "config.json").read_text()) if kind == "clip" else {}  # read_config parsed it
    if d.get("model_type") != "clip":
        raise OmniInputError(f"{folder} is not a CLIPModel folder (config.json model_type 'clip', with both towers); "
                             "for a vision tower alone use omnilm.model.hf.load_vision_encoder")
    cfg = ClipConfig(vision=vision, text=text_config_from_hf(d.get("text_config") or {}),
                     embed_dim=d.get("projection_dim", 512),
                     logit_scale_init=d.get("logit_scale_init_value", math.log(1 / 0.07)))
    with torch.device("meta"):
        model = ClipModel(cfg)
    state, origin = hf.read_weights(folder, "clip_model", dtype, torch.device(device or "cpu"))
    hf.assign_weights(model, state, origin, folder, source)
    if (folder / "tokenizer.json").is_file():
        from omnilm.data.tokenizer import Tokenizer

        model.tokenizer = Tokenizer.from_file(folder)
    return model.eval()
