"""A learning-rate schedule laid over whichever ends first: the planned steps or ``--max-time``.

A step-based schedule (transformers' cosine over ``max_steps``) assumes every planned step runs. A
time budget breaks that: on a slow CPU ``--max-time 330`` may stop a 200-step cosine at step 83 with
the learning rate still at two thirds of its peak, so the run never gets the low-LR end of the
schedule that consolidates what it learned. Here the schedule runs on *progress*:

    progress = max(steps done / planned steps,  predicted end of the next step / max_time)

so it is the usual step-based schedule when the budget is ample, and is squeezed onto the budget
when it is not: warmup over the first ``warmup_ratio`` of progress, then cosine (or linear) decay
to 0 at progress 1. Training stops at the step boundary where the next step would end past the
budget, so the last step runs at (nearly) the floor learning rate.

Time only enters through ``step_ended(step, elapsed)``, called once per optimizer step with the
seconds trained so far (rank 0's clock in a multi-process run, so every rank computes the same
learning rate and stops after the same step). The per-step time is the mean over the steps after
the first (the first pays one-off kernel selection and warm-up), so the prediction is steady.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Names --lr-scheduler may take together with --max-time (their shape is a function of progress).
BUDGET_SCHEDULES = ("cosine", "linear", "constant", "constant_with_warmup")


def schedule_multiplier(name: str, progress: float, warmup_ratio: float) -> float:
    """Learning-rate multiplier of schedule ``name`` at ``progress`` in [0, 1]."""
    progress = min(max(progress, 0.0), 1.0)
    if name == "constant":
        return 1.0
    if warmup_ratio > 0 and progress < warmup_ratio:
        return progress / warmup_ratio
    if name == "constant_with_warmup":
        return 1.0
    decay = (progress - warmup_ratio) / (1.0 - warmup_ratio)
    if name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * decay))
    if name == "linear":
        return 1.0 - decay
    raise ValueError(f"schedule {name!r} cannot follow a time budget; use one of {', '.join(BUDGET_SCHEDULES)}")


@dataclass
class TimeBudget:
    planned_steps: int  # what the data and --num-epochs/--max-steps plan
    max_time: float  # seconds of training (a resumed run counts the seconds before it)
    steps_per_epoch: float = 1.0  # optimizer steps in one pass over the rows (for summaries)
    schedule: str = "cosine"
    warmup_ratio: float = 0.0
    steps_done: int = 0
    elapsed: float = 0.0  # seconds trained when the last step ended
    _first_step_seconds: float | None = None
    _later_steps_seconds: float = 0.0
    _later_steps: int = 0

    def step_ended(self, step: int, elapsed: float) -> None:
        """Record that optimizer step ``step`` ended after ``elapsed`` seconds of training."""
        took = max(elapsed - self.elapsed, 0.0)  # since the previous step ended (or training started)
        if self._first_step_seconds is None:
            self._first_step_seconds = took
        else:
            self._later_steps_seconds += took
            self._later_steps += 1
        self.steps_done, self.elapsed = step, elapsed

    def start(self, step: int, elapsed: float) -> None:
        """Training (re)starts at ``step`` with ``elapsed`` seconds already trained."""
        self.steps_done, self.elapsed = step, elapsed

    @property
    def seconds_per_step(self) -> float | None:
        if self._later_steps:
            return self._later_steps_seconds / self._later_steps
        return self._first_step_seconds

    def progress(self, step: int) -> float:
        """Progress of the schedule for the update that follows ``step`` completed steps."""
        by_steps = step / max(self.planned_steps, 1)
        per_step = self.seconds_per_step
        if per_step is None:
            return min(by_steps, 1.0)
        # the update being scheduled is step+1; the last recorded end is of step `steps_done`
        # (step or step-1, depending on whether the step-end callback has already run)
        steps_ahead = step + 1 - self.steps_done
        by_time = (self.elapsed + steps_ahead * per_step) / self.max_time
        return min(max(by_steps, by_time), 1.0)

    def multiplier(self, step: int) -> float:
        return schedule_multiplier(self.schedule, self.progress(step), self.warmup_ratio)

    def should_stop(self) -> bool:
        """True when the next step would end past the budget (or the budget is already spent)."""
        # the first step alone (kernel selection, warm-up, a launcher's first all-reduce) is no
        # forecast of the next: until a second step is timed, stop only once the budget is spent
        per_step = self._later_steps_seconds / self._later_steps if self._later_steps else 0.0
        return self.elapsed + per_step > self.max_time

    def expected_steps(self) -> int | None:
        """Steps the budget is expected to buy in all (capped at the planned steps)."""
        per_step = self.seconds_per_step
        if per_step is None or per_step <= 0:
            return None
        more = max(math.floor((self.max_time - self.elapsed) / per_step), 0)
        return min(self.steps_done + more, self.planned_steps)
