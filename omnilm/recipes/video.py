"""ShapeWorld in time, end to end: clips -> tokenizer -> look-up stage -> main stage -> every family,
the controls and the video haystack.

`omnilm demo-video` runs it. At its defaults the model tells which way a shape moves, names what
appears and disappears, counts, orders events, tells their times and finds a cross in a 32-frame
haystack (docs/video.md, "Results"). The model is LLaVA-NeXT-Video's design at toy scale: each
frame through the tiny preset's ViT (96 px in 16 px patches), its 6 x 6 grid averaged 2 x 2 (9
tokens a frame), joined by motion features (the change of each token's patches and a halo of one
around them since the frame before, summed as it is, by column and by row), the projector, the
frames in order at the `<video>` marker. The tower stays frozen at its random initialisation (its
features cached) and the projector starts whitened, as the image recipe's instruct-only arm
(docs/shapeworld-recipe.md). A look-up stage trains on direction records and haystack clips
alone, the questions whose answer sits in one token of many (a shape's step, the cross); the main
stage then on every record: each clip one conversation of every question it answers (dense
targets), the direction records and the haystack clips of 1 to 32 frames (the look-up learned on
short ones first). Why each default is what it is: docs/video.md. Everything lands under `out/`:

    out/data/       train.json (every training record), lookup.json (the look-up stage's), test.json
                    (a record a question), videos/, tokenizer/
    out/lookup/     the look-up stage: metrics.jsonl, loss.png, checkpoints/, model/
    out/instruct/   the main stage, from the look-up stage's model
    out/model/      the final model (omnilm's own folder; with --no-motion transformers'
                    LlavaNextVideoForConditionalGeneration loads it)
    out/eval.json   accuracy per family with the frames in order, shuffled and the first alone
    out/niah/       the video haystack: niah.csv, niah.png, predictions.jsonl
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omnilm.config import VIDEO_POOL_MODES
from omnilm.data.llava_json import write_records
from omnilm.data.tokenizer import Tokenizer
from omnilm.data.shapeworld.video import CHANCE, VIDEO_FAMILIES, write_shapeworld_video, write_video_clips
from omnilm.errors import OmniInputError
from omnilm.eval.vqa import FRAME_CONTROLS
from omnilm.io import write_json
from omnilm.recipes.clips import train_and_measure
from omnilm.settings import check_output_folder, check_range, check_seed, setting, to_dict
from omnilm.train import Hyperparams
from omnilm.train.stages import chat_tokenizer

PRESET = "tiny"
# What --n-motion's conversations ask: the families a frame alone does not answer.
MOTION_FAMILIES = ("direction", "appear", "disappear", "order", "when")


@dataclass(kw_only=True)
class VideoRecipe:
    """What `omnilm demo-video` trains and measures."""

    seed: int = setting(0, "seed of the data, the weights and the batch order")
    n_train: int = setting(5000, "training clips of 4 to 8 frames, each one conversation of every question it answers")
    n_needles: int = setting(2000, "training haystack clips (a cross in one frame, its colour asked)")
    n_direction: int = setting(3000, "extra training clips, each a record of one question: which way a shape "
                                     "moves (the clips with a mover, about 60%)")
    n_motion: int = setting(0, "extra training clips, each one conversation of only its questions about motion "
                               "and events: direction, appear, disappear, order, when")
    needle_frames: tuple[int, ...] = setting((1, 2, 4, 8, 16, 32), "frames per training haystack clip, comma-"
                                             "separated: the clips split evenly among these lengths, short ones first "
                                             "to learn the look-up where the needle is one object of few")
    n_test: int = setting(300, "held-out clips, a record per question (about 1,100 questions)")
    system_prompt: str = setting("Answer about the video.", "the chat's system prompt, saved with the tokenizer")
    llm_layers: int = setting(2, "decoder layers (the tiny preset has 4)")
    patch_size: int = setting(16, "the ViT's patch side: 96 px frames in 16 px patches are a 6 x 6 grid")
    pool_stride: int = setting(2, "frames' grids pooled over stride x stride patches (LLaVA-NeXT-Video's 2)")
    pool_mode: str = setting("average", "how a frame's stride x stride patches become one token: 'average' "
                                        "(LLaVA-NeXT-Video), 'max', or 'concat' (side by side, Qwen2-VL's patch "
                                        "merger: a token says which of its patches holds what)",
                             choices=VIDEO_POOL_MODES)
    motion: bool = setting(True, "each frame's tokens joined by the change of their patches since the frame "
                                 "before (what lets a model tell which way a shape moves: docs/video.md); "
                                 "--no-motion: LLaVA-NeXT-Video's connector, which transformers loads")
    motion_halo: int = setting(1, "with motion, a token sees the change of this many patches more on each side "
                                  "(1: a step across two tokens' border shows whole in both)")
    motion_moments: bool = setting(True, "with motion, the change summed as it is, by column and by row, not "
                                         "laid out patch by patch: a step's way as a sign (docs/video.md)")
    token_conv: int = setting(0, "a causal convolution over the last K tokens before each attention (0: none); "
                                 "K above a frame's tokens reaches the same place in the frame before")
    timestamps: bool = setting(False, "each frame's time as text before its tokens ('3s')")
    one_stage: bool = setting(False, "no look-up stage: every record in the one instruct stage")
    lookup: Hyperparams = setting(
        help="the first stage: --n-direction's records and the haystack clips alone, where the decoder learns to "
             "find the one token a question is about (a shape's step, the cross) before the other families' "
             "questions crowd it (docs/video.md)",
        factory=lambda: Hyperparams(steps=300, batch_size=32, lr=2e-3, warmup=50, optimizer="muon",
                                    group_by_length=True))
    instruct: Hyperparams = setting(
        help="the main stage: every record, from the look-up stage's model",
        factory=lambda: Hyperparams(steps=1300, batch_size=32, lr=2e-3, warmup=50, optimizer="muon",
                                    group_by_length=True))
    haystack_frames: tuple[int, ...] = setting((32,), "video haystack clip lengths in frames, comma-separated")
    haystack_depths: int = setting(11, "video haystack depths, 0 to 100%")
    haystack_samples: int = setting(20, "video haystack clips per length and depth")
    cache_features: float = setting(4.0, "keep up to GIB gibibytes of the frozen tower's features, so that each "
                                         "frame runs through it once in a stage (train --cache-features; about 2 GB "
                                         "holds the default clips' frames); 0: none", metavar="GIB")
    progress: bool = setting(True, "progress bars (--no-progress: none)")

    def __post_init__(self) -> None:
        check_seed(self)
        check_range(self, ("n_train", "n_test", "llm_layers", "patch_size", "pool_stride", "haystack_samples"), low=1)
        check_range(self, ("n_needles", "n_direction", "n_motion", "motion_halo", "token_conv", "cache_features"),
                    low=0)
        self.needle_frames = tuple(int(n) for n in self.needle_frames)
        if not self.needle_frames or not all(1 <= n <= 32 for n in self.needle_frames):
            raise OmniInputError(f"--needle-frames {','.join(map(str, self.needle_frames))}: give clip lengths of 1 to "
                                 "32 frames, comma-separated")
        check_range(self, ("haystack_depths",), 2, 101)
        self.haystack_frames = tuple(int(n) for n in self.haystack_frames)
        if 96 % self.patch_size or (96 // self.patch_size) % self.pool_stride:
            raise OmniInputError(f"--patch-size {self.patch_size} and --pool-stride {self.pool_stride}: the patch must "
                                 "divide the 96 px frame, and the stride the grid of patches")

    def architecture(self, video_token_id: int) -> dict[str, Any]:
        """What the recipe changes of the tiny preset."""
        return {"text": {"n_layers": self.llm_layers, "token_conv": self.token_conv},
                "vision": {"patch_size": self.patch_size}, "video_token_id": video_token_id,
                "video_pool_stride": self.pool_stride, "video_pool_mode": self.pool_mode, "video_motion": self.motion,
                "video_motion_halo": self.motion_halo if self.motion else 0,
                "video_motion_moments": self.motion_moments and self.motion}


# The command line's view of the recipe (omnilm.settings): the recipe whitens the projector of its
# first stage and of no later one, so that flag is its own.
VIDEO_FLAGS = dict(skip=("lookup.whiten_projector", "instruct.whiten_projector"))


def write_data(out: Path, recipe: VideoRecipe) -> tuple[Path, Path, Path]:
    """ShapeWorld clips under `out`: every training record in train.json (conversations, with
    --n-direction and --n-motion their extra records too, and haystack clips), the look-up stage's
    (--n-direction's and the haystack clips) in lookup.json, a record a question in test.json; and
    the tokenizer in `out/tokenizer`. Returns the three files: train, test, look-up."""
    shared = dict(seed=recipe.seed, progress=recipe.progress)
    conversations = write_video_clips(out, recipe.n_train, split="train", questions="all", **shared)
    direction, motion, needles = [], [], []
    if recipe.n_direction:  # one record a clip: its direction question (each family's are drawn apart)
        extra = write_video_clips(out, recipe.n_direction, split="direction", **shared)
        direction = [record for record in extra if record["task"] == "direction"]
    if recipe.n_motion:
        extra = write_video_clips(out, recipe.n_motion, split="motion", questions="all", **shared)
        motion = [cut for record in extra if (cut := keep_turns(record, MOTION_FAMILIES)) is not None]
    lengths = recipe.needle_frames
    for k, n_frames in enumerate(lengths):  # an even share of the haystack clips at each length
        share = recipe.n_needles // len(lengths) + (k < recipe.n_needles % len(lengths))
        needles += write_video_clips(out, share, split=f"needle_{n_frames}", needles=True, n_frames=n_frames,
                                     **shared)
    train_json, lookup_json = out / "train.json", out / "lookup.json"
    write_records(train_json, conversations + direction + motion + needles)
    write_records(lookup_json, direction + needles)
    test_json = write_shapeworld_video(out, recipe.n_test, split="test", **shared)
    chat_tokenizer(train_json, recipe.system_prompt).save(out / "tokenizer")
    return train_json, test_json, lookup_json


def keep_turns(record: dict, families: tuple[str, ...]) -> dict | None:
    """A clip's conversation (`questions="all"`) cut to the turns of `families`, the video marker
    before the first question left; None where none is left."""
    turns = record["conversations"]
    kept = [(dict(turns[2 * k]), dict(turns[2 * k + 1]), task) for k, task in enumerate(record["turn_tasks"])
            if task in families]
    if not kept:
        return None
    for question, _, _ in kept:
        question["value"] = question["value"].removeprefix("<video>\n")
    kept[0][0]["value"] = "<video>\n" + kept[0][0]["value"]
    return {**record, "turn_tasks": [task for _, _, task in kept],
            "conversations": [turn for question, answer, _ in kept for turn in (question, answer)]}


def run_video_recipe(out: str | Path, recipe: VideoRecipe | None = None) -> dict[str, Any]:
    """Run the recipe; returns timings, the evaluations (frames in order and the two controls, the
    haystack) and the final model."""
    recipe = recipe or VideoRecipe()
    out = Path(out)
    check_output_folder(out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    data = out / "data"
    train_json, test_json, lookup_json = write_data(data, recipe)
    timings["data"] = time.perf_counter() - t0

    video_token_id = Tokenizer.from_file(data / "tokenizer").video_token_id
    # Every frame of every clip (--video-frames 0): the haystack's needle must not be sampled away.
    shared = {"seed": recipe.seed, "video_frames": 0, "video_timestamps": recipe.timestamps,
              "cache_features": recipe.cache_features}
    fresh = {"preset": PRESET, "config": recipe.architecture(video_token_id), "whiten_projector": True}
    stages = []  # the first stage shapes the model and whitens its projector; a later one starts from it
    if not recipe.one_stage and (recipe.n_direction or recipe.n_needles):
        stages.append(("lookup", lookup_json, {**vars(recipe.lookup), **shared, **fresh}))
    stages.append(("instruct", train_json, {**vars(recipe.instruct), **shared, **({} if stages else fresh)}))
    haystack = dict(needle="video", lengths=tuple(map(str, recipe.haystack_frames)), depths=recipe.haystack_depths,
                    samples=recipe.haystack_samples, seed=recipe.seed)
    measured = train_and_measure(out, data, stages, test_json, FRAME_CONTROLS, "frames", haystack, recipe.progress)
    timings.update(measured.pop("timings"))
    result = {"recipe": to_dict(recipe), "chance": CHANCE, **measured, "timings": timings,
              "report": format_video_results(measured["eval"])}
    write_json(out / "results.json", {k: v for k, v in result.items() if k != "model"})
    return result


def format_video_results(evaluations: dict[str, dict]) -> str:
    """Accuracy per family with the frames in order, shuffled and the first alone, beside chance."""
    families = [f for f in VIDEO_FAMILIES if f in evaluations["all"]["tasks"]]
    lines = ["| family | questions | frames in order | shuffled | first frame | chance |",
             "|---|---:|---:|---:|---:|---:|"]
    for family in families:
        cells_ = [f"{100 * evaluations[c]['tasks'][family]['accuracy']:.1f}%" for c in FRAME_CONTROLS]
        lines.append(f"| {family} | {evaluations['all']['tasks'][family]['n']} | " + " | ".join(cells_)
                     + f" | {100 * CHANCE[family]:.1f}% |")
    overall = [f"{100 * evaluations[c]['accuracy']:.1f}%" for c in FRAME_CONTROLS]
    lines.append(f"| **overall** | {evaluations['all']['n']} | " + " | ".join(f"**{o}**" for o in overall) + " | |")
    return "\n".join(lines)


