"""Every shipped recipe in configs/ loads, is named after what it trains, and says how to run it."""

from __future__ import annotations

from pathlib import Path

import pytest

from mathtune.config import TrainConfig, build_config
from mathtune.grpo_config import GRPOSettings

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "configs"
# configs/accelerate/ holds launcher configs, not recipes (tests/test_distributed.py loads those)
RECIPES = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name != "accelerate")
REQUIRED = (
    "smollm2-135m/lora-unit-conversion.yaml",
    "smollm2-135m/lora-gsm8k.yaml",
    "smollm2-135m/full-gsm8k.yaml",
    "smollm2-135m/lora-gsm8k-cpu.yaml",
    "qwen2.5-0.5b/lora-gsm8k.yaml",
    "smollm2-135m/grpo-gsm8k-cpu.yaml",
)


def is_grpo(path: Path) -> bool:
    """GRPO recipes are grpo-<task>[-variant].yaml and run with `mathtune grpo`."""
    return path.stem.startswith("grpo-")


def test_required_recipes_are_shipped():
    shipped = {p.relative_to(CONFIGS).as_posix() for p in RECIPES}
    assert set(REQUIRED) <= shipped, f"missing: {sorted(set(REQUIRED) - shipped)}"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_recipe_loads_and_matches_its_name(path):
    if is_grpo(path):
        config = build_config(GRPOSettings, path)
        # it starts from the run dir a shipped SFT recipe of the same model writes
        sft_runs = {build_config(TrainConfig, p).output_dir for p in RECIPES if p.parent == path.parent and not is_grpo(p)}
        assert config.model in sft_runs, (config.model, sft_runs)
        assert path.stem.startswith(f"grpo-{config.task}")
        assert not Path(config.output_dir).is_absolute()
        return
    config = build_config(TrainConfig, path)
    # configs/<model>/<method>-<task>.yaml, or <method>-<task>-<variant>.yaml (e.g. -cpu)
    assert path.parent.name == config.model
    assert path.stem == f"{config.method}-{config.task}" or path.stem.startswith(f"{config.method}-{config.task}-")
    assert not Path(config.output_dir).is_absolute(), "runs go under the working dir, not a machine path"
    assert "wandb_key_file" not in path.read_text(), "recipes are shared: keys stay out of them"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_recipe_header_says_how_to_run_it(path):
    text = path.read_text()
    header = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    assert header, f"{path.name}: starts without a comment header"
    command = "grpo" if is_grpo(path) else "train"
    assert f"mathtune {command} --config configs/{path.relative_to(CONFIGS).as_posix()}" in "\n".join(header)


def test_demo_recipe_fits_the_ten_minute_cpu_budget():
    # training budget + two 200-item evals (base, trained) of short answers must stay under 10 minutes
    config = build_config(TrainConfig, CONFIGS / "smollm2-135m/lora-unit-conversion.yaml")
    assert config.model == "smollm2-135m" and config.method == "lora" and config.task == "unit-conversion"
    assert config.eval.samples == 200
    assert config.max_time is not None and config.max_time <= 6 * 60
    assert config.eval.generation.max_new_tokens <= 64  # targets are one line and '#### N'
