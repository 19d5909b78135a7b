"""The learning curve of ``mathtune report``: real evals of a tiny LoRA run's checkpoints, its final
model and its base, found under the run's eval/, placed at the training minutes of metrics.jsonl."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import build_tiny_model, tiny_train_config
from mathtune import training
from mathtune.config import EvalConfig, build_config
from mathtune.errors import InputError
from mathtune.evaluation import evaluate_model
from mathtune.learning_curve import collect, training_seconds_at
from mathtune.report import read_metrics, write_report
from test_report import png_size

EVAL_ITEMS = 6


def run_eval(spec, out, **settings):
    """A real, small ``mathtune eval`` (greedy, calculator on unless told) into ``out``."""
    values = dict(model=str(spec), task="unit-conversion", max_samples=EVAL_ITEMS, max_new_tokens=8,
                  precision="fp32", device="cpu", no_cache=True, calculator=True)
    values.update(settings)
    config = build_config(EvalConfig, None, values)
    summary, _records = evaluate_model(str(spec), config, out, verbose=False, progress=False)
    return summary


@pytest.fixture(scope="module")
def curve_run(tiny_model_dir, tmp_path_factory):
    """A 5-step LoRA run: checkpoints at steps 2 and 4, logged steps 2, 4 and 5 (the last step is always
    logged); its checkpoints, final model and base evaluated into eval/curve, with relative specs
    from the run's parent dir (as a user types them)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # see conftest.one_thread (function-scoped)
    root = tmp_path_factory.mktemp("curve")
    run = root / "gsm-run"
    training.run(training.setup(tiny_train_config(tiny_model_dir, run, max_steps=5, save_steps=2, logging_steps=2)))
    cwd = pytest.MonkeyPatch()
    cwd.chdir(root)
    try:
        for spec in ("gsm-run/checkpoint-2", "gsm-run/checkpoint-4", "gsm-run", str(tiny_model_dir)):
            run_eval(spec, "gsm-run/eval/curve")
    finally:
        cwd.undo()
        torch.set_num_threads(before)
    return run


@pytest.fixture
def other_cwd(tmp_path, monkeypatch):
    """Report from another working dir: the evals' relative specs must not decide the matching."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def restore_metrics(curve_run):
    original = (curve_run / "metrics.jsonl").read_text()
    yield curve_run / "metrics.jsonl"
    (curve_run / "metrics.jsonl").write_text(original)


@pytest.fixture
def extra_evals(curve_run):
    extra = curve_run / "eval" / "extra"
    yield extra
    shutil.rmtree(extra, ignore_errors=True)


def test_checkpoint_evals_get_their_own_files_and_record_their_dir(curve_run):
    names = sorted(p.name for p in (curve_run / "eval" / "curve").glob("*.summary.json"))
    run_names = [n for n in names if n.startswith("gsm-run")]
    assert run_names == ["gsm-run-checkpoint-2-unit-conversion.summary.json",
                         "gsm-run-checkpoint-4-unit-conversion.summary.json", "gsm-run-unit-conversion.summary.json"]
    summary = json.loads((curve_run / "eval" / "curve" / run_names[0]).read_text())
    assert summary["model"] == "gsm-run/checkpoint-2"  # as typed, relative to the eval's working dir
    assert summary["model_dir"] == str((curve_run / "checkpoint-2").resolve())
    assert summary["n"] == EVAL_ITEMS and summary["generation"]["calculator"] is True


def test_report_draws_the_curve_at_the_logged_training_minutes(curve_run, other_cwd):
    metrics = read_metrics(curve_run)
    assert [row["step"] for row in metrics] == [2, 4, 5]
    seconds = {row["step"]: row["seconds"] for row in metrics}
    curves = collect(curve_run, metrics, {"model": "unused", "base_model": {"kind": "local-dir", "dir": "/nowhere"}})
    # the base is not the one this config names: only the run's own three points
    [group] = curves.groups
    assert [(p.step, p.role, p.seconds) for p in group.points] == [
        (2, "checkpoint", seconds[2]), (4, "checkpoint", seconds[4]), (5, "final", seconds[5])]

    report = write_report(curve_run)
    text = report.read_text()
    assert png_size(curve_run / "plots" / "learning_curve.png")[0] > 100
    assert "![learning curve](plots/learning_curve.png)" in text
    assert "### unit-conversion, 6 items, calculator on" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "summary.json" in line]
    summaries = {name: json.loads((curve_run / "eval" / "curve" / name).read_text()) for name in
                 ("gsm-run-checkpoint-2-unit-conversion.summary.json", "gsm-run-checkpoint-4-unit-conversion.summary.json",
                  "gsm-run-unit-conversion.summary.json")}
    base_name = next(p.name for p in (curve_run / "eval" / "curve").glob("*.summary.json")
                     if not p.name.startswith("gsm-run"))
    assert [row.split(" | ")[0] for row in rows] == ["| 0 (base model)", "| 2", "| 4", "| 5 (final model)"]
    assert rows[0].endswith(f"`eval/curve/{base_name}` |")
    for row, (name, summary), step in zip(rows[1:], summaries.items(), (2, 4, 5)):
        assert row == (f"| {'5 (final model)' if step == 5 else step} | {seconds[step] / 60:.2f} "
                       f"| {100 * summary['accuracy']:.1f}% | {100 * summary['answer_rate']:.1f}% | {EVAL_ITEMS} "
                       f"| `eval/curve/{name}` |")


def test_minutes_come_from_the_nearest_logged_step_at_or_before_the_checkpoint(curve_run, restore_metrics, other_cwd):
    # steps 1, 3, 5 logged (logging_steps 2 from step 1), 90 s per step: checkpoint-2 took step 1's
    # time (1.50 min), checkpoint-4 step 3's (4.50 min), the final model step 5's (7.50 min)
    restore_metrics.write_text("".join(json.dumps({"step": s, "loss": 1.0, "seconds": 90.0 * s}) + "\n" for s in (1, 3, 5)))
    text = write_report(curve_run).read_text()
    assert "| 2 | 1.50 (logged step 1, the nearest before 2) |" in text
    assert "| 4 | 4.50 (logged step 3, the nearest before 4) |" in text
    assert "| 5 (final model) | 7.50 |" in text

    # nothing logged at or before step 2: no time for checkpoint-2; the other points still make a line
    restore_metrics.write_text("".join(json.dumps({"step": s, "loss": 1.0, "seconds": 90.0 * s}) + "\n" for s in (3, 5)))
    text = write_report(curve_run).read_text()
    assert "| 2 | - (no logged step at or before 2 with 'seconds' in metrics.jsonl) |" in text
    assert (curve_run / "plots" / "learning_curve.png").is_file()


def test_training_seconds_at():
    rows = [{"step": 2, "seconds": 10.0}, {"step": 4, "seconds": float("nan")}, {"step": 6, "seconds": 30.0}]
    assert training_seconds_at(rows, 2) == (10.0, 2)
    assert training_seconds_at(rows, 5) == (10.0, 2)  # step 4's time is NaN: not a time
    assert training_seconds_at(rows, 9) == (30.0, 6)
    assert training_seconds_at(rows, 1) == (None, None)


def test_only_comparable_evals_share_a_line(curve_run, extra_evals, tiny_model_dir, smol_tokenizer, tmp_path,
                                            one_thread):
    other_model = tmp_path / "other-model"
    build_tiny_model(smol_tokenizer, seed=1).save_pretrained(other_model)
    smol_tokenizer.save_pretrained(other_model)
    run_eval(curve_run / "checkpoint-2", extra_evals / "fewer", max_samples=4)  # other items
    run_eval(curve_run / "checkpoint-4", extra_evals / "fewer", max_samples=4)
    run_eval(curve_run / "checkpoint-2", extra_evals / "nocalc", calculator=False)  # same items, no calculator
    run_eval(curve_run, extra_evals / "sampled", temperature=0.8, num_samples=2)
    run_eval(tiny_model_dir, extra_evals / "base-other-items", max_samples=3)
    run_eval(other_model, extra_evals / "other-model")

    metrics = read_metrics(curve_run)
    settings = {"model": str(tiny_model_dir), "base_model": {"spec": str(tiny_model_dir), "kind": "local-dir",
                                                               "dir": str(tiny_model_dir)}}
    curves = collect(curve_run, metrics, settings)
    lines = {(g.n, g.key.calculator): [p.step for p in g.points] for g in curves.groups}
    assert lines == {(6, True): [0, 2, 4, 5], (4, True): [2, 4], (6, False): [2]}
    assert [len(g.drawn) >= 2 for g in curves.groups] == [True, True, False]
    ignored = {path.parent.name: why for path, why in curves.ignored}
    assert set(ignored) == {"sampled", "base-other-items", "other-model"}
    assert "greedy evals only" in ignored["sampled"]
    assert "no eval of this run on the same items" in ignored["base-other-items"]
    assert "neither this run" in ignored["other-model"]

    text = write_report(curve_run).read_text()
    assert "### unit-conversion, 6 items, calculator on" in text
    assert "### unit-conversion, 4 items, calculator on" in text
    assert "### unit-conversion, 6 items, calculator off" in text
    assert "Not on the curve (3 of the summaries under `eval/`)" in text
    assert "`eval/extra/sampled/gsm-run-unit-conversion.summary.json`: sampled (temperature 0.8, 2 samples)" in text


def test_evals_in_another_precision_draw_their_own_line(curve_run, extra_evals, one_thread):
    """checkpoint-4 and the final model evaluated again in bf16: the same items and settings as the fp32
    evals in eval/curve, so precision alone keeps them off the fp32 line (else step 4 would be a duplicate)."""
    for spec in (curve_run / "checkpoint-4", curve_run):
        assert run_eval(spec, extra_evals / "bf16", precision="bf16")["precision"] == "bf16"
    curves = collect(curve_run, read_metrics(curve_run), {})
    lines = {g.key.precision: [p.step for p in g.points] for g in curves.groups}
    assert lines == {"fp32": [2, 4, 5], "bf16": [4, 5]}
    assert all(not g.left_out for g in curves.groups)
    assert {g.key.items_sha for g in curves.groups} == {curves.groups[0].key.items_sha}  # the same items
    text = write_report(curve_run).read_text()
    assert "### unit-conversion, 6 items, calculator on, fp32" in text
    assert "### unit-conversion, 6 items, calculator on, bf16" in text


def test_the_same_step_twice_keeps_the_newest_and_says_so(curve_run, extra_evals, one_thread):
    run_eval(curve_run / "checkpoint-4", extra_evals / "again")
    [group] = [g for g in collect(curve_run, read_metrics(curve_run), {}).groups]
    assert [p.step for p in group.points] == [2, 4, 5]  # no base: the config names none
    assert group.points[1].summary.parent.name == "again"
    [(dropped, why)] = group.left_out
    assert dropped.summary.parent.name == "curve"
    assert why == "step 4 again; the newer `eval/extra/again/gsm-run-checkpoint-4-unit-conversion.summary.json` is the one drawn"


def test_no_curve_removes_a_stale_plot_and_says_how_to_make_one(curve_run, tmp_path):
    run = tmp_path / "one-point"
    run.mkdir()
    shutil.copy(curve_run / "metrics.jsonl", run)
    (run / "mathtune_config.yaml").write_text("model: smollm2-135m\ntask: unit-conversion\n")
    (run / "plots").mkdir()
    stale = run / "plots" / "learning_curve.png"
    stale.write_bytes(b"\x89PNG stale")  # what an earlier report drew

    text = write_report(run).read_text()
    assert not stale.exists()
    assert "No learning curve" in text
    assert f"mathtune eval --model {run}/checkpoint-N --task unit-conversion --all --output {run}/eval/curve" in text
    assert "mathtune eval --model smollm2-135m --task unit-conversion" in text
    assert f"mathtune report {run}" in text
    assert "This run dir has no checkpoint-N" in text

    # one point (the final model's eval copied in) is still no line
    (run / "eval").mkdir()
    stale.write_bytes(b"\x89PNG stale")
    final = json.loads((curve_run / "eval" / "curve" / "gsm-run-unit-conversion.summary.json").read_text())
    final["model_dir"] = str(run.resolve())  # the same real summary, moved to this run with its dir
    (run / "eval" / "final.summary.json").write_text(json.dumps(final))
    text = write_report(run).read_text()
    assert not stale.exists() and "No learning curve" in text
    assert "| 5 (final model) |" in text  # the point is listed even though no line is drawn


@pytest.mark.parametrize("content,reason", [
    ("{\"model\": \"x\",\n  oops", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ("{\"model\": \"x\", \"task\": \"gsm8k\"}", "missing items_sha, n, accuracy, answer_rate, generation"),
])
def test_a_bad_summary_is_an_error_naming_the_file(tmp_path, content, reason):
    run = tmp_path / "run"
    (run / "eval" / "curve").mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0, "seconds": 1.0}) + "\n")
    bad = run / "eval" / "curve" / "x-gsm8k.summary.json"
    bad.write_text(content)
    with pytest.raises(InputError) as err:
        write_report(run)
    message = str(err.value)
    assert message.startswith(str(bad)) and reason in message and "\n" not in message
    if reason == "not valid JSON":
        assert message.startswith(f"{bad}:2:")  # the line of the damage


def test_an_alias_base_is_matched_by_name(curve_run, extra_evals):
    """The bundled base is evaluated as `--model smollm2-135m`: no dir, the run's config names it."""
    base = next(p for p in (curve_run / "eval" / "curve").glob("*.summary.json") if not p.name.startswith("gsm-run"))
    summary = json.loads(base.read_text())
    summary.update(model="smollm2-135m", model_tag="smollm2-135m", model_dir=None)  # what such an eval records
    extra_evals.mkdir()
    (extra_evals / "smollm2-135m-unit-conversion.summary.json").write_text(json.dumps(summary))
    settings = {"model": "smollm2-135m", "base_model": {"spec": "smollm2-135m", "kind": "alias-gguf",
                                                        "dir": "/cache/smollm2-135m"}}
    [group] = collect(curve_run, read_metrics(curve_run), settings).groups
    assert [(p.step, p.summary.name) for p in group.points][0] == (0, "smollm2-135m-unit-conversion.summary.json")
    # the local-dir base of the other eval is not this config's base
    assert [p.step for p in group.points] == [0, 2, 4, 5]
