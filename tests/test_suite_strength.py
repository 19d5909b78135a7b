"""Tests that can fail where the suite's earlier ones could not (issue #10, item 7).

- the bootstrap interval's coverage, measured: a 90% interval labelled 95% fails here
- `mathtune data` on the real CLI
- the fallback loss for models whose forward takes no loss kwargs, really run by Trainer
- a --no-guards run logs NaN losses as NaN, not 0.0
- the API's batched-vs-single agreement on a model whose answers differ per prompt
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mathtune import training
from mathtune.training import recipe
from mathtune.comparison import paired_bootstrap_ci
from mathtune.config import TrainConfig, build_config

from conftest import tiny_train_config

pytestmark = pytest.mark.usefixtures("one_thread")


def make_config(model_dir, out, **overrides) -> TrainConfig:
    return tiny_train_config(model_dir, out, **{**dict(max_steps=2), **overrides})


# --------------------------------------------------------------------------- bootstrap coverage


def _coverage(level: float, trials: int = 400, n: int = 200, resamples: int = 1000) -> float:
    """How often the paired interval covers the true accuracy difference, over seeded eval sets.

    Per item (base, trained) is drawn from a fixed 2x2 table: both right 0.30, only base 0.10, only
    trained 0.20, neither 0.40: base accuracy 0.40, trained 0.50, true difference +0.10 exactly.
    """
    rng = np.random.default_rng(1234)
    outcomes = np.array([[1, 1], [1, 0], [0, 1], [0, 0]], dtype=bool)
    true_difference = (0.30 + 0.20) - (0.30 + 0.10)
    covered = 0
    for trial in range(trials):
        pairs = outcomes[rng.choice(4, size=n, p=[0.30, 0.10, 0.20, 0.40])]
        low, high = paired_bootstrap_ci(pairs[:, 0], pairs[:, 1], n_resamples=resamples, seed=trial, level=level)
        covered += low <= true_difference <= high
    return covered / trials


def test_bootstrap_95_interval_covers_the_true_difference_95_percent_of_the_time():
    # 400 trials: the binomial standard error of a 95% coverage is sqrt(.95 x .05 / 400) = 1.1 points
    assert 0.93 <= _coverage(0.95) <= 0.97
    # and the check can tell levels apart: a 90% interval misses it about twice as often
    assert _coverage(0.90) < 0.93


# --------------------------------------------------------------------------- mathtune data


def test_data_command_shows_rows_tokens_and_the_supervised_span(tiny_model_dir, capsys):
    from mathtune.cli import main
    from mathtune.tasks import get_task

    assert main(["data", "--model", str(tiny_model_dir), "--task", "unit-conversion", "--max-samples", "5",
                 "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert f"task unit-conversion (train split), model {tiny_model_dir} (chat template), --max-length 512" in out
    assert "rows: read 5, kept 5, dropped 0" in out
    first = get_task("unit-conversion", seed=42).examples("train")[0]
    assert f"row {first.id}: non-masked labels:" in out
    # the supervised span is exactly the answer (plus the end-of-turn token), the prompt is outside it
    rendered = out.split("supervised span between \u27e6 \u27e7:\n", 1)[1]
    prompt, _, rest = rendered.partition("\u27e6")
    span = rest.partition("\u27e7")[0]
    assert span.startswith(first.answer_text) and first.question not in span
    assert first.question in prompt
    # a bad flag value: one line, exit 2
    assert main(["data", "--model", str(tiny_model_dir), "--task", "unit-conversion", "--max-length", "0"]) == 2


# --------------------------------------------------------------------------- fallback loss


def test_fallback_loss_for_models_without_loss_kwargs_runs_and_normalises_by_the_steps_tokens(
        tiny_model_dir, tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM

    # a model that says it takes no loss kwargs: Trainer would average per micro-batch
    monkeypatch.setattr(LlamaForCausalLM, "accepts_loss_kwargs", False, raising=False)
    calls = []
    real = recipe.token_normalised_loss

    def counting(outputs, labels, num_items_in_batch=None):
        calls.append(int(num_items_in_batch))
        return real(outputs, labels, num_items_in_batch)

    monkeypatch.setattr(recipe, "token_normalised_loss", counting)

    def train_with(out, batch_size, accumulation):
        # SGD: the update IS the gradient, so a wrongly weighted loss shows in the weights
        session = training.setup(make_config(tiny_model_dir, out, batch_size=batch_size,
                                             gradient_accumulation_steps=accumulation, learning_rate=0.5,
                                             max_grad_norm=0.0, supervised_logits=False))
        assert session.trainer.model_accepts_loss_kwargs is False
        assert session.trainer.compute_loss_func is counting
        session.trainer.args.optim = "sgd"
        training.run(session)
        from safetensors.torch import load_file

        return load_file(str(out / "adapter_model.safetensors")), session

    whole, session = train_with(tmp_path / "b8", 8, 1)
    assert len(calls) == 2  # one micro-batch per step, 2 steps: the fallback computed every loss
    step_tokens = calls[:]
    calls.clear()
    accumulated, _ = train_with(tmp_path / "b2x4", 2, 4)
    assert len(calls) == 8
    # every micro-batch of a step divides by the same count: the supervised tokens of the whole step
    assert calls[:4] == [step_tokens[0]] * 4 and calls[4:] == [step_tokens[1]] * 4
    assert max(float((accumulated[k] - whole[k]).norm() / whole[k].norm()) for k in whole) < 1e-5


# --------------------------------------------------------------------------- NaN logged as NaN


def test_no_guards_run_logs_nan_loss_as_nan_not_zero(tiny_model_dir, tmp_path):
    session = training.setup(make_config(tiny_model_dir, tmp_path / "run", guards=False, max_steps=2))
    base = session.model.get_base_model()
    base.lm_head.register_forward_hook(lambda module, inputs, out: out * float("nan"))
    training.run(session)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    assert all(math.isnan(line["loss"]) for line in lines), lines


# --------------------------------------------------------------------------- API on a varied model


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
