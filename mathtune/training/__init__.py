"""Fine-tuning on transformers' Trainer: ``recipe`` (setup -> run -> train), ``trainer``
(MathtuneTrainer), ``callbacks`` (our TrainerCallbacks and their order).

The names below are the package's public face (``from mathtune.training import train``).
"""

from mathtune.training.callbacks import (CheckpointMarker, ConsoleProgress, StepCallback, TrainingCallbacks,
                                         budget_estimate_line)
from mathtune.training.recipe import (Placement, TrainingData, TrainingSession, TrainResult, compare_after_training,
                                      end_summary, run, setup, start_summary, train)
from mathtune.training.trainer import MathtuneTrainer

__all__ = [
    "CheckpointMarker", "ConsoleProgress", "MathtuneTrainer", "Placement", "StepCallback", "TrainResult",
    "TrainingCallbacks", "TrainingData", "TrainingSession", "budget_estimate_line", "compare_after_training",
    "end_summary", "run", "setup", "start_summary", "train",
]
