"""Which GPU ``Trainer`` really trains on, checked before it silently differs from ``--device``.

A single-process ``Trainer`` ignores the device index: its TrainingArguments put the model on
``cuda:0`` (the first *visible* GPU) and, when more GPUs are visible, wrap it in
``nn.DataParallel`` over all of them, which multiplies the rows per step by the GPU count. So
``--device cuda:1`` would train on cuda:0, and ``--device cuda`` on a 4-GPU box on all four with 4x
the batch the start summary printed. CUDA_VISIBLE_DEVICES is the library's way to choose, and it
must be set before CUDA starts, i.e. by the user: name it in the error.
"""

from __future__ import annotations

import os

import torch

from mathtune.errors import MathtuneError

# Set by torchrun / accelerate launch: then each process already owns one GPU (distributed training).
_LAUNCHER_VARS = ("LOCAL_RANK", "WORLD_SIZE")


def check_training_device(device: str) -> None:
    """Raise a one-line error when ``Trainer`` would not train on exactly ``device``."""
    if not device.startswith("cuda") or any(v in os.environ for v in _LAUNCHER_VARS):
        return
    index = int(device.partition(":")[2] or 0)
    visible = torch.cuda.device_count()
    if index != 0:
        raise MathtuneError(
            f"--device {device}: training always runs on the first visible GPU: run "
            f"CUDA_VISIBLE_DEVICES={index} mathtune train --device cuda"
        )
    if visible > 1:
        raise MathtuneError(
            f"--device {device}: {visible} GPUs are visible and one training process would use them all through "
            f"DataParallel ({visible}x the rows per step): pick one with CUDA_VISIBLE_DEVICES=0, or launch one "
            f"process per GPU with torchrun / accelerate launch"
        )
