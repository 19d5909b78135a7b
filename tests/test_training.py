"""Training on the tiny model: what is trained, how the loss is normalised, time budget, resume.

Every run uses the 2-layer tiny Llama from conftest (real SmolLM2 vocabulary and chat template),
unit-conversion rows and fp32, so a step takes a fraction of a second and results are exact
enough to compare weights. Guards are off here (they have their own tests); one test checks
that training wires them in.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from mathtune import training
from mathtune.run_dir import RunDir
from mathtune.tasks import get_task
from mathtune.config import TrainConfig, build_config
from mathtune.errors import MathtuneError


from conftest import tiny_train_config

pytestmark = pytest.mark.usefixtures("one_thread")


def make_config(model_dir, out, **overrides) -> TrainConfig:
    return tiny_train_config(model_dir, out, **overrides)


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def lora_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "adapter_model.safetensors"))


def max_relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)) for k in a)


# --------------------------------------------------------------------------- what gets trained


def test_lora_changes_adapters_and_leaves_base_bit_identical(tiny_model_dir, tmp_path):
    session = training.setup(make_config(tiny_model_dir, tmp_path / "run"))
    base_before = {n: p.detach().clone() for n, p in session.model.named_parameters() if not p.requires_grad}
    lora_before = trainable_state(session.model)
    assert lora_before and all("lora_" in n for n in lora_before)
    training.run(session)
    for name, before in base_before.items():
        assert torch.equal(dict(session.model.named_parameters())[name], before), f"base weight {name} changed"
    after = trainable_state(session.model)
    # lora_B starts at zero, so every adapter matrix moves once it gets gradient (steps >= 2 for lora_A)
    unchanged = [n for n in lora_before if torch.equal(after[n], lora_before[n])]
    assert not unchanged, f"LoRA weights that did not train: {unchanged}"


def test_full_fine_tuning_changes_every_parameter(tiny_model_dir, tmp_path):
    session = training.setup(make_config(tiny_model_dir, tmp_path / "run", method="full"))
    before = {n: p.detach().clone() for n, p in session.model.named_parameters()}
    assert all(p.requires_grad for p in session.model.parameters())
    result = training.run(session)
    after = dict(session.model.named_parameters())
    unchanged = [n for n in before if torch.equal(after[n], before[n])]
    assert not unchanged, f"parameters that did not train with --full: {unchanged}"
    assert (result.run_dir / "model.safetensors").is_file() and (result.run_dir / "config.json").is_file()
    assert not (result.run_dir / "adapter_config.json").exists()


@pytest.fixture(scope="module")
def learnable_tiny_dir(tmp_path_factory, smol_tokenizer):
    """A tiny model LoRA can fit: hidden 64, embeddings of std 0.2 instead of 0.02.

    Under LoRA the tied embeddings and the final norm stay frozen, so a logit is at most
    |unit-RMS hidden| × |embedding| = sqrt(hidden) × std × sqrt(hidden): with conftest's std 0.02 and
    hidden 32 that is 0.64, and no adapter could make any token likely. Pretrained models have far
    larger embeddings; here 8 × 0.2 × 8 ≈ 13.
    """
    from conftest import build_tiny_model

    model = build_tiny_model(smol_tokenizer, seed=1, hidden=64)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(10.0)
    path = tmp_path_factory.mktemp("learnable-tiny")
    model.save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("method", ["lora", "full"])
def test_eight_rows_overfit_below_half_the_first_loss(method, learnable_tiny_dir, tiny_model_dir, tmp_path):
    model_dir = learnable_tiny_dir if method == "lora" else tiny_model_dir
    config = make_config(model_dir, tmp_path / "run", method=method, max_samples=8, batch_size=8, max_steps=30,
                         learning_rate=1e-2)
    result = training.run(training.setup(config))
    assert result.steps == 30
    assert result.first_loss is not None and result.last_loss < 0.5 * result.first_loss, (
        f"{method}: loss {result.first_loss:.3f} -> {result.last_loss:.3f} in 30 steps on the same 8 rows"
    )


def test_trainer_is_wired_for_completion_only_labels(tiny_model_dir, tmp_path):
    session = training.setup(make_config(tiny_model_dir, tmp_path / "run"))
    trainer = session.trainer
    assert trainer.args.label_names == ["labels"]
    assert trainer.args.logging_nan_inf_filter is False
    assert trainer.model_accepts_loss_kwargs, "num_items_in_batch would not reach the model's loss"
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    # the loss Trainer computes = cross-entropy over completion tokens only (prompt and padding are -100)
    with torch.no_grad():
        loss = trainer.compute_loss(session.model, dict(batch))
        logits = session.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # the dataset presents the rows in the epoch's length-grouped order
    for i, row in enumerate(session.rows[j] for j in trainer.train_dataset.order[:4]):
        labels, n = batch["labels"][i], len(row.input_ids)
        assert labels[: row.prompt_len].eq(-100).all() and labels[n:].eq(-100).all()  # prompt, padding
        assert torch.equal(labels[row.prompt_len : n], batch["input_ids"][i, row.prompt_len : n])  # answer
    targets = batch["labels"][:, 1:]
    manual = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                               targets.reshape(-1), ignore_index=-100)
    assert torch.allclose(loss, manual, rtol=1e-5), (loss, manual)


# --------------------------------------------------------------------------- accumulation


def _train_with(model_dir, out, batch_size, accumulation, *, emulate_per_micro_batch_mean=False):
    # 16 rows of different lengths; 2 steps of 8 rows each, with SGD so that the update IS the
    # gradient (Adam's first steps are ~lr·sign(g) and would hide a wrongly weighted gradient)
    config = make_config(model_dir, out, batch_size=batch_size, gradient_accumulation_steps=accumulation,
                         max_steps=2, learning_rate=0.5, max_grad_norm=0.0,
                         # the emulated old bug needs the model's own per-micro-batch mean loss
                         supervised_logits=not emulate_per_micro_batch_mean)
    session = training.setup(config)
    session.trainer.args.optim = "sgd"
    if emulate_per_micro_batch_mean:
        # what transformers did before the 2024 fix: mean per micro-batch, divided by accumulation
        session.trainer.model_accepts_loss_kwargs = False
    training.run(session)
    assert isinstance(session.trainer.optimizer.optimizer if hasattr(session.trainer.optimizer, "optimizer")
                      else session.trainer.optimizer, torch.optim.SGD)
    return lora_weights(out), session


def test_gradient_accumulation_normalises_by_supervised_tokens_of_the_whole_step(tiny_model_dir, tmp_path):
    whole, session = _train_with(tiny_model_dir, tmp_path / "b8", 8, 1)
    lengths = {r.supervised_tokens for r in session.rows[:16]}
    assert len(lengths) > 1, "rows must differ in supervised length for this test to mean anything"
    accumulated, _ = _train_with(tiny_model_dir, tmp_path / "b2x4", 2, 4)
    assert max_relative_difference(accumulated, whole) < 1e-5
    # and the test can tell: averaging per micro-batch gives measurably different weights
    wrong, _ = _train_with(tiny_model_dir, tmp_path / "wrong", 2, 4, emulate_per_micro_batch_mean=True)
    assert max_relative_difference(wrong, whole) > 1e-3


def test_gradient_checkpointing_trains_the_same_weights(tiny_model_dir, tmp_path):
    # (the shared prefix, off under checkpointing, is off on both sides: this compares recomputation alone)
    plain = training.run(training.setup(make_config(tiny_model_dir, tmp_path / "plain", max_steps=2, shared_prefix=False)))
    session = training.setup(make_config(tiny_model_dir, tmp_path / "ckpt", max_steps=2, gradient_checkpointing=True))
    assert not session.trainer.shared_prefix
    assert session.trainer.args.activation_checkpointing
    training.run(session)
    assert session.model.get_base_model().is_activation_checkpointing  # really on, not just requested
    # recomputing activations must not change the maths
    assert max_relative_difference(lora_weights(tmp_path / "ckpt"), lora_weights(plain.run_dir)) < 1e-5


# --------------------------------------------------------------------------- time budget, checkpoints, resume


def test_max_time_stops_inside_the_budget_with_the_lr_at_its_floor_and_saves_a_loadable_model(
        tiny_model_dir, tmp_path, capsys):
    from mathtune.models.load import load_model

    budget = 3.0
    config = make_config(tiny_model_dir, tmp_path / "run", max_steps=10_000, max_time=budget,
                         lr_scheduler="cosine", learning_rate=1e-3)
    result = training.run(training.setup(config))
    assert result.stopped_reason == "max_time"
    assert 0 < result.steps < 10_000
    lines = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == result.steps
    # it stops where the next step would overrun: within the budget, less than ~two steps short of it
    assert lines[-1]["seconds"] <= budget + 0.5
    assert lines[-1]["seconds"] >= budget - 2 * lines[-1]["step_seconds"] - 0.5
    # the cosine was laid over the budget, not over 10,000 steps (which would still be at ~100% of
    # its peak here): it ends near its floor. On a real clock one step slowed by a loaded machine
    # (CI runs two workers) makes the last step land before progress 1, e.g. progress 0.84 gives
    # 6.5% of peak, so this asserts < 25%; the exact floor is asserted on a fake clock in
    # test_budget.py::test_time_budget_completes_its_schedule_on_a_fake_clock.
    assert lines[-1]["learning_rate"] < 0.25 * 1e-3, lines[-1]
    assert "stopped on time" in capsys.readouterr().out
    loaded = load_model(str(result.run_dir))
    assert loaded.is_adapter
    # an adapter dir works as --model for eval, but training on top of it is refused up front
    with pytest.raises(MathtuneError, match="LoRA adapter"):
        training.setup(make_config(result.run_dir, tmp_path / "again"))


def test_resume_from_a_mid_run_checkpoint_reproduces_the_uninterrupted_run(tiny_model_dir, tmp_path):
    # 16 rows / batch 4 = 4 steps per epoch: resuming at step 3 skips batches mid-epoch, then the
    # run crosses into epoch 2 (a new shuffle) before step 6
    # warmup + cosine (warmup 0.34 of 6 steps = 3): the learning rate differs at every step, so a resume
    # that lost or restarted the scheduler state would train different weights (a constant LR hides it)
    schedule = dict(lr_scheduler="cosine", warmup_ratio=0.34)
    full = tmp_path / "full"
    result = training.run(training.setup(make_config(tiny_model_dir, full, max_steps=6, save_steps=3, **schedule)))
    assert result.steps == 6
    assert [p.name for p in RunDir(full).complete_checkpoints()] == ["checkpoint-3", "checkpoint-6"]

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")
    session = training.setup(make_config(tiny_model_dir, resumed, max_steps=6, save_steps=3, resume="auto", **schedule))
    assert session.resume_from == str(resumed / "checkpoint-3")
    again = training.run(session)
    assert again.steps == 6
    assert max_relative_difference(lora_weights(resumed), lora_weights(full)) < 1e-6
    # the resumed run itself continued from the checkpoint, not from scratch: it differs from step 3's weights
    assert max_relative_difference(lora_weights(resumed), lora_weights(full / "checkpoint-3")) > 1e-4


def test_guards_are_wired_in_when_enabled(tiny_model_dir, tmp_path, monkeypatch):
    import mathtune

    calls = {}

    class FakeGuards:
        @staticmethod
        def guard_callbacks(config, stats, tokenizer, sample_questions, run_dir, precision):
            calls["questions"] = list(sample_questions)
            calls["stats"] = stats
            return []

        @staticmethod
        def preflight(trainer, config, rows, device, precision, results):
            calls["preflight"] = (len(rows), device, precision)
            return []

    monkeypatch.setitem(__import__("sys").modules, "mathtune.guards", FakeGuards)
    monkeypatch.setattr(mathtune, "guards", FakeGuards, raising=False)
    session = training.setup(make_config(tiny_model_dir, tmp_path / "run", guards=True, max_steps=1))
    assert calls["stats"] is session.step_stats
    # bare questions (the detector formats them as training does), the first three held-out ones
    eval_questions = [ex.question for ex in get_task("unit-conversion").examples("eval")[:3]]
    assert calls["questions"] == eval_questions
    training.run(session)
    assert calls["preflight"] == (16, "cpu", "fp32")


# --------------------------------------------------------------------------- metrics.jsonl


def test_no_guards_run_logs_nan_loss_as_nan_not_zero(tiny_model_dir, tmp_path):
    session = training.setup(make_config(tiny_model_dir, tmp_path / "run", guards=False, max_steps=2))
    base = session.model.get_base_model()
    base.lm_head.register_forward_hook(lambda module, inputs, out: out * float("nan"))
    training.run(session)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    assert all(math.isnan(line["loss"]) for line in lines), lines


# --------------------------------------------------------------------------- length-grouped batches


def test_trainer_reads_the_grouped_order_of_each_epoch(tiny_model_dir, tmp_path):
    """Trainer's sequential sampler + RowDataset.set_epoch: each epoch's batches are exactly the runs
    of data.length_grouped_order for that epoch (a new order per epoch, each batch similar lengths)."""
    from mathtune.data import length_grouped_order

    config = make_config(tiny_model_dir, tmp_path / "run", max_samples=24, batch_size=4, max_steps=-1, num_epochs=2)
    session = training.setup(config)
    seen = []
    collate = session.trainer.data_collator

    def recording(features):
        seen.append([len(f["input_ids"]) for f in features])
        return collate(features)

    session.trainer.data_collator = recording
    training.run(session)
    lengths = [len(r.input_ids) for r in session.rows]
    expected = []
    for epoch in (0, 1):
        order = length_grouped_order(lengths, 4 * 1 * 1, seed=config.seed, epoch=epoch)  # batch x accumulation x processes
        expected += [[lengths[i] for i in order[k : k + 4]] for k in range(0, len(order), 4)]
    assert seen == expected
    assert seen[:6] != seen[6:]  # the second epoch is ordered anew


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cpu_training_uses_eager_attention_unless_turned_off(precision, tiny_model_dir, tmp_path):
    """Plain matmul+softmax attention on CPU (see training.setup for the measurements); the flag
    turns it off, back to the model's SDPA."""
    session = training.setup(make_config(tiny_model_dir, tmp_path / "run", precision=precision))
    assert session.model.get_base_model().config._attn_implementation == "eager"
    off = training.setup(make_config(tiny_model_dir, tmp_path / "off", precision=precision, cpu_eager_attention=False))
    assert off.model.get_base_model().config._attn_implementation == "sdpa"



def _batch(positions: int, pad: int) -> dict:
    """A batch of 2 rows padded to ``positions`` tokens (the first row left-padded by ``pad``), its second
    half supervised."""
    generator = torch.Generator().manual_seed(positions)
    ids = torch.randint(10, 1000, (2, positions), generator=generator)
    mask = torch.ones(2, positions, dtype=torch.long)
    mask[0, :pad] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, : positions // 2] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}  # CPU tensors: where the model is


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cpu_training_switches_long_batches_to_sdpa_with_the_same_loss(precision, tiny_model_dir, tmp_path):
    """Eager attention below SDPA_FROM_TOKENS, SDPA from there (mathtune/training/attention.py), switched per
    batch and back; each batch's loss is the one a run on a single kernel computes, padding included."""
    from mathtune.training.attention import SDPA_FROM_TOKENS

    switching = training.setup(make_config(tiny_model_dir, tmp_path / "switching", precision=precision))
    sdpa_only = training.setup(make_config(tiny_model_dir, tmp_path / "sdpa", precision=precision,
                                           cpu_eager_attention=False))
    assert switching.trainer.attention.switchable and sdpa_only.trainer.attention is None
    kernel = lambda session: session.model.get_base_model().config._attn_implementation  # noqa: E731
    tolerance = 1e-5 if precision == "fp32" else 2e-2
    for positions, expected in ((SDPA_FROM_TOKENS - 1, "eager"), (SDPA_FROM_TOKENS, "sdpa"), (40, "eager")):
        losses = []
        for session in (switching, sdpa_only):
            batch = _batch(positions, pad=7)
            with torch.no_grad(), session.trainer.accelerator.autocast():
                losses.append(session.trainer.compute_loss(session.model, batch).item())
        assert kernel(switching) == expected and kernel(sdpa_only) == "sdpa"
        assert losses[0] == pytest.approx(losses[1], abs=tolerance), positions


def test_a_model_that_cannot_switch_kernels_stays_on_eager(tiny_model, monkeypatch):
    """A model whose transformers class refuses SDPA (or cannot change kernels at run time) keeps eager for
    every batch instead of failing or warning per step."""
    from mathtune.training.attention import AttentionByLength

    tiny_model.set_attn_implementation("eager")

    def refuse_sdpa(implementation, **kwargs):
        if implementation == "sdpa":
            raise ValueError("does not support an attention implementation through scaled_dot_product_attention")
        tiny_model.config._attn_implementation_internal = implementation

    monkeypatch.setattr(tiny_model, "set_attn_implementation", refuse_sdpa)
    attention = AttentionByLength(tiny_model)
    assert not attention.switchable
    assert attention.use_for(4096) == "eager" and tiny_model.config._attn_implementation == "eager"

def test_bf16_lora_keeps_the_frozen_base_in_bf16_trains_like_autocast_and_exports_an_fp32_merge(
        tiny_model_dir, tmp_path):
    """With --precision bf16 the frozen base is stored in bf16 (no per-step autocast copies of it),
    the LoRA matrices stay fp32 master weights, the losses follow the autocast-on-fp32 path, and the
    export adds the trained adapter to the untouched fp32 base."""
    from safetensors.torch import load_file

    from mathtune.export import export_model

    session = training.setup(make_config(tiny_model_dir, tmp_path / "run", precision="bf16", max_steps=4))
    model = session.model.get_base_model()
    linear = model.model.layers[0].self_attn.q_proj
    assert linear.base_layer.weight.dtype == torch.bfloat16 and linear.lora_A["default"].weight.dtype == torch.float32
    assert model.model.norm.weight.dtype == torch.float32  # autocast does not cast norms: left as they are
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight  # still tied
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert {p.dtype for p in session.model.parameters() if p.requires_grad} == {torch.float32}
    ids = torch.tensor([[1, 2, 3]])
    assert model.get_input_embeddings()(ids).dtype == torch.float32  # the residual stream stays fp32
    assert "frozen base weights stored in bf16" in training.start_summary(session)
    stored = training.run(session)

    autocast = training.run(training.setup(make_config(tiny_model_dir, tmp_path / "autocast", precision="bf16",
                                                       max_steps=4, bf16_frozen_base=False)))
    assert stored.first_loss == pytest.approx(autocast.first_loss, rel=1e-2)
    assert stored.last_loss == pytest.approx(autocast.last_loss, rel=2e-2)
    assert stored.last_loss < stored.first_loss
    assert max_relative_difference(lora_weights(stored.run_dir), lora_weights(autocast.run_dir)) < 0.05

    exported = export_model(str(stored.run_dir), tmp_path / "export", dtype="fp32")
    merged = load_file(exported.output / "model.safetensors")
    base = load_file(Path(tiny_model_dir) / "model.safetensors")
    adapter = lora_weights(stored.run_dir)
    key = "model.layers.0.self_attn.q_proj.weight"
    a = next(v for k, v in adapter.items() if "layers.0.self_attn.q_proj.lora_A" in k)
    b = next(v for k, v in adapter.items() if "layers.0.self_attn.q_proj.lora_B" in k)
    assert a.dtype == b.dtype == merged[key].dtype == torch.float32
    scaling = session.config.lora_alpha / session.config.lora_r
    # the fp32 base (not a bf16-rounded one) plus the fp32 adapter
    torch.testing.assert_close(merged[key], base[key] + scaling * (b @ a), rtol=0, atol=1e-6)
    assert torch.equal(merged["model.norm.weight"], base["model.norm.weight"])


# --------------------------------------------------------------------------- setup checks inputs before training


def test_malformed_eval_file_fails_at_start_not_after_training(tiny_model_dir, tmp_path):
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"}) + "\n"
                                  for i in range(8)))
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text('{"question": "What is 1 + 1?", "answer": "#### 2"}\n{"question": "broken\n')
    config = make_config(tiny_model_dir, tmp_path / "run", max_samples=8, max_steps=1, task="file",
                         train_file=str(train_file), eval_file=str(eval_file), eval_samples=1)
    with pytest.raises(MathtuneError, match=f"{eval_file}:2: not valid JSON"):
        training.setup(config)
    assert not (tmp_path / "run").exists()  # failed before anything was written
