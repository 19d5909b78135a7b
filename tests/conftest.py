"""Shared fixtures: the real SmolLM2 tokenizer and a tiny random-weight Llama built on it.

The tiny model (2 layers, hidden 32) has the real vocabulary and chat template, so every code path
(formatting, masking, generation stop tokens, LoRA targets) is the real one, yet a training step
takes milliseconds. Nothing is downloaded: the tokenizer comes from the bundled GGUF, converted
once into the mathtune cache.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_GSM8K = REPO_ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"


def pytest_configure(config):
    """Under pytest-xdist (``make test`` runs one worker per core) each worker gets its share of the
    cores: 2 workers x 2 intra-op threads on 2 cores would spin-wait on each other. Subprocesses the
    tests start inherit the share through OMP_NUM_THREADS."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // int(workers))
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


@pytest.fixture(scope="session")
def smol_tokenizer():
    from mathtune.models.load import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture
def tokenizer(smol_tokenizer):
    """A private copy, so a test may change padding side or the template without leaking."""
    return copy.deepcopy(smol_tokenizer)


@pytest.fixture
def base_tokenizer(smol_tokenizer):
    """The same vocabulary without a chat template: exercises the plain 'Question: ... Answer:' path."""
    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = None
    return tok


def build_tiny_model(tokenizer, seed: int = 0, hidden: int = 32, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def tiny_train_config(model_dir, out, **overrides):
    """A TrainConfig for the tiny model: unit-conversion rows, fp32 on the CPU, guards off, constant LR
    without warmup (a warmup step at lr 0 would waste one of very few steps); overrides win."""
    from mathtune.config import TrainConfig, build_config

    settings = dict(model=str(model_dir), task="unit-conversion", max_samples=16, batch_size=4, max_steps=3,
                    learning_rate=1e-3, warmup_ratio=0.0, lr_scheduler="constant", output_dir=str(out),
                    precision="fp32", device="cpu", guards=False, seed=0)
    settings.update(overrides)
    return build_config(TrainConfig, None, settings)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_tokenizer) -> Path:
    """A saved tiny model dir: a valid `--model` spec for the CLI and mathtune.load()."""
    path = tmp_path_factory.mktemp("tiny-model")
    build_tiny_model(smol_tokenizer).save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_gguf(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model as a real GGUF file (mathtune's own f32 writer): stands in for the bundled GGUF
    where a test needs a conversion into the cache (its tokenizer reads back without an eos token, so
    load its weights, not ``load_model``)."""
    from mathtune.export import export_model

    result = export_model(str(tiny_model_dir), tmp_path_factory.mktemp("gguf") / "export", gguf=True, gguf_type="f32")
    return result.gguf


@pytest.fixture
def tiny_model(smol_tokenizer):
    return build_tiny_model(smol_tokenizer)


@pytest.fixture
def gsm8k_file():
    if not SHARED_GSM8K.is_file():
        pytest.skip("shared GSM8K training file not present")
    return SHARED_GSM8K


@pytest.fixture
def one_thread():
    """One intra-op thread: on a busy 2-core machine two OpenMP threads spin-wait on each other
    (steps 10-100x slower), and a model this small gains nothing from the second thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
