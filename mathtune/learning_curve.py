"""The learning curve of a run: dev accuracy of its checkpoints against training minutes.

Reads what ``mathtune eval`` already wrote under ``<run>/eval/`` (any depth): every
``*.summary.json`` whose model is this run dir, one of its ``checkpoint-N`` dirs, or the base model
named in the run's ``mathtune_config.yaml``. Training time comes from ``metrics.jsonl``'s
``seconds`` (wall seconds since training started, a resumed run continuing the count: see
``training.callbacks.StepCallback.on_log``), so the x axis is what a checkpoint cost to reach.

Only comparable points share a line (a ``CurveGroup``): the same task, the same items
(``items_sha``), the same protocol, calculator, ``max_new_tokens`` and precision (bf16 and fp32
weights give different greedy outputs), greedy decoding (temperature 0, one sample). Every summary that is not on a line is listed with the reason, so a moved run dir or
a sampled eval is visible rather than silently missing.

report.py draws and prints what this module collects; nothing here writes files.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from mathtune.errors import InputError
from mathtune.run_dir import RunDir

SUMMARY_SUFFIX = ".summary.json"  # evaluation.log_paths
# what a point needs from an eval summary (evaluation.evaluate_model writes all of these)
SUMMARY_KEYS = ("model", "task", "items_sha", "n", "accuracy", "answer_rate", "generation")
GENERATION_KEYS = ("temperature", "num_samples", "calculator")


@dataclass(frozen=True)
class CurveKey:
    """What two evals must share to be points of one line."""

    task: str
    items_sha: str
    protocol: str
    calculator: bool
    max_new_tokens: int | None
    precision: str | None  # the weights' dtype the eval ran in (fp32, bf16, fp16); None: not recorded


@dataclass(frozen=True)
class CurvePoint:
    step: int | None  # 0 for the base model; None: the final model of a run with no logged step
    role: str  # "base", "checkpoint" or "final"
    seconds: float | None  # training seconds to reach these weights; None when metrics.jsonl cannot say
    logged_step: int | None  # the metrics.jsonl step whose ``seconds`` was taken
    accuracy: float
    answer_rate: float
    n: int
    summary: Path
    mtime_ns: int

    @property
    def minutes(self) -> float | None:
        return self.seconds / 60 if self.seconds is not None else None

    @property
    def mark(self) -> str:
        """The point's name on the plot."""
        if self.role == "base":
            return "base"
        return f"{self.step} final" if self.role == "final" else str(self.step)


@dataclass
class CurveGroup:
    key: CurveKey
    n: int
    points: list[CurvePoint] = field(default_factory=list)  # one per step, step order
    left_out: list[tuple[CurvePoint, str]] = field(default_factory=list)  # duplicates of a drawn step

    @property
    def drawn(self) -> list[CurvePoint]:
        """Points with a known training time: the ones a plot can place."""
        return [p for p in self.points if p.seconds is not None]


@dataclass
class LearningCurves:
    groups: list[CurveGroup]
    ignored: list[tuple[Path, str]]  # summaries under eval/ that are on no line, and why

    @property
    def drawable(self) -> list[CurveGroup]:
        return [g for g in self.groups if len(g.drawn) >= 2]


def read_eval_summary(path: Path) -> dict:
    """One eval summary; a file that is not one is an error naming it (as a bad metrics line is)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(path, exc.lineno, f"not valid JSON ({exc.msg}); re-run mathtune eval to rewrite it, "
                                           f"or delete it") from None
    if not isinstance(data, dict):
        raise InputError(path, None, f"expected a JSON object (a mathtune eval summary), got "
                                     f"{type(data).__name__}; re-run mathtune eval or delete it")
    missing = [key for key in SUMMARY_KEYS if key not in data]
    generation = data.get("generation")
    if not missing and isinstance(generation, dict):
        missing = [f"generation.{key}" for key in GENERATION_KEYS if key not in generation]
    elif not missing:
        missing = ["generation (an object)"]
    if missing:
        raise InputError(path, None, f"not a mathtune eval summary: missing {', '.join(missing)}; "
                                     f"re-run mathtune eval to rewrite it, or delete it")
    for key in ("accuracy", "answer_rate"):
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise InputError(path, None, f"'{key}' must be a fraction in [0, 1], got {value!r}; re-run mathtune eval")
    if isinstance(data["n"], bool) or not isinstance(data["n"], int) or data["n"] < 1:
        raise InputError(path, None, f"'n' must be a positive item count, got {data['n']!r}; re-run mathtune eval")
    return data


def training_seconds_at(metrics: list[dict], step: int) -> tuple[float | None, int | None]:
    """(seconds, logged step) at ``step``: the exact step when it was logged, else the nearest logged
    step before it (logging_steps need not divide save_steps); (None, None) when none was."""
    best = None
    for row in metrics:  # sorted by step (report.read_metrics)
        seconds = row.get("seconds")
        if row["step"] > step:
            break
        if seconds is not None and math.isfinite(seconds):
            best = (seconds, row["step"])
    return best if best is not None else (None, None)


def _model_dir(summary: dict) -> Path | None:
    """The dir a summary's model is: its recorded ``model_dir``, else its spec resolved from the
    working dir (summaries written before ``model_dir`` existed); None for aliases and hub ids."""
    from mathtune.models.spec import ALIASES

    if summary.get("model_dir"):
        return Path(summary["model_dir"])
    spec = str(summary["model"]).strip()
    if spec.lower() in ALIASES:
        return None
    path = Path(spec).expanduser()
    return path.resolve() if path.exists() else None


def _base_names(settings: dict) -> tuple[set[str], Path | None]:
    """The base model's spec strings (as typed, and lower-cased for aliases) and its dir, from the
    run's config (``model`` and the ``base_model`` record training wrote)."""
    record = settings.get("base_model") if isinstance(settings.get("base_model"), dict) else {}
    specs = {str(s).strip() for s in (settings.get("model"), record.get("spec")) if s}
    specs |= {s.lower() for s in specs}
    base_dir = record.get("dir") if record.get("kind") in ("local-dir", "adapter") else None
    return specs, Path(base_dir).resolve() if base_dir else None


def _is_base(summary: dict, model_dir: Path | None, base_specs: set[str], base_dir: Path | None) -> bool:
    # a local dir is matched by its resolved path (a relative spec string means nothing elsewhere);
    # an alias or hub id by its name
    if model_dir is not None and base_dir is not None:
        return model_dir == base_dir
    spec = str(summary["model"]).strip()
    return spec in base_specs or spec.lower() in base_specs


def _key(summary: dict) -> CurveKey:
    generation = summary["generation"]
    return CurveKey(task=str(summary["task"]), items_sha=str(summary["items_sha"]),
                    protocol=str(summary.get("protocol", "chat")),  # summaries before protocols: chat
                    calculator=bool(generation["calculator"]), max_new_tokens=generation.get("max_new_tokens"),
                    precision=summary.get("precision"))  # evaluation.evaluate_model records it


def collect(run_dir, metrics: list[dict], settings: dict) -> LearningCurves:
    """The run's eval summaries as learning-curve groups (see the module docstring)."""
    run = RunDir(Path(run_dir).resolve())
    base_specs, base_dir = _base_names(settings)
    final_step = metrics[-1]["step"] if metrics else None
    final_seconds = training_seconds_at(metrics, final_step) if final_step is not None else (None, None)

    groups: dict[CurveKey, CurveGroup] = {}
    base_points: list[tuple[CurveKey, CurvePoint]] = []
    ignored: list[tuple[Path, str]] = []
    paths = sorted(run.eval_dir.rglob(f"*{SUMMARY_SUFFIX}")) if run.eval_dir.is_dir() else []
    for path in paths:
        summary = read_eval_summary(path)
        generation = summary["generation"]
        model_dir = _model_dir(summary)
        if model_dir == run.root:
            role, step, (seconds, logged) = "final", final_step, final_seconds
        elif model_dir is not None and model_dir.parent == run.root and RunDir.checkpoint_step(model_dir) is not None:
            role, step = "checkpoint", RunDir.checkpoint_step(model_dir)
            seconds, logged = training_seconds_at(metrics, step)
        elif _is_base(summary, model_dir, base_specs, base_dir):
            role, step, seconds, logged = "base", 0, 0.0, None
        else:
            where = f" (dir {model_dir})" if model_dir is not None else ""
            ignored.append((path, f"model `{summary['model']}`{where} is neither this run, one of its checkpoints "
                                  f"nor its base model"))
            continue
        if generation["temperature"] != 0 or generation["num_samples"] != 1:
            ignored.append((path, f"sampled (temperature {generation['temperature']}, "
                                  f"{generation['num_samples']} samples): the curve takes greedy evals only"))
            continue
        point = CurvePoint(step=step, role=role, seconds=seconds, logged_step=logged,
                           accuracy=float(summary["accuracy"]), answer_rate=float(summary["answer_rate"]),
                           n=summary["n"], summary=path, mtime_ns=path.stat().st_mtime_ns)
        key = _key(summary)
        if role == "base":
            base_points.append((key, point))  # joins a line only where the run itself was evaluated
            continue
        groups.setdefault(key, CurveGroup(key=key, n=point.n)).points.append(point)
    for key, point in base_points:
        if key in groups:
            groups[key].points.append(point)
        else:
            ignored.append((point.summary, "base model eval with no eval of this run on the same items and settings"))

    for group in groups.values():
        # one point per step: the final model and its last checkpoint, or the same checkpoint
        # evaluated twice (e.g. into eval/ and eval/curve/); the newest summary is kept
        by_step: dict[int | None, list[CurvePoint]] = {}
        for point in group.points:
            by_step.setdefault(point.step, []).append(point)
        group.points = []
        for step, same in by_step.items():
            same.sort(key=lambda p: (p.mtime_ns, p.role == "final"), reverse=True)
            group.points.append(same[0])
            kept = same[0].summary.relative_to(run.root)
            group.left_out += [(p, f"step {step} again; the newer `{kept}` is the one drawn") for p in same[1:]]
        group.points.sort(key=lambda p: (p.step is None, p.step or 0))
    ordered = sorted(groups.values(), key=lambda g: (-len(g.points), g.key.task, g.n))
    return LearningCurves(groups=ordered, ignored=ignored)


def group_label(group: CurveGroup, groups: list[CurveGroup]) -> str:
    """A line's legend: task, items and calculator, plus what else tells it from the other lines."""
    key = group.key
    label = f"{key.task}, {group.n} items, calculator {'on' if key.calculator else 'off'}"
    if key.protocol != "chat":
        label += f", protocol {key.protocol}"
    if len({g.key.max_new_tokens for g in groups}) > 1:
        label += f", max {key.max_new_tokens} new tokens"
    if len({g.key.precision for g in groups}) > 1:
        label += f", {key.precision or 'precision not recorded'}"
    if len({(g.key.task, g.n, g.key.calculator, g.key.protocol, g.key.max_new_tokens, g.key.precision)
            for g in groups}) < len(groups):
        label += f", items {key.items_sha[:8]}"  # same size, different items: the hash tells them apart
    return label
