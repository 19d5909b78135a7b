"""The real `mathtune train` CLI in a subprocess on the tiny model, and the scripts/train.sh wrapper."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_SH = REPO_ROOT / "scripts" / "train.sh"
METRICS_KEYS = {"step", "loss", "grad_norm", "learning_rate", "epoch", "supervised_tokens",
                "supervised_tokens_per_second", "tokens_per_second", "seconds"}


def _env(**extra) -> dict[str, str]:
    env = dict(os.environ)
    # one intra-op thread: the test CPU is shared, and OpenMP threads spin-wait when oversubscribed
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def mathtune(*args, timeout=600, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mathtune.cli", *map(str, args)], cwd=REPO_ROOT, env=_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def test_train_cli_writes_a_complete_run_dir(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    key_file = tmp_path / "wandb.key"
    key_file.write_text("sekrit-wandb-key-0123456789\n")
    proc = mathtune("train", "--model", tiny_model_dir, "--task", "unit-conversion", "--max-samples", 16,
                    "--max-steps", 3, "--batch-size", 4, "--no-wandb", "--wandb-key-file", key_file,
                    "--output-dir", run_dir, "--eval-samples", 4, "--eval-batch-size", 4, "--max-new-tokens", 8)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    # start summary: rows, steps, tokens per step; end summary: steps, throughput, reason, run dir
    assert "rows read 16, kept 16, dropped 0" in out
    assert "tokens per step: 4 batch × 1 accumulation ×" in out
    assert "steps: 3 (--max-steps" in out
    assert "training completed: 3 steps" in out and "supervised tokens/s" in out
    assert f"run dir: {run_dir}" in out
    assert "precision: " in out and "device: cpu" in out

    assert (run_dir / "adapter_model.safetensors").is_file()
    adapter = json.loads((run_dir / "adapter_config.json").read_text())
    assert Path(adapter["base_model_name_or_path"]) == Path(tiny_model_dir).resolve()
    assert (run_dir / "tokenizer.json").is_file() or (run_dir / "tokenizer_config.json").is_file()

    saved = (run_dir / "mathtune_config.yaml").read_text()
    config = yaml.safe_load(saved)
    assert config["max_steps"] == 3 and config["task"] == "unit-conversion" and config["method"] == "lora"
    assert "wandb_key_file" not in config and "sekrit" not in saved and "wandb.key" not in saved
    assert "sekrit" not in out + proc.stderr

    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]
    for line in lines:
        assert METRICS_KEYS <= line.keys()
        assert line["supervised_tokens"] > 0 and line["seconds"] > 0
    state = json.loads((run_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 3

    # --eval-samples: base vs trained on the same held-out items, then the report
    comparison = json.loads((run_dir / "model_comparison.json").read_text())
    assert comparison["n"] == 4 and comparison["task"] == "unit-conversion"
    assert Path(comparison["trained"]["model"]).resolve() == run_dir.resolve()
    assert "accuracy on 4 held-out items: base" in out
    assert (run_dir / "report.md").is_file() and any((run_dir / "eval").glob("*.jsonl"))


def test_train_cli_bad_input_is_one_line_error(tmp_path):
    proc = mathtune("train", "--max-steps", 0, "--output-dir", tmp_path / "run")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "--max-steps" in proc.stderr
    proc = mathtune("train", "--resume", "auto", "--output-dir", tmp_path / "empty", "--device", "cpu")
    assert proc.returncode == 1  # nothing to resume: the run fails (a bad value above is a usage error, 2)
    assert "error: --resume auto: no complete checkpoint in --output-dir" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_wandb_without_package_or_key_is_refused(tiny_model_dir, tmp_path):
    pytest.importorskip("transformers")
    from transformers.integrations import is_wandb_available

    proc = mathtune("train", "--model", tiny_model_dir, "--task", "unit-conversion", "--max-samples", 16,
                    "--max-steps", 1, "--wandb", "--output-dir", tmp_path / "run", WANDB_API_KEY="")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    expected = "WANDB_API_KEY" if is_wandb_available() else "pip install"
    assert expected in proc.stderr


# --------------------------------------------------------------------------- scripts/train.sh


def train_sh(*args, **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in _WRAPPER_VARS}
    return subprocess.run(["bash", str(TRAIN_SH), *args], cwd=REPO_ROOT, env={**clean, **env},
                          capture_output=True, text=True, timeout=120)


_WRAPPER_VARS = ("CONFIG MODEL TASK TRAIN_FILE EVAL_FILE METHOD MAX_SAMPLES BATCH_SIZE GRAD_ACCUM "
                 "GRADIENT_ACCUMULATION_STEPS NUM_EPOCHS MAX_STEPS LEARNING_RATE MAX_LENGTH MAX_TIME OUTPUT_DIR "
                 "SAVE_STEPS SEED PRECISION DEVICE EVAL_SAMPLES DRY_RUN").split()


def _printed_command(proc) -> list[str]:
    line = next(l for l in proc.stdout.splitlines() if l.startswith("running:"))
    return shlex.split(line.removeprefix("running:"))


def test_train_sh_passes_only_the_variables_that_are_set(tmp_path):
    proc = train_sh("--no-wandb", DRY_RUN="1", MAX_SAMPLES="1000", BATCH_SIZE="4", GRAD_ACCUM="2",
                    OUTPUT_DIR=str(tmp_path / "my run"), LEARNING_RATE="3e-4", MAX_TIME="60", EVAL_SAMPLES="0")
    assert proc.returncode == 0, proc.stderr
    command = _printed_command(proc)
    assert command[0].endswith("mathtune") and command[1] == "train"
    assert command[2:] == ["--max-samples", "1000", "--batch-size", "4", "--gradient-accumulation-steps", "2",
                           "--learning-rate", "3e-4", "--max-time", "60", "--output-dir", str(tmp_path / "my run"),
                           "--eval-samples", "0", "--no-wandb"]


def test_train_sh_accepts_the_long_accumulation_name_and_rejects_a_conflict():
    proc = train_sh(DRY_RUN="1", GRADIENT_ACCUMULATION_STEPS="8", CONFIG="configs/x.yaml")
    assert _printed_command(proc)[2:] == ["--config", "configs/x.yaml", "--gradient-accumulation-steps", "8"]
    proc = train_sh(DRY_RUN="1", GRAD_ACCUM="2", GRADIENT_ACCUMULATION_STEPS="8")
    assert proc.returncode == 2 and "disagree" in proc.stderr


def test_train_sh_runs_mathtune():
    proc = train_sh("--help")
    assert proc.returncode == 0, proc.stderr
    assert "--max-time" in proc.stdout and "--lora" in proc.stdout and "--full" in proc.stdout
