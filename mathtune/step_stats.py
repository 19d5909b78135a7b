"""What happened inside the current optimizer step: written by the Trainer, read by callbacks.

Trainer callbacks never see the batch or the per-micro-batch loss, yet the guards need both (a
step with zero supervised tokens, a NaN loss in one micro-batch) *before* the optimizer applies
the update. ``MathtuneTrainer`` records them here; guards and the metrics logger read them.
Losses stay tensors until a callback asks, so recording never forces a device sync.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


@dataclass
class StepStats:
    supervised_tokens: int = 0          # label tokens != -100 in this optimizer step (all micro-batches)
    input_tokens: int = 0               # tokens fed to the model in this step, padding excluded
    micro_batches: int = 0
    losses: list[torch.Tensor] = field(default_factory=list)  # one per micro-batch, detached
    total_supervised_tokens: int = 0    # since training started (this process)
    total_padded_tokens: int = 0        # positions run through the model, padding included (this process)
    step_started: float = field(default_factory=time.perf_counter)
    last_step_seconds: float = 0.0
    last_supervised_tokens: int = 0     # snapshot of the finished step, for loggers running after it
    last_input_tokens: int = 0

    def record_micro_batch(self, inputs: dict, loss: torch.Tensor) -> None:
        if self.micro_batches == 0:
            self.step_started = time.perf_counter()
        labels = inputs.get("labels")
        mask = inputs.get("attention_mask")
        supervised = int(labels.ne(-100).sum()) if labels is not None else 0
        self.supervised_tokens += supervised
        self.total_supervised_tokens += supervised
        self.input_tokens += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
        shaped = next((t for t in (inputs.get("input_ids"), labels, mask) if t is not None), None)
        self.total_padded_tokens += int(shaped.numel()) if shaped is not None else 0
        self.micro_batches += 1
        self.losses.append(loss.detach())

    def losses_finite(self) -> bool:
        return bool(torch.isfinite(torch.stack([l.float() for l in self.losses])).all()) if self.losses else True

    def end_step(self) -> None:
        """Called once the optimizer step is done; keeps the timing, clears the per-step counts."""
        self.last_step_seconds = time.perf_counter() - self.step_started
        self.last_supervised_tokens = self.supervised_tokens
        self.last_input_tokens = self.input_tokens
        self.supervised_tokens = 0
        self.input_tokens = 0
        self.micro_batches = 0
        self.losses = []
