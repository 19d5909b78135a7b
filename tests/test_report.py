"""report.md + plots/*.png from a synthetic run dir (metrics with a NaN, comparison, samples)."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from mathtune.errors import InputError, MathtuneError
from mathtune.report import read_metrics, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path):
    """(width, height) from the IHDR chunk: proves the file is a real, non-empty PNG."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert data.rstrip(b"\x00")[-8:-4] == b"IEND"
    return width, height


def metric_line(step, loss, grad_norm, **extra):
    row = {"step": step, "loss": loss, "grad_norm": grad_norm, "learning_rate": 1e-4 * step,
           "supervised_tokens": 400 + step, "supervised_tokens_per_second": 1000.0 + 10 * step,
           "epoch": step / 10, "seconds": 0.5 * step, **extra}
    return json.dumps(row)  # Python writes float('nan') as NaN, as training's logger does


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "unit-lora"
    run.mkdir()
    lines = [metric_line(s, 2.5 - 0.2 * s, 1.5 / s) for s in range(1, 11)]
    lines[6] = metric_line(7, 1.1, float("nan"))  # one NaN gradient norm at step 7
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run / "mathtune_config.yaml").write_text(yaml.safe_dump(
        {"model": "smollm2-135m", "task": "unit-conversion", "method": "lora", "learning_rate": 0.0002}, sort_keys=False))
    return run


def comparison_json():
    return {
        "task": "unit-conversion", "n": 50,
        "base": {"model": "smollm2-135m", "n": 50, "accuracy": 0.2, "strict_accuracy": 0.04, "answer_rate": 0.9},
        "trained": {"model": "runs/unit-lora", "n": 50, "accuracy": 0.46, "strict_accuracy": 0.4, "answer_rate": 1.0},
        "accuracy_difference": 0.26, "ci95": [0.12, 0.4], "bootstrap": {"n_resamples": 10000, "seed": 0},
        "mcnemar_p": 0.000244, "fixed": 15, "broken": 2, "both_correct": 8, "both_wrong": 25,
        "base_log": "eval/smollm2-135m-unit-conversion.jsonl", "trained_log": "eval/unit-lora-unit-conversion.jsonl",
    }


def test_report_from_metrics_only(run_dir):
    report = write_report(run_dir)
    assert report == run_dir / "report.md"
    text = report.read_text()
    assert png_size(run_dir / "plots" / "loss.png")[0] > 100
    assert png_size(run_dir / "plots" / "grad_norm.png")[0] > 100
    assert not (run_dir / "plots" / "accuracy.png").exists()
    assert "10 (step 1 → 10)" in text
    assert "first 2.3 (step 1)" in text and "last 0.5 (step 10)" in text  # 2.5 - 0.2*1, 2.5 - 0.2*10
    assert "non-finite grad norm | **1 step**: 7" in text
    assert "non-finite loss | none" in text
    assert "1,055 supervised tokens/s" in text  # median of 1010..1100 step 10
    assert "4,055 in all (mean 406 per logged line)" in text  # sum of 401..410
    assert "5.0 s to the last logged step" in text
    assert "![training loss](plots/loss.png)" in text and "![gradient norm](plots/grad_norm.png)" in text
    assert "No `model_comparison.json`" in text
    assert "--base-model smollm2-135m" in text and "--task unit-conversion" in text  # from the config
    assert "model `smollm2-135m`, task `unit-conversion`, method `lora`" in text
    assert "learning_rate: 0.0002" in text  # the resolved config, verbatim


def test_nan_grad_norm_is_drawn_not_dropped(run_dir, tmp_path):
    """The plot with a NaN differs from the same data without it: the NaN is marked."""
    write_report(run_dir)
    with_nan = (run_dir / "plots" / "grad_norm.png").read_bytes()
    clean = tmp_path / "clean"
    clean.mkdir()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (clean / "metrics.jsonl").write_text("\n".join(l for l in lines if "NaN" not in l) + "\n")
    write_report(clean)
    assert with_nan != (clean / "plots" / "grad_norm.png").read_bytes()
    assert "non-finite grad norm | none" in (clean / "report.md").read_text()


def test_report_with_comparison_and_samples(run_dir):
    (run_dir / "model_comparison.json").write_text(json.dumps(comparison_json()))
    samples = [
        {"step": 0, "prompt": "How many cm in 2 m?", "output": "200 cm\n#### 200", "flags": []},
        {"step": 5, "prompt": "How many g in 3 kg?", "output": "```\n!!!!\n```", "flags": ["repetition"]},
        {"step": 5, "prompt": "How many m in 1 km?", "output": "\n\n\n", "flags": ["empty"]},
    ]
    (run_dir / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    text = write_report(run_dir).read_text()
    width, height = png_size(run_dir / "plots" / "accuracy.png")
    assert width > height > 100
    assert "![base vs trained accuracy](plots/accuracy.png)" in text
    assert "| accuracy | 20.0% | 46.0% | +26.0 pp |" in text
    assert "| strict accuracy | 4.0% | 40.0% | +36.0 pp |" in text
    assert "| n | 50 | 50 |  |" in text
    assert "95% CI [+12.0, +40.0] pp" in text
    assert "McNemar exact p = 0.000244" in text and "fixed 15" in text and "broken 2" in text
    assert "### step 0" in text and "### step 5" in text
    assert "flags: repetition" in text and "flags: none" in text
    # model output holding a ``` fence is wrapped in a longer fence, so it cannot break the page
    assert "````text\n```\n!!!!\n```\n````" in text
    assert "output: blank, exactly `'\\n\\n\\n'`" in text  # whitespace shown, not an empty block


def test_stale_accuracy_plot_is_removed(run_dir):
    (run_dir / "model_comparison.json").write_text(json.dumps(comparison_json()))
    write_report(run_dir)
    assert (run_dir / "plots" / "accuracy.png").exists()
    (run_dir / "model_comparison.json").unlink()
    text = write_report(run_dir).read_text()
    assert not (run_dir / "plots" / "accuracy.png").exists()
    assert "accuracy.png" not in text


def test_all_nan_loss_still_plots_and_is_counted(tmp_path):
    run = tmp_path / "nan-run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(metric_line(s, float("nan"), float("inf")) + "\n" for s in (1, 2, 3)))
    text = write_report(run).read_text()
    png_size(run / "plots" / "loss.png")
    assert "non-finite loss | **3 steps**: 1, 2, 3" in text
    assert "first nan (step 1)" in text
    assert "lowest loss" not in text  # no finite loss to name


def test_string_nan_and_resumed_steps(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    lines = [metric_line(1, 2.0, 1.0), metric_line(2, 1.9, 1.0), metric_line(3, 1.8, 1.0),
             # resumed from the step-2 checkpoint: step 3 logged again, the later line wins
             metric_line(3, 1.7, "nan"), metric_line(4, 1.6, 1.0)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[2]["loss"] == 1.7 and math.isnan(rows[2]["grad_norm"])


def test_empty_metrics_is_reported_not_crashed(tmp_path):
    run = tmp_path / "halted"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    text = write_report(run).read_text()
    assert "none: the run stopped before its first logged step" in text
    assert not (run / "plots" / "loss.png").exists()


def test_not_a_run_dir_names_the_missing_file(tmp_path):
    with pytest.raises(MathtuneError, match=r"not a training run dir: metrics\.jsonl is missing"):
        write_report(tmp_path)
    with pytest.raises(MathtuneError, match="no such directory"):
        write_report(tmp_path / "nope")


@pytest.mark.parametrize(
    "bad_line, reason",
    [
        ("{oops", "not valid JSON"),
        ('{"loss": 1.0}', "integer 'step'"),
        ('{"step": 3, "loss": "high"}', "'loss' must be a number"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_malformed_metrics_line_names_file_and_line(tmp_path, bad_line, reason):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(metric_line(1, 2.0, 1.0) + "\n\n" + bad_line + "\n")
    with pytest.raises(InputError, match=rf"metrics\.jsonl:3: .*{reason}"):
        write_report(run)


def test_malformed_comparison_and_samples(run_dir):
    (run_dir / "model_comparison.json").write_text('{"n": 3}')
    with pytest.raises(InputError, match=r"model_comparison\.json: missing base, trained"):
        write_report(run_dir)
    (run_dir / "model_comparison.json").unlink()
    (run_dir / "samples.jsonl").write_text('{"step": 1}\nnot json\n')
    with pytest.raises(InputError, match=r"samples\.jsonl:2: not valid JSON"):
        write_report(run_dir)


def test_cli_report(run_dir, capsys):
    from mathtune.cli import main

    assert main(["report", str(run_dir)]) == 0
    assert "report.md" in capsys.readouterr().out
    assert (run_dir / "report.md").is_file()
    assert main(["report", str(run_dir.parent)]) == 1  # a failed run, not a usage error
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "metrics.jsonl is missing" in err and err.count("\n") == 1
