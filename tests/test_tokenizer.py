"""Tokenizer: <image> handling, BOS semantics, and save -> transformers AutoTokenizer parity."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer

from omnilm.data import Tokenizer, train_tokenizer
from omnilm.errors import OmniInputError

TEXTS = [
    "a red circle is left of a blue square.",
    "there are three green triangles above the circle.",
    "what colour is the square? it is blue.",
    "how many shapes are there? there are four shapes.",
] * 4
PROBES = [
    "a red circle",
    "a<image>b",
    "<image>\nWhat colour is the square? ASSISTANT: blue</s>",
    "compare <image> and<image>\n, please",
    "  leading spaces and unicode: naïve café ✓",
    "",
]


@pytest.fixture(scope="module")
def trained():
    return train_tokenizer(TEXTS, vocab_size=320)


def test_special_token_ids(trained):
    assert (trained.token_to_id("<pad>"), trained.bos_id, trained.eos_id, trained.image_token_id) == (0, 1, 2, 3)
    assert trained.pad_id == 0
    assert trained.vocab_size == 320


def test_image_token_is_one_id_and_never_merges(trained):
    ids = trained.encode("a<image>b", add_bos=False)
    assert ids == trained.encode("a", add_bos=False) + [3] + trained.encode("b", add_bos=False)
    assert trained.encode("<image><image>", add_bos=False) == [3, 3]


def test_bos_is_added_once_and_only_when_asked(trained):
    assert trained.encode("a red circle")[:2] != [1, 1]
    assert trained.encode("a red circle") == [1, *trained.encode("a red circle", add_bos=False)]
    assert trained.encode("", add_bos=False) == []


def test_decode_round_trip(trained):
    for text in PROBES:
        assert trained.decode(trained.encode(text)) == text.replace("<image>", "").replace("</s>", "")
    assert trained.decode(trained.encode("a<image>b"), skip_special_tokens=False) == "<s>a<image>b"


def test_training_is_deterministic(tmp_path):
    train_tokenizer(TEXTS, vocab_size=320).save(tmp_path / "a")
    train_tokenizer(TEXTS, vocab_size=320).save(tmp_path / "b")
    assert (tmp_path / "a/tokenizer.json").read_bytes() == (tmp_path / "b/tokenizer.json").read_bytes()


def test_save_loads_in_transformers_with_identical_ids(trained, tmp_path):
    trained.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    ours = Tokenizer.from_file(tmp_path)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (ours.bos_id, ours.eos_id, ours.pad_id)
    for text in PROBES:
        assert hf(text)["input_ids"] == ours.encode(text) == trained.encode(text), text
        assert hf(text, add_special_tokens=False)["input_ids"] == ours.encode(text, add_bos=False), text


def _bare_bpe(with_bos_post_processor: bool) -> BackendTokenizer:
    # A LLaMA-like tokenizer.json without <image> or <pad>, optionally prepending <s> itself.
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(TEXTS, trainer)
    if with_bos_post_processor:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return backend


@pytest.mark.parametrize("with_bos_post_processor", [False, True])
def test_foreign_tokenizer_json_gets_image_token_and_one_bos(tmp_path, with_bos_post_processor):
    _bare_bpe(with_bos_post_processor).save(str(tmp_path / "tokenizer.json"))
    ours = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert ours.image_token_id == ours.vocab_size - 1  # added after the vocabulary
    assert ours.pad_id == ours.eos_id  # no pad token: falls back to eos
    assert ours.encode("a<image>b").count(ours.image_token_id) == 1
    assert ours.encode("a red circle").count(ours.bos_id) == 1
    ours.save(tmp_path / "saved")
    hf = AutoTokenizer.from_pretrained(tmp_path / "saved")
    for text in PROBES:
        assert hf(text)["input_ids"] == ours.encode(text), text


def test_special_tokens_from_config_files(tmp_path):
    _bare_bpe(False).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": {"content": "</s>"}, "eos_token": "<unk>"}')
    ours = Tokenizer.from_file(tmp_path)
    assert (ours.bos_token, ours.eos_token) == ("</s>", "<unk>")


def test_missing_or_broken_files(tmp_path):
    with pytest.raises(OmniInputError, match="no tokenizer.json"):
        Tokenizer.from_file(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(OmniInputError, match="cannot read tokenizer"):
        Tokenizer.from_file(tmp_path)
    with pytest.raises(OmniInputError, match="vocab_size=100"):
        train_tokenizer(TEXTS, vocab_size=100)


def test_system_prompt_travels_with_the_tokenizer(tmp_path):
    """The system prompt a model was trained with is saved with its tokenizer, and the processor
    and the training dataset both render chats with it; transformers still loads the folder."""
    from omnilm.data import Processor
    from omnilm.data.chat import DEFAULT_SYSTEM

    texts = ["USER: What colour is the circle? ASSISTANT: red</s>"] * 20
    tok = train_tokenizer(texts, vocab_size=300, system_prompt="Answer briefly.")
    tok.save(tmp_path)
    back = Tokenizer.from_file(tmp_path)
    assert back.system_prompt == "Answer briefly."
    chat = [{"role": "user", "content": "What colour is the circle?"}]
    ids = Processor(back, None, 0)(chat)["input_ids"][0].tolist()
    assert back.decode(ids).startswith("Answer briefly. USER:")
    plain = train_tokenizer(texts, vocab_size=300)
    assert plain.system_prompt is None
    assert plain.decode(Processor(plain, None, 0)(chat)["input_ids"][0].tolist()).startswith(DEFAULT_SYSTEM)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf("Answer briefly.")["input_ids"] == back.encode("Answer briefly.")
    # "" leaves the system message out, and survives the round trip as "", not None.
    train_tokenizer(texts, vocab_size=300, system_prompt="").save(tmp_path / "none")
    none = Tokenizer.from_file(tmp_path / "none")
    assert none.system_prompt == ""
    assert none.decode(Processor(none, None, 0)(chat)["input_ids"][0].tolist()) == \
        "USER: What colour is the circle? ASSISTANT:"


@pytest.mark.parametrize("name, content, phrase", [
    ("tokenizer_config.json", [1, 2], "holds a JSON list"), ("tokenizer_config.json", "text", "holds a JSON str"),
    ("special_tokens_map.json", 3, "holds a JSON int"), ("special_tokens_map.json", {"eos_token": 5}, "eos_token is 5"),
    ("special_tokens_map.json", {"bos_token": {"special": True}}, None),  # no content: as no token
    ("special_tokens_map.json", {"eos_token": ["</s>"]}, "eos_token is ['</s>']"),
    ("tokenizer_config.json", {"model_max_length": "long"}, "model_max_length is 'long'"),
    ("tokenizer_config.json", {"system_prompt": 7}, "system_prompt is 7"),
    ("special_tokens_map.json", {"eos_token": "<nope>"}, "not in the tokenizer's vocabulary"),
])
def test_broken_tokenizer_side_files_are_named(tmp_path, name, content, phrase):
    import json

    from conftest import one_line_error

    train_tokenizer(["a red circle"] * 4, vocab_size=300).save(tmp_path)
    (tmp_path / name).write_text(json.dumps(content))
    if phrase is None:
        assert Tokenizer.from_file(tmp_path).bos_token is None
    else:
        one_line_error(lambda: Tokenizer.from_file(tmp_path), phrase)
