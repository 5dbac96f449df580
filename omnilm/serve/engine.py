"""An inference engine with continuous batching: many requests decoded together, each joining and
leaving the running batch between decoding steps (iteration-level scheduling, Orca, Yu et al. 2022).

    add_request --> waiting (a FIFO queue, at most max_queue)
                       |  free rows: prefill up to `prefill_chunk` prompt tokens per step, images,
                       v  video frames and audio windows encoded once; each newcomer samples its first token
                    running rows [0, n) of the KV store --> one token per row per `step()`
                       |  stop id, stop string, max_tokens or abort
                       v
                    finished: the row is freed at once (the last row moves into it)

Every row keeps its own length: a decoding step feeds one token per row through a
`RaggedKVCache`, so rows at different positions decode together with no padding, and each
request's tokens are those it would get alone (its own sampling settings and random generator,
inside one batch). Prefill is interleaved with the decoding steps, `prefill_chunk` tokens per
step: newcomers whose whole prompts fit go together in one right-padded forward pass (straight
into their rows); a longer prompt goes alone into a scratch row, in chunks that never split an
image, a video frame or an audio window, so that it delays the running streams by one chunk per step, not by its
whole length.

`Engine` is synchronous and single-threaded: `step()` does one iteration and returns what each
request gained. `add_request` and `abort` may be called from any thread. `AsyncEngine` runs the
steps in a background thread for an asyncio server; leaving its `generate` loop early aborts the
request.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch
from torch import nn

from omnilm.errors import OmniInputError
from omnilm.infer.generate import as_id_list, media_chunk_end, sample, take_frames, video_list
from omnilm.model.fusion import Media
from omnilm.model.layers import RaggedKVCache
from omnilm.settings import check_range


class QueueFull(OmniInputError):
    """The waiting queue holds `max_queue` requests already: try again shortly."""


@dataclass(kw_only=True)
class SamplingParams:
    """How one request is decoded. Temperature 0 is greedy; a `seed` makes sampling reproducible."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # the text ends before the first one that appears
    stop_token_ids: list[int] = field(default_factory=list)  # besides the model's eos
    ignore_eos: bool = False  # run to max_tokens past the model's eos (for benchmarks, as vLLM's)

    def __post_init__(self) -> None:
        check_range(self, ("max_tokens",), low=1, named=str)
        check_range(self, ("temperature",), low=0, named=str)
        check_range(self, ("top_k",), low=1, named=str)
        check_range(self, ("top_p",), 0, 1, above=0, named=str)
        check_range(self, ("seed",), 0, 2**63 - 1, named=str)
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise OmniInputError(f"stop={self.stop!r} must be a list of non-empty strings")
        if not isinstance(self.ignore_eos, bool):
            raise OmniInputError(f"ignore_eos={self.ignore_eos!r} must be true or false")
        if not isinstance(self.stop_token_ids, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.stop_token_ids):
            raise OmniInputError(f"stop_token_ids={self.stop_token_ids!r} must be a list of token ids (integers >= 0)")


@dataclass
class Output:
    """What one step brought one request."""

    request_id: str
    text: str  # the new text since the previous Output ("" while it is held back, see `_Request.emit`)
    token_ids: list[int]  # the new ids
    finish_reason: str | None  # None while running; "stop", "length", "abort", or "error" (see `error`)
    prompt_tokens: int
    completion_tokens: int  # all generated so far
    # With "error": an OmniInputError when the request's own input failed (a client's error), any
    # other exception when the engine did.
    error: Exception | None = None

    def then(self, later: Output) -> Output:
        """This Output and the `later` one of the same request, as one."""
        return Output(self.request_id, self.text + later.text, self.token_ids + later.token_ids, later.finish_reason,
                      later.prompt_tokens, later.completion_tokens, later.error)


@dataclass
class EngineStats:
    running: int  # decoding, or prefilling
    waiting: int
    prompt_tokens_total: int
    generation_tokens_total: int
    aborted_total: int


class _Request:
    """One request's state, from the queue to its last token."""

    def __init__(self, request_id: str, prompt: list[int], pixel_values: torch.Tensor | None,
                 videos: list[torch.Tensor], params: SamplingParams, stop_ids: set[int], device: torch.device,
                 audio: torch.Tensor | None = None):
        self.id, self.prompt, self.pixel_values, self.params = request_id, prompt, pixel_values, params
        self.videos = videos  # each video of the prompt in marker order, (F_i, 3, H, W)
        self.audio = audio  # every audio window of the prompt in marker order, (W, M, frames)
        self.stop_ids = (set() if params.ignore_eos else stop_ids) | set(params.stop_token_ids)
        self.generator = None
        if params.temperature > 0:
            self.generator = torch.Generator(device).manual_seed(
                params.seed if params.seed is not None else secrets.randbits(63))
        self.prefilled = 0  # prompt tokens in the cache so far
        self.images_used = self.frames_used = self.windows_used = 0
        self.media: Media | None = None  # late and cross-attention fusion: this request's images
        self.output_ids: list[int] = []
        self.text_ids: list[int] = []  # output_ids without a final stop id
        self.sent = ""  # the text handed out so far

    @property
    def length(self) -> int:
        """Tokens in the cache: the prompt and every output token but the newest (not fed yet)."""
        return len(self.prompt) + len(self.output_ids) - 1

    def emit(self, tokenizer, new_ids: list[int], finish: str | None) -> Output:
        """The Output for `new_ids`: the text they add, cut at a stop string (which then finishes
        the request). While running, text that could still become a stop string, or ends in an
        incomplete character (U+FFFD: its bytes are split over tokens not all seen), is held back."""
        text = tokenizer.decode(self.text_ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s, max(0, len(self.sent) - len(s) + 1)) for s in self.params.stop) if i >= 0),
                  default=-1)
        if cut >= 0:
            text, finish = text[:cut], "stop"
        end = len(text)
        if finish is None:
            end = min([end, *(_partial_stop(text, s) for s in self.params.stop)])
            while end > len(self.sent) and text[end - 1] == "\ufffd":
                end -= 1
        piece = text[len(self.sent):end] if end > len(self.sent) else ""
        self.sent += piece
        return Output(self.id, piece, new_ids, finish, len(self.prompt), len(self.output_ids))


def _partial_stop(text: str, stop: str) -> int:
    """Where the longest suffix of `text` that begins `stop` starts (len(text) when none does)."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return len(text) - n
    return len(text)


class Engine:
    """Continuous batching over one model: see the module docstring.

    max_batch: rows of the KV store, the most requests decoding at once.
    max_queue: the most requests waiting for a row; beyond it `add_request` raises QueueFull.
    max_len: the context of each row (prompt + max_tokens); default the model's max_seq_len.
    prefill_chunk: prompt tokens prefilled per step, the bound on how long one step of the
        running streams waits for newcomers (a chunk grows to the end of an image it would split).
    """

    def __init__(self, model: nn.Module, tokenizer, *, max_batch: int = 8, max_queue: int = 64,
                 max_len: int | None = None, prefill_chunk: int = 512):
        text = model.config.text
        if max_len is not None and not 1 <= max_len <= text.max_seq_len:
            raise OmniInputError(f"max_len={max_len} must be between 1 and the model's max_seq_len={text.max_seq_len}")
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue), ("prefill_chunk", prefill_chunk)):
            if not isinstance(value, int) or value < 1:
                raise OmniInputError(f"{name}={value!r} must be an integer >= 1")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.max_len = max_len or text.max_seq_len
        weight = model.llm.norm.weight  # float in every model (the linear layers' weights may be int8)
        self.device = weight.device
        # Keys, values and (with text.token_conv) the token convolutions' inputs, each (L, rows, heads,
        # max_len, width): row b holds running[b]'s. The newcomer being prefilled writes into a scratch
        # row, then moves into the first free row.
        shapes = [(text.n_kv_heads, text.head_dim)] * 2 + ([(1, text.dim)] if text.token_conv else [])
        def zeros(rows: int) -> list[torch.Tensor]:
            return [torch.zeros((text.n_layers, rows, heads, self.max_len, width), dtype=weight.dtype, device=self.device)
                    for heads, width in shapes]
        self.stores, self.scratch = zeros(max_batch), zeros(1)
        self.eos = set(as_id_list(text.eos_token_id))
        self.image_span = model.config.image_seq_len  # tokens per image in the prompt
        # What pads a right-padded batch of prompts: any id but the image token's (never attended).
        self.filler = 1 if model.config.image_token_id == 0 else 0

        self.running: list[_Request] = []  # running[i] owns row i
        self.prefilling: _Request | None = None
        self.waiting: deque[_Request] = deque()
        self._media: Media | None = None  # the running rows' images, rebuilt when the rows change
        self._rows_changed = True
        self._lock = threading.Lock()  # guards the inbox: add_request and abort come from other threads
        self._inbox: list[_Request] = []
        self._aborts: set[str] = set()
        self._totals = dict(prompt=0, generation=0, aborted=0)

    # --- the door ------------------------------------------------------------------------------

    def add_request(self, input_ids: list[int], pixel_values: torch.Tensor | None, params: SamplingParams,
                    request_id: str | None = None,
                    pixel_values_videos: torch.Tensor | list[torch.Tensor] | None = None,
                    input_features: torch.Tensor | None = None) -> str:
        """Queue a prompt (token ids with image, video and audio tokens expanded, as the processor
        makes them), its images (N, 3, H, W) in marker order, its videos as the processor gives them
        ((V, F, 3, H, W), or a list of (F_i, 3, H, W)) and its audio windows (W, M, frames); returns
        the request id."""
        if not isinstance(params, SamplingParams):
            raise OmniInputError(f"params must be SamplingParams, not {type(params).__name__}")
        if not input_ids:
            raise OmniInputError("the prompt is empty: send at least one token")
        total = len(input_ids) + params.max_tokens
        if total > self.max_len:
            raise OmniInputError(f"the prompt is {len(input_ids)} tokens and max_tokens is {params.max_tokens}: "
                                 f"{total} > the context of {self.max_len}; shorten the prompt or lower max_tokens")
        self._check_images(input_ids, pixel_values)
        videos = self._check_videos(input_ids, pixel_values_videos)
        self._check_audio(input_ids, input_features)
        request = _Request(request_id or uuid.uuid4().hex, list(input_ids), pixel_values, videos, params, self.eos,
                           self.device, input_features)
        with self._lock:
            if len(self.waiting) + len(self._inbox) >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are waiting already; retry in a moment")
            self._inbox.append(request)
        return request.id

    def _check_images(self, input_ids: list[int], pixel_values: torch.Tensor | None) -> None:
        config = self.model.config
        n_tokens = sum(1 for i in input_ids if i == config.image_token_id) if config.vision is not None else 0
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        if n_tokens != n_images * self.image_span:
            raise OmniInputError(f"the prompt holds {n_tokens} image tokens but {n_images} images of {self.image_span} "
                                 "tokens came with it: build the prompt with the model's processor")
        if pixel_values is not None:
            self._check_pixels(pixel_values, "pixel_values", "images")

    def _check_videos(self, input_ids: list[int], pixel_values_videos) -> list[torch.Tensor]:
        """Each video's frames in marker order, once their count matches the prompt's video tokens."""
        config = self.model.config
        videos = video_list(pixel_values_videos)
        if config.video_token_id is None:
            if videos:
                raise OmniInputError("this model reads no video (its config has no video_token_id): send images "
                                     "or text")
            return []
        n_tokens, n_frames = input_ids.count(config.video_token_id), sum(len(v) for v in videos)
        if n_tokens != n_frames * config.video_frame_len:
            raise OmniInputError(f"the prompt holds {n_tokens} video tokens but {n_frames} frames of "
                                 f"{config.video_frame_len} tokens came with it: build the prompt with the model's "
                                 "processor")
        for video in videos:
            self._check_pixels(video, "the videos' frames", "videos")
        return videos

    def _check_audio(self, input_ids: list[int], input_features: torch.Tensor | None) -> None:
        """The audio windows: as many as the prompt's audio tokens ask for, each of the encoder's size."""
        config = self.model.config
        if config.audio is None:
            if input_features is not None:
                raise OmniInputError("this model hears no audio (its config has no audio encoder): send text, or "
                                     "what else the model reads")
            return
        n_windows = 0 if input_features is None else input_features.shape[0]
        n_tokens = input_ids.count(config.audio_token_id)
        if n_tokens != n_windows * config.audio_seq_len:
            raise OmniInputError(f"the prompt holds {n_tokens} audio tokens but {n_windows} windows of "
                                 f"{config.audio_seq_len} tokens came with it: build the prompt with the model's "
                                 "processor")
        want = (config.audio.n_mels, config.audio.window_frames)
        if input_features is not None and (input_features.ndim != 3 or tuple(input_features.shape[1:]) != want):
            raise OmniInputError(f"the audio windows are {tuple(input_features.shape)}, not (W, {want[0]}, {want[1]}): "
                                 "build them with the model's processor")

    def _check_pixels(self, pixels: torch.Tensor, name: str, what: str) -> None:
        """`pixels` (N, 3, H, W) at the size the model's vision tower takes."""
        v = self.model.config.vision
        want = (v.n_channels, v.image_size, v.image_size)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != want:
            raise OmniInputError(f"{name} are {tuple(pixels.shape)} but the model takes (N, {', '.join(map(str, want))}"
                                 f"): preprocess the {what} with the model's processor")

    def abort(self, request_id: str) -> None:
        """Stop a request wherever it is (the next step frees its row); unknown ids are ignored."""
        with self._lock:
            self._aborts.add(request_id)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self.running or self.prefilling or self.waiting or self._inbox or self._aborts)

    def stats(self) -> EngineStats:
        with self._lock:
            waiting = len(self.waiting) + len(self._inbox)
        return EngineStats(len(self.running) + (self.prefilling is not None), waiting, self._totals["prompt"],
                           self._totals["generation"], self._totals["aborted"])

    # --- one iteration -------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[Output]:
        """Take in new requests and aborts, decode one token for every running row, then prefill
        up to `prefill_chunk` prompt tokens of newcomers. Returns each request's news."""
        outputs = self._take_inbox()
        if self.running:
            outputs += self._decode()
        outputs += self._prefill()
        return outputs

    def _take_inbox(self) -> list[Output]:
        with self._lock:
            self.waiting.extend(self._inbox)
            self._inbox.clear()
            aborts, self._aborts = self._aborts, set()
        if not aborts:
            return []
        running = [r for r in self.running if r.id in aborts]
        self._free(running)
        gone = running + [r for r in self.waiting if r.id in aborts]
        self.waiting = deque(r for r in self.waiting if r.id not in aborts)
        if self.prefilling is not None and self.prefilling.id in aborts:
            gone.append(self.prefilling)
            self.prefilling = None
        self._totals["aborted"] += len(gone)
        return [Output(r.id, "", [], "abort", len(r.prompt), len(r.output_ids)) for r in gone]

    def _decode(self) -> list[Output]:
        """One token for every running row, each at its own position."""
        if self._rows_changed:
            self._media = Media.stack([r.media for r in self.running]) if self.model.fusion is not None else None
            self._rows_changed = False
        n = len(self.running)
        cache = _cache(self.stores, slice(0, n), [r.length for r in self.running], self._media)
        tokens = torch.tensor([[r.output_ids[-1]] for r in self.running], device=self.device)
        logits = self.model(tokens, None, None, cache=cache, logits_to_keep=1).logits[:, -1]  # (n, V)
        outputs = [self._accept(r, logits[b:b + 1]) for b, r in enumerate(self.running)]
        self._free([r for r, out in zip(self.running, outputs) if out.finish_reason is not None])
        return outputs

    def _accept(self, r: _Request, logits: torch.Tensor) -> Output:
        """Sample `r`'s next token from its logits (1, V) and decide whether it is done."""
        p = r.params
        token = int(sample(logits, p.temperature > 0, p.temperature or 1.0, p.top_k, p.top_p, r.generator)[0])
        r.output_ids.append(token)
        self._totals["generation"] += 1
        finish = None
        if token in r.stop_ids:
            finish = "stop"
        else:
            r.text_ids.append(token)
            if len(r.output_ids) == p.max_tokens:
                finish = "length"
        return r.emit(self.tokenizer, [token], finish)

    def _free(self, done: list[_Request]) -> None:
        """Release the rows of `done`: the last running rows move into the holes, so rows stay [0, n)."""
        if not done:
            return
        keep = [r for r in self.running if r not in done]
        for row, r in enumerate(keep):
            old = self.running.index(r)
            if old != row:  # move this request's keys and values (and convolution inputs) down into the free row
                for store in self.stores:
                    store[:, row, :, :r.length] = store[:, old, :, :r.length]
        self.running = keep
        self._rows_changed = True

    def _prefill(self) -> list[Output]:
        """Prefill newcomers, `prefill_chunk` prompt tokens in all, while rows are free: the prompts
        that fit whole together in one forward pass, a longer one chunk by chunk. A newcomer whose
        prompt is complete samples its first token and joins the running rows."""
        outputs, budget = [], self.prefill_chunk
        while budget > 0 and len(self.running) < self.max_batch:
            if self.prefilling is None:
                if not self.waiting:
                    break
                if len(self.waiting[0].prompt) <= self.prefill_chunk:  # whole prompts, together
                    if len(self.waiting[0].prompt) > budget:
                        break  # next step
                    group = self._take_group(budget)
                    budget -= sum(len(r.prompt) for r in group)
                    outputs += self._prefill_whole(group)
                    continue
                self.prefilling = self.waiting.popleft()
            r = self.prefilling
            try:
                logits, used = self._prefill_chunk(r, budget)
            except OmniInputError as e:  # this request's own input: it fails alone
                self.prefilling = None
                outputs.append(Output(r.id, "", [], "error", len(r.prompt), 0, error=e))
                continue
            budget -= used
            if r.prefilled < len(r.prompt):
                continue
            self.prefilling = None
            row = len(self.running)
            for store, scratch in zip(self.stores, self.scratch):
                store[:, row, :, :len(r.prompt)] = scratch[:, 0, :, :len(r.prompt)]
            outputs += self._join([r], logits)
        return outputs

    def _take_group(self, budget: int) -> list[_Request]:
        """The waiting requests, in order, whose whole prompts fit `budget` together and the free rows."""
        group: list[_Request] = []
        while (self.waiting and len(self.running) + len(group) < self.max_batch
               and len(self.waiting[0].prompt) <= budget):
            budget -= len(self.waiting[0].prompt)
            group.append(self.waiting.popleft())
        return group

    def _prefill_whole(self, group: list[_Request]) -> list[Output]:
        """Prefill whole prompts in one forward pass, right-padded, straight into the free rows after
        the running ones (each row's real tokens never see the padding after them). If the batch is
        refused, each prompt goes alone, so that only the one at fault fails."""
        n, lengths = len(self.running), [len(r.prompt) for r in group]
        ids = torch.full((len(group), max(lengths)), self.filler, dtype=torch.long)
        for b, r in enumerate(group):
            ids[b, :lengths[b]] = torch.tensor(r.prompt)
        images = [r.pixel_values for r in group if r.pixel_values is not None]
        pixels = torch.cat(images).to(self.device) if images else None
        videos = [v.to(self.device) for r in group for v in r.videos] or None
        audio = [r.audio for r in group if r.audio is not None]
        features = torch.cat(audio).to(self.device) if audio else None
        cache = _cache(self.stores, slice(n, n + len(group)), [0] * len(group))
        last = torch.tensor(lengths, device=self.device) - 1
        try:
            logits = self.model(ids.to(self.device), pixels, None, cache=cache, logits_at=last,
                                pixel_values_videos=videos, input_features=features).logits[:, -1]
        except OmniInputError as e:
            if len(group) > 1:
                return [out for r in group for out in self._prefill_whole([r])]
            return [Output(group[0].id, "", [], "error", lengths[0], 0, error=e)]
        for b, r in enumerate(group):
            r.prefilled, r.images_used = lengths[b], 0 if r.pixel_values is None else len(r.pixel_values)
            r.frames_used = sum(len(v) for v in r.videos)
            r.windows_used = 0 if r.audio is None else len(r.audio)
            if cache.media is not None:  # this row's images (late, cross-attention)
                r.media = Media(cache.media.features[b:b + 1], cache.media.positions[b:b + 1])
        return self._join(group, logits)

    def _join(self, group: list[_Request], logits: torch.Tensor) -> list[Output]:
        """Requests whose prompts are in the rows after the running ones, in order: each samples its
        first token from its row of `logits` (len(group), V) and runs, unless that already ends it."""
        self._totals["prompt"] += sum(len(r.prompt) for r in group)
        outputs = [self._accept(r, logits[b:b + 1]) for b, r in enumerate(group)]
        self.running += group
        self._free([r for r, out in zip(group, outputs) if out.finish_reason is not None])
        self._rows_changed = True
        return outputs

    def _prefill_chunk(self, r: _Request, budget: int) -> tuple[torch.Tensor, int]:
        """Run the next chunk of `r`'s prompt (at most `budget` tokens, unless that would split an
        image, a video frame or an audio window) through the model into the scratch row; returns the
        last logits (1, V) and its length."""
        config, start = self.model.config, r.prefilled
        end = media_chunk_end(r.prompt, start, budget, config, [len(v) for v in r.videos])
        chunk = r.prompt[start:end]
        n_images = sum(1 for i in chunk if i == config.image_token_id) // self.image_span if self.image_span else 0
        n_frames = chunk.count(config.video_token_id) // config.video_frame_len if r.videos else 0
        pixels = r.pixel_values[r.images_used:r.images_used + n_images].to(self.device) if n_images else None
        frames = [v.to(self.device) for v in take_frames(r.videos, r.frames_used, n_frames)] if n_frames else None
        n_windows = chunk.count(config.audio_token_id) // config.audio_seq_len if r.audio is not None else 0
        features = r.audio[r.windows_used:r.windows_used + n_windows].to(self.device) if n_windows else None
        cache = _cache(self.scratch, slice(0, 1), [start], r.media)
        ids = torch.tensor([chunk], device=self.device)
        logits = self.model(ids, pixels, None, cache=cache, logits_to_keep=1, pixel_values_videos=frames,
                            input_features=features).logits[:, -1]
        r.prefilled, r.images_used, r.media = end, r.images_used + n_images, cache.media
        r.frames_used += n_frames
        r.windows_used += n_windows
        return logits, end - start


def _cache(stores: list[torch.Tensor], rows: slice, lengths: list[int], media: Media | None = None) -> RaggedKVCache:
    """A RaggedKVCache over `rows` of the engine's stores (keys, values[, token-convolution inputs])."""
    k, v, *x = (store[:, rows] for store in stores)
    return RaggedKVCache(k, v, lengths, media, x[0] if x else None)


# --- asyncio -------------------------------------------------------------------------------------


class AsyncEngine:
    """Runs an `Engine`'s steps in a background thread and hands each request's Outputs to the
    asyncio task that awaits them (`generate`). The model never runs on the event loop."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="omnilm-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stopped.is_set():
            if not self.engine.has_work():
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a bug, not a request's input: fail everyone rather than hang them
                self._fail_all(e)
                continue
            self._deliver(outputs)

    def _deliver(self, outputs: list[Output]) -> None:
        """Hand each Output to the queue of the task awaiting it: one call into each event loop per
        step, however many of its requests the step served."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Output]]] = {}
        for out in outputs:
            if (target := self._queues.get(out.request_id)) is not None:
                by_loop.setdefault(target[0], []).append((target[1], out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that loop is closed: nobody waits there any more
                pass

    def _fail_all(self, error: Exception) -> None:
        for request_id in list(self._queues):
            self.engine.abort(request_id)
            self._deliver([Output(request_id, "", [], "error", 0, 0, error=error)])
        try:
            self.engine.step()  # frees the aborted rows
        except Exception:
            pass

    async def generate(self, input_ids: list[int], pixel_values: torch.Tensor | None, params: SamplingParams,
                       pixel_values_videos: torch.Tensor | list[torch.Tensor] | None = None,
                       input_features: torch.Tensor | None = None) -> AsyncIterator[Output]:
        """This request's Outputs until it finishes: one per step, or when the consumer is slower
        than the steps, everything since it last looked, as one. The request is queued on the first
        iteration (its errors raise there); leaving the loop early aborts it."""
        request_id = uuid.uuid4().hex
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = (asyncio.get_running_loop(), queue)
        finished = False
        try:
            self.engine.add_request(input_ids, pixel_values, params, request_id, pixel_values_videos, input_features)
            self._wake.set()
            while not finished:
                out = await queue.get()
                while out.finish_reason is None and not queue.empty():  # the consumer fell behind: catch up
                    out = out.then(queue.get_nowait())
                finished = out.finish_reason is not None
                yield out
        finally:
            del self._queues[request_id]
            if not finished:  # the consumer left (a client gone, a cancelled task): free the row
                self.engine.abort(request_id)
                self._wake.set()


def _put_all(items: list[tuple[asyncio.Queue, Output]]) -> None:
    for queue, out in items:
        queue.put_nowait(out)


__all__ = ["AsyncEngine", "Engine", "EngineStats", "Output", "QueueFull", "SamplingParams"]
