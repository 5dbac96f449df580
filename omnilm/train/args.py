"""What a training run is told: `Hyperparams` (how a stage trains: steps, batch, learning rates,
optimizer; a recipe holds one per stage) and `TrainArgs` (those, plus the stage, its data, where
it starts and where it writes). `omnilm train`'s flags are generated from these fields
(`omnilm.settings`), and each setting is checked once, here.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omnilm.config import FUSIONS, PRESETS
from omnilm.errors import OmniInputError
from omnilm.model.layers import resolve_device
from omnilm.settings import SUPPRESS, check_output_folder, check_range, check_seed, flag_name, setting
from omnilm.train.distributed import PARALLEL
from omnilm.train.lora import LoraSettings
from omnilm.train.optim import OPTIMIZERS

STAGES = ("clip", "align", "instruct")


@dataclass(kw_only=True)
class Hyperparams:
    """How one stage trains."""

    steps: int = setting(500, "optimizer steps")
    batch_size: int = setting(32, "records per micro-batch")
    grad_accum: int = setting(1, "micro-batches per optimizer step")
    lr: float = setting(1e-3, "peak learning rate")
    projector_lr: float | None = setting(
        None, "peak learning rate of the projector, or of another fusion mode's connector (late fusion's pooling "
              "and gate, cross-attention's resampler and gated blocks); default --lr")
    vision_lr: float | None = setting(None, "peak learning rate of the vision encoder, with --train-vision (default --lr)")
    patch_lr: float | None = setting(
        None, "peak learning rate of the ViT's patch embedding where the tower trains (clip; instruct with "
              "--train-vision); default: the tower's. A tenth of --lr keeps the learned positions visible beside "
              "the patches (the recipe's stage clip uses it)")
    gate_lr: float | None = setting(
        None, "peak learning rate of cross-attention's tanh gates (default: the connector's). Adam moves a scalar "
              "about its LR a step, so a gate starting at 0 needs some 0.5/LR steps to open")
    warmup: int = setting(20, "linear warm-up steps before the cosine decay (capped at --steps)")
    min_lr_ratio: float = setting(0.1, "final learning rate as a fraction of the peak")
    weight_decay: float = setting(0.0, "weight decay on matrices")
    optimizer: str = setting(
        "adamw", "adamw, or muon: Muon for the transformer blocks' weight matrices (each MoE expert's one by one) "
                 "and AdamW for the rest, at the same --lr (on ShapeWorld it learns the question-to-object look-up "
                 "far sooner: docs/shapeworld-recipe.md)", choices=OPTIMIZERS)
    clip_grad: float = setting(1.0, "gradient-norm clipping")
    tasks: tuple[str, ...] | None = setting(
        None, "comma-separated record `task`s to train on (default: caption for clip and align, all but caption "
              "for instruct)")
    train_vision: bool = setting(False, "instruct: also train the vision encoder (frozen by default, as in LLaVA)")
    train_audio: bool = setting(False, "instruct: also train the audio encoder (frozen by default; a model without "
                                       "a pretrained one, --audio, needs it)")
    whiten_projector: bool = setting(
        False, "start a fresh projector by whitening the vision features, so that every feature direction learns "
               "at the same speed (omnilm.model.connector.whiten_)")
    group_by_length: bool = setting(
        False, "align/instruct: batch records of similar length together, so less of each batch is padding (as "
               "LLaVA's group_by_modality_length); batches stay a pure function of --seed")
    random_positions: int = setting(
        0, "align/instruct: randomized positional encodings (Ruoss et al. 2023): each record's position ids are a "
           "sorted random draw from 0 .. N x its length, so the model meets the positions of prompts N times "
           "longer than it trains on; 0: positions 0, 1, 2, ...", metavar="N")
    position_chunks: int = setting(
        0, "with --random-positions: cut each record into this many pieces of consecutive positions, with random "
           "skips between them (PoSE, Zhu et al. 2023), instead of drawing every position apart; 0: apart",
        metavar="C")

    def __post_init__(self) -> None:
        if self.tasks is not None:
            self.tasks = tuple(self.tasks)
            if not self.tasks or not all(isinstance(t, str) and t for t in self.tasks):
                raise OmniInputError(f"--tasks {self.tasks!r}: give one or more task names, comma-separated")
        check_range(self, ("steps", "batch_size", "grad_accum"), low=1)
        check_range(self, ("lr", "clip_grad", "projector_lr", "vision_lr", "patch_lr", "gate_lr"), above=0)
        check_range(self, ("warmup", "random_positions", "position_chunks"), low=0)
        if self.position_chunks and not self.random_positions:
            raise OmniInputError(f"--position-chunks {self.position_chunks} cuts the range --random-positions "
                                 "spreads records over: add --random-positions N")
        check_range(self, ("weight_decay",), low=0)
        check_range(self, ("min_lr_ratio",), 0, 1)
        if self.optimizer not in OPTIMIZERS:
            raise OmniInputError(f"unknown --optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")

    def scaled(self, factor: float) -> Hyperparams:
        """These settings with `factor` times the steps, and the warm-up the same share of them."""
        steps = max(1, round(self.steps * factor))
        return type(self)(**{**vars(self), "steps": steps, "warmup": steps * self.warmup // self.steps})


@dataclass(kw_only=True)
class TrainArgs(LoraSettings, Hyperparams):
    """One stage of the recipe, on one dataset: `omnilm train`. With --lora-r, stage instruct trains
    LoRA updates of the language model and the projector in full (omnilm.train.lora)."""

    stage: str = setting(help="clip: contrastive CLIP pretraining; align: stage 1, the projector only, on captions; "
                              "instruct: stage 2, projector + LLM on questions", choices=STAGES)
    data: Path = setting(help="LLaVA-format JSON (e.g. from `omnilm data shapeworld`)")
    image_folder: Path = setting(help="folder the records' image paths are relative to")
    out: Path = setting(help="run folder: metrics.jsonl, loss.png, checkpoints/, model/")
    preset: str | None = setting("tiny", "architecture of a fresh model (omnilm.config.PRESETS)")
    init: Path | None = setting(None, "start from this checkpoint folder (omnilm or Hugging Face LLaVA; a CLIP "
                                      "folder for stage clip) instead of a fresh model")
    vision: Path | None = setting(None, "a CLIP folder (stage clip's model/) to take the vision encoder from")
    audio: Path | None = setting(None, "a Whisper or Voxtral folder to take the audio encoder from (a model whose "
                                       "--config has an audio encoder of that shape)")
    tokenizer: Path | None = setting(None, "tokenizer folder (default: from --init or --vision, else a BPE trained "
                                           "on the data)")
    fusion: str | None = setting(None, "how a fresh model fuses images and text (default joint, LLaVA): early (raw "
                                       "patches in the sequence), late (pooled images before the output head), "
                                       "cross_attention (Flamingo)", choices=FUSIONS)
    attend: str | None = setting(None, "cross_attention: a token reads the latest image (previous, default) or "
                                       "every image so far (all)", choices=("previous", "all"))
    config: dict[str, Any] = setting(
        help="JSON overrides of the fresh model's config, as OmniConfig.from_preset takes them, e.g. "
             "'{\"text\": {\"n_layers\": 2}}'", factory=dict, metavar="JSON")
    seed: int = setting(0, "seed of the weights and of the batch order")
    save_every: int = setting(0, "checkpoint every N steps (0: only at the end)")
    log_every: int = setting(10, "write metrics.jsonl out every N steps")
    device: str = setting("auto", "auto (CUDA when there is one), cpu, cuda, cuda:1, ...")
    bf16: bool | None = setting(None, "bf16 autocast (default: on where it is faster: CUDA, or CPUs with "
                                      "AVX512-BF16/AMX)")
    skip_bad: bool = setting(False, "skip (and count) malformed records instead of stopping")
    cache_images: bool = setting(True, "keep decoded images in memory (--no-cache-images decodes them every time, "
                                       "for datasets larger than RAM)")
    cache_features: float = setting(
        0.0, "keep up to GIB gibibytes of the frozen vision tower's features, one entry per distinct image or video "
             "frame, so the tower runs on each once rather than once an epoch (0: none). Worth it where the tower is "
             "much of a step, as in `omnilm demo-video`", metavar="GIB")
    video_frames: int = setting(8, "frames read from each video: up to N spread evenly over it, as transformers "
                                   "samples them (0: every frame)")
    video_timestamps: bool = setting(False, "each video frame's time as text before its tokens ('3s'); saved with "
                                            "the model, so chat and eval read videos the same way")
    compile: bool = setting(False, "compile the model's forward and backward with torch.compile (inductor): the "
                                   "same losses to float rounding; the first steps of each new batch shape compile "
                                   "(seconds to minutes), the rest may run faster (docs/training.md)")
    resume: bool = setting(False, "continue exactly from OUT/checkpoints/latest")
    stop_after: int | None = setting(None, SUPPRESS)  # stop (and checkpoint) early, as if interrupted: for tests
    progress: bool = setting(True, "progress bar (--no-progress: none)")
    parallel: str = setting("none", "over the processes torchrun starts (torchrun --nproc-per-node N -m omnilm "
                                    "train ...): ddp (each holds the model, gradients averaged) or fsdp (parameters, "
                                    "gradients and optimizer state sharded per layer); --batch-size is then the "
                                    "global batch", choices=PARALLEL)
    expert_parallel: int = setting(1, "with --parallel ddp or fsdp on N processes, --expert-parallel N splits each "
                                      "MoE layer's experts over them (tokens reach their experts by all-to-all); "
                                      "N must divide the number of experts")

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise OmniInputError(f"unknown stage {self.stage!r}; choose one of {', '.join(STAGES)}")
        Hyperparams.__post_init__(self)
        LoraSettings.__post_init__(self)
        for name in ("data", "image_folder", "out", "init", "vision", "audio", "tokenizer"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, Path(value))
        check_range(self, ("log_every",), low=1)
        check_range(self, ("video_frames", "cache_features"), low=0)
        check_range(self, ("save_every",), low=0)
        check_range(self, ("stop_after",), low=1)
        check_seed(self)
        if self.parallel not in PARALLEL:
            raise OmniInputError(f"unknown --parallel {self.parallel!r}; choose one of {', '.join(PARALLEL)}")
        if self.preset is not None and self.preset not in PRESETS:
            raise OmniInputError(f"unknown --preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if not isinstance(self.config, dict):
            raise OmniInputError(f"--config {json.dumps(self.config)} is not a JSON object; give e.g. "
                                 "'{\"text\": {\"n_layers\": 2}}'")
        resolve_device(self.device)
        check_output_folder(self.out, "--out")
        # Flags that would silently do nothing (or break the stage's definition) are refused.
        ignored = {"clip": ("vision", "audio", "train_vision", "train_audio", "cache_features", "projector_lr",
                            "vision_lr", "whiten_projector", "gate_lr", "group_by_length", "fusion", "attend",
                            "lora_r", "random_positions", "position_chunks"),
                   "align": ("train_vision", "train_audio", "vision_lr", "patch_lr", "lora_r"),
                   "instruct": ()}[self.stage]
        given = [name for name in ignored if getattr(self, name) not in (None, False)]
        if given:
            flags = ", ".join(flag_name(name) for name in given)
            raise OmniInputError(f"stage {self.stage} does not use {flags}; drop it (see omnilm train --help)")
        if self.init is not None and self.whiten_projector:
            raise OmniInputError("--whiten-projector initialises a fresh projector: drop it, or start without --init")
        shaping = [flag_name(name) for name in ("fusion", "attend", "config") if getattr(self, name)]
        if self.init is not None and shaping:
            raise OmniInputError(f"{'/'.join(shaping)} shape a fresh model; a model from --init keeps its own: "
                                 "drop it")
        lora_only = [flag_name(f.name) for f in dataclasses.fields(LoraSettings)
                     if f.name != "lora_r" and getattr(self, f.name) != f.default]
        if not self.lora_r and lora_only:
            raise OmniInputError(f"{', '.join(lora_only)} shape LoRA updates: add --lora-r R, or drop them")
        if self.cache_features and self.train_vision:
            raise OmniInputError("--cache-features keeps a frozen vision tower's features, and --train-vision trains "
                                 "the tower: drop one")
        if self.lora_r and (self.train_vision or self.train_audio):
            flag = "--train-vision" if self.train_vision else "--train-audio"
            raise OmniInputError(f"--lora-r trains LoRA updates of the language model with the encoders frozen: "
                                 f"drop {flag}")
        check_range(self, ("expert_parallel",), low=1)
        if self.expert_parallel > 1 and self.parallel == "none":
            raise OmniInputError(f"--expert-parallel {self.expert_parallel} splits the experts over the processes "
                                 "torchrun starts: add --parallel ddp or fsdp")
        if self.parallel == "fsdp" and self.optimizer == "muon":
            raise OmniInputError("--optimizer muon orthogonalises whole weight matrices, and --parallel fsdp leaves each "
                                 "rank a slice of them: use --optimizer adamw with fsdp, or --parallel ddp")
        for name in ("vision_lr", "patch_lr"):
            if self.stage == "instruct" and getattr(self, name) is not None and not self.train_vision:
                raise OmniInputError(f"{flag_name(name)} needs --train-vision (the vision encoder is frozen otherwise)")

    @property
    def model_overrides(self) -> dict[str, Any]:
        """What a fresh model changes of its preset: --config, then --fusion and --attend."""
        return {**self.config, **{name: getattr(self, name) for name in ("fusion", "attend")
                                  if getattr(self, name) is not None}}
