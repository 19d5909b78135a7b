"""RunDir is the one place that names a run dir's files; its checkpoint and resume rules, its lock (one
`mathtune train` per dir), writability checked before work starts, an earlier run's model set aside."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mathtune import training
from mathtune.errors import MathtuneError, TrainingHalted
from mathtune.run_dir import RunDir

from conftest import REPO_ROOT, tiny_train_config

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


def test_resume_auto_ignores_incomplete_checkpoints_and_names_output_dir_when_none(tmp_path):
    with pytest.raises(MathtuneError, match="--output-dir"):
        RunDir(tmp_path).resolve_resume("auto")
    done = tmp_path / "checkpoint-2"
    done.mkdir()
    (done / "trainer_state.json").write_text("{}")
    (done / RunDir.CHECKPOINT_MARKER).write_text("{}")
    half_written = tmp_path / "checkpoint-4"  # a crash while saving: no marker
    half_written.mkdir()
    (half_written / "trainer_state.json").write_text("{}")
    assert RunDir(tmp_path).resolve_resume("auto") == str(done)
    with pytest.raises(MathtuneError, match="not marked complete"):
        RunDir(tmp_path).resolve_resume(str(half_written))


@pytest.mark.usefixtures("one_thread")
def test_fresh_run_refuses_an_output_dir_with_old_checkpoints(tiny_model_dir, tmp_path):
    (tmp_path / "run" / "checkpoint-5").mkdir(parents=True)
    with pytest.raises(MathtuneError, match="--resume auto"):
        training.setup(tiny_train_config(tiny_model_dir, tmp_path / "run"))


# --------------------------------------------------------------------------- one mathtune train per run dir


def train_cli(model_dir, out, *extra) -> subprocess.CompletedProcess:
    """The real `mathtune train` in a subprocess: 32 rows / batch 4 = 8 steps on the tiny model."""
    args = ["train", "--model", model_dir, "--task", "unit-conversion", "--max-samples", 32, "--batch-size", 4,
            "--max-steps", 8, "--learning-rate", 5e-3, "--lr-scheduler", "cosine", "--warmup-ratio", 0.25,
            "--precision", "fp32", "--device", "cpu", "--no-wandb", "--sample-every", 0, "--max-new-tokens", 4,
            "--output-dir", out, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "mathtune", *map(str, args)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_second_train_into_a_dir_in_use_is_refused(tiny_model_dir, tmp_path):
    from mathtune import run_dir

    out = tmp_path / "run"
    # another process holds the lock: a child that takes it and waits
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from mathtune import run_dir; "
                               "run_dir.lock_output_dir(sys.argv[1]); print('locked', flush=True); time.sleep(60)",
                               str(out)], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = train_cli(tiny_model_dir, out)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert proc.stderr.strip() == (f"error: --output-dir {out} is in use by another mathtune train "
                                       f"(pid {holder.pid}): wait for it to finish or use another --output-dir")
    finally:
        holder.kill()
        holder.wait()
    assert run_dir.RunDir.LOCK in os.listdir(out)
    # the holder died (as kill -9 would): the kernel dropped its lock, the dir is usable again
    assert train_cli(tiny_model_dir, out, "--max-steps", 1).returncode == 0


# --------------------------------------------------------------------------- writable before work starts


def run_cli(capsys, *argv) -> tuple[int, str]:
    from mathtune.cli import main

    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_unwritable_output_dir_is_a_one_line_error(tiny_model_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code, err = run_cli(capsys, "train", "--model", tiny_model_dir, "--task", "unit-conversion", "--max-steps", 1,
                        "--max-samples", 8, "--batch-size", 4, "--output-dir", blocker / "run", "--no-wandb")
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err  # refused before loading the model
    assert err.startswith(f"error: --output-dir {blocker / 'run'}: cannot write there (not a directory") and "writable" in err


def test_unwritable_comparison_output_is_a_one_line_error_before_evaluating(tiny_model_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code, err = run_cli(capsys, "compare", "--base-model", tiny_model_dir, "--trained-model", tiny_model_dir,
                        "--task", "unit-conversion", "--max-samples", 2, "--output", blocker / "comparison.json")
    # an unwritable path is found by trying it: a failed run (1), not a flag validation refused (2)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: --output {blocker / 'comparison.json'}: cannot write there (not a directory")


# --------------------------------------------------------------------------- an earlier run's model never looks current


def one_step_config(model_dir, out, **overrides):
    return tiny_train_config(model_dir, out, **{**dict(max_samples=8, max_steps=1), **overrides})


@pytest.mark.usefixtures("one_thread")
def test_lora_run_then_full_run_in_the_same_dir_never_evaluates_the_old_adapter(tiny_model_dir, tmp_path, capsys):
    from mathtune.models.load import load_model

    out = tmp_path / "run"
    training.run(training.setup(one_step_config(tiny_model_dir, out)))
    assert (out / "adapter_config.json").is_file()
    training.run(training.setup(one_step_config(tiny_model_dir, out, method="full", learning_rate=1e-4)))
    assert not (out / "adapter_config.json").exists()
    assert "held an earlier run's model" in capsys.readouterr().out
    (aside,) = out.glob("previous-*")
    assert (aside / "adapter_config.json").is_file() and (aside / "adapter_model.safetensors").is_file()
    loaded = load_model(str(out))
    assert not loaded.is_adapter  # the full run's weights, not the earlier adapter


@pytest.mark.usefixtures("one_thread")
def test_guard_halted_rerun_leaves_no_earlier_final_model_looking_current(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    training.run(training.setup(one_step_config(tiny_model_dir, out)))
    session = training.setup(one_step_config(tiny_model_dir, out))

    def halted(**kwargs):
        raise TrainingHalted("nonfinite_loss", "test halt", 1)

    monkeypatch.setattr(session.trainer, "train", halted)
    with pytest.raises(TrainingHalted):
        training.run(session)
    assert not (out / "adapter_model.safetensors").exists() and not (out / "trainer_state.json").exists()
