"""Paired statistics (McNemar exact, paired bootstrap), pairing by id, model_comparison.json."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from mathtune import comparison
from mathtune.comparison import (
    compare_items,
    load_items,
    mcnemar_exact,
    paired_bootstrap_ci,
    resolve_log,
    run_compare,
)
from mathtune.config import EvalConfig
from mathtune.errors import InputError, MathtuneError


# --- McNemar exact -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "b, c, expected",
    [
        (0, 0, 1.0),  # no discordant pairs: no evidence either way
        (10, 0, 2 * 0.5**10),
        (0, 10, 2 * 0.5**10),
        (1, 0, 1.0),  # 2 * 0.5 = 1
        (5, 5, 1.0),  # balanced: clipped to 1
        (6, 1, 2 * (1 + 7) / 2**7),  # 2 * P(X <= 1), X ~ Bin(7, 1/2) = 0.125
        (12, 3, 2 * sum(math.comb(15, k) for k in range(4)) / 2**15),  # 0.03515625
        (30, 10, 0.0022214),  # published value: scipy.stats.binomtest(10, 40).pvalue
    ],
)
def test_mcnemar_exact_known_values(b, c, expected):
    assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("b, c", [(3, 9), (0, 4), (17, 2), (100, 130)])
def test_mcnemar_exact_is_symmetric_and_a_probability(b, c):
    p = mcnemar_exact(b, c)
    assert p == mcnemar_exact(c, b)
    assert 0 < p <= 1


def test_mcnemar_exact_large_counts_do_not_overflow():
    # 2**2000 is far beyond float range; integer arithmetic keeps it exact
    assert mcnemar_exact(1000, 1000) == 1.0
    assert 0 < mcnemar_exact(1100, 900) < 1e-4


@pytest.mark.parametrize("b, c", [(-1, 2), (1.5, 2), (True, 2)])
def test_mcnemar_exact_rejects_non_counts(b, c):
    with pytest.raises(MathtuneError, match="non-negative integer"):
        mcnemar_exact(b, c)


# --- paired bootstrap --------------------------------------------------------------------------


def _pairs(n, p_base, p_trained, seed):
    rng = np.random.default_rng(seed)
    return rng.random(n) < p_base, rng.random(n) < p_trained


def test_bootstrap_ci_contains_point_difference_and_is_ordered():
    base, trained = _pairs(200, 0.3, 0.5, seed=1)
    low, high = paired_bootstrap_ci(base, trained, n_resamples=2000)
    point = trained.mean() - base.mean()
    assert low < point < high
    assert -1 <= low < high <= 1


def test_bootstrap_ci_shrinks_with_more_items():
    widths = []
    for n in (50, 500, 5000):
        base, trained = _pairs(n, 0.3, 0.5, seed=2)
        low, high = paired_bootstrap_ci(base, trained, n_resamples=2000)
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2]
    # the width scales like 1/sqrt(n): 10x the items, about a third of the width
    assert widths[1] / widths[0] == pytest.approx(1 / math.sqrt(10), rel=0.3)


def test_bootstrap_ci_is_deterministic_per_seed():
    base, trained = _pairs(100, 0.4, 0.6, seed=3)
    first = paired_bootstrap_ci(base, trained, n_resamples=1000, seed=7)
    assert paired_bootstrap_ci(base, trained, n_resamples=1000, seed=7) == first
    assert paired_bootstrap_ci(base, trained, n_resamples=1000, seed=8) != first


@pytest.mark.parametrize(
    "base, trained",
    [
        ([True] * 20, [True] * 20),
        ([False] * 20, [False] * 20),
        ([True, False, True, False], [True, False, True, False]),  # identical answers: no difference
    ],
)
def test_bootstrap_ci_is_zero_when_every_pair_agrees(base, trained):
    assert paired_bootstrap_ci(base, trained, n_resamples=500) == (0.0, 0.0)


def test_bootstrap_ci_all_fixed_is_exactly_one():
    assert paired_bootstrap_ci([False] * 10, [True] * 10, n_resamples=100) == (1.0, 1.0)


def test_bootstrap_ci_is_paired_narrower_than_unpaired():
    # trained = base plus a few fixes: the paired interval sees only the fixes
    rng = np.random.default_rng(4)
    base = rng.random(400) < 0.5
    trained = base.copy()
    trained[np.flatnonzero(~base)[:20]] = True
    low, high = paired_bootstrap_ci(base, trained, n_resamples=2000)
    p1, p2 = base.mean(), trained.mean()
    unpaired_half_width = 1.96 * math.sqrt(p1 * (1 - p1) / 400 + p2 * (1 - p2) / 400)
    assert (high - low) / 2 < unpaired_half_width / 2
    assert low > 0  # 20 fixes, 0 broken: clearly better


def test_bootstrap_ci_level_widens_interval():
    base, trained = _pairs(300, 0.4, 0.5, seed=5)
    lo90, hi90 = paired_bootstrap_ci(base, trained, n_resamples=2000, level=0.90)
    lo99, hi99 = paired_bootstrap_ci(base, trained, n_resamples=2000, level=0.99)
    assert lo99 < lo90 and hi99 > hi90


def test_bootstrap_block_size_does_not_change_the_distribution(monkeypatch):
    # blocks keep memory bounded; with a tiny block the interval must stay about the same
    base, trained = _pairs(100, 0.3, 0.6, seed=6)
    whole = paired_bootstrap_ci(base, trained, n_resamples=4000)
    monkeypatch.setattr(comparison, "_BOOTSTRAP_BLOCK", 350)
    blocked = paired_bootstrap_ci(base, trained, n_resamples=4000)
    assert blocked == pytest.approx(whole, abs=0.03)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"base_correct": [], "trained_correct": []}, "at least one item"),
        ({"base_correct": [True], "trained_correct": [True, False]}, "one base and one trained"),
        ({"base_correct": [True], "trained_correct": [False], "level": 1.0}, "level"),
        ({"base_correct": [True], "trained_correct": [False], "n_resamples": 0}, "n_resamples"),
        ({"base_correct": [2, 0], "trained_correct": [1, 0]}, "true/false"),
    ],
)
def test_bootstrap_rejects_bad_inputs(kwargs, message):
    with pytest.raises(MathtuneError, match=message):
        paired_bootstrap_ci(**kwargs)


def _coverage(level: float, trials: int = 400, n: int = 200, resamples: int = 1000) -> float:
    """How often the paired interval covers the true accuracy difference, over seeded eval sets.

    Per item (base, trained) is drawn from a fixed 2x2 table: both right 0.30, only base 0.10, only
    trained 0.20, neither 0.40: base accuracy 0.40, trained 0.50, true difference +0.10 exactly.
    """
    rng = np.random.default_rng(1234)
    outcomes = np.array([[1, 1], [1, 0], [0, 1], [0, 0]], dtype=bool)
    true_difference = (0.30 + 0.20) - (0.30 + 0.10)
    covered = 0
    for trial in range(trials):
        pairs = outcomes[rng.choice(4, size=n, p=[0.30, 0.10, 0.20, 0.40])]
        low, high = paired_bootstrap_ci(pairs[:, 0], pairs[:, 1], n_resamples=resamples, seed=trial, level=level)
        covered += low <= true_difference <= high
    return covered / trials


def test_bootstrap_95_interval_covers_the_true_difference_95_percent_of_the_time():
    # 400 trials: the binomial standard error of a 95% coverage is sqrt(.95 x .05 / 400) = 1.1 points
    assert 0.93 <= _coverage(0.95) <= 0.97
    # and the check can tell levels apart: a 90% interval misses it about twice as often
    assert _coverage(0.90) < 0.93


# --- pairing items -----------------------------------------------------------------------------


def item(item_id, correct, strict=None, answered=True, question=None):
    return {
        "id": item_id,
        "question": question or f"question {item_id}",
        "gold": 1.0,
        "output": "#### 1" if correct else "no idea",
        "outputs": ["#### 1" if correct else "no idea"],
        "extracted": 1.0 if answered else None,
        "method": "####" if answered else "none",
        "strict_extracted": 1.0 if correct else None,
        "correct": correct,
        "strict_correct": correct if strict is None else strict,
        "answered": answered,
        "output_tokens": 3,
    }


def test_compare_items_counts_the_two_by_two_table():
    base = [item("a", True), item("b", True), item("c", False), item("d", False), item("e", False)]
    # trained log in another order: pairing is by id
    trained = [item("e", True), item("d", False), item("c", True), item("b", False), item("a", True)]
    result = compare_items(base, trained, n_resamples=500)
    assert (result["fixed"], result["broken"], result["both_correct"], result["both_wrong"]) == (2, 1, 1, 1)
    assert result["n"] == 5
    assert result["accuracy_difference"] == pytest.approx(0.6 - 0.4)
    assert result["base_metrics"]["accuracy"] == pytest.approx(0.4)
    assert result["trained_metrics"]["accuracy"] == pytest.approx(0.6)
    assert result["mcnemar_p"] == mcnemar_exact(2, 1)
    assert result["bootstrap"] == {"n_resamples": 500, "seed": 0}


def test_compare_items_names_the_ids_that_differ():
    base = [item("a", True), item("b", True), item("only-base", True)]
    trained = [item("a", True), item("b", False), item("only-trained", True)]
    with pytest.raises(MathtuneError, match=r"only in base \(only-base\).*only in trained \(only-trained\)"):
        compare_items(base, trained)


def test_compare_items_refuses_same_id_different_question():
    base = [item("a", True, question="2+2?")]
    trained = [item("a", True, question="3+3?")]
    with pytest.raises(MathtuneError, match="'a' has different questions"):
        compare_items(base, trained)


def test_compare_items_refuses_duplicate_ids_and_missing_flags():
    with pytest.raises(MathtuneError, match="appears twice"):
        compare_items([item("a", True), item("a", False)], [item("a", True)])
    broken = item("a", True)
    del broken["strict_correct"]
    with pytest.raises(MathtuneError, match="strict_correct"):
        compare_items([broken], [item("a", True)])


def test_load_items_reports_file_and_line(tmp_path):
    log = tmp_path / "m-task.jsonl"
    log.write_text(json.dumps(item("a", True)) + "\n{not json\n")
    with pytest.raises(InputError, match=r"m-task\.jsonl:2: not valid JSON"):
        load_items(log)
    log.write_text(json.dumps(item("a", True)) + "\n" + json.dumps({"id": "b", "correct": "yes"}) + "\n")
    with pytest.raises(InputError, match=r"m-task\.jsonl:2: .*'correct'"):
        load_items(log)
    with pytest.raises(MathtuneError, match="not found"):
        load_items(tmp_path / "missing.jsonl")


# --- run_compare with a fake evaluation --------------------------------------------------------


def patch_evaluate(monkeypatch, fake):
    """Route run_compare's evaluation.evaluate_model to ``fake``."""
    from mathtune import evaluation

    monkeypatch.setattr(evaluation, "evaluate_model", fake)


def _write_log(directory: Path, tag: str, task: str, items: list[dict], spec: str) -> tuple[dict, list[dict]]:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{tag}-{task}.jsonl"
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    n = len(items)
    summary = {
        "model": spec,
        "model_tag": tag,
        "task": task,
        "judge_rule": "exact",
        "n": n,
        "accuracy": sum(i["correct"] for i in items) / n,
        "strict_accuracy": sum(i["strict_correct"] for i in items) / n,
        "answer_rate": sum(i["answered"] for i in items) / n,
        "per_item_path": str(path),
    }
    (directory / f"{tag}-{task}.summary.json").write_text(json.dumps(summary))
    return summary, items


def _synthetic(seed: int, n: int = 60):
    rng = np.random.default_rng(seed)
    base_ok = rng.random(n) < 0.35
    trained_ok = np.where(rng.random(n) < 0.3, ~base_ok, base_ok) | (rng.random(n) < 0.2)
    answered = rng.random(n) < 0.9
    base = [item(f"q{i}", bool(b), strict=bool(b and i % 3), answered=bool(b or a)) for i, (b, a) in enumerate(zip(base_ok, answered))]
    trained = [item(f"q{i}", bool(t), strict=bool(t and i % 2), answered=True) for i, t in enumerate(trained_ok)]
    return base, trained


@pytest.fixture
def fake_evaluate(monkeypatch, tmp_path):
    """Replace evaluation.evaluate_model with one that writes synthetic per-item logs."""
    base_items, trained_items = _synthetic(seed=11)
    calls = []

    def evaluate_model(spec, config, output_dir):
        calls.append((spec, config.model, output_dir))
        items = base_items if spec == "base-model" else trained_items
        return _write_log(Path(output_dir), spec, config.task, items, spec)

    patch_evaluate(monkeypatch, evaluate_model)
    return calls


def test_run_compare_json_equals_recomputation_from_the_logs(fake_evaluate, tmp_path, capsys):
    config = EvalConfig.from_flat(task="gsm8k", max_samples=60).validate()
    out = tmp_path / "run" / "model_comparison.json"
    returned = run_compare("base-model", "trained-model", config, output_path=out, output_dir=tmp_path / "run" / "eval")

    data = json.loads(out.read_text())
    assert data == returned
    assert [c[:2] for c in fake_evaluate] == [("base-model", "base-model"), ("trained-model", "trained-model")]
    # logs inside the JSON's folder are stored relative to it (a run dir can be moved)
    assert data["base_log"] == "eval/base-model-gsm8k.jsonl"

    # recompute everything from the JSONL files the JSON names, without mathtune's helpers
    def read(key):
        lines = resolve_log(out, data[key]).read_text().splitlines()
        return {row["id"]: row for row in map(json.loads, lines)}

    base, trained = read("base_log"), read("trained_log")
    assert base.keys() == trained.keys()
    b = np.array([base[i]["correct"] for i in base])
    t = np.array([trained[i]["correct"] for i in base])
    assert data["n"] == len(base) == 60
    assert data["task"] == "gsm8k"
    assert data["fixed"] == int((~b & t).sum())
    assert data["broken"] == int((b & ~t).sum())
    assert data["both_correct"] == int((b & t).sum())
    assert data["both_wrong"] == int((~b & ~t).sum())
    assert data["fixed"] + data["broken"] + data["both_correct"] + data["both_wrong"] == 60
    assert data["accuracy_difference"] == pytest.approx(t.mean() - b.mean(), abs=1e-12)
    assert data["base"]["accuracy"] == pytest.approx(b.mean())
    assert data["trained"]["accuracy"] == pytest.approx(t.mean())
    low, high = data["ci95"]
    assert low <= data["accuracy_difference"] <= high
    assert data["bootstrap"] == {"n_resamples": 10000, "seed": 0}
    assert [low, high] == list(paired_bootstrap_ci(b, t, n_resamples=10000, seed=0))
    k, n_disc = min(data["fixed"], data["broken"]), data["fixed"] + data["broken"]
    expected_p = min(1.0, 2 * sum(math.comb(n_disc, i) for i in range(k + 1)) / 2**n_disc)
    assert data["mcnemar_p"] == pytest.approx(expected_p, rel=1e-12)

    printed = capsys.readouterr().out
    for label in ("accuracy", "strict accuracy", "answer rate", "McNemar exact p", "95% CI"):
        assert label in printed
    assert f"{100 * b.mean():.1f}%" in printed and f"{100 * t.mean():.1f}%" in printed
    assert f"fixed {data['fixed']}" in printed


def test_run_compare_refuses_a_stale_summary(monkeypatch, tmp_path):
    base_items, trained_items = _synthetic(seed=12, n=10)

    def evaluate_model(spec, config, output_dir):
        summary, items = _write_log(Path(output_dir), spec, config.task, base_items if spec == "a" else trained_items, spec)
        if spec == "b":
            summary["accuracy"] = 0.999  # a summary that no longer matches its log
        return summary, items

    patch_evaluate(monkeypatch, evaluate_model)
    with pytest.raises(MathtuneError, match="summary disagrees.*--no-cache"):
        run_compare("a", "b", EvalConfig.from_flat(task="gsm8k").validate(), tmp_path / "c.json", tmp_path / "eval")
    assert not (tmp_path / "c.json").exists()


@pytest.mark.parametrize("explicit_dir", [True, False])
def test_run_compare_keeps_same_named_models_apart(monkeypatch, tmp_path, explicit_dir):
    """Two different hub models org1/m and org2/m share the tag 'm' and the default ./eval folder."""
    from mathtune import evaluation

    monkeypatch.setattr(evaluation, "default_output_dir", lambda spec: tmp_path / "eval")
    base_items, trained_items = _synthetic(seed=13, n=10)
    seen_dirs = []

    def evaluate_model(spec, config, output_dir):
        seen_dirs.append(Path(output_dir))
        return _write_log(Path(output_dir), "m", config.task, base_items if spec == "org1/m" else trained_items, spec)

    patch_evaluate(monkeypatch, evaluate_model)
    result = run_compare("org1/m", "org2/m", EvalConfig.from_flat(task="gsm8k").validate(), tmp_path / "c.json",
                         tmp_path / "eval" if explicit_dir else None, quiet=True)
    assert seen_dirs == [tmp_path / "eval" / "base", tmp_path / "eval" / "trained"]
    assert result["base_log"] == "eval/base/m-gsm8k.jsonl"
    assert result["trained_log"] == "eval/trained/m-gsm8k.jsonl"
    assert result["fixed"] + result["broken"] > 0  # really two different logs, not one read twice


def test_run_compare_default_dirs_are_evaluations(monkeypatch, tmp_path):
    """Without output_dir each model's log goes where ``mathtune eval`` would put it."""
    from mathtune import evaluation

    dirs = {"a": tmp_path / "a-run" / "eval", "b": tmp_path / "b-run" / "eval"}
    monkeypatch.setattr(evaluation, "default_output_dir", lambda spec: dirs[spec])
    base_items, trained_items = _synthetic(seed=14, n=10)
    seen = []

    def evaluate_model(spec, config, output_dir):
        seen.append(Path(output_dir))
        return _write_log(Path(output_dir), spec, config.task, base_items if spec == "a" else trained_items, spec)

    patch_evaluate(monkeypatch, evaluate_model)
    out = tmp_path / "b-run" / "model_comparison.json"
    result = run_compare("a", "b", EvalConfig.from_flat(task="gsm8k").validate(), out, quiet=True)
    assert seen == [dirs["a"], dirs["b"]]
    assert result["trained_log"] == "eval/b-gsm8k.jsonl"  # inside the JSON's folder: relative
    assert Path(result["base_log"]).is_absolute()  # outside it: absolute, still resolvable
    assert resolve_log(out, result["base_log"]).is_file()


# --- the real CLI on a tiny model --------------------------------------------------------------


def test_cli_compare_tiny_model_against_itself(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from mathtune.cli import main

    # a private generation cache: the first evaluation generates, the second must reuse it
    monkeypatch.setenv("MATHTUNE_CACHE", str(tmp_path / "cache"))

    out = tmp_path / "cmp.json"
    argv = ["compare", "--base-model", str(tiny_model_dir), "--trained-model", str(tiny_model_dir),
            "--task", "unit-conversion", "--max-samples", "4", "--max-new-tokens", "8",
            "--output", str(out), "--eval-dir", str(tmp_path / "eval"), "--device", "cpu"]
    assert main(argv) == 0
    data = json.loads(out.read_text())
    assert data["n"] == 4
    assert data["task"] == "unit-conversion"
    # a model against itself: every pair agrees
    assert data["fixed"] == data["broken"] == 0
    assert data["accuracy_difference"] == 0.0
    assert data["ci95"] == [0.0, 0.0]
    assert data["mcnemar_p"] == 1.0
    assert data["base"]["accuracy"] == data["trained"]["accuracy"]
    assert data["both_correct"] + data["both_wrong"] == 4
    assert len(load_items(resolve_log(out, data["trained_log"]))) == 4
    assert data["base"]["cached"] is False and data["trained"]["cached"] is True  # not generated twice
    assert "McNemar" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    ["--base-model", "smollm2-135m"],
    ["--base-model", "smollm2-135m", "--trained-log", "t.jsonl"],
    ["--base-log", "b.jsonl"],
])
def test_cli_compare_requires_two_models_or_two_logs(argv, capsys):
    from mathtune.cli import main

    assert main(["compare", *argv, "--task", "unit-conversion"]) == 2
    err = capsys.readouterr().err
    assert "--trained-model" in err and "--base-log and --trained-log" in err and err.count("\n") == 1


# --- compare --base-log/--trained-log: evaluations made with different settings ----------------


def sampled(item_id, first, majority, k=4):
    """An item of a k-sample evaluation whose first sample is ``first`` and majority vote ``majority``."""
    row = item(item_id, first)
    row["outputs"] = row["outputs"] * k
    row["sample_correct"] = [first] + [majority] * (k - 1)
    row["majority_correct"] = majority
    return row


def _sampled_summary(directory, tag, items, k=4):
    summary, _ = _write_log(directory, tag, "gsm8k", items, tag)
    summary.update(k=k, maj_at_k=sum(i["majority_correct"] for i in items) / len(items))
    (directory / f"{tag}-gsm8k.summary.json").write_text(json.dumps(summary))


def test_compare_logs_pairs_two_eval_logs_by_first_or_majority(tmp_path, capsys):
    from mathtune.cli import main

    base = [item("a", False), item("b", True), item("c", False), item("d", False)]
    _write_log(tmp_path / "base", "base", "gsm8k", base, "base")
    # first samples: a right; majorities: a, c, d right, b wrong
    trained = [sampled("a", True, True), sampled("b", True, False), sampled("c", False, True), sampled("d", False, True)]
    _sampled_summary(tmp_path / "maj", "trained", trained)
    out = tmp_path / "cmp.json"
    argv = ["compare", "--base-log", str(tmp_path / "base" / "base-gsm8k.jsonl"),
            "--trained-log", str(tmp_path / "maj" / "trained-gsm8k.jsonl"), "--output", str(out)]

    assert main(argv) == 0
    first = json.loads(out.read_text())
    assert (first["score"], first["fixed"], first["broken"]) == ("first", 1, 0)
    assert first["trained"]["accuracy"] == 0.5

    assert main(argv + ["--score", "majority"]) == 0
    majority = json.loads(out.read_text())
    assert (majority["score"], majority["fixed"], majority["broken"]) == ("majority", 3, 1)
    assert majority["trained"]["accuracy"] == 0.75 and majority["trained"]["first_sample_accuracy"] == 0.5
    # the greedy base has one sample per item: its majority is that sample
    assert majority["base"]["accuracy"] == 0.25
    assert "scored by majority vote" in capsys.readouterr().out


def test_compare_logs_errors_name_the_file(tmp_path, capsys):
    from mathtune.cli import main

    _write_log(tmp_path / "a", "m", "gsm8k", [item("a", True)], "m")
    _write_log(tmp_path / "b", "m", "unit-conversion", [item("a", True)], "m")
    log_a = str(tmp_path / "a" / "m-gsm8k.jsonl")
    cases = [
        ([log_a, str(tmp_path / "b" / "m-unit-conversion.jsonl")], "pair evaluations of the same task"),
        ([log_a, str(tmp_path / "missing.jsonl")], "missing.jsonl: per-item eval log not found"),
    ]
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "bare.jsonl").write_text(json.dumps(item("a", True)) + "\n")
    cases.append(([log_a, str(tmp_path / "c" / "bare.jsonl")], "no bare.summary.json beside it"))
    for (base, trained), message in cases:
        # what the logs hold is a failed run (1), not a usage error (2)
        assert main(["compare", "--base-log", base, "--trained-log", trained, "--output", str(tmp_path / "o.json")]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    # evaluation flags would change nothing: refused, not ignored
    assert main(["compare", "--base-log", log_a, "--trained-log", log_a, "--calculator", "--max-samples", "5",
                 "--output", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err
    assert "--max-samples, --calculator: with --base-log/--trained-log nothing is evaluated" in err
    assert not (tmp_path / "o.json").exists()


def test_majority_score_refuses_a_sampled_log_without_majority_verdicts():
    old = sampled("a", True, True)
    del old["majority_correct"]
    with pytest.raises(MathtuneError, match="'majority_correct'.*re-run the evaluation"):
        compare_items([item("a", True)], [old], score="majority")


def test_cli_compare_reports_bad_flags_in_one_line(capsys):
    from mathtune.cli import main

    code = main(["compare", "--base-model", "a", "--trained-model", "b", "--task", "unit-conversion",
                 "--max-samples", "0", "--temperature", "-1"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 2 problems") and "--max-samples" in err and "--temperature" in err
    assert err.count("\n") == 1
