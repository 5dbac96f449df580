"""Chats -> prompt text, with the Vicuna v1 template that LLaVA-1.5 was tuned with.

    "{system} USER: {user} ASSISTANT: {answer}</s>USER: {user} ASSISTANT:"

(haotian-liu/LLaVA `conv_vicuna_v1`: sep " " after a user turn, sep2 "</s>" after an
answer). Messages come in three dialects, all normalised to one form first: transformers
chat messages, OpenAI `image_url` parts, and LLaVA JSON (`{"from": "human", "value": ...}`).
Each image part becomes an `<image>` marker followed by a newline, where it stands, and each
video part (transformers' `{"type": "video"}`, or `video_url` as vLLM extends OpenAI's parts) a
`<video>` marker and a newline, each audio part (transformers' `{"type": "audio"}`, OpenAI's
`input_audio` with base64 data, or `audio_url`) an `<audio>` marker and a newline.
"""

from __future__ import annotations

import base64
import binascii
import json

from omnilm.data.tokenizer import AUDIO_TOKEN, IMAGE_TOKEN, VIDEO_TOKEN
from omnilm.errors import OmniInputError

DEFAULT_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
_ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
MARKERS = {"image": IMAGE_TOKEN, "video": VIDEO_TOKEN, "audio": AUDIO_TOKEN}  # what each media part becomes


def normalize_messages(messages: list[dict]) -> list[dict]:
    """Bring any supported message dialect to `[{"role": "system"|"user"|"assistant",
    "content": [{"type": "text", "text": str} | {"type": "image", "image": source | None}
    | {"type": "video", "video": source | None} | {"type": "audio", "audio": source | None}]}]`.

    `image` is anything `load_image` accepts, `video` anything `read_video` does, `audio` anything
    `load_audio` does (OpenAI's base64 `input_audio` data becomes its bytes), or None for a
    placeholder whose media is passed separately (as in transformers' `{"type": "image"}`).
    Literal `<image>`, `<video>` and `<audio>` markers in text are kept as text; they count as slots all the same.
    """
    if not isinstance(messages, list) or not messages:
        raise OmniInputError("a chat must be a non-empty list of messages like {'role': 'user', 'content': '...'}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise OmniInputError(f"message {i} is a {type(message).__name__}, not a dict with 'role' and 'content'")
        # LLaVA JSON uses from/value; everyone else role/content.
        keys = ("from", "value") if "from" in message else ("role", "content")
        role, content = message.get(keys[0]), message.get(keys[1])
        if role not in _ROLES:
            raise OmniInputError(
                f"message {i} has role {role!r}: use system, user or assistant (or LLaVA's human, gpt)"
            )
        role = _ROLES[role]
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            parts = [_normalize_part(part, i) for part in content]
        else:
            raise OmniInputError(
                f"message {i} has content of type {type(content).__name__}: use a string or a list of parts"
            )
        if role == "system" and (i > 0 or any(p["type"] != "text" for p in parts)):
            raise OmniInputError(f"message {i} is a system message: put it first, and with text only")
        out.append({"role": role, "content": parts})
    return out


def _normalize_part(part, i: int) -> dict:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return {"type": "text", "text": part["text"]}
    if kind == "image":
        source = next((part[key] for key in ("image", "path", "url") if part.get(key) is not None), None)
        return {"type": "image", "image": source}
    if kind in MARKERS:
        source = next((part[key] for key in (kind, "path", "url") if part.get(key) is not None), None)
        return {"type": kind, kind: source}
    if kind in ("image_url", "video_url", "audio_url"):  # OpenAI: {"image_url": {"url": ...}}, or the URL string
        url = part.get(kind)
        media = kind.removesuffix("_url")
        return {"type": media, media: url.get("url") if isinstance(url, dict) else url}
    if kind == "input_audio":  # OpenAI: {"input_audio": {"data": base64, "format": "wav"}}
        return {"type": "audio", "audio": _audio_bytes(part.get("input_audio"), i)}
    raise OmniInputError(
        f"message {i} has a content part {str(part)[:60]}: use {{'type': 'text', 'text': ...}}, "
        "{'type': 'image', 'image': ...}, {'type': 'image_url', 'image_url': {'url': ...}} or the same for a video "
        "or an audio, or {'type': 'input_audio', 'input_audio': {'data': base64, 'format': 'wav'}}"
    )


def _audio_bytes(payload, i: int) -> bytes:
    """The file bytes of an OpenAI `input_audio` part's base64 `data` (its `format` is read from
    the bytes themselves)."""
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, str) or not data:
        raise OmniInputError(f"message {i} has an input_audio part without data: give {{'input_audio': {{'data': "
                             "<the file, base64>, 'format': 'wav'}}")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise OmniInputError(f"message {i}'s input_audio data is not base64: encode the audio file's bytes with "
                             "base64 (RFC 4648)") from None


def render_turns(
    messages: list[dict], add_generation_prompt: bool = True, system: str | None = None
) -> list[tuple[str, bool]]:
    """The prompt as `(text, is_assistant_answer)` segments, alternating; their concatenation
    is `render_chat`'s text. Answer segments are what instruction tuning supervises: the
    answer and its closing `</s>`, not the `ASSISTANT: ` before it (as in LLaVA)."""
    return _turns(normalize_messages(messages), add_generation_prompt, system)


def _turns(messages: list[dict], add_generation_prompt: bool, system: str | None) -> list[tuple[str, bool]]:
    system = DEFAULT_SYSTEM if system is None else system  # None: Vicuna's, as LLaVA-1.5
    if messages[0]["role"] == "system":
        system, messages = _text(messages[0]), messages[1:]
    segments: list[tuple[str, bool]] = []

    def add(text: str, is_answer: bool) -> None:
        if segments and segments[-1][1] == is_answer:
            segments[-1] = (segments[-1][0] + text, is_answer)
        else:
            segments.append((text, is_answer))

    if system:  # "" leaves the system message out: the prompt starts at "USER: "
        add(system + " ", False)
    for message in messages:
        if message["role"] == "user":
            add(f"USER: {_text(message)} ", False)
        else:
            add("ASSISTANT: ", False)
            add(_text(message) + "</s>", True)
    if add_generation_prompt and (not messages or messages[-1]["role"] == "user"):
        add("ASSISTANT:", False)
    return segments


def render_chat(
    messages: list[dict], add_generation_prompt: bool = True, system: str | None = None
) -> tuple[str, list]:
    """Render a chat to `(prompt_text, images)`: each image part becomes `"<image>\\n"` where it
    stands (a video part `"<video>\\n"`: `chat_videos` lists those), and `images` lists the sources of
    image parts in order (placeholders excluded).
    A leading system message replaces `system`. With `add_generation_prompt` and a chat
    that does not end with an answer, the text ends with the open turn `ASSISTANT:`."""
    messages = normalize_messages(messages)
    text = "".join(segment for segment, _ in _turns(messages, add_generation_prompt, system))
    return text, _sources(messages, "image")


def chat_videos(messages: list[dict]) -> list:
    """The sources of a chat's video parts, in order (placeholders excluded): `render_chat`'s images,
    for videos."""
    return _sources(normalize_messages(messages), "video")


def chat_audios(messages: list[dict]) -> list:
    """The sources of a chat's audio parts, in order (placeholders excluded)."""
    return _sources(normalize_messages(messages), "audio")


def _sources(messages: list[dict], kind: str) -> list:
    parts = [part for message in messages for part in message["content"]]
    return [p[kind] for p in parts if p["type"] == kind and p[kind] is not None]


def hf_chat_template(system: str | None = None) -> str:
    """`render_chat` as a Jinja chat template, for transformers' `apply_chat_template` (and so for
    `transformers serve`): the same text, after the BOS token that omnilm's `encode` adds. `system`
    as in `render_chat` (None: Vicuna's; a leading system message replaces it)."""
    default = DEFAULT_SYSTEM if system is None else system
    return (
        "{%- macro text(content) -%}"
        "{%- if content is string -%}{{ content }}{%- else -%}{%- for part in content -%}"
        "{%- if part.type == 'text' -%}{{ part.text }}"
        "{%- elif part.type in ('image', 'image_url') -%}{{ '" + IMAGE_TOKEN + "\\n' }}"
        "{%- elif part.type in ('video', 'video_url') -%}{{ '" + VIDEO_TOKEN + "\\n' }}"
        "{%- elif part.type in ('audio', 'audio_url', 'input_audio') -%}{{ '" + AUDIO_TOKEN + "\\n' }}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{%- endmacro -%}"
        "{%- set system = " + json.dumps(default) + " -%}"
        "{%- if messages and messages[0].role == 'system' -%}"
        "{%- set system = text(messages[0].content) -%}{%- set messages = messages[1:] -%}"
        "{%- endif -%}"
        "{{ bos_token }}{%- if system -%}{{ system + ' ' }}{%- endif -%}"
        "{%- for message in messages -%}"
        "{%- if message.role == 'user' -%}{{ 'USER: ' + text(message.content) + ' ' }}"
        "{%- else -%}{{ 'ASSISTANT: ' + text(message.content) + '</s>' }}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt and (not messages or messages[-1].role == 'user') -%}{{ 'ASSISTANT:' }}"
        "{%- endif -%}"
    )


def _text(message: dict) -> str:
    return "".join(p["text"] if p["type"] == "text" else MARKERS[p["type"]] + "\n" for p in message["content"])
