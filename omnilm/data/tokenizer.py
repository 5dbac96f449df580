"""Text <-> token ids: a thin wrapper over a Hugging Face `tokenizers` tokenizer.json.

The wrapper owns three conventions the rest of omnilm relies on: `<image>` is one special
token that never merges with its neighbours (and so are `<video>` and `<audio>`, where the tokenizer
has them),
BOS is added by `encode(add_bos=True)` and by nothing else, and a saved folder loads in
transformers' `AutoTokenizer` to the same ids.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as BackendTokenizer

from omnilm.errors import OmniInputError
from omnilm.io import atomic_write, read_json, write_json

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
AUDIO_TOKEN = "<audio>"
_SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")
# Used when neither tokenizer_config.json nor special_tokens_map.json names a token.
_CONVENTIONAL = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


class Tokenizer:
    """A tokenizer.json plus the names of its special tokens.

    `pad_id` falls back to `eos_id` when the tokenizer has no pad token (as LLaMA's has
    none); padded positions are masked out by the attention mask, so their id never matters.
    `system_prompt` is the chat template's system message the model was trained with (None:
    Vicuna's, LLaVA-1.5's default); it is saved in tokenizer_config.json, so that training,
    evaluation and chat all render prompts the same way.
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        bos_token: str | None = "<s>",
        eos_token: str | None = "</s>",
        pad_token: str | None = None,
        unk_token: str | None = None,
        model_max_length: int | None = None,
        system_prompt: str | None = None,
    ):
        self._backend = backend
        self.system_prompt = system_prompt
        self.bos_token, self.eos_token, self.unk_token = bos_token, eos_token, unk_token
        self.pad_token = pad_token if pad_token is not None else eos_token
        self.model_max_length = model_max_length
        added = {t.content for t in backend.get_added_tokens_decoder().values()}
        if IMAGE_TOKEN not in added:
            # As an added token it is matched in raw text before BPE runs, so "a<image>b"
            # splits around it and it keeps one id; if the vocab already has it, it keeps its id.
            backend.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
        for key in _SPECIAL_KEYS:
            token = getattr(self, key)
            if token is not None and backend.token_to_id(token) is None:
                raise OmniInputError(
                    f"{key} {token!r} is not in the tokenizer's vocabulary: fix tokenizer_config.json"
                )

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a folder holding tokenizer.json (and optionally tokenizer_config.json and
        special_tokens_map.json naming the special tokens), or a tokenizer.json path."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise OmniInputError(
                f"no tokenizer.json at {file}: pass a folder holding tokenizer.json, or the file itself"
            )
        try:
            backend = BackendTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            reason = " ".join(str(e).split())
            raise OmniInputError(f"cannot read tokenizer {file}: {reason}; it is not a valid tokenizer.json") from None
        config: dict = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):  # the map wins, as in transformers
            if (file.parent / name).is_file():
                found = read_json(file.parent / name)
                if not isinstance(found, dict):
                    raise OmniInputError(f"{file.parent / name} holds a JSON {type(found).__name__}, not an object; "
                                         "fix or delete it")
                config.update(found)
        tokens = {}
        for key in _SPECIAL_KEYS:
            if key in config:
                value = config[key]  # a string, an AddedToken dict, or null for "none"
                tokens[key] = value.get("content") if isinstance(value, dict) else value
                if tokens[key] is not None and not isinstance(tokens[key], str):
                    raise OmniInputError(f"{file.parent}: {key} is {value!r}; give the token's text (a string), "
                                         "an AddedToken object with its \"content\", or null")
            else:
                tokens[key] = _CONVENTIONAL[key] if backend.token_to_id(_CONVENTIONAL[key]) is not None else None
        for key, kind in (("model_max_length", int), ("system_prompt", str)):
            if config.get(key) is not None and (not isinstance(config[key], kind) or isinstance(config[key], bool)):
                raise OmniInputError(f"{file.parent}: {key} is {config[key]!r}; give a {kind.__name__} or null")
        return cls(backend, model_max_length=config.get("model_max_length"), system_prompt=config.get("system_prompt"),
                   **tokens)

    @property
    def bos_id(self) -> int | None:
        return self.token_to_id(self.bos_token) if self.bos_token is not None else None

    @property
    def eos_id(self) -> int | None:
        return self.token_to_id(self.eos_token) if self.eos_token is not None else None

    @property
    def pad_id(self) -> int | None:
        return self.token_to_id(self.pad_token) if self.pad_token is not None else None

    @property
    def image_token_id(self) -> int:
        return self._backend.token_to_id(IMAGE_TOKEN)

    @property
    def video_token_id(self) -> int | None:
        """The id of `<video>`, None where the tokenizer has no such token (a model without video)."""
        return self._backend.token_to_id(VIDEO_TOKEN)

    @property
    def audio_token_id(self) -> int | None:
        """The id of `<audio>`, None where the tokenizer has no such token (a model without audio)."""
        return self._backend.token_to_id(AUDIO_TOKEN)

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        # The tokenizer.json post-processor is bypassed: whether it prepends BOS or not,
        # `add_bos` alone decides, so BOS is never doubled or silently dropped.
        ids = self._backend.encode(_valid_text(text), add_special_tokens=False).ids
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def encode_with_offsets(self, text: str, add_bos: bool = True) -> tuple[list[int], list[tuple[int, int]]]:
        """`encode(text, add_bos)` and, per id, the `(start, end)` character span of `text` it
        came from; BOS gets `(0, 0)`. A byte-level token such as " blue" spans its leading space."""
        encoding = self._backend.encode(_valid_text(text), add_special_tokens=False)
        ids, offsets = list(encoding.ids), [tuple(span) for span in encoding.offsets]
        if add_bos and self.bos_id is not None:
            ids, offsets = [self.bos_id, *ids], [(0, 0), *offsets]
        return ids, offsets

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def add_words(self, words: Iterable[str]) -> list[int]:
        """Give each of `words` one id of its own, after the vocabulary, matched as a whole word before
        BPE runs ("dax" in "is dax." but not in "daxes"; the space before it stays BPE's). Returns the
        new ids, in order."""
        words = list(words)
        bad = [w for w in words if not re.fullmatch(r"[A-Za-z]+", w) or self._backend.token_to_id(w) is not None]
        if bad:
            raise OmniInputError(f"cannot add the word {bad[0]!r}: give words of letters alone that the vocabulary "
                                 "does not hold yet, not even as a piece")
        first = self.vocab_size
        self._backend.add_tokens([AddedToken(w, single_word=True, normalized=False) for w in words])
        ids = [self._backend.token_to_id(w) for w in words]
        if ids != list(range(first, first + len(words))):
            raise OmniInputError("the words to add repeat one another: give each word once")
        return ids

    def save(self, folder: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json; transformers'
        `AutoTokenizer.from_pretrained(folder)` then encodes like `encode(add_bos=True)`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        backend = BackendTokenizer.from_str(self._backend.to_str())
        # transformers (v5) ignores add_bos_token when a tokenizer.json exists and uses its
        # post-processor, so the post-processor is what makes HF add BOS exactly as we do.
        backend.post_processor = _bos_template(self.bos_token, self.bos_id)
        atomic_write(folder / "tokenizer.json", lambda tmp: backend.save(tmp))
        special = {key: getattr(self, key) for key in _SPECIAL_KEYS if getattr(self, key) is not None}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            # Read by older transformers (v4 LLaMA tokenizers); agrees with the post-processor.
            "add_bos_token": self.bos_token is not None,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "padding_side": "left",  # what Processor does for batched generation
        }
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        if self.system_prompt is not None:
            config["system_prompt"] = self.system_prompt
        write_json(folder / "tokenizer_config.json", config)
        write_json(folder / "special_tokens_map.json", special)


def _bos_template(bos: str | None, bos_id: int | None) -> processors.TemplateProcessing:
    if bos is None:
        return processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1")
    # LLaMA's convention: every sequence of a pair gets its own BOS.
    return processors.TemplateProcessing(
        single=f"{bos} $A:0", pair=f"{bos} $A:0 {bos} $B:1", special_tokens=[(bos, bos_id)]
    )


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512, system_prompt: str | None = None,
                    video: bool = False, audio: bool = False) -> Tokenizer:
    """Train a byte-level BPE tokenizer whose special tokens are `<pad>`=0, `<s>`=1, `</s>`=2,
    `<image>`=3 (then with `video` `<video>`, with `audio` `<audio>`: 4, 5), prepending `<s>` like
    LLaMA. The same texts give the same tokenizer. It keeps `system_prompt` for the chats it will
    render (render `texts` with the same one)."""
    specials = ["<pad>", "<s>", "</s>", IMAGE_TOKEN] + [VIDEO_TOKEN] * video + [AUDIO_TOKEN] * audio
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(specials) + len(alphabet):
        raise OmniInputError(
            f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least "
            f"{len(specials) + len(alphabet)} ({len(specials)} special tokens + 256 bytes)"
        )
    backend = BackendTokenizer(models.BPE())
    # Byte-level: every string is encodable (no <unk>), and decoding is exact.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    backend.train_from_iterator(texts, trainer)
    backend.post_processor = _bos_template("<s>", 1)
    return Tokenizer(backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", system_prompt=system_prompt)


# Lone surrogates: how Python carries bytes that are not UTF-8 (command-line arguments, a
# terminal's input), which the tokenizer cannot encode.
_SURROGATES = re.compile("[\ud800-\udfff]")


def _valid_text(text) -> str:
    """`text` as the tokenizer can encode it: each byte that is not UTF-8 becomes U+FFFD, one for
    one, so character offsets still match."""
    if not isinstance(text, str):
        raise OmniInputError(f"text to encode is a {type(text).__name__}, not a string: pass str")
    return _SURROGATES.sub("\ufffd", text)
