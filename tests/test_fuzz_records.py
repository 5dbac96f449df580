"""Malformed and edge-case LLaVA JSON, fed to training and to evaluation: every case ends in a
one-line error naming the problem and the record (the command line: `error: ...`, exit 2), or
in a correct result. Nothing crashes with a traceback, and nothing is trained or generated
before the whole file has been checked.

The table holds file-level cases, then every way a record can be bad, each written between
two good records (so the bad one is record 1), then edge cases that are fine. Training builds
its dataset with the function `omnilm train` uses (`omnilm.train.stages._dataset`); evaluation
runs `omnilm eval` on a tiny saved model. A few full `omnilm train` runs close the file.
"""

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import one_line_error
from PIL import Image

from omnilm import OmniModel
from omnilm.cli import main
from omnilm.data import Processor, train_tokenizer
from omnilm.data.llava_json import read_records
from omnilm.eval.vqa import evaluate_vqa
from omnilm.train import TrainArgs
from omnilm.train.stages import _dataset

SYSTEM = "You answer questions about colours."
COLOURS = {"red.png": (255, 0, 0), "blue.png": (0, 0, 255), "sub/green.png": (0, 255, 0)}
MAX_SEQ_LEN = 256
LONG = " ".join(["colour"] * 3000)  # far past MAX_SEQ_LEN tokens


def turn(role, value):
    return {"from": role, "value": value}


def good(rid="a", image="red.png", question="What colour is it?", answer="red", **extra):
    marker = "<image>\n" if image is not None else ""
    record = {"id": rid, "task": "colour",
              "conversations": [turn("human", marker + question), turn("gpt", answer)], **extra}
    if image is not None:
        record["image"] = image
    return record


def convs(*turns, **extra):
    """A record with these turns (and no image unless `extra` gives one)."""
    return {"id": "bad", "task": "colour", "conversations": list(turns), **extra}


def H(value="What colour is it?"):
    return turn("human", value)


def HI(value="What colour is it?"):  # a human turn that shows an image
    return turn("human", "<image>\n" + value)


def G(value="red"):
    return turn("gpt", value)


@dataclass
class Case:
    name: str
    data: bytes | list  # the file: raw bytes, or records written as JSON
    parts: tuple[str, ...] = ()  # an error whose one line holds each of these; () means it is fine
    kept: int = 0  # when fine: the records training keeps
    questions: int = 0  # when fine: the questions evaluation asks
    eval_parts: tuple[str, ...] | None = None  # where evaluation differs from training (None: the same)

    def write(self, path: Path) -> Path:
        path.write_bytes(self.data if isinstance(self.data, bytes) else json.dumps(self.data).encode())
        return path


def _bad_record(name, record, *parts) -> Case:
    # The bad record sits between two good ones: the message must name record 1 and its id.
    rid = record.get("id") if isinstance(record, dict) else None
    named = ("record 1", f"(id {rid!r})") if isinstance(rid, str) and rid else ("record 1",)
    return Case(name, [good("first"), record, good("last")], named + parts)


def _fine(name, records, kept=None, questions=None) -> Case:
    return Case(name, records, (), len(records) if kept is None else kept,
                len(records) if questions is None else questions)


def cases() -> list[Case]:
    out = []
    # --- the file -----------------------------------------------------------------------------
    valid = json.dumps([good()]).encode()
    out += [
        Case("not_json", b"not json at all", ("data.json", "is not valid JSON")),
        Case("truncated_json", valid[:-5], ("data.json", "is not valid JSON", "line 1")),
        Case("json_lines", b"\n".join(json.dumps(good(str(i))).encode() for i in range(3)), ("JSON Lines",)),
        Case("empty_file", b"", ("data.json is empty",)),
        Case("blank_file", b"  \n\t\n", ("data.json is empty",)),
        Case("empty_list", b"[]", ("holds no records",)),
        Case("deep_nesting", b"[" * 100_000 + b"]" * 100_000, ("nests JSON too deeply",)),
        Case("latin1_bytes", valid.replace(b"red", "caf\u00e9".encode("latin-1")), ("is not UTF-8", "0xe9")),
        Case("stray_ff_byte", valid[:10] + b"\xff" + valid[10:], ("is not UTF-8", "byte 10 is 0xff")),
        Case("utf16_file", json.dumps([good()]).encode("utf-16"), ("is not UTF-8",)),
        Case("utf8_bom", b"\xef\xbb\xbf" + valid, (), 1, 1),
    ]
    for name, value in [("dict", {"conversations": []}), ("str", "records"), ("int", 3), ("float", 2.5),
                        ("bool", True), ("null", None)]:
        out.append(Case(f"file_is_{name}", json.dumps(value).encode(), ("data.json holds a JSON",)))

    # --- records that are not objects, ids --------------------------------------------------------
    for name, value in [("null", None), ("str", "oops"), ("int", 3), ("float", 2.5), ("bool", True), ("list", []),
                        ("nested_list", [good()]), ("deeply_nested", json.loads("[" * 900 + "]" * 900))]:
        out.append(_bad_record(f"record_{name}", value, "the record is", "not an object"))
    for name, value in [("null", None), ("empty", ""), ("list", ["a"]), ("dict", {"a": 1}), ("bool", True),
                        ("float", 1.5)]:
        out.append(_bad_record(f"id_{name}", good(value), "id is", "give every record an id"))
    out.append(_bad_record("id_missing", {k: v for k, v in good().items() if k != "id"}, "id is missing"))

    # --- conversations and turns ------------------------------------------------------------------
    for name, value in [("null", None), ("str", "Q: what? A: red"), ("dict", {"human": "x"}), ("empty", []),
                        ("int", 3)]:
        out.append(_bad_record(f"conversations_{name}", {"id": "bad", "task": "colour", "conversations": value},
                               "conversations is", "non-empty list"))
    out.append(_bad_record("conversations_missing", {"id": "bad", "task": "colour"}, "conversations is missing"))
    for name, value in [("null", None), ("str", "hello"), ("int", 3), ("list", ["human", "hi"]),
                        ("no_value", {"from": "human"}), ("no_from", {"value": "hi"}),
                        ("openai_style", {"role": "user", "content": "hi"})]:
        out.append(_bad_record(f"turn_{name}", convs(value, G()), "conversations[0] is", '{"from"'))
    for where, make in [("human", lambda v: convs(H(v), G())), ("gpt", lambda v: convs(H(), G(v)))]:
        j = 0 if where == "human" else 1
        for name, value in [("null", None), ("int", 3), ("list", ["red"]), ("dict", {"text": "red"}),
                            ("bool", False)]:
            out.append(_bad_record(f"{where}_value_{name}", make(value), f"conversations[{j}].value is",
                                   "not a string"))
        for name, value in [("empty", ""), ("spaces", "   "), ("newlines", "\n\t\n")]:
            out.append(_bad_record(f"{where}_value_{name}", make(value), f"conversations[{j}].value is empty"))
        for token_name, token in [("eos", "</s>"), ("bos", "<s>"), ("pad", "<pad>")]:
            out.append(_bad_record(f"{where}_special_{token_name}", make(f"red {token} blue"),
                                   f"conversations[{j}].value holds {token!r}", "special token"))
        out.append(_bad_record(f"{where}_lone_surrogate", make("red \ud800"), "unpaired UTF-16 surrogate"))
    for name, role in [("bot", "bot"), ("capital_human", "Human"), ("capital_gpt", "GPT"), ("empty", ""),
                       ("null", None), ("int", 1), ("model", "model"), ("tool", "tool")]:
        out.append(_bad_record(f"role_{name}", convs(turn(role, "What colour?"), G()), "conversations[0].from is"))
    orders = {
        "gpt_first": ([G(), H()], "conversations[0].from is 'gpt' where a human turn belongs"),
        "two_humans": ([H(), H(), G()], "conversations[1].from is 'human' where a gpt turn belongs"),
        "two_gpts": ([H(), G(), G()], "conversations[2].from is 'gpt' where a human turn belongs"),
        "system_second": ([H(), turn("system", SYSTEM), G()], "conversations[1].from is 'system' after the first"),
        "system_last": ([H(), G(), turn("system", SYSTEM)], "conversations[2].from is 'system' after the first"),
        "two_systems": ([turn("system", SYSTEM), turn("system", SYSTEM), H(), G()], "conversations[1].from"),
        "system_only": ([turn("system", SYSTEM)], "ends without a gpt answer"),
        "human_only": ([H()], "ends without a gpt answer"),
        "ends_on_human": ([H(), G(), H()], "ends without a gpt answer"),
        "user_then_gpt_then_user": ([turn("user", "hi"), turn("assistant", "hello"), turn("user", "bye")],
                                    "ends without a gpt answer"),
    }
    for name, (turns, part) in orders.items():
        out.append(_bad_record(f"order_{name}", convs(*turns), part))

    # --- image markers ----------------------------------------------------------------------------
    for name, spelling in [("capital", "<Image>"), ("upper", "<IMAGE>"), ("space_before", "< image>"),
                           ("space_after", "<image >"), ("spaces_capital", "< Image >"), ("mixed_case", "<iMaGe>"),
                           ("tab", "<\timage>")]:
        out.append(_bad_record(f"marker_{name}", convs(H(spelling + "\nWhat colour?"), G(), image="red.png"),
                               repr(spelling), "not the image marker", "exactly <image>"))
    out += [
        _bad_record("marker_in_gpt_turn", convs(HI(), G("<image>\nred"), image=["red.png", "blue.png"]),
                    "conversations[1].value holds an <image> marker in a 'gpt' turn"),
        _bad_record("marker_in_system_turn", convs(turn("system", "<image>\n" + SYSTEM), HI(), G(),
                                                   image=["red.png", "blue.png"]), "in a 'system' turn"),
        _bad_record("image_without_marker", convs(H(), G(), image="red.png"),
                    "has 0 <image> markers but the record has 1 images"),
        _bad_record("marker_without_image", convs(HI(), G()), "has 1 <image> markers but the record has 0 images"),
        _bad_record("surplus_image", convs(HI(), G(), image=["red.png", "blue.png"]), "1 <image> markers but the record has 2"),
        _bad_record("surplus_marker", convs(H("<image>\n<image>\nWhich?"), G(), image="red.png"),
                    "2 <image> markers but the record has 1"),
        _bad_record("markers_but_empty_list", convs(HI(), G(), image=[]), "1 <image> markers but the record has 0"),
    ]

    # --- the image field and its files ------------------------------------------------------------
    for name, value, field in [("int", 3, "image is 3"), ("float", 2.5, "image is 2.5"), ("bool", True, "image is true"),
                               ("dict", {"path": "red.png"}, "image is"), ("list_of_ints", [1, 2], "image[0] is 1"),
                               ("list_with_null", [None], "image[0] is null"), ("mixed_list", ["red.png", 3],
                                                                                 "image[1] is 3"),
                               ("empty_string", "", 'image is ""'), ("blank_string", "   ", "image is"),
                               ("list_of_empty", [""], "image[0]"), ("nul_byte", "red\x00.png", "image is")]:
        n = len(value) if isinstance(value, list) else 1
        out.append(_bad_record(f"image_{name}", convs(H("<image>\n" * n + "What?"), G(), image=value), field))
    for name, path in [("absolute_outside", "/etc/hostname"), ("absolute_inside", "{folder}/red.png"),
                       ("dotdot", "../red.png"), ("dotdot_deep", "sub/../../red.png"), ("dotdot_only", "..")]:
        out.append(_bad_record(f"path_{name}", convs(HI(), G(), image=path), "outside the image folder",
                               "paths outside it are refused"))
    for name, path, part in [("missing", "nope.png", '"nope.png" is not a file'),
                             ("missing_in_list", ["red.png", "gone.png"], '"gone.png" is not a file'),
                             ("directory", "dir.png", '"dir.png" is a folder'),
                             ("corrupt", "corrupt.png", "cannot read image"), ("zero_bytes", "zero.png", "cannot read image"),
                             ("text_file", "text.png", "cannot read image"),
                             ("corrupt_second", ["red.png", "corrupt.png"], "image[1] cannot read image")]:
        n = len(path) if isinstance(path, list) else 1
        out.append(_bad_record(f"file_{name}", convs(H("<image>\n" * n + "What?"), G(), image=path), part))

    # --- other fields omnilm reads ------------------------------------------------------------------
    for name, extra, part in [("task_list", {"task": ["colour"]}, "task is"), ("task_int", {"task": 3}, "task is 3"),
                              ("turn_tasks_short", {"turn_tasks": []}, "turn_tasks is []"),
                              ("turn_tasks_long", {"turn_tasks": ["colour", "count"]}, "one task name"),
                              ("turn_tasks_ints", {"turn_tasks": [3]}, "turn_tasks is [3]"),
                              ("turn_tasks_str", {"turn_tasks": "colour"}, "turn_tasks is"),
                              ("n_objects_str", {"n_objects": "two"}, "n_objects is"),
                              ("n_objects_negative", {"n_objects": -1}, "n_objects is -1"),
                              ("n_objects_bool", {"n_objects": True}, "n_objects is true")]:
        out.append(_bad_record(f"field_{name}", good("bad") | extra, part))

    # --- too long for the model ---------------------------------------------------------------------
    many = [t for _ in range(400) for t in (H(), G())]
    out += [
        _bad_record("huge_number_of_turns", convs(*many), "conversations", "tokens"),
        _bad_record("very_long_question", convs(H(LONG), G()), "conversations", "tokens"),
        # Evaluation never reads its last reference answer into the model, so only training minds.
        Case("very_long_answer", [good("first"), convs(H(), G(LONG)), good("last")],
             ("record 1", "(id 'bad')", "conversations", "tokens"), questions=3, eval_parts=()),
    ]

    # --- fine, if unusual ---------------------------------------------------------------------------
    out += [
        _fine("system_first", [good(), convs(turn("system", SYSTEM), HI(), G(), image="red.png")]),
        _fine("user_assistant_roles", [convs(turn("user", "<image>\nWhat colour?"), turn("assistant", "red"),
                                             image="red.png")]),
        _fine("multi_turn", [convs(HI(), G(), H("And now?"), G("blue"), H("Sure?"), G("yes"), image="red.png")],
              questions=3),
        _fine("text_only", [convs(H(), G()), good()]),
        _fine("two_images_two_markers", [convs(H("<image>\nFirst; <image>\nsecond?"), G(), image=["red.png",
                                                                                                  "blue.png"])]),
        _fine("images_in_later_turns", [convs(HI(), G(), H("<image>\nAnd this?"), G("blue"),
                                              image=["red.png", "blue.png"])], questions=2),
        _fine("empty_image_list_no_marker", [convs(H(), G(), image=[])]),
        _fine("integer_ids", [good(7), good(8)]),
        _fine("duplicate_ids", [good("same"), good("same", image="blue.png", answer="blue")]),
        _fine("unicode_text", [good(question="Quelle couleur ? 色は？ 🎨", answer="rouge \u00e9")]),
        _fine("extra_fields", [good(source="coco", meta={"a": [1, 2]})]),
        _fine("task_null", [good(task=None)]),
        _fine("no_task", [{k: v for k, v in good().items() if k != "task"}]),
        _fine("dot_slash_path", [good(image="./red.png")]),
        _fine("dotdot_inside", [good(image="sub/../red.png")]),
        _fine("subfolder", [good(image="sub/green.png", answer="green")]),
        _fine("image_as_list_of_one", [good(image=["red.png"])]),
        _fine("shared_image", [good(str(i)) for i in range(5)]),
        _fine("turn_tasks", [convs(HI(), G(), H("And?"), G(), image="red.png", turn_tasks=["colour", "count"])],
              questions=2),
        _fine("n_objects", [good(n_objects=2), good("b", n_objects=0)]),
        _fine("captions_are_not_questions", [good(), good("cap", task="caption")], kept=1, questions=1),
        Case("only_captions", [good("c1", task="caption"), good("c2", task="caption")],
             ("has no records other than those with task in ['caption']",)),
    ]
    return out


CASES = cases()
assert len(CASES) >= 100 and len({c.name for c in CASES}) == len(CASES)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """An image folder with good and broken files, and a tiny model saved with its tokenizer."""
    root = tmp_path_factory.mktemp("fuzz")
    folder = root / "images"
    (folder / "sub").mkdir(parents=True)
    for name, rgb in COLOURS.items():
        Image.new("RGB", (24, 24), rgb).save(folder / name)
    (folder / "corrupt.png").write_bytes((folder / "red.png").read_bytes()[:60])
    (folder / "zero.png").write_bytes(b"")
    (folder / "text.png").write_text("not an image")
    (folder / "dir.png").mkdir()
    texts = [f"{SYSTEM} USER: <image>\nWhat colour is it? ASSISTANT: {c}</s>" for c in ("red", "blue", "green")] * 4
    tokenizer = train_tokenizer(texts, vocab_size=300, system_prompt=SYSTEM)
    model = OmniModel.from_preset(
        "tiny", image_token_id=tokenizer.image_token_id,
        text=dict(vocab_size=tokenizer.vocab_size, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, mlp_dim=64,
                  max_seq_len=MAX_SEQ_LEN, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                  pad_token_id=tokenizer.pad_id),
        vision=dict(image_size=32, patch_size=16, dim=32, n_layers=1, n_heads=2, mlp_dim=64))
    model.save_pretrained(root / "model")
    Processor.for_model(model, tokenizer=tokenizer).save_pretrained(root / "model")
    return root


def _data(case: Case, world: Path, tmp_path: Path) -> Path:
    if isinstance(case.data, list):  # the absolute-path cases name the real image folder
        text = json.dumps(case.data).replace("{folder}", str(world / "images"))
        return Case(case.name, json.loads(text)).write(tmp_path / "data.json")
    return case.write(tmp_path / "data.json")


@pytest.fixture(scope="module")
def loaded(world):
    model = OmniModel.from_pretrained(world / "model").eval()
    return model, Processor.for_model(model, world / "model")


def _train_dataset(world: Path, loaded, data: Path, **kw):
    # The dataset `omnilm train --stage instruct --init MODEL` builds, through the same function.
    model, processor = loaded
    args = TrainArgs(stage="instruct", data=data, image_folder=world / "images", out=world / "unused",
                     init=world / "model", **kw)
    return _dataset(args, processor, max_length=model.config.text.max_seq_len)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_training_data(case, world, loaded, tmp_path):
    data = _data(case, world, tmp_path)
    if case.parts:
        one_line_error(lambda: _train_dataset(world, loaded, data), *case.parts)
    else:
        dataset = _train_dataset(world, loaded, data)
        assert len(dataset) == case.kept and not dataset.skipped
        for i in range(len(dataset)):  # every kept record yields a sample
            sample = dataset[i]
            assert (sample["labels"] != -100).any()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_eval_command(case, world, tmp_path, capsys):
    data = _data(case, world, tmp_path)
    argv = ["eval", str(world / "model"), "--data", str(data), "--image-folder", str(world / "images"),
            "--max-new-tokens", "2", "--device", "cpu"]
    parts = case.parts if case.eval_parts is None else case.eval_parts
    if parts:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err
        for part in parts:
            assert part in err, err
    else:
        main(argv)
        out = capsys.readouterr().out
        assert f"| **overall** | {case.questions} |" in out, out


# --- --skip-bad: every kind of bad record is left out and counted ------------------------------------

BAD_RECORDS = [c for c in CASES if c.parts and c.eval_parts is None and isinstance(c.data, list) and len(c.data) == 3]


def _kind_counts(report: str) -> dict[str, int]:
    counts = re.search(r"records \(([^)]*)\); first", report).group(1)
    return {kind: int(n) for n, kind in (item.split(" ", 1) for item in counts.split(", "))}


@pytest.mark.parametrize("n_bad", [1, 7, len(BAD_RECORDS)])
def test_skip_bad_counts_every_kind(world, loaded, tmp_path, n_bad):
    # Good records interleaved with the first n_bad bad ones of the table.
    bad = [c.data[1] for c in BAD_RECORDS[:n_bad]]
    records = [good("g0")]
    for i, record in enumerate(bad):
        records += [record, good(f"g{i + 1}")]
    data = Case("mixed", records).write(tmp_path / "data.json")
    data.write_text(data.read_text().replace("{folder}", str(world / "images")))
    n_good = len(records) - n_bad
    first = next(i for i, r in enumerate(records) if r is bad[0])

    with pytest.warns(UserWarning) as caught:
        dataset = _train_dataset(world, loaded, data, skip_bad=True)
    reports = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert len(reports) == 1 and "\n" not in reports[0]  # reported once, on one line
    assert f"skipped {n_bad} of {len(records)} records (" in reports[0]
    assert f"first: record {first}" in reports[0]
    assert len(dataset) == n_good and len(dataset.skipped) == n_bad
    assert [b.index for b in dataset.skipped] == [i for i, r in enumerate(records) if i % 2]
    counts = _kind_counts(reports[0])
    assert sum(counts.values()) == n_bad
    assert counts == {kind: sum(b.problem.kind == kind for b in dataset.skipped) for kind in counts}

    model, processor = loaded
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # evaluation reports in its summary, not by warning
        summary, predictions = evaluate_vqa(model, processor, read_records(data), world / "images",
                                            max_new_tokens=2, progress=False, skip_bad=True)
    assert summary["n"] == len(predictions) == n_good
    assert summary["skipped"]["records"] == n_bad and summary["skipped"]["of"] == len(records)
    assert summary["skipped"]["kinds"] == counts
    assert str(data) in summary["skipped"]["report"]
    assert {p["id"] for p in predictions} == {f"g{i}" for i in range(n_good)}


def test_bad_image_is_found_before_any_work(world, tmp_path, capsys):
    # A corrupt image in the last record stops `omnilm train` and `omnilm eval` before a step or a
    # generation, naming the record; nothing is written. --skip-bad trains on the rest.
    records = [good(f"g{i}", image=["red.png", "blue.png"][i % 2], answer=["red", "blue"][i % 2]) for i in range(7)]
    records.append(good("late", image="corrupt.png"))
    data = Case("late", records).write(tmp_path / "data.json")
    train_argv = ["train", "--stage", "instruct", "--data", str(data), "--image-folder", str(world / "images"),
                  "--init", str(world / "model"), "--steps", "1", "--batch-size", "2", "--no-progress"]
    for argv in (train_argv + ["--out", str(tmp_path / "run")],
                 ["eval", str(world / "model"), "--data", str(data), "--image-folder", str(world / "images")]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and "\n" not in err, err
        assert err.startswith(f"error: {data}: record 7 (id 'late'): image cannot read image"), err
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "model").exists()

    with pytest.warns(UserWarning, match=r"skipped 1 of 8 records \(1 bad image\); first: record 7 \(id 'late'\)"):
        main(train_argv + ["--out", str(tmp_path / "skip"), "--skip-bad"])
    assert (tmp_path / "skip" / "model" / "model.safetensors").is_file()


def test_clip_stage_checks_its_captions(world, tmp_path, capsys):
    # Stage clip pairs one image with one caption: a caption record with two images, or a caption
    # too long for the text tower, is an error naming it, or skipped and counted with --skip-bad.
    captions = [good(f"c{i}", task="caption", answer=f"a {c} square.")
                for i, c in enumerate(["red", "blue", "red", "blue"])]
    two = convs(H("<image>\n<image>\nDescribe them."), G("two squares."), image=["red.png", "blue.png"],
                task="caption")
    long = good("long", task="caption", answer=LONG)
    data = Case("clip", [*captions, two, long]).write(tmp_path / "data.json")
    argv = ["train", "--stage", "clip", "--data", str(data), "--image-folder", str(world / "images"),
            "--steps", "1", "--batch-size", "2", "--no-progress", "--config", json.dumps({"vision": dict(
                image_size=32, patch_size=16, dim=32, n_layers=1, n_heads=2, mlp_dim=64)})]
    with pytest.raises(SystemExit) as exit_:
        main(argv + ["--out", str(tmp_path / "stop")])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "\n" not in err and "record 4 (id 'bad'): image lists 2 images" in err, err
    with pytest.warns(UserWarning, match=r"skipped 2 of 6 records \((1 bad image field, 1 too long|1 too long, "
                                         r"1 bad image field)\)"):
        main(argv + ["--out", str(tmp_path / "skip"), "--skip-bad"])
    assert (tmp_path / "skip" / "model").is_dir()
