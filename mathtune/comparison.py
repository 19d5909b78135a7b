"""Base vs trained on the same items: paired statistics and ``model_comparison.json``.

Both models answer the same questions, so the comparison is paired: per item, base right/wrong
against trained right/wrong. Two numbers come out of that 2x2 table:

  accuracy difference  trained accuracy - base accuracy, with a 95% interval from a paired
                       bootstrap (resample *items*, keep each item's pair together)
  McNemar exact p      only the discordant items carry information about which model is better:
                       b = fixed (base wrong, trained right), c = broken (base right, trained wrong).
                       Under "no difference" each discordant item is a fair coin, so
                       p = P(Binomial(b + c, 1/2) at least as lopsided as observed), two-sided.

Every number in ``model_comparison.json`` is computed from the two per-item logs on disk (not from
in-memory copies), so anyone can recompute it from the JSONL files the JSON names.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from mathtune import distributed
from mathtune.atomic import write_text_atomically
from mathtune.errors import InputError, MathtuneError
from mathtune.run_dir import RunDir

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
# Bootstrap draws are made in blocks of at most this many item indices, so memory stays ~32 MB
# whatever the eval size (10 000 resamples x 1 319 GSM8K test items would be 105 MB at once).
_BOOTSTRAP_BLOCK = 4_000_000
# Per-item log fields compare reads (see the per-item log contract in evaluation.py).
ITEM_FLAGS = ("correct", "strict_correct", "answered")


# ---------------------------------------------------------------------------------------------
# Pure statistics
# ---------------------------------------------------------------------------------------------


def _as_bool_vector(values, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise MathtuneError(f"{name}: expected a flat list of per-item right/wrong flags, got shape {array.shape}")
    if array.dtype != bool and not np.isin(array, (0, 1)).all():
        raise MathtuneError(f"{name}: per-item flags must be true/false (or 0/1)")
    return array.astype(bool)


def paired_bootstrap_ci(
    base_correct,
    trained_correct,
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile interval for ``mean(trained) - mean(base)``, resampling items with replacement.

    Each resample draws n item indices and applies them to both models, so the pairing (an easy
    item is easy for both) is kept; that is what makes the paired interval narrower than two
    independent ones. Deterministic for a given (seed, n, n_resamples).
    """
    base = _as_bool_vector(base_correct, "base_correct")
    trained = _as_bool_vector(trained_correct, "trained_correct")
    if base.shape != trained.shape:
        raise MathtuneError(f"paired bootstrap needs one base and one trained flag per item: got {base.size} and {trained.size}")
    n = base.size
    if n == 0:
        raise MathtuneError("paired bootstrap needs at least one item (the eval set is empty)")
    if not (isinstance(n_resamples, (int, np.integer)) and n_resamples >= 1):
        raise MathtuneError(f"n_resamples must be a positive integer (got {n_resamples!r})")
    if not 0 < level < 1:
        raise MathtuneError(f"level must be in (0, 1), e.g. 0.95 (got {level!r})")

    # per-item difference: +1 fixed, -1 broken, 0 unchanged; a resample's statistic is its mean
    diff = trained.astype(np.int64) - base.astype(np.int64)
    rng = np.random.default_rng(seed)
    sums = np.empty(n_resamples, dtype=np.int64)
    rows_per_block = max(1, _BOOTSTRAP_BLOCK // n)
    for start in range(0, n_resamples, rows_per_block):
        rows = min(rows_per_block, n_resamples - start)
        idx = rng.integers(0, n, size=(rows, n))
        sums[start:start + rows] = diff[idx].sum(axis=1)
    # integer sums / n: identical items give exactly 0.0, not 1e-17
    resampled = sums / n
    alpha = 1.0 - level
    low, high = np.quantile(resampled, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (b = fixed, c = broken).

    p = min(1, 2 * P(X <= min(b, c))), X ~ Binomial(b + c, 1/2); 1.0 when there are no
    discordant items. Computed with integers, so it is exact for any count.
    """
    for name, value in (("b", b), ("c", c)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise MathtuneError(f"mcnemar_exact: {name} must be a non-negative integer count (got {value!r})")
    n = int(b) + int(c)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    # Python's int / int is correctly rounded even when 2**n has thousands of digits
    return min(1.0, 2 * tail / 2**n)


# ---------------------------------------------------------------------------------------------
# Per-item logs
# ---------------------------------------------------------------------------------------------


def _check_item(item, where: str) -> None:
    if not isinstance(item, dict):
        raise MathtuneError(f"{where}: expected a JSON object per item, got {type(item).__name__}")
    if not isinstance(item.get("id"), str) or not item["id"]:
        raise MathtuneError(f"{where}: item has no string 'id' (per-item logs come from mathtune eval)")
    for key in ITEM_FLAGS:
        if not isinstance(item.get(key), bool):
            raise MathtuneError(
                f"{where}: item {item['id']!r} has no true/false {key!r}; re-run the evaluation to rewrite the log"
            )


def load_items(path) -> list[dict]:
    """Read a per-item eval log (JSONL). A malformed line is an error naming ``path:line``."""
    path = Path(path)
    if not path.is_file():
        raise MathtuneError(f"{path}: per-item eval log not found (re-run the evaluation, e.g. with --no-cache)")
    items = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(path, line_no, f"not valid JSON ({exc.msg}); re-run the evaluation with --no-cache") from None
            try:
                _check_item(item, "item")
            except MathtuneError as exc:
                raise InputError(path, line_no, str(exc).removeprefix("item: ")) from None
            items.append(item)
    return items


def _index(items: list[dict], name: str) -> dict[str, dict]:
    by_id: dict[str, dict] = {}
    for position, item in enumerate(items):
        _check_item(item, f"{name} item {position}")
        if item["id"] in by_id:
            raise MathtuneError(f"{name}: item id {item['id']!r} appears twice; the log is corrupt, re-run the evaluation with --no-cache")
        by_id[item["id"]] = item
    return by_id


def _rate(flags: np.ndarray) -> float:
    return float(flags.mean())


def _describe(ids: list[str], limit: int = 5) -> str:
    shown = ", ".join(ids[:limit])
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")


SCORES = ("first", "majority")


def _scored(items: list[dict], score: str, name: str) -> list[dict]:
    """``items`` with ``correct`` replaced by the majority vote's verdict when ``score == "majority"``."""
    if score not in SCORES:
        raise MathtuneError(f"--score {score!r}: choose one of {', '.join(SCORES)}")
    if score == "first":
        return items
    scored = []
    for position, item in enumerate(items):
        if isinstance(item, dict) and "sample_correct" in item:  # k > 1 samples per item
            if not isinstance(item.get("majority_correct"), bool):
                raise MathtuneError(
                    f"{name} item {position}: no true/false 'majority_correct' (the log predates it); "
                    "re-run the evaluation to rewrite the log"
                )
            item = dict(item, correct=item["majority_correct"])
        scored.append(item)
    return scored


def compare_items(
    base_items: list[dict],
    trained_items: list[dict],
    *,
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    base_name: str = "base",
    trained_name: str = "trained",
    score: str = "first",
) -> dict:
    """Pair two per-item logs by id and compute the paired statistics.

    ``score`` picks what "correct" means per item: ``first`` the first (greedy or first sampled)
    output; ``majority`` the most common answer of the item's k samples (maj@k; a log of one sample
    per item scores that sample, since the majority of one is itself).

    Returns ``{"n", "base_metrics", "trained_metrics", "accuracy_difference", "ci95", "bootstrap",
    "mcnemar_p", "fixed", "broken", "both_correct", "both_wrong"}`` where ``*_metrics`` hold
    accuracy, strict_accuracy and answer_rate recomputed from the items. ``base_name`` and
    ``trained_name`` (e.g. the log paths) appear in error messages.
    """
    base = _index(_scored(base_items, score, base_name), base_name)
    trained = _index(_scored(trained_items, score, trained_name), trained_name)
    if base.keys() != trained.keys():
        only_base = [i for i in base if i not in trained]
        only_trained = [i for i in trained if i not in base]
        parts = []
        if only_base:
            parts.append(f"{len(only_base)} only in {base_name} ({_describe(only_base)})")
        if only_trained:
            parts.append(f"{len(only_trained)} only in {trained_name} ({_describe(only_trained)})")
        raise MathtuneError(
            "base and trained were evaluated on different items: " + "; ".join(parts)
            + "; evaluate both with the same --task/--eval-file/--max-samples/--seed"
        )
    if not base:
        raise MathtuneError(f"{base_name}: no items to compare (the per-item log is empty)")
    # Same id but a different question means the items were generated differently (e.g. another
    # --seed for unit-conversion): pairing them would compare unrelated questions.
    for item_id, item in base.items():
        other = trained[item_id]
        if "question" in item and "question" in other and item["question"] != other["question"]:
            raise MathtuneError(
                f"item {item_id!r} has different questions in {base_name} and {trained_name}; "
                "evaluate both with the same --task/--eval-file/--seed"
            )

    ids = list(base)  # base log order; pairing is by id, so trained order does not matter
    flags = {
        side: {key: np.array([items[i][key] for i in ids], dtype=bool) for key in ITEM_FLAGS}
        for side, items in (("base", base), ("trained", trained))
    }
    b_ok, t_ok = flags["base"]["correct"], flags["trained"]["correct"]
    fixed = int((~b_ok & t_ok).sum())
    broken = int((b_ok & ~t_ok).sum())
    low, high = paired_bootstrap_ci(b_ok, t_ok, n_resamples=n_resamples, seed=seed)
    metrics = {
        side: {
            "accuracy": _rate(f["correct"]),
            "strict_accuracy": _rate(f["strict_correct"]),
            "answer_rate": _rate(f["answered"]),
        }
        for side, f in flags.items()
    }
    return {
        "n": len(ids),
        "base_metrics": metrics["base"],
        "trained_metrics": metrics["trained"],
        # (fixed - broken) / n equals mean(trained) - mean(base), without float subtraction noise
        "accuracy_difference": (fixed - broken) / len(ids),
        "ci95": [low, high],
        "bootstrap": {"n_resamples": int(n_resamples), "seed": int(seed)},
        "mcnemar_p": mcnemar_exact(fixed, broken),
        "fixed": fixed,
        "broken": broken,
        "both_correct": int((b_ok & t_ok).sum()),
        "both_wrong": int((~b_ok & ~t_ok).sum()),
    }


# ---------------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------------


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _pp(value) -> str:
    return "-" if value is None else f"{100 * value:+.1f} pp"


def comparison_rows(base: dict, trained: dict) -> list[tuple[str, str, str, str]]:
    """(metric, base, trained, delta) rows from two metric dicts (summaries or ``*_metrics``)."""
    rows = []
    for key, label in (("accuracy", "accuracy"), ("strict_accuracy", "strict accuracy"), ("answer_rate", "answer rate")):
        b, t = base.get(key), trained.get(key)
        delta = t - b if isinstance(b, (int, float)) and isinstance(t, (int, float)) else None
        rows.append((label, _pct(b), _pct(t), _pp(delta)))
    rows.append(("n", str(base.get("n", "-")), str(trained.get("n", "-")), ""))
    return rows


def stats_lines(result: dict) -> list[str]:
    """The paired statistics in words: Δ with its interval, McNemar p, the discordant counts."""
    low, high = result["ci95"]
    return [
        f"Δ accuracy {_pp(result['accuracy_difference'])}, 95% CI [{100 * low:+.1f}, {100 * high:+.1f}] pp "
        f"(paired bootstrap, {result['bootstrap']['n_resamples']} resamples, seed {result['bootstrap']['seed']})",
        f"McNemar exact p = {result['mcnemar_p']:.4g}: fixed {result['fixed']} (base wrong, trained right), "
        f"broken {result['broken']} (base right, trained wrong); both right {result['both_correct']}, "
        f"both wrong {result['both_wrong']}",
    ]


def format_table(result: dict) -> str:
    """Side-by-side text table of a ``model_comparison.json`` dict."""
    header = ("metric", "base", "trained", "Δ")
    rows = [header] + comparison_rows(result["base"], result["trained"])
    widths = [max(len(row[col]) for row in rows) for col in range(4)]
    lines = []
    for number, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [row[col].rjust(widths[col]) for col in range(1, 4)]
        lines.append("  ".join(cells).rstrip())
        if number == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines + [""] + stats_lines(result))


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------


def _same_model(a: str, b: str) -> bool:
    paths = [Path(s).expanduser() for s in (a, b)]
    if all(p.exists() for p in paths):
        return paths[0].resolve() == paths[1].resolve()
    return a == b


def _log_path(summary: dict, which: str, spec: str) -> Path:
    path = summary.get("per_item_path")
    if not path:
        raise MathtuneError(f"evaluation of {which} model {spec} returned no per_item_path; re-run with --no-cache")
    return Path(path)


def _stored_path(log: Path, json_dir: Path) -> str:
    """Log path as written into the JSON: relative to the JSON's folder when inside it (so a run dir
    can be moved), absolute otherwise (so it still resolves from anywhere)."""
    log = log.resolve()
    try:
        return log.relative_to(json_dir.resolve()).as_posix()
    except ValueError:
        return str(log)


def resolve_log(comparison_json, stored: str) -> Path:
    """Where a ``base_log``/``trained_log`` entry of ``comparison_json`` points."""
    path = Path(stored)
    return path if path.is_absolute() else Path(comparison_json).parent / path


def _check_summary(summary: dict, metrics: dict, n: int, log: Path) -> None:
    # The summary is stored as-is next to numbers recomputed from the log; a disagreement means
    # a stale or hand-edited file, and the JSON would contradict itself.
    disagree = [f"n {summary.get('n')} vs {n}"] if summary.get("n") != n else []
    for key, value in metrics.items():
        # accuracy must be there; the other rates are checked when the summary has them
        stated = summary.get(key, math.nan if key == "accuracy" else value)
        if not isinstance(stated, (int, float)) or not math.isclose(stated, value, abs_tol=1e-9):
            disagree.append(f"{key} {stated} vs {value:.6g}")
    if disagree:
        raise MathtuneError(
            f"{log}: its summary disagrees with the per-item log ({', '.join(disagree)}); "
            "the cache is stale, re-run with --no-cache"
        )


def run_compare(
    base_spec: str,
    trained_spec: str,
    config,
    output_path=RunDir.COMPARISON,
    output_dir=None,
    *,
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    quiet: bool = False,
    score: str = "first",
) -> dict:
    """Evaluate both models on the same items, print the table, write ``output_path``; return its dict.

    ``config`` is an ``EvalConfig`` (its ``model`` is replaced by each spec). ``output_dir`` is where
    the per-item logs go (None: ``evaluation.default_output_dir`` of each model; two different
    models with the same tag in the same folder get ``base/`` and ``trained/`` subfolders).
    Evaluation caches generations, so a model evaluated before with the same settings is not
    generated again.
    """
    from mathtune import evaluation  # heavy (torch, transformers): only when actually evaluating
    from mathtune.models.spec import model_tag

    dirs = [Path(output_dir) if output_dir is not None else evaluation.default_output_dir(spec)
            for spec in (base_spec, trained_spec)]
    if (dirs[0].resolve() == dirs[1].resolve() and model_tag(base_spec) == model_tag(trained_spec)
            and not _same_model(base_spec, trained_spec)):
        # two different models with the same short name (org1/x, org2/x) would write, and read
        # back, the same log file
        dirs = [dirs[0] / "base", dirs[1] / "trained"]

    summaries, logs = {}, {}
    for which, spec, out in (("base", base_spec, dirs[0]), ("trained", trained_spec, dirs[1])):
        summary, _items = evaluation.evaluate_model(spec, dataclasses.replace(config, model=spec), out)
        summaries[which] = summary
        logs[which] = _log_path(summary, which, spec)
    if logs["base"].resolve() == logs["trained"].resolve() and not _same_model(base_spec, trained_spec):
        # cannot happen with the directories chosen above; a guard against a changed log naming
        raise MathtuneError(
            f"base {base_spec} and trained {trained_spec} wrote the same per-item log {logs['base']}; "
            "pass --eval-dir DIR so the two logs are kept apart"
        )

    # under a launcher both evaluations ran sharded; rank 0 alone reads the logs it wrote and writes
    # the comparison, and every rank returns its dict
    return distributed.on_main(lambda: _compare_logs(base_spec, trained_spec, config.task, summaries, logs, output_path,
                                                     n_resamples=n_resamples, seed=seed, quiet=quiet, score=score))


def summary_path_of(log) -> Path:
    """The ``.summary.json`` that ``mathtune eval`` writes beside a per-item log ``<tag>-<task>.jsonl``."""
    log = Path(log)
    return log.with_name(log.name.removesuffix(".jsonl") + ".summary.json")


def _read_summary(log: Path, flag: str) -> dict:
    path = summary_path_of(log)
    if not log.is_file():
        raise MathtuneError(f"{flag} {log}: per-item eval log not found (write it with mathtune eval --output DIR)")
    if not path.is_file():
        raise MathtuneError(f"{flag} {log}: no {path.name} beside it; pass a per-item log written by mathtune eval")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(path, exc.lineno, f"not valid JSON ({exc.msg}); re-run the evaluation") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("task"), str):
        raise MathtuneError(f"{path}: not an eval summary (no 'task'); re-run the evaluation")
    return summary


def compare_logs(
    base_log,
    trained_log,
    output_path=RunDir.COMPARISON,
    *,
    score: str = "first",
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    quiet: bool = False,
) -> dict:
    """Paired statistics of two per-item logs already written by ``mathtune eval``.

    This pairs evaluations made with different decoding settings (base greedy vs trained with the
    calculator, or with maj@k sampling under ``score="majority"``), which ``run_compare`` cannot,
    since it evaluates both models with one config.
    """
    logs = {"base": Path(base_log), "trained": Path(trained_log)}
    summaries = {which: _read_summary(log, f"--{which}-log") for which, log in logs.items()}
    if summaries["base"]["task"] != summaries["trained"]["task"]:
        raise MathtuneError(
            f"--base-log is task {summaries['base']['task']!r} but --trained-log is task "
            f"{summaries['trained']['task']!r}: pair evaluations of the same task"
        )
    protocols = {which: summary.get("protocol", "chat") for which, summary in summaries.items()}
    if protocols["base"] != protocols["trained"]:
        # different prompts and scoring rules: the difference would measure the protocol, not training
        raise MathtuneError(f"--base-log was measured with protocol {protocols['base']!r} but --trained-log with "
                            f"{protocols['trained']!r}: pair evaluations made with the same --protocol")
    return _compare_logs(summaries["base"].get("model", str(base_log)), summaries["trained"].get("model", str(trained_log)),
                         summaries["base"]["task"], summaries, logs, output_path,
                         n_resamples=n_resamples, seed=seed, quiet=quiet, score=score)


def _summary_as_scored(summary: dict, score: str) -> dict:
    """The summary as the scored numbers should read: under maj@k its accuracy is ``maj_at_k``."""
    if score == "majority" and summary.get("k", 1) > 1:
        return dict(summary, accuracy=summary.get("maj_at_k"), first_sample_accuracy=summary.get("accuracy"))
    return summary


def _compare_logs(base_spec, trained_spec, task, summaries, logs, output_path, *, n_resamples, seed, quiet,
                  score="first") -> dict:
    """The paired statistics from the two per-item logs on disk; writes ``output_path``."""
    stats = compare_items(
        load_items(logs["base"]), load_items(logs["trained"]),
        n_resamples=n_resamples, seed=seed, base_name=str(logs["base"]), trained_name=str(logs["trained"]),
        score=score,
    )
    summaries = {which: _summary_as_scored(summary, score) for which, summary in summaries.items()}
    for which in ("base", "trained"):
        _check_summary(summaries[which], stats[f"{which}_metrics"], stats["n"], logs[which])

    output_path = Path(output_path)
    result = {
        "task": task,
        "protocol": summaries["base"].get("protocol", "chat"),
        "score": score,
        "n": stats["n"],
        "base": summaries["base"],
        "trained": summaries["trained"],
        **{key: stats[key] for key in ("accuracy_difference", "ci95", "bootstrap", "mcnemar_p",
                                        "fixed", "broken", "both_correct", "both_wrong")},
        "base_log": _stored_path(logs["base"], output_path.parent),
        "trained_log": _stored_path(logs["trained"], output_path.parent),
    }
    output_path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(output_path, json.dumps(result, indent=2) + "\n")
    if not quiet:
        scored = "" if score == "first" else f", scored by {score} vote"
        from mathtune.evaluation import protocol_description

        print(f"base    {base_spec}\ntrained {trained_spec}\ntask    {task}, {stats['n']} items{scored}\n"
              f"protocol {protocol_description(result['protocol'])}\n")
        print(format_table(result))
        print(f"\nwrote {output_path}")
    return result
