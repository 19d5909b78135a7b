"""Every model family through the whole pipeline: train (LoRA 2 steps, --full 1 step) -> eval (the
CPU fast path's greedy output equals plain ``generate``'s) -> export -> reload with plain
transformers, and GGUF where mathtune writes the architecture (llama, qwen2).

The models are tiny random-weight ones (tests/families.py), one per family, each with the setting
that makes it differ from Llama. One LoRA run per family is shared by the stages after training
(module-scoped fixtures), so the file trains 12 times in all, a few seconds each.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/families.py, a helper beside this file
from families import FAMILIES, build_family_model, save_family_model  # noqa: E402

from mathtune import families  # noqa: E402
from mathtune.cli import main  # noqa: E402
from mathtune.data import encode_prompt, end_of_turn_token_id, format_prompt  # noqa: E402
from mathtune.errors import MathtuneError  # noqa: E402

NAMES = list(FAMILIES)
NEW_TOKENS = 16
EVAL_QUESTIONS = [
    ("Convert 3 km to m.", 3000),
    ("A train leaves at 9 am and travels 120 km at 60 km per hour, then stops for half an hour and travels "
     "another 90 km at 45 km per hour. At what hour of the day does it arrive?", 13.5),
    ("What is 12 * 7?", 84),
]
# The CPU fast path's attention does neither logit soft-capping (Gemma 2) nor a sliding window shorter
# than the batch (its rows are laid out [prefix][padding][rest], so padding would use up the window):
# for these the Generator says so in one line and decodes with plain model.generate instead.
FAST_PATH_FALLS_BACK = {"gemma2": "soft-capping", "mistral": "sliding window"}
COMMON = ["--task", "unit-conversion", "--max-samples", "8", "--batch-size", "4", "--learning-rate", "1e-3",
          "--warmup-ratio", "0", "--lr-scheduler", "constant", "--precision", "fp32", "--device", "cpu",
          "--eval-samples", "0", "--no-guards", "--no-wandb", "--seed", "0"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread (see tests/conftest.py ``one_thread``), for the whole module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=NAMES)
def family(request):
    return FAMILIES[request.param]


@pytest.fixture(scope="module")
def family_dir(family, smol_tokenizer, tmp_path_factory) -> Path:
    return save_family_model(smol_tokenizer, family, tmp_path_factory.mktemp(f"{family.name}-model"))


@pytest.fixture(scope="module")
def lora_run(family, family_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp(f"{family.name}-lora") / "run"
    assert main(["train", "--model", str(family_dir), "--max-steps", "2", "--output-dir", str(out), *COMMON]) == 0
    return out


def _plain_greedy(model, tokenizer, questions) -> list[str]:
    """Plain transformers: one prompt at a time, no padding, stop at the end-of-turn token."""
    eot = end_of_turn_token_id(tokenizer)
    texts = []
    for question in questions:
        ids = torch.tensor([encode_prompt(tokenizer, format_prompt(tokenizer, question))])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                 do_sample=False, eos_token_id=eot, pad_token_id=tokenizer.pad_token_id)
        new = out[0, ids.shape[1]:].tolist()
        if new and new[-1] == eot:
            new = new[:-1]
        texts.append(tokenizer.decode(new, skip_special_tokens=True))
    return texts


def _merged_reference(family_dir: Path, run: Path):
    """The LoRA run merged by PEFT itself into the base model loaded by transformers itself."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(family_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, run).merge_and_unload().eval()
    return model, AutoTokenizer.from_pretrained(family_dir)


# --------------------------------------------------------------------------- family facts


def test_template_system_role_and_lora_defaults(family, smol_tokenizer):
    model, tokenizer = build_family_model(smol_tokenizer, family)
    assert families.takes_system_role(tokenizer) is family.takes_system_role
    prompt = format_prompt(tokenizer, "Convert 3 km to m.")  # one user turn, whatever the template allows
    assert "Convert 3 km to m." in prompt
    targets = families.lora_target_modules(model)
    linear = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(targets) <= linear and "lm_head" not in targets
    if family.name == "phi3":
        assert targets == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    else:
        assert targets == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_family_without_defaults_or_llama_names_is_a_one_line_error(smol_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    with pytest.raises(MathtuneError, match=r"model type 'gpt2'.*c_attn.*set --target-modules"):
        families.lora_target_modules(model)


# --------------------------------------------------------------------------- train


def test_lora_two_steps_adapt_the_family_default_modules(family, lora_run):
    from safetensors.torch import load_file

    config = json.loads((lora_run / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(families.FAMILIES[family.name].lora_targets)
    assert json.loads((lora_run / "trainer_state.json").read_text())["global_step"] == 2
    weights = load_file(lora_run / "adapter_model.safetensors")
    lora_b = [t for name, t in weights.items() if "lora_B" in name]
    # PEFT starts every B at zero: after 2 steps each adapted module has moved
    assert lora_b and all(t.abs().max() > 0 for t in lora_b)
    adapted = {name.split(".lora_B")[0].rsplit(".", 1)[-1] for name in weights if "lora_B" in name}
    assert adapted == set(families.FAMILIES[family.name].lora_targets)


def test_full_fine_tuning_one_step_changes_the_weights(family, family_dir, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "full"
    assert main(["train", "--model", str(family_dir), "--full", "--max-steps", "1", "--output-dir", str(out),
                 *COMMON]) == 0
    before, after = load_file(family_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert any("layers.0." in name for name in changed) and any("layers.1." in name for name in changed)


# --------------------------------------------------------------------------- eval


def test_eval_fast_path_greedy_equals_plain_generate(family, family_dir, lora_run, tmp_path, capfd):
    # questions of very different lengths: one batch pads the short ones by ~30 tokens
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"question": q, "answer": f"#### {a}"}) + "\n" for q, a in EVAL_QUESTIONS))
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(lora_run), "--task", "file", "--eval-file", str(items), "--all",
                 "--max-new-tokens", str(NEW_TOKENS), "--no-calculator", "--no-loop-stop", "--no-cache",
                 "--precision", "fp32", "--device", "cpu", "--output", str(out)]) == 0
    (log,) = out.glob("*.jsonl")
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["question"] for r in records] == [q for q, _ in EVAL_QUESTIONS]
    model, tokenizer = _merged_reference(family_dir, lora_run)
    assert [r["output"] for r in records] == _plain_greedy(model, tokenizer, [q for q, _ in EVAL_QUESTIONS])
    notice = "CPU fast generation path off" in capfd.readouterr().err
    assert notice == (family.name in FAST_PATH_FALLS_BACK), "the fallback (and only it) is announced"


# --------------------------------------------------------------------------- export


QUESTIONS = ["Convert 3 km to m.", "How many grams are in 2.5 kilograms?", "What is 12 * 7?"]


@pytest.fixture(scope="module")
def exported(family, lora_run, tmp_path_factory):
    from mathtune.export import export_model

    return export_model(str(lora_run), tmp_path_factory.mktemp(f"{family.name}-export") / "export",
                        gguf=family.gguf, gguf_type="f32")


def test_export_reloads_in_plain_transformers_with_the_same_greedy_output(family, family_dir, lora_run, exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(exported.output, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(exported.output)
    assert model.config.model_type == family.name
    reference, ref_tokenizer = _merged_reference(family_dir, lora_run)
    assert tokenizer.chat_template == ref_tokenizer.chat_template
    assert model.generation_config.eos_token_id == end_of_turn_token_id(ref_tokenizer)
    assert _plain_greedy(model, tokenizer, QUESTIONS) == _plain_greedy(reference, ref_tokenizer, QUESTIONS)
    ids = torch.tensor([encode_prompt(tokenizer, format_prompt(tokenizer, QUESTIONS[1]))])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5)


def test_gguf_reads_back_through_transformers_with_the_same_logits(family, exported, tmp_path):
    # mistral's GGUF is checked against llama.cpp by `make check-gguf` (transformers' GGUF reader drops its
    # sliding window); qwen3, gemma2 and phi3 are refused by the export (tests/test_export.py)
    if not family.gguf:
        pytest.skip("transformers' GGUF reader drops the sliding window: llama.cpp checks it (make check-gguf)"
                    if family.name == "mistral" else f"the export refuses GGUF for {family.name} (tests/test_export.py)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    alone = tmp_path / "gguf"  # a dir holding only the GGUF, so transformers reads nothing else
    alone.mkdir()
    (alone / exported.gguf.name).symlink_to(exported.gguf.resolve())
    gguf_model = AutoModelForCausalLM.from_pretrained(alone, gguf_file=exported.gguf.name, dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(exported.output, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(exported.output)
    ids = torch.tensor([encode_prompt(tokenizer, format_prompt(tokenizer, QUESTIONS[0]))])
    with torch.no_grad():
        assert float((gguf_model(input_ids=ids).logits - model(input_ids=ids).logits).abs().max()) <= 1e-3
