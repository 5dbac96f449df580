"""LLaVA-format JSON plus an image folder -> training samples whose labels supervise answers only.

A record, as haotian-liu/LLaVA's instruction data and our ShapeWorld generator write it:

    {"id": "42", "image": "shapes/42.png",            # optional; or a list of paths
     "conversations": [{"from": "human", "value": "<image>\\nWhat colour is the circle?"},
                       {"from": "gpt", "value": "Red."}, ...],
     ...}                                              # other fields (task, ...) are kept

Every record is checked when the dataset is built (roles, markers against images, that image
files exist), so a bad file fails before training starts, naming the record.

Labels (visual instruction tuning, Liu et al. 2023): the prompt is rendered with the Vicuna
template and tokenized once; a token is supervised when it is part of what the model must
generate after an inference prompt that ends in "ASSISTANT:", i.e. " answer</s>". With a
byte-level BPE the space before the answer belongs to the answer's first token (" Red"),
which is what generation produces, so the span checked is the space plus the answer.

Shape letters: T tokens, N images.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch.utils.data import Dataset

from omnilm.data.chat import render_turns
from omnilm.data.processor import Processor, expand_image_tokens
from omnilm.data.tokenizer import IMAGE_TOKEN
from omnilm.errors import OmniInputError
from omnilm.config import IGNORE_INDEX

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_FORMAT = '{"from": "human"|"gpt", "value": "..."}'


class LlavaDataset(Dataset):
    """Records of a LLaVA JSON file, filtered by `task` when `tasks` is given.

    `records[i]` is the i-th kept record as it stands in the file (extra fields included).
    With `skip_bad`, bad records are left out and listed in `skipped` as `(id, reason)`;
    without it the first one raises `OmniInputError`. `max_length` bounds the tokenized
    length, image tokens included. `cache_images` keeps preprocessed images in memory. Token ids
    and labels are always kept once computed (a few hundred bytes a record, and a training run
    reads every record once an epoch).
    """

    def __init__(
        self,
        json_path: str | Path,
        image_folder: str | Path | None,
        processor: Processor,
        tasks: set[str] | None = None,
        skip_bad: bool = False,
        max_length: int | None = None,
        cache_images: bool = False,
    ):
        self.json_path = Path(json_path)
        # Image paths are relative to image_folder, or to the JSON's own folder without one.
        self.image_folder = Path(image_folder) if image_folder is not None else self.json_path.parent
        self.processor = processor
        self.max_length = max_length
        self.cache_images = cache_images
        self.records: list[dict] = []
        self.ids: list = []
        self.skipped: list[tuple[str, str]] = []
        self._images: list[list[Path]] = []  # per record, in marker order
        self._cache: dict[Path, torch.Tensor] = {}  # path -> (3, H, W)
        self._encoded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # kept index -> (input_ids, labels)

        raw = read_records(self.json_path)
        considered = 0
        for index, record in enumerate(raw):
            if tasks is not None and isinstance(record, dict) and record.get("task") not in tasks:
                continue
            considered += 1
            rid = record.get("id", index) if isinstance(record, dict) else index
            problem, images = self._check(record)
            encoded = None
            if problem is None and max_length is not None:
                encoded = self._encode(record["conversations"])
                n_tokens = len(encoded[0])
                if n_tokens > max_length:
                    problem = (
                        f"is {n_tokens} tokens ({len(images)} images of {processor.image_seq_len} tokens each), "
                        f"over max_length={max_length}: shorten it or raise max_length"
                    )
            if problem is not None:
                if not skip_bad:
                    raise OmniInputError(
                        f"{self.json_path}: record {index} (id {rid!r}) {problem}; "
                        "fix it, or pass skip_bad=True to skip bad records"
                    )
                self.skipped.append((str(rid), problem))
                continue
            if encoded is not None:
                self._encoded[len(self.records)] = encoded
            self.records.append(record)
            self.ids.append(rid)
            self._images.append(images)

        if self.skipped:
            rid, problem = self.skipped[0]
            warnings.warn(
                f"{self.json_path}: skipped {len(self.skipped)} of {considered} records "
                f"(first: id {rid!r} {problem}); see dataset.skipped",
                stacklevel=2,
            )
        if not self.records:
            which = f" with task in {sorted(tasks)}" if tasks is not None else ""
            raise OmniInputError(
                f"{self.json_path}: no usable records{which} ({considered} considered, {len(self.skipped)} skipped); "
                "check the file and the tasks filter"
            )

    def __len__(self) -> int:
        return len(self.records)

    def token_lengths(self) -> list[int]:
        """Each record's sequence length in tokens, its images' tokens included."""
        return [len(self._encoded_at(i)[0]) for i in range(len(self.records))]

    def __getitem__(self, i: int) -> dict:
        """`input_ids` (T,) and `labels` (T,) long, `pixel_values` (N, 3, H, W) float32 in
        marker order or None, and the record's `id`."""
        input_ids, labels = self._encoded_at(i)
        return {
            "input_ids": input_ids,
            "labels": labels,
            "pixel_values": self.pixel_values(i),
            "id": self.ids[i],
        }

    def _encoded_at(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Records are tokenized once, when first needed (validation may have done it already).
        if i not in self._encoded:
            self._encoded[i] = self._encode(self.records[i]["conversations"])
        return self._encoded[i]

    def _encode(self, conversations: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        tokenizer = self.processor.tokenizer
        segments = render_turns(conversations, add_generation_prompt=False, system=tokenizer.system_prompt)
        text = "".join(segment for segment, _ in segments)
        # Character ranges to supervise: from the end of "ASSISTANT:" (the inference prompt)
        # to the end of "answer</s>". The space between belongs to the answer's first token.
        supervised, start, previous = [], 0, ""
        for segment, is_answer in segments:
            if is_answer:
                supervised.append((start - (len(previous) - len(previous.rstrip())), start + len(segment)))
            start, previous = start + len(segment), segment
        # One tokenization of the whole text, as at inference: tokenizing pieces separately
        # would change BPE merges at their boundaries.
        ids, offsets = tokenizer.encode_with_offsets(text, add_bos=True)
        image_id = tokenizer.image_token_id
        labels = [
            token if token != image_id and end > begin and any(begin < hi and end > lo for lo, hi in supervised)
            else IGNORE_INDEX
            for token, (begin, end) in zip(ids, offsets)
        ]
        ids, labels = expand_image_tokens(ids, image_id, self.processor.image_seq_len, labels)
        return torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)

    def pixel_values(self, i: int) -> torch.Tensor | None:
        """Record i's images, preprocessed: (N, 3, H, W) in marker order, or None."""
        paths = self._images[i]
        if not paths:
            return None
        try:
            if not self.cache_images:
                return self.processor.image_processor(paths)
            for path in paths:
                if path not in self._cache:
                    self._cache[path] = self.processor.image_processor([path])[0]
            return torch.stack([self._cache[path] for path in paths])
        except OmniInputError as e:  # a broken image file: say which record it belongs to
            raise OmniInputError(f"{self.json_path}: record id {self.ids[i]!r}: {e}") from None

    def _check(self, record) -> tuple[str | None, list[Path]]:
        # (what is wrong with the record or None, its image paths). Files are stat-ed, not
        # decoded: decoding every image of a large dataset up front would take long.
        if not isinstance(record, dict):
            return f"is a {type(record).__name__}, not an object with 'conversations'", []
        turns = record.get("conversations")
        if not isinstance(turns, list) or not turns:
            return f"has no 'conversations' list: give a list of {_FORMAT} turns", []
        n_markers = 0
        offset = 1 if isinstance(turns[0], dict) and _ROLES.get(turns[0].get("from")) == "system" else 0
        for j, turn in enumerate(turns):
            if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in _ROLES:
                return f"has turn {j} = {_short(turn)}, not {_FORMAT}", []
            role = _ROLES[turn["from"]]
            expected = "system" if j < offset else ("user", "assistant")[(j - offset) % 2]
            if role != expected:
                return (
                    f"has turn {j} from {turn['from']!r} where a {'human' if expected == 'user' else 'gpt'} turn "
                    "belongs: turns go [system,] human, gpt, human, gpt, ..."
                ), []
            if not turn["value"].strip():
                return f"has an empty turn {j} (from {turn['from']!r})", []
            markers = turn["value"].count(IMAGE_TOKEN)
            if markers and role != "user":
                return f"has an {IMAGE_TOKEN} marker in turn {j} (from {turn['from']!r}): put images in human turns", []
            n_markers += markers
        if len(turns) - offset < 2 or (len(turns) - offset) % 2:
            return "ends without a gpt answer to its last human turn: every human turn needs an answer", []

        image = record.get("image")
        if image is None:
            names = []
        elif isinstance(image, str) and image:
            names = [image]
        elif isinstance(image, list) and all(isinstance(name, str) and name for name in image):
            names = image
        else:
            return f"has 'image' = {_short(image)}: give a path or a list of paths", []
        if n_markers != len(names):
            return (
                f"has {n_markers} {IMAGE_TOKEN} markers but {len(names)} images: "
                f"put one '{IMAGE_TOKEN}\\n' in the human turns per image, in the order of 'image'"
            ), []
        if names and self.processor.image_processor is None:
            return f"has {len(names)} images but the processor is text-only", []
        paths = [self.image_folder / name for name in names]
        for name, path in zip(names, paths):
            if not path.is_file():
                return f"has image {name!r}, which is not a file under {self.image_folder}", []
        return None, paths


def read_records(path: str | Path) -> list:
    """The records of a LLaVA-format JSON file (a list), or a one-line error saying what is wrong."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise OmniInputError(f"cannot read {path}: {e.strerror}; check the path") from None
    except UnicodeDecodeError:
        raise OmniInputError(f"{path} is not UTF-8 text; LLaVA data is a UTF-8 JSON file") from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        where = f"{e.msg} at line {e.lineno} column {e.colno}"
        raise OmniInputError(f"{path} is not valid JSON ({where}); fix the file") from None
    if not isinstance(records, list):
        raise OmniInputError(
            f"{path} holds a JSON {type(records).__name__}, but LLaVA data is a list of records "
            '[{"id": ..., "image": ..., "conversations": [...]}, ...]'
        )
    return records


def _short(value) -> str:
    # A value quoted in a one-line message: on one line, and not too long.
    text = " ".join(json.dumps(value, ensure_ascii=False, default=str).split())
    return text if len(text) <= 60 else text[:57] + "..."
