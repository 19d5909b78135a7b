"""The house rules of issue 30, held as tests: one settings model, short functions in the generation
and evaluation path."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

import mathtune
from mathtune import config as config_module
from mathtune.config import EvalConfig, GenerationArgs, TrainConfig
from mathtune.errors import ConfigError
from mathtune.rft import RFTConfig

PACKAGE = Path(mathtune.__file__).parent
# TrainConfig.batch_size is the training micro-batch (its eval batch is --eval-batch-size): not a
# generation field, so batch_size is left out of the name check below.
GENERATION_ONLY = {f.name for f in dataclasses.fields(GenerationArgs)} - {"batch_size"}


def _settings_fields(tree: ast.Module):
    """(class, field) of every settings dataclass: one named *Config/*Args/*Settings, or one whose
    fields are built with ``setting(...)`` / ``nested(...)``. Records that copy a setting out of a
    summary (learning_curve.CurveKey) are not settings."""
    for node in ast.walk(tree):
        if not (isinstance(node, ast.ClassDef) and any("dataclass" in ast.unparse(d) for d in node.decorator_list)):
            continue
        fields = [s for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)]
        built = any(isinstance(f.value, ast.Call) and ast.unparse(f.value.func) in ("setting", "nested") for f in fields)
        if built or node.name.endswith(("Config", "Args", "Settings")):
            for f in fields:
                yield node.name, f.target.id


def test_no_generation_field_is_declared_in_more_than_one_dataclass():
    declared: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for cls, name in _settings_fields(ast.parse(path.read_text(encoding="utf-8"))):
            if name in GENERATION_ONLY:
                declared.setdefault(name, []).append(f"{path.relative_to(PACKAGE)}:{cls}")
    assert declared == {name: ["config.py:GenerationArgs"] for name in GENERATION_ONLY}


# (settings that break one rule, the words of that rule's message)
RULES = [
    ({"top_p": 1.5}, r"--top-p must be in \(0, 1\]"),
    ({"temperature": 0.0, "num_samples": 4}, r"--temperature (> 0|must be > 0)"),
    ({"temperature": -1.0}, r"--temperature must be >= 0"),
    ({"batch_size": 0}, r"--(eval-)?batch-size must be a positive integer"),
    ({"max_new_tokens": 0}, r"--max-new-tokens must be a positive integer"),
]


def _configs(settings: dict):
    """Every command config that generates, with ``settings`` applied where it has them."""
    rft = {"temperature": 0.7, "num_samples": 4, **settings} if "temperature" not in settings else settings
    train = {("eval_batch_size" if k == "batch_size" else k): v for k, v in settings.items()}
    yield "eval", EvalConfig.from_flat(task="unit-conversion", **settings)
    yield "rft", RFTConfig.from_flat(task="unit-conversion", output="x.jsonl",
                                     **{k: v for k, v in rft.items() if k != "protocol"})
    train_known = {k: v for k, v in train.items() if k in config_module.exposed_fields(TrainConfig)}
    if train_known:
        yield "train", TrainConfig.from_flat(task="unit-conversion", **train_known)
    yield "GenerationArgs", GenerationArgs(**settings)


@pytest.mark.parametrize("settings, message", RULES)
def test_each_generation_rule_is_raised_from_one_function(monkeypatch, settings, message):
    for name, config in _configs(settings):
        with pytest.raises(ConfigError, match=message):
            config.validate()
    # with GenerationArgs.problems switched off, the same bad settings pass every config: no second
    # copy of the rule exists anywhere else
    monkeypatch.setattr(GenerationArgs, "problems", lambda self, *args, **kwargs: [])
    for name, config in _configs(settings):
        config.validate()


def test_the_max_samples_rule_is_raised_from_one_function(monkeypatch):
    bad = [("eval", EvalConfig.from_flat(task="unit-conversion", max_samples=0)),
           ("rft", RFTConfig.from_flat(task="unit-conversion", output="x.jsonl", max_samples=-5)),
           ("train", TrainConfig.from_flat(task="unit-conversion", max_samples=0))]
    for _name, config in bad:
        with pytest.raises(ConfigError, match="--max-samples must be a positive count or -1"):
            config.validate()
    monkeypatch.setattr(config_module, "max_samples_problem", lambda value: None)
    for _name, config in bad:
        config.validate()


def test_flat_flags_reach_the_nested_settings_and_save_flat(tmp_path):
    from mathtune.config import build_config, to_yaml_dict

    config = build_config(TrainConfig, None, {"task": "unit-conversion", "eval_samples": 7, "eval_batch_size": 3,
                                               "max_new_tokens": 40, "calculator": False})
    assert (config.eval.samples, config.eval.generation.batch_size, config.eval.generation.max_new_tokens,
            config.eval.generation.calculator) == (7, 3, 40, False)
    saved = to_yaml_dict(config)
    assert saved["eval_samples"] == 7 and saved["eval_batch_size"] == 3 and "eval" not in saved
    # a nested YAML section is read as well as the flat keys
    path = tmp_path / "c.yaml"
    path.write_text("task: unit-conversion\ngeneration:\n  temperature: 0.5\n  num_samples: 2\n")
    eval_config = build_config(EvalConfig, path)
    assert (eval_config.generation.temperature, eval_config.generation.num_samples) == (0.5, 2)
    # train exposes only its comparison's batch, length and calculator: no --temperature for train
    assert "temperature" not in config_module.exposed_fields(TrainConfig)


LONGEST_FUNCTION = 60
CHECKED = ["evaluation.py", "guards.py", *[f"generation/{p.name}" for p in (PACKAGE / "generation").glob("*.py")]]


@pytest.mark.parametrize("relative", sorted(CHECKED))
def test_no_long_functions_in_the_generation_and_evaluation_path(relative):
    tree = ast.parse((PACKAGE / relative).read_text(encoding="utf-8"))
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > LONGEST_FUNCTION]
    assert long == []


def test_every_flag_name_is_one_setting():
    from mathtune.grpo_config import GRPOSettings

    for cls in (TrainConfig, EvalConfig, RFTConfig, GRPOSettings):
        names = [ff.name for ff in config_module.flat_fields(cls) if ff.exposed]
        assert len(names) == len(set(names)), f"{cls.__name__}: {sorted(n for n in names if names.count(n) > 1)}"
