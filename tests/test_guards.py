"""Guards on their own: preflight checks, the numeric guard, the collapse detector.

Training here is a plain transformers ``Trainer`` over the tiny model, with a few lines that record
micro-batches into ``StepStats`` the way ``MathtuneTrainer`` does, so the guards are tested against
the real Trainer loop (callback order, clipping, on_pre_optimizer_step) independently of
mathtune.training. The failure zoo (tests/test_failure_zoo.py) runs them through training.setup/run.
"""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import pytest
import torch

from conftest import build_tiny_model
from mathtune import guards
from mathtune.config import TrainConfig
from mathtune.data import IGNORE_INDEX, CompletionCollator, PreparedRow, RowDataset, format_prompt, prepare_examples
from mathtune.errors import MathtuneError, TrainingHalted
from mathtune.step_stats import StepStats
from mathtune.tasks import Example


# --------------------------------------------------------------------------- helpers


def _examples(n: int) -> list[Example]:
    """Small arithmetic rows built from a list: no dependence on any task's generator."""
    return [Example(f"ex-{i}", f"What is {i + 3} plus {2 * i + 1}?", f"{i + 3} + {2 * i + 1} = {3 * i + 4}\n#### {3 * i + 4}",
                    float(3 * i + 4)) for i in range(n)]


def _rows(tokenizer, n=16):
    rows, _ = prepare_examples(_examples(n), tokenizer, max_length=256)
    return rows


def _config(**overrides):
    base = dict(model="unused", task="unit-conversion", learning_rate=1e-3, sample_every=0, max_new_tokens=16)
    base.update(overrides)
    return TrainConfig.from_flat(**base)


def _trainer(model, tokenizer, rows, tmp_path, stats=None, callbacks=(), **args):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    stats = stats if stats is not None else StepStats()

    class RecordingTrainer(Trainer):
        # what MathtuneTrainer does: every micro-batch's inputs and loss into the shared StepStats
        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            stats.record_micro_batch(inputs, loss)
            return loss

    class EndStep(TrainerCallback):
        def on_step_end(self, *a, **k):
            stats.end_step()

    settings = dict(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3,
                    label_names=["labels"], logging_steps=1, save_strategy="no", report_to="none",
                    logging_nan_inf_filter=False, use_cpu=True, disable_tqdm=True, seed=0)
    settings.update(args)
    trainer = RecordingTrainer(model=model, args=TrainingArguments(**settings), train_dataset=RowDataset(rows),
                               data_collator=CompletionCollator(tokenizer.pad_token_id),
                               callbacks=[EndStep(), *callbacks])
    return trainer, stats


def _state(step=0):
    return SimpleNamespace(global_step=step)


def _control(save=False):
    return SimpleNamespace(should_save=save)


def _args(lr=1e-3, max_grad_norm=1.0):
    return SimpleNamespace(learning_rate=lr, max_grad_norm=max_grad_norm)


def _linear_with_grad(value: float):
    layer = torch.nn.Linear(2, 2)
    for p in layer.parameters():
        p.grad = torch.full_like(p, value)
    return layer


def _recorded(loss: float, supervised: int = 3) -> StepStats:
    stats = StepStats()
    labels = torch.tensor([[IGNORE_INDEX] * (4 - supervised) + [7] * supervised])
    stats.record_micro_batch({"labels": labels, "attention_mask": torch.ones(1, 4)}, torch.tensor(loss))
    return stats


# --------------------------------------------------------------------------- preflight: rows


def test_check_rows_passes_and_counts_supervised_tokens(tokenizer):
    rows = _rows(tokenizer, 8)
    results = guards.check_rows(rows)
    assert [r.name for r in results] == ["supervised_tokens", "labels_aligned"]
    assert all(r.passed for r in results)
    assert f"{sum(r.supervised_tokens for r in rows):,} in 8 rows" in results[0].value


def test_row_with_every_label_masked_is_refused_with_its_id(tokenizer):
    rows = _rows(tokenizer, 4)
    bad = rows[2]
    rows[2] = PreparedRow(bad.id, bad.input_ids, [IGNORE_INDEX] * len(bad.input_ids), bad.prompt_len)
    with pytest.raises(TrainingHalted) as exc:
        guards.check_rows(rows)
    assert exc.value.check == "supervised_tokens"
    assert bad.id in str(exc.value) and "--max-length" in str(exc.value) and "mathtune data" in str(exc.value)


def test_pre_shifted_labels_are_detected(tokenizer):
    rows = _rows(tokenizer, 4)
    row = rows[1]
    # the classic mistake: labels[i] = input_ids[i + 1] on the answer span
    shifted = [IGNORE_INDEX] * len(row.input_ids)
    for i in range(row.prompt_len - 1, len(row.input_ids) - 1):
        shifted[i] = row.input_ids[i + 1]
    rows[1] = PreparedRow(row.id, row.input_ids, shifted, row.prompt_len)
    with pytest.raises(TrainingHalted) as exc:
        guards.check_rows(rows)
    assert exc.value.check == "labels_aligned"
    assert guards.PRE_SHIFT_MESSAGE in str(exc.value) and row.id in str(exc.value)


def test_labels_unrelated_to_inputs_are_refused_with_position(tokenizer):
    rows = _rows(tokenizer, 2)
    row = rows[0]
    labels = list(row.labels)
    labels[-2] = labels[-2] + 1  # one wrong token, not a shift
    rows[0] = PreparedRow(row.id, row.input_ids, labels, row.prompt_len)
    with pytest.raises(TrainingHalted, match=f"position {len(labels) - 2} differs"):
        guards.check_rows(rows)


def test_labels_of_other_length_are_refused(tokenizer):
    row = _rows(tokenizer, 1)[0]
    with pytest.raises(TrainingHalted, match="labels for"):
        guards.check_rows([PreparedRow(row.id, row.input_ids, row.labels[:-1], row.prompt_len)])


# --------------------------------------------------------------------------- preflight: trainer


def test_preflight_passes_reports_values_and_leaves_no_trace(tokenizer, tmp_path, capsys):
    rows = _rows(tokenizer, 8)
    trainer, _ = _trainer(build_tiny_model(tokenizer), tokenizer, rows, tmp_path)
    model = trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rng = torch.random.get_rng_state()

    results = guards.preflight(trainer, _config(), rows, "cpu", "fp32")

    names = [r.name for r in results]
    assert names == ["supervised_tokens", "labels_aligned", "precision", "trainable_params", "label_names",
                     "first_loss", "first_grad_norm"]
    assert all(r.passed for r in results)
    trainable = sum(p.numel() for p in model.parameters())
    assert results[3].value.startswith(f"{trainable:,} of {trainable:,}")
    first_loss = float(results[5].value.split()[0])
    assert math.isfinite(first_loss) and first_loss > 0
    # the trainable count is printed, one line per check
    printed = capsys.readouterr().out
    assert f"trainable_params" in printed and f"{trainable:,}" in printed
    # no gradients left behind, weights and RNG untouched: training proceeds as if preflight never ran
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert torch.equal(rng, torch.random.get_rng_state())
    # a caller's list receives the same checks (training keeps it on its session)
    kept = []
    assert guards.preflight(trainer, _config(), rows, "cpu", "fp32", echo=None, results=kept) is kept
    assert [r.name for r in kept] == [r.name for r in results]


def test_preflight_refuses_peft_without_label_names(tokenizer, tmp_path):
    from mathtune.models.load import apply_lora

    rows = _rows(tokenizer, 8)
    model = apply_lora(build_tiny_model(tokenizer), r=4, alpha=8, dropout=0.0)
    trainer, _ = _trainer(model, tokenizer, rows, tmp_path, label_names=None)
    passed = []
    with pytest.raises(TrainingHalted) as exc:
        guards.preflight(trainer, _config(), rows, "cpu", "fp32", echo=None, results=passed)
    assert exc.value.check == "label_names"
    assert "set label_names=['labels']" in str(exc.value)
    # the checks before it are kept in the caller's list for a table (mathtune doctor)
    assert [r.name for r in passed] == ["supervised_tokens", "labels_aligned", "precision", "trainable_params"]
    assert exc.value.step is None  # a preflight halt: before any step


def test_preflight_refuses_fp16_on_cpu(tokenizer, tmp_path):
    rows = _rows(tokenizer, 4)
    trainer, _ = _trainer(build_tiny_model(tokenizer), tokenizer, rows, tmp_path)
    with pytest.raises(TrainingHalted, match=r"--precision bf16 or fp32") as exc:
        guards.preflight(trainer, _config(), rows, "cpu", "fp16", echo=None)
    assert exc.value.check == "precision"


def test_preflight_refuses_trainer_precision_other_than_the_runs(tokenizer, tmp_path):
    rows = _rows(tokenizer, 4)
    trainer, _ = _trainer(build_tiny_model(tokenizer), tokenizer, rows, tmp_path)  # fp32 Trainer
    with pytest.raises(TrainingHalted, match="mixed precision is fp32 but the run asked for bf16"):
        guards.preflight(trainer, _config(), rows, "cpu", "bf16", echo=None)


def test_preflight_refuses_a_model_with_nothing_to_train(tokenizer, tmp_path):
    rows = _rows(tokenizer, 4)
    model = build_tiny_model(tokenizer)
    model.requires_grad_(False)
    trainer, _ = _trainer(model, tokenizer, rows, tmp_path)
    with pytest.raises(TrainingHalted) as exc:
        guards.preflight(trainer, _config(), rows, "cpu", "fp32", echo=None)
    assert exc.value.check == "trainable_params" and "--method" in str(exc.value)


def test_preflight_forward_backward_catches_nan_logits(tokenizer, tmp_path):
    rows = _rows(tokenizer, 4)
    model = build_tiny_model(tokenizer)
    model.lm_head.register_forward_hook(lambda m, i, out: torch.full_like(out, float("nan")))
    trainer, _ = _trainer(model, tokenizer, rows, tmp_path)
    with pytest.raises(TrainingHalted, match="non-finite loss") as exc:
        guards.preflight(trainer, _config(), rows, "cpu", "fp32", echo=None)
    assert exc.value.check == "forward_backward"
    assert all(p.grad is None for p in model.parameters())


def test_preflight_forward_backward_catches_zero_gradients(tokenizer, tmp_path):
    rows = _rows(tokenizer, 4)
    model = build_tiny_model(tokenizer)
    # the only trainable weight reaches the loss multiplied by zero (an adapter that is switched off)
    model.requires_grad_(False)
    model.model.layers[0].mlp.down_proj.weight.requires_grad_(True)
    model.model.layers[0].mlp.register_forward_hook(lambda m, i, out: out * 0 + out.detach())
    trainer, _ = _trainer(model, tokenizer, rows, tmp_path)
    with pytest.raises(TrainingHalted, match="every gradient is zero") as exc:
        guards.preflight(trainer, _config(), rows, "cpu", "fp32", echo=None)
    assert exc.value.check == "forward_backward"


# --------------------------------------------------------------------------- numeric guard, step by step


def test_diverged_message_names_the_fix_by_precision():
    assert guards.diverged_message("fp16", 2e-4, 1.0) == "fp16 overflow: use --precision bf16 or fp32"
    message = guards.diverged_message("bf16", 0.5, 1.0)
    assert "lower --learning-rate (now 0.5)" in message and "keep --max-grad-norm 1.0" in message
    assert "set --max-grad-norm 1.0 (now 0)" in guards.diverged_message("fp32", 0.5, 0.0)


def test_guard_requires_recorded_micro_batches():
    guard = guards.NumericGuard(_config(), StepStats(), "fp32")
    with pytest.raises(MathtuneError, match="no micro-batch was recorded"):
        guard.on_pre_optimizer_step(_args(), _state(), _control(), model=_linear_with_grad(0.1))


def test_guard_stops_on_zero_supervised_tokens_before_anything_else():
    stats = _recorded(float("nan"), supervised=0)
    guard = guards.NumericGuard(_config(), stats, "fp32")
    with pytest.raises(TrainingHalted) as exc:
        guard.on_pre_optimizer_step(_args(), _state(4), _control(), model=_linear_with_grad(0.1))
    assert exc.value.check == "zero_supervised_tokens" and exc.value.step == 5
    assert guards.ZERO_SUPERVISED_MESSAGE in str(exc.value)


@pytest.mark.parametrize("precision, fix", [("fp32", "lower --learning-rate (now 0.001)"),
                                            ("bf16", "lower --learning-rate (now 0.001)"),
                                            ("fp16", "fp16 overflow: use --precision bf16 or fp32")])
def test_guard_stops_on_nonfinite_loss_naming_the_fix(precision, fix):
    guard = guards.NumericGuard(_config(), _recorded(float("inf")), precision)
    with pytest.raises(TrainingHalted, match=re.escape(fix)) as exc:
        guard.on_pre_optimizer_step(_args(), _state(), _control(), model=_linear_with_grad(0.1))
    assert exc.value.check == "nonfinite_loss"


def test_guard_stops_on_nonfinite_gradient_and_passes_a_finite_one():
    guard = guards.NumericGuard(_config(), _recorded(2.0), "fp32")
    guard.on_pre_optimizer_step(_args(), _state(), _control(), model=_linear_with_grad(0.5))
    assert guard.last_grad_norm == pytest.approx(0.5 * math.sqrt(6))
    guard = guards.NumericGuard(_config(), _recorded(2.0), "bf16")
    with pytest.raises(TrainingHalted, match="gradient norm nan: loss/gradients diverged") as exc:
        guard.on_pre_optimizer_step(_args(), _state(), _control(), model=_linear_with_grad(float("nan")))
    assert exc.value.check == "nonfinite_grad"


def test_guard_stops_when_every_micro_batch_loss_is_zero():
    guard = guards.NumericGuard(_config(), _recorded(0.0), "fp32")
    with pytest.raises(TrainingHalted) as exc:
        guard.on_pre_optimizer_step(_args(), _state(), _control(), model=_linear_with_grad(0.1))
    assert exc.value.check == "zero_loss"


class _FakeScaler:
    """GradScaler's surface the guard reads: halves on every overflow, as the real one does."""

    def __init__(self, scale=2.0 ** 16):
        self.scale = scale

    def is_enabled(self):
        return True

    def get_scale(self):
        return self.scale


def test_fp16_scaler_calibration_skips_are_tolerated_then_stopped():
    stats = _recorded(2.0)
    guard = guards.NumericGuard(_config(), stats, "fp16")
    optimizer = SimpleNamespace(scaler=_FakeScaler())
    overflow, fine = _linear_with_grad(float("inf")), _linear_with_grad(0.1)
    # a few overflowing steps while the scaler calibrates: the scaler skips them, the guard lets it
    for _ in range(3):
        guard.on_pre_optimizer_step(_args(), _state(), _control(), model=overflow, optimizer=optimizer)
        optimizer.scaler.scale /= 2
    guard.on_pre_optimizer_step(_args(), _state(), _control(), model=fine, optimizer=optimizer)
    assert guard.consecutive_skips == 0
    for step in range(guards.SCALER_MAX_CONSECUTIVE_SKIPS - 1):
        guard.on_pre_optimizer_step(_args(), _state(step), _control(), model=overflow, optimizer=optimizer)
        optimizer.scaler.scale /= 2
    with pytest.raises(TrainingHalted, match=r"consecutive steps overflowed .*fp16 overflow: use --precision bf16 or fp32"):
        guard.on_pre_optimizer_step(_args(), _state(), _control(), model=overflow, optimizer=optimizer)


def test_fp16_collapsed_loss_scale_stops_at_once():
    guard = guards.NumericGuard(_config(), _recorded(2.0), "fp16")
    optimizer = SimpleNamespace(scaler=_FakeScaler(scale=0.5))
    with pytest.raises(TrainingHalted, match="loss scale now 0.5"):
        guard.on_pre_optimizer_step(_args(), _state(), _control(), model=_linear_with_grad(float("inf")),
                                    optimizer=optimizer)


def test_fp16_without_a_scaler_stops_on_the_first_overflow():
    guard = guards.NumericGuard(_config(), _recorded(2.0), "fp16")
    with pytest.raises(TrainingHalted, match="fp16 overflow"):
        guard.on_pre_optimizer_step(_args(), _state(), _control(), model=_linear_with_grad(float("inf")),
                                    optimizer=SimpleNamespace())


def test_logged_zero_loss_stops_and_normal_loss_passes():
    guard = guards.NumericGuard(_config(), StepStats(), "fp32")
    guard.on_log(_args(), _state(3), _control(), logs={"loss": 1.25})
    guard.on_log(_args(), _state(3), _control(), logs={"train_runtime": 1.0})
    with pytest.raises(TrainingHalted, match="loss is exactly 0.0") as exc:
        guard.on_log(_args(), _state(3), _control(), logs={"loss": 0.0})
    assert exc.value.step == 3


def test_checkpoint_with_nonfinite_weights_is_refused_only_when_saving():
    guard = guards.NumericGuard(_config(), StepStats(), "fp32")
    layer = torch.nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight[0, 0] = float("nan")
    guard.on_step_end(_args(), _state(2), _control(save=False), model=layer)
    with pytest.raises(TrainingHalted, match="checkpoint is not saved") as exc:
        guards.NumericGuard(_config(), StepStats(), "fp32").on_step_end(_args(), _state(2), _control(save=True), model=layer)
    assert exc.value.check == "nonfinite_weights"
    with pytest.raises(TrainingHalted, match="final model is not saved"):
        guards.NumericGuard(_config(), StepStats(), "fp32").on_train_end(_args(), _state(2), _control(), model=layer)


# --------------------------------------------------------------------------- numeric guard inside a real Trainer


def test_nan_mid_run_stops_before_the_update(tokenizer, tmp_path):
    rows = _rows(tokenizer, 16)
    model = build_tiny_model(tokenizer)
    stats = StepStats()
    trainer = None

    def poison(module, inputs, output):
        # NaN activations on the forward of step 3 only (global_step 2 while it is computed)
        if module.training and trainer.state.global_step == 2:
            return output * float("nan")
        return output

    model.model.layers[0].mlp.register_forward_hook(poison)
    callbacks = guards.guard_callbacks(_config(), stats, tokenizer, ["Convert 3 km to m."], tmp_path, "fp32")
    trainer, _ = _trainer(model, tokenizer, rows, tmp_path, stats=stats, callbacks=callbacks, max_steps=4)
    with pytest.raises(TrainingHalted) as exc:
        trainer.train()
    assert exc.value.check == "nonfinite_loss" and exc.value.step == 3
    assert "lower --learning-rate (now 0.001)" in str(exc.value)
    assert trainer.state.global_step == 2  # step 3's update never happened
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_guards_do_not_change_the_run(tokenizer, tmp_path, monkeypatch):
    """Same seed, same data: guarded and unguarded training end with identical weights."""
    # the random tiny model's greedy output is degenerate; here only the RNG side effects matter
    monkeypatch.setattr(guards, "COLLAPSE_CHECKS_IN_A_ROW", 100)
    rows = _rows(tokenizer, 16)
    finals = []
    for guarded in (False, True):
        model = build_tiny_model(tokenizer)
        stats = StepStats()
        callbacks = (guards.guard_callbacks(_config(sample_every=1), stats, tokenizer, ["Convert 3 km to m."],
                                            tmp_path / str(guarded), "fp32") if guarded else [])
        trainer, _ = _trainer(model, tokenizer, rows, tmp_path / str(guarded), stats=stats, callbacks=callbacks)
        if guarded:
            guards.preflight(trainer, _config(), rows, "cpu", "fp32", echo=None)
        trainer.train()
        finals.append({n: p.detach().clone() for n, p in model.named_parameters()})
    assert all(torch.equal(finals[0][n], finals[1][n]) for n in finals[0])


# --------------------------------------------------------------------------- collapse detector


def test_output_flags():
    healthy = [("3 km × 1000 m/km = 3000 m", [1, 2, 3]), ("2 kg × 1000 g/kg = 2000 g", [4, 5, 6])]
    assert guards.output_flags(healthy) == [[], []]
    assert guards.output_flags([("", []), ("  \n", [198, 198])]) == [["empty"], ["empty"]]
    assert guards.output_flags([("!!!!", [17, 17, 17, 17])]) == [["repeated"]]
    assert guards.output_flags([("!!!!!!", [1456, 1456, 17])]) == [["repeated"]]  # one char via several tokens
    assert guards.output_flags([("5", [38])]) == [[]]  # a short answer is not a loop
    assert guards.output_flags([("same", [1]), ("same", [1])]) == [["identical"], ["identical"]]


def test_collapse_detector_prompts_its_questions_with_the_ids_training_puts_before_an_answer(
        tokenizer, base_tokenizer, tmp_path):
    for tok in (tokenizer, base_tokenizer):
        examples = _examples(2)
        rows, _ = prepare_examples(examples, tok, max_length=256)
        detector = guards.CollapseDetector(_config(), tok, [ex.question for ex in examples], tmp_path, "fp32")
        assert detector.questions == [ex.question for ex in examples]
        for ids, row in zip(detector.prompt_ids, rows):
            # the prompt is exactly the row's unsupervised head: the answer follows it in training
            assert ids == row.input_ids[:row.prompt_len]


class _CannedModel(torch.nn.Module):
    """A model whose continuations are fixed: the detector's bookkeeping without a real model
    (``_canned`` stands in for its generation and records the mode it ran in)."""

    def __init__(self, continuations):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.continuations = continuations
        self.modes_seen = []


def _canned(detector):
    def generate(model):
        model.modes_seen.append(model.training)
        return [(detector.tokenizer.decode(ids, skip_special_tokens=True), list(ids)) for ids in model.continuations]

    detector.generate = generate
    return detector


class _Script:
    """A logits processor that makes the model write ``tokens`` after its prompt, whatever it computes."""

    def __init__(self, tokens, prompt_length):
        self.tokens, self.prompt_length = tokens, prompt_length

    def __call__(self, input_ids, scores):
        position = input_ids.shape[1] - self.prompt_length
        forced = torch.full_like(scores, -float("inf"))
        forced[:, self.tokens[min(position, len(self.tokens) - 1)]] = 0.0
        return forced


def _detector(tokenizer, tmp_path, prompts):
    return guards.CollapseDetector(_config(sample_every=1), tokenizer, prompts, tmp_path, "fp32")


def test_collapse_needs_two_flagged_checks_in_a_row(tokenizer, tmp_path):
    prompts = ["Convert 3 km to m.", "How many grams are in 2 kg?"]
    healthy = [tokenizer.encode("3 km × 1000 m/km = 3000 m"), tokenizer.encode("2 kg × 1000 g/kg = 2000 g")]
    bang = tokenizer.convert_tokens_to_ids("!")
    collapsed = [[bang] * 8, [bang] * 8]
    detector = _canned(_detector(tokenizer, tmp_path, prompts))
    good, bad = _CannedModel(healthy).train(), _CannedModel(collapsed).train()

    detector.check(bad, 1)  # one bad check: recorded, not fatal
    detector.check(good, 2)  # the streak resets
    detector.check(bad, 3)
    with pytest.raises(TrainingHalted) as exc:
        detector.check(bad, 4)
    assert exc.value.check == "collapse" and exc.value.step == 4
    message = str(exc.value)
    assert "model collapsed: outputs are identical/repeated" in message and "'!!!!!!!!'" in message
    assert "pre-shifted labels" in message and "learning rate (now 0.001)" in message
    # generation ran in eval mode, and the model is back in train mode afterwards
    assert bad.modes_seen == [False, False, False] and bad.training

    lines = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 1, 2, 2, 3, 3, 4, 4]
    assert set(lines[0]) == {"step", "prompt", "output", "flags"}
    assert lines[0]["prompt"] == prompts[0] and lines[0]["output"] == "!!!!!!!!"
    assert lines[2]["flags"] == [] and lines[2]["output"] == "3 km × 1000 m/km = 3000 m"


def test_collapse_generation_stops_at_end_of_turn(tokenizer, tmp_path):
    from mathtune.data import end_of_turn_token_id

    answer = tokenizer.encode("#### 3000")
    detector = _detector(tokenizer, tmp_path, ["Convert 3 km to m."])
    script = answer + [end_of_turn_token_id(tokenizer)] + tokenizer.encode(" junk")
    detector.generator_options = {"logits_processors": [_Script(script, len(detector.prompt_ids[0]))]}
    assert detector.generate(build_tiny_model(tokenizer)) == [("#### 3000", answer)]


def test_samples_file_is_reset_for_a_fresh_run_and_trimmed_on_resume(tokenizer, tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps({"step": s, "prompt": "q", "output": "o", "flags": []}) + "\n" for s in (10, 20)))
    detector = _detector(tokenizer, tmp_path, ["q"])
    detector.on_train_begin(_args(), _state(10), _control())
    assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [10]
    detector.on_train_begin(_args(), _state(0), _control())
    assert path.read_text() == ""


def test_collapse_detector_on_the_tiny_model_with_nan_logits(tokenizer, tmp_path):
    model = build_tiny_model(tokenizer)
    # NaN logits: greedy decoding picks token 0, which in SmolLM2 is end-of-text: empty output
    model.lm_head.register_forward_hook(lambda m, i, out: out * float("nan"))
    detector = _detector(tokenizer, tmp_path, ["Convert 3 km to m.", "How many grams are in 2 kg?"])
    threads = torch.get_num_threads()
    flags = detector.check(model, 1)
    assert all("empty" in f for f in flags)
    assert detector.last_outputs == ["", ""]
    assert torch.get_num_threads() == threads  # decoding ran on one thread; training gets all back


def test_empty_sample_prompts_are_refused(tokenizer, tmp_path):
    with pytest.raises(MathtuneError, match="at least one sample question"):
        guards.guard_callbacks(_config(), StepStats(), tokenizer, [], tmp_path, "fp32")


def test_collapse_detector_ignores_a_models_repetition_penalty_that_would_hide_loops(tokenizer, tmp_path):
    # A collapsed model: "!" wins every step by a wide margin, so greedy decoding loops on it.
    model = build_tiny_model(tokenizer)
    bang = tokenizer.convert_tokens_to_ids("!")

    def loop_on_bang(module, inputs, logits):
        logits = logits.clone()
        logits[..., bang] += 50.0
        return logits

    model.lm_head.register_forward_hook(loop_on_bang)
    # ...shipped with generation settings that break loops up: inherited, they would hide the collapse
    model.generation_config.repetition_penalty = 1e6
    model.generation_config.no_repeat_ngram_size = 1
    model.generation_config.suppress_tokens = [bang]
    detector = _detector(tokenizer, tmp_path, ["Convert 3 km to m.", "How many grams are in 2 kg?"])
    flags = detector.check(model, 1)
    assert detector.last_outputs[0] == "!" * detector.args.max_new_tokens
    assert all("repeated" in f for f in flags)
    # the model's own settings are back afterwards
    assert model.generation_config.repetition_penalty == 1e6 and model.generation_config.suppress_tokens == [bang]
