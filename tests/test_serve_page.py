"""The chat page (omnilm/serve/static/index.html) in a real browser: Debian's chromium, headless,
driven by playwright, against `omnilm serve`'s app on the tiny checkpoint, on a free port.

The tiny model decodes about a thousand tokens a second, faster than a browser can watch an answer
grow and press Stop, so the test slows the engine's steps down (one token per running request per
step) from outside; the server and the page run as they ship.
"""

import base64
import re
import shutil
import threading
import time
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
# Debian's chromium (playwright's own browser download is not needed); /usr/bin even when off PATH.
CHROMIUM = shutil.which("chromium") or shutil.which("/usr/bin/chromium")
if not CHROMIUM:
    pytest.skip("no chromium to drive: apt-get install chromium to run the chat page test", allow_module_level=True)

import httpx  # noqa: E402
import uvicorn  # noqa: E402
from PIL import Image  # noqa: E402

from omnilm import OmniModel  # noqa: E402
from omnilm.serve.api import create_app  # noqa: E402
from omnilm.serve.settings import MediaSettings, ServeSettings  # noqa: E402

STEP_SECONDS = 0.05  # the engine's pace here: 20 tokens a second, a 4.5 s answer unless stopped
MAX_PIXELS = 32 * 32  # the server's --max-image-pixels: the tiny model's image size passes, larger is refused
MAX_TOKENS = 90  # the prompt (system prompt, one image, a question) is ~160 tokens of the model's 256


@pytest.fixture
def server(serve_checkpoint):
    """The app serving the tiny checkpoint on 127.0.0.1, its engine slowed down: (base URL, Engine)."""
    settings = ServeSettings(checkpoint=str(serve_checkpoint), served_model_name="tiny",
                             media=MediaSettings(max_image_pixels=MAX_PIXELS))
    app = create_app(settings, lambda: OmniModel.from_pretrained(serve_checkpoint).eval())
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started or app.state.service.backend is None:
            assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        engine = app.state.service.backend.engine.engine
        step = engine.step

        def slow_step():
            time.sleep(STEP_SECONDS)
            return step()

        engine.step = slow_step
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}", engine
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def page():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.set_default_timeout(10_000)
            yield page
        finally:
            browser.close()


def png(path: Path, side: int) -> Path:
    Image.new("RGB", (side, side), "red").save(path)
    return path


# Records each text the newest answer shows, as the page changes it.
RECORD_ANSWER = """() => {
  window.answerTexts = [];
  new MutationObserver(() => {
    const answers = document.querySelectorAll(".turn.assistant .text");
    const text = answers.length ? answers[answers.length - 1].textContent : "";
    if (text && text !== window.answerTexts.at(-1)) window.answerTexts.push(text);
  }).observe(document.getElementById("log"), { childList: true, subtree: true, characterData: true });
}"""


# Hands the page a PNG the way a drop or a paste does (`kind` is "drop" or "paste").
DROP_OR_PASTE = """([kind, bytes]) => {
  const files = new DataTransfer();
  files.items.add(new File([new Uint8Array(bytes)], `${kind}.png`, { type: "image/png" }));
  const event = kind === "paste" ? new ClipboardEvent("paste", { clipboardData: files, bubbles: true })
                                 : new DragEvent("drop", { dataTransfer: files, bubbles: true, cancelable: true });
  document.getElementById("prompt").dispatchEvent(event);
}"""


def aborted(url: str) -> float:
    metrics = httpx.get(f"{url}/metrics").text
    return float(re.search(r"^omnilm_requests_aborted_total (\S+)$", metrics, re.MULTILINE).group(1))


def test_chat_page_streams_stops_and_shows_errors(server, page, tmp_path):
    url, engine = server
    problems = []  # console errors (CSP violations among them) and uncaught exceptions
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))

    response = page.goto(url)
    assert "default-src 'self'" in response.headers["content-security-policy"]
    page.wait_for_function("() => document.getElementById('model').textContent === 'tiny'")

    # An image by the picker, shown before sending and then inside the conversation.
    page.set_input_files("#file", png(tmp_path / "red.png", 32))
    page.wait_for_selector("#attachments img")
    page.click("summary")
    page.fill("#max_tokens", str(MAX_TOKENS))
    page.fill("#temperature", "0")
    page.evaluate(RECORD_ANSWER)
    page.fill("#prompt", "What colour is the circle?")
    page.press("#prompt", "Enter")
    page.wait_for_function("() => document.querySelector('.turn.user img')?.naturalWidth === 32")

    # The answer grows in place, one streamed piece after another; Stop cuts it on the server.
    page.wait_for_function("() => window.answerTexts.length >= 2")
    page.click("#stop")
    page.wait_for_selector(".turn.assistant .note:text('Stopped.')")
    deadline = time.monotonic() + 5
    while aborted(url) < 1 or engine.stats().running:
        assert time.monotonic() < deadline, f"the server did not cancel the stopped request: {engine.stats()}"
        time.sleep(0.05)
    assert engine.stats().generation_tokens_total < MAX_TOKENS
    texts = page.evaluate("window.answerTexts")
    assert all(b.startswith(a) and len(b) > len(a) for a, b in zip(texts, texts[1:])), texts
    assert page.locator(".turn.assistant .text").text_content() == texts[-1]
    assert page.is_visible("#send") and not page.is_visible("#stop")
    assert problems == []

    # An image the server refuses (over --max-image-pixels): its message, readable, in the turn.
    page.click("#new-chat")
    big = png(tmp_path / "big.png", 48)
    page.set_input_files("#file", big)
    page.wait_for_selector("#attachments img")
    page.fill("#prompt", "And this one?")
    page.press("#prompt", "Enter")
    error = page.locator(".turn.assistant .error").text_content()
    image_url = "data:image/png;base64," + base64.b64encode(big.read_bytes()).decode()
    refusal = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": "And this one?"}]}]})
    assert refusal.status_code == 413
    assert error == refusal.json()["error"]["message"]
    assert "--max-image-pixels" in error
    # The refused message goes back to the composer, to change and send again.
    assert page.input_value("#prompt") == "And this one?" and page.locator("#attachments img").count() == 1

    # Images dropped or pasted join the next message too; each thumbnail can be taken off.
    page.click("#attachments button[aria-label='Remove image 1']")
    small = list(png(tmp_path / "small.png", 32).read_bytes())
    page.evaluate(DROP_OR_PASTE, ["drop", small])
    page.evaluate(DROP_OR_PASTE, ["paste", small])
    page.wait_for_function("() => document.querySelectorAll('#attachments img').length === 2")
    assert [p for p in problems if "status of 413" not in p] == []
