"""Rank awareness under a launcher (``torchrun``, ``accelerate launch``): mathtune's whole distributed part.

mathtune writes no distributed layer: the launcher starts the processes, accelerate's ``PartialState``
joins them into a process group (gloo on CPU, NCCL on GPUs), and ``Trainer`` + accelerate own data
sharding, gradient sync and (sharded) saves. What only mathtune knows is which of ITS decisions and
files must be shared, so this module gives:

  who am I         ``rank``, ``world_size``, ``is_main_process``, ``local_device``
  one writer       ``on_main(fn)``: rank 0 runs ``fn`` (writes files, reads a cache), the others wait
                   and receive its result, or its failure, so no rank waits forever for a rank that failed
  one clock        ``main_clock(seconds)``: rank 0's elapsed time broadcast to every rank (``--max-time``
                   and any time-based schedule decide on the same number, so ranks stop at the same step)
  any rank stops   ``any_rank(flag)``: a stop request seen by one rank (SIGTERM, a time budget) stops all
  collective halt  ``agree_on_halt`` / ``CollectiveCallback``: a guard's ``TrainingHalted`` on ANY rank is
                   raised on EVERY rank at the same event, message naming the rank; only rank 0 prints it
  (sharded eval lives in ``generation.sharding``: which prompts go to which rank is generation's
   business; this module only moves the objects)

Every helper is a no-op (no collective, no import of accelerate) in a single process, so a plain
``mathtune train`` pays nothing. A helper that communicates must be called by every rank in the
same order; each docstring says when.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Sequence

from mathtune.errors import MathtuneError, TrainingHalted

# Checks whose halt names the root cause when several ranks halt at one event. A NaN loss on one
# rank makes every rank's gradient NaN after DDP's all-reduce, so rank 0 would report
# nonfinite_grad while rank 1 saw the NaN loss that caused it: report the loss-side check first.
_CAUSE_ORDER = ("zero_supervised_tokens", "nonfinite_loss", "zero_loss")

# TrainerCallback events a wrapped guard may raise in (TrainerCallback defines each as a no-op).
_EVENTS = (
    "on_init_end", "on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end", "on_step_begin",
    "on_pre_optimizer_step", "on_optimizer_step", "on_substep_end", "on_step_end", "on_evaluate",
    "on_predict", "on_save", "on_log", "on_prediction_step", "on_push_begin",
)


# --------------------------------------------------------------------------- who am I


def _dist():
    if "torch" not in sys.modules:
        return None  # no process group can exist before torch is imported; keeps the CLI's --help fast
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def world_size() -> int:
    """Processes in this run: the process group's size, else the launcher's WORLD_SIZE, else 1."""
    dist = _dist()
    return dist.get_world_size() if dist is not None else int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist is not None else int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """Rank 0: the one process that writes files and prints (True when not launched)."""
    return rank() == 0


def is_collective() -> bool:
    """Launched with more than one process and the process group joined: collectives will run."""
    return launched() and _dist() is not None


def launched() -> bool:
    return world_size() > 1


def local_device(device: str) -> str:
    """``cuda`` -> this process's own GPU (``cuda:LOCAL_RANK``) under a launcher; else unchanged."""
    if launched() and device == "cuda":
        return f"cuda:{local_rank()}"
    return device


def init(device: str) -> None:
    """Join the launcher's process group through accelerate (once); a no-op in a single process.

    Called before the run dir is touched, so rank 0 can prepare it while the others wait. Trainer's
    ``TrainingArguments`` later re-creates accelerate's state on the same process group.
    """
    if not launched():
        return
    check_deepspeed()
    from accelerate import PartialState

    PartialState(cpu=device == "cpu")


def check_deepspeed() -> None:
    """A DeepSpeed launch (accelerate sets ACCELERATE_USE_DEEPSPEED) needs the deepspeed package."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return
    from accelerate.utils import is_deepspeed_available

    if not is_deepspeed_available():
        raise MathtuneError(
            "this launch uses DeepSpeed (configs/accelerate/deepspeed-zero2.yaml) but deepspeed is not installed: "
            "pip install 'mathtune[deepspeed]', or launch with configs/accelerate/ddp.yaml or fsdp.yaml"
        )


def quiet_replicas() -> None:
    """Non-main ranks print nothing to stdout (summaries, tables): rank 0 speaks for the run.
    Their stderr stays open, so a rank that fails on its own still says why."""
    if launched() and not is_main_process():
        sys.stdout = open(os.devnull, "w")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the weight-loading bars go to stderr


def shutdown() -> None:
    """Leave the process group cleanly (NCCL warns at exit otherwise)."""
    dist = _dist()
    if dist is not None:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- collectives


def _device():
    # NCCL only moves CUDA tensors; gloo only CPU ones. accelerate's state knows this process's device.
    from accelerate import PartialState

    return PartialState().device


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (collective: every rank calls it)."""
    dist = _dist()
    if dist is None:
        return obj
    holder = [obj if is_main_process() else None]
    dist.broadcast_object_list(holder, src=0, device=_device())
    return holder[0]


def gather_objects(obj: Any) -> list:
    """Every rank's ``obj``, in rank order, on every rank (collective)."""
    dist = _dist()
    if dist is None:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _reduce_max(value: float) -> float:
    import torch

    dist = _dist()
    if dist is None:
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on at least one (collective). For stop requests
    (SIGTERM) that arrive on one rank: every rank must leave the loop after the same step."""
    return _reduce_max(1.0 if flag else 0.0) > 0.0


def main_clock(seconds: float) -> float:
    """Rank 0's ``seconds`` on every rank (collective). Each rank's own clock starts at a different
    moment (model loading, data preparation): deciding ``--max-time`` on local clocks would let rank 0
    stop at step k while rank 1 runs step k+1 and waits forever in its gradient all-reduce."""
    dist = _dist()
    if dist is None:
        return seconds
    import torch

    tensor = torch.tensor([float(seconds)], dtype=torch.float64, device=_device())
    dist.broadcast(tensor, src=0)
    return float(tensor.item())


def barrier() -> None:
    dist = _dist()
    if dist is not None:
        dist.barrier()


class ReplicaStopped(MathtuneError):
    """Raised on the other ranks when rank 0 failed in a step they were waiting for; rank 0 prints
    the cause, so this one stays quiet (``echo = False``)."""

    echo = False


def on_main(fn: Callable[[], Any]) -> Any:
    """Rank 0 runs ``fn``; every rank returns its result (collective, so it is also a barrier).

    If ``fn`` fails on rank 0, rank 0 re-raises it and the other ranks raise ``ReplicaStopped``
    instead of waiting for a broadcast that never comes. ``fn``'s result must be picklable.
    """
    if not launched() or _dist() is None:
        return fn()
    result, failure = None, None
    if is_main_process():
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised below on this rank, reported on the others
            failure = exc
    summary = broadcast_object(("failed", f"{type(failure).__name__}: {failure}") if failure is not None
                               else ("ok", result))
    if failure is not None:
        raise failure
    if summary[0] == "failed":
        raise ReplicaStopped(f"rank 0 failed ({summary[1]})")
    return summary[1]


# --------------------------------------------------------------------------- collective halt


def agree_on_halt(local: TrainingHalted | None) -> None:
    """Raise on every rank if any rank halted (collective; call at the same event on every rank).

    One flag all-reduce per call when nothing is wrong; the halts themselves are exchanged only when
    one happened. The halt raised names the failing rank; only rank 0's copy is printed.
    """
    if not launched() or _dist() is None:
        if local is not None:
            raise local
        return
    if not any_rank(local is not None):
        return
    mine = None if local is None else (local.check, getattr(local, "reason", str(local)), local.step)
    halts = [(r, h) for r, h in enumerate(gather_objects(mine)) if h is not None]
    first_rank, (check, reason, step) = min(
        halts, key=lambda rh: (_CAUSE_ORDER.index(rh[1][0]) if rh[1][0] in _CAUSE_ORDER else len(_CAUSE_ORDER), rh[0])
    )
    others = [r for r, _ in halts if r != first_rank]
    if others:
        reason += f" (ranks {', '.join(map(str, others))} halted too)"
    halted = TrainingHalted(check, reason, step, rank=first_rank)
    halted.echo = is_main_process()
    raise halted from local


def collectively(fn: Callable[..., Any], *args, **kwargs) -> Any:
    """``fn(*args, **kwargs)`` on every rank; a ``TrainingHalted`` on any rank is raised on all
    (collective). For checks every rank runs once, like the preflight."""
    local, result = None, None
    try:
        result = fn(*args, **kwargs)
    except TrainingHalted as exc:
        local = exc
    agree_on_halt(local)
    return result


class CollectiveCallback:
    """Wraps a guard callback so that its ``TrainingHalted`` stops every rank at the same event.

    Only the events the guard overrides are wrapped (the others stay TrainerCallback's no-ops), and
    every rank holds the same guards, so every rank reaches the same collectives in the same order.
    """

    def __new__(cls, inner):
        from transformers import TrainerCallback

        if not launched():
            return inner

        class Collective(TrainerCallback):
            def __repr__(self):
                return f"Collective({inner!r})"

        wrapper = Collective()
        wrapper.inner = inner
        for event in _EVENTS:
            method = getattr(type(inner), event, None)
            if method is None or method is getattr(TrainerCallback, event, None):
                continue

            def call(*args, _event=event, **kwargs):
                return collectively(getattr(inner, _event), *args, **kwargs)

            setattr(wrapper, event, call)
        return wrapper


def describe() -> str:
    """``2 processes (gloo)`` for summaries."""
    dist = _dist()
    backend = f" ({dist.get_backend()})" if dist is not None else ""
    return f"{world_size()} process{'es' if world_size() != 1 else ''}{backend}"

