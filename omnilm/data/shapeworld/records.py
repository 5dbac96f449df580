"""Examples and files: a scene, its image and its LLaVA JSON records, and writing many to disk.

    example = make_example(index, seed, split)     # scene, image and two LLaVA records
    path    = write_shapeworld(out_dir, n, seed, split)
    path    = ShapeWorldSpec(out=out_dir, n=n, split="test").write()   # `omnilm data shapeworld`
                                                 # (video=True: clips, `write_shapeworld_video`)

An example's generator (`example_rng`) is consumed in a fixed order: scene, render, caption
prompt, questions; so its text depends on neither `image_size` nor `jitter`. With
`multi_image=P`, `write_shapeworld` makes a fraction of the indices multi-image examples
(`make_multi_example`) and writes the others exactly as it does without them.
"""

from __future__ import annotations

import re
from pathlib import Path
from dataclasses import dataclass
from typing import NamedTuple

from PIL import Image

from omnilm.data.llava_json import write_records
from omnilm.data.shapeworld.audio import write_shapeworld_audio
from omnilm.data.shapeworld.multi import is_multi_image, make_multi_example
from omnilm.data.shapeworld.questions import QUESTION_MIXES, ask, pick_families
from omnilm.data.shapeworld.scenes import (IMAGE_SIZE, JITTER, MAX_OBJECTS, Scene, caption, example_rng, generate_scene,
                                           render)
from omnilm.data.shapeworld.video import DEFAULT_FRAMES, FRAME_RANGE, FRAMES_AS, write_shapeworld_video
from omnilm.errors import OmniInputError
from omnilm.settings import setting

CAPTION_PROMPTS = ("Describe the image.", "What is in the image?", "Describe the shapes in the image.")


class Example(NamedTuple):
    scene: Scene
    image: Image.Image
    records: list  # [caption record, question record] in LLaVA JSON form


def make_example(index: int, seed: int, split: str, image_size: int = IMAGE_SIZE, jitter: float = JITTER,
                 questions: str = "mixed", n_objects: int | None = None) -> Example:
    """Example `index`: its scene (`n_objects` objects, default 1 to 4), image and two LLaVA
    records, a caption and a question conversation (see `pick_families`), all from one
    generator. `jitter` changes where shapes sit in their cells (see `render`), never the text."""
    rng = example_rng(split, seed, index)
    scene = generate_scene(rng, n_objects)
    image = render(scene, image_size, rng, jitter)
    stem = f"{split}-{index:06d}"
    image_path = f"images/{split}_{index:06d}.png"
    caption_record = {
        "id": f"{stem}-caption", "image": image_path, "task": "caption", "n_objects": len(scene),
        "conversations": [{"from": "human", "value": "<image>\n" + rng.choice(CAPTION_PROMPTS)},
                          {"from": "gpt", "value": caption(scene)}],
    }
    families = pick_families(scene, rng, questions)
    conversations = []
    for turn, family in enumerate(families):
        question, answer = ask(family, scene, rng)
        conversations += [{"from": "human", "value": ("<image>\n" if turn == 0 else "") + question},
                          {"from": "gpt", "value": answer}]
    task = families[0] if len(families) == 1 else "multi_turn"
    # n_objects lets `omnilm eval` split accuracy by scene size: with one object a question needs
    # no look-up, with two or more the model must find the object the question names.
    question_record = {"id": f"{stem}-{task}", "image": image_path, "task": task, "n_objects": len(scene)}
    if task == "multi_turn":
        question_record["turn_tasks"] = families
    question_record["conversations"] = conversations
    return Example(scene, image, [caption_record, question_record])


def write_shapeworld(out_dir: str | Path, n: int, seed: int, split: str, image_size: int = IMAGE_SIZE,
                     jitter: float = JITTER, questions: str = "mixed", n_objects: int | None = None,
                     multi_image: float = 0.0, progress: bool = True) -> Path:
    """Write `n` examples: PNGs to `out_dir/images/{split}_{index:06d}.png` and all records to
    `out_dir/{split}.json` (a JSON list, one record a line, replaced atomically; image paths
    are relative to `out_dir`). Returns the JSON path.

    A `multi_image` fraction of the examples (chosen per index by `is_multi_image`) are
    multi-image ones (`make_multi_example`): one record, and PNGs `{split}_{index:06d}_{k}.png`.
    The others are exactly what they are without it. `n_objects` shapes the single-image examples
    only (multi-image scenes are drawn to fit their questions); `questions="all"` asks every family
    a single image allows, and follows a multi-image question with every other multi-image family
    its images answer. A progress bar shows for 2,000 examples or more, unless `progress` is False."""
    from tqdm import tqdm

    if not re.fullmatch(r"[a-z][a-z0-9_]*", str(split)):
        raise OmniInputError(f"split {split!r} is not a plain name: use train or test (lower case letters, digits, _)")
    if n < 0:
        raise OmniInputError(f"n is {n}: ask for zero or more examples")
    if not 0 <= jitter <= 1:
        raise OmniInputError(f"jitter is {jitter}: use 0 (shapes centred in their cells) to 1 (anywhere in the cell)")
    if n_objects is not None and not 1 <= n_objects <= MAX_OBJECTS:
        raise OmniInputError(f"n_objects is {n_objects}: a scene holds 1 to {MAX_OBJECTS} objects (or leave it "
                             "unset for a mix)")
    if questions not in QUESTION_MIXES:
        raise OmniInputError(f"questions={questions!r}: use 'mixed' (1 to 4 families per image) or 'all' (every family)")
    if not 0 <= multi_image <= 1:
        raise OmniInputError(f"multi_image is {multi_image}: give the fraction of multi-image examples, "
                             "from 0 (none) to 1 (all)")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for index in tqdm(range(n), desc=f"shapeworld {split}", unit="img", disable=not progress or n < 2000):
        if is_multi_image(index, seed, split, multi_image):
            multi = make_multi_example(index, seed, split, image_size, jitter, questions)
            for image, name in zip(multi.images, multi.record["image"]):
                image.save(out_dir / name, format="PNG")
            records.append(multi.record)
            continue
        example = make_example(index, seed, split, image_size, jitter, questions, n_objects)
        example.image.save(out_dir / example.records[0]["image"], format="PNG")
        records += example.records
    path = out_dir / f"{split}.json"
    write_records(path, records)
    return path


@dataclass(kw_only=True)
class ShapeWorldSpec:
    """What `omnilm data shapeworld` writes; its defaults draw the world the demo trains and tests on."""

    out: Path = setting(help="folder for <split>.json and images/")
    n: int = setting(help="number of examples (a single-image one: a caption and a question record; a multi-image "
                          "one: one record)")
    seed: int = setting(0, "seed of the scenes")
    split: str = setting("train", "train, test, or any other name: each split has its own scene seeds")
    image_size: int = setting(IMAGE_SIZE, "pixels per side, 64-128 (the tiny preset's input; frames 64-256)")
    jitter: float = setting(JITTER, "how far shapes stray from their cell's centre: 0 centred, 1 anywhere in the cell")
    questions: str = setting("mixed", "per image, a conversation of 1 to 4 question families (mixed: the demo's test "
                                      "split) or of all of them (all: its training split); all also follows each "
                                      "multi-image question with every other multi-image family its images answer; with "
                             "--video, mixed writes a record per question, all one conversation of every question "
                             "a clip answers (the same for --audio)",
                             choices=QUESTION_MIXES)
    n_objects: int | None = setting(None, f"objects per scene, 1-{MAX_OBJECTS} (default: a mix of 1 to {MAX_OBJECTS})")
    multi_image: float = setting(0.0, "fraction of examples with 2 to 4 interleaved images and multi-image questions",
                                 metavar="P")
    video: bool = setting(False, "clips instead of images: 1 to 3 shapes moving, appearing and disappearing, with "
                                 "questions on direction, appearance, counts, order and time (--image-size is the "
                                 "frame size, up to 256)")
    frames_as: str = setting("mp4", "with --video: mp4, one lossless (FFV1) file a clip (needs PyAV, the [media] "
                                    "extra); png, a folder of frames a clip", choices=FRAMES_AS)
    n_frames: int | None = setting(None, f"with --video: frames per clip, {FRAME_RANGE[0]}-{FRAME_RANGE[1]} "
                                         f"(default: a mix of {DEFAULT_FRAMES[0]} to {DEFAULT_FRAMES[1]})")
    audio: bool = setting(False, "clips of sound instead of images: 2 s of 1 to 5 tones (low, mid or high; sine, "
                                 "square or saw; some with noise), with questions on how many tones, the pitch of "
                                 "the k-th, whether the melody goes up and the timbre; 16-bit WAV (needs soundfile, "
                                 "the [media] extra)")
    cross: int = setting(0, "with --audio: also this many pairs of an image and a clip, asked 'Are there as many "
                            "tones as shapes?' (PNG + WAV)", metavar="N")

    def write(self, progress: bool = True) -> Path:
        if self.audio:
            drawn = [flag for flag, value, default in (
                ("--jitter", self.jitter, JITTER), ("--n-objects", self.n_objects, None),
                ("--multi-image", self.multi_image, 0.0), ("--image-size", self.image_size, IMAGE_SIZE),
                ("--video", self.video, False), ("--frames-as", self.frames_as, "mp4"),
                ("--n-frames", self.n_frames, None)) if value != default]
            if drawn:
                verb = "shapes" if len(drawn) == 1 else "shape"
                raise OmniInputError(f"{', '.join(drawn)} {verb} images or clips of frames; --audio draws its own "
                                     "sounds (and --cross its own images): drop it")
            return write_shapeworld_audio(self.out, self.n, self.seed, self.split, cross=self.cross, progress=progress,
                                          questions="all" if self.questions == "all" else "one")
        if self.cross:
            raise OmniInputError("--cross pairs images with sounds: add --audio, or drop it")
        if self.video:
            image_only = [flag for flag, value, default in (
                ("--jitter", self.jitter, JITTER), ("--n-objects", self.n_objects, None),
                ("--multi-image", self.multi_image, 0.0)) if value != default]
            if image_only:
                verb = "shapes" if len(image_only) == 1 else "shape"
                raise OmniInputError(f"{', '.join(image_only)} {verb} still images; clips draw their own objects "
                                     "and questions: drop it with --video")
            return write_shapeworld_video(self.out, self.n, self.seed, self.split, frame_size=self.image_size,
                                          frames_as=self.frames_as, n_frames=self.n_frames, progress=progress,
                                          questions="all" if self.questions == "all" else "one")
        if self.frames_as != "mp4" or self.n_frames is not None:
            raise OmniInputError("--frames-as and --n-frames shape clips: add --video, or drop them")
        return write_shapeworld(self.out, self.n, self.seed, self.split, image_size=self.image_size,
                                jitter=self.jitter, questions=self.questions, n_objects=self.n_objects,
                                multi_image=self.multi_image, progress=progress)
