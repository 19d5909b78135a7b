"""``mathtune doctor``: will training work here, with these settings? Answered in about a minute.

It runs what a real ``mathtune train`` runs, only shorter: the device and precision policy, the
preflight, ``--steps`` real optimizer steps through ``training.setup``/``training.run`` (guards on)
into a temporary run dir, and the collapse check on the result. Then one table line per check with
the figure it measured, and PASS (exit 0) or FAIL (exit 1, with the failing check's fix).

A failure anywhere (a bad flag, a refused precision, a guard halting training) becomes a FAIL line,
not a traceback: the table is the answer, whatever went wrong.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from mathtune.config import TrainConfig, add_config_arguments, config_from_args
from mathtune.errors import MathtuneError, TrainingHalted

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
    doctor = Doctor()
    with tempfile.TemporaryDirectory(prefix="mathtune-doctor-") as tmp:
        examine(args, doctor, Path(tmp) / "run")
    print()
    print(doctor.table())
    return 0 if doctor.passed else 1


def examine(args: argparse.Namespace, doctor: Doctor, default_run_dir: Path) -> None:
    """Every check in order; stops at the first failure (later checks would only repeat it)."""
    from mathtune import hardware, training
    from mathtune.models.spec import describe_model

    if args.steps <= 0:
        doctor.add("config", False, f"--steps {args.steps}", f"--steps must be > 0 (got {args.steps})")
        return
    try:
        config = _doctor_config(config_from_args(TrainConfig, args), args, default_run_dir)
    except MathtuneError as exc:
        doctor.add("config", False, "", str(exc))
        return
    try:
        device, device_reason = hardware.choose_device(config.device)
    except MathtuneError as exc:
        doctor.add("device", False, f"--device {config.device}", str(exc))
        return
    doctor.add("device", True, f"{device} ({device_reason})")
    try:
        precision, precision_reason = hardware.choose_precision(config.precision, device)
    except MathtuneError as exc:
        doctor.add("precision_policy", False, f"--precision {config.precision} on {device}", str(exc))
        return
    doctor.add("precision_policy", True, f"{precision} ({precision_reason})")

    try:
        if args.max_samples is None:
            config.max_samples = _rows_needed(config, args.steps)
        session = training.setup(config.validate())
    except MathtuneError as exc:
        doctor.add("setup", False, "", str(exc))
        return
    doctor.add("model", True, describe_model(config.model))
    doctor.add("rows", True, f"{len(session.rows)} rows of {config.task}, {session.mean_row_tokens:.0f} tokens "
                             f"({session.mean_supervised_tokens:.0f} supervised) per row on average")
    before = _fingerprints(session.model)

    started = time.perf_counter()
    try:
        result = training.run(session)
    except TrainingHalted as exc:
        preflight = getattr(exc, "results", None)
        if preflight is not None:  # halted in preflight: show what passed, then the failing check
            _add_preflight(doctor, preflight[:-1])
            doctor.add(exc.check, False, "", str(exc))
        else:
            _add_preflight(doctor, getattr(session.trainer, "mathtune_preflight", []))
            doctor.add(exc.check, False, f"halted at step {exc.step}", str(exc))
        return
    except MathtuneError as exc:
        doctor.add("training", False, "", str(exc))
        return
    seconds = time.perf_counter() - started
    _add_preflight(doctor, session.trainer.mathtune_preflight)
    _add_training(doctor, session, result, seconds, config.max_steps)
    _add_weights(doctor, session, before)
    _add_collapse(doctor, session)


def _doctor_config(config: TrainConfig, args: argparse.Namespace, default_run_dir: Path) -> TrainConfig:
    overrides = dict(max_steps=args.steps, save_steps=0, eval_samples=0, guards=True, resume=None,
                     logging_steps=1, max_time=None)
    if args.output_dir is None:
        overrides["output_dir"] = str(default_run_dir)
    for name, value in overrides.items():
        setattr(config, name, value)
    return config.validate()


def _rows_needed(config: TrainConfig, steps: int) -> int:
    """Only the rows the steps will see (all, when the split is smaller): preparing the whole of a
    large split would take longer than the steps themselves."""
    from mathtune.tasks import get_task

    needed = steps * config.batch_size * config.gradient_accumulation_steps
    task = get_task(config.task, train_file=config.train_file, eval_file=config.eval_file,
                    strip_calculator=config.strip_calculator, seed=config.seed)
    return needed if needed < len(task.examples("train")) else -1


def _add_preflight(doctor: Doctor, results: list[CheckResult]) -> None:
    for r in results:
        doctor.add(r.name, r.passed, r.value, r.message)


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _add_training(doctor: Doctor, session, result, seconds: float, steps: int) -> None:
    doctor.add("optimizer_steps", result.steps == steps,
               f"{result.steps} of {steps} in {seconds:.1f} s ({result.seconds / max(result.steps, 1):.2f} s/step, "
               f"{result.train_tokens_per_second:,.0f} tokens/s)",
               f"training stopped after {result.steps} of {steps} steps: check --max-samples and --batch-size")
    lines = _metrics(session.run_dir)
    losses = [line["loss"] for line in lines]
    ok = bool(losses) and all(math.isfinite(l) and l > 0 for l in losses)
    value = f"first {losses[0]:.4f} -> last {losses[-1]:.4f}" if losses else "no step was logged"
    doctor.add("loss", ok, value, "a logged loss was not finite and > 0 (see metrics.jsonl)")
    norms = [line["grad_norm"] for line in lines if line.get("grad_norm") is not None]
    ok = bool(norms) and all(math.isfinite(n) for n in norms) and max(norms) > 0
    value = f"first {norms[0]:.4g}, max {max(norms):.4g}, last {norms[-1]:.4g}" if norms else "not logged"
    doctor.add("grad_norm", ok, value, "gradient norms must be finite and not all zero")
    supervised = [line["supervised_tokens"] for line in lines]
    ok = bool(supervised) and min(supervised) > 0
    value = f"{sum(supervised):,} over {len(supervised)} steps (min {min(supervised) if supervised else 0} per step)"
    doctor.add("supervised_tokens_trained", ok, value, "a step trained on zero supervised tokens: run `mathtune data`")


def _fingerprints(model) -> dict[str, tuple[float, float]]:
    """One number per trainable tensor (cheap, no copy of the weights) to see which ones moved."""
    import torch

    with torch.no_grad():
        # two reductions, no temporary copy of the weights (full fine-tuning of a 0.5B model included)
        return {n: (float(p.norm()), float(p.sum())) for n, p in model.named_parameters() if p.requires_grad}


def _add_weights(doctor: Doctor, session, before: dict[str, tuple[float, float]]) -> None:
    import torch
    from safetensors.torch import load_file

    after = _fingerprints(session.model)
    changed = sum(1 for n, v in before.items() if after.get(n) != v)
    doctor.add("params_updated", changed > 0, f"{changed} of {len(before)} trainable tensors changed",
               "no trainable weight changed: the optimizer is not updating them (learning rate 0? frozen adapters?)")
    files = sorted(session.run_dir.rglob("*.safetensors"))
    bad, tensors = [], 0
    for path in files:
        for name, tensor in load_file(str(path)).items():
            tensors += 1
            if not bool(torch.isfinite(tensor).all()):
                bad.append(f"{path.name}:{name}")
    doctor.add("saved_weights_finite", bool(files) and not bad,
               f"{tensors} tensors in {', '.join(p.name for p in files) or 'no file'}",
               f"saved weights hold NaN/inf ({', '.join(bad[:3])})" if bad else "the final model was not saved")


def _add_collapse(doctor: Doctor, session) -> None:
    from mathtune.guards import CollapseDetector

    detector = next((cb for cb in session.callbacks.get("guards", []) if isinstance(cb, CollapseDetector)), None)
    if detector is None or detector.last_checked_step is None:
        doctor.add("collapse_check", False, "not run", "the collapse detector did not run: guards are off?")
        return
    flagged = [f for f in detector.last_flags if f]
    kinds = sorted({k for f in flagged for k in f})
    example = detector.last_outputs[0][:40].replace("\n", " ")
    value = (f"step {detector.last_checked_step}: {len(flagged)} of {len(detector.last_flags)} outputs flagged"
             f"{' (' + '/'.join(kinds) + ')' if kinds else ''}; e.g. {example!r}")
    # a single check is all a short run has: doctor fails it when every output is degenerate
    doctor.add("collapse_check", len(flagged) < len(detector.last_flags), value,
               f"every sample output is {'/'.join(kinds)} (see samples.jsonl): likely NaN logits / pre-shifted "
               f"labels / too high learning rate (now {session.config.learning_rate:g})")
