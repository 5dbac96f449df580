"""What each training stage builds: the model, which parameters train, the data and the loss.

The three stages of the recipe (see `omnilm.train.loop`):

    clip      ClipModel (vision + text tower), every parameter, image-caption pairs, InfoNCE
    align     OmniModel, the projector only, caption conversations, next-token loss on answers
    instruct  OmniModel, projector + LLM (+ vision with --train-vision), question conversations
"""

from __future__ import annotations

import json
from pathlib import Path

from omnilm.config import OmniConfig
from omnilm.data import ImageProcessor, LlavaDataset, Processor, Tokenizer, collate, render_turns, train_tokenizer
from omnilm.errors import OmniInputError

# Which records each stage reads by default (the `task` field; None = every record but captions).
DEFAULT_TASKS = {"clip": {"caption"}, "align": {"caption"}, "instruct": None}


def resolve_tokenizer(args, *folders: Path | None) -> Tokenizer:
    """--tokenizer, else the first of `folders` that holds one, else a BPE trained on the data."""
    if args.tokenizer is not None:
        return Tokenizer.from_file(args.tokenizer)
    for folder in folders:
        if folder is not None and (Path(folder) / "tokenizer.json").is_file():
            return Tokenizer.from_file(folder)
    return train_tokenizer(corpus(args.data), vocab_size=512)


def corpus(json_path: Path) -> list[str]:
    """The text the model will read: every record rendered with the chat template (system prompt
    and role tags included, so they compress to a few tokens), for training a tokenizer on it."""
    records = json.loads(Path(json_path).read_text())
    texts = []
    for r in records:
        try:
            texts.append("".join(segment for segment, _ in render_turns(r["conversations"], False)))
        except (OmniInputError, KeyError, TypeError):  # bad records are the dataset's to report
            continue
    return texts


def _tasks(args) -> set[str] | None:
    return set(args.tasks) if args.tasks else DEFAULT_TASKS[args.stage]


def _dataset(args, processor: Processor) -> LlavaDataset:
    tasks = _tasks(args)
    if tasks is None:  # instruct: every question record, not the captions
        records = json.loads(Path(args.data).read_text())
        tasks = {r.get("task") for r in records if isinstance(r, dict)} - {"caption"}
    return LlavaDataset(args.data, args.image_folder, processor, tasks=tasks, skip_bad=args.skip_bad,
                        cache_images=True)


# --- clip ----------------------------------------------------------------------------------------


class CaptionPairs:
    """(image, caption) pairs from caption records: the image and the answer of the first turn."""

    def __init__(self, dataset: LlavaDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        record = self.dataset.records[i]
        answer = next(t["value"] for t in record["conversations"] if t["from"] in ("gpt", "assistant"))
        return {"pixel_values": self.dataset.pixel_values(i), "caption": answer}


def build_clip_stage(args, resume_from: Path | None):
    import torch

    from omnilm.model.clip import ClipConfig, ClipModel, load_clip, tokenize_captions
    from omnilm.train.loop import Stage, _clip_loss

    start = resume_from / "model" if resume_from is not None else args.init
    if start is not None:
        model = load_clip(start)
        tokenizer = model.tokenizer or resolve_tokenizer(args)
    else:
        tokenizer = resolve_tokenizer(args)
        config = ClipConfig.tiny(tokenizer=tokenizer)
        config.vision = OmniConfig.from_preset(args.preset, **args.config_overrides).vision  # the tower LLaVA will use
        model = ClipModel.from_config(config)
    model.tokenizer = tokenizer
    model.train()
    processor = Processor(tokenizer, ImageProcessor.from_vision_config(model.config.vision), 0)
    pairs = CaptionPairs(_dataset(args, processor))
    max_len = model.config.text.max_len

    def collate_pairs(batch: list[dict]) -> dict:
        input_ids, attention_mask = tokenize_captions(tokenizer, [b["caption"] for b in batch], max_len)
        return {"pixel_values": torch.stack([b["pixel_values"][0] for b in batch]),
                "input_ids": input_ids, "attention_mask": attention_mask}

    return Stage(model=model, dataset=pairs, collate=collate_pairs, loss=_clip_loss, group_lrs={})


# --- align and instruct ------------------------------------------------------------------------


def build_llava_stage(args, resume_from: Path | None):
    from omnilm.model import OmniModel
    from omnilm.model.hf import load_vision_encoder
    from omnilm.train.loop import Stage, _lm_loss

    start = resume_from / "model" if resume_from is not None else args.init
    if start is not None:
        model = OmniModel.from_pretrained(start)
        tokenizer = model.tokenizer or resolve_tokenizer(args, args.vision)
    else:
        if args.preset is None:
            raise OmniInputError(f"stage {args.stage} needs --preset NAME or --init CHECKPOINT")
        tokenizer = resolve_tokenizer(args, args.vision)
        overrides = dict(args.config_overrides)
        overrides["text"] = dict(overrides.get("text", {}), vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                                 eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
        model = OmniModel.from_preset(args.preset, image_token_id=tokenizer.image_token_id, **overrides)
    if args.vision is not None and resume_from is None:
        encoder = load_vision_encoder(args.vision)
        try:
            model.vision.load_state_dict(encoder.state_dict())
        except RuntimeError as e:
            raise OmniInputError(f"the vision encoder in {args.vision} does not fit the model's vision config: "
                                 f"{str(e).splitlines()[-1].strip()}") from None
    model.tokenizer = tokenizer

    # Stage 1 trains the projector alone; stage 2 the projector and the LLM (Liu et al. 2023).
    trains = {"align": {"projector"}, "instruct": {"projector", "llm", "lm_head"}}[args.stage]
    if args.train_vision:
        trains = trains | {"vision"}
    for name, p in model.named_parameters():
        p.requires_grad_(name.split(".")[0] in trains)
    model.train()
    if model.vision is not None and "vision" not in trains:
        model.vision.eval()  # frozen: no dropout today, but keep its mode honest

    processor = Processor(tokenizer, ImageProcessor.from_vision_config(model.config.vision), model.config.image_seq_len)
    dataset = _dataset(args, processor)
    group_lrs = {name: lr for name, lr in (("projector", args.projector_lr), ("vision", args.vision_lr)) if lr}
    return Stage(model=model, dataset=dataset, collate=lambda b: collate(b, tokenizer.pad_id),
                 loss=_lm_loss, group_lrs=group_lrs)
