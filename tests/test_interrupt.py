"""SIGTERM / SIGINT / kill -9 on the real `mathtune train` CLI in a subprocess (tiny model).

The signal is sent by the training process to itself from a hook the test installs at the start of
step k (a step is milliseconds on the tiny model, so a signal from outside would land on an
unpredictable step). Everything else is the real CLI: its handlers, its checkpoint, its exit code.
Resumed runs must end with the very weights of an uninterrupted run, under warmup + cosine, so a
lost scheduler, optimizer, RNG or data-order state would show.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mathtune import training
from mathtune.run_dir import RunDir

REPO_ROOT = Path(__file__).resolve().parents[1]

# The CLI, with a hook that sends a signal to the process when step T_AT starts (T_AT = steps done).
# T_TEAR: before a SIGKILL, append half a metrics line, as a kill in the middle of a write leaves it.
# T_KILL_IN_SAVE: SIGKILL while checkpoint-T_KILL_IN_SAVE is being written (after its weights).
HOOKED_CLI = r"""
import os, signal, sys
from transformers import Trainer
from mathtune import training
at = os.environ.get("T_AT")
sig = getattr(signal, os.environ.get("T_SIG", "SIGTERM"))
def on_step_begin(self, args, state, control, **kwargs):
    if at is not None and state.global_step == int(at):
        if os.environ.get("T_TEAR"):
            with open(os.path.join(args.output_dir, "metrics.jsonl"), "a") as fh:
                fh.write('{"step": 99, "loss": 1.2')
        os.kill(os.getpid(), sig)
        if os.environ.get("T_TWICE"):
            os.kill(os.getpid(), sig)
training.StepCallback.on_step_begin = on_step_begin
kill_in_save = os.environ.get("T_KILL_IN_SAVE")
original = Trainer._save_optimizer_and_scheduler
def save_then_die(self, output_dir):
    original(self, output_dir)
    if kill_in_save is not None and output_dir.endswith("checkpoint-" + kill_in_save):
        os.kill(os.getpid(), signal.SIGKILL)
Trainer._save_optimizer_and_scheduler = save_then_die
from mathtune.cli import main
sys.exit(main(sys.argv[1:]))
"""

STEPS = 8


def train(model_dir, out, *extra, **env) -> subprocess.CompletedProcess:
    # 32 rows / batch 4 = 8 steps: a stop at step 3 resumes mid-epoch; warmup 0.25 = 2 steps, then cosine
    args = ["train", "--model", model_dir, "--task", "unit-conversion", "--max-samples", 32, "--batch-size", 4,
            "--max-steps", STEPS, "--learning-rate", 5e-3, "--lr-scheduler", "cosine", "--warmup-ratio", 0.25,
            "--precision", "fp32", "--device", "cpu", "--no-wandb", "--sample-every", 0, "--max-new-tokens", 4,
            "--output-dir", out, *extra]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                **{k: str(v) for k, v in env.items()}}
    return subprocess.run([sys.executable, "-c", HOOKED_CLI, *map(str, args)], cwd=REPO_ROOT, env=full_env,
                          capture_output=True, text=True, timeout=300)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter_model.safetensors"))


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def metric_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    proc = train(tiny_model_dir, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert metric_steps(out) == list(range(1, STEPS + 1))
    return out


@pytest.mark.parametrize("signame, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_signal_saves_a_marked_checkpoint_and_resume_equals_the_uninterrupted_run(
        signame, code, uninterrupted, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    # no --save-steps: the signal's checkpoint is the only one
    proc = train(tiny_model_dir, out, T_AT=2, T_SIG=signame)  # arrives while step 3 is in flight
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    checkpoints = RunDir(out).complete_checkpoints()
    assert [p.name for p in checkpoints] == ["checkpoint-3"]  # the step in flight finished, then saved
    for part in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"):
        assert (checkpoints[0] / part).is_file(), part
    assert not (out / "adapter_model.safetensors").exists()  # no final model for an unfinished run
    assert f"checkpoint saved: {checkpoints[0]}" in proc.stderr
    assert "--resume auto" in proc.stderr and f"--output-dir {out}" in proc.stderr
    assert metric_steps(out) == [1, 2, 3]

    resumed = train(tiny_model_dir, out, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert metric_steps(out) == list(range(1, STEPS + 1))
    assert max_difference(weights(out), weights(uninterrupted)) <= 1e-6
    # the resumed run continued: it is not the checkpoint's step-3 weights
    assert max_difference(weights(out), weights(checkpoints[0])) > 1e-4


def test_second_signal_exits_at_once_leaving_checkpoints_as_they_were(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    proc = train(tiny_model_dir, out, "--save-steps", 2, T_AT=3, T_TWICE=1)
    assert proc.returncode == 143 and "second SIGTERM: exiting now" in proc.stderr
    # checkpoint-2 (from --save-steps) is intact and marked; the stop never got to save step 4
    assert [p.name for p in RunDir(out).complete_checkpoints()] == ["checkpoint-2"]
    assert not (out / "checkpoint-4").exists()


def test_kill_9_between_checkpoints_with_a_torn_metrics_line_resumes_to_the_same_weights(
        uninterrupted, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    proc = train(tiny_model_dir, out, "--save-steps", 2, T_AT=5, T_SIG="SIGKILL", T_TEAR=1)
    assert proc.returncode == -signal.SIGKILL
    assert (out / "metrics.jsonl").read_text().endswith('"loss": 1.2')  # torn by the kill
    assert [p.name for p in RunDir(out).complete_checkpoints()][-1] == "checkpoint-4"

    resumed = train(tiny_model_dir, out, "--save-steps", 2, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Traceback" not in resumed.stderr
    assert "metrics.jsonl: dropped a torn last line" in resumed.stderr
    assert metric_steps(out) == list(range(1, STEPS + 1))
    assert max_difference(weights(out), weights(uninterrupted)) <= 1e-6


def test_kill_9_mid_checkpoint_write_resumes_from_the_last_marked_one(uninterrupted, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    proc = train(tiny_model_dir, out, "--save-steps", 2, T_KILL_IN_SAVE=4)
    assert proc.returncode == -signal.SIGKILL
    assert (out / "checkpoint-4" / "optimizer.pt").is_file()  # half written: weights and optimizer, no marker
    assert [p.name for p in RunDir(out).complete_checkpoints()] == ["checkpoint-2"]

    resumed = train(tiny_model_dir, out, "--save-steps", 2, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "checkpoint-2" in resumed.stdout
    assert "incomplete checkpoint(s)" in resumed.stdout
    assert metric_steps(out) == list(range(1, STEPS + 1))
    assert max_difference(weights(out), weights(uninterrupted)) <= 1e-6
