"""CLIP captions as token ids: the one format stage clip trains on and `omnilm.eval.clip` scores.

Each caption is BOS, its tokens, then an end-of-text id one past the tokenizer's vocabulary,
where CLIP's text tower pools. Shape letters: N captions, T tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from omnilm.config import ClipTextConfig
from omnilm.data.collate import pad_rows
from omnilm.errors import OmniInputError


def end_of_text_id(tokenizer) -> int:
    """The id that ends every caption and marks where the text is pooled: one past `tokenizer`'s
    vocabulary, so it is the highest id of any row. Not the tokenizer's </s>: omnilm's is id 2,
    which transformers takes for a legacy config and pools at the highest id instead (see
    `omnilm.model.clip.LEGACY_EOS_ID`); the highest id satisfies both rules, as OpenAI's <|endoftext|> did."""
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
    return pad_rows(rows, tokenizer.pad_id if tokenizer.pad_id is not None else 0)


def check_caption_tokenizer(cfg: ClipTextConfig, tokenizer, where: str | Path) -> None:
    """Captions tokenized with `tokenizer` must end in the id the text tower pools at."""
    eot = end_of_text_id(tokenizer)
    if eot != cfg.eos_token_id:
        raise OmniInputError(
            f"{where}: captions tokenized with this tokenizer end in id {eot}, but the text tower pools at "
            f"eos_token_id={cfg.eos_token_id}; build the text config with text_ids_for(tokenizer)"
        )
