"""LlavaDataset and collate: answer-only labels that agree with inference-time tokenization,
image tokens and pixel order, right-padded batches, and one-line errors for bad records."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from PIL import Image

from omnilm.data import ImageProcessor, LlavaDataset, Processor, collate, render_chat, train_tokenizer
from omnilm.errors import OmniInputError

IGNORE = -100
SEQ = 4  # tokens per image
SYSTEM = "You answer questions about shapes."
TEXTS = [
    "a red circle is left of a blue square.",
    "there are three green triangles above the circle.",
    "USER: what colour is the square? ASSISTANT: blue</s>",
    "USER: how many shapes are there? ASSISTANT: three shapes.</s>",
    SYSTEM,
] * 4
COLOURS = {"red.png": (255, 0, 0), "blue.png": (0, 0, 255), "green.png": (0, 255, 0)}


@pytest.fixture(scope="module")
def processor():
    return Processor(train_tokenizer(TEXTS, vocab_size=400), ImageProcessor(size=32, crop_size=32), SEQ)


def _record(rid, image=None, *turns, system=None, **extra):
    roles = ["human", "gpt"] * len(turns)
    conversations = [{"from": role, "value": value} for role, value in zip(roles, turns)]
    if system is not None:
        conversations.insert(0, {"from": "system", "value": system})
    record = {"id": rid, "conversations": conversations, **extra}
    if image is not None:
        record["image"] = image
    return record


MULTI_TURN = _record(
    "multi", "red.png",
    "<image>\nWhat colour is the circle?", "Red.",
    "How many shapes are there?", "three shapes",
    "Is there a blue square?", "yes, left of the circle",
    system=SYSTEM,
)
TWO_IMAGES = _record(
    "two", ["blue.png", "green.png"],
    "First: <image>\nWhat colour is it?", "blue",
    "Second: <image>\nAnd this one?", "green",
)
TEXT_ONLY = _record("text", None, "What colour is the sky?", "blue", task="text")


def _write(tmp_path, records, name="data.json"):
    for file, colour in COLOURS.items():
        if not (tmp_path / file).exists():
            Image.new("RGB", (40, 36), colour).save(tmp_path / file)
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


def _runs(labels):
    # Contiguous stretches of supervised positions, as (start, end) index pairs.
    runs, start = [], None
    for i, label in enumerate([*labels.tolist(), IGNORE]):
        if label != IGNORE and start is None:
            start = i
        elif label == IGNORE and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _answers(record):
    return [turn["value"] for turn in record["conversations"] if turn["from"] == "gpt"]


def test_labels_supervise_exactly_the_answers(tmp_path, processor):
    tok = processor.tokenizer
    sample = LlavaDataset(_write(tmp_path, [MULTI_TURN]), tmp_path, processor)[0]
    ids, labels = sample["input_ids"], sample["labels"]
    assert ids.dtype == labels.dtype == torch.long and ids.shape == labels.shape
    supervised = labels != IGNORE
    assert torch.equal(labels[supervised], ids[supervised])
    runs = _runs(labels)
    answers = _answers(MULTI_TURN)
    assert len(runs) == len(answers)
    for (start, end), answer in zip(runs, answers):
        # The space after "ASSISTANT:" rides on the answer's first token: exactly " answer</s>".
        assert tok.decode(ids[start:end], skip_special_tokens=False) == " " + answer + "</s>"
        assert tok.decode(ids[start:start + 1]).startswith(" ")
        assert ids[end - 1] == tok.eos_id
        # Just before: the role tag's ":" (the space is not a token of its own), unsupervised.
        assert tok.decode(ids[start - 3:start]).endswith("ASSISTANT:")
    # Nothing else: system prompt, user turns, role tags and image tokens carry no label.
    text = tok.decode(ids[~supervised], skip_special_tokens=False)
    assert text.startswith("<s>" + SYSTEM + " USER: <image>")
    assert text.count("ASSISTANT:") == 3 and "Red" not in text and "</s>" not in text
    assert not supervised[ids == tok.image_token_id].any()
    assert not supervised[0]  # BOS


@pytest.mark.parametrize("record", [MULTI_TURN, TWO_IMAGES, TEXT_ONLY], ids=lambda r: r["id"])
def test_labels_are_what_generation_produces(tmp_path, processor, record):
    # For each answer: the inference prompt (the chat so far, ending in "ASSISTANT:") must
    # tokenize to a prefix of the training sequence, and the supervised run after it must be
    # the ids that tokenizing prompt + " answer</s>" puts after the prompt.
    sample = LlavaDataset(_write(tmp_path, [record]), tmp_path, processor)[0]
    ids, runs = sample["input_ids"].tolist(), _runs(sample["labels"])
    turns = record["conversations"]
    gpt_indices = [j for j, turn in enumerate(turns) if turn["from"] == "gpt"]
    for (start, end), j in zip(runs, gpt_indices, strict=True):
        prompt, _ = render_chat(turns[:j], add_generation_prompt=True)
        assert prompt.endswith("ASSISTANT:")
        n_images = prompt.count("<image>")
        images = [tmp_path / name for name in ([record["image"]] if isinstance(record.get("image"), str)
                                               else record.get("image", []))][:n_images]
        prompt_ids = processor(prompt, images=images)["input_ids"][0].tolist()
        full_ids = processor(prompt + " " + turns[j]["value"] + "</s>", images=images)["input_ids"][0].tolist()
        assert full_ids[:len(prompt_ids)] == prompt_ids
        assert ids[:len(prompt_ids)] == prompt_ids and start == len(prompt_ids)
        assert ids[start:end] == full_ids[len(prompt_ids):]


def test_two_images_expand_and_keep_marker_order(tmp_path, processor):
    dataset = LlavaDataset(_write(tmp_path, [TWO_IMAGES]), tmp_path, processor)
    sample = dataset[0]
    assert (sample["input_ids"] == processor.tokenizer.image_token_id).sum() == 2 * SEQ
    assert sample["pixel_values"].shape == (2, 3, 32, 32) and sample["pixel_values"].dtype == torch.float32
    expected = processor.image_processor([tmp_path / "blue.png", tmp_path / "green.png"])
    assert torch.equal(sample["pixel_values"], expected)
    assert not torch.equal(expected[0], expected[1])


def test_text_only_record(tmp_path, processor):
    sample = LlavaDataset(_write(tmp_path, [TEXT_ONLY]), tmp_path, processor)[0]
    assert sample["pixel_values"] is None and sample["id"] == "text"
    assert (sample["input_ids"] == processor.tokenizer.image_token_id).sum() == 0
    assert len(_runs(sample["labels"])) == 1


def test_collate_pads_right_and_keeps_image_order(tmp_path, processor):
    dataset = LlavaDataset(_write(tmp_path, [TEXT_ONLY, TWO_IMAGES, MULTI_TURN]), tmp_path, processor)
    samples = [dataset[i] for i in range(3)]
    batch = collate(samples, pad_id=processor.tokenizer.pad_id)
    lengths = [len(s["input_ids"]) for s in samples]
    T = max(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, T)
    for b, (sample, n) in enumerate(zip(samples, lengths)):
        assert torch.equal(batch["input_ids"][b, :n], sample["input_ids"])
        assert torch.equal(batch["labels"][b, :n], sample["labels"])
        assert (batch["input_ids"][b, n:] == processor.tokenizer.pad_id).all()
        assert (batch["labels"][b, n:] == IGNORE).all()
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (T - n)
    assert min(lengths) < T  # some padding was really tested
    expected = torch.cat([samples[1]["pixel_values"], samples[2]["pixel_values"]])  # blue, green, red
    assert torch.equal(batch["pixel_values"], expected)
    assert batch["ids"] == ["text", "two", "multi"]
    # Image tokens across the batch, row by row, match the images one to one.
    assert (batch["input_ids"] == processor.tokenizer.image_token_id).sum() == len(expected) * SEQ
    assert collate([samples[0]], pad_id=0)["pixel_values"] is None


BAD = {
    "missing_file": (_record("missing_file", "nope.png", "<image>\nWhat?", "red"), "image \"nope.png\" is not a file"),
    "marker_no_image": (_record("marker_no_image", None, "<image>\nWhat?", "red"),
                        "conversations has 1 <image> markers but the record has 0 images"),
    "image_no_marker": (_record("image_no_marker", "red.png", "What?", "red"),
                        "conversations has 0 <image> markers but the record has 1 images"),
    "no_conversations": ({"id": "no_conversations", "image": "red.png"}, "conversations is missing"),
    "wrong_roles": (
        {"id": "wrong_roles", "conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "x"}]},
        "conversations[0].from is 'gpt' where a human turn belongs",
    ),
    "empty_turn": (_record("empty_turn", None, "What?", "  "), "conversations[1].value is empty"),
    "marker_in_answer": (_record("marker_in_answer", "red.png", "What?", "<image>\nred"), "conversations[1].value holds an <image> marker in a 'gpt' turn"),
    "no_answer": ({"id": "no_answer", "conversations": [{"from": "human", "value": "x"}]}, "conversations ends without a gpt answer"),
    "bad_turn": ({"id": "bad_turn", "conversations": [{"from": "human", "value": 3}]},
                 "conversations[0].value is 3, not a string"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_record_is_one_line_naming_it(tmp_path, processor, case):
    record, expected = BAD[case]
    path = _write(tmp_path, [TEXT_ONLY, record])
    with pytest.raises(OmniInputError) as info:
        LlavaDataset(path, tmp_path, processor)
    message = str(info.value)
    assert f"record 1 (id '{case}'): {expected}" in message and "--skip-bad (skip_bad=True)" in message
    assert str(path) in message and "\n" not in message


def test_record_that_is_not_a_dict(tmp_path, processor):
    with pytest.raises(OmniInputError, match=r"record 1: the record is \"oops\", not an object"):
        LlavaDataset(_write(tmp_path, [TEXT_ONLY, "oops"]), tmp_path, processor)


def test_skip_bad_keeps_good_records_and_counts(tmp_path, processor):
    bad = [record for record, _ in BAD.values()]
    path = _write(tmp_path, [TEXT_ONLY, *bad, "oops", TWO_IMAGES])
    with pytest.warns(UserWarning, match=rf"skipped {len(bad) + 1} of {len(bad) + 3} records"):
        dataset = LlavaDataset(path, tmp_path, processor, skip_bad=True)
    assert dataset.ids == ["text", "two"] and len(dataset) == 2
    assert [bad.id for bad in dataset.skipped] == [*BAD, None]
    assert [bad.index for bad in dataset.skipped] == list(range(1, len(BAD) + 2))
    assert dataset[1]["pixel_values"].shape[0] == 2


def test_bad_files_name_the_file(tmp_path, processor):
    with pytest.raises(OmniInputError, match="cannot read .*absent.json"):
        LlavaDataset(tmp_path / "absent.json", tmp_path, processor)
    (tmp_path / "broken.json").write_text('[{"id": 1,')
    with pytest.raises(OmniInputError, match=r"broken.json is not valid JSON .*line 1"):
        LlavaDataset(tmp_path / "broken.json", tmp_path, processor)
    (tmp_path / "dict.json").write_text('{"conversations": []}')
    with pytest.raises(OmniInputError, match="dict.json holds a JSON dict, but LLaVA data is a list"):
        LlavaDataset(tmp_path / "dict.json", tmp_path, processor)


def test_tasks_filter_and_extra_fields(tmp_path, processor):
    records = [
        TEXT_ONLY,
        {**MULTI_TURN, "task": "colour", "turn_tasks": ["colour", "count", "exist"]},
        {**TWO_IMAGES, "task": "compare"},
    ]
    dataset = LlavaDataset(_write(tmp_path, records), tmp_path, processor, tasks={"colour", "text"})
    assert dataset.ids == ["text", "multi"]
    assert dataset.records[1]["turn_tasks"] == ["colour", "count", "exist"]
    with pytest.raises(OmniInputError, match=r"has no records with task in \['nothing'\]"):
        LlavaDataset(_write(tmp_path, records), tmp_path, processor, tasks={"nothing"})


def test_max_length(tmp_path, processor):
    path = _write(tmp_path, [TEXT_ONLY, TWO_IMAGES])
    n = len(LlavaDataset(path, tmp_path, processor)[1]["input_ids"])
    assert len(LlavaDataset(path, tmp_path, processor, max_length=n)) == 2
    with pytest.raises(OmniInputError, match=rf"record 1 \(id 'two'\): conversations is {n} tokens \(2 images of {SEQ} "
                                             rf"tokens each\), over max_length={n - 1}"):
        LlavaDataset(path, tmp_path, processor, max_length=n - 1)
    with pytest.warns(UserWarning, match="skipped 1 of 2"):
        assert LlavaDataset(path, tmp_path, processor, max_length=n - 1, skip_bad=True).ids == ["text"]


def test_cache_images_reads_each_file_once(tmp_path, processor):
    folder = tmp_path / "images"
    folder.mkdir()
    path = _write(folder, [MULTI_TURN, {**MULTI_TURN, "id": "again"}])
    cached = LlavaDataset(path, folder, processor, cache_images=True)
    uncached = LlavaDataset(path, folder, processor)
    first = cached[0]["pixel_values"]
    (folder / "red.png").unlink()  # from now on only the cache can supply it
    assert torch.equal(cached[1]["pixel_values"], first) and torch.equal(cached[0]["pixel_values"], first)
    with pytest.raises(OmniInputError, match=r"record id 'multi': cannot read image .*red.png"):
        uncached[0]


def test_check_decodes_each_image_once_before_training(tmp_path, processor):
    # With the cache on, building the dataset decodes every image once, into the cache: training
    # decodes nothing more. Without it, a broken image is found at build time all the same.
    folder = tmp_path / "images"
    folder.mkdir()
    records = [MULTI_TURN, {**MULTI_TURN, "id": "again"}, TWO_IMAGES]
    cached = LlavaDataset(_write(folder, records), folder, processor, cache_images=True)
    assert set(cached._cache) == {folder / "red.png", folder / "blue.png", folder / "green.png"}
    (folder / "green.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(OmniInputError, match=r"record 2 \(id 'two'\): image\[1\] cannot read image .*green.png"):
        LlavaDataset(folder / "data.json", folder, processor)


def test_cheap_checks_come_before_any_decoding(tmp_path, processor):
    # A structural error late in the file is reported before a single image is decoded.
    from omnilm.data.llava_json import check_records

    decoded = []
    records = [MULTI_TURN, TWO_IMAGES, {"id": "late", "conversations": "oops"}]
    _write(tmp_path, records)
    with pytest.raises(OmniInputError, match=r"record 2 \(id 'late'\): conversations is \"oops\""):
        check_records(records, tmp_path, load=decoded.append)
    assert decoded == []
    checked = check_records(records, tmp_path, load=decoded.append, skip_bad=True)
    assert checked.kept == [0, 1] and sorted(decoded) == sorted({tmp_path / n for n in COLOURS})  # once each
    assert checked.report() == ("records: skipped 1 of 3 records (1 bad conversations); first: record 2 (id 'late'): "
                                "conversations is \"oops\": give a non-empty list of {\"from\": \"human\"|\"gpt\", "
                                "\"value\": \"...\"} turns")


def test_records_of_other_tasks_are_not_read(tmp_path, processor):
    # A stage reads the records of its tasks only: a broken record of another task does not stop it.
    broken = {"id": "other", "task": "count", "conversations": None}
    dataset = LlavaDataset(_write(tmp_path, [TEXT_ONLY, broken]), tmp_path, processor, tasks={"text"})
    assert dataset.ids == ["text"] and not dataset.skipped
    with pytest.raises(OmniInputError, match=r"record 1 \(id 'other'\): conversations is null"):
        LlavaDataset(tmp_path / "data.json", tmp_path, processor, skip_tasks=("text",))


def test_text_only_processor_refuses_images(tmp_path, processor):
    text_only = Processor(processor.tokenizer, None, SEQ)
    path = _write(tmp_path, [TEXT_ONLY, TWO_IMAGES])
    with pytest.raises(OmniInputError, match=r"record 1 \(id 'two'\): image lists 2 images but the model is text-only"):
        LlavaDataset(path, tmp_path, text_only)
