"""`mathtune eval` through the real CLI on the bundled SmolLM2-135M (a subprocess, like a user)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration
def test_cli_eval_writes_consistent_logs(tmp_path):
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "mathtune.cli", "eval", "--model", "smollm2-135m", "--task", "unit-conversion",
           "--max-samples", "8", "--max-new-tokens", "48", "--output", str(out), "--no-cache"]
    # One OpenMP thread: on a 2-core box shared with other jobs, 2 spin-waiting threads make this
    # run ~30x slower (measured: 127 s vs 3.5 s of generation); one thread is as fast when idle.
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    # the start line names the bundled base for what it is
    assert "evaluating smollm2-135m (SmolLM2-135M-Instruct de-quantized from its Q4_1 GGUF" in result.stderr

    items_path = out / "smollm2-135m-unit-conversion.jsonl"
    summary = json.loads((out / "smollm2-135m-unit-conversion.summary.json").read_text())
    items = [json.loads(line) for line in items_path.read_text().splitlines()]
    assert len(items) == summary["n"] == 8
    assert summary["per_item_path"] == str(items_path)
    assert summary["generation"]["max_new_tokens"] == 48 and summary["cached"] is False
    assert summary["accuracy"] == sum(i["correct"] for i in items) / 8
    assert summary["strict_accuracy"] == sum(i["strict_correct"] for i in items) / 8
    assert summary["answer_rate"] == sum(i["answered"] for i in items) / 8
    assert summary["tokens_generated"] == sum(i["output_tokens"] for i in items)
    assert all(1 <= i["output_tokens"] <= 48 for i in items)
    assert len({i["id"] for i in items}) == 8
    for item in items:
        assert item["output"] == item["outputs"][0]
        assert item["answered"] is (item["extracted"] is not None)
        assert not item["strict_correct"] or item["correct"]  # a right '####' is also right flexibly
    # the headline figures are printed, and agree with the summary
    assert f"{summary['accuracy']:.1%}" in result.stdout
    assert "strict accuracy" in result.stdout and "answer rate" in result.stdout
