"""Processor against transformers' LlavaProcessor, and the Vicuna v1 chat template."""

import base64
import io
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, CLIPImageProcessorPil, LlavaProcessor

from conftest import one_line_error

from omnilm.data import (
    DEFAULT_SYSTEM,
    ImageProcessor,
    Processor,
    normalize_messages,
    render_chat,
    render_turns,
    train_tokenizer,
)
from omnilm.errors import OmniInputError

CROP, PATCH = 28, 14
IMAGE_SEQ_LEN = (CROP // PATCH) ** 2  # what LlavaProcessor expands to: patches + CLS - CLS ("default")
TEXTS = [
    "a red circle is left of a blue square.",
    "there are three green triangles above the circle.",
    "what colour is the square? it is blue.",
    "USER: how many shapes are there? ASSISTANT: four.",
] * 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("processor")
    tokenizer = train_tokenizer(TEXTS, vocab_size=320)
    Processor(tokenizer, ImageProcessor(size=CROP, crop_size=CROP), IMAGE_SEQ_LEN).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ours(folder):
    return Processor.from_pretrained(folder, image_seq_len=IMAGE_SEQ_LEN)


@pytest.fixture(scope="module")
def hf(folder):
    return LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": CROP}, crop_size={"height": CROP, "width": CROP}),
        tokenizer=AutoTokenizer.from_pretrained(folder),
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def _images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (30 + 9 * i, 41 + 5 * i, 3), dtype=np.uint8)) for i in range(n)]


def _assert_same(ours_out: dict, hf_out) -> None:
    assert torch.equal(ours_out["input_ids"], hf_out["input_ids"])
    assert torch.equal(ours_out["attention_mask"], hf_out["attention_mask"])
    assert (ours_out["pixel_values"] - hf_out["pixel_values"]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("n_images", [1, 2])
def test_prompt_matches_llava_processor(ours, hf, n_images):
    prompt = "USER: " + "".join(f"shape {i}: <image>\n" for i in range(n_images)) + "what colour is the square? ASSISTANT:"
    images = _images(n_images)
    out = ours(prompt, images=images)
    _assert_same(out, hf(text=prompt, images=images, return_tensors="pt"))
    assert out["input_ids"].dtype == torch.long and out["pixel_values"].dtype == torch.float32
    assert (out["input_ids"] == ours.tokenizer.image_token_id).sum() == n_images * IMAGE_SEQ_LEN


def test_batch_is_left_padded_with_images_in_marker_order(ours, hf):
    prompts = ["<image>\nshort", "a much longer prompt: <image>\nand <image>, which is bigger?"]
    images = _images(3)
    out = ours(prompts, images=images)
    _assert_same(out, hf(text=prompts, images=images, padding=True, padding_side="left", return_tensors="pt"))
    short = out["attention_mask"][0]
    assert short[0] == 0 and short[-1] == 1 and (out["input_ids"][0][short == 0] == ours.tokenizer.pad_id).all()
    assert out["attention_mask"][1].all()
    # One list per prompt gives the same result as the flat list.
    per_prompt = ours(prompts, images=[images[:1], images[1:]])
    assert all(torch.equal(out[k], per_prompt[k]) for k in out)
    for i, image in enumerate(images):
        assert torch.equal(out["pixel_values"][i], ours.image_processor([image])[0])


def test_text_only(ours):
    out = ours(["one", "two words here"])
    assert out["pixel_values"] is None
    assert out["attention_mask"].sum(1).tolist() == [len(ours.tokenizer.encode(t)) for t in ("one", "two words here")]
    text_only = Processor(ours.tokenizer, None, image_seq_len=0)
    assert torch.equal(text_only(["one", "two words here"])["input_ids"], out["input_ids"])
    with pytest.raises(OmniInputError, match="text-only"):
        text_only("<image>", images=_images(1))


def test_vicuna_template_two_turns_with_image():
    chat = [
        {"role": "user", "content": [{"type": "image", "image": "cat.png"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "What colour is it?"},
    ]
    text, images = render_chat(chat)
    assert text == (
        f"{DEFAULT_SYSTEM} USER: <image>\nWhat is this? ASSISTANT: A cat.</s>USER: What colour is it? ASSISTANT:"
    )
    assert images == ["cat.png"]
    assert render_chat(chat, add_generation_prompt=False)[0] == text[: -len(" ASSISTANT:")] + " "
    turns = render_turns(chat)
    assert "".join(t for t, _ in turns) == text
    assert [t for t, answer in turns if answer] == ["A cat.</s>"]


def test_llava_json_and_system_override():
    llava = [{"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": "Shapes."}]
    text, images = render_chat(llava)
    assert text == f"{DEFAULT_SYSTEM} USER: <image>\nDescribe it. ASSISTANT: Shapes.</s>" and images == []
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert render_chat(with_system)[0] == "Be brief. USER: Hi ASSISTANT:"
    assert render_chat([{"role": "user", "content": "Hi"}], system="Be terse.")[0] == "Be terse. USER: Hi ASSISTANT:"


def test_openai_image_url_data_url(ours):
    image = _images(1)[0]
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    for part in ({"type": "image_url", "image_url": {"url": url}}, {"type": "image_url", "image_url": url}):
        chat = [{"role": "user", "content": [part, {"type": "text", "text": "What is it?"}]}]
        out = ours(chat)
        assert torch.equal(out["pixel_values"], ours.image_processor([image]))
        assert (out["input_ids"] == ours.tokenizer.image_token_id).sum() == IMAGE_SEQ_LEN


def test_interleaved_images_land_where_they_stand(ours, hf):
    a, b = _images(2)
    chat = [{"role": "user", "content": [
        {"type": "text", "text": "Is "}, {"type": "image", "image": a},
        {"type": "text", "text": "bigger than "}, {"type": "image", "image": b}, {"type": "text", "text": "?"},
    ]}]
    text, images = render_chat(chat)
    assert text.endswith("USER: Is <image>\nbigger than <image>\n? ASSISTANT:") and images == [a, b]
    _assert_same(ours(chat), hf(text=text, images=[a, b], return_tensors="pt"))
    # A batch of chats: prompt 0's images come first.
    out = ours([chat, [{"role": "user", "content": [{"type": "image", "image": a}]}]])
    assert torch.equal(out["pixel_values"], ours.image_processor([a, b, a]))


def test_placeholder_image_parts_take_images_argument(ours):
    a = _images(1)[0]
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
    assert torch.equal(ours(chat, images=[a])["pixel_values"], ours.image_processor([a]))


def test_errors(ours):
    images = _images(3)
    one_line_error(lambda: ours(["<image>", "<image> <image>"], images=[images[:1], images]),
              "prompt 1 has 2 <image> markers but 3 images were given", "add a marker per image or remove images")
    one_line_error(lambda: ours("<image> <image>", images=images), "2 <image> markers but 3 images")
    one_line_error(lambda: ours("no marker", images=images[:1]), "1 images were given")
    carried = [{"role": "user", "content": [{"type": "image", "image": images[0]}]}]
    one_line_error(lambda: ours(carried, images=images[:1]), "one way")
    one_line_error(lambda: ours("<image> a long prompt", images=images[:1], max_length=5), "max_length is 5", "tokens")
    user = {"role": "user", "content": "x"}
    one_line_error(lambda: normalize_messages([user, {"role": "robot", "content": "y"}]), "message 1", "robot")
    one_line_error(lambda: normalize_messages([{"role": "user", "content": [{"type": "document"}]}]), "message 0",
                   "input_audio")
    one_line_error(lambda: normalize_messages([{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "not base64!", "format": "wav"}}]}]), "message 0", "base64")
    one_line_error(lambda: normalize_messages([{"role": "user", "content": [{"type": "input_audio"}]}]),
                   "message 0", "without data")
    one_line_error(lambda: normalize_messages([user, {"role": "system", "content": "y"}]), "message 1", "first")
    web_image = [{"role": "user", "content": [{"type": "image", "image": "https://x.org/a.png"}]}]
    one_line_error(lambda: ours(web_image), "download")


def test_save_and_load_round_trip(ours, tmp_path):
    ours.save_pretrained(tmp_path)
    again = Processor.from_pretrained(tmp_path, image_seq_len=IMAGE_SEQ_LEN)
    out, out_again = ours("<image>\nhi", images=_images(1)), again("<image>\nhi", images=_images(1))
    assert all(torch.equal(out[k], out_again[k]) for k in out)
    assert again.decode(out["input_ids"][0]) == "\nhi"


CHATS = [
    [{"role": "user", "content": "how many shapes are there?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "what colour is the square?"}]},
     {"role": "assistant", "content": "blue."}, {"role": "user", "content": [
        {"type": "text", "text": "and these?"}, {"type": "image"}, {"type": "image"}]}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "no system message"}],
]


@pytest.mark.parametrize("chat", CHATS)
def test_saved_chat_template_renders_our_prompts_in_transformers(folder, ours, chat):
    """transformers' apply_chat_template (what `transformers serve` calls) on a saved folder gives
    the text render_chat gives, after BOS, and the same ids."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == tokenizer.bos_token + render_chat(chat)[0]
    assert text.endswith("ASSISTANT:") and tokenizer.apply_chat_template(chat, tokenize=False) != text
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    images = _images(sum(part == {"type": "image"} for m in chat for part in
                         (m["content"] if isinstance(m["content"], list) else [])))
    expected = ours(chat, images=images or None)["input_ids"][0].tolist()
    assert [i for i in ids if i != ours.tokenizer.image_token_id] == \
        [i for i in expected if i != ours.tokenizer.image_token_id]
