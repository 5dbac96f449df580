"""Fuzzing the command line and the chat: every malformed argument, prompt or chat line ends in a
one-line `error: ...` (exit 2) that names the problem, before any work; the rest give a correct
result. Cases are generated from tables: flag x bad value, command x bad path, REPL scripts."""

import builtins
import math

import pytest
from conftest import cli_error, one_line_error, run_cli
from PIL import Image

from omnilm import OmniModel
from omnilm.cli import parse_args
from omnilm.data import Processor, train_tokenizer
from omnilm.data.shapeworld import write_shapeworld
from omnilm.infer import Sampling
from omnilm.recipes.fusion import BENCH_FLAGS, FusionBench
from omnilm.recipes.recipe import Recipe
from omnilm.settings import from_flags
from omnilm.train import TrainArgs

SMALL = dict(text=dict(n_layers=1, dim=32, n_heads=2, n_kv_heads=1, mlp_dim=64),
             vision=dict(n_layers=1, dim=32, n_heads=2, mlp_dim=64))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model folder (weights + tokenizer), a few ShapeWorld records, a good and a bad image."""
    root = tmp_path_factory.mktemp("cli")
    write_shapeworld(root / "data", 4, seed=0, split="test", progress=False)
    tokenizer = train_tokenizer(["What colour is the circle? red blue green"] * 4, vocab_size=300)
    model = OmniModel.from_preset("tiny", image_token_id=tokenizer.image_token_id,
                                  **{**SMALL, "text": {**SMALL["text"], "vocab_size": 300}})
    model.save_pretrained(root / "model")
    Processor.for_model(model, tokenizer=tokenizer).save_pretrained(root / "model")
    Image.new("RGB", (40, 30), "red").save(root / "red.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "a_file").write_text("x")
    return root


# --- every numeric flag x values it must refuse ------------------------------------------------

TRAIN_BASE = ["train", "--stage", "instruct", "--data", "d.json", "--image-folder", ".", "--out", "never-written"]
TRAIN_NUMERIC = {  # flag: (a value below its range, the phrase the error uses)
    "--steps": ("0", "at least 1"), "--batch-size": ("0", "at least 1"), "--grad-accum": ("0", "at least 1"),
    "--lr": ("0", "> 0"), "--projector-lr": ("-1", "> 0"), "--patch-lr": ("-0.5", "> 0"),
    "--gate-lr": ("0", "> 0"), "--warmup": ("-1", "at least 0"), "--min-lr-ratio": ("1.5", "between 0 and 1"),
    "--weight-decay": ("-1", "at least 0"), "--clip-grad": ("0", "> 0"), "--seed": ("-1", "between 0 and"),
    "--save-every": ("-1", "at least 0"), "--log-every": ("0", "at least 1"),
}
INT_FLAGS = {"--steps", "--batch-size", "--grad-accum", "--warmup", "--seed", "--save-every", "--log-every"}


def bad_number_cases(flag: str, is_int: bool) -> list[tuple[str, str, str]]:
    """What argparse or the settings say to values no numeric flag takes."""
    kind = "int" if is_int else "float"
    cases = [(flag, "abc", f"invalid {kind} value"), (flag, "", f"invalid {kind} value"),
             (flag, "-inf", "expected one argument")]  # argparse reads "-inf" as another flag
    if not is_int:
        cases += [(flag, v, "give a finite number") for v in ("nan", "inf", "1e400", "NaN")]
    return cases


TRAIN_CASES = [case for flag in TRAIN_NUMERIC for case in bad_number_cases(flag, flag in INT_FLAGS)]
TRAIN_CASES += [(flag, low, phrase) for flag, (low, phrase) in TRAIN_NUMERIC.items()]
TRAIN_CASES += [("--seed", str(2**70), "between 0 and"), ("--seed", "9" * 400, "it must be between 0 and"), ("--vision-lr", "0", "> 0"),
                ("--optimizer", "sgd", "invalid choice"), ("--stage", "pretrain", "invalid choice"),
                ("--fusion", "middle", "invalid choice"), ("--attend", "none", "invalid choice"),
                ("--preset", "tiyn", "unknown --preset 'tiyn'"), ("--device", "gpu", "not a device"),
                ("--device", "cuda", "no CUDA device"), ("--device", "cuda:7", "no CUDA device"),
                ("--config", "[1, 2]", "not a JSON object"), ("--config", "{bad json", "invalid loads value"),
                ("--tasks", ",", "task names")]


@pytest.mark.parametrize("flag, value, phrase", TRAIN_CASES)
def test_train_refuses_a_bad_flag_before_any_work(world, capsys, monkeypatch, flag, value, phrase):
    monkeypatch.chdir(world)
    base = [a for a in TRAIN_BASE if a != flag] if flag == "--stage" else TRAIN_BASE
    argv = base + [flag, value] if flag != "--stage" else ["train", "--stage", value, *base[3:]]
    code, _, err = run_cli(argv, capsys)
    cli_error(code, err, phrase)
    assert not (world / "never-written").exists()


@pytest.mark.parametrize("stage, flag, value", [
    ("clip", "--vision", "x"), ("clip", "--train-vision", None), ("clip", "--projector-lr", "0.1"),
    ("clip", "--gate-lr", "0.1"), ("clip", "--group-by-length", None), ("clip", "--fusion", "late"),
    ("align", "--train-vision", None), ("align", "--vision-lr", "0.1"), ("align", "--patch-lr", "0.1"),
    ("instruct", "--vision-lr", "0.1"), ("instruct", "--patch-lr", "0.1"),
])
def test_flags_a_stage_would_ignore_are_refused(world, capsys, monkeypatch, stage, flag, value):
    monkeypatch.chdir(world)
    argv = ["train", "--stage", stage, *TRAIN_BASE[3:], flag] + ([value] if value is not None else [])
    code, _, err = run_cli(argv, capsys)
    cli_error(code, err, flag)


def test_train_out_and_init_conflicts(world, capsys, monkeypatch):
    monkeypatch.chdir(world)
    code, _, err = run_cli([*TRAIN_BASE[:-2], "--out", "a_file"], capsys)
    cli_error(code, err, "--out a_file is a file")
    code, _, err = run_cli([*TRAIN_BASE[:-2], "--out", "a_file/below"], capsys)
    cli_error(code, err, "a_file is a file")
    code, _, err = run_cli([*TRAIN_BASE, "--init", "model", "--fusion", "late"], capsys)
    cli_error(code, err, "--fusion shape a fresh model")
    code, _, err = run_cli([*TRAIN_BASE, "--init", "model", "--whiten-projector"], capsys)
    cli_error(code, err, "--whiten-projector")


# --- demo, data, bench: their settings refuse before any data is written -------------------------

DEMO_CASES = [
    (["--instruct-steps", "0"], "--instruct-steps is 0"), (["--clip-lr", "-1"], "--clip-lr is -1.0"),
    (["--align-batch-size", "0"], "--align-batch-size is 0"), (["--n-train", "10"], "draws batches of 32"),
    (["--n-test", "0"], "--n-test is 0"), (["--preset", "huge"], "unknown --preset"),
    (["--stages", "clip,align"], "give instruct"), (["--stages", "instruct,eval"], "give instruct"),
    (["--jitter", "2"], "--jitter is 2.0"), (["--jitter", "nan"], "finite"), (["--seed", "-5"], "--seed is -5"),
    (["--llm-layers", "0"], "--llm-layers is 0"), (["--clip-objects", "7"], "--clip-objects is 7"),
    (["--questions", "some"], "invalid choice"), (["--clip-images", "0"], "from 0 records"),
    (["--instruct-optimizer", "lion"], "invalid choice"), (["--instruct-weight-decay", "-0.1"], "at least 0"),
    (["--out", "a_file"], "--out a_file is a file"), (["--instruct-min-lr-ratio", "-0.1"], "between 0 and 1"),
]


@pytest.mark.parametrize("argv, phrase", DEMO_CASES)
def test_demo_refuses_bad_settings_before_any_data(world, capsys, monkeypatch, argv, phrase):
    monkeypatch.chdir(world)
    out = [] if "--out" in argv else ["--out", "demo-never"]
    code, _, err = run_cli(["demo", *out, *argv], capsys)
    cli_error(code, err, phrase)
    assert not (world / "demo-never").exists()


DATA_CASES = [
    (["--n", "-1"], "ask for zero or more"), (["--n", "x"], "invalid int"), (["--jitter", "1.5"], "jitter is 1.5"),
    (["--jitter", "nan"], "jitter is nan"), (["--image-size", "8"], "image_size 8 is out of range"),
    (["--image-size", "4096"], "image_size 4096 is out of range"), (["--split", "../up"], "not a plain name"),
    (["--split", "Train"], "not a plain name"), (["--n-objects", "0"], "n_objects is 0"),
    (["--n-objects", "5"], "n_objects is 5"), (["--multi-image", "2"], "multi_image is 2.0"),
    (["--questions", "few"], "invalid choice"),
]


@pytest.mark.parametrize("argv, phrase", DATA_CASES)
def test_shapeworld_refuses_bad_settings(world, capsys, argv, phrase):
    code, _, err = run_cli(["data", "shapeworld", "--out", world / "sw-never", "--n", "2", *argv], capsys)
    cli_error(code, err, phrase)
    assert not (world / "sw-never" / "train.json").exists()


BENCH_CASES = [
    (["--modes", ","], "--modes is empty"), (["--modes", "joint,fancy"], "unknown fancy"),
    (["--multi-image", "-0.5"], "--multi-image is -0.5"), (["--cross-attention-every", "9"], "--cross-attention-every"),
    (["--steps", "0"], "--steps is 0"), (["--clip-steps", "0"], "--clip-steps is 0"),
    (["--gate-lr", "0"], "--gate-lr is 0.0"), (["--clip-images", "8"], "stage clip draws batches of 64 from 8 records"),
    (["--out", "a_file"], "--out a_file is a file"), (["--docs", "a_file"], "--docs a_file is a file"),
    (["--llm-layers", "0"], "--llm-layers is 0"), (["--lr", "inf"], "finite"),
]


@pytest.mark.parametrize("argv, phrase", BENCH_CASES)
def test_bench_refuses_bad_settings_before_any_data(world, capsys, monkeypatch, argv, phrase):
    monkeypatch.chdir(world)
    out = [] if "--out" in argv else ["--out", "bench-never"]
    code, _, err = run_cli(["bench", "fusion", *out, *argv], capsys)
    cli_error(code, err, phrase)
    assert not (world / "bench-never").exists()


# --- eval, chat, info, convert ---------------------------------------------------------------------

EVAL_CASES = [
    (["--batch-size", "0"], "--batch-size is 0"), (["--batch-size", "-1"], "--batch-size is -1"),
    (["--max-new-tokens", "0"], "--max-new-tokens is 0"), (["--device", "cuda"], "no CUDA device"),
    (["--device", "tpu"], "not a device"), (["--predictions", "missing/p.jsonl"], "does not exist"),
    (["--predictions", "."], "is a folder"), (["--predictions", "a_file/p.jsonl"], "does not exist"),
]


@pytest.mark.parametrize("argv, phrase", EVAL_CASES)
def test_eval_refuses_bad_settings_before_loading_anything(world, capsys, monkeypatch, argv, phrase):
    monkeypatch.chdir(world)
    code, _, err = run_cli(["eval", "model", "--data", "data/test.json", "--image-folder", "data", *argv], capsys)
    cli_error(code, err, phrase)


@pytest.mark.parametrize("checkpoint, phrase", [
    ("missing", "no such folder"), ("a_file", "is a file"), ("data", "has no config.json"),
])
@pytest.mark.parametrize("command", ["eval", "chat", "info", "convert"])
def test_every_command_names_a_bad_checkpoint_folder(world, capsys, monkeypatch, command, checkpoint, phrase):
    monkeypatch.chdir(world)
    argv = {"eval": ["eval", checkpoint, "--data", "data/test.json", "--image-folder", "data"],
            "chat": ["chat", checkpoint, "hello"], "info": ["info", checkpoint],
            "convert": ["convert", checkpoint, "converted"]}[command]
    code, _, err = run_cli(argv, capsys)
    cli_error(code, err, phrase)


CHAT_CASES = [
    (["--temperature", "-1"], "--temperature is -1.0"), (["--temperature", "nan"], "finite"),
    (["--top-k", "0"], "--top-k is 0"), (["--top-p", "0"], "--top-p is 0.0"), (["--top-p", "1.5"], "in (0, 1]"),
    (["--max-new-tokens", "0"], "--max-new-tokens is 0"), (["--max-new-tokens", "5000"], "exceeds the model's max_seq_len"),
    (["--image", "missing.png"], "cannot read image missing.png"), (["--image", "broken.png"], "broken.png"),
    (["--image", "data"], "data"), (["--dtype", "int8"], "invalid choice"), (["--device", "cuda:1"], "no CUDA device"),
]


@pytest.mark.parametrize("argv, phrase", CHAT_CASES)
def test_chat_refuses_bad_settings(world, capsys, monkeypatch, argv, phrase):
    monkeypatch.chdir(world)
    code, _, err = run_cli(["chat", "model", *argv, "What colour is the circle?"], capsys)
    cli_error(code, err, phrase)


@pytest.mark.parametrize("question", [
    "What colour is the circle?", "a" * 300, "\udcff\udcfe not UTF-8", "<image> marker without image?", "  x  ",
    "emoji 🟥🔵", "tab\tand\nnewline", "null\x00byte",
])
def test_chat_answers_any_text(world, capsys, monkeypatch, question):
    monkeypatch.chdir(world)
    code, out, err = run_cli(["chat", "model", "--max-new-tokens", "3", question], capsys)
    if "<image>" in question:  # a marker the user typed needs an image: refused, named
        cli_error(code, err, "<image> markers")
    else:
        assert code == 0 and err == "", err
        assert out.endswith("\n")


def test_chat_refuses_an_empty_question(world, capsys, monkeypatch):
    monkeypatch.chdir(world)
    code, _, err = run_cli(["chat", "model", "   "], capsys)
    cli_error(code, err, "the question is empty")


@pytest.mark.parametrize("argv, phrase", [
    (["info", "--preset", "tyni"], "unknown --preset 'tyni'"), (["info"], "give a checkpoint folder"),
    (["convert", "model", "a_file"], "DST a_file is a file"), (["convert", "model", "out", "--dtype", "int4"], "invalid"),
    (["convert", "model", "out", "--max-shard-size", "lots"], "not a size"), (["nonsense"], "invalid choice"),
    (["train"], "required"), (["eval", "model"], "required"), (["inspect", "routing", "model", "hi"], "dense decoder"),
])
def test_other_commands_refuse_in_one_line(world, capsys, monkeypatch, argv, phrase):
    monkeypatch.chdir(world)
    code, _, err = run_cli(argv, capsys)
    cli_error(code, err, phrase)


# --- the chat REPL ----------------------------------------------------------------------------------


def repl(world, capsys, monkeypatch, lines, images=()):
    feed = iter(lines)

    def fake_input(prompt=""):
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    monkeypatch.chdir(world)
    monkeypatch.setattr(builtins, "input", fake_input)
    argv = ["chat", "model", "--max-new-tokens", "2"]
    for image in images:
        argv += ["--image", image]
    code, out, err = run_cli(argv, capsys)
    assert code == 0 and err == "", err
    return out


@pytest.mark.parametrize("lines, expected", [
    (["/help"], ["/image PATH", "/video PATH", "/reset", "/quit"]),
    (["/video clip.mp4", "hi"], ["takes no video", "the video was not added", "assistant>"]),
    (["/frobnicate"], ["unknown command /frobnicate"]),
    (["/image missing.png", "hi"], ["cannot read image missing.png", "the image was not added"]),
    (["/image broken.png", "hi"], ["broken.png", "the image was not added"]),
    (["/image red.png", "what is this?"], ["image red.png will go with your next message", "assistant>"]),
    (["//slash first"], ["assistant>"]),
    (["", "   ", "hi", "/quit", "never read"], ["assistant>"]),
    (["\udcff\udcfe bytes"], ["assistant>"]),
    (["<image> where is it?"], ["error:", "<image> markers"]),
    (["/reset"], ["conversation cleared"]),
])
def test_repl_commands(world, capsys, monkeypatch, lines, expected):
    out = repl(world, capsys, monkeypatch, lines)
    for part in expected:
        assert part in out, out
    assert "Traceback" not in out


def test_repl_failed_image_does_not_poison_later_messages(world, capsys, monkeypatch):
    out = repl(world, capsys, monkeypatch, ["/image broken.png", "first", "second"])
    assert out.count("assistant>") == 2 and "error:" not in out.split("not added", 1)[1]


def test_repl_reset_keeps_the_command_line_images(world, capsys, monkeypatch):
    seen = []
    import omnilm.infer.chat as chat

    real = chat.answer
    monkeypatch.setattr(chat, "answer", lambda m, p, messages, s: seen.append(messages) or real(m, p, messages, s))
    repl(world, capsys, monkeypatch, ["one", "/reset", "two"], images=["red.png"])
    images = [[part for part in msgs[-1]["content"] if part["type"] == "image"] for msgs in seen]
    assert [len(i) for i in images] == [1, 1]  # the --image went with the first message, and again after /reset


def test_repl_error_drops_the_message_and_its_images(world, capsys, monkeypatch):
    out = repl(world, capsys, monkeypatch, ["/image red.png", "<image> and another <image>", "fine now"])
    assert "the message and its images, videos and audio were dropped" in out and out.count("assistant>") == 2


# --- settings objects refuse as the command line does -------------------------------------------------


@pytest.mark.parametrize("make, phrase", [
    (lambda: Sampling(temperature=-0.1), "--temperature"), (lambda: Sampling(top_p=math.nan), "finite"),
    (lambda: Sampling(top_k=True), "finite number"), (lambda: Sampling(max_new_tokens=-3), "--max-new-tokens"),
    (lambda: Recipe(seed=2**40), "--seed"), (lambda: Recipe(preset="x"), "unknown --preset"),
    (lambda: FusionBench(modes=()), "--modes is empty"),
    (lambda: TrainArgs(stage="clip", data="d", image_folder=".", out="o", lr=math.inf), "--lr is inf"),
    (lambda: TrainArgs(stage="clip", data="d", image_folder=".", out="o", tasks=("",)), "task names"),
    (lambda: TrainArgs(stage="clip", data="d", image_folder=".", out="o", weight_decay=math.nan), "--weight-decay"),
])
def test_library_settings_refuse_alike(make, phrase):
    one_line_error(make, phrase)


def test_good_flags_parse_to_the_settings():
    args = parse_args(["bench", "fusion", "--steps", "3", "--seed", str(2**32 - 1)])
    assert from_flags(FusionBench, args, FusionBench(), **BENCH_FLAGS).recipe.seed == 2**32 - 1
