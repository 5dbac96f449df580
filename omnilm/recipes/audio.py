"""ShapeWorld you can hear, end to end: tone clips -> tokenizer -> instruct -> calibrate -> every
family, the silence control, the cross-modal questions and the audio haystack.

`omnilm demo-audio` runs it. The model is Voxtral's design at toy scale: a Whisper encoder (80 mel
bins, 2 s windows, `encoder_layers` blocks of width `encoder_dim`) trained from scratch with the
rest, Voxtral's projector joining 4 encoder frames (80 ms) into each of a window's 25 tokens, and
the tiny preset's decoder with 2 layers; with `--cross` N > 0 also the tiny preset's ViT (frozen at
its random initialisation, its projector whitened, as the video recipe's) for the questions that
need an image and a sound. Every clip is one conversation of every question it answers (dense
targets: the count, each tone's pitch, the melody, the timbre), and haystack clips of 1 to 8
windows (a bell in one, its pitch asked) teach the look-up. A short last stage hears the same
records and a tenth of the conversations again over silence, answers kept, so that a model hearing
nothing answers from the question alone. Why each default is what it is: docs/audio.md, "Results".
Everything lands under `out/`:

    out/data/       train.json (one conversation a clip, the haystack and cross-modal records),
                    calibrate.json (the same and the silent copies), test.json (a record a
                    question), audio/, images/, tokenizer/
    out/instruct/   the training run: metrics.jsonl, loss.png, checkpoints/, model/
    out/calibrate/  the last stage, from instruct's model (without it: --silent 0)
    out/model/      the final model (without --cross: transformers' VoxtralForConditionalGeneration
                    loads it)
    out/eval.json   accuracy per family with the audio heard, and with silence in its place
    out/niah/       the audio haystack: niah.csv, niah.png, predictions.jsonl
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from omnilm.data.llava_json import write_records
from omnilm.data.audio import write_audio
from omnilm.data.shapeworld.audio import (AUDIO_FAMILIES, CHANCE, CROSS_FAMILIES, MAX_NEEDLE_WINDOWS, WINDOW_SAMPLES,
                                          write_audio_clips, write_cross_modal)
from omnilm.data.tokenizer import Tokenizer
from omnilm.errors import OmniInputError
from omnilm.eval.vqa import AUDIO_CONTROLS
from omnilm.io import write_json
from omnilm.recipes.clips import train_and_measure
from omnilm.settings import check_output_folder, check_range, check_seed, setting, to_dict
from omnilm.train import Hyperparams
from omnilm.train.stages import chat_tokenizer

PRESET = "tiny"
WINDOW_POSITIONS = 100  # encoder frames a 2 s window gives (200 mel frames at Whisper's 10 ms hop)
SILENCE = "audio/silence.wav"  # the clip the --silent conversations hear


@dataclass(kw_only=True)
class AudioRecipe:
    """What `omnilm demo-audio` trains and measures."""

    seed: int = setting(0, "seed of the data, the weights and the batch order")
    n_train: int = setting(6000, "training clips of one 2 s window, each one conversation of every question it "
                                 "answers")
    n_needles: int = setting(2000, "training haystack clips (a bell in one window, its pitch asked)")
    silent: float = setting(0.1, "for the last stage (--calibrate-*), this share of the training conversations "
                                 "written again with silence in place of their clip, answers kept (modality "
                                 "dropout): a model that hears nothing then answers from the question alone rather "
                                 "than off the answers' set; 0: no last stage", metavar="P")
    needle_windows: tuple[int, ...] = setting((1, 2, 4, 8), "windows per training haystack clip, comma-separated: "
                                              "the clips split evenly among these lengths")
    cross: int = setting(0, "training pairs of an image and a clip, asked 'Are there as many tones as shapes?' "
                            "(the model then has a vision tower too, and no transformers class); 0: an audio-only "
                            "model, which transformers' Voxtral loads")
    n_test: int = setting(400, "held-out clips, a record per question (about 1,400 questions), and as many "
                               "cross-modal pairs (with --cross)")
    system_prompt: str = setting("Answer about the sound.", "the chat's system prompt, saved with the tokenizer")
    llm_layers: int = setting(2, "decoder layers (the tiny preset has 4)")
    encoder_layers: int = setting(2, "Whisper encoder blocks")
    encoder_dim: int = setting(128, "Whisper encoder width")
    frames_per_token: int = setting(4, "encoder frames (20 ms each) Voxtral's projector joins into one audio token "
                                       "(4, Voxtral's: 80 ms; the encoder's feed-forward is that many times as wide, "
                                       "as transformers' Voxtral reads it)")
    instruct: Hyperparams = setting(
        help="the first training stage", factory=lambda: Hyperparams(steps=1500, batch_size=32, lr=2e-3, warmup=50,
                                                                  optimizer="muon", group_by_length=True))
    calibrate: Hyperparams = setting(
        help="the last stage, from the first's model: the same records and --silent's silent copies, the encoder "
             "frozen, at a low learning rate (silent copies from the start cost the pitch and the melody: "
             "docs/audio.md)",
        factory=lambda: Hyperparams(steps=100, batch_size=32, lr=2e-4, warmup=10, optimizer="muon",
                                    group_by_length=True))
    haystack_windows: tuple[int, ...] = setting((8,), "audio haystack clip lengths in windows, comma-separated")
    haystack_depths: int = setting(8, "audio haystack depths, 0 to 100% (8: each window of an 8-window clip)")
    haystack_samples: int = setting(20, "audio haystack clips per length and depth")
    progress: bool = setting(True, "progress bars (--no-progress: none)")

    def __post_init__(self) -> None:
        check_seed(self)
        check_range(self, ("n_train", "n_test", "llm_layers", "encoder_layers", "haystack_samples"), low=1)
        check_range(self, ("n_needles", "cross"), low=0)
        check_range(self, ("silent",), 0, 1)
        check_range(self, ("encoder_dim",), low=4)
        if WINDOW_POSITIONS % self.frames_per_token or self.frames_per_token < 1:
            raise OmniInputError(f"--frames-per-token {self.frames_per_token}: give a divisor of the window's "
                                 f"{WINDOW_POSITIONS} encoder frames (1, 2, 4, 5, ...)")
        if self.encoder_dim % 4:
            raise OmniInputError(f"--encoder-dim {self.encoder_dim}: give a multiple of 4 (its 4 heads)")
        for name in ("needle_windows", "haystack_windows"):
            windows = tuple(int(n) for n in getattr(self, name))
            if not windows or not all(1 <= n <= MAX_NEEDLE_WINDOWS for n in windows):
                raise OmniInputError(f"--{name.replace('_', '-')} {','.join(map(str, windows))}: give clip lengths of "
                                     f"1 to {MAX_NEEDLE_WINDOWS} windows, comma-separated")
            setattr(self, name, windows)
        check_range(self, ("haystack_depths",), 2, 101)

    def architecture(self, audio_token_id: int) -> dict[str, Any]:
        """What the recipe changes of the tiny preset: an audio encoder, and no vision tower without --cross."""
        d = self.encoder_dim
        k = self.frames_per_token
        audio = {"n_mels": 80, "dim": d, "n_layers": self.encoder_layers, "n_heads": 4, "mlp_dim": k * d,
                 "max_source_positions": WINDOW_POSITIONS, "frames_per_token": k}
        return {"text": {"n_layers": self.llm_layers}, "audio": audio, "audio_token_id": audio_token_id,
                **({} if self.cross else {"vision": None})}


# The command line's view of the recipe (omnilm.settings): what the recipe decides itself gets no
# flag. The instruct stage always trains the encoder and whitens a projector only with --cross; the
# calibrate stage starts from a model, whose projector it cannot whiten afresh.
AUDIO_FLAGS = dict(skip=("instruct.train_audio", "instruct.whiten_projector", "calibrate.whiten_projector"))


def write_data(out: Path, recipe: AudioRecipe) -> tuple[Path, Path, Path | None]:
    """ShapeWorld audio under `out`: training conversations, haystack clips and cross-modal pairs in
    train.json, the same and --silent's silent copies in calibrate.json (None without), a record a
    question (and the test pairs) in test.json; and the tokenizer in `out/tokenizer`."""
    shared = dict(seed=recipe.seed, progress=recipe.progress)
    conversations = write_audio_clips(out, recipe.n_train, split="train", questions="all", **shared)
    records = list(conversations)
    lengths = recipe.needle_windows
    for k, n_windows in enumerate(lengths):  # an even share of the haystack clips at each length
        share = recipe.n_needles // len(lengths) + (k < recipe.n_needles % len(lengths))
        records += write_audio_clips(out, share, split=f"needle_{n_windows}", needles=True, n_windows=n_windows,
                                     **shared)
    records += write_cross_modal(out, recipe.cross, split="train", **shared)
    train_json = out / "train.json"
    write_records(train_json, records)
    calibrate_json = None
    if n_silent := round(recipe.silent * len(conversations)):
        write_audio(out / SILENCE, np.zeros(WINDOW_SAMPLES, dtype=np.float32))
        chosen = random.Random(f"silent:{recipe.seed}").sample(conversations, n_silent)
        calibrate_json = out / "calibrate.json"
        write_records(calibrate_json, records + [{**record, "id": f"{record['id']}-silent", "audio": SILENCE}
                                                 for record in chosen])
    test = write_audio_clips(out, recipe.n_test, split="test", **shared)
    test += write_cross_modal(out, recipe.n_test if recipe.cross else 0, split="test", **shared)
    test_json = out / "test.json"
    write_records(test_json, test)
    chat_tokenizer(train_json, recipe.system_prompt).save(out / "tokenizer")
    return train_json, test_json, calibrate_json


def run_audio_recipe(out: str | Path, recipe: AudioRecipe | None = None) -> dict[str, Any]:
    """Run the recipe; returns timings, the evaluations (heard and silent, the haystack) and the final model."""
    recipe = recipe or AudioRecipe()
    out = Path(out)
    check_output_folder(out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    data = out / "data"
    train_json, test_json, calibrate_json = write_data(data, recipe)
    timings["data"] = time.perf_counter() - t0

    audio_token_id = Tokenizer.from_file(data / "tokenizer").audio_token_id
    settings = {**vars(recipe.instruct), "preset": PRESET, "seed": recipe.seed,
                "config": recipe.architecture(audio_token_id), "train_audio": True,
                "whiten_projector": bool(recipe.cross)}
    haystack = dict(needle="audio", lengths=tuple(map(str, recipe.haystack_windows)), depths=recipe.haystack_depths,
                    samples=recipe.haystack_samples, seed=recipe.seed)
    stages = [("instruct", train_json, settings)]
    if calibrate_json is not None:
        stages.append(("calibrate", calibrate_json, {**vars(recipe.calibrate), "seed": recipe.seed}))
    measured = train_and_measure(out, data, stages, test_json, AUDIO_CONTROLS, "audio", haystack, recipe.progress)
    timings.update(measured.pop("timings"))
    result = {"recipe": to_dict(recipe), "chance": CHANCE, **measured, "timings": timings,
              "report": format_audio_results(measured["eval"])}
    write_json(out / "results.json", {k: v for k, v in result.items() if k != "model"})
    return result


def format_audio_results(evaluations: dict[str, dict]) -> str:
    """Accuracy per family with the audio heard and with silence, beside chance."""
    families = [f for f in (*AUDIO_FAMILIES, *CROSS_FAMILIES) if f in evaluations["heard"]["tasks"]]
    lines = ["| family | questions | heard | silence | chance |", "|---|---:|---:|---:|---:|"]
    for family in families:
        cells = [f"{100 * evaluations[c]['tasks'][family]['accuracy']:.1f}%" for c in AUDIO_CONTROLS]
        lines.append(f"| {family} | {evaluations['heard']['tasks'][family]['n']} | " + " | ".join(cells)
                     + f" | {100 * CHANCE[family]:.1f}% |")
    overall = [f"{100 * evaluations[c]['accuracy']:.1f}%" for c in AUDIO_CONTROLS]
    lines.append(f"| **overall** | {evaluations['heard']['n']} | " + " | ".join(f"**{o}**" for o in overall) + " | |")
    return "\n".join(lines)
