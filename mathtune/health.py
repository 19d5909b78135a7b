"""Will training work here, with these settings? The checks of ``mathtune doctor``.

``examine`` runs what a real ``mathtune train`` runs, only shorter: the device and precision policy
(once: the chosen ``Placement`` is handed to ``training.setup``), the preflight, ``steps`` real
optimizer steps through ``training.setup``/``training.run`` (guards on) into ``run_dir``, and the
collapse check on the result. It returns one ``CheckResult`` per check, in order, and stops at the
first failure (later checks would only repeat it). A failure anywhere (a bad flag, a refused
precision, a guard halting training) becomes a failed check, not a traceback.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

from mathtune.config import TrainConfig
from mathtune.errors import MathtuneError, TrainingHalted
from mathtune.guards import CheckResult


def examine(config: TrainConfig, steps: int, run_dir: Path, *, rows_given: bool,
            output_dir_given: bool) -> list[CheckResult]:
    """Every check in order for ``steps`` optimizer steps of ``config``; stops at the first failure.

    ``config`` is the user's (validated) config; doctor's own settings (a short run into ``run_dir``
    unless --output-dir was given, no checkpoints or comparison, guards on) replace its fields.
    ``rows_given``: the user chose --max-samples; otherwise only the rows the steps need are prepared.
    ``output_dir_given``: the user chose --output-dir; otherwise the run goes to ``run_dir``.
    """
    from mathtune import hardware, training
    from mathtune.models.spec import describe_model

    checks: list[CheckResult] = []

    def add(name: str, passed: bool, value: str, message: str = "") -> bool:
        checks.append(CheckResult(name, passed, value, message))
        return passed

    if steps <= 0:
        add("config", False, f"--steps {steps}", f"--steps must be > 0 (got {steps})")
        return checks
    try:
        config = doctor_config(config, steps, None if output_dir_given else run_dir)
    except MathtuneError as exc:
        add("config", False, "", str(exc))
        return checks
    try:
        device, device_reason = hardware.choose_device(config.device)
    except MathtuneError as exc:
        add("device", False, f"--device {config.device}", str(exc))
        return checks
    add("device", True, f"{device} ({device_reason})")
    try:
        precision, precision_reason = hardware.choose_precision(config.precision, device)
    except MathtuneError as exc:
        add("precision_policy", False, f"--precision {config.precision} on {device}", str(exc))
        return checks
    add("precision_policy", True, f"{precision} ({precision_reason})")

    try:
        if not rows_given:
            config = dataclasses.replace(config, max_samples=rows_needed(config, steps)).validate()
        placement = hardware.Placement(device, device_reason, precision, precision_reason)
        session = training.setup(config, placement=placement)
    except MathtuneError as exc:
        add("setup", False, "", str(exc))
        return checks
    add("model", True, describe_model(config.model))
    add("rows", True, f"{len(session.rows)} rows of {config.task}, {session.mean_row_tokens:.0f} tokens "
                      f"({session.mean_supervised_tokens:.0f} supervised) per row on average")
    before = fingerprints(session.model)

    started = time.perf_counter()
    try:
        result = training.run(session)
    except TrainingHalted as exc:
        checks += session.preflight  # the preflight checks that passed before the halt
        # preflight halts carry no step; the guards' halts during training name theirs
        add(exc.check, False, "" if exc.step is None else f"halted at step {exc.step}", str(exc))
        return checks
    except MathtuneError as exc:
        add("training", False, "", str(exc))
        return checks
    seconds = time.perf_counter() - started
    checks += session.preflight
    checks += training_checks(session, result, seconds, config.max_steps)
    checks += weight_checks(session, before)
    checks.append(collapse_check(session))
    return checks


def doctor_config(config: TrainConfig, steps: int, run_dir: Path | None) -> TrainConfig:
    """The user's config with the settings doctor decides itself: a short run, no checkpoints, guards
    on, into ``run_dir`` (unless None: the user's --output-dir)."""
    overrides = dict(max_steps=steps, save_steps=0, eval_samples=0, guards=True, resume=None,
                     logging_steps=1, max_time=None)
    if run_dir is not None:
        overrides["output_dir"] = str(run_dir)
    return config.with_flat(**overrides).validate()


def rows_needed(config: TrainConfig, steps: int) -> int:
    """Only the rows the steps will see (all, when the split is smaller): preparing the whole of a
    large split would take longer than the steps themselves."""
    from mathtune.tasks import task_from_config

    needed = steps * config.batch_size * config.gradient_accumulation_steps
    task = task_from_config(config)
    return needed if needed < len(task.examples("train")) else -1


def training_checks(session, result, seconds: float, steps: int) -> list[CheckResult]:
    """Steps done, and the logged loss, gradient norm and supervised tokens of every step."""
    from mathtune.run_dir import read_jsonl_repairing

    metrics = session.files.metrics
    lines = read_jsonl_repairing(metrics) if metrics.is_file() else []
    checks = [CheckResult(
        "optimizer_steps", result.steps == steps,
        f"{result.steps} of {steps} in {seconds:.1f} s ({result.seconds / max(result.steps, 1):.2f} s/step, "
        f"{result.train_tokens_per_second:,.0f} tokens/s)",
        f"training stopped after {result.steps} of {steps} steps: check --max-samples and --batch-size")]
    losses = [line["loss"] for line in lines]
    checks.append(CheckResult(
        "loss", bool(losses) and all(math.isfinite(l) and l > 0 for l in losses),
        f"first {losses[0]:.4f} -> last {losses[-1]:.4f}" if losses else "no step was logged",
        f"a logged loss was not finite and > 0 (see {metrics.name})"))
    norms = [line["grad_norm"] for line in lines if line.get("grad_norm") is not None]
    checks.append(CheckResult(
        "grad_norm", bool(norms) and all(math.isfinite(n) for n in norms) and max(norms) > 0,
        f"first {norms[0]:.4g}, max {max(norms):.4g}, last {norms[-1]:.4g}" if norms else "not logged",
        "gradient norms must be finite and not all zero"))
    supervised = [line["supervised_tokens"] for line in lines]
    checks.append(CheckResult(
        "supervised_tokens_trained", bool(supervised) and min(supervised) > 0,
        f"{sum(supervised):,} over {len(supervised)} steps (min {min(supervised) if supervised else 0} per step)",
        "a step trained on zero supervised tokens: run `mathtune data`"))
    return checks


def fingerprints(model) -> dict[str, tuple[float, float]]:
    """One number pair per trainable tensor (cheap, no copy of the weights) to see which ones moved."""
    import torch

    with torch.no_grad():
        # two reductions, no temporary copy of the weights (full fine-tuning of a 0.5B model included)
        return {n: (float(p.norm()), float(p.sum())) for n, p in model.named_parameters() if p.requires_grad}


def weight_checks(session, before: dict[str, tuple[float, float]]) -> list[CheckResult]:
    """Trainable weights moved, and the saved weights are finite."""
    import torch
    from safetensors.torch import load_file

    after = fingerprints(session.model)
    changed = sum(1 for n, v in before.items() if after.get(n) != v)
    checks = [CheckResult(
        "params_updated", changed > 0, f"{changed} of {len(before)} trainable tensors changed",
        "no trainable weight changed: the optimizer is not updating them (learning rate 0? frozen adapters?)")]
    files = sorted(session.run_dir.rglob("*.safetensors"))
    bad, tensors = [], 0
    for path in files:
        for name, tensor in load_file(str(path)).items():
            tensors += 1
            if not bool(torch.isfinite(tensor).all()):
                bad.append(f"{path.name}:{name}")
    checks.append(CheckResult(
        "saved_weights_finite", bool(files) and not bad,
        f"{tensors} tensors in {', '.join(p.name for p in files) or 'no file'}",
        f"saved weights hold NaN/inf ({', '.join(bad[:3])})" if bad else "the final model was not saved"))
    return checks


def collapse_check(session) -> CheckResult:
    """The collapse detector's last check: a single one is all a short run has, so it fails only
    when every output is degenerate."""
    from mathtune.guards import CollapseDetector

    detector = session.callbacks.guard(CollapseDetector)
    if detector is None or detector.last_checked_step is None:
        return CheckResult("collapse_check", False, "not run",
                           "the collapse detector did not run: guards are off?")
    flagged = [f for f in detector.last_flags if f]
    kinds = sorted({k for f in flagged for k in f})
    example = detector.last_outputs[0][:40].replace("\n", " ")
    value = (f"step {detector.last_checked_step}: {len(flagged)} of {len(detector.last_flags)} outputs flagged"
             f"{' (' + '/'.join(kinds) + ')' if kinds else ''}; e.g. {example!r}")
    return CheckResult("collapse_check", len(flagged) < len(detector.last_flags), value,
                       f"every sample output is {'/'.join(kinds)} (see {session.files.samples.name}): likely NaN "
                       f"logits / pre-shifted labels / too high learning rate (now {session.config.learning_rate:g})")
