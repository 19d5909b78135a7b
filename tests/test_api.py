"""mathtune.load() -> MathModel on the tiny model; the lazy top-level API."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

import mathtune
from mathtune.api import MathModel
from mathtune.errors import MathtuneError


@pytest.fixture(scope="module")
def math_model(tiny_model_dir):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: see conftest.one_thread
    yield mathtune.load(tiny_model_dir, device="cpu", precision="fp32", max_new_tokens=6)
    torch.set_num_threads(before)


def test_load_returns_a_math_model(math_model, tiny_model_dir):
    assert isinstance(math_model, MathModel)
    assert math_model.precision == "fp32" and math_model.device == "cpu"
    assert math_model.settings.max_new_tokens == 6
    assert next(math_model.model.parameters()).dtype == torch.float32
    assert str(tiny_model_dir) in repr(math_model)


def test_generate_and_batched_generate_agree(math_model):
    one = math_model.generate("What is 2+3?")
    assert isinstance(one, str)
    many = math_model.batched_generate(["A much longer question about 17 sheep and 5 more sheep?", "What is 2+3?"])
    assert len(many) == 2 and many[1] == one
    # settings per call override the defaults
    ids = math_model.tokenizer(math_model.generate("What is 2+3?", max_new_tokens=2))["input_ids"]
    assert len(ids) <= 2


def test_answer_extracts_numbers_or_nan(math_model, monkeypatch):
    from mathtune.answers import extract

    # the value is the number extract() finds in the (greedy, so repeatable) generated text, else nan
    values = math_model.answer("What is 2+3?")
    found, _method = extract(math_model.generate("What is 2+3?"))
    assert len(values) == 1
    assert math.isnan(values[0]) if found is None else values[0] == found
    canned = {"q1": "2 + 3 = 5\n#### 5", "q2": "no idea", "q3": "The answer is $1,234.50."}
    monkeypatch.setattr(MathModel, "batched_generate", lambda self, qs, **s: [canned[q] for q in qs])
    got = math_model.answer("q1", "q2", "q3")
    assert got[0] == 5.0 and math.isnan(got[1]) and got[2] == 1234.5
    assert math_model.answer(["q1", "q3"]) == [5.0, 1234.5]


def test_api_errors_are_one_line(math_model):
    with pytest.raises(MathtuneError, match="use generate"):
        math_model.batched_generate("a single string")
    with pytest.raises(MathtuneError, match="batched_generate"):
        math_model.generate(["a", "list"])
    with pytest.raises(MathtuneError, match="num_samples=1"):
        math_model.batched_generate(["q"], num_samples=2, temperature=1.0)
    with pytest.raises(MathtuneError, match="unknown generation setting"):
        math_model.generate("q", max_tokens=3)
    with pytest.raises(MathtuneError, match="non-empty"):
        math_model.generate("  ")
    with pytest.raises(MathtuneError, match="at least one"):
        math_model.answer()
    with pytest.raises(MathtuneError, match="no such path|unknown model"):
        mathtune.load("definitely-not-a-model")


def test_top_level_exports_are_lazy():
    code = (
        "import sys, mathtune\n"
        "assert 'torch' not in sys.modules, 'import mathtune must stay light'\n"
        "assert mathtune.__version__\n"
        "from mathtune.evaluation import evaluate_model\n"
        "from mathtune.api import load\n"
        "assert mathtune.evaluate is evaluate_model and mathtune.load is load\n"
        "assert set(['load', 'train', 'evaluate', 'compare']) <= set(mathtune.__all__)\n"
        "assert not hasattr(mathtune, 'nope')  # unknown names still raise AttributeError\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_train_and_compare_map_to_their_modules():
    pytest.importorskip("mathtune.training")
    pytest.importorskip("mathtune.comparison")
    from mathtune.comparison import run_compare
    from mathtune.training import train

    assert mathtune.train is train and mathtune.compare is run_compare


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter dir on the tiny model, with B matrices made non-zero (PEFT starts them at 0,
    which would make merged and unmerged trivially equal) and large enough to change greedy tokens."""
    from mathtune.models.load import apply_lora, load_model

    run = tmp_path_factory.mktemp("lora-run")
    peft_model = apply_lora(load_model(str(tiny_model_dir)).model, r=4, alpha=8)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.5)
    peft_model.save_pretrained(run)
    return run


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_api_answers_equal_eval_per_item_output(lora_run, tmp_path, precision, one_thread):
    """One inference path: mathtune.load(run) and mathtune eval load the adapter the same way
    (merged, same dtype), so each item's text and extracted number are the same."""
    from mathtune.config import EvalConfig, build_config
    from mathtune.evaluation import evaluate_model
    from mathtune.config import GenerationArgs

    config = build_config(EvalConfig, None, dict(model=str(lora_run), task="unit-conversion", max_samples=6,
                                                 max_new_tokens=12, precision=precision, device="cpu", no_cache=True))
    _summary, records = evaluate_model(str(lora_run), config, tmp_path / "eval", verbose=False, progress=False)
    settings = config.generation.resolved(config.task).to_dict()
    model = mathtune.load(lora_run, device="cpu", precision=precision, **settings)
    assert next(model.model.parameters()).dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    questions = [r["question"] for r in records]
    assert model.batched_generate(questions) == [r["output"] for r in records]
    answers = model.answer(questions)
    expected = [math.nan if r["extracted"] is None else r["extracted"] for r in records]
    assert [None if math.isnan(a) else a for a in answers] == [None if math.isnan(e) else e for e in expected]


@pytest.mark.usefixtures("one_thread")
def test_api_batched_and_single_generation_agree_on_a_model_with_varied_answers(smol_tokenizer, tmp_path):
    import mathtune
    from conftest import build_tiny_model

    model = build_tiny_model(smol_tokenizer, seed=0)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)  # large weights: greedy output differs from prompt to prompt
    model.save_pretrained(tmp_path / "varied")
    smol_tokenizer.save_pretrained(tmp_path / "varied")
    api = mathtune.load(tmp_path / "varied", device="cpu", precision="fp32", max_new_tokens=8)
    api.model.to(torch.float64)  # float64: near-tied logits of a random model cannot flip an argmax
    questions = ["A farmer has 17 sheep and buys 5 more. How many now?", "What is 2+3?", "Convert 3.5 km to m.", "Hi"]
    single = [api.generate(q) for q in questions]
    assert len(set(single)) == len(single)  # the model really answers each prompt differently
    assert api.batched_generate(questions) == single
