"""Prompts and images -> model inputs, as transformers' `LlavaProcessor` builds them.

Every `<image>` marker becomes `image_seq_len` image-token ids where it stands, so the
model can later overwrite exactly those positions with the image's features (one masked
assignment). Batches are left-padded so that every row's next token is at the same index.

Shape letters: B prompts, T tokens, N images.
"""

from __future__ import annotations

from pathlib import Path

from omnilm.data.chat import hf_chat_template, render_chat
from omnilm.data.collate import pad_rows
from omnilm.data.image import ImageProcessor
from omnilm.data.tokenizer import Tokenizer
from omnilm.errors import OmniInputError
from omnilm.io import read_json, write_json, write_text
from omnilm.model.hf_config import hf_incompatibility, processor_config_to_hf

_MISMATCH_HINT = "add a marker per image or remove images"


class Processor:
    """Tokenizer + image processor + the number of tokens each image occupies.

    `image_processor` is None for a text-only model; such a processor refuses images.
    `llava_config`: what transformers' LlavaProcessor needs to expand images the same way
    (processor_config.json), where transformers has a class for the model; `for_model` sets it.
    """

    def __init__(self, tokenizer: Tokenizer, image_processor: ImageProcessor | None, image_seq_len: int,
                 llava_config: dict | None = None):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_seq_len = image_seq_len
        self.llava_config = llava_config

    def __call__(
        self,
        conversations,
        images=None,
        add_generation_prompt: bool = True,
        max_length: int | None = None,
    ) -> dict:
        """Encode one chat (a list of messages), a list of chats, a prompt string or a list
        of strings. Returns `input_ids` (B, T) and `attention_mask` (B, T), left-padded, and
        `pixel_values` (N, 3, H, W) with the images in marker order across the batch, or None.

        Images ride inside chat messages, or come through `images`: a flat list in marker
        order across the batch, or one list per prompt. Not both.
        """
        prompts, carried = self._render(conversations, add_generation_prompt)
        rows = [self.tokenizer.encode(prompt) for prompt in prompts]
        counts = [row.count(self.tokenizer.image_token_id) for row in rows]
        per_prompt = _assign_images(counts, carried, images)
        rows = [self._expand_images(row) for row in rows]
        if max_length is not None:
            for i, (row, n_images) in enumerate(zip(rows, counts)):
                if len(row) > max_length:
                    raise OmniInputError(
                        f"prompt {i} is {len(row)} tokens ({n_images} images of {self.image_seq_len} tokens each) "
                        f"but max_length is {max_length}: shorten it, use fewer images, or raise max_length"
                    )
        # Padding sits under attention_mask 0, so with no pad or eos token any id would do.
        input_ids, attention_mask = pad_rows(rows, self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0,
                                             left=True)
        flat = [image for group in per_prompt for image in group]
        if flat and self.image_processor is None:
            raise OmniInputError(f"{len(flat)} images were given but this processor is text-only: pass no images")
        pixel_values = self.image_processor(flat) if flat else None
        return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}

    def _render(self, conversations, add_generation_prompt: bool) -> tuple[list[str], list[list]]:
        # One prompt (a string, or a chat: a list of message dicts) becomes a batch of one.
        if isinstance(conversations, str) or (
            isinstance(conversations, list) and conversations and isinstance(conversations[0], dict)
        ):
            conversations = [conversations]
        if not isinstance(conversations, list) or not conversations:
            raise OmniInputError(
                "nothing to encode: pass a prompt string, a chat (list of messages), or a list of either"
            )
        prompts, carried = [], []
        for i, item in enumerate(conversations):
            if isinstance(item, str):
                prompts.append(item)
                carried.append([])
            elif isinstance(item, list):
                text, item_images = render_chat(item, add_generation_prompt, self.tokenizer.system_prompt)
                prompts.append(text)
                carried.append(item_images)
            else:
                raise OmniInputError(f"prompt {i} is a {type(item).__name__}: pass a string or a list of messages")
        return prompts, carried

    def _expand_images(self, ids: list[int]) -> list[int]:
        return expand_image_tokens(ids, self.tokenizer.image_token_id, self.image_seq_len)[0]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    @classmethod
    def for_model(cls, model, folder: str | Path | None = None, tokenizer: Tokenizer | None = None) -> Processor:
        """The processor that feeds `model` (an OmniModel, or its config): `tokenizer`, else the
        tokenizer files in the checkpoint `folder`; the image preprocessing of `folder`'s
        preprocessor_config.json when there is one, else the CLIP preprocessing the model's vision
        config implies; and the model's tokens per image."""
        config = getattr(model, "config", model)
        if tokenizer is None:
            if folder is None or not (Path(folder) / "tokenizer.json").is_file():
                where = f"{folder} has no tokenizer.json" if folder is not None else "no tokenizer was given"
                raise OmniInputError(f"{where}: pass the checkpoint folder saved with its tokenizer, or tokenizer=")
            tokenizer = Tokenizer.from_file(folder)
        check_tokenizer_fits(config, tokenizer, folder or "the tokenizer")
        image_processor = None
        if config.vision is not None:
            image_processor = _read_image_processor(folder) or ImageProcessor.from_vision_config(config.vision)
        llava = processor_config_to_hf(config) if config.vision is not None and not hf_incompatibility(config) else None
        return cls(tokenizer, image_processor, config.image_seq_len, llava)

    @classmethod
    def from_pretrained(cls, folder: str | Path, image_seq_len: int) -> Processor:
        """Load the tokenizer files and preprocessor_config.json (text-only without one) from
        `folder`. Tokens per image belong to the model (its vision tower's patches): pass them in."""
        return cls(Tokenizer.from_file(folder), _read_image_processor(folder), image_seq_len)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write the tokenizer files, the chat template (chat_template.jinja: transformers'
        `apply_chat_template`, and `transformers serve`, render the prompts `render_chat` does), (unless
        text-only) a transformers-loadable preprocessor_config.json, and with `llava_config` the
        processor_config.json with which `AutoProcessor` builds a LlavaProcessor."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(folder)
        write_text(folder / "chat_template.jinja", hf_chat_template(self.tokenizer.system_prompt))
        if self.image_processor is not None:
            write_json(folder / "preprocessor_config.json", self.image_processor.to_hf_dict())
        if self.llava_config is not None:
            write_json(folder / "processor_config.json", self.llava_config)


def _read_image_processor(folder: str | Path | None) -> ImageProcessor | None:
    """The image preprocessing `folder`'s preprocessor_config.json describes; None without one."""
    file = Path(folder) / "preprocessor_config.json" if folder is not None else None
    return ImageProcessor.from_hf_dict(read_json(file), source=file) if file is not None and file.is_file() else None


def check_tokenizer_fits(config, tokenizer: Tokenizer, where: str | Path) -> None:
    """Every id `tokenizer` makes must index the model's embedding (`config`, an OmniConfig), and its
    <image> must be the id the model fills with image features; `where` names the tokenizer."""
    n, vocab = tokenizer.vocab_size, config.text.vocab_size
    image = tokenizer.image_token_id
    # An id past the embedding would fail at the first forward; only <image> may lie there, since
    # the model overwrites its embedding (and a text-only model refuses it).
    if n > vocab and not (n == vocab + 1 and image == vocab):
        raise OmniInputError(
            f"{where}: the tokenizer has {n} tokens but the model embeds {vocab}: ids {vocab} and up would index past "
            "the embedding; use the tokenizer the model was trained with"
        )
    for name in ("bos", "eos", "pad"):
        token_id = getattr(tokenizer, f"{name}_id")
        if token_id is not None and not 0 <= token_id < vocab:
            raise OmniInputError(
                f"{where}: the tokenizer's {name}_token {getattr(tokenizer, f'{name}_token')!r} is id {token_id}, "
                f"outside the model's {vocab}-row embedding; fix tokenizer_config.json or use the model's tokenizer"
            )
    if config.vision is not None and image != config.image_token_id:
        raise OmniInputError(
            f"{where}: the tokenizer's <image> is id {image} but the model's image_token_id is "
            f"{config.image_token_id}; set config image_token_id to the tokenizer's id"
        )



def expand_image_tokens(ids: list[int], image_token_id: int, image_seq_len: int, *aligned: list) -> list[list]:
    """Repeat each image token `image_seq_len` times: the positions the model overwrites with that
    image's features. Lists in `aligned` (one entry per id, such as labels or offsets) are
    stretched the same way. Returns `[ids, *aligned]`, expanded."""
    out: list[list] = [[] for _ in range(1 + len(aligned))]
    for i, token in enumerate(ids):
        n = image_seq_len if token == image_token_id else 1
        for column, values in zip(out, (ids, *aligned)):
            column.extend([values[i]] * n)
    return out


def _assign_images(counts: list[int], carried: list[list], images) -> list[list]:
    # The images of each prompt, checked against its number of `<image>` markers.
    if images is None:
        per_prompt = carried
    elif any(carried):
        raise OmniInputError("images came both inside the chat messages and as images=: pass each image one way")
    else:
        if not isinstance(images, (list, tuple)):
            images = [images]  # a single image
        if images and all(isinstance(group, (list, tuple)) for group in images):
            if len(images) != len(counts):
                raise OmniInputError(
                    f"{len(images)} image lists were given for {len(counts)} prompts: give one list per prompt"
                )
            per_prompt = [list(group) for group in images]
        else:
            if len(images) != sum(counts):
                raise OmniInputError(
                    f"the prompts have {sum(counts)} <image> markers but {len(images)} images were given: "
                    + _MISMATCH_HINT
                )
            starts = [sum(counts[:i]) for i in range(len(counts))]
            per_prompt = [list(images[start:start + n]) for start, n in zip(starts, counts)]
    for i, (n_markers, group) in enumerate(zip(counts, per_prompt)):
        if n_markers != len(group):
            raise OmniInputError(
                f"prompt {i} has {n_markers} <image> markers but {len(group)} images were given: {_MISMATCH_HINT}"
            )
    return per_prompt
