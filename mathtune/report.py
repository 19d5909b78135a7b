"""``report.md`` and ``plots/*.png`` for a run directory.

Reads only files the run dir already holds: metrics.jsonl (required: it is what makes a directory a
training run), and when present mathtune_config.yaml, model_comparison.json, samples.jsonl and the
eval summaries under eval/ (the learning curve: ``mathtune.learning_curve``).
Plots are drawn on matplotlib ``Figure`` objects with the Agg canvas, never through pyplot, so
writing a report changes no global backend (safe inside a notebook or a training process).

Non-finite values are shown, never dropped: a NaN/inf loss or gradient norm is drawn as a red
mark at the top of the plot, counted in the title and listed in report.md.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from mathtune.atomic import atomic_file, write_text_atomically
from mathtune.errors import InputError, MathtuneError
from mathtune.run_dir import RunDir

METRICS_FILE = RunDir.METRICS
CONFIG_FILE = RunDir.CONFIG
COMPARISON_FILE = RunDir.COMPARISON
SAMPLES_FILE = RunDir.SAMPLES
REPORT_FILE = RunDir.REPORT
PLOTS_DIR = RunDir.PLOTS
PLOT_FILES = {"loss": "loss.png", "grad_norm": "grad_norm.png", "reward": "reward.png", "pass_rate": "pass_rate.png",
              "accuracy": "accuracy.png", "learning_curve": "learning_curve.png"}
# metrics.jsonl fields read as numbers; others are carried along untouched
NUMERIC_FIELDS = ("loss", "grad_norm", "learning_rate", "supervised_tokens", "supervised_tokens_per_second",
                  "epoch", "seconds") + (
    # a GRPO run's figures (training.grpo_guards.RLStats.log_fields): means over the steps since the last line
    "reward", "pass_rate", "zero_signal_share", "completion_length", "truncated_share", "sample_seconds",
    "score_seconds", "train_seconds")
# (metrics.jsonl field, report.md label, what it means) of a GRPO run, in the order report.md lists them
RL_ROWS = (("reward", "reward", "TRL's weighted reward, mean over the samples"),
           ("pass_rate", "pass rate", "share of samples judged correct"),
           ("zero_signal_share", "zero-signal share", "share of question groups whose samples all scored alike"),
           ("completion_length", "completion length", "mean tokens per sample"),
           ("truncated_share", "truncated share", "share of samples cut at --max-completion-length"))
_NON_FINITE_STRINGS = {"nan", "inf", "+inf", "-inf", "infinity", "+infinity", "-infinity"}
COMPARISON_KEYS = ("n", "base", "trained", "accuracy_difference", "ci95", "bootstrap", "mcnemar_p",
                   "fixed", "broken", "both_correct", "both_wrong")
SAMPLES_SHOWN = 3  # per step, for the first and the last sampled step
SAMPLE_CHARS = 600


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


REPORT_HINT = "free space in the run dir (or delete its old plots/), then run mathtune report again"


def _write_png(fig, path) -> None:
    """A plot written whole or not at all (an earlier plot of the same name stays until the new one is
    complete); a full disk is one DiskFull line."""
    with atomic_file(path, hint=REPORT_HINT) as tmp:
        fig.savefig(tmp, format="png")


def _jsonl(path: Path, what: str):
    """(line number, object) for each non-blank line; a bad line is an error naming path:line."""
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)  # accepts NaN / Infinity, as Python's json writes them
            except json.JSONDecodeError as exc:
                raise InputError(path, line_no, f"not valid JSON ({exc.msg}); fix or delete the line") from None
            if not isinstance(row, dict):
                raise InputError(path, line_no, f"expected a JSON object per {what}, got {type(row).__name__}")
            yield line_no, row


def _number(value, path: Path, line_no: int, key: str) -> float | None:
    if value is None:
        return None  # not measured at this step (e.g. no grad norm on a skipped step)
    if isinstance(value, bool):
        raise InputError(path, line_no, f"'{key}' must be a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.strip().lower() in _NON_FINITE_STRINGS:
        return float(value.strip().lower().replace("infinity", "inf"))
    raise InputError(path, line_no, f"'{key}' must be a number, got {value!r}")


def read_metrics(run_dir) -> list[dict]:
    """metrics.jsonl rows sorted by step, numeric fields as floats (NaN/inf kept).

    A resumed run logs again the steps after its checkpoint; the later line wins, as it describes
    the weights that were kept.
    """
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    if not run_dir.is_dir():
        raise MathtuneError(f"{run_dir}: no such directory; pass a run dir written by mathtune train")
    if not path.is_file():
        raise MathtuneError(
            f"{run_dir} is not a training run dir: {METRICS_FILE} is missing; pass the --output-dir of a mathtune train run"
        )
    by_step: dict[int, dict] = {}
    for line_no, row in _jsonl(path, "logged step"):
        step = row.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise InputError(path, line_no, f"needs a non-negative integer 'step', got {step!r}")
        for key in NUMERIC_FIELDS:
            if key in row:
                row[key] = _number(row[key], path, line_no, key)
        by_step[step] = row
    return [by_step[s] for s in sorted(by_step)]


def read_comparison(path) -> dict | None:
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(path, exc.lineno, f"not valid JSON ({exc.msg}); re-run mathtune compare") from None
    if not isinstance(data, dict):
        raise InputError(path, None, "expected a JSON object; re-run mathtune compare")
    missing = [key for key in COMPARISON_KEYS if key not in data]
    if missing:
        raise InputError(path, None, f"missing {', '.join(missing)}; re-run mathtune compare to rewrite it")
    ci = data["ci95"]
    if not (isinstance(ci, list) and len(ci) == 2 and all(isinstance(v, (int, float)) for v in ci)):
        raise InputError(path, None, f"'ci95' must be [low, high], got {ci!r}; re-run mathtune compare")
    for side in ("base", "trained"):
        if not isinstance(data[side], dict) or not isinstance(data[side].get("accuracy"), (int, float)):
            raise InputError(path, None, f"'{side}' has no accuracy; re-run mathtune compare")
    return data


def read_samples(path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [row for _, row in _jsonl(path, "sample")]


def read_config(path) -> tuple[dict, str] | None:
    from mathtune.config import load_yaml

    path = Path(path)
    if not path.is_file():
        return None
    return load_yaml(path), path.read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def _figure(width: float = 7.0, height: float = 4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)  # attach the Agg canvas: PNG rendering without pyplot or a display
    return fig


def _series(metrics: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(row["step"], row[key]) for row in metrics if row.get(key) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def non_finite_steps(metrics: list[dict], key: str) -> list[int]:
    return [row["step"] for row in metrics if row.get(key) is not None and not math.isfinite(row[key])]


def plot_curve(metrics: list[dict], key: str, label: str, path: Path, log_scale_ratio: float | None = None) -> bool:
    """``key`` against step; non-finite points as red marks at the top. False when never logged."""
    steps, values = _series(metrics, key)
    if not steps:
        return False
    finite = [(s, v) for s, v in zip(steps, values) if math.isfinite(v)]
    bad = [s for s, v in zip(steps, values) if not math.isfinite(v)]
    fig = _figure()
    ax = fig.add_subplot()
    if finite:
        # non-finite points become NaN, which breaks the line: a gap where the step went wrong
        ax.plot(steps, [v if math.isfinite(v) else math.nan for v in values],
                marker="." if len(finite) < 60 else None, linewidth=1.2, color="tab:blue", label=label)
        positive = [v for _, v in finite if v > 0]
        # gradient norms span orders of magnitude: a spike would flatten a linear plot
        if log_scale_ratio and len(positive) == len(finite) and max(positive) / min(positive) > log_scale_ratio:
            ax.set_yscale("log")
    if bad:
        # x in data coordinates, y in axes coordinates: the marks sit at the top whatever the scale
        top = ax.get_xaxis_transform()
        ax.vlines(bad, 0, 1, transform=top, colors="tab:red", alpha=0.25, linewidth=1)
        ax.scatter(bad, [0.96] * len(bad), transform=top, marker="x", color="tab:red", s=40, zorder=3,
                   label=f"NaN/inf ({_plural(len(bad), 'step')})", clip_on=False)
        if not finite:
            ax.set_xlim(min(bad) - 1, max(bad) + 1)
    title = label
    if bad:
        title += f"\n{_plural(len(bad), 'non-finite step')} (first at step {bad[0]}), marked ×"
    ax.set_title(title, color="tab:red" if bad else "black", fontsize=11)
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right" if not bad else "center right")
    _write_png(fig, path)
    return True


def plot_accuracy(comparison: dict, path: Path) -> None:
    """Base and trained accuracy bars; beside them the difference with its paired 95% interval."""
    fig = _figure(8.0, 4.0)
    left, right = fig.subplots(1, 2, width_ratios=[2, 1])
    accuracies = [100 * comparison["base"]["accuracy"], 100 * comparison["trained"]["accuracy"]]
    bars = left.bar(["base", "trained"], accuracies, color=["tab:gray", "tab:blue"])
    left.bar_label(bars, labels=[f"{a:.1f}%" for a in accuracies], padding=2)
    left.set_ylim(0, max(100.0, max(accuracies) * 1.1))
    left.set_ylabel("accuracy (%)")
    left.set_title(f"accuracy on {comparison['n']} items")
    left.grid(axis="y", alpha=0.3)

    delta = 100 * comparison["accuracy_difference"]
    low, high = (100 * v for v in comparison["ci95"])
    # the interval need not be symmetric around the point (percentile bootstrap)
    yerr = [[max(delta - low, 0.0)], [max(high - delta, 0.0)]]
    color = "tab:green" if low > 0 else "tab:red" if high < 0 else "tab:gray"
    right.bar(["trained − base"], [delta], color=color, alpha=0.6)
    right.errorbar([0], [delta], yerr=yerr, fmt="o", color="black", capsize=8, label="95% CI (paired bootstrap)")
    right.axhline(0, color="black", linewidth=0.8)
    right.set_ylabel("Δ accuracy (percentage points)")
    right.set_title(f"Δ {delta:+.1f} pp\nMcNemar p = {comparison['mcnemar_p']:.3g}", fontsize=10)
    right.legend(loc="best", fontsize=8)
    right.grid(axis="y", alpha=0.3)
    _write_png(fig, path)


def plot_learning_curve(curves, path: Path) -> bool:
    """Accuracy (%) against training minutes, one line per comparable group with ≥ 2 placed points,
    each point named by its step. False (nothing written) when no group has two."""
    from mathtune.learning_curve import group_label

    drawable = curves.drawable
    if not drawable:
        return False
    fig = _figure()
    ax = fig.add_subplot()
    top = 0.0
    for group in drawable:
        points = group.drawn
        xs, ys = [p.minutes for p in points], [100 * p.accuracy for p in points]
        ax.plot(xs, ys, marker="o", linewidth=1.2, label=group_label(group, curves.groups))
        for point, x, y in zip(points, xs, ys):
            ax.annotate(point.mark, (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
        top = max(top, *ys)
    # room above the highest point for its step label; accuracies near 0 still get a readable axis
    ax.set_ylim(0, min(100.0, max(5.0, top * 1.2)) if top < 100 else 105.0)
    ax.set_xlabel(f"training minutes ({METRICS_FILE} 'seconds' at the checkpoint's step)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("learning curve: eval accuracy against training time (points: step)", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    _write_png(fig, path)
    return True


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}g}"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _steps_list(steps: list[int], limit: int = 10) -> str:
    shown = ", ".join(str(s) for s in steps[:limit])
    return shown + (f", ... ({len(steps)} in all)" if len(steps) > limit else "")


def _fence(text: str, info: str = "") -> str:
    # a fence longer than any backtick run inside, so model output cannot close it early
    longest, run = 0, 0
    for char in text:
        run = run + 1 if char == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{info}\n{text}\n{fence}"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _training_rows(metrics: list[dict]) -> list[tuple[str, str]]:
    if not metrics:
        return [("logged steps", "none: the run stopped before its first logged step")]
    rows = [("logged steps", f"{len(metrics)} (step {metrics[0]['step']} → {metrics[-1]['step']})")]
    steps, losses = _series(metrics, "loss")
    finite = [(s, v) for s, v in zip(steps, losses) if math.isfinite(v)]
    if steps:
        rows.append(("loss", f"first {_fmt(losses[0])} (step {steps[0]}) → last {_fmt(losses[-1])} (step {steps[-1]})"))
    if finite:
        low = min(finite, key=lambda p: p[1])
        rows.append(("lowest loss", f"{_fmt(low[1])} (step {low[0]})"))
    for key, label in (("loss", "non-finite loss"), ("grad_norm", "non-finite grad norm")):
        if _series(metrics, key)[0]:
            bad = non_finite_steps(metrics, key)
            rows.append((label, f"**{_plural(len(bad), 'step')}**: {_steps_list(bad)}" if bad else "none"))
        else:
            rows.append((label, f"not logged ({key} absent from {METRICS_FILE})"))
    _, speed = _series(metrics, "supervised_tokens_per_second")
    speed = sorted(v for v in speed if math.isfinite(v) and v > 0)
    if speed:
        median = speed[len(speed) // 2] if len(speed) % 2 else (speed[len(speed) // 2 - 1] + speed[len(speed) // 2]) / 2
        rows.append(("training throughput", f"{median:,.0f} supervised tokens/s (median of {len(speed)} logged steps; "
                                            f"range {speed[0]:,.0f}–{speed[-1]:,.0f})"))
    _, tokens = _series(metrics, "supervised_tokens")
    tokens = [v for v in tokens if math.isfinite(v)]
    if tokens:
        # each line counts the tokens of the steps since the previous line, so the sum is the total
        rows.append(("supervised tokens", f"{sum(tokens):,.0f} in all (mean {sum(tokens) / len(tokens):,.0f} per logged line)"))
    rows += _rl_rows(metrics)
    _, seconds = _series(metrics, "seconds")
    if seconds and math.isfinite(seconds[-1]):
        rows.append(("training time", f"{seconds[-1]:,.1f} s to the last logged step"))
    _, lrs = _series(metrics, "learning_rate")
    if lrs:
        rows.append(("learning rate", f"{_fmt(lrs[0])} → {_fmt(lrs[-1])} (peak {_fmt(max(lrs))})"))
    _, epochs = _series(metrics, "epoch")
    if epochs:
        rows.append(("epochs", f"{epochs[-1]:.2f}"))
    return rows


def _rl_rows(metrics: list[dict]) -> list[tuple[str, str]]:
    """A GRPO run's figures: first -> last (best) of each, and the seconds of a step by phase. None for SFT runs."""
    rows = []
    for key, label, meaning in RL_ROWS:
        steps, values = _series(metrics, key)
        finite = [(s, v) for s, v in zip(steps, values) if math.isfinite(v)]
        if not finite:
            continue
        text = f"first {_fmt(finite[0][1], 3)} (step {finite[0][0]}) → last {_fmt(finite[-1][1], 3)} (step {finite[-1][0]})"
        if key in ("reward", "pass_rate"):
            best = max(finite, key=lambda p: p[1])
            text += f", best {_fmt(best[1], 3)} (step {best[0]})"
        rows.append((label, f"{text}; {meaning}"))
    phases = []
    for key, label in (("sample_seconds", "sampling"), ("score_seconds", "scoring"), ("train_seconds", "training")):
        values = [v for v in _series(metrics, key)[1] if math.isfinite(v)]
        if values:
            phases.append(f"{label} {sum(values) / len(values):.2f}")
    if phases:
        rows.append(("seconds per step", ", ".join(phases) + " (means over the logged lines)"))
    return rows


def _comparison_section(comparison: dict) -> list[str]:
    from mathtune.comparison import comparison_rows, stats_lines

    lines = ["| metric | base | trained | Δ |", "|---|---:|---:|---:|"]
    for row in comparison_rows(comparison["base"], comparison["trained"]):
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    lines.append("")
    lines += [f"- {line}" for line in stats_lines(comparison)]
    models = [f"{side} `{comparison[side].get('model', '?')}`" for side in ("base", "trained")]
    lines.append(f"- models: {', '.join(models)}; task `{comparison.get('task', '?')}`")
    from mathtune.evaluation import protocol_description

    # a comparison written before protocols existed was measured with the chat protocol
    protocol = comparison.get("protocol") or comparison["base"].get("protocol", "chat")
    lines.append(f"- protocol {protocol_description(protocol)}")
    logs = [f"`{comparison[k]}`" for k in ("base_log", "trained_log") if k in comparison]
    if logs:
        lines.append(f"- per-item logs: {', '.join(logs)}")
    return lines


IGNORED_SHOWN = 10  # summaries not on the curve, listed with their reason


def _curve_step(point) -> str:
    if point.role == "base":
        return "0 (base model)"
    if point.step is None:
        return f"- (final model; {METRICS_FILE} logged no step)"
    return f"{point.step} (final model)" if point.role == "final" else str(point.step)


def _curve_minutes(point) -> str:
    if point.role == "base":
        return "0"
    if point.seconds is None:
        return f"- (no logged step at or before {point.step} with 'seconds' in {METRICS_FILE})"
    if point.logged_step == point.step:
        return f"{point.minutes:.2f}"
    return f"{point.minutes:.2f} (logged step {point.logged_step}, the nearest before {point.step})"


def _learning_curve_section(curves, run_dir: Path, settings: dict, drawn: bool) -> list[str]:
    from mathtune.learning_curve import group_label

    root = run_dir.resolve()
    lines = []
    if drawn:
        lines += [f"![learning curve]({PLOTS_DIR}/{PLOT_FILES['learning_curve']})", ""]
    else:
        task = settings.get("task", "TASK")
        from mathtune.tasks import TASK_NAMES, task_class

        generated = task in TASK_NAMES and task_class(task).generated  # its held-out rows need no file
        data = " --eval-file DEV.jsonl" if settings.get("eval_file") or not generated else ""
        common = f"--task {task}{data} --all --output {run_dir}/{RunDir.EVAL}/curve"
        checkpoints = [p.name for p in RunDir(run_dir).checkpoints()]
        lines += [
            "No learning curve: it needs two or more greedy evals of this run (checkpoints, final model) on the "
            f"same items and settings, with a training time in {METRICS_FILE}. Evaluate them into one folder and "
            "run the report again:", "",
            _fence("\n".join([
                f"mathtune eval --model {run_dir}/{RunDir.CHECKPOINT_PREFIX}N {common}   # each checkpoint",
                f"mathtune eval --model {run_dir} {common}   # the final model",
                f"mathtune eval --model {settings.get('model', 'BASE')} {common}   # the base model: 0 minutes",
                f"mathtune report {run_dir}"]), "bash"), "",
            f"Checkpoints in this run dir: {', '.join(checkpoints)}." if checkpoints else
            f"This run dir has no {RunDir.CHECKPOINT_PREFIX}N: train with --save-steps N (`save_total_limit: null` in the YAML "
            "keeps them all).", "",
        ]
    for group in curves.groups:
        lines += [f"### {group_label(group, curves.groups)}", "",
                  "| step | training minutes | accuracy | answer_rate | n | summary file |",
                  "|---|---:|---:|---:|---:|---|"]
        for point in group.points:
            lines.append(f"| {_cell(_curve_step(point))} | {_cell(_curve_minutes(point))} | {100 * point.accuracy:.1f}% "
                         f"| {100 * point.answer_rate:.1f}% | {point.n} | `{point.summary.relative_to(root)}` |")
        lines.append("")
        for point, why in group.left_out:
            lines.append(f"- not drawn: `{point.summary.relative_to(root)}`: {why}")
        if group.left_out:
            lines.append("")
    if curves.groups:
        lines += [f"Training minutes: `seconds` of {METRICS_FILE} (wall seconds since training started, a resumed "
                  "run continuing the count) at the checkpoint's step; the final model at the last logged step.", ""]
    if curves.ignored:
        lines.append(f"Not on the curve ({len(curves.ignored)} of the summaries under `{RunDir.EVAL}/`):")
        for path, why in curves.ignored[:IGNORED_SHOWN]:
            lines.append(f"- `{path.relative_to(root)}`: {why}")
        if len(curves.ignored) > IGNORED_SHOWN:
            lines.append(f"- ... and {len(curves.ignored) - IGNORED_SHOWN} more")
        lines.append("")
    return lines


def _clip(text: str) -> str:
    text = str(text)
    if len(text) <= SAMPLE_CHARS:
        return text
    return text[:SAMPLE_CHARS] + f"\n[... cut: {len(text)} characters in all]"


def _samples_section(samples: list[dict]) -> list[str]:
    steps = sorted({s.get("step") for s in samples if isinstance(s.get("step"), int)})
    chosen_steps = [steps[0], steps[-1]] if len(steps) > 1 else steps
    lines = [f"{_plural(len(samples), 'generation')} in `{SAMPLES_FILE}`; shown: the first and the last sampled step."]
    if not chosen_steps:  # no step numbers: show the last lines as they are
        groups = [(None, samples[-SAMPLES_SHOWN:])]
    else:
        groups = [(step, [s for s in samples if s.get("step") == step][:SAMPLES_SHOWN]) for step in chosen_steps]
    for step, group in groups:
        lines.append("")
        lines.append(f"### step {step}" if step is not None else "### latest samples")
        for sample in group:
            flags = sample.get("flags")
            flag_text = (", ".join(map(str, flags)) if isinstance(flags, list) else str(flags)) if flags else "none"
            lines.append("")
            lines.append(f"flags: {flag_text}")
            lines.append("")
            lines.append("prompt:")
            lines.append("")
            lines.append(_fence(_clip(sample.get("prompt", "")), "text"))
            lines.append("")
            output = str(sample.get("output", ""))
            if output.strip():
                lines += ["output:", "", _fence(_clip(output), "text")]
            else:
                # blank output is the collapse signature; a code block would show nothing at all
                lines.append(f"output: blank, exactly `{_clip(repr(output))}`")
    return lines


def write_report(run_dir) -> Path:
    """Write ``run_dir/report.md`` and ``run_dir/plots/*.png``; return the report's path."""
    from mathtune import learning_curve

    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir)
    config = read_config(run_dir / CONFIG_FILE)
    comparison = read_comparison(run_dir / COMPARISON_FILE)
    samples = read_samples(run_dir / SAMPLES_FILE)
    settings = config[0] if config else {}
    curves = learning_curve.collect(run_dir, metrics, settings)

    plots_dir = run_dir / PLOTS_DIR
    plots_dir.mkdir(exist_ok=True)
    made = {
        "loss": plot_curve(metrics, "loss", "training loss", plots_dir / PLOT_FILES["loss"]),
        "grad_norm": plot_curve(metrics, "grad_norm", "gradient norm (before clipping)",
                                plots_dir / PLOT_FILES["grad_norm"], log_scale_ratio=100.0),
        # GRPO runs: the curves of what the samples scored (an SFT run logs neither, so draws neither)
        "reward": plot_curve(metrics, "reward", "reward (mean over the samples)", plots_dir / PLOT_FILES["reward"]),
        "pass_rate": plot_curve(metrics, "pass_rate", "pass rate (share of samples correct)",
                                plots_dir / PLOT_FILES["pass_rate"]),
        "accuracy": False,
        "learning_curve": plot_learning_curve(curves, plots_dir / PLOT_FILES["learning_curve"]),
    }
    if comparison is not None:
        plot_accuracy(comparison, plots_dir / PLOT_FILES["accuracy"])
        made["accuracy"] = True
    for name, done in made.items():
        # a plot from an earlier report that this one could not draw would contradict report.md
        if not done:
            (plots_dir / PLOT_FILES[name]).unlink(missing_ok=True)

    lines = [f"# Training report: {run_dir.resolve().name}", ""]
    headline = [f"{key} `{settings[key]}`" for key in ("model", "task", "method") if key in settings]
    if headline:
        lines += [", ".join(headline), ""]
    lines += ["## Training", "", "| | |", "|---|---|"]
    lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in _training_rows(metrics)]
    lines += ["", "## Plots", ""]
    titles = {"loss": "training loss", "grad_norm": "gradient norm", "reward": "GRPO reward",
              "pass_rate": "GRPO pass rate", "accuracy": "base vs trained accuracy"}
    for name, done in made.items():
        if done and name in titles:  # the learning curve goes in its own section
            lines += [f"![{titles[name]}]({PLOTS_DIR}/{PLOT_FILES[name]})", ""]
    if not any(made[name] for name in titles):
        lines += [f"No plots: {METRICS_FILE} has no loss or grad_norm values and there is no {COMPARISON_FILE}.", ""]

    lines += ["## Base vs trained", ""]
    if comparison is not None:
        lines += _comparison_section(comparison)
    else:
        lines.append(f"No `{COMPARISON_FILE}` in this run dir: run `mathtune compare --base-model "
                     f"{settings.get('model', 'BASE')} --trained-model {run_dir} --task {settings.get('task', 'TASK')} "
                     f"--output {run_dir / COMPARISON_FILE}` (or train with --eval-samples N).")
    lines.append("")
    lines += ["## Learning curve", ""] + _learning_curve_section(curves, run_dir, settings, made["learning_curve"])
    if samples:
        lines += ["## Samples", ""] + _samples_section(samples) + [""]

    lines += ["## Resolved config", ""]
    if config is not None:
        lines += [f"From `{CONFIG_FILE}`:", "", _fence(config[1].rstrip("\n"), "yaml")]
    else:
        lines.append(f"No `{CONFIG_FILE}` in this run dir.")
    report = run_dir / REPORT_FILE
    write_text_atomically(report, "\n".join(lines).rstrip("\n") + "\n", hint=REPORT_HINT)
    return report
