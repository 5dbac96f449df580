"""`omnilm inspect attention`: recorded attention is SDPA's, rollout is Abnar & Zuidema's (checked
by hand), the command writes its maps for images, video frames and audio windows, and bad input
gets one line."""

import json
import random

import numpy as np
import pytest
import torch
from conftest import cli_error, randomize_, run_cli
from PIL import Image

from omnilm import OmniModel
from omnilm.config import TextConfig
from omnilm.data import Processor, train_tokenizer
from omnilm.data.shapeworld import ask, generate_scene, subject
from omnilm.interpret.attention import gradient_rollout, rollout
from omnilm.interpret.grounding import grounding_score, on_cell
from omnilm.model.layers import Attention, KVCache, decoder_mask, record_attention, rope_cos_sin

TEXT = dict(vocab_size=300, n_layers=2, dim=32, n_heads=4, n_kv_heads=2, mlp_dim=64)
VISION = dict(n_layers=1, dim=32, n_heads=4, mlp_dim=64)


# --- the aggregates, by hand ------------------------------------------------------------------


def test_rollout_of_a_hand_built_two_layer_example():
    # Three tokens, two heads. Layer 1: head a sends every token to token 0, head b to itself:
    # mean [[1,0,0],[.5,.5,0],[.5,0,.5]]; + I, rows / 2: [[1,0,0],[.25,.75,0],[.25,0,.75]].
    # Layer 2: head a sends token 2 to token 1, head b splits .5/.5 with the token before:
    # mean [[1,0,0],[.25,.75,0],[0,.75,.25]]; + I, rows / 2: [[1,0,0],[.125,.875,0],[0,.375,.625]].
    # Rollout = layer 2 @ layer 1: row 1 = .125 [1,0,0] + .875 [.25,.75,0] = [.34375, .65625, 0];
    # row 2 = .375 [.25,.75,0] + .625 [.25,0,.75] = [.25, .28125, .46875].
    layer1 = torch.tensor([[[1, 0, 0], [1, 0, 0], [1, 0, 0]], [[1, 0, 0], [0, 1, 0], [0, 0, 1]]], dtype=torch.float)
    layer2 = torch.tensor([[[1, 0, 0], [0, 1, 0], [0, 1, 0]], [[1, 0, 0], [.5, .5, 0], [0, .5, .5]]])
    expected = torch.tensor([[1, 0, 0], [.34375, .65625, 0], [.25, .28125, .46875]], dtype=torch.float64)
    assert torch.allclose(rollout([layer1, layer2]), expected, atol=1e-12)


def test_gradient_rollout_of_a_hand_built_two_layer_example():
    # Layer 1: grad * attention is [[0,0],[1,-.5]] (head a, clamped to [[0,0],[1,0]]) and [[0,0],[.2,.8]]
    # (head b): mean [[0,0],[.6,.4]], so R = I + it = [[1,0],[.6,1.4]]. Layer 2: attention I, gradient
    # 1 everywhere: mean I, so R = R + I R = [[2,0],[1.2,2.8]].
    layer1 = torch.tensor([[[1, 0], [.5, .5]], [[1, 0], [.2, .8]]])
    grad1 = torch.tensor([[[0, 0], [2, -1]], [[0, 0], [1, 1]]], dtype=torch.float)
    layer2, grad2 = torch.eye(2).expand(2, 2, 2), torch.ones(2, 2, 2)
    expected = torch.tensor([[2, 0], [1.2, 2.8]], dtype=torch.float64)
    assert torch.allclose(gradient_rollout([layer1, layer2], [grad1, grad2]), expected, atol=1e-12)


def test_a_peak_is_on_the_cell_that_holds_its_patch_centre():
    grid = torch.zeros(3, 3)
    grid[0, 2] = 1
    assert on_cell(grid, 2) and not on_cell(grid, 1)
    fine = torch.zeros(6, 6)
    fine[5, 2] = 1  # rows 4-5 and columns 2-3 of a 6 x 6 grid are cell (2, 1)
    assert on_cell(fine, 7) and not on_cell(fine, 8)


# --- recorded probabilities are the ones SDPA used --------------------------------------------


@pytest.mark.parametrize("T, S, padded", [(5, 5, False), (3, 8, False), (1, 8, False), (5, 5, True)])
def test_recorded_probabilities_reproduce_the_attention_output(T, S, padded):
    """GQA (4 query heads on 2 key/value heads), RoPE, a KV cache holding S - T earlier positions,
    and a padding mask: recording computes probabilities @ values, which must be SDPA's output."""
    torch.manual_seed(0)
    cfg = TextConfig(**TEXT)
    attn = Attention(cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, bias=False)
    x = torch.randn(2, S, cfg.dim)
    mask = torch.ones(2, S, dtype=torch.long)
    if padded:
        mask[1, :2] = 0
    cache = KVCache(1, 2, cfg.n_kv_heads, cfg.head_dim, S)
    args = (x[:, S - T:], rope_cos_sin(cfg, torch.arange(S - T, S).expand(2, -1)),
            decoder_mask(mask if padded else None, T, S - T))
    with torch.no_grad():
        if S > T:  # the earlier positions, in the cache
            attn(x[:, :S - T], rope_cos_sin(cfg, torch.arange(S - T).expand(2, -1)), cache=cache)
            cache.advance(S - T)
        expected = attn(*args, is_causal=True, cache=cache)
        with record_attention(attn) as records:
            got = attn(*args, is_causal=True, cache=cache)
    probs = records[""][0]
    assert probs.shape == (2, cfg.n_heads, T, S) and attn.recorded is None
    # The output rebuilt from the probabilities and the cached values (each serving 2 query heads).
    values = cache.v[0].repeat_interleave(cfg.n_heads // cfg.n_kv_heads, dim=1)  # (B, H, S, hd)
    rebuilt = attn.o_proj((probs @ values).transpose(1, 2).flatten(2))
    assert torch.allclose(rebuilt, expected, atol=1e-5), (rebuilt - expected).abs().max()
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(probs.sum(-1), torch.ones(2, cfg.n_heads, T))
    assert not probs[..., torch.arange(S) > torch.arange(S - T, S)[:, None]].any()  # nothing from the future
    if padded:
        assert not probs[1, :, 2:, :2].any()


def test_recording_a_whole_model_changes_no_logit_and_matches_cached_decoding():
    """A decoder with token convolutions and GQA: the same logits with recording on, and the last
    token's recorded row in one full forward equals the row recorded when decoding it on the cache."""
    torch.manual_seed(0)
    model = randomize_(OmniModel.from_preset("tiny", text={**TEXT, "token_conv": 3}, vision=VISION).eval())
    ids = torch.randint(10, 300, (1, 20))
    with torch.no_grad():
        plain = model(ids).logits
        with record_attention(model.llm) as full:
            recorded = model(ids).logits
        cache = model.new_cache(1, 20)
        model(ids[:, :19], cache=cache)
        with record_attention(model.llm) as step:
            last = model(ids[:, 19:], cache=cache).logits
    assert torch.allclose(recorded, plain, atol=1e-4) and torch.allclose(last, plain[:, -1:], atol=1e-4)
    for name in ("layers.0.self_attn", "layers.1.self_attn"):
        assert torch.allclose(step[name][0][0, :, -1], full[name][0][0, :, -1], atol=1e-5)
    assert all(m.recorded is None for m in model.modules() if isinstance(m, Attention))


# --- the command ------------------------------------------------------------------------------


def checkpoint(folder, **config):
    """A tiny random model with its tokenizer, that never stops early (no stop token): every
    answer is --max-new-tokens long."""
    tokenizer = train_tokenizer(["What colour is the circle? red green blue tones"] * 4, vocab_size=300,
                                video=True, audio=True, system_prompt="Answer.")
    model = OmniModel.from_preset("tiny", **{"text": {**TEXT, "eos_token_id": None}, "vision": VISION, **config})
    randomize_(model.eval())
    if model.audio is not None:
        model.audio.reset_positions()
    model.save_pretrained(folder)
    Processor.for_model(model, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("attention")
    checkpoint(root / "model")
    Image.new("RGB", (96, 96), "white").save(root / "a.png")
    return root


def test_the_command_writes_maps_and_numbers_for_each_answer_token(world, capsys):
    code, out, err = run_cli(["inspect", "attention", world / "model", "--image", world / "a.png",
                              "What colour is the circle?", "--out", world / "maps", "--max-new-tokens", "2"], capsys)
    assert code == 0, err
    assert "| 0 |" in out and "| 1 |" in out and "rollout peak" in out
    for k in (0, 1):
        for name in (f"attention-{k}.png", f"heads-{k}.png"):
            assert Image.open(world / "maps" / name).size[0] > 100
    numbers = json.loads((world / "maps" / "attention.json").read_text())
    assert [s["kind"] for s in numbers["spans"]] == ["image"] and numbers["spans"][0]["grid"] == [3, 3]
    token = numbers["tokens"][0]
    assert np.array(token["layers"]).shape == (1, TEXT["n_layers"], TEXT["n_heads"], 3, 3)  # span, L, H, grid
    assert {"rollout", "gradient", "last_layer"} <= set(token) and np.array(token["rollout"]).shape == (1, 3, 3)
    # The last layer's head mean is the mean of the per-head numbers beside it.
    assert np.allclose(np.array(token["layers"])[0, -1].mean(0), token["last_layer"][0], atol=1e-5)
    assert numbers["tokens"][1]["query_position"] == token["query_position"] + 1
    assert all(0 <= v <= 1 for v in np.ravel(token["layers"]))


def test_video_frames_and_audio_windows_get_maps_too(tmp_path, capsys):
    pytest.importorskip("soundfile", reason="writing the audio file needs soundfile (the [media] extra)")
    from omnilm.data.audio import write_audio

    folder = checkpoint(tmp_path / "model", vision={**VISION, "patch_size": 16}, video_token_id=4, audio_token_id=5,
                        audio=dict(n_mels=80, dim=32, n_layers=1, n_heads=4, mlp_dim=64, max_source_positions=100))
    (tmp_path / "frames").mkdir()
    for i in range(3):
        Image.new("RGB", (96, 96), (80 * i, 0, 0)).save(tmp_path / "frames" / f"{i}.png")
    write_audio(tmp_path / "a.wav", 0.3 * np.sin(np.arange(40000) / 16000 * 2 * np.pi * 440))
    code, out, err = run_cli(["inspect", "attention", folder, "How many tones?", "--video", tmp_path / "frames",
                              "--audio", tmp_path / "a.wav", "--out", tmp_path / "maps", "--max-new-tokens", "1"],
                             capsys)
    assert code == 0, err
    spans = json.loads((tmp_path / "maps" / "attention.json").read_text())["spans"]
    kinds = [s["kind"] for s in spans]
    assert kinds == ["video frame"] * 3 + ["audio window"] * kinds.count("audio window") and len(kinds) > 3
    assert spans[0]["grid"] == [3, 3] and spans[-1]["grid"] == [1, 25]
    assert (tmp_path / "maps" / "attention-0.png").stat().st_size > 0


@pytest.mark.parametrize("argv, phrase", [
    (["inspect", "attention", "model", "--image", "nope.png", "What?"], "nope.png"),
    (["inspect", "attention", "no-such-model", "--image", "a.png", "What?"], "no such folder: no-such-model"),
    (["inspect", "attention", "text", "--image", "a.png", "What?"], "text-only model"),
    (["inspect", "attention", "late", "--image", "a.png", "What?"], "fuses images late"),
    (["inspect", "attention", "model", "What?"], "give --image, --video or --audio"),
    (["inspect", "attention", "model", "--image", "a.png", "What?", "--max-new-tokens", "0"], "at least one token"),
    (["inspect", "attention-score", "model", "--n", "0"], "score at least one question"),
])
def test_bad_input_gets_one_line(world, capsys, monkeypatch, argv, phrase):
    if not (world / "text").exists():
        OmniModel.from_preset("tiny", text=TEXT, vision=None).save_pretrained(world / "text")
        OmniModel.from_preset("tiny", text=TEXT, vision=VISION, fusion="late").save_pretrained(world / "late")
    monkeypatch.chdir(world)
    cli_error(*run_cli(argv, capsys)[::2], phrase)


def test_the_object_a_question_names_is_found():
    rng = random.Random(0)
    for _ in range(50):
        scene = generate_scene(rng, n_objects=rng.randint(2, 4))
        for family, attribute in (("colour", "colour"), ("shape", "shape"), ("position", "position")):
            question, answer = ask(family, scene, rng)
            assert getattr(subject(family, question, scene), attribute) == answer, question
        assert subject("count", ask("count", scene, rng)[0], scene) is None


@pytest.mark.parametrize("n_objects", [1, 3])
def test_the_score_asks_about_one_object(world, n_objects):
    model = OmniModel.from_pretrained(world / "model").requires_grad_(False)
    summary = grounding_score(model, Processor.for_model(model, world / "model"), n=3, n_objects=n_objects,
                              max_new_tokens=1)
    assert summary["n"] == 3 and set(summary["peak_on_object"]) == {"rollout", "gradient", "last_layer"}
    assert all(0 <= v <= 1 for v in summary["peak_on_object"].values())
    assert [q["index"] for q in summary["questions"]] == [0, 1, 2]
    if n_objects > 1:
        assert {q["family"] for q in summary["questions"]} <= {"colour", "shape", "position"}
    assert not any(p.requires_grad for p in model.parameters())  # each parameter's flag given back
