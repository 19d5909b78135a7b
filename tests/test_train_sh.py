"""scripts/train.sh maps environment variables to `mathtune train` flags: checked against TrainConfig,
so a renamed or removed field cannot leave the script passing a flag that no longer exists."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
from pathlib import Path

from mathtune.config import TrainConfig, exposed_fields

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "train.sh"
# variables that are not a field's own name: the script's one documented alias
ALIASES = {"GRAD_ACCUM": "gradient_accumulation_steps"}


def _mappings() -> list[tuple[str, str]]:
    return re.findall(r"^add (\w+) --([\w-]+)$", SCRIPT.read_text(), flags=re.M)


def test_every_variable_is_a_train_config_field_under_its_own_name():
    fields = set(exposed_fields(TrainConfig))  # flag names, nested settings (eval_samples, ...) included
    mappings = _mappings()
    assert mappings, "no `add VAR --flag` lines found in scripts/train.sh"
    for variable, flag in mappings:
        if flag == "config":  # the YAML file itself, not a field
            continue
        field = flag.replace("-", "_")
        assert field in fields, f"scripts/train.sh: --{flag} is no TrainConfig field"
        assert ALIASES.get(variable, variable.lower()) == field, f"scripts/train.sh: {variable} -> --{flag}"


def test_the_header_lists_exactly_the_variables_the_script_reads():
    header = SCRIPT.read_text().split("# Variables:", 1)[1].split("set -euo", 1)[0]
    listed = set(re.findall(r"\b[A-Z][A-Z_]+\b", header)) - {"OR"}
    assert listed == {variable for variable, _ in _mappings()} | {"GRADIENT_ACCUMULATION_STEPS"}


def test_dry_run_turns_each_variable_into_its_flag():
    env = {k: v for k, v in os.environ.items()}
    env.update({variable: "7" for variable, _ in _mappings()}, DRY_RUN="1")
    env.pop("GRADIENT_ACCUMULATION_STEPS", None)
    out = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, check=True).stdout
    for _, flag in _mappings():
        assert f" --{flag} 7" in out
