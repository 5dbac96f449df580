"""Autoregressive generation with a static KV cache, gpt-fast style: plain functions, top to bottom.

`prefill` runs the prompt (images included) once and fills the cache; `decode_one_token` runs
one new token against it; `sample` turns logits into ids (greedy, or temperature / top-k /
top-p sampling with the semantics of transformers' warpers). `iter_tokens` is the one loop
that strings them together; `generate` collects its tokens and `stream` detokenises them as
they arrive. With `compile=True` each step is `decode_static` compiled by `torch.compile`: the
same tokens (tests/test_generate.py), one graph for every step. Shape letters: B batch, T prompt
length, V vocabulary.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from omnilm.errors import OmniInputError
from omnilm.settings import check_range, setting
from omnilm.model.layers import KVCache, StaticKVCache, eval_mode

# --- the model, one call at a time ------------------------------------------------------------


@dataclass(kw_only=True)
class Sampling:
    """How a reply is decoded, as a command line asks for it: `generate(model, ids, **vars(sampling))`
    takes these as they are, with temperature 0 meaning greedy."""

    max_new_tokens: int = setting(64, "most tokens to generate")
    temperature: float = setting(0.0, "0: greedy; above 0: sample at this temperature")
    top_k: int | None = setting(None, "sample among the k most likely tokens")
    top_p: float | None = setting(None, "sample from the smallest set of tokens with this much probability")

    def __post_init__(self) -> None:
        check_range(self, ("max_new_tokens",), low=1)
        check_range(self, ("temperature",), low=0)
        check_range(self, ("top_k",), low=1)
        check_range(self, ("top_p",), 0, 1, above=0)

    def generate_kwargs(self) -> dict[str, Any]:
        return dict(max_new_tokens=self.max_new_tokens, do_sample=self.temperature > 0,
                    temperature=self.temperature or 1.0, top_k=self.top_k, top_p=self.top_p)


def prefill(model: nn.Module, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
            attention_mask: torch.Tensor | None, cache: KVCache, chunk: int | None = None,
            pixel_values_videos: torch.Tensor | list[torch.Tensor] | None = None,
            input_features: torch.Tensor | None = None) -> torch.Tensor:
    """Run a prompt (or the next part of one) through the model, filling `cache`.

    `attention_mask` (B, S) covers the cached positions and these T new ones. Returns the
    logits of the last position (B, V): the distribution of the first new token. With `chunk`,
    the prompt goes through `chunk` tokens at a time (a chunk grows to the end of an image, video
    frame or audio window it would cut): the same logits, with the activations of one chunk at a time, so that a
    long prompt fits in memory (attention itself stays linear: `omnilm.model.layers.causal_attention`).
    """
    T = input_ids.shape[1]
    if chunk is None or T <= chunk:
        return model(input_ids, pixel_values, attention_mask, cache=cache, logits_to_keep=1,
                     pixel_values_videos=pixel_values_videos, input_features=input_features).logits[:, -1]
    if any(m is not None for m in (pixel_values, pixel_values_videos, input_features)) and input_ids.shape[0] > 1:
        raise OmniInputError("a prompt with images, videos or audio is prefilled in chunks one at a time (batch 1): "
                             "drop prefill_chunk or pass one prompt")
    cfg, past = model.config, cache.seen  # positions cached before this prompt
    # Frames, like images, are encoded whole: each chunk takes the frames whose tokens it holds.
    videos = video_list(pixel_values_videos)
    prompt, offset, images, seen_frames, windows = input_ids[0].tolist(), 0, 0, 0, 0
    while offset < T:
        end = media_chunk_end(prompt, offset, chunk, cfg, [len(v) for v in videos])
        n = prompt[offset:end].count(cfg.image_token_id) // cfg.image_seq_len if pixel_values is not None else 0
        f = prompt[offset:end].count(cfg.video_token_id) // cfg.video_frame_len if videos else 0
        w = prompt[offset:end].count(cfg.audio_token_id) // cfg.audio_seq_len if input_features is not None else 0
        mask = attention_mask[:, :past + end] if attention_mask is not None else None
        logits = model(input_ids[:, offset:end], pixel_values[images:images + n] if n else None, mask,
                       cache=cache, logits_to_keep=1,
                       pixel_values_videos=take_frames(videos, seen_frames, f) if f else None,
                       input_features=input_features[windows:windows + w] if w else None).logits[:, -1]
        offset, images, seen_frames, windows = end, images + n, seen_frames + f, windows + w
    return logits


def chunk_end(prompt: list[int], start: int, budget: int, marker: int, span: int | list[int]) -> int:
    """Where a chunk from `start` of at most `budget` tokens ends: moved to the end of the item it
    would otherwise cut, so each item is encoded exactly once. An item is `span` `marker` tokens (an
    image; 0 for a text-only model), or with a list, item i is span[i] of them (a motion model's
    videos, whose frames may have text between them)."""
    end = min(start + budget, len(prompt))
    if end == len(prompt) or span in (0, 1):
        return end
    seen = prompt[:end].count(marker)  # marker tokens before `end`
    if isinstance(span, int):
        missing = -seen % span  # the cut item's tokens after `end`
    else:
        bounds = itertools.accumulate(span, initial=0)
        missing = next((b - seen for b in bounds if b >= seen), 0)
    while missing and end < len(prompt):  # past the cut item's last token
        missing -= prompt[end] == marker
        end += 1
    return end


def media_chunk_end(prompt: list[int], start: int, budget: int, config, video_lengths: list[int] = ()) -> int:
    """`chunk_end` for a prompt of images, videos and audio (`config` an OmniConfig; `video_lengths`
    each video's frame count): grown to the end of the image, frame or audio window it would cut, or,
    for a model with `video_motion` (a frame's tokens read the frame before), to the end of the video
    (an item's end is no other item's: at most one of them moves it)."""
    end = chunk_end(prompt, start, budget, config.image_token_id, config.image_seq_len)
    if config.video_token_id is not None:
        span = [n * config.video_frame_len for n in video_lengths] if config.video_motion else config.video_frame_len
        end = max(end, chunk_end(prompt, start, end - start, config.video_token_id, span))
    if config.audio_token_id is not None:
        end = max(end, chunk_end(prompt, start, end - start, config.audio_token_id, config.audio_seq_len))
    return end


def video_list(pixel_values_videos: torch.Tensor | list[torch.Tensor] | None) -> list[torch.Tensor]:
    """Each video's frames, (F_i, 3, H, W), in marker order: from a (V, F, 3, H, W) tensor or a list
    of (F_i, 3, H, W); empty for no videos."""
    return [] if pixel_values_videos is None else list(pixel_values_videos)


def take_frames(videos: list[torch.Tensor], start: int, count: int) -> list[torch.Tensor]:
    """Frames start .. start + count - 1 of `videos` (counted through them in order), as the parts
    of each video they hold: what a prefill chunk passes as `pixel_values_videos`."""
    parts, offset = [], 0
    for video in videos:
        lo, hi = max(start - offset, 0), min(start + count - offset, len(video))
        if lo < hi:
            parts.append(video[lo:hi])
        offset += len(video)
    return parts


def decode_one_token(model: nn.Module, token: torch.Tensor, attention_mask: torch.Tensor | None,
                     cache: KVCache) -> torch.Tensor:
    """Logits (B, V) after feeding one new token (B, 1) on top of the cache."""
    return model(token, None, attention_mask, cache=cache, logits_to_keep=1).logits[:, -1]


def decode_static(model: nn.Module, token: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
    """`decode_one_token` on a `StaticKVCache`: every shape and index fixed, so that `torch.compile`
    makes one graph of it (`compiled_decode`) with no host synchronisation inside."""
    h = model.llm(model.embed(token), cache=cache)
    return model.lm_head(h[:, -1])


# Compiled once per process; a new shape (batch, cache length) compiles another graph. The cache's
# length is rounded up to CACHE_BUCKET positions, so prompts of similar lengths share one graph.
compiled_decode = torch.compile(decode_static, dynamic=False)
CACHE_BUCKET = 256


def compiled_cache_len(model: nn.Module, needed: int) -> int:
    """The cache length for a compiled loop that needs `needed` positions: rounded up to
    CACHE_BUCKET, within the model's max_seq_len (a dynamic-NTK model may run past it: then `needed`)."""
    limit = max(model.config.text.max_seq_len, needed)
    return min(-(-needed // CACHE_BUCKET) * CACHE_BUCKET, limit)


# --- logits -> ids ----------------------------------------------------------------------------


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Set to -inf every logit below the k-th largest; ties with it are kept (as HF's TopKLogitsWarper)."""
    k = min(top_k, logits.shape[-1])
    kth = torch.topk(logits, k).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2020): keep the most likely tokens whose mass reaches `top_p`.

    As HF's TopPLogitsWarper: sorted ascending, a token goes when the mass of it and everything
    less likely is at most 1 - top_p; the most likely token always stays.
    """
    sorted_logits, order = torch.sort(logits, descending=False)
    cum_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cum_probs <= 1 - top_p
    remove[..., -1] = False
    remove = remove.scatter(-1, order, remove)  # back to vocabulary order
    return logits.masked_fill(remove, float("-inf"))


def sample(logits: torch.Tensor, do_sample: bool = False, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next ids (B,) from logits (B, V): argmax, or a draw after temperature, top-k, then top-p.

    The order of the three is transformers' own, so the same settings mean the same
    distribution. A `generator` makes the draws reproducible.
    """
    if not do_sample:
        return logits.argmax(dim=-1)
    # fp32: a bf16 softmax over a large vocabulary loses the tail. The largest logit is taken out
    # first and the temperature kept a normal fp32 number, so that a tiny temperature cannot make
    # inf or NaN: it samples the argmax, as greedy does.
    logits = logits.float()
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / max(temperature, torch.finfo(torch.float32).tiny)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


# --- the generation loop ----------------------------------------------------------------------


def as_id_list(ids: int | list[int] | tuple[int, ...] | None) -> list[int]:
    """One id, several, or None (none), as a list: how configs give eos_token_id."""
    if ids is None:
        return []
    return [int(ids)] if isinstance(ids, int) else [int(i) for i in ids]


def _check_args(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                max_new_tokens: int, do_sample: bool, temperature: float,
                top_k: int | None, top_p: float | None, prefill_chunk: int | None = None) -> None:
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise OmniInputError(f"input_ids must be (batch, length) with length >= 1, got shape {tuple(input_ids.shape)}")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise OmniInputError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids {tuple(input_ids.shape)}: "
                "pass one mask entry per token"
            )
        if not bool(attention_mask[:, -1].all()):
            raise OmniInputError("attention_mask ends in padding: pad batched prompts on the left for generation")
    if max_new_tokens < 0:
        raise OmniInputError(f"max_new_tokens={max_new_tokens} is negative; ask for 0 or more new tokens")
    if prefill_chunk is not None and prefill_chunk < 1:
        raise OmniInputError(f"prefill_chunk={prefill_chunk}: give a number of tokens >= 1, or None for the whole prompt")
    text_cfg = model.config.text
    limit = text_cfg.max_seq_len
    prompt_len = input_ids.shape[1]
    # Dynamic NTK scaling exists to run past the trained length (max_seq_len); other models stop there.
    dynamic = (text_cfg.rope_scaling or {}).get("rope_type") == "dynamic"
    if prompt_len + max_new_tokens > limit and not dynamic:
        raise OmniInputError(
            f"prompt of {prompt_len} tokens + max_new_tokens={max_new_tokens} = {prompt_len + max_new_tokens} "
            f"exceeds the model's max_seq_len={limit}: shorten the prompt or lower max_new_tokens"
        )
    if do_sample and not temperature > 0:
        raise OmniInputError(f"temperature={temperature} must be > 0 when sampling; for greedy decoding pass do_sample=False")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise OmniInputError(f"top_k={top_k!r} must be an integer >= 1 (or None for no top-k filtering)")
    if top_p is not None and not 0 < top_p <= 1:
        raise OmniInputError(f"top_p={top_p!r} must be in (0, 1] (or None for no nucleus filtering)")


@torch.inference_mode()
def iter_tokens(model: nn.Module, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, max_new_tokens: int = 20,
                do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, stop_token_ids: int | list[int] | None = None,
                pad_token_id: int | None = None, generator: torch.Generator | None = None,
                prefill_chunk: int | None = None,
                pixel_values_videos: torch.Tensor | list[torch.Tensor] | None = None,
                input_features: torch.Tensor | None = None, compile: bool = False) -> Iterator[torch.Tensor]:
    """Yield the next ids (B,) one step at a time; the single loop behind `generate` and `stream`.

    Arguments as `generate`. A row that has emitted a stop token yields `pad_token_id` from then
    on, and the loop ends once every row has stopped or `max_new_tokens` were produced.
    """
    _check_args(model, input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k, top_p, prefill_chunk)
    if compile and model.config.fusion in ("late", "cross_attention"):
        raise OmniInputError(f"compiled decoding runs joint and early fusion; {model.config.fusion} fusion reads its "
                             "images at every step: decode it without compile")
    text_cfg = model.config.text
    stops = as_id_list(text_cfg.eos_token_id if stop_token_ids is None else stop_token_ids)
    if pad_token_id is None:  # as transformers: the config's pad, else the first stop token
        pad_token_id = text_cfg.pad_token_id if text_cfg.pad_token_id is not None else (stops[0] if stops else 0)
    if max_new_tokens == 0:
        return

    B, T = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device=device, dtype=torch.long)
    stop_ids = torch.tensor(stops, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)

    with eval_mode(model):
        cache = model.new_cache(B, compiled_cache_len(model, T + max_new_tokens) if compile else T + max_new_tokens)
        logits = prefill(model, input_ids, pixel_values, attention_mask, cache, prefill_chunk,
                         pixel_values_videos, input_features)  # (B, V)
        static = StaticKVCache(cache, attention_mask) if compile else None
        for step in range(max_new_tokens):
            token = sample(logits, do_sample, temperature, top_k, top_p, generator)  # (B,)
            token = token.masked_fill(finished, pad_token_id)
            finished |= torch.isin(token, stop_ids)
            yield token
            if step == max_new_tokens - 1 or bool(finished.all()):
                return
            if static is not None:
                logits = compiled_decode(model, token[:, None], static)
            else:
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)
                logits = decode_one_token(model, token[:, None], attention_mask, cache)


def generate(model: nn.Module, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
             attention_mask: torch.Tensor | None = None, max_new_tokens: int = 20,
             do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, stop_token_ids: int | list[int] | None = None,
             pad_token_id: int | None = None, generator: torch.Generator | None = None,
             prefill_chunk: int | None = None,
             pixel_values_videos: torch.Tensor | list[torch.Tensor] | None = None,
             input_features: torch.Tensor | None = None, compile: bool = False) -> torch.Tensor:
    """Generate up to `max_new_tokens` ids after each prompt; returns the new ids only, (B, n).

    input_ids (B, T): prompts, left-padded when their lengths differ, with `attention_mask`
        (B, T) 0 on the padding; image tokens expanded, one image in `pixel_values` per run; video
        tokens too, their videos in `pixel_values_videos`, and audio tokens, their windows in
        `input_features` (see `OmniModel.forward`).
    do_sample: False for greedy argmax; True to draw after `temperature`, `top_k`, `top_p`.
    stop_token_ids: a row ends after emitting one; default `model.config.text.eos_token_id`.
    pad_token_id: fills a row after it ends; default the config's pad, else the first stop id.
    generator: a `torch.Generator` (on the model's device) for reproducible sampling.
    prefill_chunk: run the prompt through the model that many tokens at a time (see `prefill`): a
        long prompt then fits in memory; the same tokens.
    compile: decode each token with `compiled_decode` (torch.compile of `decode_static`): the same
        tokens, faster once compiled; the first call for a new batch size or cache length compiles
        (seconds to a minute). Joint and early fusion.

    n < max_new_tokens when every row stopped early.
    """
    steps = list(iter_tokens(model, input_ids, pixel_values, attention_mask, max_new_tokens, do_sample,
                             temperature, top_k, top_p, stop_token_ids, pad_token_id, generator, prefill_chunk,
                             pixel_values_videos, input_features, compile))
    if not steps:
        return input_ids.new_empty(input_ids.shape[0], 0)
    return torch.stack(steps, dim=1)


def stream(model: nn.Module, tokenizer: Any, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
           attention_mask: torch.Tensor | None = None, **gen_kwargs: Any) -> Iterator[str]:
    """Yield text pieces for one prompt (batch 1) as its tokens arrive; `gen_kwargs` as `generate`.

    The pieces join to exactly `tokenizer.decode(new_ids, skip_special_tokens=True)`. Each step
    decodes all new ids so far and yields the new suffix, but holds it back while the text ends
    in U+FFFD: a character whose UTF-8 bytes are split over tokens not all seen yet.
    """
    if input_ids.ndim != 2 or input_ids.shape[0] != 1:
        raise OmniInputError(f"stream takes one prompt, input_ids of shape (1, T); got {tuple(input_ids.shape)}")
    ids: list[int] = []
    printed = ""
    for token in iter_tokens(model, input_ids, pixel_values, attention_mask, **gen_kwargs):
        ids.append(int(token[0]))
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or len(text) <= len(printed):
            continue
        yield text[len(printed):]
        printed = text
    # Whatever is still held back (an incomplete character at the very end) goes out as it decodes.
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if len(text) > len(printed):
        yield text[len(printed):]
