"""Needle-in-a-haystack data: lengths in the model's tokens, needles at the asked depth, held-out
keys, image needles with exactly one image that answers, and records omnilm's LLaVA reader takes."""

import random
import re

import pytest

from conftest import cli_error, one_line_error, run_cli
from omnilm.data import Processor, train_tokenizer
from omnilm.data import haystack as hs
from omnilm.data.chat import render_chat, render_turns
from omnilm.data.image import ImageProcessor
from omnilm.data.llava_json import LlavaDataset, check_records, read_records
from omnilm.data.shapeworld import COLOURS, SHAPES, make_example


@pytest.fixture(scope="module")
def tokenizer():
    """A BPE trained on ShapeWorld chats, as the demo's: captions compress, keys do not."""
    chats = [r["conversations"] for i in range(40) for r in make_example(i, 0, "train").records]
    return train_tokenizer(["".join(text for text, _ in render_turns(c, False)) for c in chats], vocab_size=400)


@pytest.fixture(scope="module")
def tokenizer_dir(tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save(folder)
    return folder


def prompt_of(hay: hs.Haystack, tokenizer, prompt: bool) -> tuple[str, list[int], list[tuple[int, int]]]:
    text, _ = render_chat(hay.conversations, prompt, tokenizer.system_prompt)
    ids, offsets = tokenizer.encode_with_offsets(text)
    return text, ids, offsets


def test_same_generator_same_haystack_and_records(tokenizer):
    count = hs.TokenCount(tokenizer)
    a, b = (hs.build_haystack(random.Random(7), count, 600, keys=3, questions=2) for _ in range(2))
    assert a == b
    assert hs.build_haystack(random.Random(8), count, 600, keys=3, questions=2).conversations != a.conversations
    assert hs.make_record(3, 0, "train", count, 400) == hs.make_record(3, 0, "train", count, 400)
    assert hs.make_record(3, 0, "train", count, 400)[0] != hs.make_record(4, 0, "train", count, 400)[0]


@pytest.mark.parametrize("length", [200, 700, 3000])
def test_prompt_is_the_budget_and_the_needle_at_its_depth(tokenizer, length):
    # The prompt `generate` gets is `length` tokens (or less than a word short), and the needle
    # sits where it was asked, counted in tokens of the filler around it: within one sentence.
    count = hs.TokenCount(tokenizer)
    longest = max(count.text(" " + hs.filler_sentence(random.Random(i))) for i in range(200))
    for depth in (0.0, 0.1, 0.5, 0.77, 1.0):
        hay = hs.build_haystack(random.Random(f"{length}:{depth}"), count, length, depth=depth, prompt=True)
        text, ids, offsets = prompt_of(hay, tokenizer, prompt=True)
        context = hay.conversations[0]["value"].rsplit("\n", 1)[0]
        longest_word = max(count.text(" " + word) for word in context.split())
        assert len(ids) == hay.n_tokens and length - longest_word < hay.n_tokens <= length
        start = text.index(context)
        needle = text.index("remember: ")
        needle_end = text.index(".", needle) + 1
        before = sum(start <= a < needle for a, _ in offsets)
        after = sum(needle_end <= a < start + len(context) for a, _ in offsets)
        actual = before / (before + after)
        if depth in (0.0, 1.0):
            assert actual == depth
        else:
            assert abs(actual - depth) <= longest / (before + after), (depth, actual, before, after)
        assert hay.depths[0] == pytest.approx(actual, abs=longest / (before + after))


def test_training_records_count_every_turn(tokenizer):
    # A record of `length` tokens is what a training run with that max_seq_len reads: all turns.
    count = hs.TokenCount(tokenizer)
    hay = hs.build_haystack(random.Random(0), count, 800, keys=5, questions=4)
    _, ids, _ = prompt_of(hay, tokenizer, prompt=False)
    assert len(ids) == hay.n_tokens and 797 <= hay.n_tokens <= 800
    assert [t["from"] for t in hay.conversations] == ["human", "gpt"] * 4


def test_keys_are_distinct_asked_once_and_held_out(tokenizer):
    count = hs.TokenCount(tokenizer)
    for split in ("train", "test"):
        for seed in range(5):
            hay = hs.build_haystack(random.Random(seed), count, 1500, keys=8, questions=5, split=split)
            context = hay.conversations[0]["value"]
            keys = [needle.split(" is ")[0] for needle in context.split("remember: ")[1:]]
            assert len(keys) == 8 and len(set(keys)) == 8
            assert all(hs.key_split(key) == ("test" if split == "test" else "train") for key in keys)
            questions = [hay.conversations[0]["value"].rsplit("\n", 1)[1]] + \
                [t["value"] for t in hay.conversations[2::2]]
            asked = [q.removeprefix("What is ").removesuffix("?") for q in questions]
            assert len(set(asked)) == 5 and set(asked) <= set(keys)
            for key, answer in zip(asked, hay.answers):
                assert f"remember: {key} is {answer}." in context
                colour, shape = answer.split()
                assert colour in COLOURS and shape in SHAPES
    # Train and test keys never meet.
    train, test = (set(hs.draw_keys(random.Random(0), 2000, split)) for split in ("train", "test"))
    assert len(train) == len(test) == 2000 and not train & test


def asked_object(question: str, scenes) -> tuple[int, object]:
    """The image holding the object an image question asks about, and the object; checks it is the
    only object in the prompt with the asked shape (or colour)."""
    match = re.fullmatch(r"In the images, what colour is the (\w+)\?|In the images, what shape is the (\w+) one\?",
                         question)
    kind, value = ("shape", match[1]) if match[1] else ("colour", match[2])
    found = [(k, obj) for k, scene in enumerate(scenes) for obj in scene if getattr(obj, kind) == value]
    assert len(found) == 1, (question, found)
    return found[0]


def test_image_needle_is_the_only_object_of_its_kind(tokenizer):
    count = hs.TokenCount(tokenizer, image_seq_len=9)
    for seed in range(12):
        hay = hs.build_haystack(random.Random(seed), count, 900, needle="image", n_images=5, prompt=True)
        context, question = hay.conversations[0]["value"].rsplit("\n", 1)
        assert context.count("<image>") == 5 == len(hay.images) == len(hay.scenes)
        assert [f"Image {k}: <image>" in context for k in range(1, 6)] == [True] * 5
        _, obj = asked_object(question, hay.scenes)
        assert hay.answers == [obj.colour if "what colour" in question else obj.shape]
        assert len(prompt_of(hay, tokenizer, True)[1]) + 5 * 8 == hay.n_tokens


def test_several_image_needles_each_unique_in_its_own_way(tokenizer):
    count = hs.TokenCount(tokenizer, image_seq_len=9)
    for seed in range(12):
        hay = hs.build_haystack(random.Random(seed), count, 900, needle="image", n_images=6, questions=3, objects=1,
                                prompt=True)
        assert all(len(scene) == 1 for scene in hay.scenes) and len(hay.answers) == 3
        asked = [turn["value"].rsplit("\n", 1)[-1] for turn in hay.conversations if turn["from"] == "human"]
        images = set()
        for question, answer in zip(asked, hay.answers):
            k, obj = asked_object(question, hay.scenes)
            assert answer == (obj.colour if "what colour" in question else obj.shape)
            images.add(k)
        assert len(images) == 3  # three different images asked about
        assert [t["value"] for t in hay.conversations if t["from"] == "gpt"] == hay.answers[:2]  # earlier answers


def test_records_load_with_the_llava_reader(tokenizer, tokenizer_dir, tmp_path, capsys):
    code, out, err = run_cli(["data", "haystack", tmp_path / "text", "--n", 4, "--length", 400, "--keys", 3,
                              "--questions", 2, "--tokenizer", tokenizer_dir], capsys)
    assert code == 0, err
    assert "wrote 4 records of 400 tokens" in out
    path = tmp_path / "text" / "train.json"
    records = read_records(path)
    assert len(records) == 4 and all(r["task"] == "niah_text" and len(r["conversations"]) == 4 for r in records)
    dataset = LlavaDataset(path, tmp_path / "text", Processor(tokenizer, None, 9), max_length=400)
    assert all(397 <= n <= 400 for n in dataset.token_lengths())
    # Every answer is supervised: two answers, each with its </s>.
    assert sum(1 for label in dataset[0]["labels"].tolist() if label == tokenizer.eos_id) == 2

    code, out, err = run_cli(["data", "haystack", tmp_path / "image", "--n", 3, "--length", 600, "--needle", "image",
                              "--images", 3, "--split", "test", "--tokenizer", tokenizer_dir], capsys)
    assert code == 0, err
    records = read_records(tmp_path / "image" / "test.json")
    checked = check_records(records, tmp_path / "image")  # the images decode
    assert checked.kept == [0, 1, 2]
    assert records[0]["image"] == [f"images/test_000000_{k}.png" for k in range(3)]
    processor = Processor(tokenizer, ImageProcessor(size=96, crop_size=96), 9)
    dataset = LlavaDataset(tmp_path / "image" / "test.json", tmp_path / "image", processor, max_length=600)
    assert all(597 <= n <= 600 for n in dataset.token_lengths())
    assert dataset[0]["pixel_values"].shape == (3, 3, 96, 96)


def test_without_a_tokenizer_lengths_are_characters(tmp_path):
    count = hs.TokenCount(None, image_seq_len=9)
    hay = hs.build_haystack(random.Random(0), count, 500, filler="english")
    text, _ = render_chat(hay.conversations, False)
    assert 500 - 20 <= hay.n_tokens <= 500 and hay.n_tokens == -(-len(text) // hs.CHARS_PER_TOKEN)
    # English filler says nothing about colours or shapes: only the needle does.
    words = set(hay.conversations[0]["value"].replace(".", " ").split())
    assert len(words & set(COLOURS + SHAPES)) <= 2


def test_bad_settings_are_one_line_errors(tokenizer, tmp_path, capsys):
    count = hs.TokenCount(tokenizer)
    one_line_error(lambda: hs.build_haystack(random.Random(0), count, 30), "length 30 is below", "at least")
    cases = [
        (["--keys", 2, "--questions", 3], "--questions 3 asks more keys than the --keys 2"),
        (["--needle", "image", "--keys", 2], "--keys is for text needles"),
        (["--needle", "image", "--images", 1], "--images is 1"),
        (["--needle", "image", "--images", 5, "--questions", 4], "--questions is 4"),
        (["--needle", "image", "--objects", 5], "--objects is 5"),
        (["--depth", 1.5], "--depth is 1.5"),
        (["--split", "Train!"], "--split 'Train!' is not a plain name"),
        (["--tokenizer", tmp_path], "has no tokenizer.json"),
        (["--length", 20, "--tokenizer", None], "length 20 is below"),
    ]
    tokenizer_dir = tmp_path / "tok"
    tokenizer.save(tokenizer_dir)
    for flags, message in cases:
        flags = [tokenizer_dir if f is None else f for f in flags]
        cli_error(*run_cli(["data", "haystack", tmp_path / "out", "--n", 1, *flags], capsys)[::2], message)
