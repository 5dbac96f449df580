"""What each training stage builds: the model, which parameters train, the data and the loss.

The three stages of the recipe (see `omnilm.train.loop`):

    clip      ClipModel (vision + text tower), every parameter, image-caption pairs, InfoNCE
    align     OmniModel, the projector only, caption conversations, next-token loss on answers
    instruct  OmniModel, projector + LLM (+ vision with --train-vision), question conversations
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from omnilm.config import IGNORE_INDEX, ClipConfig, OmniConfig
from omnilm.data import ImageProcessor, LlavaDataset, Processor, Tokenizer, collate, render_turns, train_tokenizer
from omnilm.data.captions import check_caption_tokenizer, text_ids_for, tokenize_captions
from omnilm.data.llava_json import Problem, check_records, read_records
from omnilm.data.processor import VideoSampling, check_tokenizer_fits
from omnilm.errors import OmniInputError
from omnilm.interpret.routing import summarize_routing
from omnilm.model import OmniModel
from omnilm.model.clip import ClipModel
from omnilm.model.connector import whiten_
from omnilm.model.hf import load_audio_encoder, load_vision_encoder
from omnilm.model.hf_config import hf_incompatibility
from omnilm.model.layers import eval_mode
from omnilm.model.vision import FeatureCache
from omnilm.train.lora import apply_lora, load_adapter, lora_layers, lora_trainable

# Which records each stage reads by default, by their `task` field. A record without one (real
# LLaVA data) is read by every stage; None as the default means "every task but captions".
DEFAULT_TASKS = {"clip": {"caption", None}, "align": {"caption", None}, "instruct": None}


@dataclass
class Stage:
    model: nn.Module  # in train mode, with requires_grad set on what the stage trains
    dataset: Any  # indexable; dataset[i] -> sample dict
    collate: Callable[[list[dict]], dict]
    # (model, batch) -> (mean loss over the batch's targets, numbers to log: an MoE's routing)
    loss: Callable[[nn.Module, dict], tuple[Any, dict[str, Any]]]
    n_targets: Callable[[dict], int]  # how many targets that mean is over
    group_lrs: dict[str, float]
    processor: Processor  # its files are saved beside the model's


def build_stage(args, resume_from: Path | None = None) -> Stage:
    """The model (fresh, from --init, or from the checkpoint being resumed), what it trains, its data."""
    return (build_clip_stage if args.stage == "clip" else build_llava_stage)(args, resume_from)


def lm_loss(model, batch, random_positions: int = 0, position_chunks: int = 0):
    """The next-token loss on the answers; with `random_positions` N, at position ids drawn by
    `spread_positions` (randomized positional encodings, or PoSE's skips with `position_chunks`)."""
    positions = (spread_positions(batch["attention_mask"], random_positions, position_chunks)
                 if random_positions else None)
    out = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], labels=batch["labels"],
                pixel_values_videos=batch.get("pixel_values_videos"), input_features=batch.get("input_features"),
                position_ids=positions, loss_only=True)
    if not out.routing:
        return out.loss, {}
    return out.loss, {"lm_loss": round(out.lm_loss.item(), 6), **summarize_routing(out.routing)}


def spread_positions(attention_mask: torch.Tensor, factor: int, chunks: int = 0) -> torch.Tensor:
    """Position ids (B, T) for a batch of records: row b's n real tokens get n increasing positions
    within 0 .. factor * n - 1; padding gets 0. Drawn from torch's global generator, whose state
    checkpoints keep: a resumed run draws the same.

    chunks 0: every position drawn apart, a sorted random subset (Ruoss et al. 2023, "Randomized
        Positional Encodings Boost Length Generalization of Transformers"): neighbours sit factor
        apart on average.
    chunks c: the record cut at random into c pieces, each keeping consecutive positions, with random
        skips between them (PoSE, Zhu et al. 2023): neighbours stay neighbours, while distances across
        a cut reach those of a record `factor` times longer."""
    positions = torch.zeros_like(attention_mask, dtype=torch.long)
    device = attention_mask.device
    for row, real in enumerate(attention_mask.bool()):
        n = int(real.sum())
        if chunks == 0:
            drawn = torch.randperm(factor * n, device=device)[:n].sort().values
        else:
            c = max(1, min(chunks, n))
            cuts = torch.randperm(n - 1, device=device)[:c - 1].add(1).sort().values  # piece j starts at cuts[j-1]
            piece = torch.zeros(n, dtype=torch.long, device=device)
            piece[cuts] = 1
            skips = torch.randint(0, (factor - 1) * n + 1, (c,), device=device).sort().values
            drawn = torch.arange(n, device=device) + skips[piece.cumsum(0)]
        positions[row, real] = drawn
    return positions


def lm_targets(batch) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # labels that a position predicts


def clip_loss(model, batch):
    return model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])[0], {}


def resolve_tokenizer(args, *folders: Path | None) -> Tokenizer:
    """--tokenizer, else the first of `folders` that holds one, else a BPE trained on the data."""
    if args.tokenizer is not None:
        return Tokenizer.from_file(args.tokenizer)
    for folder in folders:
        if folder is not None and (Path(folder) / "tokenizer.json").is_file():
            return Tokenizer.from_file(folder)
    return chat_tokenizer(args.data)


def chat_tokenizer(json_path: Path, system_prompt: str | None = None) -> Tokenizer:
    """A BPE trained on a dataset's chats as the model will read them, rendered with
    `system_prompt` (None: Vicuna's), which the tokenizer keeps and saves, so that training,
    evaluation and chat render prompts exactly as the tokenizer was trained on them. Data with
    videos gets a `<video>` token, data with audio an `<audio>` token."""
    records = read_records(Path(json_path))
    video, audio = (any(isinstance(r, dict) and r.get(kind) is not None for r in records)
                    for kind in ("video", "audio"))
    return train_tokenizer(corpus(records, system_prompt), system_prompt=system_prompt, video=video, audio=audio)


def corpus(data: Path | list, system_prompt: str | None = None) -> list[str]:
    """The text the model will read: every record (of a LLaVA JSON file, or as `read_records` gave
    them) rendered with the chat template (system prompt and role tags included, so they compress
    to a few tokens), for training a tokenizer on it."""
    records = data if isinstance(data, list) else read_records(Path(data))
    # Bad records are left out here and reported by the dataset, which knows about --skip-bad.
    usable = check_records(records, None, skip_bad=True).kept
    return ["".join(segment for segment, _ in render_turns(records[i]["conversations"], False, system_prompt))
            for i in usable]


def _tasks(args) -> set[str] | None:
    return set(args.tasks) if args.tasks else DEFAULT_TASKS[args.stage]


def _image_features(model, dataset: LlavaDataset, n_images: int = 1000, batch: int = 250, pool: bool = False,
                    split: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The projector's inputs, (M, Dv), for the images (and video frames) of the first records of
    `dataset`, up to `n_images` (an image that several records share counts each time; a video's
    frames all count, so the last video may take the frames past it): every
    vision token (a frame's pooled tokens, as `OmniModel.video_features` gives them), or with `pool`
    one mean token per image (what late fusion's MLP reads). With `split`, the images' and the
    frames' apart, (M_images, Dv) and (M_frames, video_feature_dim), either maybe empty."""
    pixels, videos, seen = [], [], 0
    for i in range(len(dataset)):
        p = dataset.pixel_values(i)
        if p is not None:
            pixels.append(p)
            seen += p.shape[0]
        for video in dataset.video_pixels(i):
            videos.append(video)
            seen += video.shape[0]
        if seen >= n_images:
            break
    if not pixels and not videos:
        raise OmniInputError("--whiten-projector needs images or videos, and the dataset's records have none")
    images, frames = [], []
    with torch.no_grad(), eval_mode(model):
        if pixels:
            pixels = torch.cat(pixels)[:n_images]
            images = [model.image_features(pixels[s:s + batch]) for s in range(0, len(pixels), batch)]
        for s in range(0, len(videos), 8):  # whole videos: a frame's motion features read the one before
            frames.append(model.video_features(videos[s:s + 8]))
    images, frames = ([f.mean(1) if pool else f.flatten(0, 1) for f in feats] for feats in (images, frames))
    if split:
        width = model.config.video_feature_dim
        return (torch.cat(images) if images else torch.zeros(0, model.config.vision.dim),
                torch.cat(frames) if frames else torch.zeros(0, width))
    return torch.cat(images + frames)


def _dataset(args, processor: Processor, max_length: int | None = None, check=None) -> LlavaDataset:
    """The stage's records, every one checked (images decoded) before training starts."""
    tasks = _tasks(args)
    skip_tasks = ("caption",) if tasks is None else ()  # instruct: every record but the captions
    # Preprocessed images stay in memory for small datasets (ShapeWorld); a large one decodes as it goes.
    return LlavaDataset(args.data, args.image_folder, processor, tasks=tasks, skip_tasks=skip_tasks,
                        skip_bad=args.skip_bad, max_length=max_length, cache_images=args.cache_images, check=check)


# --- clip ----------------------------------------------------------------------------------------


class CaptionPairs:
    """(image, caption) pairs from caption records: the image and the answer of the first turn."""

    def __init__(self, dataset: LlavaDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def caption(self, i: int) -> str:
        return _caption(self.dataset.records[i])

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.dataset.pixel_values(i), "caption": self.caption(i)}

    @staticmethod
    def check(tokenizer: Tokenizer, max_len: int):
        """The test a caption record must pass besides `check_records`' (one image, a caption that
        fits the text tower), as `LlavaDataset(check=...)` takes it: skipped with --skip-bad too."""

        def check(record: dict, paths: list[Path]) -> Problem | None:
            if len(paths) != 1:
                return Problem("bad image field", "image", f"lists {len(paths)} images, but stage clip pairs one "
                                                           "image with one caption: give a caption record one image")
            try:
                tokenize_captions(tokenizer, [_caption(record)], max_len)
            except OmniInputError as e:
                return Problem("too long", "conversations", f"holds a caption the text tower cannot read: {e}")
            return None

        return check


def _caption(record: dict) -> str:
    return next(t["value"] for t in record["conversations"] if t["from"] in ("gpt", "assistant")).strip()


def build_clip_stage(args, resume_from: Path | None):
    start = resume_from / "model" if resume_from is not None else args.init
    if start is not None:
        model = ClipModel.from_pretrained(start)
        tokenizer = resolve_tokenizer(args, start)
    else:
        tokenizer = resolve_tokenizer(args)
        config = ClipConfig.tiny(**text_ids_for(tokenizer))
        config.vision = OmniConfig.from_preset(args.preset, **args.model_overrides).vision  # the tower LLaVA will use
        model = ClipModel.from_config(config)
    check_caption_tokenizer(model.config.text, tokenizer, args.tokenizer or start or "the trained tokenizer")
    model.train()
    processor = Processor(tokenizer, ImageProcessor.from_vision_config(model.config.vision), 0)
    max_len = model.config.text.max_len
    # A caption too long for the text tower fails now, not mid-run.
    pairs = CaptionPairs(_dataset(args, processor, check=CaptionPairs.check(tokenizer, max_len)))

    def collate_pairs(batch: list[dict]) -> dict:
        input_ids, attention_mask = tokenize_captions(tokenizer, [b["caption"] for b in batch], max_len)
        return {"pixel_values": torch.stack([b["pixel_values"][0] for b in batch]),
                "input_ids": input_ids, "attention_mask": attention_mask}

    return Stage(model=model, dataset=pairs, collate=collate_pairs, loss=clip_loss,
                 n_targets=lambda batch: batch["input_ids"].shape[0], group_lrs=_patch_lr(args), processor=processor)


def _patch_lr(args) -> dict[str, float]:
    # The ViT's patch embedding reads a whole patch into each token, its position embedding is
    # added as it is; AdamW moves every weight by about the learning rate, so at the full rate the
    # patches' part of a token outgrows the positions' (docs/shapeworld-recipe.md, seventh round).
    return {"vision.embeddings.patch_embedding": args.patch_lr} if args.patch_lr is not None else {}


# --- align and instruct ------------------------------------------------------------------------


def build_llava_stage(args, resume_from: Path | None):
    start = resume_from / "model" if resume_from is not None else args.init
    if start is not None:
        model = OmniModel.from_pretrained(start)
        if model.config.quantization is not None:
            raise OmniInputError(f"{start} holds {model.config.quantization.method} weights (omnilm quantize), which "
                                 "do not train: train the float checkpoint it was quantised from")
        tokenizer = resolve_tokenizer(args, start)
        check_tokenizer_fits(model.config, tokenizer, args.tokenizer or start)
    else:
        if args.preset is None:
            raise OmniInputError(f"stage {args.stage} needs --preset NAME or --init CHECKPOINT")
        tokenizer = resolve_tokenizer(args, args.vision)
        overrides = dict(args.model_overrides)
        overrides["text"] = dict(overrides.get("text", {}), vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                                 eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
        if tokenizer.video_token_id is not None:  # a tokenizer with <video>: the model reads videos
            overrides.setdefault("video_token_id", tokenizer.video_token_id)
        if tokenizer.audio_token_id is not None:  # with <audio>: the model hears, with the encoder --config gives
            if not overrides.get("audio"):
                raise OmniInputError("the data has audio, so the model needs an audio encoder: give its shape in "
                                     "--config, e.g. '{\"audio\": {\"n_mels\": 80, \"dim\": 256, \"n_layers\": 4, "
                                     "\"n_heads\": 4, \"mlp_dim\": 1024, \"max_source_positions\": 1500}}'")
            overrides.setdefault("audio_token_id", tokenizer.audio_token_id)
        model = OmniModel.from_preset(args.preset, image_token_id=tokenizer.image_token_id, **overrides)
    if model.vision is None and (args.vision is not None or args.train_vision):
        flag = "--vision" if args.vision is not None else "--train-vision"
        why = "early fusion has none (its projector reads raw patches)" if model.config.vision else "it is text-only"
        raise OmniInputError(f"{flag} needs the model's vision encoder, but {why}: drop {flag}")
    if model.audio is None and (args.audio is not None or args.train_audio):
        flag = "--audio" if args.audio is not None else "--train-audio"
        raise OmniInputError(f"{flag} needs the model's audio encoder, but it has none: drop {flag}")
    if args.audio is not None and resume_from is None:
        encoder = load_audio_encoder(args.audio)
        if encoder.config != model.config.audio:
            raise OmniInputError(f"the audio encoder in {args.audio} does not fit the model's audio config: it is "
                                 f"{encoder.config}, the model's {model.config.audio}; set --config's audio to match")
        model.audio.load_state_dict(encoder.state_dict())
    if args.vision is not None and resume_from is None:
        encoder = load_vision_encoder(args.vision)
        try:
            model.vision.load_state_dict(encoder.state_dict())
        except RuntimeError as e:
            raise OmniInputError(f"the vision encoder in {args.vision} does not fit the model's vision config: "
                                 f"{str(e).splitlines()[-1].strip()}") from None

    if args.lora_r:
        _add_lora(args, model, resume_from)
    mark_trainable(model, args.stage, args.train_vision, args.train_audio)
    hold_fixed_tokens(model, args.weight_decay)
    model.train()
    if model.vision is not None and not args.train_vision:
        model.vision.eval()  # frozen: no dropout today, but keep its mode honest
        if args.cache_features:
            model.feature_cache = FeatureCache(int(args.cache_features * 2**30))
    if model.audio is not None and not args.train_audio:
        model.audio.eval()

    processor = Processor.for_model(model, tokenizer=tokenizer)
    processor.video = VideoSampling(num_frames=args.video_frames or None, timestamps=args.video_timestamps)
    dataset = _dataset(args, processor, max_length=model.config.text.max_seq_len)
    if args.whiten_projector and resume_from is None:  # a resumed run has it in its weights already
        fusion = model.config.fusion
        if model.vision is None:
            raise OmniInputError("--whiten-projector whitens vision features; this model has no vision encoder "
                                 f"({'early fusion' if fusion == 'early' else 'text-only'}): drop the flag")
        if fusion == "cross_attention":
            raise OmniInputError("--whiten-projector applies to the joint projector and late fusion's pooling MLP, "
                                 "not to the perceiver resampler: drop the flag for fusion=cross_attention")
        if fusion == "late":
            whiten_(model.fusion.pool, _image_features(model, dataset, pool=True))
        elif model.video_projector is None:  # images and frames share the projector
            whiten_(model.projector, _image_features(model, dataset))
        else:
            images, frames = _image_features(model, dataset, split=True)
            if len(images):
                whiten_(model.projector, images)
            if len(frames):  # a video's motion features are standardised, not whitened
                looks = model.config.video_feature_dim - model.config.video_motion_dim
                whiten_(model.video_projector, frames, standardize_from=looks)
    # Late and cross-attention fusion's own modules are their connector: they take the projector's rate.
    group_lrs = {name: lr for name, lr in (("projector", args.projector_lr), ("video_projector", args.projector_lr),
                                           ("audio_projector", args.projector_lr), ("fusion", args.projector_lr),
                                           ("vision", args.vision_lr))
                 if lr is not None} | _patch_lr(args)
    return Stage(model=model, dataset=dataset, collate=lambda b: collate(b, tokenizer.pad_id),
                 loss=functools.partial(lm_loss, random_positions=args.random_positions,
                                           position_chunks=args.position_chunks), n_targets=lm_targets, group_lrs=group_lrs | _gate_lr(args, model), processor=processor)


# Stage 1 trains the projector alone; stage 2 the projector and the LLM (Liu et al. 2023). The other
# fusion modes' connectors (late's pooling and gate, the resampler and gated blocks of cross-attention)
# train where the projector does. By top-level module.
STAGE_TRAINS = {"align": ("projector", "video_projector", "audio_projector", "fusion"),
                "instruct": ("projector", "video_projector", "audio_projector", "fusion", "llm", "lm_head")}
# Whisper's positions are fixed sinusoids: never trained, even with the encoder.
FROZEN = ("audio.embed_positions.weight",)


def hold_fixed_tokens(model: nn.Module, weight_decay: float = 0.0) -> None:
    """Keep the rows of the decoder's fixed tokens (`TextConfig.fixed_tokens`, the last ids) where
    they are: their gradient is zeroed in the embedding and the output head, so AdamW, which keeps
    no moments for them, never moves them. Weight decay would shrink them, so it is refused."""
    text = getattr(getattr(model, "config", None), "text", None)
    n = getattr(text, "fixed_tokens", 0)
    if not n:
        return
    if weight_decay:
        raise OmniInputError(f"--weight-decay {weight_decay:g} would shrink the {n} fixed word rows this model keeps "
                             "(text.fixed_tokens): train it with --weight-decay 0")
    first = text.vocab_size - n

    def zero_fixed_rows(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[first:] = 0
        return grad

    weights = {id(w): w for w in (model.llm.embed_tokens.weight, model.lm_head.weight)}  # tied: one
    for weight in weights.values():
        if weight.requires_grad:
            weight.register_hook(zero_fixed_rows)


def mark_trainable(model: nn.Module, stage: str, train_vision: bool = False, train_audio: bool = False) -> None:
    """Set requires_grad on what `stage` (align or instruct) trains, the vision encoder too with
    `train_vision` and the audio encoder with `train_audio`; for a model with LoRA layers
    (`_add_lora`), the LoRA updates and the projectors in full, nothing else (LLaVA-1.5's LoRA
    recipe)."""
    if lora_layers(model):
        lora_trainable(model, full=tuple(name for name in ("projector", "audio_projector")
                                         if getattr(model, name, None) is not None))
        return
    trains = set(STAGE_TRAINS[stage]) | ({"vision"} if train_vision else set()) | ({"audio"} if train_audio else set())
    for name, p in model.named_parameters():
        p.requires_grad_(name.split(".")[0] in trains and name not in FROZEN)


def _add_lora(args, model: OmniModel, resume_from: Path | None) -> None:
    """LoRA updates on the language model (fresh, or a resumed run's own); `mark_trainable` then
    trains them and the projector."""
    if hf_incompatibility(model.config):
        raise OmniInputError(f"--lora-r writes peft adapters for transformers' LLaVA and LLaMA; this model has no "
                             f"transformers class ({hf_incompatibility(model.config)}): train without --lora-r")
    adapter = resume_from / "adapter" if resume_from is not None else None
    if adapter is not None and adapter.is_dir():
        load_adapter(model, adapter)
    else:
        apply_lora(model, args)


def _gate_lr(args, model: nn.Module) -> dict[str, float]:
    # Cross-attention's tanh gates are scalars that start at 0. Adam moves a scalar by about its
    # learning rate a step whatever its gradient, so at 2e-3 a gate needs some 300 steps at the peak
    # rate to reach tanh(0.55) = 0.5: most of a short run. Flamingo trains for hundreds of thousands.
    if args.gate_lr is None:
        return {}
    gates = [name for name, _ in model.named_parameters() if name.endswith("_gate")]
    if not gates:
        raise OmniInputError(f"--gate-lr sets the rate of cross-attention's tanh gates; this model (fusion="
                             f"{model.config.fusion}) has none: drop the flag")
    return dict.fromkeys(gates, args.gate_lr)
