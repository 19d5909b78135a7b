"""mathtune's own ``TrainerCallback``s and the one order they run in (``TrainingCallbacks.in_order``).

Trainer calls callbacks in list order, and ours read what an earlier one decided in the same event,
so the order is part of their contract; ``in_order`` states it in code.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from transformers import TrainerCallback

from mathtune import distributed
from mathtune.atomic import (append_whole, build_write_error, finish_tree, free_space, remove_path, tree_size,
                             write_failure_kind, write_text_atomically)
from mathtune.budget import TimeBudget
from mathtune.errors import DiskFull, MathtuneError, WriteFailed, first_line
from mathtune.integrity import record_files
from mathtune.interrupt import InterruptCallback
from mathtune.run_dir import RunDir
from mathtune.step_stats import StepStats

ESTIMATE_AFTER_STEPS = 3  # steps timed before the time budget's step estimate is printed


class StepCallback(TrainerCallback):
    """Closes each step in StepStats, enforces --max-time, writes metrics.jsonl.

    Must be the first of our callbacks: the guards' on_step_end reads StepStats.last_* after end_step().
    """

    def __init__(self, stats: StepStats, metrics_path: Path, budget: TimeBudget | None, seconds_offset: float = 0.0,
                 clock=time.perf_counter, extra_fields=None):
        self.stats = stats
        # (logs, line) -> more fields for the line: a command's own figures (mathtune grpo: reward, pass rate)
        self.extra_fields = extra_fields
        self.metrics_path = Path(metrics_path)
        self.budget = budget
        self.seconds_offset = seconds_offset  # training seconds of the run this one resumes
        self.clock = clock  # injectable: the time-budget tests drive a fake clock
        self.train_started: float | None = None
        self.stopped_on_time = False
        self.window = self._empty_window()
        self.total_input_tokens = 0
        self.total_supervised_tokens = 0
        self.first_loss: float | None = None
        self.last_loss: float | None = None

    @staticmethod
    def _empty_window() -> dict:
        return {"steps": 0, "supervised": 0, "input": 0, "seconds": 0.0}

    def elapsed(self) -> float:
        """Seconds since this process started training (what --max-time budgets)."""
        return self.clock() - self.train_started if self.train_started is not None else 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.train_started = self.clock()
        self._first_step = state.global_step
        if self.budget is not None:
            self.budget.start(state.global_step, self.seconds_offset)

    def on_step_end(self, args, state, control, **kwargs):
        stats = self.stats
        stats.end_step()
        self.window["steps"] += 1
        self.window["supervised"] += stats.last_supervised_tokens
        self.window["input"] += stats.last_input_tokens
        self.window["seconds"] += stats.last_step_seconds
        self.total_input_tokens += stats.last_input_tokens
        self.total_supervised_tokens += stats.last_supervised_tokens
        budget = self.budget
        if budget is not None:
            # rank 0's clock on every rank (one broadcast per step under a launcher): the stop decision
            # and the learning rate follow it, so all ranks stop after the same step with the same LR
            budget.step_ended(state.global_step, distributed.main_clock(self.seconds_offset + self.elapsed()))
            if budget.steps_done - self._first_step == ESTIMATE_AFTER_STEPS and distributed.is_main_process():
                tqdm.write(budget_estimate_line(budget), file=sys.stderr)
            if not control.should_training_stop and budget.should_stop():
                # a step boundary: the update is complete, so the model saved next is a consistent one
                self.stopped_on_time = True
                control.should_training_stop = True
        if control.should_training_stop:
            control.should_log = True  # the last step always reaches metrics.jsonl

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return  # the end-of-training summary (train_runtime, train_loss, ...) is not a step
        window, seconds = self.window, self.window["seconds"]
        line = {
            "step": state.global_step,
            "loss": logs["loss"],
            "grad_norm": logs.get("grad_norm"),
            "learning_rate": logs.get("learning_rate"),
            "epoch": logs.get("epoch", state.epoch),
            # tokens of the steps since the previous line (logging_steps of them)
            "supervised_tokens": window["supervised"],
            "input_tokens": window["input"],
            "supervised_tokens_per_second": window["supervised"] / seconds if seconds > 0 else None,
            "tokens_per_second": window["input"] / seconds if seconds > 0 else None,
            "step_seconds": seconds / max(window["steps"], 1),
            # wall seconds since training started; a resumed run continues the count
            "seconds": self.seconds_offset + self.elapsed(),
        }
        if self.extra_fields is not None:
            line.update(self.extra_fields(logs, line))
        if distributed.is_main_process():  # logs are the same on every rank (losses gathered by Trainer)
            with self.metrics_path.open("a") as handle:
                # whole or not at all: a full disk cuts a partial line back and is one DiskFull line
                append_whole(handle, json.dumps(line) + "\n", hint=CONTINUE_HINT)
        if self.first_loss is None:
            self.first_loss = logs["loss"]
        self.last_loss = logs["loss"]
        self.window = self._empty_window()


CONTINUE_HINT = ("free space (keep fewer checkpoints: --save-total-limit N) or use another --output-dir, then "
                 "--resume auto continues from the newest complete checkpoint")


class CheckpointMarker(TrainerCallback):
    """Marks checkpoint-N complete once Trainer has fully written it.

    on_save runs after the model, optimizer, scheduler, RNG state and trainer_state.json are on disk.
    Listed after the guards' callbacks, so a checkpoint a guard rejects is never marked. --resume auto
    trusts only marked checkpoints: a crash mid-write leaves an unmarked, ignored directory. The marker
    records each file's size and SHA-256 (mathtune.integrity), taken after the files are fsynced, so a
    file damaged later (a copy cut short, a disk error) is found before it is loaded
    (``RunDir.checkpoint_problem``). A save that fails writing is ``checkpoint_write_failure``'s.
    """

    def __init__(self):
        self.last_complete: Path | None = None

    def on_save(self, args, state, control, **kwargs):
        checkpoint = RunDir(args.output_dir).checkpoint(state.global_step)

        def mark():
            if not (checkpoint / RunDir.TRAINER_STATE).is_file():
                raise MathtuneError(f"{checkpoint}: Trainer reported a save but wrote no {RunDir.TRAINER_STATE}")
            finish_tree(checkpoint)  # umask modes, every file on disk before the marker says "complete"
            # what --resume checks before loading: each file's size and hash, as they reached the disk
            files = record_files(checkpoint, exclude=(RunDir.CHECKPOINT_MARKER,))
            # atomic and durable: the marker is whole or absent
            write_text_atomically(RunDir.marker(checkpoint),
                                  json.dumps({"step": state.global_step, "complete": True, "time": time.time(),
                                              "files": files}) + "\n")

        # every rank writes its own shard/RNG state; on_main waits for all of them before rank 0 marks
        distributed.barrier()
        distributed.on_main(mark)
        self.last_complete = checkpoint


def _resume_hint(run: RunDir, what: str, exclude: Path | None = None) -> str:
    """What to do after a failed checkpoint or final-model save: make room, then continue from the newest
    complete checkpoint (or, with none, train again)."""
    earlier = [p for p in run.complete_checkpoints() if p != exclude]
    if what == "checkpoint":
        then = (f"then --resume auto continues from {earlier[-1].name}" if earlier else
                "then train again (no checkpoint was complete yet)")
        return f"free space (keep fewer checkpoints: --save-total-limit N) or use another --output-dir; {then}"
    if earlier:
        return f"free space, then --resume auto continues from {earlier[-1].name} and saves the final model"
    return "free space (or use another --output-dir), then train again (no checkpoint was written to resume from)"


def checkpoint_write_failure(exc: BaseException, run: RunDir, step: int, *,
                             estimate: int | None = None) -> WriteFailed | None:
    """The one line for a checkpoint save that failed writing (a full disk: torch.save's "iostream error",
    safetensors' IoError, ENOSPC): the partial ``checkpoint-<step>`` is removed, earlier complete ones are
    left as they are. None when ``exc`` is not a failed write, or no save of ``step`` was under way.

    Found from the outside (``training.run`` calls it when ``trainer.train`` raises), so Trainer's own
    checkpoint code stays untouched: a save in progress is a ``checkpoint-<step>`` dir without a marker.
    ``estimate``: the bytes a checkpoint takes, for a run with no complete checkpoint to measure."""
    partial = run.checkpoint(step)
    if not partial.is_dir() or run.marker(partial).is_file():
        return None
    if isinstance(exc, WriteFailed):  # the marker's own write: the checkpoint is still partial
        kind = "full" if isinstance(exc, DiskFull) else "failed"
    else:
        kind = write_failure_kind(exc, free_space(partial))
        if kind is None:
            return None
    earlier = [p for p in run.complete_checkpoints() if p != partial]
    needed = tree_size(earlier[-1]) if earlier else estimate
    written = tree_size(partial)
    remove_path(partial)  # never marked; --resume auto would skip it, but it holds the disk's last bytes
    return build_write_error(kind, partial, what="a checkpoint", hint=_resume_hint(run, "checkpoint", partial),
                             needed=needed, written=written, free=free_space(run.root), reason=first_line(exc))


def snapshot_files(root: Path) -> dict[str, tuple]:
    """Top-level files of ``root``: name -> (size, mtime_ns), to tell what a save wrote afterwards."""
    found = {}
    for path in Path(root).iterdir() if Path(root).is_dir() else ():
        try:
            if path.is_file():
                st = path.stat()
                found[path.name] = (st.st_size, st.st_mtime_ns)
        except OSError:
            continue
    return found


def final_save_failure(exc: BaseException, run: RunDir, before: dict[str, tuple], *,
                       estimate: int | None = None) -> WriteFailed | None:
    """The one line for a final-model save that failed writing: the files the save created or changed
    (``before``: ``snapshot_files`` taken before it) are removed, the run's logs and checkpoints are kept.
    None when ``exc`` is not a failed write."""
    if isinstance(exc, WriteFailed):
        kind = "full" if isinstance(exc, DiskFull) else "failed"
    else:
        kind = write_failure_kind(exc, free_space(run.root))
        if kind is None:
            return None
    keep = {RunDir.CONFIG, RunDir.METRICS, RunDir.SAMPLES, RunDir.LOCK}
    after = snapshot_files(run.root)
    partial = [run.root / name for name, stat in after.items() if name not in keep and before.get(name) != stat]
    written = sum(tree_size(p) for p in partial)
    for path in partial:
        remove_path(path)  # a cut adapter_model.safetensors would load as "the trained model"
    return build_write_error(kind, run.root, what="the final model", hint=_resume_hint(run, "final"),
                             needed=estimate, written=written, free=free_space(run.root), reason=first_line(exc))


class ConsoleProgress(TrainerCallback):
    """One compact tqdm line (steps, loss, learning rate) instead of Trainer's printed dict per log."""

    def __init__(self):
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not distributed.is_main_process():
            return  # one bar per run, not one per rank
        self.bar = tqdm(total=state.max_steps, initial=state.global_step, unit="step", desc="train",
                        dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs.get('learning_rate', 0):.2e}")

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_train_end(self, args, state, control, **kwargs):
        self.close()


def budget_estimate_line(budget: TimeBudget) -> str:
    expected = budget.expected_steps()
    per_step = budget.seconds_per_step or 0.0
    if expected is None:
        return "time budget: no step timing yet"
    fits = "all" if expected >= budget.planned_steps else f"~{expected}"
    return (f"time budget: {per_step:.2f} s/step -> {fits} of {budget.planned_steps} planned steps "
            f"({expected / budget.steps_per_epoch:.2f} epochs) fit in --max-time {budget.max_time:g} s; "
            f"the learning-rate schedule is laid over them")


@dataclass
class TrainingCallbacks:
    """Our callbacks by role, and the guards' (unwrapped, so their state can be read after a run)."""

    interrupt: InterruptCallback
    step: StepCallback
    checkpoint: CheckpointMarker
    progress: ConsoleProgress
    guards: list[Any] = field(default_factory=list)
    # the guards as Trainer holds them: under a launcher each wrapped in a CollectiveCallback, so a
    # halt on any rank halts every rank at the same event (the guard itself otherwise)
    collective_guards: list[Any] = field(default_factory=list)

    def __post_init__(self):
        if not self.collective_guards:
            self.collective_guards = [distributed.CollectiveCallback(cb) for cb in self.guards]

    def in_order(self) -> list[TrainerCallback]:
        """The list for ``Trainer(callbacks=...)``. Each one reads what the ones before it decided:

        1. interrupt: its should_save/should_training_stop must reach the step callback (which then
           logs the last step) and the guards (which check the weights before a save);
        2. step: closes the step in StepStats; the guards read StepStats.last_* after it;
        3. guards: may reject a checkpoint (raise before on_save completes);
        4. checkpoint marker: marks only a checkpoint no guard rejected;
        5. progress bar: shows the state the others settled.
        """
        return [self.interrupt, self.step, *self.collective_guards, self.checkpoint, self.progress]

    def guard(self, kind: type) -> Any | None:
        """The guard callback of class ``kind`` (e.g. guards.CollapseDetector), if guards are on."""
        return next((cb for cb in self.guards if isinstance(cb, kind)), None)
