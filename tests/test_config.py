"""Config layering (defaults < YAML < flags), validation that reports every problem, secrets."""

from __future__ import annotations

import argparse

import pytest
import yaml

from mathtune.config import (
    EvalConfig,
    TrainConfig,
    add_config_arguments,
    build_config,
    config_from_args,
    save_config,
)
from mathtune.errors import ConfigError, MathtuneError


def parse_train(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    add_config_arguments(parser, TrainConfig)
    return config_from_args(TrainConfig, parser.parse_args(argv))


def test_flags_override_yaml_which_overrides_defaults(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning-rate: 0.001\nbatch_size: 4\nlora_r: 8\n")
    config = parse_train(["--config", str(recipe), "--batch-size", "2", "--no-wandb"])
    assert config.learning_rate == 0.001  # from YAML
    assert config.batch_size == 2  # flag wins
    assert config.lora_r == 8
    assert config.lora_alpha == TrainConfig.from_flat().lora_alpha  # default
    assert config.wandb is False


def test_boolean_and_list_flags(tmp_path):
    config = parse_train(["--wandb", "--target-modules", "q_proj", "v_proj", "--gradient-checkpointing"])
    assert config.wandb is True and config.gradient_checkpointing is True
    assert config.target_modules == ["q_proj", "v_proj"]


def test_resume_flag_alone_means_auto():
    assert parse_train(["--resume"]).resume == "auto"
    assert parse_train([]).resume is None


def test_every_problem_reported_at_once():
    with pytest.raises(ConfigError) as info:
        build_config(TrainConfig, overrides={"batch_size": 0, "learning_rate": -1.0, "max_samples": 0,
                                             "train_file": "nope.jsonl"})
    message = str(info.value)
    assert message.startswith("4 problems")
    for part in ("--batch-size must be > 0", "--learning-rate must be > 0", "--max-samples must be",
                 "--train-file nope.jsonl: no such file"):
        assert part in message


def test_unknown_yaml_key_suggests_the_right_one(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rat: 0.1\n")
    with pytest.raises(ConfigError, match=r"r.yaml: unknown setting 'learning_rat' \(did you mean 'learning_rate'\?\)"):
        build_config(TrainConfig, recipe)


def test_yaml_type_errors_and_syntax_errors_name_the_file(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("batch_size: four\n")
    with pytest.raises(ConfigError, match="batch_size: expected an integer"):
        build_config(TrainConfig, recipe)
    recipe.write_text("a: [1,\n")
    with pytest.raises(MathtuneError, match=r"r.yaml:\d+: invalid YAML"):
        build_config(TrainConfig, recipe)


def test_saved_config_has_no_secrets(tmp_path):
    key = tmp_path / "key"
    key.write_text("secret-value")
    config = build_config(TrainConfig, overrides={"wandb_key_file": str(key)})
    save_config(config, tmp_path / "mathtune_config.yaml")
    text = (tmp_path / "mathtune_config.yaml").read_text()
    assert "wandb_key_file" not in text and "secret-value" not in text
    assert yaml.safe_load(text)["learning_rate"] == config.learning_rate


def test_eval_all_means_whole_split_and_sampling_rules():
    assert build_config(EvalConfig, overrides={"all": True}).max_samples == -1
    with pytest.raises(ConfigError, match="--num-samples > 1 needs --temperature > 0"):
        build_config(EvalConfig, overrides={"num_samples": 4})


@pytest.mark.parametrize("command", ["eval", "compare"])
def test_no_cache_flag_turns_the_cache_bypass_on(command):
    # argparse's BooleanOptionalAction would read --no-cache as "cache: off" = no_cache False
    from mathtune.cli import build_parser

    required = {"eval": [], "compare": ["--base-model", "a", "--trained-model", "b"]}[command]
    parser = build_parser()
    on = config_from_args(EvalConfig, parser.parse_args([command, *required, "--no-cache"]))
    off = config_from_args(EvalConfig, parser.parse_args([command, *required]))
    assert on.no_cache is True
    assert off.no_cache is False


def test_lr_scheduler_typo_cosin_is_a_one_line_error_naming_the_fix(tmp_path, capsys):
    from mathtune.cli import main

    code = main(["train", "--lr-scheduler", "cosin", "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "--lr-scheduler 'cosin' is unknown: did you mean 'cosine'?" in err
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("lr_scheduler: cosin\n")
    with pytest.raises(ConfigError, match=f"{recipe}: --lr-scheduler 'cosin' is unknown"):
        build_config(TrainConfig, recipe, {})
