"""What do the guards cost? The bundled model trained for a fixed number of steps, guards on vs off.

    .venv/bin/python bench/guard_overhead.py                # smollm2-135m, unit-conversion, 8 steps
    .venv/bin/python bench/guard_overhead.py --steps 20 --repeats 2

Both runs use the same seed, rows and settings (the defaults of ``mathtune train`` apart from
``--max-steps``), through ``training.setup``/``training.run``; only ``--no-guards`` differs. They
alternate (off, on, off, on, ...) so a slow spell on a shared machine hits both.

Printed, all measured in this run:
  wall      training wall time per run, off vs on, and their ratio (noisy on a shared CPU: the
            guards' cost is far below the step-to-step spread, so read it with the line below)
  guard     the guards' own time, clocked inside the guarded run: preflight (once), the numeric
            checks (every step), the collapse checks (every --sample-every steps and at the end)
  projected the guards' share of a default-length run (one epoch of the task, sample checks every
            --sample-every steps), from the measured step time and guard times: the < 5 % goal
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mathtune import guards, training  # noqa: E402
from mathtune.config import TrainConfig  # noqa: E402


class Clock:
    """Wraps methods of guard classes to add up the time spent in them."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._originals = []

    def wrap(self, owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - started
                self.calls[label] = self.calls.get(label, 0) + 1

        self._originals.append((owner, name, original))
        setattr(owner, name, timed)

    def restore(self) -> None:
        for owner, name, original in reversed(self._originals):
            setattr(owner, name, original)
        self._originals = []


def train_once(config: TrainConfig, clock: Clock | None) -> tuple[float, int, float]:
    """(wall seconds of training.run, steps, mean step seconds) for one run."""
    session = training.setup(config)
    if clock is not None:
        clock.wrap(guards, "preflight", "preflight")
        clock.wrap(guards.NumericGuard, "on_pre_optimizer_step", "numeric (per step)")
        clock.wrap(guards.NumericGuard, "on_step_end", "numeric (per step)")
        clock.wrap(guards.NumericGuard, "on_log", "numeric (per step)")
        clock.wrap(guards.NumericGuard, "on_train_end", "final weights check")
        clock.wrap(guards.CollapseDetector, "check", "collapse check")
        clock.wrap(guards.CollapseDetector, "on_train_begin", "samples file reset")
    try:
        started = time.perf_counter()
        result = training.run(session)
        wall = time.perf_counter() - started
    finally:
        if clock is not None:
            clock.restore()
    lines = session.files.metrics.read_text().splitlines()
    step_seconds = [json.loads(line)["step_seconds"] for line in lines if line.strip()]
    return wall, result.steps, statistics.median(step_seconds)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="unit-conversion")
    parser.add_argument("--train-file", default=None, help="for --task file or gsm8k")
    parser.add_argument("--eval-file", default=None, help="for --task file or gsm8k")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run (default 8)")
    parser.add_argument("--repeats", type=int, default=1, help="off/on pairs (default 1)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args(argv)

    defaults = TrainConfig()
    base = dict(model=args.model, task=args.task, train_file=args.train_file, eval_file=args.eval_file,
                max_steps=args.steps, device=args.device,
                precision=args.precision,
                # only the rows the steps use: preparing the whole split is the same work in both runs
                max_samples=args.steps * defaults.batch_size * defaults.gradient_accumulation_steps)
    walls = {False: [], True: []}
    steps_median = {False: [], True: []}
    clock = Clock()
    with tempfile.TemporaryDirectory(prefix="mathtune-bench-") as tmp:
        for repeat in range(args.repeats):
            for guarded in (False, True):
                config = TrainConfig(**base, guards=guarded, output_dir=str(Path(tmp) / f"{repeat}-{guarded}")).validate()
                wall, steps, step_median = train_once(config, clock if guarded else None)
                if steps != args.steps:
                    raise SystemExit(f"run stopped after {steps} of {args.steps} steps: the comparison is void")
                walls[guarded].append(wall)
                steps_median[guarded].append(step_median)
                print(f"run {repeat + 1} guards {'on ' if guarded else 'off'}: {wall:.1f} s for {steps} steps "
                      f"(median step {step_median:.2f} s)", flush=True)

    off, on = statistics.mean(walls[False]), statistics.mean(walls[True])
    step_time = statistics.median(steps_median[False])
    n_runs = args.repeats
    per_run = {label: seconds / n_runs for label, seconds in clock.seconds.items()}
    checks_per_run = clock.calls.get("collapse check", 0) / n_runs
    collapse_each = per_run.get("collapse check", 0.0) / max(checks_per_run, 1)
    numeric_per_step = per_run.get("numeric (per step)", 0.0) / args.steps
    fixed = per_run.get("preflight", 0.0) + per_run.get("final weights check", 0.0)

    print()
    print(f"wall: guards off {off:.1f} s, on {on:.1f} s for {args.steps} steps: ratio on/off {on / off:.3f} "
          f"({(on / off - 1):+.1%})")
    print("guard time per run (measured inside the guarded run):")
    for label, seconds in sorted(per_run.items()):
        print(f"  {label:<20} {seconds:8.2f} s")
    guard_total = sum(per_run.values())
    print(f"  {'total':<20} {guard_total:8.2f} s = {guard_total / off:.1%} of the unguarded run "
          f"({args.steps} steps; the preflight and the end-of-training sample are one-off costs)")

    # A default run: one epoch of the task's train split, a sample check every sample_every steps + one at the end.
    from mathtune.tasks import get_task

    task = get_task(args.task, train_file=args.train_file, eval_file=args.eval_file, seed=defaults.seed)
    rows = len(task.examples("train"))
    default_steps = math.ceil(rows / (defaults.batch_size * defaults.gradient_accumulation_steps))
    default_checks = default_steps // defaults.sample_every + 1
    projected = fixed + default_checks * collapse_each + default_steps * numeric_per_step
    train_time = default_steps * step_time
    print(f"projected, default settings ({default_steps} steps = 1 epoch of {rows} rows, batch "
          f"{defaults.batch_size}, a sample check every {defaults.sample_every} steps):")
    print(f"  training {train_time:.0f} s ({step_time:.2f} s/step), guards {projected:.1f} s "
          f"(preflight + weights check {fixed:.1f} s, {default_checks} sample checks × {collapse_each:.2f} s, "
          f"numeric {numeric_per_step * 1000:.1f} ms/step)")
    print(f"  guard overhead: {projected / train_time:.2%} (goal < 5%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
