"""omnilm.serve.api against live servers: uvicorn on 127.0.0.1 (a free port) in a background
thread, serving the tiny random checkpoint of conftest's `serve_checkpoint`.

- the official `openai` client gets the same greedy answer streamed and whole;
- a table of over 300 malformed requests (bad JSON, wrong types, bad base64, wrong media types,
  oversize images and bodies, traversal paths, remote URLs without the flag, private addresses
  with it, unknown models, missing keys), each answered with its exact 4xx and OpenAI's error
  shape, after which the servers answer as before and have counted no 500;
- a client that disconnects, streaming or not, has its request aborted on the engine; a full queue
  answers 429 with Retry-After; /health is 503 until the model is loaded; /metrics; the API key;
  the chat page's Content-Security-Policy; `omnilm serve`'s flags.

Three servers: `main` (local images from a folder, small limits), `keyed` (an API key, remote media
allowed) and `slow` (one row, a queue of one, 10 ms per forward pass, for timing-dependent tests).
"""

import asyncio
import base64
import contextlib
import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from conftest import rss_bytes, run_cli
from prometheus_client.parser import text_string_to_metric_families
from test_serve_media import data_url, png, png_header

from omnilm import OmniModel
from omnilm.errors import OmniInputError
from omnilm.serve.api import PAGE, create_app, page_csp
from omnilm.serve.settings import MediaSettings, ServeSettings

MODEL = "tiny"
KEY = "sk-test-0123456789"
QUESTION = "What colour is the circle?"


RED = data_url(png())


def chat(**fields) -> dict:
    """A valid request, with `fields` replaced."""
    return {"model": MODEL, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4, **fields}


def with_images(*urls: str, **fields) -> dict:
    parts = [{"type": "text", "text": QUESTION}] + [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return chat(messages=[{"role": "user", "content": parts}], **fields)


def wait_for(condition, timeout: float = 20.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not come within {timeout} s"
        time.sleep(0.02)


def assert_openai_error(response: httpx.Response, status: int, says: str) -> dict:
    """`response` has `status` and OpenAI's error body, a one-line message holding `says`."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert isinstance(error["message"], str) and "\n" not in error["message"], error
    assert says in error["message"], (says, error["message"])
    assert isinstance(error["type"], str) and error["type"], error
    return error


# --- live servers --------------------------------------------------------------------------------


@dataclass
class Live:
    url: str
    service: Any  # the app's state.service

    def stats(self):
        return self.service.backend.engine.engine.stats()


def settings(checkpoint, media: dict | None = None, **fields) -> ServeSettings:
    return ServeSettings(checkpoint=str(checkpoint), served_model_name=MODEL, media=MediaSettings(**(media or {})),
                         **fields)


@contextlib.contextmanager
def live(server_settings: ServeSettings, load_model=None, ready: bool = True, on_load_error=None):
    """Serve `server_settings` on 127.0.0.1 in a background thread; with `ready`, once /health is 200."""
    load_model = load_model or (lambda: OmniModel.from_pretrained(server_settings.checkpoint).eval())
    app = create_app(server_settings, load_model, on_load_error)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        wait_for(lambda: server.started, what="the server")
        if ready:
            wait_for(lambda: httpx.get(url + "/health").status_code == 200, what="the model")
        yield Live(url, app.state.service)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory) -> Path:
    """The main server's image folder, beside a secret image and with symlinks out of it."""
    root = tmp_path_factory.mktemp("media")
    media = root / "allowed"
    (media / "sub").mkdir(parents=True)
    (media / "red.png").write_bytes(png())
    (media / "big.png").write_bytes(png(300, 300, noise=True))  # over the 200 kB limit
    (media / "notes.txt").write_text("not an image")
    (root / "secret.png").write_bytes(png())
    (media / "escape.png").symlink_to(root / "secret.png")
    (media / "out").symlink_to(root)
    return media


@pytest.fixture(scope="module")
def main(serve_checkpoint, media_dir):
    with live(settings(serve_checkpoint, max_body_bytes=1_000_000,
                       media=dict(allowed_local_media_path=media_dir, max_images=2, max_image_bytes=200_000,
                                  max_image_pixels=1_000_000))) as server:
        yield server


@pytest.fixture(scope="module")
def keyed(serve_checkpoint):
    with live(settings(serve_checkpoint, api_key=KEY, media=dict(allow_remote_media=True, remote_timeout=1.0))) as s:
        yield s


@pytest.fixture(scope="module")
def slow(serve_checkpoint):
    def load():
        model = OmniModel.from_pretrained(serve_checkpoint).eval()
        model.register_forward_pre_hook(lambda module, args: time.sleep(0.01))
        return model
    with live(settings(serve_checkpoint, max_batch=1, max_queue=1), load) as server:
        yield server


@pytest.fixture(scope="module")
def client():
    with httpx.Client(timeout=30) as c:
        yield c


# --- answers ---------------------------------------------------------------------------------------


def test_the_openai_client_gets_the_same_greedy_answer_streamed_and_whole(main):
    client = openai.OpenAI(base_url=main.url + "/v1", api_key="unused", max_retries=0)
    messages = with_images(RED)["messages"]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert choice.message.content and choice.message.content == choice.message.content.lstrip()
    usage = whole.usage
    assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 24
    assert usage.prompt_tokens + usage.completion_tokens == usage.total_tokens

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert chunks[-2].choices[0].finish_reason == choice.finish_reason
    with_usage = [c for c in chunks if c.usage is not None]
    assert with_usage == [chunks[-1]] and chunks[-1].choices == [] and chunks[-1].usage == usage
    assert len({c.id for c in chunks}) == 1


def test_a_raw_stream_ends_with_done_and_carries_no_usage_unasked(main, client):
    with client.stream("POST", main.url + "/v1/chat/completions", json=chat(stream=True)) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert all("usage" not in c and c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["choices"][0]["delta"] == {}


def test_sampling_fields_are_honoured(main, client):
    def ask(**fields) -> dict:
        response = client.post(main.url + "/v1/chat/completions", json=chat(**fields))
        assert response.status_code == 200, response.text
        return response.json()

    greedy = ask(max_completion_tokens=12, temperature=0)
    text = greedy["choices"][0]["message"]["content"]
    assert greedy["usage"]["completion_tokens"] == 12 and greedy["choices"][0]["finish_reason"] == "length"
    # max_completion_tokens wins over max_tokens; a stop string cuts the text before it.
    assert ask(max_completion_tokens=12, max_tokens=2, temperature=0)["choices"][0]["message"]["content"] == text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    stopped = ask(max_tokens=12, temperature=0, stop=stop)["choices"][0]
    assert stopped["finish_reason"] == "stop" and stopped["message"]["content"] == text[:text.index(stop)].lstrip()
    # A seed makes sampling repeatable; unknown fields and a missing model name are accepted.
    seeded = dict(max_tokens=12, temperature=1.0, top_k=50, top_p=0.9, seed=7, user="u", frequency_penalty=0)
    assert ask(**seeded)["choices"] == ask(**seeded)["choices"]
    assert ask(model=None)["model"] == MODEL
    assert ask(max_tokens=30, ignore_eos=True)["usage"]["completion_tokens"] == 30


def test_a_local_image_under_the_allowed_folder_is_read(main, client, media_dir):
    for url in ("red.png", f"file://{media_dir}/red.png"):
        response = client.post(main.url + "/v1/chat/completions", json=with_images(url))
        assert response.status_code == 200, response.text


def test_models_and_metrics(main, client):
    models = client.get(main.url + "/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL]
    assert client.get(main.url + f"/v1/models/{MODEL}").json()["max_model_len"] == 256
    assert client.post(main.url + "/v1/chat/completions", json=chat()).status_code == 200
    response = client.get(main.url + "/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(response.text) for s in family.samples}
    assert samples[("omnilm_requests_running", ())] == 0 and samples[("omnilm_requests_waiting", ())] == 0
    assert samples[("omnilm_prompt_tokens_total", ())] > 0 and samples[("omnilm_generation_tokens_total", ())] >= 4
    assert samples[("omnilm_time_to_first_token_seconds_count", ())] >= 1
    assert samples[("omnilm_chat_requests_total", (("status", "200"),))] >= 1


# --- the malformed-request table -------------------------------------------------------------------


@dataclass
class Case:
    """One bad request and its answer: `status`, and `says` in the message. `json` is the body
    (`content` a raw one instead; `chunked` sends it without a Content-Length). In strings,
    {media} and {outside} stand for the main server's image folder and the folder above it. A
    header set to None is left out."""

    id: str
    status: int
    says: str
    json: Any = None
    content: bytes | None = None
    chunked: bool = False
    headers: dict = field(default_factory=dict)
    server: str = "main"
    method: str = "POST"
    path: str = "/v1/chat/completions"


def _cases() -> list[Case]:
    cases: list[Case] = []

    def add(family: str, status: int, says: str, **kw) -> None:
        cases.append(Case(f"{family}-{len(cases)}", status, says, **kw))

    for body in (b"", b" ", b"{", b"}", b"[", b"nul", b"tru", b"{'model': 'tiny'}", b'{"messages": [}',
                 b'{"messages": [{"role": "user", "content": "hi"}]', b'{"a": 1}{', b'{"messages": [],}',
b"\xff\xfe\x00\x00", b"\x00", '{"a": 1}'.encode("utf-16"), b"[" * 5000,
                 b'{"model": "tiny" "messages": []}'):
        add("bad-json", 400, "not valid JSON", content=body)
    for body in (b"[]", b"null", b"1", b'"x"', b"true", b"3.5"):
        add("not-an-object", 400, "the body: Input should be an object", content=body)
    for name, value in (("temperature", "NaN"), ("top_p", "Infinity"), ("max_tokens", "-Infinity")):  # JSON has none
        add("not-finite", 400, name, content=f'{{"messages": [{{"role": "user", "content": "hi"}}], "{name}": {value}}}'
            .encode())

    wrong = {
        "model": [5, 1.5, True, [], {}],
        "messages": ["hi", 5, {}, [], True, [5], ["hi"], [[]], [None]],
        "max_tokens": ["5", 5.5, 0, -1, True, [], {}, 1e3],
        "max_completion_tokens": ["5", 0, -3, 2.5, False],
        "temperature": ["0", -0.1, 2.5, True, [], {}, 1e9],
        "top_p": [0, 1.5, "0.5", -1, True, []],
        "top_k": [0, -1, 1.5, "3", True],
        "seed": [-1, 2**64, 1.5, "1", True],
        "stop": [5, [5], [""], "", [[]], {"a": 1}, ["x"] * 17, True],
        "n": [0, -1, 1.5, "1", True],
        "stream": ["yes", 1, 0, [], {}],
        "stream_options": [5, "x", [], {"include_usage": "yes"}, True],
        "logprobs": ["x", 1, []],
        "ignore_eos": ["yes", 1, {}],
    }
    for name, values in wrong.items():
        for value in values:
            add(f"wrong-{name}", 400, name, json=chat(**{name: value}))

    user = {"role": "user", "content": QUESTION}
    for messages, says in [
        ([{"content": "hi"}], "messages[0].role: Field required"),
        *(([{"role": role, "content": "hi"}], "messages[0].role") for role in ("tool", "function", "bot", 5, None,
                                                                              "USER")),
        ([{"role": "user"}], "messages[0].content: Field required"),
        *(([{"role": "user", "content": c}], "must be a string or a list of content parts") for c in (5, None, {},
                                                                                                     True)),
        *(([{"role": "user", "content": [p]}], "messages[0].content[0]") for p in (5, "hi", None, [])),
        *(([{"role": "user", "content": [p]}], "messages[0].content[0].type") for p in (
            {"type": "audio"}, {"type": "file"}, {}, {"type": 5}, {"type": "IMAGE_URL"}, {"type": "image"})),
        ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}], "input_audio.data: Field required"),
        ([{"role": "user", "content": [{"type": "text"}]}], "a text part needs a 'text' string"),
        ([{"role": "user", "content": [{"type": "text", "text": None}]}], "a text part needs a 'text' string"),
        ([{"role": "user", "content": [{"type": "text", "text": 5}]}], "messages[0].content[0].text"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "an image_url part needs"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": RED}]}], "content[0].image_url: Input"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "image_url.url: Field required"),
        *(([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": u}}]}], "image_url.url")
          for u in (5, None, [], {"url": RED})),
        ([user, {"role": "system", "content": "be brief"}], "put it first"),
        ([{"role": "system", "content": [{"type": "image_url", "image_url": {"url": RED}}]}, user], "text only"),
        ([{"role": "user", "content": "<image> what is this?"}], "<image> markers"),
    ]:
        add("message", 400, says, json=chat(messages=messages))

    for n in (2, 3, 8, 100):
        add("n", 400, f"n is {n}", json=chat(n=n))
    add("stream-options", 400, "only for streamed answers", json=chat(stream_options={"include_usage": True}))
    add("stream-options", 400, "only for streamed answers", json=chat(stream=False, stream_options={}))
    add("logprobs", 400, "logprobs are not supported", json=chat(logprobs=True))
    for fields in (dict(max_tokens=300), dict(max_tokens=10**6), dict(max_completion_tokens=500),
                   dict(max_tokens=4, messages=[{"role": "user", "content": "red circle " * 300}])):
        add("context", 400, "> the context of 256", json=chat(**fields))

    for media_type in ("text/plain", "application/pdf", "application/octet-stream", "text/html", "video/mp4",
                       "audio/wav", "imagepng", "image", "IMAGE"):
        add("data-type", 400, "not an image type", json=with_images(data_url(png(), media_type)))
    add("data-type", 400, "media type is missing", json=with_images("data:;base64,aGk="))
    for url in ("data:image/png,abc", "data:image/png;charset=utf-8,abc", "data:image/png;base64"):
        add("data-not-base64", 400, "is not base64", json=with_images(url))
    for payload in ("!!!!", "abc", "YQ", "a===", "@@@@@@@@", "%%%%", "aGk=aGk"):
        add("data-bad-base64", 400, "broken base64 payload", json=with_images(f"data:image/png;base64,{payload}"))
    for data, media_type in ((b"hello", "image/png"), (b"\0" * 100, "image/png"), (png()[:40], "image/png"),
                             (b"GIF89a", "image/gif"), (b"\xff\xd8\xff\xe0junk", "image/jpeg"), (b"", "image/png"),
                             (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml"),
                             (png_header(1000, 1000), "image/png")):
        add("data-not-an-image", 400, "cannot read image", json=with_images(data_url(data, media_type)))
    add("data-too-many-bytes", 413, "--max-image-bytes", json=with_images(data_url(png(300, 300, noise=True))))
    for width, height in ((20_000, 20_000), (2_000, 1_000), (1_001, 1_000), (4_000, 4_000), (50_000, 50_000)):
        add("data-too-many-pixels", 413, "--max-image-pixels", json=with_images(data_url(png_header(width, height))))
    add("data-elongated", 400, "more elongated than 200:1", json=with_images(data_url(png_header(10_000, 10))))
    add("data-too-wide", 400, "8192 px a side", json=with_images(data_url(png_header(9_000, 100))))
    for n in (3, 4, 10):
        add("too-many-images", 400, f"hold {n} images", json=with_images(*[RED] * n))

    big = json.dumps(chat(messages=[{"role": "user", "content": "x" * 1_100_000}])).encode()
    huge = json.dumps(chat(messages=[{"role": "user", "content": "x" * 3_000_000}])).encode()
    for body in (big, huge):
        add("body-too-large", 413, f"the body is {len(body)} bytes", content=body)
        add("body-too-large-chunked", 413, "the body is over", content=body, chunked=True)
    for kind in (None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                 "application/jsonx", "json"):
        add("content-type", 415, "Content-Type: application/json", content=json.dumps(chat()).encode(),
            headers={"Content-Type": kind})

    for path in ("../secret.png", "sub/../../secret.png", "%2e%2e/secret.png", "%2E%2E/secret.png",
                 "..%2fsecret.png", "%252e%252e/secret.png", "%25252e%25252e/secret.png", "..\\secret.png",
                 "./../secret.png", "sub/%2e%2e/%2e%2e/secret.png", "file://{media}/../secret.png",
                 "file://{media}/%2e%2e/secret.png", "file://{media}/%252e%252e/secret.png",
                 "file://{media}/.%2e/secret.png", "{media}/../secret.png"):
        add("traversal", 403, "'..' path component", json=with_images(path))
    for path in ("/etc/passwd", "/etc/hostname", "/proc/self/environ", "file:///etc/passwd",
                 "file://localhost/etc/passwd", "{outside}/secret.png", "file://{outside}/secret.png", "escape.png",
                 "out/secret.png", "/", "file:///"):
        add("outside", 403, "outside the folder", json=with_images(path))
    for path, says in (("file://example.com/red.png", "names host"), ("nope.png", "No such file"),
                       ("sub", "Is a directory"), ("notes.txt", "cannot read image"),
                       ("file://{media}/red%00.png", "NUL"), ("red\0.png", "NUL"), ("", "URL is empty")):
        add("local", 400, says, json=with_images(path))
    add("local-too-big", 413, "--max-image-bytes", json=with_images("big.png"))
    for url in ("ftp://example.com/a.png", "gopher://example.com/", "javascript:alert(1)", "ws://example.com/a",
                "C:\\images\\a.png", "mailto:a@example.com", "blob:http://example.com/x", "about:blank"):
        add("scheme", 400, "has scheme", json=with_images(url))
    for url in ("http://example.com/a.png", "https://example.com/a.png", "HTTP://EXAMPLE.COM/A.PNG",
                "http://127.0.0.1:8000/x.png", "http://[::1]/x.png", "https://8.8.8.8/x.png",
                "http://169.254.169.254/latest/meta-data/", "http://localhost/x.png"):
        add("remote-off", 403, "fetches no remote URLs", json=with_images(url))

    for host in ("127.0.0.1:1", "localhost", "127.1", "0x7f000001", "2130706433", "0177.0.0.1", "0.0.0.0",
                 "10.0.0.1", "10.255.255.255", "192.168.1.1", "172.16.0.1", "172.31.255.255", "169.254.169.254",
                 "100.64.0.1", "224.0.0.1", "255.255.255.255", "240.0.0.1", "[::1]", "[::]", "[fe80::1]",
                 "[fc00::1]", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "[::ffff:169.254.169.254]",
                 "[2002:7f00:1::1]", "[64:ff9b::7f00:1]", "[ff02::1]"):
        add("private", 403, "not a public address", json=with_images(f"http://{host}/x.png"), server="keyed")
    add("private", 403, "not a public address", json=with_images("https://127.0.0.1/x.png"), server="keyed")
    for url, says in (("http://", "has no host"), ("http://[::1", "is malformed"), ("http://x:99999/", "is malformed"),
                      ("http://unresolvable.invalid/a.png", "does not resolve"),
                      ("/etc/passwd", "reads no local files"), ("file:///etc/passwd", "reads no local files")):
        add("remote-bad", 400 if "files" not in says else 403, says, json=with_images(url), server="keyed")

    for name in ("gpt-4o", "", "TINY", "tiny ", " tiny", "../tiny", "x" * 1000, "tiny\n", "tin"):
        add("model", 404, "is not served here", json=chat(model=name))
    for name in ("gpt-4", "ti", "tiny/x"):
        add("model", 404, "is not served here", method="GET", path=f"/v1/models/{name}")

    routes = (("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", f"/v1/models/{MODEL}"),
              ("GET", "/metrics"), ("GET", "/nothing"))
    for method, path in routes:
        for authorization in (None, "Bearer wrong", f"Basic {KEY}", "Bearer", f"Token {KEY}", f"Bearer {KEY}x",
                              f"Bearer {KEY[:-1]}"):
            add("key", 401, "API key", json=chat() if method == "POST" else None, method=method, path=path,
                server="keyed", headers={"Authorization": authorization})

    for method, path, status, says in (("GET", "/v1/chat/completions", 405, "use POST"),
                                       ("PUT", "/v1/chat/completions", 405, "use POST"),
                                       ("DELETE", "/v1/models", 405, "use GET"), ("POST", "/v1/models", 405, "use GET"),
                                       ("POST", "/v1/completions", 404, "Not Found"),
                                       ("POST", "/v1/embeddings", 404, "Not Found"), ("GET", "/docs", 404, "Not Found"),
                                       ("GET", "/openapi.json", 404, "Not Found"), ("GET", "/v1", 404, "Not Found")):
        add("route", status, says, method=method, path=path, json=chat() if method in ("POST", "PUT") else None)
    return cases


CASES = _cases()


def _placed(value: Any, places: dict[str, str]) -> Any:
    """`value` with the {media} and {outside} placeholders of its strings filled in."""
    if isinstance(value, str):
        for name, path in places.items():
            value = value.replace("{" + name + "}", path)
        return value
    if isinstance(value, list):
        return [_placed(v, places) for v in value]
    if isinstance(value, dict):
        return {k: _placed(v, places) for k, v in value.items()}
    return value


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_a_malformed_request_gets_its_4xx_in_openai_shape(case, request, client, media_dir):
    server = request.getfixturevalue(case.server)
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {KEY}"} if case.server == "keyed"
                                                      else {}) | case.headers
    content = case.content
    if case.json is not None:
        content = json.dumps(_placed(case.json, {"media": str(media_dir), "outside": str(media_dir.parent)})).encode()
    if case.chunked:
        whole = content
        content = (whole[i:i + 65536] for i in range(0, len(whole), 65536))
    response = client.request(case.method, server.url + case.path, content=content,
                              headers={k: v for k, v in headers.items() if v is not None})
    error = assert_openai_error(response, case.status, case.says)
    if case.status == 401:
        assert response.headers["www-authenticate"] == "Bearer" and error["code"] == "invalid_api_key"


def test_after_the_table_the_servers_answer_and_counted_no_500(main, keyed, client):
    assert len(CASES) >= 300
    answers = []
    for server, headers in ((main, {}), (keyed, {"Authorization": f"Bearer {KEY}"})):
        # Greedy: a sampled answer from this random checkpoint may be empty (an early end of sequence).
        response = client.post(server.url + "/v1/chat/completions", json=with_images(RED, temperature=0),
                               headers=headers)
        assert response.status_code == 200, response.text
        answers.append(response.json()["choices"][0]["message"]["content"])
        metrics = client.get(server.url + "/metrics", headers=headers).text
        assert re.search(r'omnilm_chat_requests_total\{status="4\d\d"\}', metrics)
        assert 'status="5' not in metrics
        stats = server.stats()
        assert stats.running == 0 and stats.waiting == 0
    assert answers[0] and answers[0] == answers[1]  # one checkpoint: the same greedy answer from both


# --- the API key, the page -------------------------------------------------------------------------


def test_the_key_opens_every_route_and_health_and_page_need_none(keyed, client):
    auth = {"Authorization": f"bearer {KEY}"}  # the scheme's case does not matter
    assert client.get(keyed.url + "/v1/models", headers=auth).status_code == 200
    assert client.get(keyed.url + "/metrics", headers=auth).status_code == 200
    assert client.post(keyed.url + "/v1/chat/completions", json=chat(), headers=auth).status_code == 200
    assert client.get(keyed.url + "/health").status_code == 200
    assert client.get(keyed.url + "/").status_code == (200 if PAGE.is_file() else 404)


@pytest.mark.skipif(not PAGE.is_file(), reason="no chat page installed")
def test_the_page_is_served_under_its_content_security_policy(main, client):
    response = client.get(main.url + "/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert response.headers["content-security-policy"] == page_csp(response.text)
    assert response.headers["x-content-type-options"] == "nosniff"


def test_page_csp_allows_exactly_the_inline_blocks():
    html = ("<style>p { color: red }</style><script src='/app.js'></script>"
            "<SCRIPT type=module>go()</SCRIPT><script>\nstart();\n</script>")
    digest = lambda text: "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"
    policy = dict(part.split(" ", 1) for part in page_csp(html).split("; "))
    assert policy["default-src"] == "'self'" and policy["frame-ancestors"] == "'none'"
    assert policy["script-src"] == f"'self' {digest('go()')} {digest(chr(10) + 'start();' + chr(10))}"
    assert policy["style-src"] == f"'self' {digest('p { color: red }')}"
    assert "script-src" not in page_csp("<p>no code</p>")


# --- disconnects, a full queue, loading --------------------------------------------------------------


@contextlib.contextmanager
def raw_request(server: Live, body: dict, chunks: int = 0):
    """A request on a bare socket, closed on leaving; with `chunks`, once that many SSE events came."""
    data = json.dumps(body).encode()
    with socket.create_connection(server.url.removeprefix("http://").split(":")) as sock:
        sock.settimeout(10)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        received = b""
        while received.count(b"data: ") < chunks:
            received += sock.recv(65536)
        yield sock


# Without a system message the prompt is short, and this checkpoint's greedy answer runs to max_tokens.
LONG = dict(messages=[{"role": "system", "content": ""}, {"role": "user", "content": QUESTION}], max_tokens=200,
            temperature=0)


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_has_its_request_aborted(slow, stream):
    aborted = slow.stats().aborted_total
    with raw_request(slow, chat(**LONG, stream=stream), chunks=4 if stream else 0):
        wait_for(lambda: slow.stats().running == 1, what="the request to run")
        running_since = slow.stats().generation_tokens_total
    left = time.monotonic()
    wait_for(lambda: slow.stats().running == 0, timeout=2, what="the abort")
    assert time.monotonic() - left < 1
    assert slow.stats().aborted_total == aborted + 1, "the request finished by itself before the client left"
    assert slow.stats().generation_tokens_total - running_since < 100


def test_sixty_four_streaming_clients_at_once_all_get_their_answer(main, client):
    """64 streams against 8 rows and a queue of 64: no errors, and every client (different prompt
    lengths, with and without images) gets exactly the answer it gets alone."""
    prompts = [with_images(*[RED] * (1 + i % 2), max_tokens=12, temperature=0, stream=True) if i % 2 else
               chat(messages=[{"role": "user", "content": QUESTION + " Tell me." * i}], max_tokens=12,
                    temperature=0, stream=True) for i in range(8)]
    alone = []
    for body in prompts:  # one at a time: what each prompt gets when it has the server to itself
        response = client.post(main.url + "/v1/chat/completions", json=body | {"stream": False})
        alone.append(response.json()["choices"][0]["message"]["content"])
    bodies = [prompts[i % 8] for i in range(64)]

    async def stream(http: httpx.AsyncClient, body: dict) -> str:
        async with http.stream("POST", main.url + "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200, await response.aread()
            events = [line.removeprefix("data: ") async for line in response.aiter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        return "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])

    async def everyone() -> list[str]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as http:
            return await asyncio.gather(*(stream(http, body) for body in bodies))

    texts = asyncio.run(everyone())
    assert texts == [alone[i % 8] for i in range(64)] and len(set(alone)) > 4
    assert main.stats().running == 0 and main.stats().waiting == 0


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads resident memory from /proc (Linux)")
def test_a_hundred_clients_leaving_mid_stream_leave_memory_as_it_was(slow):
    def cycle():
        with raw_request(slow, chat(**LONG, stream=True), chunks=3):
            pass
        wait_for(lambda: slow.stats().running == 0, timeout=2, what="the abort")

    for _ in range(10):  # warm up: allocator pools, the page cache of the first requests
        cycle()
    aborted, before = slow.stats().aborted_total, rss_bytes()
    for _ in range(100):
        cycle()
    after = rss_bytes()
    assert slow.stats().aborted_total == aborted + 100  # every one left mid-stream and was aborted
    assert abs(after - before) <= 0.05 * before, f"resident memory went from {before >> 20} to {after >> 20} MiB"


def test_a_full_queue_answers_429_with_retry_after(slow, client):
    quick = {}
    waiter = threading.Thread(target=lambda: quick.update(response=client.post(
        slow.url + "/v1/chat/completions", json=chat(max_tokens=3))))
    with raw_request(slow, chat(**LONG, stream=True), chunks=2):  # takes the one row
        waiter.start()  # takes the one place in the queue
        wait_for(lambda: slow.stats().waiting == 1, what="the queued request")
        response = client.post(slow.url + "/v1/chat/completions", json=chat())
        error = assert_openai_error(response, 429, "requests are waiting already")
        assert response.headers["retry-after"] == "1" and error["code"] == "queue_full"
    waiter.join(timeout=20)
    assert quick["response"].status_code == 200  # the queued request is served once the row frees
    metrics = client.get(slow.url + "/metrics").text
    assert 'omnilm_chat_requests_total{status="429"} 1.0' in metrics


def test_health_is_503_until_the_model_is_loaded(serve_checkpoint, client):
    release = threading.Event()

    def load():
        release.wait(20)
        return OmniModel.from_pretrained(serve_checkpoint).eval()

    with live(settings(serve_checkpoint), load, ready=False) as server:
        assert_openai_error(client.get(server.url + "/health"), 503, "still loading")
        assert_openai_error(client.post(server.url + "/v1/chat/completions", json=chat()), 503, "still loading")
        assert client.get(server.url + "/v1/models").status_code == 200
        release.set()
        wait_for(lambda: client.get(server.url + "/health").status_code == 200, what="the model")
        assert client.post(server.url + "/v1/chat/completions", json=chat()).status_code == 200


def test_a_model_that_fails_to_load_is_reported(serve_checkpoint, client):
    failures = []

    def load():
        raise OmniInputError("no weights here")

    with live(settings(serve_checkpoint), load, ready=False, on_load_error=failures.append) as server:
        wait_for(lambda: failures, what="the failure")
        assert_openai_error(client.get(server.url + "/health"), 503, "failed to load (no weights here)")
    assert [str(e) for e in failures] == ["no weights here"]


def test_a_degenerate_temperature_answers_and_disturbs_no_one(serve_checkpoint):
    """A temperature so small that logits / temperature overflows samples the argmax (as greedy)."""
    with live(settings(serve_checkpoint)) as server, httpx.Client(timeout=5) as client:
        tiny = client.post(server.url + "/v1/chat/completions", json=chat(temperature=1e-300))
        greedy = client.post(server.url + "/v1/chat/completions", json=chat(temperature=0))
        assert tiny.status_code == greedy.status_code == 200, tiny.text
        assert tiny.json()["choices"][0]["message"] == greedy.json()["choices"][0]["message"]


# --- the command line ------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, says", [
    (["--port", "70000"], "--port is 70000"),
    (["--max-images", "0"], "--max-images is 0"),
    (["--remote-timeout", "0"], "--remote-timeout is 0"),
    (["--allowed-local-media-path", "/nonexistent/folder"], "is not a folder"),
    (["--api-key", " "], "--api-key is empty"),
])
def test_serve_refuses_bad_flags_in_one_line(serve_checkpoint, capsys, flags, says):
    code, out, err = run_cli(["serve", serve_checkpoint, *flags], capsys)
    assert code == 2 and err.strip().splitlines() == [err.strip()] and says in err, err


def test_serve_stops_with_one_error_line_when_the_model_cannot_load(tmp_path, capsys):
    code, out, err = run_cli(["serve", tmp_path / "missing", "--port", "0"], capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: ") and "missing" in last, err


# --- video (an omnilm extension: video_url parts) ----------------------------------------------------


def with_video(*urls: str, question: str = "What colour is the cross?", **fields) -> dict:
    parts = [{"type": "video_url", "video_url": {"url": u}} for u in urls] + [{"type": "text", "text": question}]
    return chat(messages=[{"role": "user", "content": parts}], **fields)


def test_a_video_url_reaches_a_video_model_and_bad_videos_get_their_4xx(tmp_path, client, main):
    """A data:video/mp4 URL and a local file are read as the model's processor samples them: the
    answer is greedy `generate` on the same frames. Too many, too large, not a video, not a video
    type, a text-only part's shape, and a model without video each get their one-line 4xx."""
    pytest.importorskip("av", reason="writing and reading the clip needs PyAV (the [media] extra)")
    from test_video import frames, video_checkpoint

    from omnilm.data import Processor
    from omnilm.data.video import write_video
    from omnilm.infer import generate

    folder = video_checkpoint(tmp_path / "model")
    clips = tmp_path / "clips"
    clips.mkdir()
    write_video(clips / "clip.mp4", frames(12, 96, 96), fps=4.0)  # 3 s
    write_video(clips / "long.mp4", frames(12, 96, 96), fps=1.0)  # 12 s
    mp4 = (clips / "clip.mp4").read_bytes()
    (clips / "notes.mp4").write_text("not a video at all")
    model = OmniModel.from_pretrained(folder).eval()
    processor = Processor.for_model(model, folder)
    batch = processor([{"role": "user", "content": [{"type": "video", "video": clips / "clip.mp4"},
                                                    {"type": "text", "text": "What colour is the cross?"}]}])
    assert batch["pixel_values_videos"].shape[:2] == (1, 8)  # the processor's 8 frames of the clip's 12
    new = generate(model, **batch, max_new_tokens=6)[0].tolist()
    eos = model.config.text.eos_token_id
    expected = processor.decode(new[:new.index(eos)] if eos in new else new)
    server = settings(folder, max_body_bytes=2_000_000, media=dict(allowed_local_media_path=clips, max_video_seconds=5,
                                                                   max_video_bytes=len(mp4) + 10))
    with live(server) as video:
        url = video.url + "/v1/chat/completions"
        for source in (data_url(mp4, "video/mp4"), "clip.mp4"):
            response = client.post(url, json=with_video(source, max_tokens=6, temperature=0))
            assert response.status_code == 200, response.text
            answer = response.json()["choices"][0]["message"]["content"]
            assert answer.strip() == expected.strip() and expected.strip(), (answer, expected)
        for body, status, says in [
            (with_video("clip.mp4", "clip.mp4"), 400, "2 videos, over the server's limit of 1 (--max-videos)"),
            (with_video(data_url(mp4 + b"\0" * 20, "video/mp4")), 413, "(--max-video-bytes)"),
            (with_video(data_url(png())), 400, "not a video type: send data:video/mp4;base64"),
            (with_video("notes.mp4"), 400, "video notes.mp4 cannot be read as video"),
            (with_video("long.mp4"), 413, "video long.mp4 lasts 12 s, over the 5 s"),
            (with_video("../secret.mp4"), 403, "'..' path component"),
            (chat(messages=[{"role": "user", "content": [{"type": "video_url"}]}]), 400, "needs 'video_url'"),
        ]:
            error = assert_openai_error(client.post(url, json=body), status, says)
            assert error["param"] and error["param"].startswith("messages"), error
        assert client.post(url, json=with_video("clip.mp4", max_tokens=2)).status_code == 200  # still serving
    assert_openai_error(client.post(main.url + "/v1/chat/completions", json=with_video(data_url(mp4, "video/mp4"))),
                        400, "this model reads no video")


# --- audio (OpenAI's input_audio parts) ---------------------------------------------------------------


def with_audio(*clips: bytes, question: str = "How many tones are there?", **fields) -> dict:
    parts = [{"type": "input_audio", "input_audio": {"data": base64.b64encode(c).decode(), "format": "wav"}}
             for c in clips] + [{"type": "text", "text": question}]
    return chat(messages=[{"role": "user", "content": parts}], **fields)


def test_input_audio_reaches_an_audio_model_and_bad_audio_gets_its_4xx(tmp_path, client, main):
    """A WAV sent as base64 is heard as the model's processor hears it: the answer is greedy
    `generate` on the same windows. Too many, too large, too long, not base64, not audio, a part
    without its data, and a model that does not hear each get their one-line 4xx."""
    pytest.importorskip("soundfile", reason="writing and reading the clip needs soundfile (the [media] extra)")
    from test_audio_pipeline import audio_model, tone

    from omnilm.data.audio import write_audio
    from omnilm.infer import generate

    model, processor = audio_model(tmp_path / "model")
    write_audio(tmp_path / "a.wav", tone(3.0))
    write_audio(tmp_path / "long.wav", tone(12.0))
    wav, long = (tmp_path / "a.wav").read_bytes(), (tmp_path / "long.wav").read_bytes()
    batch = processor([{"role": "user", "content": [{"type": "audio", "audio": wav},
                                                    {"type": "text", "text": "How many tones are there?"}]}])
    assert batch["input_features"].shape[0] == 2
    new = generate(model, **batch, max_new_tokens=6)[0].tolist()
    eos = model.config.text.eos_token_id
    expected = processor.decode(new[:new.index(eos)] if eos in new else new).strip()
    server = settings(tmp_path / "model", max_body_bytes=2_000_000,
                      media=dict(max_audio_seconds=5, max_audio_bytes=len(long) + 10))
    with live(server) as audio:
        url = audio.url + "/v1/chat/completions"
        response = client.post(url, json=with_audio(wav, max_tokens=6, temperature=0))
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"].strip() == expected and expected
        for body, status, says in [
            (with_audio(wav, wav), 400, "2 audio clips, over the server's limit of 1 (--max-audios)"),
            (with_audio(long + b"\0" * 20), 413, "(--max-audio-bytes)"),
            (with_audio(long), 413, "over the 5 s"),
            (with_audio(b"not audio at all"), 400, "input_audio.data"),
            (chat(messages=[{"role": "user", "content": [{"type": "input_audio",
                                                          "input_audio": {"data": "%%%"}}]}]), 400, "not base64"),
            (chat(messages=[{"role": "user", "content": [{"type": "input_audio"}]}]), 400, "needs 'input_audio'"),
        ]:
            error = assert_openai_error(client.post(url, json=body), status, says)
            assert error["param"] and error["param"].startswith("messages"), error
        assert client.post(url, json=with_audio(wav, max_tokens=2)).status_code == 200  # still serving
    assert_openai_error(client.post(main.url + "/v1/chat/completions", json=with_audio(wav)), 400,
                        "this model hears no audio")
