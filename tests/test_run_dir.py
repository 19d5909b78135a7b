"""RunDir is the one place that names a run dir's files; its checkpoint rules."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from mathtune.errors import MathtuneError
from mathtune.run_dir import RunDir

PACKAGE = Path(__file__).resolve().parent.parent / "mathtune"
# names unique to a run dir (eval/ and plots/ are also ordinary words: left out of the scan)
RUN_DIR_NAMES = (RunDir.CONFIG, RunDir.METRICS, RunDir.SAMPLES, RunDir.TRAINER_STATE, RunDir.CHECKPOINT_MARKER,
                 RunDir.REPORT, RunDir.COMPARISON, RunDir.LOCK, RunDir.CHECKPOINT_PREFIX, RunDir.PREVIOUS_PREFIX)


def _code_strings(tree: ast.AST) -> list[ast.Constant]:
    """String constants of the code, docstrings excluded (they may describe the layout)."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docstrings]


def test_no_module_but_run_dir_spells_a_run_dir_file_name():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).as_posix()
        if relative == "mathtune/run_dir.py":
            continue
        for node in _code_strings(ast.parse(path.read_text())):
            for name in RUN_DIR_NAMES:
                # models' model-tag rule names 'checkpoint-N' dirs of any origin, not ours alone
                if name in node.value and not (name == RunDir.CHECKPOINT_PREFIX and relative.startswith("mathtune/models")):
                    found.append(f"{relative}:{node.lineno}: {name!r}")
    assert not found, "ask RunDir for these paths:\n" + "\n".join(found)


def test_the_scan_sees_a_literal_in_code_and_not_in_a_docstring():
    tree = ast.parse('"""metrics.jsonl is described here."""\npath = root / "metrics.jsonl"\n')
    assert [n.value for n in _code_strings(tree)] == ["metrics.jsonl"]


def _checkpoint(run: RunDir, step: int, *, marked: bool) -> Path:
    path = run.checkpoint(step)
    path.mkdir(parents=True)
    (path / RunDir.TRAINER_STATE).write_text(json.dumps({"global_step": step}))
    if marked:
        RunDir.marker(path).write_text("{}")
    return path


def test_checkpoints_sort_by_step_and_only_marked_ones_resume(tmp_path):
    run = RunDir(tmp_path)
    for step, marked in ((10, True), (2, True), (30, False)):
        _checkpoint(run, step, marked=marked)
    (tmp_path / "checkpoint-x").mkdir()  # not a step: ignored
    assert [p.name for p in run.checkpoints()] == ["checkpoint-2", "checkpoint-10", "checkpoint-30"]
    assert run.resolve_resume("auto") == str(run.checkpoint(10))
    with pytest.raises(MathtuneError, match="not marked complete"):
        run.resolve_resume(str(run.checkpoint(30)))
    with pytest.raises(MathtuneError, match="--resume auto"):
        run.refuse_earlier_checkpoints(None)
    run.refuse_earlier_checkpoints(str(run.checkpoint(10)))  # resuming: the checkpoints are ours


def test_prepare_for_a_resume_drops_torn_checkpoints_and_later_metrics(tmp_path):
    run = RunDir(tmp_path / "run")
    resumed = _checkpoint(run, 2, marked=True)
    _checkpoint(run, 4, marked=False)
    run.metrics.write_text("".join(json.dumps({"step": s, "seconds": 1.5 * s}) + "\n" for s in (1, 2, 3, 4)))
    run.report.write_text("old")
    try:
        offset = run.prepare(str(resumed))
    finally:
        run.unlock()
    assert offset == 3.0  # seconds logged at step 2
    assert [p.name for p in run.checkpoints()] == ["checkpoint-2"]
    assert [json.loads(line)["step"] for line in run.metrics.read_text().splitlines()] == [1, 2]
    assert not run.report.exists()


def test_of_model_finds_the_run_of_a_checkpoint(tmp_path):
    run = RunDir(tmp_path / "run")
    checkpoint = _checkpoint(run, 3, marked=True)
    assert RunDir.of_model(checkpoint) is None  # no config saved yet: not a mathtune run
    run.config.write_text("model: x\n")
    assert RunDir.of_model(checkpoint) == run
    assert RunDir.of_model(run.root) == run
