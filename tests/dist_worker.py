"""Runs ``python -m mathtune ...`` inside one rank of a torchrun launch, with test hooks.

Used by tests/test_distributed.py (not a test module itself):

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_worker.py \
        --report DIR [--watch ROOT ...] [--nan-rank R --nan-step S] [--slow-rank R --slow-start SEC] \
        [--script FILE] -- train --model ... (mathtune's own arguments)

Each rank writes ``DIR/rank<R>.json``: every file-system write it made under a ``--watch`` root
(seen through Python's audit hooks: open for writing, rename/replace, remove, mkdir, rmtree) and the
last optimizer step its StepCallback closed. Hooks: ``--nan-rank`` makes that rank's loss NaN in
step ``--nan-step``; ``--slow-rank`` starts that rank's training clock ``--slow-start`` seconds late
and slows each of its steps, so its own clock disagrees with rank 0's. ``--script`` (a JSON list of
``{"tail": token ids, "script": token ids}``) makes every Generator write ``script`` first in the row
whose prompt ends with ``tail`` (see ``ScriptedRows``), whichever rank and batch the row lands in.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import runpy
import sys
import time
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("--report", required=True)
parser.add_argument("--watch", action="append", default=[])
parser.add_argument("--nan-rank", type=int)
parser.add_argument("--nan-step", type=int, default=2)
parser.add_argument("--slow-rank", type=int)
parser.add_argument("--slow-start", type=float, default=0.0)
parser.add_argument("--slow-step", type=float, default=0.05)
parser.add_argument("--script")
opts, rest = parser.parse_known_args()
if rest and rest[0] == "--":
    rest = rest[1:]

RANK = int(os.environ["RANK"])
WATCH = [str(Path(w).resolve()) for w in opts.watch]
info = {"rank": RANK, "writes": [], "last_step": None}


def _watched(path) -> str | None:
    try:
        full = os.path.abspath(os.fsdecode(path))
    except TypeError:
        return None  # a file descriptor
    for root in WATCH:
        if full == root or full.startswith(root + os.sep):
            return os.path.relpath(full, root)
    return None


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def audit(event, args):
    if event == "open":
        path, mode, flags = args
        writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & _WRITE_FLAGS)
        paths = [path] if writing else []
    elif event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree", "os.truncate"):
        paths = list(args[:2]) if event == "os.rename" else [args[0]]
    else:
        return
    for p in paths:
        rel = _watched(p)
        if rel is not None:
            info["writes"].append([event, rel])


sys.addaudithook(audit)


def dump():
    report = Path(opts.report)
    report.mkdir(parents=True, exist_ok=True)
    (report / f"rank{RANK}.json").write_text(json.dumps(info))


atexit.register(dump)

from mathtune import training  # noqa: E402 (after the hook, so imports are not mistaken for writes)

_on_step_end = training.StepCallback.on_step_end


def on_step_end(self, args, state, control, **kwargs):
    result = _on_step_end(self, args, state, control, **kwargs)
    info["last_step"] = state.global_step
    return result


training.StepCallback.on_step_end = on_step_end

if opts.nan_rank == RANK:
    _compute_loss = training.MathtuneTrainer.compute_loss

    def compute_loss(self, *args, **kwargs):
        loss = _compute_loss(self, *args, **kwargs)
        if self.state.global_step + 1 == opts.nan_step:
            loss = loss * float("nan")
        return loss

    training.MathtuneTrainer.compute_loss = compute_loss

if opts.slow_rank == RANK:
    _on_train_begin = training.StepCallback.on_train_begin
    _training_step = training.MathtuneTrainer.training_step

    def on_train_begin(self, *args, **kwargs):
        time.sleep(opts.slow_start)  # this rank's own clock starts late
        return _on_train_begin(self, *args, **kwargs)

    def training_step(self, *args, **kwargs):
        time.sleep(opts.slow_step)
        return _training_step(self, *args, **kwargs)

    training.StepCallback.on_train_begin = on_train_begin
    training.MathtuneTrainer.training_step = training_step



class ScriptedRows:
    """A LogitsProcessor: the row whose prompt ends with ``tail`` writes ``script`` first, then runs free.

    A row is recognised by its content, not its position: sharding, length sorting and finished rows
    leaving the batch all move rows around. The tail is a prompt's own last tokens (from its first
    token that differs from every other prompt), so it lies after any batch padding on both decoding
    paths (plain left padding; the fast path's [shared prefix][padding][rest]). A row that already
    wrote ``script[:s]`` after its tail is forced to ``script[s]``.
    """

    def __init__(self, entries):
        self.entries = [(list(e["tail"]), list(e["script"])) for e in entries]

    def __call__(self, input_ids, scores):
        for row, ids in enumerate(input_ids.tolist()):
            for tail, script in self.entries:
                for step in range(len(script)):
                    if ids[len(ids) - len(tail) - step:] == tail + script[:step]:
                        scores[row] = float("-inf")
                        scores[row, script[step]] = 0.0
                        break
        return scores


if opts.script:
    from mathtune.generation import engine

    _generator_init = engine.Generator.__init__
    _entries = json.loads(Path(opts.script).read_text())

    def generator_init(self, *args, logits_processors=(), **kwargs):
        _generator_init(self, *args, logits_processors=[ScriptedRows(_entries), *logits_processors], **kwargs)

    engine.Generator.__init__ = generator_init

sys.argv = ["mathtune", *rest]
runpy.run_module("mathtune", run_name="__main__")
