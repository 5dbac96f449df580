"""`omnilm eval niah`: the length x depth grid end to end on an omnilm checkpoint and on a Hugging
Face LLaMA folder, the Wilson interval, the context extension, and bad flags as one-line errors."""

import csv
import json
import random
from dataclasses import replace

import pytest

from conftest import cli_error, one_line_error, run_cli, tiny_checkpoint, tiny_hf_model
from omnilm.config import TextConfig
from omnilm.data import haystack as hs
from omnilm.data.chat import DEFAULT_SYSTEM
from omnilm.data.shapeworld import COLOURS, SHAPES
from omnilm.eval.niah import extend_context, parse_rope_scaling, wilson_interval
from omnilm.recipes.haystack import HaystackRecipe, run_haystack
from omnilm.train import Hyperparams


@pytest.fixture(scope="module")
def omni_folder(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("niah") / "omni")  # max_seq_len 256


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A random LlamaForCausalLM (max_position_embeddings 128) with a byte-level BPE saved by
    transformers beside it, as a user's own Hugging Face folder would be."""
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("niah") / "llama"
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [hs.filler_sentence(random.Random(i), "english") for i in range(300)]
    backend.train_from_iterator(texts + [f"{DEFAULT_SYSTEM} USER: What is it? ASSISTANT:"] * 20, trainer)
    tf.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                               unk_token="<unk>").save_pretrained(folder)
    tiny_hf_model("llama", text=dict(vocab_size=backend.get_vocab_size())).save_pretrained(folder)
    return folder


def read_grid(out):
    with (out / "niah.csv").open() as f:
        rows = list(csv.DictReader(f))
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return rows, predictions


def test_grid_on_an_omnilm_checkpoint(omni_folder, tmp_path, capsys):
    # Both lengths are past the checkpoint's max_seq_len (256): the context is extended to run them.
    out = tmp_path / "out"
    code, stdout, err = run_cli(["eval", "niah", omni_folder, "--lengths", "400,600", "--depths", 3, "--samples", 2,
                                 "--rope-scaling", "linear:2", "--out", out], capsys)
    assert code == 0, err
    rows, predictions = read_grid(out)
    assert [(int(r["length"]), float(r["depth"]), int(r["samples"])) for r in rows] == \
        [(n, d, 2) for n in (400, 600) for d in (0.0, 0.5, 1.0)]
    assert all(0 <= float(r["recall"]) <= 1 and float(r["recall"]) == int(r["correct"]) / 2 for r in rows)
    assert (out / "niah.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(predictions) == 12 and all(p["length"] - 5 <= p["tokens"] <= p["length"] for p in predictions)
    assert all(p["question"].startswith("What is ") and len(p["answer"].split()) == 2 for p in predictions)
    assert "shapeworld filler" in stdout and "rope linear:2" in stdout and "| **all** | 12 |" in stdout


def test_image_needles_on_an_omnilm_checkpoint(omni_folder, tmp_path, capsys):
    # Chunks of 64 tokens: the prompt's images (4 tokens each) are prefilled with the chunk they start in.
    out = tmp_path / "out"
    code, stdout, err = run_cli(["eval", "niah", omni_folder, "--needle", "image", "--images", 3, "--lengths", 600,
                                 "--depths", 2, "--samples", 2, "--prefill-chunk", 64, "--out", out], capsys)
    assert code == 0, err
    rows, predictions = read_grid(out)
    assert [(r["depth"], r["samples"]) for r in rows] == [("0.0", "2"), ("1.0", "2")]
    assert all(p["question"].startswith("In the images, what") and p["images"] == 3 for p in predictions)
    assert all(p["answer"] in COLOURS + SHAPES for p in predictions)


def test_several_questions_are_asked_turn_by_turn_after_the_models_own_answers(omni_folder, tmp_path, capsys,
                                                                               monkeypatch):
    """--keys 3 --questions 2: three needles, two asked; the second question comes after the model's
    first answer (here always "red circle"), and both answers are scored."""
    import omnilm.eval.niah as niah
    from omnilm.data import Tokenizer

    tokenizer = Tokenizer.from_file(omni_folder)
    answer = tokenizer.encode("red circle", add_bos=False) + [tokenizer.eos_id]
    prompts = []

    def fake(model, input_ids, **kwargs):
        prompts.append(tokenizer.decode(input_ids[0].tolist()))
        return input_ids.new_tensor([answer])

    monkeypatch.setattr(niah, "generate", fake)
    out = tmp_path / "out"
    code, stdout, err = run_cli(["eval", "niah", omni_folder, "--lengths", 400, "--depths", 2, "--samples", 2,
                                 "--keys", 3, "--questions", 2, "--out", out], capsys)
    assert code == 0, err
    rows, predictions = read_grid(out)
    assert [int(r["samples"]) for r in rows] == [4, 4]  # 2 prompts x 2 questions per cell
    assert [p["question_index"] for p in predictions] == [0, 1] * 4 and len(prompts) == 8
    for first, second, (p, q) in zip(prompts[::2], prompts[1::2], zip(predictions[::2], predictions[1::2])):
        assert p["question"] != q["question"] and p["answer"] != "" and q["answer"] != ""
        assert first.count("remember: ") == 3 and second.startswith(first)  # the same haystack, continued
        rest = second[len(first):].strip()  # decoded without </s>
        assert rest == f"red circleUSER: {q['question']} ASSISTANT:"
    assert all(p["correct"] == (p["answer"] == "red circle") for p in predictions)
    assert f"| **all** | 8 | {sum(p['correct'] for p in predictions) / 8:.1%}" in stdout


def test_images_grow_with_the_length_with_scale_images(omni_folder):
    from omnilm.data.processor import Processor
    from omnilm.eval.niah import Grid, NiahArgs
    from omnilm.model.hf import read_config

    config, _, _ = read_config(omni_folder)
    processor = Processor.for_model(config, omni_folder)
    count = hs.TokenCount(processor.tokenizer, processor.image_seq_len)
    for scale, expected in ((False, [3, 3]), (True, [3, 6])):
        run = NiahArgs(checkpoint=omni_folder, needle="image", images=3, scale_images=scale, objects=2,
                       lengths=("256", "512"))
        grid = Grid(run, "shapeworld", count, trained=256)
        assert grid.lengths == [256, 512]
        hays = [grid.prompt(length, 0.5, 0) for length in (256, 512)]
        assert [len(h.images) for h in hays] == expected and all(len(s) == 2 for h in hays for s in h.scenes)


def test_grid_on_a_hugging_face_llama(llama_folder, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run_cli(["eval-niah", llama_folder, "--lengths", "1x,2x", "--depths", 3, "--samples", 2,
                                 "--prefill-chunk", 64, "--out", out], capsys)
    assert code == 0, err
    rows, predictions = read_grid(out)
    assert [int(r["length"]) for r in rows] == [128] * 3 + [256] * 3
    assert all(0 <= float(r["recall"]) <= 1 for r in rows)
    assert "english filler" in stdout and "trained length 128" in stdout
    assert all(p["length"] - 5 <= p["tokens"] <= p["length"] for p in predictions)


def test_wilson_interval_matches_known_values():
    # statsmodels' proportion_confint(count, n, method="wilson") at alpha 0.05.
    assert wilson_interval(5, 10) == pytest.approx((0.2365931, 0.7634069), abs=1e-6)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775328), abs=1e-6)
    assert wilson_interval(10, 10) == pytest.approx((0.7224672, 1.0), abs=1e-6)
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    low, high = wilson_interval(18, 20, confidence=0.99)
    assert low < wilson_interval(18, 20)[0] and high > wilson_interval(18, 20)[1]


def test_context_extension_keeps_each_scaling_meaningful():
    def text(**kw):
        return TextConfig(vocab_size=32, dim=32, n_layers=1, n_heads=4, n_kv_heads=4, mlp_dim=64, max_seq_len=256, **kw)

    cfg = text()
    extend_context(cfg, None, 1000)  # plain RoPE reads no length: only the limit moves
    assert cfg.max_seq_len == 1000 and cfg.rope_scaling is None
    cfg = text()
    extend_context(cfg, {"rope_type": "linear", "factor": 4.0}, 1000)
    assert cfg.max_seq_len == 1000 and cfg.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    cfg = text()
    extend_context(cfg, {"rope_type": "yarn", "factor": 4.0}, 1000)  # YaRN keeps the length it was trained at
    assert cfg.rope_scaling["original_max_position_embeddings"] == 256 and cfg.max_seq_len == 1000
    cfg = text(rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    extend_context(cfg, None, 1000)  # dynamic NTK reads max_seq_len as the trained length
    assert cfg.max_seq_len == 256


def test_library_settings_refuse_alike(omni_folder):
    from conftest import one_line_error
    from omnilm.eval.niah import NiahArgs

    one_line_error(lambda: NiahArgs(checkpoint=omni_folder, needle="smell"), "--needle 'smell': use one of text")
    one_line_error(lambda: NiahArgs(checkpoint=omni_folder, filler="poetry"), "--filler 'poetry'", "auto")
    one_line_error(lambda: hs.HaystackSpec(out=omni_folder, filler="auto"), "--filler 'auto'")


def test_eval_niah_is_eval_niah_and_explains_every_flag(capsys):
    from omnilm.cli import parse_args

    assert parse_args(["eval", "niah", "ckpt"]).command == "eval-niah"
    assert parse_args(["eval", "ckpt", "--data", "d.json", "--image-folder", "."]).command == "eval"
    with pytest.raises(SystemExit):
        parse_args(["eval", "niah", "--help"])
    help_text = capsys.readouterr().out
    for flag in ("--lengths", "--depths", "--samples", "--needle", "--keys", "--questions", "--images",
                 "--scale-images", "--objects", "--filler", "--rope-scaling",
                 "--out", "--prefill-chunk", "--max-new-tokens", "--seed", "--device", "--dtype"):
        assert flag in help_text


def test_bad_flags_are_one_line_errors(omni_folder, llama_folder, tmp_path, capsys):
    cases = [
        ([omni_folder, "--rope-scaling", "ntk:4"], "--rope-scaling 'ntk:4': give TYPE:FACTOR"),
        ([omni_folder, "--rope-scaling", "linear"], "--rope-scaling 'linear'"),
        ([omni_folder, "--rope-scaling", "yarn:0.5"], "a factor >= 1"),
        ([omni_folder, "--lengths", "100"], "--lengths: length 100 is below the", "at least"),
        ([omni_folder, "--lengths", "4k"], "--lengths '4k' is not a length"),
        ([omni_folder, "--depths", 500], "--depths is 500"),
        ([omni_folder, "--lengths", "400", "--depths", 50], "--depths 50 asks for more needle places"),
        ([omni_folder, "--samples", 0], "--samples is 0"),
        ([omni_folder, "--needle", "smell"], "invalid choice: 'smell'"),
        ([omni_folder, "--needle", "image", "--images", 1], "--images is 1"),
        ([omni_folder, "--keys", 2, "--questions", 3], "--questions 3 asks more needles than the --keys 2"),
        ([omni_folder, "--needle", "image", "--questions", 4, "--images", 6], "--questions is 4"),
        ([tmp_path / "missing"], "no such folder"),
        ([llama_folder, "--needle", "image"], "is text-only"),
    ]
    for argv, *parts in cases:
        cli_error(*run_cli(["eval", "niah", *argv, "--out", tmp_path / "out"], capsys)[::2], *parts)
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_the_haystack_recipe_end_to_end_in_miniature(tmp_path):
    """`omnilm demo-haystack` at toy scale: records of 64 to 256 tokens in the tokens of the BPE
    trained on them, a text-only decoder with token convolutions trained with randomized positions,
    and a grid per RoPE choice."""
    recipe = HaystackRecipe(n_train=48, keys=4, questions=4, grids=("yarn+logn", "plain", "linear"),
                            eval_lengths=("1x", "2x"), eval_depths=3, crowded_depths=3, eval_samples=2,
                            compare_samples=1, several=2, progress=False,
                            training=Hyperparams(steps=3, batch_size=8, lr=1e-3, warmup=1, random_positions=4))
    result = run_haystack(tmp_path, recipe)
    records = json.loads((tmp_path / "data" / "train.json").read_text())
    assert len(records) == 48 and all(64 - 8 <= r["n_tokens"] <= 256 for r in records)
    assert max(len(r["conversations"]) for r in records) > 2  # several questions, each a turn
    assert list(result["reports"]) == ["yarn+logn", "plain", "linear", "2-keys", "2-questions"]
    for name, samples in (("yarn+logn", 2), ("plain", 1), ("linear", 1)):
        rows = list(csv.DictReader((tmp_path / "niah" / name / "niah.csv").open()))
        assert len(rows) == 6 and all(0 <= float(r["recall"]) <= 1 and int(r["samples"]) == samples for r in rows)
    assert "rope yarn:auto + log-n attention" in result["reports"]["yarn+logn"]
    assert "rope unscaled:" in result["reports"]["plain"] and "rope linear:auto:" in result["reports"]["linear"]
    # Several keys and several questions: at 1x and 4x, as the main grid; 2 answers a prompt.
    for name, answers in (("2-keys", 2), ("2-questions", 4)):
        rows = list(csv.DictReader((tmp_path / "niah" / name / "niah.csv").open()))
        assert [(int(r["length"]), int(r["samples"])) for r in rows] == [(n, answers) for n in (256, 1024)
                                                                          for _ in range(3)]
    assert "(text, 2 keys, 1 asked" in result["reports"]["2-keys"]
    assert "(text, 2 keys, 2 asked" in result["reports"]["2-questions"]
    assert "yarn:auto + log-n" in result["reports"]["2-keys"]
    config = json.loads((tmp_path / "instruct" / "model" / "omnilm.json").read_text())
    assert config["vision"] is None and config["text"]["max_seq_len"] == 256 and config["text"]["token_conv"] == 6
    one_line_error(lambda: HaystackRecipe(questions=9), "--questions 9 asks more needles than --keys 8")
    one_line_error(lambda: HaystackRecipe(grids=("plain", "ntk")), "--grids ntk: give one or more of plain")
    # A grid the data cannot fill is refused before training.
    one_line_error(lambda: run_haystack(tmp_path / "again", replace(recipe, crowded_depths=40)),
                   "grid 2-keys: --depths 40 asks for more needle places than a 256-token prompt has")
    assert not (tmp_path / "again" / "instruct").exists()


def test_the_image_needle_recipe_in_miniature(tmp_path):
    """`omnilm demo-haystack --needle image` at toy scale: a CLIP-trained tower, a mix of image- and
    text-needle records with their PNGs, a model that reads images, and image grids whose images
    grow with the length."""
    recipe = HaystackRecipe(needle="image", n_train=40, images=4, clip_images=48, grids=("plain", "yarn"), several=0,
                            eval_lengths=("1x", "2x"), crowded_depths=2, eval_samples=1, compare_samples=1,
                            progress=False,
                            clip=Hyperparams(steps=2, batch_size=16, lr=1e-3),
                            training=Hyperparams(steps=2, batch_size=8, lr=1e-3, position_chunks=2,
                                                 random_positions=4))
    result = run_haystack(tmp_path, recipe)
    records = json.loads((tmp_path / "data" / "train.json").read_text())
    tasks = [r["task"] for r in records]
    # --text-share 0.1: about 36 image records of 40, the rest text
    assert 28 <= tasks.count("niah_image") <= 39 and tasks.count("niah_text") == 40 - tasks.count("niah_image")
    assert all((tmp_path / "data" / name).is_file() for r in records for name in r.get("image", []))
    assert all(2 <= len(r["image"]) <= 4 and 128 - 8 <= r["n_tokens"] <= 256 for r in records if "image" in r)
    assert json.loads((tmp_path / "instruct" / "model" / "omnilm.json").read_text())["vision"] is not None
    assert set(result["reports"]) == {"plain", "yarn"} and result["clip_eval"]["n_images"] == 100
    predictions = [json.loads(line) for line in (tmp_path / "niah" / "yarn" / "predictions.jsonl").open()]
    assert all(p["question"].startswith("In the images, what") for p in predictions)
    assert [p["images"] for p in predictions] == [4, 4, 8, 8]  # 4 per trained length


def test_an_auto_scaling_takes_each_lengths_multiple_of_the_trained_one(omni_folder, tmp_path, capsys, monkeypatch):
    """--rope-scaling linear:auto: prompts of 256 tokens (the trained length) run unscaled (factor 1),
    of 512 at factor 2; read off the model's config while each prompt runs."""
    import omnilm.eval.niah as niah

    factors = {}
    real = niah.generate

    def spy(model, input_ids, **kwargs):
        factors.setdefault(input_ids.shape[1] // 100, set()).add(model.config.text.rope_scaling["factor"])
        return real(model, input_ids, **kwargs)

    monkeypatch.setattr(niah, "generate", spy)
    code, _, err = run_cli(["eval", "niah", omni_folder, "--lengths", "256,512", "--depths", 2, "--samples", 1,
                            "--rope-scaling", "linear:auto", "--out", tmp_path], capsys)
    assert code == 0, err
    assert factors == {2: {1.0}, 5: {2.0}}
    assert parse_rope_scaling("yarn:auto") == {"rope_type": "yarn", "factor": "auto"}
