"""LLaVA-format JSON plus an image folder: the one validator every command that reads it runs,
and training samples whose labels supervise answers only.

A record, as haotian-liu/LLaVA's instruction data and our ShapeWorld generator write it:

    {"id": "42", "image": "shapes/42.png",            # optional; or a list of paths
     "conversations": [{"from": "human", "value": "<image>\\nWhat colour is the circle?"},
                       {"from": "gpt", "value": "Red."}, ...],
     ...}                                              # other fields (task, ...) are kept

and videos the same way: `"video": "clips/7.mp4"` (a file, or a folder of frames; or a list), each
at a `<video>` marker in a human turn (LLaVA-NeXT-Video's data); and audio: `"audio": "sounds/3.wav"`
(WAV, FLAC, MP3, OGG; or a list), each at an `<audio>` marker.

`check_records` runs over the whole file before any work, for training (`LlavaDataset`) and
evaluation (`omnilm.eval.vqa`) alike. A file is a non-empty JSON list; a record is an object
with an id (a string or an integer; duplicates are allowed, as derived LLaVA mixes have them,
and messages name a record by its index too), `conversations` going [system,] human, gpt,
human, gpt, ... and ending on an answer, every value a non-empty string, as many `<image>`
markers (spelt exactly, in human turns) as images, and images that are relative paths inside
the image folder to files that decode (and likewise `<video>` markers and videos, `<audio>` markers
and audio). The first
bad record raises a one-line `OmniInputError` naming the file, the record's index and id, and
the field; with `skip_bad` every bad record is left out and counted instead.

Labels (visual instruction tuning, Liu et al. 2023): the prompt is rendered with the Vicuna
template and tokenized once; a token is supervised when it is part of what the model must
generate after an inference prompt that ends in "ASSISTANT:", i.e. " answer</s>". With a
byte-level BPE the space before the answer belongs to the answer's first token (" Red"),
which is what generation produces, so the span checked is the space plus the answer.

Shape letters: T tokens, N images.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import warnings
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import Dataset

from omnilm.config import IGNORE_INDEX
from omnilm.data.audio import load_audio
from omnilm.data.chat import render_turns
from omnilm.data.image import load_image
from omnilm.data.processor import Processor
from omnilm.data.tokenizer import AUDIO_TOKEN, IMAGE_TOKEN, VIDEO_TOKEN
from omnilm.data.video import Video, read_video
from omnilm.errors import OmniInputError
from omnilm.io import write_text

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_FORMAT = '{"from": "human"|"gpt", "value": "..."}'
# Spellings a person means as the image marker but the tokenizer reads as plain text.
_MARKER_LIKE = re.compile(r"<\s*(image|video|audio)\s*>", re.IGNORECASE)
_MEDIA = (("image", IMAGE_TOKEN), ("video", VIDEO_TOKEN), ("audio", AUDIO_TOKEN))  # record field, its marker
_MARKERS = tuple(marker for _, marker in _MEDIA)
_WITHOUT = {"image": "text-only", "video": "without video", "audio": "without audio"}
_SKIP_HINT = "or pass --skip-bad (skip_bad=True) to skip bad records"


# --- the validator -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """What is wrong with a record: `kind` is what skipped records are counted by, `field` where
    in the record it is ("conversations[2].from"), `text` what is wrong and what to do."""

    kind: str
    field: str
    text: str

    def __str__(self) -> str:
        return f"{self.field} {self.text}"


class BadRecord(NamedTuple):
    index: int  # position in the file
    id: Any  # the record's id, None where it has none
    problem: Problem


@dataclass
class CheckedRecords:
    """`check_records`' answer: the usable records (indices into the list, in order) with their
    image, video and audio paths in marker order, and the records left out."""

    source: str
    kept: list[int] = field(default_factory=list)
    images: list[list[Path]] = field(default_factory=list)
    videos: list[list[Path]] = field(default_factory=list)
    audios: list[list[Path]] = field(default_factory=list)
    skipped: list[BadRecord] = field(default_factory=list)
    considered: int = 0

    def report(self) -> str | None:
        """One line: how many records were skipped, how many of each kind, and the first; None if none."""
        return f"{self.source}: skipped {self._tally()}" if self.skipped else None

    def _tally(self) -> str:
        kinds = Counter(bad.problem.kind for bad in self.skipped)
        first = self.skipped[0]
        return (f"{len(self.skipped)} of {self.considered} records ("
                + ", ".join(f"{n} {kind}" for kind, n in kinds.most_common())
                + f"); first: {_where(first.index, first.id)}: {first.problem}")

    def counts(self) -> dict[str, Any]:
        """The skip report as numbers (and its line), for summaries written to JSON."""
        return {"records": len(self.skipped), "of": self.considered,
                "kinds": dict(Counter(bad.problem.kind for bad in self.skipped)), "report": self.report()}


def check_records(
    records: list,
    image_folder: str | Path | None,
    *,
    processor: Processor | None = None,
    tasks: Collection[str | None] | None = None,
    skip_tasks: Collection[str] = (),
    skip_bad: bool = False,
    check: Callable[[dict, list[Path]], Problem | None] | None = None,
    load: Callable[[Path], Any] | None = None,
    load_video: Callable[[Path], Any] | None = None,
    load_audio_file: Callable[[Path], Any] | None = None,
    source: str | Path | None = None,
) -> CheckedRecords:
    """Check LLaVA records (as `read_records` returns them) before any work is done with them.

    Records are considered when their `task` is in `tasks` (if given) and not in `skip_tasks`.
    `image_folder` None checks no image files. With `processor`, text holding its tokenizer's
    special tokens, and images for a text-only processor, are bad too. `check(record, paths)`
    adds the caller's own test (token lengths). Each image file is loaded once, by `load(path)`,
    which may keep what it made; by default the processor's image preprocessing (what training
    and generation will run on it), or without one `load_image`; each video by `load_video`, by
    default the processor's frame sampling (`Processor.read_video`), or without one `read_video`;
    each audio by `load_audio_file`, by default `Processor.read_audio`, or without one `load_audio`.
    Cheap checks run over every record first, so a typo late in a large file is reported before
    any image is decoded. Without `skip_bad` the first bad record raises `OmniInputError`; with
    it, bad records are left out and listed in `skipped`. No considered record, or none usable,
    raises too. Warns about nothing: callers report.
    """
    source = str(source if source is not None else getattr(records, "path", "records"))
    if not isinstance(records, list):
        raise OmniInputError(f"{source} is a {_type(records)}, but LLaVA data is a list of records: "
                             "pass read_records(path)")
    if not records:
        raise OmniInputError(f"{source} holds no records (an empty list); give at least one record")
    folder = Path(image_folder) if image_folder is not None else None
    reserved: tuple[str, ...] = ()  # special tokens the tokenizer would match inside text
    if processor is not None:
        tok = processor.tokenizer
        reserved = tuple(t for t in (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) if t)
    images_allowed = processor is None or processor.image_processor is not None
    videos_allowed = processor is None or processor.video_frame_len is not None
    audios_allowed = processor is None or processor.audio_seq_len is not None
    allowed = {"image": images_allowed, "video": videos_allowed, "audio": audios_allowed}
    if load is None:  # what training or generation will run on each image, so that it cannot fail later
        preprocess = processor.image_processor if processor is not None else None
        load = (lambda path: preprocess([path])) if preprocess is not None else load_image
    if load_video is None:
        load_video = processor.read_video if processor is not None and videos_allowed else read_video
    if load_audio_file is None:
        load_audio_file = processor.read_audio if processor is not None and audios_allowed else load_audio
    readers = {"image": load, "video": load_video, "audio": load_audio_file}
    out = CheckedRecords(source)

    def reject(index: int, problem: Problem) -> None:
        rid = _id_of(records[index])
        if not skip_bad:
            raise OmniInputError(f"{source}: {_where(index, rid)}: {problem}; {_SKIP_HINT}")
        out.skipped.append(BadRecord(index, rid, problem))

    candidates = []  # (index, {kind: its paths}), in file order
    for index, record in enumerate(records):
        if not _selected(record, tasks, skip_tasks):
            continue
        out.considered += 1
        problem, media = check_record(record, folder, reserved, allowed)
        if problem is not None:
            reject(index, problem)
        else:
            candidates.append((index, media))
    if check is not None:
        survivors = []
        for index, media in candidates:
            problem = check(records[index], media["image"])
            if problem is not None:
                reject(index, problem)
            else:
                survivors.append((index, media))
        candidates = survivors
    kept = candidates
    if folder is not None:
        kept = []
        broken: dict[Path, str | None] = {}  # each file is decoded once, however many records share it
        for index, media in candidates:
            problem = None
            for kind, files in media.items():
                read = readers[kind]
                for k, path in enumerate(files):
                    if path not in broken:
                        try:
                            read(path)
                            broken[path] = None
                        except OmniInputError as e:
                            broken[path] = str(e)
                    if broken[path] is not None:
                        where = kind if isinstance(records[index][kind], str) else f"{kind}[{k}]"
                        problem = Problem(f"bad {kind}", where, broken[path])
                        break
                if problem is not None:
                    break
            if problem is not None:
                reject(index, problem)
            else:
                kept.append((index, media))
    out.kept = [index for index, _ in kept]
    out.images, out.videos, out.audios = ([media[kind] for _, media in kept] for kind in ("image", "video", "audio"))

    out.skipped.sort(key=lambda bad: bad.index)  # in file order, whichever pass found them
    if not out.considered:
        which = (f"with task in {sorted(tasks, key=str)}" if tasks is not None
                 else f"other than those with task in {sorted(skip_tasks)}")
        raise OmniInputError(f"{source} has no records {which} (of {len(records)} records); check the file, "
                             "and the tasks this command reads")
    if not out.kept:
        raise OmniInputError(f"{source}: no usable records, every one is bad: {out._tally()}; fix the file")
    return out


def check_record(record, image_folder: Path | None = None, reserved: tuple[str, ...] = (),
                 allowed: dict[str, bool] | None = None) -> tuple[Problem | None, dict[str, list[Path]]]:
    """What is wrong with one record (None if nothing), and its paths of each kind ("image", "video",
    "audio") in marker order; `allowed` says which kinds the model takes (all by default). Files
    are checked to exist under `image_folder` (when given), not decoded: that is `check_records`'
    last pass."""
    problem, media = _check_record(record, image_folder, reserved, allowed or {})
    return problem, media if problem is None else {kind: [] for kind, _ in _MEDIA}


def _check_record(record, image_folder: Path | None, reserved: tuple[str, ...],
                  allowed: dict[str, bool]) -> tuple[Problem | None, dict[str, list[Path]] | None]:
    if not isinstance(record, dict):
        return Problem("not a record", "the record", f"is {_short(record)}, not an object "
                                                     '{"id": ..., "conversations": [...]}'), None
    rid = record.get("id")
    if rid is None or rid == "" or isinstance(rid, bool) or not isinstance(rid, (str, int)):
        what = "is missing" if rid is None else f"is {_short(rid)}"
        return Problem("bad id", "id", f"{what}: give every record an id, a string or an integer"), None
    for name, ok, want in (("task", lambda v: isinstance(v, str), "a string"),
                           ("n_objects", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                            "a count (an integer >= 0)")):
        if record.get(name) is not None and not ok(record[name]):
            return Problem("bad field", name, f"is {_short(record[name])}: make it {want}, or leave it out"), None

    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        what = "is missing" if "conversations" not in record else f"is {_short(turns)}"
        return Problem("bad conversations", "conversations", f"{what}: give a non-empty list of {_FORMAT} turns"), None
    offset = 1 if isinstance(turns[0], dict) and turns[0].get("from") == "system" else 0
    n_markers = dict.fromkeys((kind for kind, _ in _MEDIA), 0)
    for j, turn in enumerate(turns):
        where = f"conversations[{j}]"
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            return Problem("bad turn", where, f"is {_short(turn)}, not {_FORMAT}"), None
        name, value = turn["from"], turn["value"]
        if not isinstance(name, str) or name not in _ROLES:
            return Problem("bad role", f"{where}.from", f"is {_short(name)}: use human or gpt (or user, assistant; "
                                                        "system for a first turn)"), None
        role = _ROLES[name]
        expected = "system" if j < offset else ("user", "assistant")[(j - offset) % 2]
        if role != expected:
            if role == "system":
                return Problem("bad role", f"{where}.from", "is 'system' after the first turn: a system turn "
                                                            "goes first, once"), None
            wanted = "human" if expected == "user" else "gpt"
            return Problem("bad role", f"{where}.from", f"is {name!r} where a {wanted} turn belongs: turns go "
                                                        "[system,] human, gpt, human, gpt, ..."), None
        if not isinstance(value, str):
            return Problem("bad turn", f"{where}.value", f"is {_short(value)}, not a string: every value is text"), None
        problem = _text_problem(value, reserved)
        if problem is not None:
            return Problem("bad text", f"{where}.value", problem), None
        odd = next((m for m in _MARKER_LIKE.finditer(value) if m.group(0) not in _MARKERS), None)
        if odd is not None:
            kind = odd.group(1).lower()
            return Problem("bad marker", f"{where}.value", f"holds {odd.group(0)!r}, which is not the {kind} marker: "
                                                           f"write it exactly <{kind}>"), None
        for kind, marker in _MEDIA:
            markers = value.count(marker)
            if markers and role != "user":
                article = "a" if kind == "video" else "an"
                return Problem("bad marker", f"{where}.value", f"holds {article} {marker} marker in a {name!r} "
                                                               f"turn: put {kind}s in human turns"), None
            n_markers[kind] += markers
    n_answers = (len(turns) - offset) // 2
    if not n_answers or (len(turns) - offset) % 2:
        return Problem("no answer", "conversations", "ends without a gpt answer to its last human turn: "
                                                     "every human turn needs an answer"), None
    turn_tasks = record.get("turn_tasks")
    if turn_tasks is not None and (not isinstance(turn_tasks, list) or len(turn_tasks) != n_answers
                                   or not all(isinstance(t, str) for t in turn_tasks)):
        return Problem("bad field", "turn_tasks", f"is {_short(turn_tasks)}: give one task name (a string) per "
                                                  f"gpt turn, {n_answers} here, or leave it out"), None

    media: dict[str, list[Path]] = {}
    for kind, marker in _MEDIA:
        problem, media[kind] = _media_paths(record, kind, marker, n_markers[kind], image_folder,
                                            allowed.get(kind, True))
        if problem is not None:
            return problem, None
    return None, media


def media_names(record: dict, kind: str = "image") -> list:
    """A record's `image` (`video`, `audio`) field as a list: none, one path, or its list of paths."""
    value = record.get(kind)
    return [] if value is None else [value] if isinstance(value, str) else value


def _media_paths(record: dict, kind: str, marker: str, n_markers: int, image_folder: Path | None,
                 allowed: bool) -> tuple[Problem | None, list[Path]]:
    """A record's `image` (`video`, `audio`) field checked: paths inside the folder, one per marker."""
    value = record.get(kind)
    names = media_names(record, kind)
    field_problem = f"bad {kind} field"
    if not isinstance(names, list):
        return Problem(field_problem, kind, f"is {_short(value)}: give a path or a list of paths"), []
    wheres = [kind if isinstance(value, str) else f"{kind}[{k}]" for k in range(len(names))]
    for name, where in zip(names, wheres):
        if not isinstance(name, str) or not name.strip() or "\0" in name or _text_problem(name, ()):
            return Problem(field_problem, where, f"is {_short(name)}: give a path (a string) relative to "
                                                 "the image folder"), []
        normal = posixpath.normpath(name)
        if os.path.isabs(name) or normal == ".." or normal.startswith("../"):
            # A dataset names files of its own folder: it cannot make a run read files elsewhere.
            return Problem(f"{kind} outside folder", where, f"is {_short(name)}, outside the image folder "
                                                            f"{image_folder or ''}: paths outside it are refused; give "
                                                            "a path relative to the folder (move or link the file "
                                                            "under it)"), []
    if n_markers != len(names):
        return Problem("bad marker", "conversations", f"has {n_markers} {marker} markers but the record has "
                                                      f"{len(names)} {kind}s: put one '{marker}\\n' in the human "
                                                      f"turns per {kind}, in the order of '{kind}'"), []
    if names and not allowed:
        what = _WITHOUT[kind]
        return Problem(field_problem, kind, f"lists {len(names)} {kind}s but the model is {what}: "
                                            f"leave out the {kind}s and their markers"), []
    if image_folder is None:
        return None, [Path(name) for name in names]
    paths = [Path(image_folder) / name for name in names]
    for name, path, where in zip(names, paths, wheres):
        # A video may be a folder of frames; an image is a file.
        if not (path.is_file() or (kind == "video" and path.is_dir())):
            what = "a folder" if path.is_dir() else "not a file"
            return Problem(f"missing {kind}", where, f"{_short(name)} is {what} under {image_folder}: check the "
                                                     "path and the image folder"), []
    return None, paths


class Records(list):
    """The records of a LLaVA JSON file: a list that remembers the file, so messages can name it."""

    path: Path


def write_records(path: str | Path, records: list[dict]) -> None:
    """Write `records` as a LLaVA-format JSON list, one record a line (readable, and diffable),
    replaced atomically."""
    lines = [json.dumps(record) for record in records]
    write_text(Path(path), "[\n" + ",\n".join(lines) + "\n]\n" if lines else "[]\n")


def read_records(path: str | Path) -> Records:
    """The records of a LLaVA-format JSON file (a non-empty list), or a one-line error saying what
    is wrong. Records themselves are checked by `check_records`."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise OmniInputError(f"cannot read {path}: {e.strerror}; check the path") from None
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark is harmless
    except UnicodeDecodeError as e:
        raise OmniInputError(f"{path} is not UTF-8 text (byte {e.start} is 0x{data[e.start]:02x}); LLaVA data is "
                             "a UTF-8 JSON file: re-save it as UTF-8") from None
    if not text.strip():
        raise OmniInputError(f"{path} is empty; LLaVA data is a JSON list of records")
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        hint = ("; one JSON value per line (JSON Lines) is not LLaVA data: put the records in one list"
                if e.msg == "Extra data" else "; fix the file")
        raise OmniInputError(f"{path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}){hint}") from None
    except RecursionError:
        raise OmniInputError(f"{path} nests JSON too deeply to read; LLaVA data is a flat list of records") from None
    if not isinstance(records, list):
        raise OmniInputError(
            f"{path} holds a JSON {_type(records)}, but LLaVA data is a list of records "
            '[{"id": ..., "image": ..., "conversations": [...]}, ...]'
        )
    if not records:
        raise OmniInputError(f"{path} holds no records (an empty list); give at least one record")
    out = Records(records)
    out.path = path
    return out


def _selected(record, tasks, skip_tasks) -> bool:
    # Whether a command reads this record; one it cannot place (not an object, a task that is
    # not a string) is read, so that it is reported rather than passed over.
    if not isinstance(record, dict):
        return True
    task = record.get("task")
    if task is not None and not isinstance(task, str):
        return True
    return (tasks is None or task in tasks) and task not in skip_tasks


def _text_problem(text: str, reserved: tuple[str, ...]) -> str | None:
    if not text.strip():
        return "is empty: give the turn some text"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return "holds an unpaired UTF-16 surrogate (a broken \\uD8xx escape): fix the text"
    token = next((t for t in reserved if t in text), None)
    if token is not None:
        return f"holds {token!r}, a special token of the tokenizer, which would be read as that token: remove it"
    return None


def _id_of(record) -> Any:
    return record.get("id") if isinstance(record, dict) else None


def _where(index: int, rid) -> str:
    if rid is None or isinstance(rid, (dict, list)):
        return f"record {index}"
    shown = repr(rid)
    return f"record {index} (id {shown if len(shown) <= 60 else shown[:57] + '...'})"


def _type(value) -> str:
    return "null" if value is None else type(value).__name__


# --- training samples ----------------------------------------------------------------------------


class LlavaDataset(Dataset):
    """Records of a LLaVA JSON file, those with `task` in `tasks` (when given) and not in `skip_tasks`.

    Every record is checked by `check_records` when the dataset is built, its images decoded:
    a bad one raises `OmniInputError`, or with `skip_bad` is left out, listed in `skipped`
    (`BadRecord`s) and counted in one warning. `records[i]` is the i-th kept record as it stands
    in the file (extra fields included). `max_length` bounds the tokenized length, image tokens
    included; `check(record, image_paths) -> Problem | None` adds a test of the caller's.
    `cache_images` keeps preprocessed images (and videos' sampled frames, as uint8) in memory,
    filled as the check decodes them. Token ids and labels are always kept once computed (a few
    hundred bytes a record, and a training run reads every record once an epoch), and so is which
    frames each video gives (not the frames themselves, which are decoded again when read) and how
    many windows each audio fills (its samples are read again, and their log-mel computed, per sample).
    """

    def __init__(
        self,
        json_path: str | Path,
        image_folder: str | Path | None,
        processor: Processor,
        tasks: set[str | None] | None = None,
        skip_bad: bool = False,
        max_length: int | None = None,
        cache_images: bool = False,
        skip_tasks: Collection[str] = (),
        check: Callable[[dict, list[Path]], Problem | None] | None = None,
    ):
        self.json_path = Path(json_path)
        # Image paths are relative to image_folder, or to the JSON's own folder without one.
        self.image_folder = Path(image_folder) if image_folder is not None else self.json_path.parent
        self.processor = processor
        self.max_length = max_length
        self.cache_images = cache_images
        self.records: list[dict] = []
        self.ids: list = []
        self._images: list[list[Path]] = []  # per record, in marker order
        self._videos: list[list[Path]] = []
        self._audios: list[list[Path]] = []
        self._audio_windows: dict[Path, int] = {}  # path -> how many windows the audio fills
        self._cache: dict[Path, torch.Tensor] = {}  # path -> (3, H, W)
        self._video_cache: dict[Path, Video] = {}  # path -> its sampled frames (none kept without cache_images)
        self._encoded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # kept index -> (input_ids, labels)

        encoded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(record) -> its tokens, from the length check

        def fits(record: dict, paths: list[Path]) -> Problem | None:
            problem = check(record, paths) if check is not None else None
            if problem is None and max_length is not None:
                videos, audios = ([self.image_folder / v for v in media_names(record, kind)]  # checked by now
                                  for kind in ("video", "audio"))
                encoded[id(record)] = self._encode(record["conversations"], videos, audios)
                n_tokens = len(encoded[id(record)][0])
                if n_tokens > max_length:
                    images = f" ({len(paths)} images of {processor.image_seq_len} tokens each)" if paths else ""
                    return Problem("too long", "conversations", (
                        f"is {n_tokens} tokens{images}, over max_length={max_length} (in training, the model's "
                        "max_seq_len): shorten the record"))
            return problem

        def load(path: Path) -> None:
            # With the cache on, the check's decoding is the only one: training reads the cache.
            self._cache[path] = processor.image_processor([path])[0]

        raw = read_records(self.json_path)
        checked = check_records(raw, self.image_folder, processor=processor, tasks=tasks, skip_tasks=skip_tasks,
                                skip_bad=skip_bad, check=fits, load=load if cache_images else None,
                                load_video=self._video, load_audio_file=self._audio, source=self.json_path)
        for index, paths, videos, audios in zip(checked.kept, checked.images, checked.videos, checked.audios):
            record = raw[index]
            if id(record) in encoded:
                self._encoded[len(self.records)] = encoded[id(record)]
            self.records.append(record)
            self.ids.append(record["id"])
            self._images.append(paths)
            self._videos.append(videos)
            self._audios.append(audios)
        self.skipped: list[BadRecord] = checked.skipped
        if checked.skipped:
            warnings.warn(checked.report(), stacklevel=2)

    def __len__(self) -> int:
        return len(self.records)

    def token_lengths(self) -> list[int]:
        """Each record's sequence length in tokens, its images' tokens included."""
        return [len(self._encoded_at(i)[0]) for i in range(len(self.records))]

    def __getitem__(self, i: int) -> dict:
        """`input_ids` (T,) and `labels` (T,) long, `pixel_values` (N, 3, H, W) float32 in
        marker order or None, `pixel_values_videos` a list of (F, 3, H, W) float32, one per video in
        marker order (empty without videos), `input_features` (W, M, frames) float32, every audio's
        log-mel windows in marker order (None without audio), and the record's `id`."""
        input_ids, labels = self._encoded_at(i)
        return {
            "input_ids": input_ids,
            "labels": labels,
            "pixel_values": self.pixel_values(i),
            "pixel_values_videos": self.video_pixels(i),
            "input_features": self.audio_features(i),
            "id": self.ids[i],
        }

    def audio_features(self, i: int) -> torch.Tensor | None:
        """Record i's audio as the encoder reads it: (W, M, frames), every audio's windows in marker
        order, or None."""
        if not self._audios[i]:
            return None
        out = []
        for path in self._audios[i]:
            try:
                features = self.processor.audio_features(self.processor.read_audio(path))
            except OmniInputError as e:  # a file changed since the check: say which record it belongs to
                raise OmniInputError(f"{self.json_path}: record id {self.ids[i]!r}: {e}") from None
            if len(features) != self._audio_windows[path]:
                raise OmniInputError(f"{self.json_path}: record id {self.ids[i]!r}: {path} changed since it was "
                                     "checked; restart the run")
            out.append(features)
        return torch.cat(out)

    def video_pixels(self, i: int) -> list[torch.Tensor]:
        """Record i's videos, their sampled frames preprocessed: a list of (F, 3, H, W)."""
        out = []
        for path in self._videos[i]:
            try:
                video = self._video(path)
                if not len(video.frames):  # only which frames were kept: decode them again
                    video = self.processor.read_video(path)
            except OmniInputError as e:  # a file changed since the check: say which record it belongs to
                raise OmniInputError(f"{self.json_path}: record id {self.ids[i]!r}: {e}") from None
            if len(video.indices) != len(self._video_cache[path].indices):
                raise OmniInputError(f"{self.json_path}: record id {self.ids[i]!r}: {path} changed since it was "
                                     "checked; restart the run")
            out.append(self.processor.video_pixels([video])[0])
        return out

    def _encoded_at(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Records are tokenized once, when first needed (validation may have done it already).
        if i not in self._encoded:
            self._encoded[i] = self._encode(self.records[i]["conversations"], self._videos[i], self._audios[i])
        return self._encoded[i]

    def _video(self, path: Path) -> Video:
        """`path`'s sampled frames (read once; the frames kept with `cache_images`, else only which)."""
        if path not in self._video_cache:
            video = self.processor.read_video(path)
            self._video_cache[path] = video if self.cache_images else replace(video, frames=video.frames[:0])
        return self._video_cache[path]

    def _audio(self, path: Path) -> int:
        """How many windows `path`'s audio fills (read once, to check it and to count them)."""
        if path not in self._audio_windows:
            samples = self.processor.read_audio(path)
            self._audio_windows[path] = max(1, -(-len(samples) // self.processor.log_mel.window_samples))
        return self._audio_windows[path]

    def _encode(self, conversations: list[dict], videos: list[Path] = (),
                audios: list[Path] = ()) -> tuple[torch.Tensor, torch.Tensor]:
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
        markers = (tokenizer.image_token_id, tokenizer.video_token_id, tokenizer.audio_token_id)
        labels = [
            token if token not in markers and end > begin and any(begin < hi and end > lo for lo, hi in supervised)
            else IGNORE_INDEX
            for token, (begin, end) in zip(ids, offsets)
        ]
        ids, labels = self.processor.expand(ids, [self._video(path) for path in videos], labels,
                                            audio_windows=[self._audio(path) for path in audios])
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
        except OmniInputError as e:  # a file changed since the check: say which record it belongs to
            raise OmniInputError(f"{self.json_path}: record id {self.ids[i]!r}: {e}") from None


def _short(value) -> str:
    # A value quoted in a one-line message: on one line, not too long, and printable as UTF-8.
    try:
        text = " ".join(json.dumps(value, ensure_ascii=False, default=str).split())
    except RecursionError:  # nested as deep as the JSON reader allows
        text = f"a deeply nested {type(value).__name__}"
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= 60 else text[:57] + "..."
