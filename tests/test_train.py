"""Training: exact resume, a run that learns, the recipe's plumbing, the trained model in
transformers, and bad data at the command line. Tiny models on a few dozen ShapeWorld images."""

import json
import math
import random
import shutil

import pytest
import torch
from conftest import one_line_error

from omnilm import OmniModel
from omnilm.cli import main
from omnilm.data.shapeworld import write_shapeworld
from omnilm.train import TrainArgs, train
from omnilm.train.stages import corpus, hold_fixed_tokens, spread_positions

SMALL = dict(text=dict(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, mlp_dim=128), vision=dict(n_layers=2, dim=64, n_heads=4, mlp_dim=128))


@pytest.fixture(scope="module")
def shapeworld(tmp_path_factory):
    """48 training and 8 test images with a tokenizer trained on the training chats."""
    from omnilm.data import train_tokenizer

    root = tmp_path_factory.mktemp("sw")
    train_json = write_shapeworld(root, 48, seed=0, split="train")
    write_shapeworld(root, 8, seed=0, split="test")
    train_tokenizer(corpus(train_json), vocab_size=400).save(root / "tokenizer")
    return root


def args(root, out, **kw) -> TrainArgs:
    defaults = dict(stage="instruct", data=root / "train.json", image_folder=root, out=out, tokenizer=root / "tokenizer",
                    steps=6, batch_size=8, lr=3e-3, warmup=2, progress=False, config=SMALL)
    if kw.get("init") is not None:
        del defaults["config"]  # a model from --init keeps its own architecture
    return TrainArgs(**(defaults | kw))


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_continues_exactly(shapeworld, tmp_path, optimizer):
    straight = train(args(shapeworld, tmp_path / "straight", optimizer=optimizer))["losses"]
    first = train(args(shapeworld, tmp_path / "resumed", stop_after=3, optimizer=optimizer))["losses"]
    rest = train(args(shapeworld, tmp_path / "resumed", resume=True, optimizer=optimizer))["losses"]
    assert len(first) == 3 and len(rest) == 3
    assert first + rest == straight  # bit for bit: weights, optimizer moments, data order and RNG restored
    logged = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "resumed" / "loss.png").stat().st_size > 0


@pytest.mark.parametrize("fusion", ["early", "late", "cross_attention"])
def test_every_fusion_mode_trains_saves_and_resumes_exactly(shapeworld, tmp_path, fusion):
    """The other fusion modes go through the same loop: their own modules train, a stopped run
    resumes bit for bit, and the final model loads back with its fusion mode."""
    small = SMALL | {"fusion": fusion}
    straight = train(args(shapeworld, tmp_path / "straight", steps=4, config=small))
    train(args(shapeworld, tmp_path / "resumed", steps=4, stop_after=2, config=small))
    halfway = OmniModel.from_pretrained(tmp_path / "resumed" / "checkpoints" / "step-000002" / "model")
    rest = train(args(shapeworld, tmp_path / "resumed", steps=4, resume=True, config=small))["losses"]
    assert straight["losses"][2:] == rest
    model = OmniModel.from_pretrained(tmp_path / "straight" / "model")
    assert model.config.fusion == halfway.config.fusion == fusion
    before, after = halfway.state_dict(), model.state_dict()
    for k in {"early": ["projector.proj.weight", "projector.row_break"],
              "late": ["fusion.pool.fc1.weight", "fusion.gate.weight", "fusion.attn.v_proj.weight"],
              "cross_attention": ["fusion.resampler.latents", "fusion.blocks.0.attn_gate", "fusion.blocks.0.mlp_gate"]}[fusion]:
        assert not torch.equal(before[k], after[k]), k  # the mode's own connector trains


def test_resume_refuses_optimizer_state_of_another_parameter_split(shapeworld, tmp_path, monkeypatch):
    """A checkpoint whose optimizer held other parameters (cross-attention's gated blocks were AdamW's
    before optim.BLOCKS named them) stops the resume with one line, before any state is loaded."""
    import omnilm.train.optim as optim

    small = SMALL | {"fusion": "cross_attention"}
    run = dict(steps=4, optimizer="muon", config=small)
    monkeypatch.setattr(optim, "BLOCKS", tuple(b for b in optim.BLOCKS if b.__name__ != "GatedCrossAttentionBlock"))
    monkeypatch.setattr(optim, "check_split", lambda *a, **k: None)  # an older omnilm had no such check
    train(args(shapeworld, tmp_path, stop_after=2, **run))
    monkeypatch.undo()
    one_line_error(lambda: train(args(shapeworld, tmp_path, resume=True, **run)), "step-000002",
                   "this run's optimizer has groups of", "start a new --out")


def test_instruction_tuning_learns(shapeworld, tmp_path):
    losses = train(args(shapeworld, tmp_path, steps=40, train_vision=True))["losses"]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses


def test_recipe_stages_chain(shapeworld, tmp_path):
    """clip -> align (vision from the CLIP folder) -> instruct (from the align model): each stage
    starts from the previous one's weights, and the frozen parts stay as they were."""
    from omnilm.model.clip import ClipModel

    train(args(shapeworld, tmp_path / "clip", stage="clip", steps=3))
    clip_vision = ClipModel.from_pretrained(tmp_path / "clip" / "model").vision.state_dict()
    train(args(shapeworld, tmp_path / "align", stage="align", steps=3, vision=tmp_path / "clip" / "model"))
    aligned = OmniModel.from_pretrained(tmp_path / "align" / "model")
    for k, v in clip_vision.items():
        assert torch.equal(aligned.vision.state_dict()[k], v), k  # align trains the projector only
    train(args(shapeworld, tmp_path / "instruct", steps=3, init=tmp_path / "align" / "model"))
    tuned = OmniModel.from_pretrained(tmp_path / "instruct" / "model")
    assert torch.equal(tuned.vision.layers[0].mlp.fc1.weight, aligned.vision.layers[0].mlp.fc1.weight)  # frozen
    assert not torch.equal(tuned.llm.layers[0].mlp.up_proj.weight, aligned.llm.layers[0].mlp.up_proj.weight)


def test_trained_model_answers_the_same_in_transformers(shapeworld, tmp_path):
    """The saved model with its tokenizer and processor loads in transformers' LLaVA and gives
    the same greedy answers to held-out questions."""
    import transformers as tf
    from PIL import Image

    from omnilm.data import Processor
    from omnilm.eval.vqa import questions
    from omnilm.infer import generate

    train(args(shapeworld, tmp_path, steps=20, train_vision=True))
    ours = OmniModel.from_pretrained(tmp_path / "model")
    hf_model = tf.LlavaForConditionalGeneration.from_pretrained(tmp_path / "model").eval()
    hf_processor = tf.AutoProcessor.from_pretrained(tmp_path / "model")
    processor = Processor.for_model(ours, tmp_path / "model")
    items = questions(json.loads((shapeworld / "test.json").read_text()))[:6]
    for q in items:
        batch = processor(q["chat"], images=[str(shapeworld / p) for p in q["images"]])
        text = processor.tokenizer.decode(batch["input_ids"][0].tolist(), skip_special_tokens=False)
        theirs_in = hf_processor(text=text.replace("<image>" * ours.config.image_seq_len, "<image>").removeprefix("<s>"),
                                 images=[Image.open(shapeworld / p) for p in q["images"]], return_tensors="pt")
        assert torch.equal(theirs_in["input_ids"], batch["input_ids"])
        mine = generate(ours, **batch, max_new_tokens=6, stop_token_ids=[processor.tokenizer.eos_id])
        theirs = hf_model.generate(**theirs_in, max_new_tokens=6, do_sample=False)[:, batch["input_ids"].shape[1]:]
        n = mine.shape[1]
        assert mine.tolist() == theirs[:, :n].tolist(), q["question"]


def test_bad_records_stop_with_their_name_or_are_skipped(shapeworld, tmp_path, capsys):
    records = json.loads((shapeworld / "train.json").read_text())
    bad = [r for r in records if r["task"] != "caption"][:16]
    bad[3] = dict(bad[3], image="images/missing.png")
    bad[5] = {k: v for k, v in bad[5].items() if k != "image"}  # a marker without an image
    bad[7] = dict(bad[7], conversations="not a list")
    data = tmp_path / "bad.json"
    data.write_text(json.dumps(bad))
    cmd = ["train", "--stage", "instruct", "--data", str(data), "--image-folder", str(shapeworld),
           "--tokenizer", str(shapeworld / "tokenizer"), "--steps", "1", "--batch-size", "4", "--no-progress"]
    with pytest.raises(SystemExit) as e:
        main(cmd + ["--out", str(tmp_path / "stop")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and bad[3]["id"] in err and "missing.png" in err
    assert not (tmp_path / "stop" / "checkpoints").exists()  # stopped before training: nothing lost or half-written
    with pytest.warns(UserWarning, match="skipped 3 of 16 records"):
        main(cmd + ["--out", str(tmp_path / "skip"), "--skip-bad"])
    assert (tmp_path / "skip" / "model" / "model.safetensors").is_file()


def test_chat_takes_its_question_after_the_options():
    from omnilm.cli import parse_args

    args = parse_args(["chat", "model", "--image", "a.png", "--image", "b.png", "How many shapes are there?"])
    assert (args.checkpoint, args.image, args.question) == ("model", ["a.png", "b.png"], "How many shapes are there?")
    assert parse_args(["chat", "model"]).question is None  # the multi-turn chat
    with pytest.raises(SystemExit):
        parse_args(["chat", "model", "--image", "a.png", "q", "--bogus"])


def test_resume_without_a_checkpoint_is_an_error(shapeworld, tmp_path):
    one_line_error(lambda: train(args(shapeworld, tmp_path, resume=True)), "nothing to resume", "--resume")


def test_gradient_accumulation_equals_the_larger_batch(shapeworld, tmp_path):
    """Two micro-batches of 4 are one batch of 8: micro-batches count by their supervised tokens, so
    the step's loss (and so its gradient) is the mean over all the step's targets. (Weights after
    an AdamW step are no test: its first update is lr * sign(grad), which float noise can flip.)"""
    one = train(args(shapeworld, tmp_path / "one", steps=3, batch_size=8, bf16=False))["losses"]
    two = train(args(shapeworld, tmp_path / "two", steps=3, batch_size=4, grad_accum=2, bf16=False))["losses"]
    assert one == pytest.approx(two, rel=1e-5)


def test_runs_refuse_what_would_lose_or_mix_work(shapeworld, tmp_path):
    train(args(shapeworld, tmp_path, steps=2))
    one_line_error(lambda: train(args(shapeworld, tmp_path, steps=2)), "already holds checkpoints", "--resume")
    one_line_error(lambda: train(args(shapeworld, tmp_path, steps=2, resume=True)), "already at step 2")
    one_line_error(lambda: train(args(shapeworld, tmp_path, steps=4, lr=1e-2, resume=True)),
                   "different settings", "lr: 0.003 -> 0.01")
    one_line_error(lambda: args(shapeworld, tmp_path, clip_grad=0.0), "--clip-grad is 0.0")
    one_line_error(lambda: args(shapeworld, tmp_path, grad_accum=0), "--grad-accum is 0")
    one_line_error(lambda: args(shapeworld, tmp_path, stage="align", train_vision=True), "stage align does not use --train-vision")
    one_line_error(lambda: args(shapeworld, tmp_path, stage="clip", vision=tmp_path), "stage clip does not use --vision")
    one_line_error(lambda: args(shapeworld, tmp_path, vision_lr=1e-4), "--vision-lr needs --train-vision")
    one_line_error(lambda: args(shapeworld, tmp_path, patch_lr=1e-4), "--patch-lr needs --train-vision")
    one_line_error(lambda: args(shapeworld, tmp_path, stage="align", patch_lr=1e-4), "stage align does not use --patch-lr")


def test_stage_clip_trains_the_patch_embedding_at_its_own_rate(shapeworld, tmp_path):
    train(args(shapeworld, tmp_path, stage="clip", steps=2, lr=1e-3, patch_lr=1e-4, tasks=["caption"]))
    groups = json.loads((tmp_path / "checkpoints" / "step-000002" / "trainer_state.json").read_text())["param_groups"]
    peaks = {g["name"]: g["base_lr"] for g in groups}
    assert peaks == {"model": 1e-3, "vision.embeddings.patch_embedding": 1e-4}


def test_length_grouped_batches_cover_each_epoch_once_with_less_padding():
    from omnilm.train.loop import BatchStream

    rng = random.Random(0)
    lengths = [rng.choice([rng.randint(40, 80), rng.randint(100, 200)]) for _ in range(1000)]
    plain, grouped = BatchStream(1000, 8, seed=3), BatchStream(1000, 8, seed=3, lengths=lengths)
    for epoch in range(2):
        steps = range(epoch * 125, (epoch + 1) * 125)
        seen = [i for k in steps for i in grouped.indices(k)]
        # The same records as the plain epoch (its ragged tail dropped), each once, in another order.
        assert sorted(seen) == sorted(i for k in steps for i in plain.indices(k)) and len(set(seen)) == 1000
        padded = {name: sum(8 * max(lengths[i] for i in s.indices(k)) for k in steps) for name, s in
                  (("plain", plain), ("grouped", grouped))}
        assert padded["grouped"] < 0.8 * padded["plain"], padded
    again = BatchStream(1000, 8, seed=3, lengths=lengths)  # a pure function of (seed, k): resumable
    assert [again.indices(k) for k in (130, 7)] == [grouped.indices(k) for k in (130, 7)]
    assert BatchStream(1000, 8, seed=4, lengths=lengths).indices(0) != grouped.indices(0)


def test_group_by_length_resumes_exactly_and_refuses_stage_clip(shapeworld, tmp_path):
    straight = train(args(shapeworld, tmp_path / "straight", group_by_length=True))["losses"]
    first = train(args(shapeworld, tmp_path / "resumed", stop_after=3, group_by_length=True))["losses"]
    rest = train(args(shapeworld, tmp_path / "resumed", resume=True, group_by_length=True))["losses"]
    assert first + rest == straight and all(math.isfinite(x) for x in straight)
    assert straight != train(args(shapeworld, tmp_path / "plain"))["losses"]  # other batches
    one_line_error(lambda: args(shapeworld, tmp_path, stage="clip", group_by_length=True),
                   "stage clip does not use --group-by-length")


def test_cross_attention_gates_train_at_their_own_rate(shapeworld, tmp_path):
    train(args(shapeworld, tmp_path, steps=2, gate_lr=0.05, config=SMALL | {"fusion": "cross_attention"}))
    groups = json.loads((tmp_path / "checkpoints" / "step-000002" / "trainer_state.json").read_text())["param_groups"]
    gates = {g["name"]: g["base_lr"] for g in groups if g["name"].endswith("_gate")}
    assert gates and set(gates.values()) == {0.05}
    assert {g["base_lr"] for g in groups if not g["name"].endswith("_gate")} == {3e-3}
    one_line_error(lambda: train(args(shapeworld, tmp_path / "joint", steps=2, gate_lr=0.05)),
                   "--gate-lr", "fusion=joint", "has none")
    one_line_error(lambda: args(shapeworld, tmp_path, stage="clip", gate_lr=0.05), "stage clip does not use --gate-lr")


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_the_recipe_end_to_end_in_miniature(tmp_path, preset):
    """What `omnilm demo [--preset tiny-moe]` runs, at a few steps a stage: every stage chains, the
    model is saved and every held-out question is scored."""
    from omnilm.recipes.recipe import Recipe, run_recipe

    from dataclasses import replace

    stages = {name: replace(getattr(Recipe(), name), steps=2, warmup=0, batch_size=8)
              for name in ("clip", "align", "instruct")}
    recipe = Recipe(preset=preset, n_train=32, n_test=6, clip_images=16, llm_layers=2, system_prompt="",
                    progress=False, **stages)
    result = run_recipe(tmp_path, recipe)
    clip_records = json.loads((tmp_path / "data" / "clip.json").read_text())
    assert len(clip_records) == 32 and all(" and " not in r["conversations"][1]["value"] for r in clip_records[::2])
    train_records = json.loads((tmp_path / "data" / "train.json").read_text())
    assert all(len(r["turn_tasks"]) >= 5 for r in train_records if r["task"] != "caption")  # every family
    n_questions = sum(1 if r.get("turn_tasks") is None else len(r["turn_tasks"])
                      for r in json.loads((tmp_path / "data" / "test.json").read_text()) if r["task"] != "caption")
    assert result["eval"]["n"] == n_questions == len((tmp_path / "predictions.jsonl").read_text().splitlines())
    assert {"recall@1", "colour_acc"} <= set(json.loads((tmp_path / "clip_eval.json").read_text()))
    saved = OmniModel.from_pretrained(tmp_path / "model")
    assert saved.num_parameters() == result["model"].num_parameters()
    assert saved.config.text.n_layers == recipe.llm_layers  # the recipe's depth, not the preset's
    if preset == "tiny-moe":
        assert (tmp_path / "instruct" / "routing.png").is_file()
        return
    again = run_recipe(tmp_path, recipe)  # the recipe owns its folder: a rerun starts afresh
    answers = lambda summary: {k: v for k, v in summary.items() if k != "cost"}  # noqa: E731 - its seconds vary
    assert answers(again["eval"]) == answers(result["eval"])  # and is deterministic
    assert again["eval"]["cost"]["flops"] == result["eval"]["cost"]["flops"]


def test_whitened_projector_starts_with_unit_covariance(shapeworld, tmp_path):
    from omnilm.train.stages import _image_features, build_stage

    stage = build_stage(args(shapeworld, tmp_path, stage="align", whiten_projector=True))
    model, fc1 = stage.model, stage.model.projector.fc1
    feats = _image_features(model, stage.dataset)
    # Rows come in order of decreasing variance; 48 tiny images leave the last few directions
    # nearly empty (kept finite by eps), so check the leading half.
    k = min(fc1.out_features, feats.shape[1]) // 2
    with torch.no_grad():
        h = fc1(feats)[:, :k]
    assert h.mean(0).abs().max() < 1e-3
    torch.testing.assert_close(torch.cov(h.T), torch.eye(k), atol=2e-3, rtol=0)
    one_line_error(lambda: args(shapeworld, tmp_path, whiten_projector=True, init=tmp_path), "--whiten-projector")


def test_a_projector_narrower_than_its_features_standardises_each_one():
    """Fewer outputs than input features: PCA whitening would drop the weakest directions (a video's
    motion features), so each feature is standardised instead, the layer's random weights kept."""
    from omnilm.model.connector import whiten_
    from omnilm.model.layers import MLP

    torch.manual_seed(0)
    mlp = MLP(12, 4, 4, "gelu", bias=True)
    feats = torch.randn(500, 12) * torch.logspace(-1, 1, 12) + torch.arange(12.0)
    w, b = mlp.fc1.weight.clone(), mlp.fc1.bias.clone()
    whiten_(mlp, feats)
    standard = (feats - feats.mean(0)) / feats.std(0)
    with torch.no_grad():
        torch.testing.assert_close(mlp.fc1(feats), standard @ w.T + b, atol=1e-4, rtol=1e-4)


def test_motion_features_are_standardised_beside_the_whitened_ones():
    """With `standardize_from`, the first features are whitened into the first outputs, the rest
    (a video's motion features) standardised into the outputs left, neither reading the other."""
    from omnilm.model.connector import whiten_
    from omnilm.model.layers import MLP

    torch.manual_seed(0)
    mlp = MLP(9, 8, 4, "gelu", bias=True)
    mix = torch.eye(5) + torch.triu(torch.ones(5, 5), 1)  # correlated features: whitening is not standardising
    feats = torch.cat([torch.randn(2000, 5) @ mix + 3, torch.randn(2000, 4) * torch.tensor([0.1, 1, 5, 20])], 1)
    w, b = mlp.fc1.weight.clone(), mlp.fc1.bias.clone()
    whiten_(mlp, feats, standardize_from=5)
    with torch.no_grad():
        h = mlp.fc1(feats)
        torch.testing.assert_close(torch.cov(h[:, :5].T), torch.eye(5), atol=1e-3, rtol=0)
        motion = (feats[:, 5:] - feats[:, 5:].mean(0)) / feats[:, 5:].std(0)
        torch.testing.assert_close(h[:, 5:], motion @ w[5:, 5:].T + b[5:], atol=1e-4, rtol=1e-4)
    assert mlp.fc1.weight[:5, 5:].abs().max() == 0 and mlp.fc1.weight[5:, :5].abs().max() == 0


def test_resume_accepts_a_checkpoint_older_than_a_new_setting(tmp_path):
    from omnilm.train.loop import _check_same_run

    now = {"steps": 6, "whiten_projector": False, "lr": 1e-3}
    _check_same_run({"steps": 6, "lr": 1e-3}, now, tmp_path)  # saved before whiten_projector existed
    one_line_error(lambda: _check_same_run({"steps": 6, "lr": 1e-3}, {**now, "whiten_projector": True}, tmp_path),
                   "whiten_projector: False -> True")


def test_vision_flags_refused_for_a_model_without_a_vision_encoder(shapeworld, tmp_path):
    early = SMALL | {"fusion": "early"}
    one_line_error(lambda: train(args(shapeworld, tmp_path, train_vision=True, config=early)),
                   "--train-vision", "early fusion")


def test_a_non_finite_loss_stops_before_its_step_and_keeps_the_last_checkpoint(shapeworld, tmp_path, monkeypatch):
    """A nan at step 3 stops the run with one line naming the step, before the step is applied: no
    checkpoint of it, `latest` still at step 2, nothing non-finite saved, and --resume goes on from there."""
    from safetensors.torch import load_file

    import omnilm.train.loop as loop
    from omnilm.io import umask

    build_stage, calls = loop.build_stage, []

    def nan_at_step_3(*a, **k):
        stage = build_stage(*a, **k)
        loss = stage.loss

        def poisoned(model, batch):
            value, logged = loss(model, batch)
            calls.append(1)
            return (value * float("nan") if len(calls) == 3 else value), logged
        stage.loss = poisoned
        return stage

    monkeypatch.setattr(loop, "build_stage", nan_at_step_3)
    one_line_error(lambda: train(args(shapeworld, tmp_path, save_every=2)), "stopped at step 3", "loss is nan",
                   "lower --lr", "--resume", "checkpoints/step-000002")
    monkeypatch.undo()
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step-000002\n"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-000002"]
    saved = [t for f in checkpoints.rglob("*.safetensors") for t in load_file(f).values() if t.is_floating_point()]
    assert saved and all(torch.isfinite(t).all() for t in saved)
    mode = 0o666 & ~umask()  # what a plain open() gives: the run's files are readable as the user's others are
    assert {oct(f.stat().st_mode & 0o777) for f in tmp_path.rglob("*") if f.is_file()} == {oct(mode)}
    rest = train(args(shapeworld, tmp_path, save_every=2, resume=True))["losses"]
    assert len(rest) == 4 and all(math.isfinite(x) for x in rest)


def test_a_non_finite_learning_rate_stops_before_the_first_step(shapeworld, tmp_path):
    run = args(shapeworld, tmp_path)
    run.lr = float("inf")  # past TrainArgs' own check, as a caller of train() could
    one_line_error(lambda: train(run), "stopped at step 1", "lr of parameter group model is inf", "then rerun")
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_atomic_writes_get_the_mode_of_a_plain_open(tmp_path, mask):
    import os

    from omnilm.io import umask, write_text

    old = os.umask(mask)
    try:
        write_text(tmp_path / "atomic", "x")
        (tmp_path / "plain").write_text("x")
    finally:
        os.umask(old)
    assert umask() == old
    assert (tmp_path / "atomic").stat().st_mode == (tmp_path / "plain").stat().st_mode == 0o100000 | (0o666 & ~mask)


def test_lora_trains_the_adapter_and_projector_resumes_exactly_and_publishes_for_peft(shapeworld, tmp_path):
    """`--lora-r`: a base model (from --init) keeps its weights, only the LoRA updates and the projector
    move; a resumed run gives the uninterrupted losses; OUT/model is the merged model, and OUT/adapter
    loads with peft onto transformers' LLaVA of the base with the same logits."""
    import peft
    import transformers as tf

    train(args(shapeworld, tmp_path / "base", steps=2))
    base = tmp_path / "base" / "model"
    lora = dict(init=base, lora_r=4, lora_alpha=8, lr=1e-2)
    straight = train(args(shapeworld, tmp_path / "straight", **lora))["losses"]
    first = train(args(shapeworld, tmp_path / "resumed", stop_after=3, **lora))["losses"]
    rest = train(args(shapeworld, tmp_path / "resumed", resume=True, **lora))["losses"]
    assert first + rest == straight and straight[-1] < straight[0]

    before, merged = OmniModel.from_pretrained(base), OmniModel.from_pretrained(tmp_path / "straight" / "model")
    changed = {name for name, p in merged.state_dict().items() if not torch.equal(p, before.state_dict()[name])}
    assert any(name.startswith("projector.") for name in changed) and "llm.layers.0.self_attn.q_proj.weight" in changed
    assert not any(name.startswith(("vision.", "llm.embed_tokens", "lm_head")) or "norm" in name for name in changed)

    theirs = peft.PeftModel.from_pretrained(tf.LlavaForConditionalGeneration.from_pretrained(base).eval(),
                                            tmp_path / "straight" / "adapter").eval()
    ids = torch.randint(4, 300, (1, 12))
    ids[0, 2:2 + merged.config.image_seq_len] = merged.config.image_token_id
    pixels = torch.randn(1, 3, merged.config.vision.image_size, merged.config.vision.image_size)
    with torch.no_grad():
        ours = merged.eval()(ids, pixels).logits
        torch.testing.assert_close(ours, theirs(input_ids=ids, pixel_values=pixels).logits, rtol=0, atol=1e-5)


def test_lora_flags_are_refused_where_they_would_do_nothing(shapeworld, tmp_path):
    one_line_error(lambda: args(shapeworld, tmp_path, stage="align", lora_r=4), "stage align does not use --lora-r")
    one_line_error(lambda: args(shapeworld, tmp_path, lora_alpha=32), "--lora-alpha", "add --lora-r")
    one_line_error(lambda: args(shapeworld, tmp_path, lora_r=4, train_vision=True), "drop --train-vision")
    one_line_error(lambda: train(args(shapeworld, tmp_path, lora_r=4, fusion="late")), "no transformers class")


def test_randomized_positions_are_sorted_draws_over_the_wider_range():
    mask = torch.tensor([[1] * 10 + [0] * 6, [1] * 16])
    torch.manual_seed(0)
    draws = [spread_positions(mask, 4) for _ in range(50)]
    for positions in draws:
        for row, n in ((0, 10), (1, 16)):
            real = positions[row, :n]
            assert bool((real[1:] > real[:-1]).all()) and 0 <= int(real[0]) and int(real[-1]) < 4 * n
        assert not positions[0, 10:].any()  # padding
    assert max(int(p[1, -1]) for p in draws) > 16  # the model meets positions beyond the record's length


def test_randomized_positions_train_and_resume_exactly(shapeworld, tmp_path):
    straight = train(args(shapeworld, tmp_path / "straight", random_positions=8))["losses"]
    first = train(args(shapeworld, tmp_path / "resumed", stop_after=3, random_positions=8))["losses"]
    rest = train(args(shapeworld, tmp_path / "resumed", resume=True, random_positions=8))["losses"]
    assert first + rest == straight  # the draws come from the checkpointed generator
    assert straight != train(args(shapeworld, tmp_path / "plain"))["losses"]
    one_line_error(lambda: args(shapeworld, tmp_path, stage="clip", random_positions=4),
                   "stage clip does not use --random-positions")


def test_pose_positions_keep_neighbours_together_across_few_skips(shapeworld, tmp_path):
    mask = torch.tensor([[1] * 40 + [0] * 8])
    torch.manual_seed(0)
    for _ in range(50):
        real = spread_positions(mask, 8, chunks=3)[0, :40]
        steps = real[1:] - real[:-1]
        assert bool((steps >= 1).all()) and int((steps > 1).sum()) <= 2 and int(real[-1]) < 8 * 40
    one_line_error(lambda: args(shapeworld, tmp_path, position_chunks=2),
                   "--position-chunks 2 cuts the range --random-positions spreads records over")


def test_a_frozen_towers_cached_features_train_as_the_tower_would(shapeworld, tmp_path):
    """--cache-features runs the frozen tower once per image: two epochs of 48 images give the
    losses of the run without it, with 48 encodings, not 96 (plus the whitening sample's)."""
    kw = dict(steps=12, whiten_projector=True, bf16=False)
    plain = train(args(shapeworld, tmp_path / "plain", **kw))
    cached = train(args(shapeworld, tmp_path / "cached", cache_features=0.5, **kw))
    assert cached["losses"] == pytest.approx(plain["losses"], rel=1e-4)
    cache = cached["model"].feature_cache
    assert len(cache) == 48 and cache.misses == 48 and cache.hits >= 48
    one_line_error(lambda: args(shapeworld, tmp_path, cache_features=1.0, train_vision=True),
                   "--cache-features", "--train-vision")
    one_line_error(lambda: args(shapeworld, tmp_path, stage="clip", cache_features=1.0),
                   "stage clip does not use --cache-features")


def test_fixed_token_rows_get_no_gradient_and_refuse_weight_decay():
    # The made-up words' rows (text.fixed_tokens) are held: a loss that reads and writes them leaves
    # their gradient zero in the embedding and the head, and the rest's not; decay would move them.
    model = OmniModel.from_preset("tiny", text={"n_layers": 1, "vocab_size": 64})
    model.add_tokens(6, fixed=True)
    hold_fixed_tokens(model)
    ids = torch.tensor([[1, 5, 64, 65, 69, 7, 66, 64]])
    model(ids, labels=ids).loss.backward()
    for weight in (model.llm.embed_tokens.weight, model.lm_head.weight):
        assert weight.grad[64:].abs().sum() == 0 and weight.grad[:64].abs().sum() > 0
    one_line_error(lambda: hold_fixed_tokens(model, weight_decay=0.1), "--weight-decay 0.1", "fixed word rows",
                   "--weight-decay 0")


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile builds its CPU kernels with a C++ compiler, and none is installed")
def test_compiled_training_gives_the_eager_losses(shapeworld, tmp_path):
    """--compile: the same steps through inductor's graphs (batches of several lengths: one graph
    with a symbolic length), the same losses to float rounding, and the weights it saves load."""
    from torch._dynamo.utils import counters

    eager = train(args(shapeworld, tmp_path / "eager", steps=4))
    counters.clear()
    compiled = train(args(shapeworld, tmp_path / "compiled", steps=4, compile=True))
    assert counters["stats"]["unique_graphs"] >= 1  # it did run through torch.compile
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=1e-3)
    OmniModel.from_pretrained(tmp_path / "compiled" / "model")
