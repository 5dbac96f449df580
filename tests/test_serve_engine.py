"""The continuous-batching engine against one-at-a-time `generate`: the same tokens for prompts
served together (every fusion mode, MoE, chunked prefill), the same draws for seeded sampling
inside a mixed batch, stop strings and ids, aborts that free their row, and the doors' errors."""

import asyncio

import pytest
import torch
from conftest import one_line_error, tiny_checkpoint
from PIL import Image

from omnilm import OmniModel
from omnilm.data import Processor
from omnilm.infer import generate
from omnilm.model.layers import RaggedKVCache
from omnilm.infer.generate import chunk_end
from omnilm.serve.engine import AsyncEngine, Engine, QueueFull, SamplingParams

COLOURS = ["red", "blue", "green", "white", "black"]


def load(folder):
    model = OmniModel.from_pretrained(folder).eval()
    return model, Processor.for_model(model, folder)


@pytest.fixture(scope="module")
def joint(tmp_path_factory):
    return load(tiny_checkpoint(tmp_path_factory.mktemp("joint") / "m"))


def prompts(n: int = 20) -> list[list[dict]]:
    """Text-only and image prompts (one or two images) of different lengths."""
    out = []
    for i in range(n):
        content = [{"type": "text", "text": "What colour is the circle? " * (1 + i % 4)}]
        if i % 3:
            image = Image.new("RGB", (40 + i, 40), COLOURS[i % 5])
            content = [{"type": "image", "image": image}] * (1 + i % 2) + content
        out.append([{"role": "user", "content": content}])
    return out


def alone(model, processor, messages, max_new_tokens: int, seed: int | None = None, **kw) -> list[int]:
    batch = processor(messages)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    new = generate(model, batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                   max_new_tokens=max_new_tokens, generator=generator,
                   pixel_values_videos=batch.get("pixel_values_videos"), input_features=batch.get("input_features"),
                   **kw)[0].tolist()
    stops = {model.config.text.eos_token_id}
    return next((new[:i + 1] for i, t in enumerate(new) if t in stops), new)


def serve(engine: Engine, processor, requests: list[tuple[list[dict], SamplingParams]]) -> list[list[int]]:
    """Queue every request at once and step until all are done; each one's ids."""
    ids = {}
    for i, (messages, params) in enumerate(requests):
        batch = processor(messages)
        ids[engine.add_request(batch["input_ids"][0].tolist(), batch["pixel_values"], params,
                               pixel_values_videos=batch.get("pixel_values_videos"),
                               input_features=batch.get("input_features"))] = i
    got = [[] for _ in requests]
    while engine.has_work():
        for out in engine.step():
            got[ids[out.request_id]] += out.token_ids
            assert len(engine.running) <= engine.max_batch
    return got


# --- the same tokens as one at a time --------------------------------------------------------------


VARIANTS = {"moe": dict(text=dict(n_experts=4, n_experts_per_token=2)), "token_conv": dict(text=dict(token_conv=4))}


@pytest.mark.parametrize("fusion, chunk", [("joint", 512), ("joint", 7), ("early", 512), ("late", 5),
                                           ("cross_attention", 512), ("cross_attention", 9), ("moe", 512),
                                           ("token_conv", 512), ("token_conv", 3)])
def test_twenty_prompts_eight_at_a_time_equal_generate(tmp_path, fusion, chunk):
    """Also a joint decoder with a mixture of experts, and one with token convolutions, whose inputs
    the engine keeps per row beside the keys and values (moved with them, chunked in the scratch row)."""
    extra = VARIANTS.get(fusion, {})
    model, processor = load(tiny_checkpoint(tmp_path / "m", fusion="joint" if extra else fusion, **extra))
    chats = prompts()
    expected = [alone(model, processor, c, 12) for c in chats]
    engine = Engine(model, processor.tokenizer, max_batch=8, prefill_chunk=chunk)
    got = serve(engine, processor, [(c, SamplingParams(max_tokens=12)) for c in chats])
    assert got == expected
    assert len({tuple(g) for g in got}) > 5  # the prompts really get different answers


def test_seeded_sampling_in_a_mixed_batch_equals_each_alone(joint):
    model, processor = joint
    chats = prompts(12)
    settings = [dict(), dict(temperature=0.8, seed=1), dict(temperature=1.3, top_k=5, seed=2),
                dict(temperature=1.0, top_p=0.7, seed=3), dict(temperature=0.6, top_k=20, top_p=0.9, seed=4)]
    requests, expected = [], []
    for i, chat in enumerate(chats):
        s = settings[i % len(settings)]
        requests.append((chat, SamplingParams(max_tokens=10, **s)))
        kw = dict(do_sample=True, temperature=s["temperature"], top_k=s.get("top_k"), top_p=s.get("top_p")) if s else {}
        expected.append(alone(model, processor, chat, 10, seed=s.get("seed"), **kw))
    got = serve(Engine(model, processor.tokenizer, max_batch=4), processor, requests)
    assert got == expected


def test_each_image_is_encoded_once_with_chunked_prefill(joint, monkeypatch):
    model, processor = joint
    encoded = []
    original = model.encode_images
    monkeypatch.setattr(model, "encode_images", lambda px: encoded.append(px.shape[0]) or original(px))
    chats = prompts(6)
    serve(Engine(model, processor.tokenizer, max_batch=3, prefill_chunk=3), processor,
          [(c, SamplingParams(max_tokens=3)) for c in chats])
    n_images = sum(1 for c in chats for part in c[0]["content"] if part["type"] == "image")
    assert sum(encoded) == n_images and n_images == 6


def video_prompts(n: int = 12) -> list[list[dict]]:
    """Prompts with a video of 2 to 7 frames (two videos, or a video and an image, in some), and
    text-only ones."""
    import numpy as np

    out = []
    for i in range(n):
        rng = np.random.default_rng(i)
        clip = lambda frames: rng.integers(0, 255, (frames, 96, 96, 3), dtype=np.uint8)  # noqa: E731
        content = [{"type": "text", "text": "What colour is the cross? " * (1 + i % 3)}]
        if i % 4 != 3:
            content = [{"type": "video", "video": clip(2 + i % 6)}] + content
        if i % 4 == 1:
            content += [{"type": "video", "video": clip(3)}]
        if i % 4 == 2:
            content = [{"type": "image", "image": Image.new("RGB", (50, 40), COLOURS[i % 5])}] + content
        out.append([{"role": "user", "content": content}])
    return out


@pytest.mark.parametrize("chunk, motion", [(512, False), (5, False), (5, True)])
def test_videos_served_together_equal_generate_and_each_frame_is_encoded_once(tmp_path, monkeypatch, chunk, motion):
    """Video frames ride with their request: whole prompts of several rows prefill together, a
    chunked one takes the frames whose tokens each chunk holds (a chunk never cuts a frame), or
    for a motion model, whose frames read the one before, the whole videos it touches."""
    from test_video import video_checkpoint

    folder = video_checkpoint(tmp_path / "m", **(dict(video_pool_mode="concat", video_motion=True) if motion else {}))
    model, processor = load(folder)
    chats = video_prompts()
    expected = [alone(model, processor, c, 8) for c in chats]
    encoded = []
    original = model.video_features
    monkeypatch.setattr(model, "video_features", lambda videos: encoded.append([len(v) for v in videos])
                        or original(videos))
    got = serve(Engine(model, processor.tokenizer, max_batch=4, prefill_chunk=chunk), processor,
                [(c, SamplingParams(max_tokens=8)) for c in chats])
    assert got == expected and len({tuple(g) for g in got}) > 3
    lengths = [len(part["video"]) for c in chats for part in c[0]["content"] if part["type"] == "video"]
    assert sum(map(sum, encoded)) == sum(lengths)
    if motion:  # whole videos only, each in one call
        assert sorted(n for call in encoded for n in call) == sorted(lengths)
    # The doors: frames that do not match the prompt's video tokens, and frames of the wrong size.
    engine = Engine(model, processor.tokenizer)
    batch = processor(chats[0])
    ids, videos = batch["input_ids"][0].tolist(), batch["pixel_values_videos"]
    one_line_error(lambda: engine.add_request(ids, None, SamplingParams()), "video tokens but 0 frames")
    one_line_error(lambda: engine.add_request(ids, None, SamplingParams(), pixel_values_videos=videos[:, :1]),
                   "video tokens but 1 frames")
    one_line_error(lambda: engine.add_request(ids, None, SamplingParams(), pixel_values_videos=videos[..., :48]),
                   "preprocess the videos")


@pytest.mark.parametrize("chunk", [512, 9])
def test_audio_served_together_equals_generate_and_each_window_is_encoded_once(tmp_path, monkeypatch, chunk):
    """Audio windows ride with their request: whole prompts prefill together, a chunked one takes the
    windows whose tokens each chunk holds (a chunk never cuts a window)."""
    pytest.importorskip("soundfile", reason="the audio processor reads through soundfile (the [media] extra)")
    from test_audio_pipeline import audio_model, tone

    model, processor = audio_model(tmp_path / "m")
    chats = [[{"role": "user", "content": [{"type": "audio", "audio": tone(1.0 + i, 200.0 * (1 + i))}] * (1 + i % 2)
               + [{"type": "text", "text": "How many tones are there? " * (1 + i % 3)}]}] for i in range(6)]
    expected = [alone(model, processor, c, 8) for c in chats]
    encoded = []
    original = model.encode_audio
    monkeypatch.setattr(model, "encode_audio", lambda f: encoded.append(len(f)) or original(f))
    got = serve(Engine(model, processor.tokenizer, max_batch=4, prefill_chunk=chunk), processor,
                [(c, SamplingParams(max_tokens=8)) for c in chats])
    assert got == expected and len({tuple(g) for g in got}) > 1
    windows = [processor(c)["input_features"].shape[0] for c in chats]
    assert sum(encoded) == sum(windows)
    engine = Engine(model, processor.tokenizer)
    batch = processor(chats[1])
    ids, features = batch["input_ids"][0].tolist(), batch["input_features"]
    one_line_error(lambda: engine.add_request(ids, None, SamplingParams()), "audio tokens but 0 windows")
    one_line_error(lambda: engine.add_request(ids, None, SamplingParams(), input_features=features[:1]),
                   "audio tokens but 1 windows")
    one_line_error(lambda: engine.add_request(ids, None, SamplingParams(), input_features=features[..., :100]),
                   "build them with the model's processor")


def test_a_text_only_model_prefills_in_chunks(tmp_path):
    """A model without vision (image_seq_len 0: a LLaMA folder) prefilled in chunks answers as
    `generate` does (before 1be8c38 the chunk's image count divided by zero)."""
    from conftest import randomize_
    from omnilm import OmniConfig
    from omnilm.data import train_tokenizer

    tokenizer = train_tokenizer(["What colour is the circle? a red circle and a blue square"] * 4, vocab_size=300)
    config = OmniConfig(text=dict(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                                  eos_token_id=tokenizer.eos_id, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                  mlp_dim=64, max_seq_len=256), vision=None)
    model = randomize_(OmniModel.from_config(config), 0).eval()
    prompts = [tokenizer.encode("What colour is the circle? " * (1 + i)) for i in range(4)]
    engine = Engine(model, tokenizer, max_batch=2, prefill_chunk=8)
    ids = {engine.add_request(p, None, SamplingParams(max_tokens=5, ignore_eos=True)): i for i, p in enumerate(prompts)}
    got = [[] for _ in prompts]
    while engine.has_work():
        for out in engine.step():
            got[ids[out.request_id]] += out.token_ids
    assert all(len(p) > 8 for p in prompts[1:])  # these go through chunked prefill
    assert got == [generate(model, torch.tensor([p]), max_new_tokens=5)[0].tolist() for p in prompts]


def test_a_model_without_video_refuses_frames(joint):
    model, processor = joint
    batch = processor(prompts(1)[0])
    one_line_error(lambda: Engine(model, processor.tokenizer).add_request(
        batch["input_ids"][0].tolist(), None, SamplingParams(), pixel_values_videos=torch.zeros(1, 2, 3, 32, 32)),
        "reads no video")


def test_ragged_rows_see_only_their_own_positions():
    k = torch.zeros(1, 2, 1, 8, 1)
    cache = RaggedKVCache(k, k.clone(), [3, 1])
    assert cache.positions(2).tolist() == [[3, 4], [1, 2]]
    mask = cache.mask(1)[:, 0, 0]  # (B, S): row 1 may not read row 0's longer past
    assert mask.tolist() == [[True] * 4, [True, True, False, False]]
    assert RaggedKVCache(k, k.clone(), [2, 2]).mask(1) is None  # equal lengths: no mask, as generate


def test_chunks_never_split_an_image_or_a_motion_models_video():
    img = 9
    prompt = [1, 2, img, img, img, img, 3, img, img, img, img, 4]  # two images of 4 tokens
    assert chunk_end(prompt, 0, 4, img, 4) == 6  # would cut the first image: to its end
    assert chunk_end(prompt, 0, 2, img, 4) == 2
    assert chunk_end(prompt, 6, 3, img, 4) == 11
    assert chunk_end(prompt, 0, 100, img, 4) == len(prompt)
    back_to_back = [1, img, img, img, img, img, img, img, img, 2]
    assert chunk_end(back_to_back, 0, 6, img, 4) == 9 and chunk_end(back_to_back, 0, 5, img, 4) == 5
    # Items of their own lengths, text between their tokens (a motion model's videos with timestamps).
    video = 7
    prompt = [1, video, video, 2, video, video, 3, video, 4, 5]  # a video of 4 tokens, then one of 1
    assert chunk_end(prompt, 0, 1, video, [4, 1]) == 1  # before the first video: no move
    assert chunk_end(prompt, 0, 2, video, [4, 1]) == 6  # into the first: to its last token
    assert chunk_end(prompt, 0, 6, video, [4, 1]) == 6 and chunk_end(prompt, 6, 2, video, [4, 1]) == 8


# --- finishing --------------------------------------------------------------------------------------


def run_one(engine, processor, chat, params):
    batch = processor(chat)
    rid = engine.add_request(batch["input_ids"][0].tolist(), batch["pixel_values"], params)
    outs = []
    while engine.has_work():
        outs += [o for o in engine.step() if o.request_id == rid]
    return outs


def test_stop_strings_cut_the_text_and_hold_back_partial_matches(joint):
    model, processor = joint
    engine = Engine(model, processor.tokenizer, max_batch=2)
    chat = prompts(2)[1]
    full = "".join(o.text for o in run_one(engine, processor, chat, SamplingParams(max_tokens=30)))
    assert len(full) > 6
    stop = full[4:7]
    outs = run_one(engine, processor, chat, SamplingParams(max_tokens=30, stop=[stop, "never here"]))
    text = "".join(o.text for o in outs)
    assert text == full[:full.find(stop)] and outs[-1].finish_reason == "stop"
    assert [o.finish_reason for o in outs[:-1]] == [None] * (len(outs) - 1)
    ids = [t for o in outs for t in o.token_ids]
    # A stop id ends the request on that token; max_tokens ends it with "length".
    stopped = run_one(engine, processor, chat, SamplingParams(max_tokens=30, stop_token_ids=[ids[2]]))
    assert [t for o in stopped for t in o.token_ids] == ids[:3] and stopped[-1].finish_reason == "stop"
    short = run_one(engine, processor, chat, SamplingParams(max_tokens=2))
    assert len(short) == 2 and short[-1].finish_reason == "length" and short[-1].completion_tokens == 2


def test_ignore_eos_runs_to_max_tokens(joint, monkeypatch):
    model, processor = joint
    chat = prompts(2)[1]
    ids = [t for o in run_one(Engine(model, processor.tokenizer), processor, chat, SamplingParams(max_tokens=20))
           for t in o.token_ids]
    monkeypatch.setattr(model.config.text, "eos_token_id", ids[3])  # a model whose 4th answer token is its eos
    engine = Engine(model, processor.tokenizer)
    assert sum(len(o.token_ids) for o in run_one(engine, processor, chat, SamplingParams(max_tokens=20))) == 4
    past = run_one(engine, processor, chat, SamplingParams(max_tokens=20, ignore_eos=True))
    assert [t for o in past for t in o.token_ids] == ids and past[-1].finish_reason == "length"


def test_abort_frees_the_row_at_the_next_step_and_a_waiting_one_takes_it(joint):
    model, processor = joint
    engine = Engine(model, processor.tokenizer, max_batch=1)
    chats = prompts(2)
    first = engine.add_request(processor(chats[0])["input_ids"][0].tolist(), None, SamplingParams(max_tokens=50))
    engine.step()
    second = engine.add_request(processor(chats[0])["input_ids"][0].tolist(), None, SamplingParams(max_tokens=3))
    engine.step()
    assert engine.stats().running == 1 and engine.stats().waiting == 1  # the one row is taken
    engine.abort(first)
    outs = engine.step()
    assert any(o.request_id == first and o.finish_reason == "abort" for o in outs)
    assert [r.id for r in engine.running] == [second]  # prefilled in the same step
    stats = engine.stats()
    assert stats.aborted_total == 1 and stats.waiting == 0


def test_async_generate_leaving_early_aborts(joint):
    model, processor = joint
    engine = Engine(model, processor.tokenizer, max_batch=2)
    runner = AsyncEngine(engine)
    runner.start()
    ids = processor(prompts(1)[0])["input_ids"][0].tolist()

    async def main():
        pieces = []
        async for out in runner.generate(ids, None, SamplingParams(max_tokens=60)):
            pieces.append(out)
            if len(pieces) == 3:
                break
        for _ in range(100):  # the engine thread frees the row within a step or two
            if engine.stats().running == 0:
                break
            await asyncio.sleep(0.01)
        done = [o async for o in runner.generate(ids, None, SamplingParams(max_tokens=4))]
        return pieces, done

    try:
        pieces, done = asyncio.run(main())
    finally:
        runner.stop()
    assert len(pieces) == 3 and engine.stats().running == 0 and engine.stats().aborted_total == 1
    assert done[-1].finish_reason == "length" and sum(len(o.token_ids) for o in done) == 4


def test_a_slow_consumer_gets_what_it_missed_as_one_output(joint):
    model, processor = joint
    engine = Engine(model, processor.tokenizer)
    runner = AsyncEngine(engine)
    runner.start()
    ids = processor(prompts(1)[0])["input_ids"][0].tolist()
    params = SamplingParams(max_tokens=40, ignore_eos=True)

    async def consume(delay: float) -> list:
        outs = []
        async for out in runner.generate(ids, None, params):
            outs.append(out)
            await asyncio.sleep(delay)
        return outs

    try:
        quick, slow = asyncio.run(consume(0)), asyncio.run(consume(0.05))
    finally:
        runner.stop()
    assert len(slow) < len(quick) and "".join(o.text for o in slow) == "".join(o.text for o in quick)
    assert [t for o in slow for t in o.token_ids] == [t for o in quick for t in o.token_ids]
    assert slow[-1].finish_reason == "length" and slow[-1].completion_tokens == 40


# --- the doors --------------------------------------------------------------------------------------


def test_bad_requests_are_refused_in_one_line(joint):
    model, processor = joint
    engine = Engine(model, processor.tokenizer, max_batch=1, max_queue=2)
    batch = processor(prompts(2)[1])
    ids, pixels = batch["input_ids"][0].tolist(), batch["pixel_values"]
    one_line_error(lambda: engine.add_request(ids, pixels, SamplingParams(max_tokens=200)), "context of 256",
                   "lower max_tokens")
    one_line_error(lambda: engine.add_request(ids, None, SamplingParams()), "8 image tokens but 0 images")
    one_line_error(lambda: engine.add_request(ids, pixels[:, :, :8], SamplingParams()), "preprocess the images")
    one_line_error(lambda: engine.add_request([], None, SamplingParams()), "prompt is empty")
    one_line_error(lambda: SamplingParams(temperature=-1), "temperature")
    one_line_error(lambda: SamplingParams(top_p=0), "top_p")
    one_line_error(lambda: SamplingParams(stop=[""]), "non-empty strings")
    engine.add_request(ids, pixels, SamplingParams())
    engine.add_request(ids, pixels, SamplingParams())
    with pytest.raises(QueueFull, match="2 requests are waiting"):
        engine.add_request(ids, pixels, SamplingParams())
