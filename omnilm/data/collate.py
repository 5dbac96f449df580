"""Samples -> a training batch: right padding, attention mask, images in order; and `pad_rows`,
the one place rows of ids become a padded tensor and its mask (training, prompts, captions).

Training uses teacher forcing over whole sequences, so rows are right-padded (generation
left-pads instead, see `Processor`); the model derives positions from the attention mask,
so either way a row's tokens sit at the same positions as when it is alone.

Shape letters: B samples, T tokens, N images.
"""

from __future__ import annotations

import torch

from omnilm.config import IGNORE_INDEX


def pad_rows(rows: list, value: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ids (lists or 1-D tensors) -> (B, T) long tensor padded with `value` to the longest
    row, on the right (or the `left`), and the (B, T) mask: 1 on the rows' own entries."""
    T = max((len(row) for row in rows), default=0)
    out = torch.full((len(rows), T), value, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for b, row in enumerate(rows):
        n = len(row)
        if n:  # a slice [-0:] would be the whole row
            span = slice(T - n, T) if left else slice(0, n)
            out[b, span] = torch.as_tensor(row, dtype=torch.long)
            mask[b, span] = 1
    return out, mask


def collate(batch: list[dict], pad_id: int) -> dict:
    """Stack `LlavaDataset` samples. Returns `input_ids` (B, T) right-padded with `pad_id`,
    `labels` (B, T) padded with -100, `attention_mask` (B, T) 1 on real tokens, `pixel_values`
    (N, 3, H, W) with every sample's images in sample order (None when there are none),
    `pixel_values_videos` a list of every sample's videos, (F_i, 3, H, W) each (None without),
    `input_features` (W, M, frames) with every sample's audio windows in sample order (None without),
    and `ids`, the samples' ids."""
    input_ids, attention_mask = pad_rows([sample["input_ids"] for sample in batch], pad_id)
    labels, _ = pad_rows([sample["labels"] for sample in batch], IGNORE_INDEX)
    # The model fills image tokens with pixel_values in order across the batch, row by row.
    images = [sample["pixel_values"] for sample in batch if sample["pixel_values"] is not None]
    pixel_values = torch.cat(images) if images else None
    videos = [video for sample in batch for video in sample.get("pixel_values_videos", ())]
    audio = [sample["input_features"] for sample in batch if sample.get("input_features") is not None]
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "pixel_values": pixel_values,
        "pixel_values_videos": videos or None,
        "input_features": torch.cat(audio) if audio else None,
        "ids": [sample["id"] for sample in batch],
    }


def to_device(batch: dict, device) -> dict:
    """Move a batch's tensors (and lists of tensors: videos) to `device`; other values (ids, None)
    stay as they are."""
    def move(v):
        if isinstance(v, list) and v and all(isinstance(t, torch.Tensor) for t in v):
            return [t.to(device) for t in v]
        return v.to(device) if hasattr(v, "to") else v
    return {k: move(v) for k, v in batch.items()}
