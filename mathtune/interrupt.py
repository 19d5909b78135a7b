"""SIGTERM / SIGINT during training: finish the step in flight, save a marked checkpoint, exit 143 / 130.

Preemptible machines send SIGTERM (then SIGKILL after a grace period); a user presses Ctrl-C (SIGINT).
Both must cost at most the step in flight. The signal handler only records the request: saving from
inside a handler would run in the middle of a forward or an optimizer step, i.e. write a model that
is half updated. ``InterruptCallback.on_step_end`` (a step boundary: the update is complete) then
asks Trainer for a normal checkpoint and a stop, so the checkpoint goes through Trainer's own save
path, which fires ``on_save`` and so ``CheckpointMarker`` marks it for ``--resume auto``.
(transformers' ``enable_jit_checkpoint`` saves through ``_save_checkpoint`` without ``on_save``:
its checkpoint would stay unmarked and ``--resume auto`` would ignore it.)

A second signal means "now": it exits at once with the same code, leaving the checkpoint dirs as
they are. A save it cuts short stays unmarked, so ``--resume auto`` keeps using the last marked one.
"""

from __future__ import annotations

import os
import shlex
import signal
import threading
from contextlib import contextmanager

from transformers import TrainerCallback

from mathtune import distributed
from mathtune.atomic import STOP_SIGNALS
from mathtune.errors import MathtuneError

# The shell's convention for "terminated by signal N": 128 + N (SIGINT 2 -> 130, SIGTERM 15 -> 143).
EXIT_CODES = {signum: 128 + signum for signum in STOP_SIGNALS}


class TrainingInterrupted(MathtuneError):
    """Training stopped on a signal after saving a checkpoint; ``exit_code`` is 130 or 143."""

    def __init__(self, message: str, exit_code: int, checkpoint=None):
        self.exit_code = exit_code
        self.checkpoint = checkpoint
        super().__init__(message)


class InterruptCallback(TrainerCallback):
    """Turns a recorded stop request into "save a checkpoint and stop" at the next step boundary.

    Must run before mathtune's other callbacks (StepCallback logs the last step of a stopping run,
    the guards refuse to checkpoint non-finite weights): it is the first in training.setup's list,
    and DefaultFlowCallback (Trainer's own, always earlier) cannot undo should_save.
    """

    def __init__(self):
        self.signal: int | None = None  # the first signal received, None while none has arrived
        self.stopped_at: int | None = None  # the global step whose checkpoint the stop asked for

    def request_stop(self, signum: int) -> None:
        """Record a stop request (called by the signal handler, or by anything else that must stop)."""
        if self.signal is None:
            self.signal = signum

    def should_stop(self) -> bool:
        """The one place that decides "stop now" (a distributed run makes this a collective decision)."""
        return self.signal is not None

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signal, 128 + int(self.signal or 0))

    def on_step_end(self, args, state, control, **kwargs):
        # under a launcher a signal can reach one rank only: all of them stop after the same step
        # (one all-reduce of a flag per step; nothing at all on one process)
        if distributed.any_rank(self.should_stop()) and self.stopped_at is None:
            if self.signal is None:
                self.signal = signal.SIGTERM  # another rank was signalled
            self.stopped_at = state.global_step
            control.should_save = True  # Trainer's normal save: model, optimizer, scheduler, RNG, state
            control.should_training_stop = True


@contextmanager
def signals_stop_training(callback: InterruptCallback):
    """Route SIGTERM/SIGINT to ``callback.request_stop`` while the block runs; a second one exits at once.

    Python only lets the main thread set handlers: elsewhere (mathtune.train() called from a worker
    thread) the process keeps its own handling, and the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame):
        if callback.signal is not None:
            # os.write: async-signal-safe and unbuffered, unlike print while another print may be mid-way
            os.write(2, f"\nsecond {signal.Signals(signum).name}: exiting now; checkpoints are left as they "
                        f"were (the newest marked one is intact)\n".encode())
            os._exit(EXIT_CODES.get(signum, 128 + signum))
        callback.request_stop(signum)
        os.write(2, f"\n{signal.Signals(signum).name} received: finishing this step, then saving a checkpoint "
                    f"(send it again to exit at once)\n".encode())

    previous = {signum: signal.signal(signum, handle) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def resume_command(argv: list[str]) -> str:
    """``mathtune <argv>`` with any --resume replaced by ``--resume auto``: the command to continue a run."""
    kept, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == "--resume":
            # --resume takes an optional value (nargs="?"): drop the next word when it is one
            skip = i + 1 < len(argv) and not argv[i + 1].startswith("-")
            continue
        if arg.startswith("--resume="):
            continue
        kept.append(arg)
    return shlex.join(["mathtune", *kept, "--resume", "auto"])


def report_interrupted(stop: "TrainingInterrupted", command: str) -> int:
    """Print why a training command stopped and the command line that continues it (``train`` or
    ``grpo``, as the user typed it with ``--resume auto``); returns the exit code. A signal, not a failure."""
    import sys

    print(f"interrupted: {stop}", file=sys.stderr)
    if stop.checkpoint is not None:
        argv = sys.argv[1:]
        argv = argv[argv.index(command):] if command in argv else [command, *argv]
        print(f"continue with: {resume_command(argv)}", file=sys.stderr)
    return stop.exit_code

