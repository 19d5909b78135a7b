"""Library hygiene and safety: no deprecated API on training's path, no secret in any written file,
no remote code and no unpickling unless the user asks."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from mathtune import training
from mathtune.config import TrainConfig, build_config
from mathtune.errors import MathtuneError

REPO_ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def _config(model_dir, out, **overrides) -> TrainConfig:
    settings = dict(model=str(model_dir), task="unit-conversion", max_samples=8, batch_size=4, max_steps=2,
                    save_steps=1, output_dir=str(out), precision="fp32", device="cpu", guards=True, sample_every=0,
                    max_new_tokens=8, lr_scheduler="cosine", warmup_ratio=0.25, seed=0)
    settings.update(overrides)
    return build_config(TrainConfig, None, settings)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_training_and_resume_raise_no_future_or_deprecation_warning(method, tiny_model_dir, tmp_path):
    """Setup, guards (preflight, collapse sampling), checkpoints and a resume, with every
    FutureWarning/DeprecationWarning recorded: a deprecated call on this path is removed in a later
    library release, and then training breaks."""
    out = tmp_path / "run"
    extra = {"gradient_checkpointing": True, "learning_rate": 1e-4} if method == "full" else {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        training.run(training.setup(_config(tiny_model_dir, out, method=method, **extra)))
        resumed = training.run(training.setup(_config(tiny_model_dir, out, method=method, max_steps=3,
                                                      resume="auto", **extra)))
    assert resumed.steps == 3
    deprecated = [f"{w.category.__name__} at {w.filename}:{w.lineno}: {w.message}" for w in caught
                  if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert deprecated == []


# --------------------------------------------------------------------------- secrets


def test_wandb_key_is_in_no_file_the_run_writes(tiny_model_dir, tmp_path):
    pytest.importorskip("wandb")
    key = "sekrit0wandb0key0" + "9" * 23  # 40 characters, the length of a real W&B key
    key_file = tmp_path / "wandb.key"
    key_file.write_text(key + "\n")
    run_dir, wandb_dir = tmp_path / "run", tmp_path / "wandb-logs"
    wandb_dir.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir),
           "WANDB_SILENT": "true", "WANDB_API_KEY": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "mathtune.cli", "train", "--model", str(tiny_model_dir), "--task", "unit-conversion",
         "--max-samples", "8", "--batch-size", "4", "--max-steps", "2", "--save-steps", "1", "--wandb",
         "--wandb-key-file", str(key_file), "--output-dir", str(run_dir), "--max-new-tokens", "4"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = [p for root in (run_dir, wandb_dir) for p in root.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in written)  # wandb really ran and wrote its offline log
    assert any(p.parent.name.startswith("checkpoint-") for p in written)
    leaks = [str(p) for p in written if key.encode() in p.read_bytes()]
    assert leaks == []
    assert key not in proc.stdout + proc.stderr
    assert [p for p in tmp_path.rglob("*") if p.is_file() and p != key_file and key.encode() in p.read_bytes()] == []


# --------------------------------------------------------------------------- remote code and pickle


def test_remote_code_in_a_model_dir_does_not_run_unless_asked(tiny_model_dir, tmp_path):
    from mathtune.models.load import load_model

    sentinel = tmp_path / "remote-code-ran"
    model_dir = tmp_path / "custom"
    model_dir.mkdir()
    for item in Path(tiny_model_dir).iterdir():
        (model_dir / item.name).write_bytes(item.read_bytes())
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                          "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (model_dir / "config.json").write_text(json.dumps(config))
    code = f"open({str(sentinel)!r}, 'w').write('ran')\nfrom transformers import LlamaConfig as EvilConfig\n"
    (model_dir / "configuration_evil.py").write_text(code)
    (model_dir / "modeling_evil.py").write_text(code.replace("LlamaConfig as EvilConfig", "LlamaForCausalLM as EvilModel"))

    loaded = load_model(str(model_dir))  # the config's own model_type (llama) is used; its code is not run
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert not sentinel.exists()


def test_a_pickle_checkpoint_is_not_unpickled_unless_asked(tmp_path):
    from mathtune.models.load import load_model

    sentinel = tmp_path / "pickle-ran"

    class Payload:  # unpickling calls open(sentinel, "w"): what a hostile checkpoint would do
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    model_dir = tmp_path / "bin-only"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                       "vocab_size": 64, "hidden_size": 8, "intermediate_size": 16,
                                                       "num_hidden_layers": 1, "num_attention_heads": 2}))
    (model_dir / "pytorch_model.bin").write_bytes(pickle.dumps({"weight": Payload()}))
    with pytest.raises(MathtuneError, match="--allow-pickle"):
        load_model(str(model_dir))
    assert not sentinel.exists()
