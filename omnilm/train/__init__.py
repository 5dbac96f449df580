"""Training: the settings (`args`), the loop, what each stage builds, optimizers, checkpoints."""

from omnilm.train.args import STAGES, Hyperparams, TrainArgs
from omnilm.train.loop import train

__all__ = ["STAGES", "Hyperparams", "TrainArgs", "train"]
