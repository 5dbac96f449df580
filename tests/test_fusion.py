"""The four fusion modes (OmniConfig.fusion): what each one lets a token see, KV-cache decoding,
images matched to their markers, and checkpoints. Small random-weight models, fixed seeds."""

import pytest
import torch
from conftest import one_line_error, randomize_

from omnilm import OmniModel
from omnilm.config import FUSIONS
from omnilm.data.processor import expand_image_tokens
from omnilm.infer import generate
from omnilm.model.fusion import Media, media_mask

SMALL = dict(text=dict(n_layers=4, dim=64, n_heads=4, n_kv_heads=2, mlp_dim=128, vocab_size=64),
             vision=dict(n_layers=2, dim=48, n_heads=4, mlp_dim=96, image_size=64, patch_size=16), image_token_id=3)
IMG = 3


def small(fusion: str, seed: int = 0, randomize: bool = True, **overrides) -> OmniModel:
    torch.manual_seed(seed)
    model = OmniModel.from_preset("tiny", fusion=fusion, **(SMALL | overrides))
    return (randomize_(model, seed) if randomize else model).eval()


def batch(model: OmniModel, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded input_ids and attention_mask, each marker expanded to the model's tokens per image."""
    rows = [expand_image_tokens(r, IMG, model.config.image_seq_len)[0] for r in rows]
    T = max(map(len, rows))
    ids, mask = torch.zeros(len(rows), T, dtype=torch.long), torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r):], mask[b, T - len(r):] = torch.tensor(r), 1
    return ids, mask


def pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


# Two prompts: the first with two images (one mid-text), the second, shorter, with one.
ROWS = [[1, 5, IMG, 7, 8, IMG, 9, 10, 11], [1, 6, 12, IMG, 13, 14]]


def test_cross_attention_with_closed_gates_is_the_plain_decoder():
    """Every tanh gate at 0 (a fresh model): exactly the text-only decoder's logits, images or not."""
    model = small("cross_attention", randomize=False)
    assert all(bool((p == 0).all()) for n, p in model.named_parameters() if n.endswith("_gate"))
    randomize_(model.llm, 1), randomize_(model.fusion.resampler, 2), randomize_(model.vision, 3)
    plain = OmniModel.from_preset("tiny", vision=None, text=SMALL["text"], image_token_id=IMG).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k.split(".")[0] in ("llm", "lm_head")})
    ids, mask = batch(model, ROWS)
    with torch.no_grad():
        assert torch.equal(model(ids, pixels(3), mask).logits, plain(ids, attention_mask=mask).logits)
        # Opened, the same gates let the images in.
        for block in model.fusion.blocks:
            block.attn_gate.fill_(0.5)
        assert not torch.equal(model(ids, pixels(3), mask).logits, plain(ids, attention_mask=mask).logits)


def test_attend_previous_and_all_masks_match_a_hand_built_expectation():
    # One row, markers at sequence indices 2 and 6 (a third slot is padding); queries 0..8.
    positions = torch.tensor([[2, 6, torch.iinfo(torch.long).max]])
    queries = torch.arange(9)
    previous = [[0, 0, 0]] * 2 + [[1, 0, 0]] * 4 + [[0, 1, 0]] * 3
    every = [[0, 0, 0]] * 2 + [[1, 0, 0]] * 4 + [[1, 1, 0]] * 3
    assert media_mask(positions, queries, "previous").tolist() == [[[bool(x) for x in r] for r in previous]]
    assert media_mask(positions, queries, "all").tolist() == [[[bool(x) for x in r] for r in every]]


@pytest.mark.parametrize("attend", ["previous", "all"])
def test_cross_attention_reads_only_the_images_it_may(attend):
    """Changing the first image changes nothing before its marker; with attend="previous", the gated
    blocks of the tokens after the second image no longer read the first (checked on the blocks'
    own output, since self-attention carries earlier tokens' reading forward)."""
    model = small("cross_attention", attend=attend)
    ids, mask = batch(model, ROWS[:1])
    a, b = pixels(2), pixels(2)
    b[0] += 1.0
    with torch.no_grad():
        la, lb = model(ids, a, mask).logits, model(ids, b, mask).logits
        assert torch.equal(la[:, :2], lb[:, :2]) and not torch.equal(la[:, 2:], lb[:, 2:])
        block = model.fusion.blocks[0]
        x = torch.randn(1, ids.shape[1], 64)
        outs = []
        for px in (a, b):
            media = Media.locate(ids, IMG, model.encode_images(px))
            hook = model.fusion.before_layer(media, torch.arange(ids.shape[1]))
            outs.append(hook(0, x))
            assert torch.equal(hook(1, x), x)  # no block before layer 1 (every 2nd layer)
    same_after_second = torch.equal(outs[0][:, 5:], outs[1][:, 5:])
    assert same_after_second == (attend == "previous")
    assert not torch.equal(outs[0][:, 2:5], outs[1][:, 2:5])
    assert block is model.fusion.blocks[0]


def test_late_fusion_changes_only_the_positions_after_an_image():
    model = small("late")
    ids, mask = batch(model, ROWS[:1])  # markers at 2 and 5
    base = pixels(2)
    with torch.no_grad():
        ref = model(ids, base, mask).logits
        for i, marker in enumerate((2, 5)):
            changed = base.clone()
            changed[i] += 1.0
            out = model(ids, changed, mask).logits
            assert torch.equal(out[:, :marker], ref[:, :marker]), i
            assert (out[:, marker:] - ref[:, marker:]).abs().amax(-1).min() > 0, i  # every later position moves
    # The decoder itself sees the marker as a text token: its hidden states do not depend on the image.
    assert model.config.image_seq_len == 1


def test_early_fusion_has_no_vision_encoder_and_breaks_rows():
    model = small("early")
    assert model.vision is None and model.fusion is None
    assert not [n for n, _ in model.named_parameters() if n.startswith("vision.")]
    assert {n.split(".")[0] for n, _ in model.named_parameters()} == {"projector", "llm", "lm_head"}
    side = 64 // 16
    assert model.config.image_seq_len == side * (side + 1)
    with torch.no_grad():
        tokens = model.encode_images(pixels(2))  # (2, 20, 64)
        breaks = tokens.view(2, side, side + 1, -1)[:, :, side]
        assert torch.equal(breaks, model.projector.row_break.expand_as(breaks))
        # Patch (row 1, column 2) of image 0 is its own pixels through one linear map.
        px = pixels(2)
        patch = px[0, :, 16:32, 32:48].permute(1, 2, 0).reshape(-1)
        out = model.encode_images(px).view(2, side, side + 1, -1)[0, 1, 2]
        torch.testing.assert_close(out, model.projector.proj(patch), rtol=1e-5, atol=1e-5)
        # ... which the decoder sees exactly at the marker's positions.
        ids, mask = batch(model, ROWS[1:])
        x = model.embed(ids, px[:1])
        at = (ids[0] == IMG).nonzero().squeeze(1)
        assert torch.equal(x[0, at], model.encode_images(px[:1])[0])


@pytest.mark.parametrize("fusion", FUSIONS)
def test_kv_cache_decoding_equals_the_full_forward(fusion):
    """Prefill, then one cached step per token of a continuation: every step's logits equal one
    full forward over the whole sequence at that position (padding and two images in the batch)."""
    model = small(fusion)
    ids, mask = batch(model, ROWS)
    px = pixels(3)
    more = torch.randint(4, 64, (2, 8), generator=torch.Generator().manual_seed(0))  # no image marker
    seq, seq_mask = torch.cat([ids, more], 1), torch.cat([mask, torch.ones_like(more)], 1)
    with torch.no_grad():
        full = model(seq, px, seq_mask).logits[:, ids.shape[1] - 1:-1]
        cache = model.new_cache(2, seq.shape[1])
        steps = [model(ids, px, mask, cache=cache).logits[:, -1]]
        steps += [model(seq[:, t:t + 1], None, seq_mask[:, :t + 1], cache=cache).logits[:, 0]
                  for t in range(ids.shape[1], seq.shape[1] - 1)]
        first = generate(model, ids, px, mask, max_new_tokens=1)
    torch.testing.assert_close(torch.stack(steps, 1), full, rtol=1e-4, atol=1e-4)
    assert torch.equal(first[:, 0], full[:, 0].argmax(-1))


@pytest.mark.parametrize("fusion", ["late", "cross_attention"])
def test_a_prompt_prefilled_in_chunks_keeps_every_image(fusion):
    """A chat that brings its second image in a later turn can be prefilled turn by turn."""
    model = small(fusion, attend="all")
    ids, mask = batch(model, ROWS[:1])
    px = pixels(2)
    with torch.no_grad():
        full = model(ids, px, mask).logits
        cache = model.new_cache(1, ids.shape[1])
        first = model(ids[:, :4], px[:1], mask[:, :4], cache=cache).logits
        second = model(ids[:, 4:], px[1:], mask, cache=cache).logits
    torch.testing.assert_close(torch.cat([first, second], 1), full, rtol=1e-4, atol=1e-4)
    assert cache.media.positions.tolist() == [[2, 5]]


@pytest.mark.parametrize("fusion", FUSIONS)
def test_images_go_to_their_markers_in_order_across_a_batch(fusion):
    """Image i belongs to the i-th marker, counting row by row: swapping the two images of the first
    prompt changes its answer, and the second prompt (its own image unchanged) keeps its logits."""
    model = small(fusion, attend="all")  # randomize_ opens the cross-attention gates
    ids, mask = batch(model, ROWS)
    px = pixels(3)
    with torch.no_grad():
        ref = model(ids, px, mask).logits
        swapped = model(ids, px[[1, 0, 2]], mask).logits
        alone = model(ids[1:], px[2:], mask[1:]).logits
    assert not torch.allclose(swapped[0, -1], ref[0, -1])
    torch.testing.assert_close(swapped[1], ref[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone[0][mask[1].bool()], ref[1][mask[1].bool()], rtol=1e-4, atol=1e-4)
    if fusion in ("late", "cross_attention"):
        media = Media.locate(ids, IMG, model.encode_images(px))
        pad = ids.shape[1] - len(ROWS[1])
        assert media.positions[0].tolist() == [2, 5] and media.positions[1, 0].item() == pad + 3
        torch.testing.assert_close(media.features[1, 0], model.encode_images(px[2:])[0])


@pytest.mark.parametrize("fusion", FUSIONS)
def test_a_text_only_prompt_gets_the_same_logits_alone_and_beside_an_image_prompt(fusion):
    """A row's result never depends on its batch (a serving engine mixes requests freely): the
    cross-attention blocks' feed-forward runs whether or not any row has an image."""
    model = small(fusion, attend="all")
    ids, mask = batch(model, [ROWS[1], [1, 6, 12, 13, 14, 15]])
    with torch.no_grad():
        mixed = model(ids, pixels(1), mask).logits[1]
        alone = model(ids[1:], None, mask[1:]).logits[0]
    torch.testing.assert_close(alone, mixed, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_a_wrong_number_of_images_is_a_clear_error(fusion):
    model = small(fusion)
    ids, mask = batch(model, ROWS)
    one_line_error(lambda: model(ids, pixels(2), mask), "3", "2", "image")
    one_line_error(lambda: model(ids, None, mask), "no pixel_values")


def test_fusion_settings_are_checked():
    from omnilm.config import OmniConfig

    for bad, words in [(dict(fusion="middle"), "fusion"), (dict(attend="next"), "attend"),
                       (dict(fusion="late", vision=None), "vision"),
                       (dict(fusion="cross_attention", image_token_id=10_000), "vocabulary"),
                       (dict(fusion="cross_attention", cross_attention_every=0), "cross_attention_every")]:
        with pytest.raises(ValueError, match=words):
            OmniConfig.from_preset("tiny", **bad)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_every_mode_saves_and_loads(fusion, tmp_path):
    model = small(fusion)
    model.save_pretrained(tmp_path)
    back = OmniModel.from_pretrained(tmp_path)
    assert back.config.fusion == fusion
    ids, mask = batch(model, ROWS)
    with torch.no_grad():
        assert torch.equal(back(ids, pixels(3), mask).logits, model(ids, pixels(3), mask).logits)
    # Only LLaVA's layout (joint) is written for transformers; the others keep omnilm's names.
    assert (tmp_path / "config.json").is_file() == (fusion == "joint")
    assert (tmp_path / "processor_config.json").exists() is False  # no tokenizer here


def test_early_fusion_runs_in_bfloat16_weights():
    """Float pixels meet bf16 patch weights (`--dtype bfloat16` checkpoints), as the ViT handles them."""
    model = small("early").to(torch.bfloat16)
    ids, mask = batch(model, ROWS[1:])
    with torch.no_grad():
        assert model(ids, pixels(1), mask).logits.dtype == torch.bfloat16


def test_too_many_images_across_prefill_chunks_is_a_clear_error():
    from omnilm.model.fusion import MAX_IMAGES

    model = small("late")
    first = torch.tensor([[1] + [IMG] * MAX_IMAGES])
    cache = model.new_cache(1, first.shape[1] + 2)
    with torch.no_grad():
        model(first, pixels(MAX_IMAGES), cache=cache)
        one_line_error(lambda: model(torch.tensor([[IMG, 5]]), pixels(1), cache=cache), f"at most {MAX_IMAGES}")


def test_the_fusion_bench_end_to_end_in_miniature(tmp_path, capsys):
    """What `omnilm bench fusion` runs, at two steps a mode on a few dozen examples: every mode
    trains on the same data at the asked depth, the modes with a vision encoder read the one CLIP
    tower trained first, every mode is scored on single- and multi-image questions, and the table
    and chart are written."""
    import json

    from omnilm.cli import main
    from omnilm.model.hf import load_vision_encoder

    main(["bench", "fusion", "--out", str(tmp_path / "run"), "--steps", "2", "--n-train", "48", "--n-test", "6",
          "--modes", "text_only,joint,cross_attention", "--llm-layers", "2", "--clip-steps", "2", "--clip-images", "64",
          "--docs", str(tmp_path / "docs"), "--no-progress"])
    tower = load_vision_encoder(tmp_path / "run" / "clip" / "model").state_dict()
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [r["mode"] for r in results] == ["text_only", "joint", "cross_attention"]
    n_questions = {r["eval"]["n"] for r in results}
    assert len(n_questions) == 1 and n_questions.pop() > 6  # the same held-out questions, several per example
    for r in results:
        saved = OmniModel.from_pretrained(tmp_path / "run" / r["mode"] / "model")
        assert saved.config.text.n_layers == 2 and saved.num_parameters() == r["parameters"]
        if r["mode"] == "text_only":
            assert saved.vision is None
        else:  # the CLIP tower, frozen
            assert all(torch.equal(v, tower[k]) for k, v in saved.vision.state_dict().items())
        assert 0 < r["trainable"] <= r["parameters"] and r["step_s"] > 0 and r["latency_s"] > 0
    assert [r["tokens_per_image"] for r in results] == [0, 9, 1]  # no image; a token a patch; the marker alone
    # Questions only (no captions); cross-attention with a gated block before every layer, its gates at their rate.
    runs = {r["mode"]: json.loads((tmp_path / "run" / r["mode"] / "checkpoints" / "step-000002" / "trainer_state.json")
                                  .read_text()) for r in results}
    assert all("caption" not in state["run_config"]["tasks"] for state in runs.values())
    assert [state["run_config"]["gate_lr"] for state in runs.values()] == [None, None, 0.02]
    gates = {g["name"]: g["base_lr"] for g in runs["cross_attention"]["param_groups"] if g["name"].endswith("_gate")}
    assert len(gates) == 2 * 2 and set(gates.values()) == {0.02}  # two blocks of two gates
    assert OmniModel.from_pretrained(tmp_path / "run" / "cross_attention" / "model").config.cross_attention_every == 1
    table = (tmp_path / "docs" / "fusion_table.md").read_text()
    assert table.count("\n") == 2 + len(results) and "multi-image" in table and "cross_attention" in table
    assert (tmp_path / "docs" / "fusion.png").stat().st_size > 0
    assert "3 runs of 2 steps" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["bench", "fusion", "--out", str(tmp_path / "bad"), "--llm-layers", "0"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == "error: --llm-layers is 0: give the decoder at least one layer"
    assert not (tmp_path / "bad").exists()  # refused before any work
    from dataclasses import replace

    from omnilm.recipes.fusion import FusionBench, bench_recipe  # the library refuses as the command line does
    from omnilm.recipes.recipe import Recipe

    one_line_error(lambda: Recipe(llm_layers=0), "--llm-layers is 0")
    one_line_error(lambda: FusionBench(out=tmp_path / "bad", modes=("joint", "fused")), "unknown fused", "choose from")
    one_line_error(lambda: FusionBench(out=tmp_path / "bad", recipe=replace(bench_recipe(), clip_images=16)),
                   "stage clip draws batches of 64 from 16 records", "--clip-images")
    one_line_error(lambda: replace(bench_recipe().clip, steps=0), "--steps is 0")
    one_line_error(lambda: replace(bench_recipe().instruct, gate_lr=0.0), "--gate-lr is 0.0")
    one_line_error(lambda: FusionBench(out=tmp_path / "bad", cross_attention_every=3), "--cross-attention-every",
                   "cross_attention_every=3 must be between 1 and n_layers=2")
    assert not FusionBench(out=tmp_path / "bad", clip=False, recipe=replace(bench_recipe(), stages=("instruct",), clip_images=0)).trains_clip
    assert not FusionBench(out=tmp_path / "bad", modes=("text_only", "early")).trains_clip  # no mode reads a tower
    assert not (tmp_path / "bad").exists()
