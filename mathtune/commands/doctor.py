"""``mathtune doctor``: will training work here, with these settings? Answered in about a minute.

The checks are mathtune/health.py's (a short real training run into a temporary run dir); this
command prints one table line per check with the figure it measured, and PASS (exit 0) or FAIL
(exit 1, with the failing check's fix).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from mathtune.config import TrainConfig, add_config_arguments, config_from_args
from mathtune.errors import MathtuneError

if TYPE_CHECKING:  # mathtune.guards imports torch: imported where used, so the CLI parser builds fast
    from mathtune.guards import CheckResult

DEFAULT_STEPS = 10
# Settings doctor decides itself: a short run (--steps), no checkpoints or comparison, guards on.
SKIPPED = ("max_steps", "num_epochs", "resume", "save_steps", "save_total_limit", "eval_samples",
           "eval_batch_size", "guards", "wandb", "wandb_project", "wandb_key_file", "max_time")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with training settings (flags win)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help=f"optimizer steps to run (default: {DEFAULT_STEPS})")
    add_config_arguments(parser, TrainConfig, skip=SKIPPED)


class Doctor:
    """Collects check lines; ``fail`` records a failed check and ends the examination."""

    def __init__(self):
        self.checks: list[CheckResult] = []

    def add(self, name: str, passed: bool, value: str, message: str = "") -> bool:
        from mathtune.guards import CheckResult

        self.checks.append(CheckResult(name, passed, value, message))
        return passed

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    def table(self) -> str:
        width = max(len(c.name) for c in self.checks)
        lines = [f"{'check':<{width}}  result  value"]
        for c in self.checks:
            value = c.value if c.passed or c.value else _first_line(c.message)
            lines.append(f"{c.name:<{width}}  {'PASS' if c.passed else 'FAIL'}    {value}")
        failed = [c for c in self.checks if not c.passed]
        if failed:
            lines.append(f"\nDOCTOR: FAIL ({failed[0].name})")
            lines.append(f"fix: {failed[0].message}")
        else:
            lines.append(f"\nDOCTOR: PASS ({len(self.checks)} checks)")
        return "\n".join(lines)


def _first_line(text: str, limit: int = 100) -> str:
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def run(args: argparse.Namespace) -> int:
    from mathtune import health

    doctor = Doctor()
    with tempfile.TemporaryDirectory(prefix="mathtune-doctor-") as tmp:
        try:
            config = config_from_args(TrainConfig, args)
        except MathtuneError as exc:
            doctor.add("config", False, "", str(exc))
        else:
            doctor.checks += health.examine(config, args.steps, Path(tmp) / "run", rows_given=args.max_samples is not None,
                                            output_dir_given=args.output_dir is not None)
    print()
    print(doctor.table())
    return 0 if doctor.passed else 1
