"""Regression tests for the defects of issue #10, one per defect, each named after it (each failed before the fix)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mathtune import training
from mathtune.answers import extract
from mathtune.config import TrainConfig, build_config
from mathtune.errors import ConfigError, MathtuneError, TrainingHalted

from conftest import tiny_train_config

pytestmark = pytest.mark.usefixtures("one_thread")


def make_config(model_dir, out, **overrides) -> TrainConfig:
    return tiny_train_config(model_dir, out, **{**dict(max_samples=8, max_steps=1), **overrides})


def run_cli(capsys, *argv) -> tuple[int, str]:
    from mathtune.cli import main

    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


# --------------------------------------------------------------------------- one-line errors


def test_lr_scheduler_typo_cosin_is_a_one_line_error_naming_the_fix(tmp_path, capsys):
    code, err = run_cli(capsys, "train", "--lr-scheduler", "cosin", "--output-dir", tmp_path / "run")
    assert code == 2 and err.count("\n") == 1
    assert "--lr-scheduler 'cosin' is unknown: did you mean 'cosine'?" in err
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("lr_scheduler: cosin\n")
    with pytest.raises(ConfigError, match=f"{recipe}: --lr-scheduler 'cosin' is unknown"):
        build_config(TrainConfig, recipe, {})


def test_unwritable_output_dir_is_a_one_line_error(tiny_model_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code, err = run_cli(capsys, "train", "--model", tiny_model_dir, "--task", "unit-conversion", "--max-steps", 1,
                        "--max-samples", 8, "--batch-size", 4, "--output-dir", blocker / "run", "--no-wandb")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err  # refused before loading the model
    assert err.startswith(f"error: --output-dir {blocker / 'run'}: cannot write there (not a directory") and "writable" in err


def test_target_modules_all_linear_flag_is_not_a_module_named_all_linear(tiny_model_dir, tmp_path):
    from mathtune.cli import build_parser

    args = build_parser().parse_args(["train", "--target-modules", "all-linear"])
    assert args.target_modules == ["all-linear"]  # what argparse hands over
    session = training.setup(make_config(tiny_model_dir, tmp_path / "run", target_modules=args.target_modules))
    # "...layers.0.self_attn.q_proj.lora_A.default.weight": the adapted module is 4th from the end
    adapted = {name.split(".")[-4] for name, _ in session.model.named_parameters() if ".lora_A." in name}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_unknown_lora_target_names_the_real_flag(tiny_model_dir, tmp_path):
    with pytest.raises(MathtuneError, match="set --target-modules to some of these") as err:
        training.setup(make_config(tiny_model_dir, tmp_path / "run", target_modules=["qproj"]))
    assert "--lora-targets" not in str(err.value)


def test_device_cuda_1_is_not_silently_trained_on_cuda_0(monkeypatch):
    from mathtune.hardware import check_training_device

    assert build_config(TrainConfig, None, {"device": "cuda:1"}).device == "cuda:1"  # a valid flag value now
    with pytest.raises(ConfigError, match="--device 'gpu0' is unknown"):
        build_config(TrainConfig, None, {"device": "gpu0"})
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(MathtuneError, match="CUDA_VISIBLE_DEVICES=1 mathtune train --device cuda"):
        check_training_device("cuda:1")
    # two visible GPUs and one process: Trainer would wrap the model in DataParallel over both
    with pytest.raises(MathtuneError, match="2 GPUs are visible .* DataParallel"):
        check_training_device("cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    check_training_device("cuda")
    check_training_device("cuda:0")
    monkeypatch.setenv("LOCAL_RANK", "1")  # torchrun: each process owns its GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_training_device("cuda")


def test_malformed_eval_file_fails_at_start_not_after_training(tiny_model_dir, tmp_path):
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"}) + "\n"
                                  for i in range(8)))
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text('{"question": "What is 1 + 1?", "answer": "#### 2"}\n{"question": "broken\n')
    config = make_config(tiny_model_dir, tmp_path / "run", task="file", train_file=str(train_file),
                         eval_file=str(eval_file), eval_samples=1)
    with pytest.raises(MathtuneError, match=f"{eval_file}:2: not valid JSON"):
        training.setup(config)
    assert not (tmp_path / "run").exists()  # failed before anything was written


# --------------------------------------------------------------------------- answer extraction


def test_answer_is_3_over_4_with_a_full_stop_reads_0_75_not_3():
    assert extract("The answer is 3/4.") == (0.75, "answer_is")
    assert extract("so she has 3/4. Then") == (0.75, "last_number")
    assert extract("The answer is 3/4.5 cups") == (3 / 4.5, "answer_is")  # a decimal denominator still reads


def test_boxed_dollar_with_latex_thousands_separator_reads_1000_not_1():
    assert extract(r"\boxed{\$1{,}000}") == (1000.0, "boxed")
    assert extract(r"\boxed{12{,}345{,}678}") == (12345678.0, "boxed")


# --------------------------------------------------------------------------- stale weights


def test_lora_run_then_full_run_in_the_same_dir_never_evaluates_the_old_adapter(tiny_model_dir, tmp_path, capsys):
    from mathtune.models.load import load_model

    out = tmp_path / "run"
    training.run(training.setup(make_config(tiny_model_dir, out)))
    assert (out / "adapter_config.json").is_file()
    training.run(training.setup(make_config(tiny_model_dir, out, method="full", learning_rate=1e-4)))
    assert not (out / "adapter_config.json").exists()
    assert "held an earlier run's model" in capsys.readouterr().out
    (aside,) = out.glob("previous-*")
    assert (aside / "adapter_config.json").is_file() and (aside / "adapter_model.safetensors").is_file()
    loaded = load_model(str(out))
    assert not loaded.is_adapter  # the full run's weights, not the earlier adapter


def test_guard_halted_rerun_leaves_no_earlier_final_model_looking_current(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    training.run(training.setup(make_config(tiny_model_dir, out)))
    session = training.setup(make_config(tiny_model_dir, out))

    def halted(**kwargs):
        raise TrainingHalted("nonfinite_loss", "test halt", 1)

    monkeypatch.setattr(session.trainer, "train", halted)
    with pytest.raises(TrainingHalted):
        training.run(session)
    assert not (out / "adapter_model.safetensors").exists() and not (out / "trainer_state.json").exists()


def test_unwritable_comparison_output_is_a_one_line_error_before_evaluating(tiny_model_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code, err = run_cli(capsys, "compare", "--base-model", tiny_model_dir, "--trained-model", tiny_model_dir,
                        "--task", "unit-conversion", "--max-samples", 2, "--output", blocker / "comparison.json")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: --output {blocker / 'comparison.json'}: cannot write there (not a directory")


def test_unwritable_model_cache_directory_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    from mathtune.models.load import load_model

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("MATHTUNE_CACHE", str(blocker / "cache"))
    with pytest.raises(MathtuneError, match="set MATHTUNE_CACHE to a writable directory") as err:
        load_model("smollm2-135m")
    assert "\n" not in str(err.value) and str(blocker / "cache") in str(err.value)
