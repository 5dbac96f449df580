"""Samples -> a training batch: right padding, attention mask, images in order.

Training uses teacher forcing over whole sequences, so rows are right-padded (generation
left-pads instead, see `Processor`); the model derives positions from the attention mask,
so either way a row's tokens sit at the same positions as when it is alone.

Shape letters: B samples, T tokens, N images.
"""

from __future__ import annotations

import torch

from omnilm.config import IGNORE_INDEX


def collate(batch: list[dict], pad_id: int) -> dict:
    """Stack `LlavaDataset` samples. Returns `input_ids` (B, T) right-padded with `pad_id`,
    `labels` (B, T) padded with -100, `attention_mask` (B, T) 1 on real tokens, `pixel_values`
    (N, 3, H, W) with every sample's images in sample order (None when there are none) and
    `ids`, the samples' ids."""
    T = max(len(sample["input_ids"]) for sample in batch)
    input_ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), T), dtype=torch.long)
    for b, sample in enumerate(batch):
        n = len(sample["input_ids"])
        input_ids[b, :n] = sample["input_ids"]
        labels[b, :n] = sample["labels"]
        attention_mask[b, :n] = 1
    # The model fills image tokens with pixel_values in order across the batch, row by row.
    images = [sample["pixel_values"] for sample in batch if sample["pixel_values"] is not None]
    pixel_values = torch.cat(images) if images else None
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "pixel_values": pixel_values,
        "ids": [sample["id"] for sample in batch],
    }


def to_device(batch: dict, device) -> dict:
    """Move a batch's tensors to `device`; other values (ids, None) stay as they are."""
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
