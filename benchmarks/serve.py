"""Serving under load: `omnilm serve` against `transformers serve` and one-at-a-time `generate`.

Starts each server itself on 127.0.0.1 (a free port, the same torch thread count for both), waits
for it, warms it up, then runs closed-loop streaming clients at each concurrency (1, 4, 8, 16):
every client posts the next request as soon as its previous one ends. All requests are OpenAI chat
completions with one image (a `data:` URL) and a question, from a fixed set of four; greedy, a
fixed number of output tokens. Per server and concurrency it prints output tokens/s (every output
token of the level / the level's wall time), requests/s, time to first token (the first chunk with
text) p50/p99, and errors. The baseline is omnilm's `iter_tokens` (what `generate` runs) in this
process, the same prompts one after another, preprocessing included.

Two more phases, on omnilm only: 64 streaming clients at once (errors counted, 429s included), and
a short request's time to first token idle (median of several) against the same while a long
request decodes.

    # the demo's model (a few ms per token: more requests per level, so each lasts a while)
    python benchmarks/serve.py --model runs/demo/model --waves 4 --min-requests 16 --json demo.json
    # a ~280M-parameter random LLaVA written to --out first (about 10 minutes on 2 idle cores)
    python benchmarks/serve.py --random-llava --out runs/serve-bench/llava-280m --json llava.json
    # a seconds-long smoke run
    python benchmarks/serve.py --model runs/demo/model --quick

Fixed output length: omnilm gets `ignore_eos: true` (vLLM's extension; decoding goes on past an
EOS), transformers `generation_config: {"min_new_tokens": N}` (EOS is masked until N tokens), and
generate `stop_token_ids=[]`. Output tokens are counted from each stream's `usage`
(`stream_options.include_usage`), or from its text chunks where a server sends no usage. The random
LLaVA's output rows are zero for every token without text of its own (special tokens, byte pieces
of a character), so its greedy answers never pick EOS anyway and every token streams text.

The random LLaVA (`--random-llava`): a LLaMA-style decoder of 16 layers, width 1024 (16 heads, 8
key/value heads, MLP 2816, context 1024) and CLIP ViT-B/32's vision tower (224 px, patch 32, width
768, 12 layers): ~280M parameters, 49 tokens per image, the demo's tokenizer (430 tokens). The
tower is ViT-B/32 rather than LLaVA-1.5's 336/14 because on 2 cores a 576- (or 256-) token image
makes every prompt's prefill cost seconds (measured: 4.4 s per request at 224/14 against 0.4 s at
224/32), which is work no batching can share; at 49 tokens the decoding steps, which batching
shares, are most of the time, as in a chat. Weights are N(0, 1/fan_in), norms 1, biases 0.

transformers serve needs accelerate (in omnilm's [dev] extra) for its device placement, and a chat
template: omnilm's `Processor.save_pretrained` writes one (chat_template.jinja, omnilm's Vicuna
prompt); for a `--model` saved before it did, this benchmark serves a temporary folder of links to
the model's files plus the template. It checks that transformers' processor gives the same token
ids as omnilm's for every prompt. transformers 5.x serves LLaVA without continuous batching ("Only
LLMs support continuous batching"): its requests run one at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # this environment's scripts: omnilm, transformers
DEMO_MODEL = ROOT / "runs" / "demo" / "model"

# (question, shapes: (kind, colour, box)) drawn on a 224 px canvas.
PROMPTS = [
    ("What colour is the circle?", [("circle", "red", (30, 40, 110, 120)), ("square", "blue", (130, 110, 200, 180))]),
    ("How many triangles are there?", [("triangle", "green", (20, 20, 80, 80)), ("triangle", "green", (120, 40, 190, 110)),
                                       ("triangle", "green", (60, 130, 130, 200))]),
    ("Where is the yellow square?", [("square", "yellow", (140, 20, 210, 90)), ("circle", "purple", (20, 120, 100, 200))]),
    ("Describe the picture.", [("circle", "blue", (90, 90, 150, 150)), ("square", "red", (10, 10, 60, 60)),
                               ("triangle", "yellow", (150, 140, 215, 210))]),
]

RANDOM_LLAVA = dict(
    text=dict(dim=1024, n_layers=16, n_heads=16, n_kv_heads=8, mlp_dim=2816, max_seq_len=1024),
    vision=dict(image_size=224, patch_size=32, dim=768, n_layers=12, n_heads=12, mlp_dim=3072),
)


# --- prompts and model folders ----------------------------------------------------------------


def draw(shapes) -> bytes:
    """A PNG of coloured shapes on grey."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (224, 224), (200, 200, 200))
    pen = ImageDraw.Draw(image)
    for kind, colour, (x0, y0, x1, y1) in shapes:
        if kind == "circle":
            pen.ellipse((x0, y0, x1, y1), fill=colour)
        elif kind == "square":
            pen.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            pen.polygon([((x0 + x1) // 2, y0), (x0, y1), (x1, y1)], fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    config = folder / "tokenizer_config.json"
    return config.is_file() and "chat_template" in json.loads(config.read_text())


def write_chat_template(folder: Path) -> None:
    from omnilm.data.chat import hf_chat_template
    from omnilm.data.tokenizer import Tokenizer

    (folder / "chat_template.jinja").write_text(hf_chat_template(Tokenizer.from_file(folder).system_prompt))


def served_folder(model: Path, scratch: Path) -> Path:
    """`model`, or where it has no chat template, a folder of links to its files plus one."""
    if has_chat_template(model):
        return model
    folder = scratch / "model"
    folder.mkdir()
    for file in model.iterdir():
        (folder / file.name).symlink_to(file.resolve())
    write_chat_template(folder)
    print(f"{model} has no chat template: serving {folder} (links to its files + chat_template.jinja)")
    return folder


def write_random_llava(out: Path, tokenizer_from: Path, seed: int = 0) -> Path:
    """Write (or reuse, when the recipe is unchanged) the random LLaVA folder described above."""
    import torch

    from omnilm import OmniConfig, OmniModel
    from omnilm.data import Processor
    from omnilm.data.tokenizer import Tokenizer

    recipe = dict(seed=seed, tokenizer=str(tokenizer_from.resolve()), silent_tokens="zero output rows", **RANDOM_LLAVA)
    stamp = out / "serve_benchmark.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == recipe:
        print(f"reusing the random LLaVA in {out}")
        return out
    tokenizer = Tokenizer.from_file(tokenizer_from)
    text = dict(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                pad_token_id=tokenizer.pad_id, **RANDOM_LLAVA["text"])
    config = OmniConfig(text=text, vision=RANDOM_LLAVA["vision"], image_token_id=tokenizer.image_token_id)
    torch.manual_seed(seed)
    model = OmniModel.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:  # matrices, embeddings, the patch convolution: unit-variance outputs
                p.normal_(0, p[0].numel() ** -0.5)
            elif name.endswith("weight"):  # norm gains
                p.fill_(1.0)
            else:
                p.zero_()
        # Tokens with no text of their own (special tokens, and byte pieces of characters) score
        # exactly 0, below the largest of ~300 random logits: never picked. Answers never end
        # early, and every token streams text at once, so the first chunk with text is the first token.
        silent = [i for i in range(tokenizer.vocab_size) if not tokenizer.decode([i]) or "\ufffd" in tokenizer.decode([i])]
        model.lm_head.weight[silent] = 0
    out.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    model.save_pretrained(out)
    Processor.for_model(model, tokenizer=tokenizer).save_pretrained(out)  # with its chat template
    stamp.write_text(json.dumps(recipe, indent=1))
    print(f"wrote a random LLaVA of {model.num_parameters() / 1e6:.0f}M parameters to {out}")
    return out


def user_message(question: str, image) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


def open_png(png: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(png)).convert("RGB")


# --- in process: the prompts checked, and the one-at-a-time baseline -------------------------------


@dataclass
class Result:
    """One request: times in seconds from its start."""

    ok: bool
    ttft: float | None = None
    latency: float = 0.0
    tokens: int = 0
    finish: str | None = None
    text: str = ""
    error: str | None = None
    counted: str = "usage"  # where `tokens` came from: the stream's usage, or its text chunks


@dataclass
class Level:
    server: str
    concurrency: int
    requests: int
    wall_s: float
    tokens_per_s: float
    requests_per_s: float
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    tokens_per_request: float
    errors: int
    error_examples: list[str]
    counted: str

    @classmethod
    def of(cls, server: str, concurrency: int, results: list[Result], wall: float) -> Level:
        ok = [r for r in results if r.ok]
        ttfts = sorted(r.ttft for r in ok if r.ttft is not None)
        tokens = sum(r.tokens for r in ok)
        return cls(server, concurrency, len(results), wall, tokens / wall, len(ok) / wall,
                   percentile(ttfts, 50), percentile(ttfts, 99), tokens / max(1, len(ok)),
                   len(results) - len(ok), sorted({r.error for r in results if r.error})[:3],
                   "chunks" if any(r.counted == "chunks" for r in ok) else "usage")


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between the closest ranks of sorted `values` (numpy's default)."""
    if not values:
        return None
    pos = q / 100 * (len(values) - 1)
    low = int(pos)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (pos - low)


def in_process(folder: Path, prompts, args, n_requests: int) -> dict:
    """Load the model here: check transformers' processor builds omnilm's prompts, read the context
    length, and (unless skipped) time `iter_tokens` over the prompts one after another."""
    import torch
    import transformers as tf

    from omnilm import OmniModel
    from omnilm.data import Processor
    from omnilm.infer.generate import iter_tokens

    torch.set_num_threads(args.threads)
    model = OmniModel.from_pretrained(folder).eval()
    processor = Processor.for_model(model, folder)
    prompt_tokens = [processor(user_message(q, open_png(png)))["input_ids"].shape[1] for q, png in prompts]
    try:
        theirs, same = tf.AutoProcessor.from_pretrained(folder), True
        for question, png in prompts:
            messages = user_message(question, open_png(png))
            ours = processor(messages)
            hf = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                            return_tensors="pt")
            same &= hf["input_ids"][0].tolist() == ours["input_ids"][0].tolist()
            same &= bool((hf["pixel_values"] - ours["pixel_values"]).abs().max() < 1e-4)
        verdict = "builds the same ids and pixels" if same else "DIFFERS from omnilm's (not like for like)"
    except Exception as e:  # a model transformers has no class for: omnilm and generate only
        same, verdict = None, f"fails on this folder ({type(e).__name__}: {str(e)[:100]})"
    print(f"{model.num_parameters() / 1e6:.1f}M parameters; prompts of {prompt_tokens} tokens; "
          f"transformers' processor {verdict}")
    info = dict(parameters=model.num_parameters(), prompt_tokens=prompt_tokens, same_prompts_in_transformers=same,
                max_seq_len=model.config.text.max_seq_len, texts={})
    if "generate" in args.servers:
        def one(i: int, max_tokens: int) -> Result:
            t0 = time.perf_counter()
            question, png = prompts[i % len(prompts)]
            batch = processor(user_message(question, open_png(png)))
            ids, ttft = [], None
            for token in iter_tokens(model, batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                                     max_new_tokens=max_tokens, stop_token_ids=[] if args.ignore_eos else None):
                ttft = time.perf_counter() - t0 if ttft is None else ttft
                ids.append(int(token[0]))
            return Result(True, ttft, time.perf_counter() - t0, len(ids), text=processor.decode(ids))

        for i in range(len(prompts)):  # warm-up
            one(i, args.warmup_tokens)
        t0 = time.perf_counter()
        results = [one(i, args.max_tokens) for i in range(n_requests)]
        info["level"] = Level.of("generate (in process)", 1, results, time.perf_counter() - t0)
        info["texts"] = {i: r.text for i, r in enumerate(results[:len(prompts)])}
        report(info["level"])
    return info


# --- over HTTP -------------------------------------------------------------------------------------


class Server:
    """A server command run in its own session (so its children stop with it), logged to a file."""

    def __init__(self, name: str, argv: list[str], threads: int, log: Path):
        self.name, self.argv, self.log = name, argv, log
        self.env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                        HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")

    def __enter__(self) -> Server:
        print(f"starting {self.name}: {' '.join(self.argv)}  (log: {self.log})", flush=True)
        self.proc = subprocess.Popen(self.argv, env=self.env, cwd=ROOT, stdout=self.log.open("w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait_healthy(self, base: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not healthy after {timeout:.0f} s:\n{self.tail()}")

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def __exit__(self, *exc) -> None:
        for sig, wait in ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(wait)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def stream_chat(client: httpx.AsyncClient, body: dict, first_token: asyncio.Event | None = None) -> Result:
    """Post one streaming chat completion and read it to its end."""
    t0 = time.perf_counter()
    ttft, finish, usage, pieces = None, None, None, []
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode(errors="replace")[:160]
                return Result(False, latency=time.perf_counter() - t0, error=f"HTTP {response.status_code}: {detail}")
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    return Result(False, latency=time.perf_counter() - t0, error=f"stream error: {event['error']}"[:200])
                usage = event.get("usage") or usage
                for choice in event.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        if ttft is None:
                            ttft = time.perf_counter() - t0
                            if first_token is not None:
                                first_token.set()
                        pieces.append(piece)
                    finish = choice.get("finish_reason") or finish
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        return Result(False, latency=time.perf_counter() - t0, error=f"{type(e).__name__}: {e}"[:200])
    latency = time.perf_counter() - t0
    if finish is None:
        return Result(False, ttft, latency, error="the stream ended without a finish_reason")
    tokens = usage.get("completion_tokens") if usage else None
    return Result(True, latency if ttft is None else ttft, latency, tokens if tokens is not None else len(pieces),
                  finish, "".join(pieces), counted="usage" if tokens is not None else "chunks")


def client_for(base: str, connections: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(1800, connect=30),
                             limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections))


async def run_level(base: str, bodies: list[dict], concurrency: int) -> tuple[list[Result], float]:
    """`concurrency` clients, each posting the next of `bodies` when its last request ends."""
    results: list[Result | None] = [None] * len(bodies)
    todo = iter(enumerate(bodies))

    async def client_loop(client: httpx.AsyncClient) -> None:
        for i, body in todo:  # one iterator shared by all: each body goes to one client
            results[i] = await stream_chat(client, body)

    async with client_for(base, concurrency + 2) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        return results, time.perf_counter() - t0


async def ttft_under_load(base: str, short: dict, long: dict, repeats: int) -> dict:
    """A short request's time to first token alone, and while a long request decodes."""
    async with client_for(base, 4) as client:
        idle = [(await stream_chat(client, short)).ttft for _ in range(repeats)]
        started = asyncio.Event()
        long_task = asyncio.create_task(stream_chat(client, long, started))
        await asyncio.wait_for(started.wait(), timeout=600)
        busy, during = [], 0
        for _ in range(repeats):
            result = await stream_chat(client, short)
            busy.append(result.ttft)
            during += not long_task.done()  # the long request was still decoding when this one ended
        long_task.cancel()  # the server aborts it when the connection closes
        await asyncio.gather(long_task, return_exceptions=True)
    idle_p50, busy_p50 = statistics.median(idle), statistics.median(busy)
    return dict(idle_ttft_s=idle, busy_ttft_s=busy, idle_p50_s=idle_p50, busy_p50_s=busy_p50,
                ratio=busy_p50 / idle_p50, measured_while_decoding=during, repeats=repeats,
                long_max_tokens=long["max_tokens"])


def bodies_for(kind: str, model: str, images: list[str], n: int, max_tokens: int, ignore_eos: bool) -> list[dict]:
    bodies = []
    for i in range(n):
        question, url = PROMPTS[i % len(PROMPTS)][0], images[i % len(images)]
        body = dict(model=model, stream=True, stream_options={"include_usage": True}, temperature=0,
                    max_tokens=max_tokens, messages=[{"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]}])
        if ignore_eos and kind == "omnilm":
            body["ignore_eos"] = True
        elif ignore_eos:  # transformers: passed to generate(); EOS is masked until max_tokens
            body["generation_config"] = json.dumps({"min_new_tokens": max_tokens})
        bodies.append(body)
    return bodies


def serve_and_measure(kind: str, folder: Path, images: list[str], args, scratch: Path, info: dict) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    if kind == "omnilm":
        name = "omnilm serve"
        argv = [str(BIN / "omnilm"), "serve", str(folder), "--host", "127.0.0.1", "--port", str(port),
                "--max-batch", str(args.max_batch), *args.omnilm_args.split()]
    else:
        name = "transformers serve"
        argv = [str(BIN / "transformers"), "serve", str(folder), "--device", "cpu", "--host", "127.0.0.1",
                "--port", str(port), "--log-level", "warning", *args.transformers_args.split()]
    out: dict = dict(levels=[], texts={})
    with Server(name, argv, args.threads, scratch / f"{kind}.log") as server:
        t0 = time.perf_counter()
        server.wait_healthy(base, args.start_timeout)
        model = str(folder)
        try:  # the name the server answers to (transformers' /v1/models may fail: keep the folder)
            listed = httpx.get(base + "/v1/models", timeout=10).json()["data"]
            model = listed[0]["id"] if len(listed) == 1 else model
        except Exception:
            pass
        warm = bodies_for(kind, model, images, 4, args.warmup_tokens, args.ignore_eos)
        for concurrency in (1, 4):
            results, _ = asyncio.run(run_level(base, warm[:concurrency], concurrency))
            if not all(r.ok for r in results):
                raise RuntimeError(f"{name} failed its warm-up: {[r.error for r in results if not r.ok]}\n{server.tail()}")
        print(f"{name} ready and warm in {time.perf_counter() - t0:.1f} s", flush=True)
        for concurrency in args.concurrency:
            n = max(args.min_requests, args.waves * concurrency)
            bodies = bodies_for(kind, model, images, n, args.max_tokens, args.ignore_eos)
            results, wall = asyncio.run(run_level(base, bodies, concurrency))
            level = Level.of(name, concurrency, results, wall)
            out["levels"].append(level)
            report(level)
            if concurrency == 1:
                out["texts"] = {i: r.text for i, r in enumerate(results[:len(PROMPTS)]) if r.ok}
        if kind == "omnilm" and args.clients:
            bodies = bodies_for(kind, model, images, args.clients, args.clients_tokens, args.ignore_eos)
            results, wall = asyncio.run(run_level(base, bodies, args.clients))
            out["clients"] = Level.of(name, args.clients, results, wall)
            report(out["clients"], f"{args.clients} streaming clients at once")
        if kind == "omnilm" and args.ttft_repeats:
            long_tokens = min(args.long_tokens, info["max_seq_len"] - max(info["prompt_tokens"]) - 8)
            short = bodies_for(kind, model, images, 1, args.short_tokens, args.ignore_eos)[0]
            long = bodies_for(kind, model, images, 2, long_tokens, args.ignore_eos)[1]
            out["ttft"] = phase = asyncio.run(ttft_under_load(base, short, long, args.ttft_repeats))
            print(f"  short request TTFT: idle {phase['idle_p50_s']:.3f} s, while a {long_tokens}-token request decodes "
                  f"{phase['busy_p50_s']:.3f} s ({phase['ratio']:.2f}x; {phase['measured_while_decoding']} of "
                  f"{phase['repeats']} done while it still ran)", flush=True)
    return out


# --- the report -------------------------------------------------------------------------------------


def fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def report(level: Level, label: str | None = None) -> None:
    print(f"  {label or f'{level.server} c={level.concurrency}'}: {level.requests} requests in {level.wall_s:.1f} s, "
          f"{level.tokens_per_s:.1f} tok/s, TTFT p50 {fmt(level.ttft_p50_s)} s, errors {level.errors}"
          + (f" {level.error_examples}" if level.errors else ""), flush=True)


def table(levels: list[Level]) -> None:
    print(f"| {'server':<22} | conc | reqs | out tok/s | req/s | TTFT p50 s | TTFT p99 s | tok/req | errors |")
    print(f"|{'-' * 24}|-----:|-----:|----------:|------:|-----------:|-----------:|--------:|-------:|")
    for lv in levels:
        print(f"| {lv.server:<22} | {lv.concurrency:4d} | {lv.requests:4d} | {lv.tokens_per_s:9.1f} | "
              f"{lv.requests_per_s:5.2f} | {fmt(lv.ttft_p50_s):>10} | {fmt(lv.ttft_p99_s):>10} | "
              f"{lv.tokens_per_request:7.1f} | {lv.errors:6d} |")


def ratios(levels: list[Level]) -> dict:
    def tok(server: str, concurrency: int) -> float | None:
        return next((lv.tokens_per_s for lv in levels if lv.server == server and lv.concurrency == concurrency), None)

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    o, t, g = "omnilm serve", "transformers serve", "generate (in process)"
    return {
        "omnilm c8 / c1 (target >= 3)": ratio(tok(o, 8), tok(o, 1)),
        "omnilm / transformers at c8 (target >= 2)": ratio(tok(o, 8), tok(t, 8)),
        "transformers c8 / c1": ratio(tok(t, 8), tok(t, 1)),
        "omnilm c1 / generate": ratio(tok(o, 1), tok(g, 1)),
        "transformers c1 / generate": ratio(tok(t, 1), tok(g, 1)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--model", type=Path, help="a LLaVA folder with its tokenizer (default: the demo's model)")
    which.add_argument("--random-llava", action="store_true", help="write the ~280M random LLaVA to --out and use it")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "serve-bench" / "llava-280m",
                    help="where --random-llava writes (reused when unchanged)")
    ap.add_argument("--servers", default="generate,omnilm,transformers",
                    help="comma-separated, from generate, omnilm, transformers")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--waves", type=int, default=1, help="requests per level: max(--min-requests, waves x concurrency)")
    ap.add_argument("--min-requests", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128, help="output tokens per request")
    ap.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                    help="let answers end at EOS (tokens/s then counts what was produced)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads, the same for every server and generate")
    ap.add_argument("--max-batch", type=int, default=16, help="omnilm serve --max-batch")
    ap.add_argument("--clients", type=int, default=64, help="the phase of many clients at once (0: skip)")
    ap.add_argument("--clients-tokens", type=int, default=16, help="output tokens per request in that phase")
    ap.add_argument("--ttft-repeats", type=int, default=5, help="short requests idle and under load (0: skip)")
    ap.add_argument("--short-tokens", type=int, default=8)
    ap.add_argument("--long-tokens", type=int, default=900, help="the long request (capped by the context)")
    ap.add_argument("--warmup-tokens", type=int, default=8)
    ap.add_argument("--start-timeout", type=float, default=300)
    ap.add_argument("--omnilm-args", default="", help="more flags for omnilm serve")
    ap.add_argument("--transformers-args", default="", help="more flags for transformers serve")
    ap.add_argument("--quick", action="store_true", help="a smoke run of seconds: c=1,4, few short requests")
    ap.add_argument("--json", type=Path, help="write every figure here")
    args = ap.parse_args()
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if args.quick:
        args.concurrency, args.waves, args.min_requests, args.max_tokens = [1, 4], 1, 2, 8
        args.clients_tokens, args.ttft_repeats, args.long_tokens, args.warmup_tokens = 2, 2, 300, 2

    started = time.perf_counter()
    images = ["data:image/png;base64," + base64.b64encode(draw(shapes)).decode() for _, shapes in PROMPTS]
    prompts = [(question, draw(shapes)) for question, shapes in PROMPTS]
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        scratch = Path(tmp)
        if args.random_llava:
            source = folder = write_random_llava(args.out, DEMO_MODEL)
        else:
            source = (args.model or DEMO_MODEL).resolve()
            folder = served_folder(source, scratch)
        info = in_process(folder, prompts, args, max(args.min_requests, args.waves))
        gc.collect()  # the model loaded in process goes before the servers start
        levels = [info.pop("level")] if "level" in info else []
        served = {}
        for kind in ("omnilm", "transformers"):
            if kind in args.servers:
                served[kind] = serve_and_measure(kind, folder, images, args, scratch, info)
                levels += served[kind]["levels"]

    import torch
    import transformers

    print(f"\n{source}: {info['parameters'] / 1e6:.1f}M parameters, prompts of {min(info['prompt_tokens'])}-"
          f"{max(info['prompt_tokens'])} tokens, {args.max_tokens} output tokens"
          f"{' (ignore_eos)' if args.ignore_eos else ' (until EOS)'}, greedy; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, {args.threads} threads, omnilm --max-batch {args.max_batch}; "
          f"the run took {time.perf_counter() - started:.0f} s")
    table(levels)
    found = ratios(levels)
    for name, value in found.items():
        if value is not None:
            print(f"  {name}: {value:.2f}x")
    short = [lv for lv in levels if lv.tokens_per_request < args.max_tokens]
    if args.ignore_eos and short:
        print(f"  NOTE: {', '.join(sorted({lv.server for lv in short}))} produced fewer than {args.max_tokens} tokens per "
              "request: answers ended at EOS (the server ignored ignore_eos / min_new_tokens); tok/s counts what came")
    texts = {kind: served[kind]["texts"] for kind in served}
    if info["texts"]:
        for kind, answers in texts.items():
            # U+FFFD: a character cut short, which servers hold back or drop; and the space a server may strip
            agree = sum((answers.get(i) or "").replace("\ufffd", "").strip() == text.replace("\ufffd", "").strip()
                        for i, text in info["texts"].items())
            print(f"  {kind} serve's answers at c=1 equal generate's: {agree} of {len(info['texts'])}"
                  + (" (transformers masks EOS where omnilm decodes past it: answers that reach EOS differ)"
                     if kind == "transformers" and args.ignore_eos and agree < len(info["texts"]) else ""))
    phases = {}
    if "omnilm" in served and "clients" in served["omnilm"]:
        lv = served["omnilm"]["clients"]
        phases["clients"] = asdict(lv)
        print(f"  {lv.requests} streaming clients at once: {lv.errors} errors (target 0), {lv.wall_s:.1f} s, "
              f"{lv.tokens_per_s:.1f} tok/s, TTFT p50 {fmt(lv.ttft_p50_s)} s, p99 {fmt(lv.ttft_p99_s)} s")
    if "omnilm" in served and "ttft" in served["omnilm"]:
        phases["ttft"] = p = served["omnilm"]["ttft"]
        print(f"  short request TTFT idle {p['idle_p50_s']:.3f} s, while a long one decodes {p['busy_p50_s']:.3f} s: "
              f"{p['ratio']:.2f}x (target < 2; {p['measured_while_decoding']} of {p['repeats']} done while it still ran)")
        if p["measured_while_decoding"] < p["repeats"]:
            print("  NOTE: the long request ended before every short one did: its answer stopped early (EOS?), so "
                  "some 'busy' figures were taken with nothing decoding")
    if args.json:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True)
        args.json.write_text(json.dumps(dict(
            model=str(source), commit=commit.stdout.strip() or None, settings={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            torch=torch.__version__, transformers=transformers.__version__, **{k: v for k, v in info.items()
                                                                               if k != "texts"},
            levels=[asdict(lv) for lv in levels], ratios=found, phases=phases,
            answers={"generate": info["texts"], **texts}), indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
