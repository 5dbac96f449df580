"""CLIP (both towers) against transformers' CLIPModel, the contrastive loss, zero-shot eval, and a
tiny training run that learns."""

import json

import pytest
import torch
import transformers as tf
from conftest import randomize_
from PIL import Image

from omnilm.config import ClipConfig, ClipTextConfig
from omnilm.data import ImageProcessor, Tokenizer, train_tokenizer
from omnilm.data import shapeworld as sw
from omnilm.data.captions import check_caption_tokenizer, end_of_text_id, text_ids_for, tokenize_captions
from omnilm.errors import OmniInputError
from omnilm.eval.clip import evaluate_clip, format_clip_results, shapeworld_candidates
from omnilm.model import hf as hfio
from omnilm.model.clip import ClipModel

TOL = 1e-4
EOS = 98  # the tiny config's end-of-text id: the highest id, as in OpenAI's vocabulary


def tiny_hf_clip(eos_token_id: int = EOS, seed: int = 0) -> tf.CLIPModel:
    """A random CLIPModel: 2+2 layers, non-default norm eps, 32 px images in 8 px patches."""
    cfg = tf.CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, layer_norm_eps=2e-5,
                         bos_token_id=1, eos_token_id=eos_token_id, pad_token_id=0),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, layer_norm_eps=2e-5),
        projection_dim=24,
    )
    torch.manual_seed(seed)
    model = tf.CLIPModel(cfg)
    for part in (model.text_model, model.vision_model, model.visual_projection, model.text_projection):
        randomize_(part, seed)
    with torch.no_grad():
        model.logit_scale.fill_(2.0)  # not the init value, so loading it is checked
    return model.eval()


def text_batch(eos: int = EOS, lengths=(6, 4, 9), seed: int = 0):
    """Right-padded rows: BOS, random ids, end-of-text; padding id 0, ids below EOS."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, 0], ids[i, n - 1] = 1, eos
        ids[i, 1:n - 1] = torch.randint(3, EOS, (n - 2,), generator=g)
        mask[i, :n] = 1
    return ids, mask


def pixels(n: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@torch.no_grad()
def assert_same_outputs(ours: ClipModel, theirs: tf.CLIPModel, eos: int = EOS) -> None:
    ids, mask = text_batch(eos)
    px = pixels()
    ref = theirs(input_ids=ids, pixel_values=px, attention_mask=mask)
    assert max_diff(ours.encode_image(px), ref.image_embeds) < TOL
    assert max_diff(ours.encode_text(ids, mask), ref.text_embeds) < TOL
    _, logits = ours(px, ids, mask)
    assert max_diff(logits, ref.logits_per_image) < TOL
    # Each row alone, unpadded, gives the same text embedding as inside the padded batch.
    batch = ours.encode_text(ids, mask)
    for i, n in enumerate(mask.sum(1).tolist()):
        alone = ours.encode_text(ids[i:i + 1, :n])
        assert max_diff(alone[0], batch[i]) < 1e-5


# --- parity with transformers -----------------------------------------------------------------


@pytest.mark.parametrize("eos", [EOS, 2], ids=["eos_first_occurrence", "legacy_eos_2_argmax"])
def test_loads_transformers_clip_with_same_embeddings(tmp_path, eos):
    theirs = tiny_hf_clip(eos)
    theirs.save_pretrained(tmp_path)
    ours = ClipModel.from_pretrained(tmp_path)
    assert ours.config.text.eos_token_id == eos and ours.config.embed_dim == 24
    assert ours.logit_scale.item() == 2.0
    assert_same_outputs(ours, theirs, eos)


@pytest.mark.parametrize("side", ["right", "left"])
def test_text_hidden_states_match_transformers_under_padding(tmp_path, side):
    theirs = tiny_hf_clip()
    theirs.save_pretrained(tmp_path)
    ours = ClipModel.from_pretrained(tmp_path)
    ids, mask = text_batch()
    if side == "left":  # the same rows, padding moved to the front
        n = mask.sum(1, keepdim=True)
        order = (torch.arange(ids.shape[1]) - (ids.shape[1] - n)) % ids.shape[1]
        ids, mask = ids.gather(1, order), mask.gather(1, order)
    with torch.no_grad():
        ref = theirs.text_model(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours.text(ids, mask)
    real = mask.bool()  # padding positions' outputs are never read
    assert max_diff(got[real], ref[real]) < TOL


def test_legacy_eos_pools_at_the_highest_id(tmp_path):
    # transformers reads eos_token_id == 2 as a legacy config and pools at each row's highest id,
    # which is not the end-of-text token here: ours does the same, so the numbers still agree.
    tiny_hf_clip(2).save_pretrained(tmp_path)
    ours = ClipModel.from_pretrained(tmp_path)
    ids = torch.tensor([[1, 50, 2, 0]])
    states = ours.text(ids)
    assert torch.equal(ours.text.pooled(ids), states[:, 1])


def test_save_loads_in_transformers_and_as_a_vision_encoder(tmp_path):
    theirs = tiny_hf_clip()
    theirs.save_pretrained(tmp_path / "hf")
    ours = ClipModel.from_pretrained(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["model_type"] == "clip" and config["projection_dim"] == 24
    back, info = tf.CLIPModel.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert_same_outputs(ours, back.eval())
    # stage align / instruct read the vision tower from this folder
    encoder = hfio.load_vision_encoder(tmp_path / "ours")
    state = encoder.state_dict()
    for k, v in ours.vision.state_dict().items():
        assert torch.equal(state[k], v), k
    # and our own loader reads it back exactly
    again = ClipModel.from_pretrained(tmp_path / "ours")
    for k, v in ours.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_loss_is_symmetric_infonce_as_transformers(tmp_path):
    theirs = tiny_hf_clip()
    theirs.save_pretrained(tmp_path)
    ours = ClipModel.from_pretrained(tmp_path)
    ids, mask = text_batch()
    px = pixels()
    with torch.no_grad():
        loss, logits = ours(px, ids, mask)
        ref = theirs(input_ids=ids, pixel_values=px, attention_mask=mask, return_loss=True)
    target = torch.arange(3)
    by_hand = (-logits.log_softmax(1)[target, target].mean() - logits.log_softmax(0)[target, target].mean()) / 2
    assert abs(loss.item() - by_hand.item()) < 1e-6
    assert abs(loss.item() - ref.loss.item()) < TOL


def test_key_names_round_trip():
    model = ClipModel.from_config(ClipConfig.tiny(), device="meta")
    for name in model.state_dict():
        assert hfio.key_from_hf(hfio.key_to_hf(name, "clip_model"), "clip_model") == name


def test_logit_scale_is_clamped_at_100():
    model = ClipModel.from_config(ClipConfig.tiny())
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    e = torch.nn.functional.normalize(torch.randn(2, 128), dim=-1)
    assert torch.allclose(model.similarity(e, e), 100 * e @ e.t())


# --- tokenization and config ------------------------------------------------------------------


def test_tokenize_captions_ends_every_row_in_end_of_text():
    tokenizer = train_tokenizer(["a small red circle at the top left."] * 4, vocab_size=300)
    eot = end_of_text_id(tokenizer)
    ids, mask = tokenize_captions(tokenizer, ["a red circle.", "a small red circle at the top left."], max_len=32)
    assert ids.shape == mask.shape and ids.shape[0] == 2
    for row, m in zip(ids, mask):
        n = int(m.sum())
        assert row[0] == tokenizer.bos_id and row[n - 1] == eot and (row[:n - 1] < eot).all()
        assert (row[n:] == tokenizer.pad_id).all() and m[:n].all()
    cfg = ClipConfig.tiny(**text_ids_for(tokenizer))
    assert cfg.text.eos_token_id == eot and cfg.text.vocab_size == eot + 1
    assert cfg.vision == ClipConfig.tiny().vision
    with pytest.raises(OmniInputError, match="max_len=4"):
        tokenize_captions(tokenizer, ["a small red circle at the top left."], max_len=4)


def test_config_round_trip():
    cfg = ClipConfig.tiny(vocab_size=300, eos_token_id=299)
    assert ClipConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown clip text config"):
        ClipConfig.from_dict({**cfg.to_dict(), "text": {"width": 3}})
    assert isinstance(cfg.text, ClipTextConfig)


def test_fresh_tower_positions_are_as_visible_as_its_patches():
    # A fresh tower's position embedding is drawn at position_init_std, comparable to what a patch
    # adds to a token; at the 0.02 of the other weights, where an object is would be lost in the noise.
    torch.manual_seed(0)
    model = ClipModel.from_config(ClipConfig.tiny())
    embeddings = model.vision.embeddings
    assert abs(embeddings.position_embedding.weight.std().item() - model.config.position_init_std) < 0.05
    assert abs(embeddings.patch_embedding.weight.std().item() - 0.02) < 0.002
    with torch.no_grad():
        patches = embeddings.patch_embedding(torch.randn(16, 3, 96, 96))  # normalised pixels: about unit scale
    assert 0.5 < patches.std().item() / model.config.position_init_std < 2


def test_a_tokenizer_that_does_not_fit_the_text_tower_is_refused():
    tokenizer = train_tokenizer(["a red circle."], vocab_size=300)
    model = ClipModel.from_config(ClipConfig.tiny())  # text tower for a 512-id vocabulary
    with pytest.raises(OmniInputError, match="text_ids_for"):
        check_caption_tokenizer(model.config.text, tokenizer, "here")
    with pytest.raises(OmniInputError, match="text_ids_for"):
        evaluate_clip(model, tokenizer, None, [], ".")


# --- evaluation and a training run that learns ------------------------------------------------

COLOURS = {"red": (220, 20, 30), "green": (20, 170, 40), "blue": (30, 60, 220), "yellow": (240, 220, 10),
           "purple": (130, 40, 190), "orange": (245, 120, 0), "black": (10, 10, 10), "white": (250, 250, 250)}


def test_shapeworld_candidates_cover_every_single_object_caption():
    cands = shapeworld_candidates()
    assert len(cands) == len(sw.SIZES) * len(sw.COLOURS) * len(sw.SHAPES) * len(sw.CELLS)
    scene = (sw.Obj("cross", "orange", "small", 8),)
    assert cands[sw.caption(scene)] == dict(size="small", colour="orange", shape="cross", position="bottom right")


def test_evaluates_shapeworld_caption_records(tmp_path):
    path = sw.write_shapeworld(tmp_path, 12, seed=0, split="test")
    records = json.loads(path.read_text())
    captions = [r["conversations"][-1]["value"] for r in records if r["task"] == "caption"]
    tokenizer = train_tokenizer(captions, vocab_size=512)
    model = ClipModel.from_config(ClipConfig.tiny(**text_ids_for(tokenizer)))
    results = evaluate_clip(model, tokenizer, ImageProcessor.from_vision_config(model.config.vision), records, tmp_path)
    n_single = sum(len(sw.make_example(i, 0, "test").scene) == 1 for i in range(12))
    assert results["n_images"] == 12 and results["n_single"] == n_single > 0
    assert set(results) >= {"recall@1", "recall@5", "size_acc", "colour_acc", "shape_acc", "position_acc", "all_acc"}
    assert all(0 <= v <= 1 for k, v in results.items() if not k.startswith("n_"))


def test_tiny_training_run_learns_retrieval(tmp_path):
    captions = [f"a {c} image." for c in COLOURS]
    tokenizer = train_tokenizer(captions, vocab_size=300)
    torch.manual_seed(0)
    model = ClipModel.from_config(ClipConfig.tiny(**text_ids_for(tokenizer)))
    processor = ImageProcessor.from_vision_config(model.config.vision)
    records = []
    for i, (name, rgb) in enumerate(COLOURS.items()):
        Image.new("RGB", (64, 64), rgb).save(tmp_path / f"{name}.png")
        records.append({"id": str(i), "image": f"{name}.png", "task": "caption",
                        "conversations": [{"from": "human", "value": "<image>\nDescribe the image."},
                                          {"from": "gpt", "value": captions[i]}]})
    records.append({"id": "q", "image": "red.png", "task": "colour", "conversations": []})  # not a caption: skipped
    candidates = {c: {"colour": name} for c, name in zip(captions, COLOURS)}

    before = evaluate_clip(model, tokenizer, processor, records, tmp_path, candidates=candidates)
    px = processor([tmp_path / f"{name}.png" for name in COLOURS])
    ids, mask = tokenize_captions(tokenizer, captions, model.config.text.max_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.0)
    model.train()
    for _ in range(60):
        loss, _ = model(px, ids, mask)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # as the trainer does
        optimizer.step()
    after = evaluate_clip(model, tokenizer, processor, records, tmp_path, batch_size=3, candidates=candidates)

    assert after["n_images"] == 8 and after["n_captions"] == 8 and after["n_single"] == 8
    assert before["recall@1"] < 0.5 and loss.item() < 0.1, (before, loss.item())
    assert after["recall@1"] == 1.0 and after["recall@5"] == 1.0 and after["colour_acc"] == 1.0
    assert after["all_acc"] == 1.0
    assert "| recall@1 | 1.000 |" in format_clip_results(after)
    # The trained model round-trips with its tokenizer, and evaluates the same after loading.
    model.save_pretrained(tmp_path / "clip", max_shard_size="1MB")  # as the trainer's checkpoints; sharded
    tokenizer.save(tmp_path / "clip")
    assert (tmp_path / "clip" / "model.safetensors.index.json").is_file()
    loaded = ClipModel.from_pretrained(tmp_path / "clip")
    again = evaluate_clip(loaded, Tokenizer.from_file(tmp_path / "clip"), processor, records, tmp_path,
                          candidates=candidates)
    assert again == after


def test_collapsed_model_scores_zero_recall(tmp_path):
    # Every embedding equal: all captions tie, and a tie with the right caption counts against it.
    tokenizer = train_tokenizer(["a red image.", "a blue image."], vocab_size=300)
    model = ClipModel.from_config(ClipConfig.tiny(**text_ids_for(tokenizer)))
    with torch.no_grad():
        model.visual_projection.weight.zero_()
        model.text_projection.weight.zero_()
        model.visual_projection.weight[0, 0] = model.text_projection.weight[0, 0] = 1.0
        model.vision.post_layernorm.weight.zero_()
        model.vision.post_layernorm.bias.fill_(1.0)
        model.text.final_layer_norm.weight.zero_()
        model.text.final_layer_norm.bias.fill_(1.0)
    processor = ImageProcessor.from_vision_config(model.config.vision)
    records = []
    for name in ("red", "blue"):
        Image.new("RGB", (64, 64), COLOURS[name]).save(tmp_path / f"{name}.png")
        records.append({"id": name, "image": f"{name}.png", "task": "caption",
                        "conversations": [{"from": "human", "value": "<image>\nDescribe the image."},
                                          {"from": "gpt", "value": f"a {name} image."}]})
    results = evaluate_clip(model, tokenizer, processor, records, tmp_path)
    assert results["recall@1"] == 0.0 and results["recall@5"] == 1.0 and results["n_single"] == 0
