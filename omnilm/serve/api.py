"""An OpenAI-compatible HTTP server over the continuous-batching engine: `omnilm serve CKPT`.

    POST /v1/chat/completions   OpenAI's chat completions, whole or streamed as Server-Sent Events
    GET  /v1/models             the one model served (and GET /v1/models/{name})
    GET  /health                200 once the model is loaded, 503 until then
    GET  /metrics               Prometheus: requests running and waiting, tokens, time to first
                                token, chat requests by status
    GET  /                      the chat page (static/index.html) under a strict Content-Security-Policy

The server listens at once and loads the model in a worker thread. Forward passes run in the
engine's own thread (AsyncEngine); images are fetched and prompts built in worker threads; the
event loop only moves bytes. A chat request is checked in this order, each refusal a 4xx with
OpenAI's error body `{"error": {"message", "type", "param", "code"}}` and a one-line message:

    the API key, with --api-key (every route but /health and the page)      401
    Content-Type application/json                                            415
    the body within --max-body-bytes: its Content-Length and the bytes read  413
    the JSON against ChatRequest (OpenAI's fields, strictly typed; unknown
      fields are accepted and ignored), the message naming the field         400
    the model's name                                                         404
    n = 1, stream_options only with stream, no logprobs                      400
    at most --max-images images, --max-videos videos and --max-audios audio
      clips; each fetched under omnilm.serve.media's rules (data: URLs; local
      files and http(s) only where allowed), audio inline within
      --max-audio-bytes and --max-audio-seconds                              400, 403, 413
    the prompt, built by the model's processor                               400
    prompt + max_tokens within the context, queued on the engine             400; 429 + Retry-After
                                                                             when the queue is full

A client that disconnects, streamed or not, has its request aborted on the engine.

Audio comes as OpenAI's `input_audio` parts (`{"type": "input_audio", "input_audio": {"data": <base64>,
"format": "wav"}}`, any format soundfile reads: wav, flac, mp3, ogg) for models that hear.

Departures from OpenAI: `video_url` parts (`{"type": "video_url", "video_url": {"url": ...}}`, as
vLLM's) for models that read video, their frames sampled as the model's processor samples them;
one choice per request (n > 1 is refused), no logprobs, no tools (tools and
response_format are ignored, as every unknown field); vLLM's extensions top_k and ignore_eos (for
benchmarks: decoding runs to max_tokens). As OpenAI, temperature defaults to 1; max_tokens
defaults to what the context leaves after the prompt.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import re
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException

from omnilm.data import Processor
from omnilm.data.audio import AudioLimits, AudioTooLarge, load_audio
from omnilm.data.video import VideoLimits
from omnilm.errors import OmniInputError
from omnilm.model import OmniModel
from omnilm.serve.engine import AsyncEngine, Engine, EngineStats, Output, QueueFull, SamplingParams
from omnilm.serve.media import MediaError, fetch_image, fetch_video, shown
from omnilm.serve.settings import ServeSettings

log = logging.getLogger("uvicorn.error")  # the server's own log, in its format
PAGE = Path(__file__).parent / "static" / "index.html"
T = TypeVar("T")


# --- errors --------------------------------------------------------------------------------------

# OpenAI's error `type` by status; other 4xx are "invalid_request_error", 5xx "server_error".
_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                429: "rate_limit_error", 503: "service_unavailable"}


class ApiError(Exception):
    """A request refused or failed: answered with `status` and OpenAI's error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        kind = _ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _input_error(e: OmniInputError) -> ApiError:
    """The answer to bad input met past validation: the processor's, SamplingParams' or the engine's."""
    if isinstance(e, QueueFull):
        return ApiError(429, str(e), code="queue_full", headers={"Retry-After": "1"})
    return ApiError(400, str(e))


# --- the request, as OpenAI defines it -----------------------------------------------------------


class _Open(BaseModel):
    """An object of OpenAI's request: the fields this server reads, strictly typed ("5" is no
    integer); unknown fields are accepted and ignored."""

    model_config = ConfigDict(extra="allow", strict=True)


class ImageURL(_Open):
    url: str


class InputAudio(_Open):
    data: str  # the file's bytes, base64
    format: str | None = None  # "wav", "mp3", ...: informative; soundfile reads the format from the bytes


class ContentPart(_Open):
    type: Literal["text", "image_url", "video_url", "input_audio"]
    text: str | None = None
    image_url: ImageURL | None = None
    video_url: ImageURL | None = None  # an omnilm extension (as vLLM's): {"url": ...}, like an image's
    input_audio: InputAudio | None = None

    @model_validator(mode="after")
    def _has_its_field(self) -> ContentPart:
        if self.type == "text" and self.text is None:
            raise PydanticCustomError("text_part", "a text part needs a 'text' string")
        if self.type == "image_url" and self.image_url is None:
            raise PydanticCustomError("image_part", "an image_url part needs 'image_url': {'url': ...}")
        if self.type == "video_url" and self.video_url is None:
            raise PydanticCustomError("video_part", "a video_url part needs 'video_url': {'url': ...}")
        if self.type == "input_audio" and self.input_audio is None:
            raise PydanticCustomError("audio_part", "an input_audio part needs 'input_audio': {'data': <base64>, "
                                                    "'format': 'wav'}")
        return self


def _parts(content: Any) -> Any:
    """A message's content as a list of parts: a string is one text part."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise PydanticCustomError("content", "must be a string or a list of content parts")
    return content


class Message(_Open):
    role: Literal["system", "developer", "user", "assistant"]  # "developer" is OpenAI's newer "system"
    content: Annotated[list[ContentPart], BeforeValidator(_parts)]


def _stop_list(value: Any) -> Any:
    """`stop` as a list: a string is one stop string, null none."""
    return [] if value is None else [value] if isinstance(value, str) else value


class StreamOptions(_Open):
    include_usage: bool | None = False


class ChatRequest(_Open):
    """The body of POST /v1/chat/completions."""

    model: str | None = None  # None: the model served
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name; it wins over max_tokens
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: Annotated[list[Annotated[str, Field(min_length=1)]], BeforeValidator(_stop_list), Field(max_length=16)] = []
    n: int | None = Field(1, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: bool | None = None
    ignore_eos: bool | None = False  # vLLM's extension: decode to max_tokens past the end of the answer


def _parse(body: bytes) -> ChatRequest:
    try:
        return ChatRequest.model_validate_json(body)
    except ValidationError as e:
        raise _invalid(e) from None


def _invalid(error: ValidationError) -> ApiError:
    """The first problem pydantic found, as a 400 naming its field (`messages[0].content[1].type`)."""
    problems = error.errors(include_url=False)
    first = problems[0]
    if first["type"] == "json_invalid":
        return ApiError(400, f"the body is not valid JSON ({first['ctx']['error']}): send a JSON object",
                        code="invalid_json")
    param = "".join(f"[{key}]" if isinstance(key, int) else f".{key}" for key in first["loc"]).lstrip(".") or None
    more = {1: "", 2: " (and 1 more problem)"}.get(len(problems), f" (and {len(problems) - 1} more problems)")
    return ApiError(400, f"{param or 'the body'}: {' '.join(first['msg'].split())}{more}", param=param)


# --- the response ----------------------------------------------------------------------------------


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _usage(out: Output) -> dict:
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens}


def _failure(out: Output) -> ApiError | None:
    """The error of an Output that ended otherwise than "stop" or "length": a 400 when the request's
    own input failed in the engine, a 500 when the engine did."""
    if out.finish_reason in (None, "stop", "length"):
        return None
    if isinstance(out.error, OmniInputError):
        return _input_error(out.error)
    return ApiError(500, f"the generation ended with {out.finish_reason}: {out.error or 'no reason given'}")


@dataclass
class _Reply:
    """One completion as it is built: its id, and its text with the answer's leading whitespace
    dropped (the first token carries the space after "ASSISTANT:"), the same way whether it is
    streamed or not, so both give the same text."""

    model: str
    include_usage: bool = False
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))
    started: bool = False

    def text(self, out: Output) -> str:
        text = out.text if self.started else out.text.lstrip()
        self.started = self.started or bool(text)
        return text

    def completion(self, outputs: list[Output]) -> dict:
        last = outputs[-1]
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "logprobs": None, "finish_reason": last.finish_reason,
                             "message": {"role": "assistant", "content": "".join(map(self.text, outputs))}}],
                "usage": _usage(last)}

    def _chunk(self, choices: list[dict], **extra: Any) -> str:
        return _sse({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                     "choices": choices, **extra})

    def _delta(self, delta: dict, finish: str | None = None) -> str:
        return self._chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}])

    async def events(self, first: Output, outputs: AsyncIterator[Output]) -> AsyncIterator[str]:
        """The stream's Server-Sent Events: the role, the text as it comes, the finish reason, with
        include_usage one chunk of usage (and no choices), then `[DONE]`. Closing this generator
        closes `outputs`, which aborts the request on the engine."""
        async with contextlib.aclosing(outputs):
            yield self._delta({"role": "assistant", "content": ""})
            out = first
            while True:
                if text := self.text(out):
                    yield self._delta({"content": text})
                if out.finish_reason is not None:
                    break
                out = await anext(outputs)
            failure = _failure(out)
            if failure is not None:
                yield _sse(failure.body())
            else:
                yield self._delta({}, out.finish_reason)
                if self.include_usage:
                    yield self._chunk([], usage=_usage(out))
            yield "data: [DONE]\n\n"


class _EventStream(StreamingResponse):
    """A Server-Sent Events response whose generator is closed however the response ends: done,
    failed, or cut short by the client leaving (Starlette then cancels the sending, or a send
    fails), so a stream nobody reads aborts its request on the engine."""

    def __init__(self, events: AsyncIterator[str]):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def _unless_gone(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result, unless the client disconnects first: then `work` is cancelled (so the
    engine request it awaits is aborted) and ApiError 499 raised, for the metrics (nobody reads it)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():  # the client left, or this handler is cancelled
            task.cancel()
            await asyncio.wait((task,))  # its generator must be idle before anyone closes it
    if task not in done:
        raise ApiError(499, "the client disconnected before the answer was ready")
    return task.result()


async def _disconnected(request: Request) -> None:
    """Return once the client has gone: with the body read, the next ASGI message is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# --- metrics -------------------------------------------------------------------------------------


class _EngineCollector:
    """The engine's counts, read at each scrape (zeros while the model loads)."""

    def __init__(self, stats: Callable[[], EngineStats | None]):
        self.stats = stats

    def collect(self):
        s = self.stats() or EngineStats(0, 0, 0, 0, 0)
        yield GaugeMetricFamily("omnilm_requests_running", "requests decoding or prefilling", value=s.running)
        yield GaugeMetricFamily("omnilm_requests_waiting", "requests queued for a slot", value=s.waiting)
        yield CounterMetricFamily("omnilm_prompt_tokens", "prompt tokens prefilled", value=s.prompt_tokens_total)
        yield CounterMetricFamily("omnilm_generation_tokens", "tokens generated", value=s.generation_tokens_total)
        yield CounterMetricFamily("omnilm_requests_aborted", "requests aborted on the engine (their client left)",
                                  value=s.aborted_total)


class _Metrics:
    """One app's Prometheus metrics, in a registry of its own (apps in one process do not collide)."""

    def __init__(self, stats: Callable[[], EngineStats | None]):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(stats))
        self.requests = Counter("omnilm_chat_requests", "chat completion requests answered, by HTTP status",
                                ["status"], registry=self.registry)
        self.ttft = Histogram("omnilm_time_to_first_token_seconds", "seconds from a request's arrival to its "
                              "first generated token", registry=self.registry,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))


# --- the app -------------------------------------------------------------------------------------


@dataclass
class _Backend:
    """What answers requests once the model is loaded: the engine (stepped in its thread; the
    Engine itself is `engine.engine`) and the processor that builds its prompts."""

    engine: AsyncEngine
    processor: Processor


class _Service:
    """The routes and their state: the settings, the backend once loaded, the metrics."""

    def __init__(self, settings: ServeSettings, load_model: Callable[[], OmniModel],
                 on_load_error: Callable[[Exception], None] | None):
        self.settings, self.load_model, self.on_load_error = settings, load_model, on_load_error
        self.backend: _Backend | None = None
        self.load_error: Exception | None = None
        self.created = int(time.time())
        self.metrics = _Metrics(lambda: self.backend.engine.engine.stats() if self.backend else None)
        self.page = PAGE.read_text(encoding="utf-8") if PAGE.is_file() else None

    # --- loading ---------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(self._load())
        try:
            yield
        finally:
            loading.cancel()
            if self.backend is not None:
                await asyncio.to_thread(self.backend.engine.stop)

    async def _load(self) -> None:
        try:
            self.backend = await asyncio.to_thread(self._start_backend)
        except Exception as e:  # whatever it is, nothing can be served: /health says why
            self.load_error = e
            log.error("the model failed to load: %s", e)
            if self.on_load_error is not None:
                self.on_load_error(e)
        else:
            log.info("model %s loaded: serving", self.settings.model_name)

    def _start_backend(self) -> _Backend:
        s = self.settings
        model = self.load_model()
        processor = Processor.for_model(model, s.checkpoint)
        engine = AsyncEngine(Engine(model, processor.tokenizer, max_batch=s.max_batch, max_queue=s.max_queue,
                                    max_len=s.max_model_len, prefill_chunk=s.prefill_chunk))
        engine.start()
        return _Backend(engine, processor)

    def _ready(self) -> _Backend:
        if self.backend is None:
            if self.load_error is not None:
                raise ApiError(503, f"the model failed to load ({self.load_error}); see the server log",
                               code="model_failed")
            raise ApiError(503, "the model is still loading: retry in a few seconds", code="model_loading",
                           headers={"Retry-After": "5"})
        return self.backend

    # --- small routes ----------------------------------------------------------------------------

    async def health(self) -> Response:
        self._ready()
        return JSONResponse({"status": "ok"})

    def _card(self) -> dict:
        card = {"id": self.settings.model_name, "object": "model", "created": self.created, "owned_by": "omnilm"}
        if self.backend is not None:
            card["max_model_len"] = self.backend.engine.engine.max_len
        return card

    async def models(self) -> Response:
        return JSONResponse({"object": "list", "data": [self._card()]})

    async def model(self, name: str) -> Response:
        self._check_model(name)
        return JSONResponse(self._card())

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.settings.model_name:
            raise ApiError(404, f"model {shown(name)!r} is not served here: ask for {self.settings.model_name!r} "
                                "(see GET /v1/models)", param="model", code="model_not_found")

    async def prometheus(self) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def chat_page(self) -> Response:
        return HTMLResponse(self.page, headers={"Content-Security-Policy": page_csp(self.page),
                                                "X-Content-Type-Options": "nosniff"})

    # --- chat completions ------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        arrived = time.perf_counter()
        try:
            response = await self._chat(request, arrived)
        except ApiError as e:
            response = e.response()
        except OmniInputError as e:
            response = _input_error(e).response()
        self.metrics.requests.labels(status=str(response.status_code)).inc()
        return response

    async def _chat(self, request: Request, arrived: float) -> Response:
        backend = self._ready()
        chat = _parse(await _body(request, self.settings.max_body_bytes))
        self._check_model(chat.model)
        _check_supported(chat)
        media = self.settings.media
        for kind, part_type, limit in (("image", "image_url", media.max_images),
                                       ("video", "video_url", media.max_videos),
                                       ("audio", "input_audio", media.max_audios)):
            n = sum(part.type == part_type for m in chat.messages for part in m.content)
            if n > limit:
                noun = "audio clips" if kind == "audio" else f"{kind}s"
                raise ApiError(400, f"the messages hold {n} {noun}, over the server's limit of {limit} "
                                    f"(--max-{kind}s): send fewer", param="messages")
        input_ids, pixel_values, videos, audio = await asyncio.to_thread(self._prompt, backend.processor,
                                                                         chat.messages)
        room = max(1, backend.engine.engine.max_len - len(input_ids))  # the default max_tokens
        params = SamplingParams(max_tokens=chat.max_completion_tokens or chat.max_tokens or room,
                                temperature=1.0 if chat.temperature is None else chat.temperature,
                                top_k=chat.top_k, top_p=chat.top_p, seed=chat.seed, stop=chat.stop,
                                ignore_eos=bool(chat.ignore_eos))
        reply = _Reply(self.settings.model_name, bool(chat.stream_options and chat.stream_options.include_usage))
        async with contextlib.AsyncExitStack() as cleanup:
            outputs = await cleanup.enter_async_context(
                contextlib.aclosing(backend.engine.generate(input_ids, pixel_values, params, videos, audio)))
            first = await _unless_gone(request, anext(outputs))  # the engine's refusals raise here
            self.metrics.ttft.observe(time.perf_counter() - arrived)
            if (failure := _failure(first)) is not None:  # failed at once: an error status, not a stream
                raise failure
            if chat.stream:
                cleanup.pop_all()  # the event stream owns `outputs` from here, and closes them
                return _EventStream(reply.events(first, outputs))
            answer = [first, *await _unless_gone(request, _all(outputs))]
        if (failure := _failure(answer[-1])) is not None:
            raise failure
        return JSONResponse(reply.completion(answer))

    def _prompt(self, processor: Processor, messages: list[Message]) -> tuple[list[int], torch.Tensor | None, Any,
                                                                               torch.Tensor | None]:
        """The prompt's token ids, pixel values, videos' pixel values and audio windows (run in a
        worker thread: it fetches and decodes images, videos and audio)."""
        chat = [{"role": "system" if m.role == "developer" else m.role,
                 "content": [self._part(processor, part, f"messages[{i}].content[{j}]")
                             for j, part in enumerate(m.content)]}
                for i, m in enumerate(messages)]
        batch = processor(chat)
        return (batch["input_ids"][0].tolist(), batch["pixel_values"], batch.get("pixel_values_videos"),
                batch.get("input_features"))

    def _part(self, processor: Processor, part: ContentPart, param: str) -> dict:
        """A content part as the processor takes it, its image, video or audio fetched and decoded."""
        if part.type == "text":
            return {"type": "text", "text": part.text}
        media = self.settings.media
        if part.type == "input_audio":
            samples = self._audio(processor, part.input_audio.data, f"{param}.input_audio.data")
            return {"type": "audio", "audio": samples}
        try:
            if part.type == "image_url":
                return {"type": "image", "image": fetch_image(part.image_url.url, media)}
            if processor.video_frame_len is None:  # before fetching: no bytes move for a model without video
                raise MediaError("this model reads no video: send images or text")
            limits = VideoLimits(max_bytes=media.max_video_bytes, max_seconds=media.max_video_seconds)
            sampling = dataclasses.replace(processor.video, limits=limits)
            return {"type": "video", "video": fetch_video(part.video_url.url, media, sampling.read)}
        except MediaError as e:
            param += f".{part.type}.url"
            raise ApiError(e.status, f"{param}: {e}", param=param) from None

    def _audio(self, processor: Processor, data: str, param: str) -> np.ndarray:
        """An input_audio part's samples: base64 within --max-audio-bytes, decoded under --max-audio-seconds."""
        media = self.settings.media
        if processor.log_mel is None:  # before decoding: nothing is read for a model that does not hear
            raise ApiError(400, f"{param}: this model hears no audio: send text, or what else it reads", param=param)
        if len(data) > 4 * -(-media.max_audio_bytes // 3) + 4:  # base64 of max_audio_bytes, with its padding
            raise ApiError(413, f"{param}: the audio is over the server's limit of {media.max_audio_bytes} bytes "
                                "(--max-audio-bytes): send a shorter clip", param=param)
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{param}: not base64: encode the audio file's bytes with base64",
                           param=param) from None
        if len(raw) > media.max_audio_bytes:
            raise ApiError(413, f"{param}: the audio is {len(raw)} bytes, over the server's limit of "
                                f"{media.max_audio_bytes} (--max-audio-bytes): send a shorter clip", param=param)
        limits = AudioLimits(max_bytes=media.max_audio_bytes, max_seconds=media.max_audio_seconds)
        try:
            return load_audio(raw, limits, processor.log_mel.sampling_rate)
        except AudioTooLarge as e:
            raise ApiError(413, f"{param}: {e}", param=param) from None
        except OmniInputError as e:
            raise ApiError(400, f"{param}: {e}", param=param) from None


async def _body(request: Request, limit: int) -> bytes:
    """The request's JSON body, at most `limit` bytes (as declared, and as read)."""
    kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if kind != "application/json":
        raise ApiError(415, f"the body's Content-Type is {shown(kind) if kind else 'missing'}: send JSON, with "
                            "Content-Type: application/json")

    def too_large(size: str) -> ApiError:
        return ApiError(413, f"the body is {size} the server's limit of {limit} bytes (--max-body-bytes): "
                             "send smaller or fewer images")

    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(f"{declared} bytes, over")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large("over")
    return bytes(body)


def _check_supported(chat: ChatRequest) -> None:
    """Refuse what this server does not do, rather than silently doing something else."""
    if chat.n not in (None, 1):
        raise ApiError(400, f"n is {chat.n}: this server returns one choice per request; send {chat.n} requests "
                            "(with different seeds) instead", param="n")
    if chat.stream_options is not None and not chat.stream:
        raise ApiError(400, "stream_options is only for streamed answers: set stream to true or leave it out",
                       param="stream_options")
    if chat.logprobs:
        raise ApiError(400, "logprobs are not supported by this server: leave logprobs out", param="logprobs")


async def _all(outputs: AsyncIterator[Output]) -> list[Output]:
    return [out async for out in outputs]


# --- the page ------------------------------------------------------------------------------------

_INLINE = re.compile(r"<(script|style)\b([^>]*)>(.*?)</\1\s*>", re.IGNORECASE | re.DOTALL)


def page_csp(html: str) -> str:
    """The Content-Security-Policy for the page `html`: everything from this origin only
    (default-src 'self'), each inline <script> and <style> block allowed by the sha256 of its text
    (so no other inline code runs, injected or not; inline style="" and on...= attributes do not),
    images also from data: and blob: URLs (pictures the user picks, shown before sending), no
    framing by other sites and no <base>."""
    hashes: dict[str, list[str]] = {"script": [], "style": []}
    for tag, attributes, text in _INLINE.findall(html):
        if re.search(r"\bsrc\s*=", attributes, re.IGNORECASE):
            continue  # a script loaded from a URL, which 'self' covers
        digest = base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()
        hashes[tag.lower()].append(f"'sha256-{digest}'")
    policy = ["default-src 'self'", "img-src 'self' data: blob:", "base-uri 'none'", "frame-ancestors 'none'"]
    policy += [f"{tag}-src 'self' {' '.join(found)}" for tag, found in hashes.items() if found]
    return "; ".join(policy)


# --- the API key ---------------------------------------------------------------------------------


class _RequireKey:
    """ASGI middleware: every HTTP request but /health and the chat page (which holds no data and
    asks its user for the key) must carry `Authorization: Bearer KEY`, compared in constant time."""

    OPEN = ("/health", "/")

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.OPEN:
            given = dict(scope["headers"]).get(b"authorization")
            scheme, _, token = (given or b"").partition(b" ")
            if not (scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)):
                message = ("the API key is wrong: send the key the server was started with" if given else
                           "this server needs an API key: send the header Authorization: Bearer KEY")
                await ApiError(401, message, code="invalid_api_key",
                               headers={"WWW-Authenticate": "Bearer"}).response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


# --- building and running ------------------------------------------------------------------------


async def _api_error(request: Request, e: ApiError) -> Response:
    return e.response()


async def _http_error(request: Request, e: HTTPException) -> Response:
    """Starlette's own refusals (no such route, a method not allowed) in OpenAI's shape."""
    hints = {404: ": the routes are /v1/chat/completions, /v1/models, /health and /metrics",
             405: f": use {(e.headers or {}).get('Allow', 'another method')}"}
    hint = hints.get(e.status_code, "")
    return ApiError(e.status_code, f"{request.method} {shown(request.url.path)}: {e.detail}{hint}",
                    headers=e.headers).response()


async def _server_error(request: Request, e: Exception) -> Response:
    """A bug, in OpenAI's shape; the traceback goes to the server log."""
    return ApiError(500, f"internal error ({type(e).__name__}); the server log has the details").response()


def create_app(settings: ServeSettings, load_model: Callable[[], OmniModel],
               on_load_error: Callable[[Exception], None] | None = None) -> FastAPI:
    """The server for `settings`. Once it starts, `load_model` runs in a worker thread (the model is
    moved to its device there); /health answers 503 until the engine runs, and `on_load_error` is
    called if loading fails. The app's `state.service` holds the engine once loaded."""
    service = _Service(settings, load_model, on_load_error)
    app = FastAPI(title="omnilm", lifespan=service.lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.add_api_route("/v1/chat/completions", service.chat_completions, methods=["POST"])
    app.add_api_route("/v1/models", service.models, methods=["GET"])
    app.add_api_route("/v1/models/{name:path}", service.model, methods=["GET"])
    app.add_api_route("/health", service.health, methods=["GET"])
    app.add_api_route("/metrics", service.prometheus, methods=["GET"])
    if service.page is not None:
        app.add_api_route("/", service.chat_page, methods=["GET"])
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _server_error)
    if settings.api_key is not None:
        app.add_middleware(_RequireKey, key=settings.api_key)
    return app


def serve(settings: ServeSettings, load_model: Callable[[], OmniModel]) -> None:
    """`omnilm serve`: listen at once, load the model in the background, answer until interrupted.
    If the model fails to load the server stops and the error is raised."""
    if settings.host not in ("127.0.0.1", "localhost", "::1") and settings.api_key is None:
        warnings.warn(f"listening on {settings.host} without --api-key: anyone who can reach the port can use "
                      "the model")
    server: uvicorn.Server  # assigned below, before the app starts and could call stop

    def stop(error: Exception) -> None:
        server.should_exit = True

    app = create_app(settings, load_model, on_load_error=stop)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, timeout_graceful_shutdown=5))
    server.run()
    if app.state.service.load_error is not None:
        raise app.state.service.load_error
