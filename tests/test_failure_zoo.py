"""The failure zoo: every known way fine-tuning fails silently, reproduced on the tiny model through
``training.setup``/``training.run``, and caught by the guards with a message that names the fix.

For each failure the test checks three things:
  * the run stops with ``TrainingHalted`` naming the right check and fix;
  * it stops within one optimizer step of the failure (the poisoned step is never applied; a
    collapse is caught at the next sample check);
  * no weights with NaN/inf are written: every ``*.safetensors`` under the run dir (checkpoints
    and final model) is read back and must be finite, and no final model is saved after a halt.

The last entries are faults of the machine, not of the numbers (issue 33): a disk that fills during a
checkpoint, a newest checkpoint damaged after it was marked complete, a model cache entry cut short.
Each ends in one line and a way on, and nothing complete is lost (the CLI replays: tests/test_faults.py).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mathtune import guards, training
from mathtune.config import TrainConfig
from mathtune.data import IGNORE_INDEX, PreparedRow, RowDataset
from mathtune.errors import DiskFull, TrainingHalted
from mathtune.run_dir import RunDir
from test_faults import assert_one_line, cut, no_temps

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _write_task(tmp_path: Path) -> tuple[str, str]:
    """Train/eval JSONL files of small sums: the zoo depends on no task generator."""
    paths = []
    for split, offset in (("train", 0), ("eval", 100)):
        path = tmp_path / f"{split}.jsonl"
        lines = []
        for i in range(offset, offset + 40):
            a, b = i + 3, 2 * i + 1
            lines.append(json.dumps({"question": f"What is {a} plus {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}))
        path.write_text("\n".join(lines) + "\n")
        paths.append(str(path))
    return paths[0], paths[1]


def _config(model_dir: Path, tmp_path: Path, **overrides) -> TrainConfig:
    train_file, eval_file = _write_task(tmp_path)
    settings = dict(model=str(model_dir), task="file", train_file=train_file, eval_file=eval_file,
                    max_samples=32, batch_size=4, max_steps=4,
                    save_steps=1, save_total_limit=None, sample_every=0, logging_steps=1, device="cpu",
                    precision="fp32", output_dir=str(tmp_path / "run"))
    settings.update(overrides)
    return TrainConfig.from_flat(**settings).validate()


def _saved_weights(run_dir: Path) -> list[Path]:
    """Every safetensors file under the run dir, each asserted all-finite."""
    files = sorted(Path(run_dir).rglob("*.safetensors"))
    for path in files:
        for name, tensor in load_file(str(path)).items():
            assert torch.isfinite(tensor).all(), f"{path}: {name} holds NaN/inf"
    return files


def _checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in Path(run_dir).glob("checkpoint-*"))


def _assert_halted_cleanly(session, halted: TrainingHalted, *, last_good_step: int) -> None:
    run_dir = session.run_dir
    # the failing step is never applied: the trainer's count stops at the last good step
    assert session.trainer.state.global_step == last_good_step
    assert halted.step in (last_good_step, last_good_step + 1)
    assert _checkpoints(run_dir) == [f"checkpoint-{s}" for s in range(1, last_good_step + 1)]
    # no final model after a halt; what was saved (checkpoints) is finite, as are the live weights
    assert not (run_dir / "adapter_model.safetensors").exists() and not (run_dir / "model.safetensors").exists()
    assert len(_saved_weights(run_dir)) == last_good_step
    assert all(torch.isfinite(p).all() for p in session.model.parameters())


def _poison_at(session, step: int, transform):
    """Apply ``transform`` to the first decoder MLP's output while training computes optimizer step ``step``."""
    trainer = session.trainer

    def hook(module, inputs, output):
        if module.training and trainer.state.global_step == step - 1:
            return transform(output)
        return output

    mlp = session.model.get_base_model().model.layers[0].mlp
    return mlp.register_forward_hook(hook)


def test_nan_injected_mid_run_is_stopped_before_the_update(tiny_model_dir, tmp_path):
    session = training.setup(_config(tiny_model_dir, tmp_path, learning_rate=1e-3))
    _poison_at(session, 3, lambda out: out * float("nan"))
    with pytest.raises(TrainingHalted) as exc:
        training.run(session)
    assert exc.value.check == "nonfinite_loss" and exc.value.step == 3
    assert "loss/gradients diverged: lower --learning-rate (now 0.001), keep --max-grad-norm 1.0" in str(exc.value)
    _assert_halted_cleanly(session, exc.value, last_good_step=2)


def test_forced_fp16_overflow_names_bf16_or_fp32(tiny_model_dir, tmp_path):
    """CPU cannot train in fp16 (setup refuses it), so the guard is told the run is fp16, as it is on a
    CUDA fp16 run without loss scaling, and the overflow is real fp16 arithmetic: activations scaled past
    fp16's maximum (65504) and rounded through half precision become inf, then NaN after the norm."""
    session = training.setup(_config(tiny_model_dir, tmp_path))
    numeric = session.callbacks.guard(guards.NumericGuard)
    numeric.precision = "fp16"
    # activations growing until their largest is 1e5, past fp16's max, then rounded to half precision
    overflow = lambda out: (out * (1e5 / out.abs().max())).half().float()
    _poison_at(session, 2, overflow)
    # the same activations are finite in fp32: it is the fp16 range that overflows
    probe = session.model.get_base_model().model.layers[0].mlp(torch.randn(1, 3, 32))
    assert torch.isfinite(probe * (1e5 / probe.abs().max())).all() and not torch.isfinite(overflow(probe)).all()
    with pytest.raises(TrainingHalted) as exc:
        training.run(session)
    assert exc.value.check == "nonfinite_loss" and exc.value.step == 2
    assert "fp16 overflow: use --precision bf16 or fp32" in str(exc.value)
    _assert_halted_cleanly(session, exc.value, last_good_step=1)


def _truncated_rows(rows: list[PreparedRow]) -> list[PreparedRow]:
    """What naive truncation to the prompt length does: the answers are cut away, every label -100."""
    return [PreparedRow(r.id, r.input_ids[: r.prompt_len], [IGNORE_INDEX] * r.prompt_len, r.prompt_len) for r in rows]


def _replace_rows(session, rows: list[PreparedRow]) -> None:
    session.data.rows = rows
    session.trainer.train_dataset = RowDataset(rows)


def test_every_label_masked_is_refused_by_preflight(tiny_model_dir, tmp_path):
    session = training.setup(_config(tiny_model_dir, tmp_path))
    _replace_rows(session, _truncated_rows(session.rows))
    with pytest.raises(TrainingHalted) as exc:
        training.run(session)
    assert exc.value.check == "supervised_tokens"
    assert "every label -100: answers truncated away" in str(exc.value) and "raise --max-length" in str(exc.value)
    assert session.trainer.state.global_step == 0 and _saved_weights(session.run_dir) == []


def test_every_label_masked_mid_training_stops_at_that_step(tiny_model_dir, tmp_path):
    """Rows that reach the trainer without passing preflight (the in-training guard alone)."""
    session = training.setup(_config(tiny_model_dir, tmp_path))
    _replace_rows(session, _truncated_rows(session.rows))
    with pytest.raises(TrainingHalted) as exc:
        session.trainer.train()
    assert exc.value.check == "zero_supervised_tokens" and exc.value.step == 1
    assert guards.ZERO_SUPERVISED_MESSAGE in str(exc.value)
    assert session.trainer.state.global_step == 0 and _saved_weights(session.run_dir) == []


def test_pre_shifted_labels_are_refused(tiny_model_dir, tmp_path):
    session = training.setup(_config(tiny_model_dir, tmp_path))
    shifted = []
    for r in session.rows:
        labels = [IGNORE_INDEX] * len(r.input_ids)
        for i in range(r.prompt_len - 1, len(r.input_ids) - 1):
            labels[i] = r.input_ids[i + 1]  # "helpfully" shifted for next-token prediction
        shifted.append(PreparedRow(r.id, r.input_ids, labels, r.prompt_len))
    _replace_rows(session, shifted)
    with pytest.raises(TrainingHalted) as exc:
        training.run(session)
    assert exc.value.check == "labels_aligned"
    assert "labels are pre-shifted by one; the model shifts them itself: pass unshifted labels" in str(exc.value)
    assert session.trainer.state.global_step == 0 and _saved_weights(session.run_dir) == []


def _nan_logits(session, *, only_in_eval: bool):
    head = session.model.get_base_model().lm_head

    def hook(module, inputs, output):
        if only_in_eval and module.training:
            return output
        return output * float("nan")

    return head.register_forward_hook(hook)


def test_nan_logits_are_refused_by_preflight_and_by_the_first_step(tiny_model_dir, tmp_path):
    session = training.setup(_config(tiny_model_dir, tmp_path))
    _nan_logits(session, only_in_eval=False)
    with pytest.raises(TrainingHalted) as exc:
        training.run(session)
    assert exc.value.check == "forward_backward" and "non-finite loss (nan)" in str(exc.value)
    # without preflight, the in-training guard stops the very first step, before its update
    with pytest.raises(TrainingHalted) as exc:
        session.trainer.train()
    assert exc.value.check == "nonfinite_loss" and exc.value.step == 1
    assert session.trainer.state.global_step == 0 and _saved_weights(session.run_dir) == []


def test_nan_logits_at_inference_are_caught_by_the_collapse_detector(tiny_model_dir, tmp_path):
    """Training numerics fine, generation broken (NaN logits in eval mode only): the loss guards see
    nothing; the collapse detector sees empty output (greedy picks token 0, end-of-text in SmolLM2)."""
    session = training.setup(_config(tiny_model_dir, tmp_path, sample_every=1))
    _nan_logits(session, only_in_eval=True)
    with pytest.raises(TrainingHalted) as exc:
        training.run(session)
    assert exc.value.check == "collapse" and exc.value.step == 2  # the second sample check
    message = str(exc.value)
    assert "model collapsed: outputs are empty" in message and "likely NaN logits" in message
    samples = [json.loads(l) for l in (session.run_dir / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 2} and len(samples) == 2 * len(session.data.sample_questions)
    assert all(s["output"] == "" and "empty" in s["flags"] for s in samples)
    # stopped in on_step_end of step 2, before that step's checkpoint was written
    assert _checkpoints(session.run_dir) == ["checkpoint-1"]
    assert not (session.run_dir / "adapter_model.safetensors").exists()
    assert len(_saved_weights(session.run_dir)) == 1


def test_peft_model_without_label_names_is_refused(tiny_model_dir, tmp_path):
    session = training.setup(_config(tiny_model_dir, tmp_path))
    session.trainer.args.label_names = None  # the Trainer default
    with pytest.raises(TrainingHalted) as exc:
        training.run(session)
    assert exc.value.check == "label_names"
    assert "PEFT models hide the forward signature, so Trainer ignores the labels: set label_names=['labels']" in str(exc.value)
    assert session.trainer.state.global_step == 0 and _saved_weights(session.run_dir) == []


def test_exploding_learning_rate_is_stopped_before_nan_reaches_the_weights(tiny_model_dir, tmp_path):
    # (SDPA attention: it turns the exploding activations into NaN within 8 steps; plain attention
    # stays finite longer, and then the collapse check is what catches the run)
    session = training.setup(_config(tiny_model_dir, tmp_path, learning_rate=1000.0, max_steps=8,
                                     cpu_eager_attention=False))
    with pytest.raises(TrainingHalted) as exc:
        training.run(session)
    assert exc.value.check in ("nonfinite_loss", "nonfinite_grad")
    assert "lower --learning-rate (now 1000)" in str(exc.value)
    # it diverged after a few updates (not at once), and the diverging step was not applied
    last_good = session.trainer.state.global_step
    assert 1 <= last_good < 8 and exc.value.step == last_good + 1
    _assert_halted_cleanly(session, exc.value, last_good_step=last_good)


# --------------------------------------------------------------------------- faults of the machine (issue 33)


def test_disk_full_during_a_checkpoint_removes_it_and_keeps_the_earlier_one(tiny_model_dir, tmp_path, monkeypatch):
    session = training.setup(_config(tiny_model_dir, tmp_path, save_steps=2))
    real_save = torch.save

    def save(obj, f, *args, **kwargs):  # the disk fills while the second checkpoint's optimizer state is written
        if "checkpoint-4" in str(f):
            Path(f).write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(DiskFull) as exc:
        training.run(session)
    message = str(exc.value)
    assert "\n" not in message and str(session.run_dir / "checkpoint-4") in message and "free there" in message
    assert "--resume auto continues from checkpoint-2" in message
    assert _checkpoints(session.run_dir) == ["checkpoint-2"]
    assert RunDir(session.run_dir).checkpoint_problem(session.run_dir / "checkpoint-2") is None
    assert len(_saved_weights(session.run_dir)) == 1  # the earlier checkpoint's adapter, whole and finite


def test_damaged_newest_checkpoint_is_skipped_for_the_newest_whole_one(tiny_model_dir, tmp_path, capsys):
    config = _config(tiny_model_dir, tmp_path, save_steps=2)
    training.run(training.setup(config))
    session_dir = Path(config.output_dir)
    adapter = session_dir / "checkpoint-4" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:1000])  # a copy cut short
    capsys.readouterr()
    session = training.setup(dataclasses.replace(config, resume="auto"))
    assert session.resume_from == str(session_dir / "checkpoint-2")
    err = capsys.readouterr().err
    assert "skipping the damaged checkpoint-4" in err and "adapter_model.safetensors is 1000 bytes" in err
    training.run(session)
    assert session.trainer.state.global_step == 4
    assert RunDir(session_dir).checkpoint_problem(session_dir / "checkpoint-4") is None  # saved again, whole
    assert (session_dir / "damaged-checkpoint-4" / "adapter_model.safetensors").stat().st_size == 1000


def test_damaged_model_cache_entry_is_rebuilt_from_its_gguf(tiny_gguf, tmp_path, monkeypatch, capfd):
    """The conversion record's sizes and hashes are checked on load; a file cut short is rebuilt from the
    GGUF (the weights read back equal to the first conversion's). The tiny GGUF's tokenizer reads back
    without an eos token, so the weights are loaded here directly; the CLI replay (case 3) uses the
    bundled model."""
    from transformers import AutoModelForCausalLM

    from mathtune.models import gguf_cache
    from mathtune.models.spec import resolve_model_source

    monkeypatch.setenv("MATHTUNE_CACHE", str(tmp_path / "cache"))
    kind, source = resolve_model_source(str(tiny_gguf))
    target = gguf_cache.ensure_converted(kind, str(tiny_gguf), Path(source))
    # copies: a loaded safetensors file is memory-mapped, and cutting it under the mapping would be SIGBUS
    first = {name: tensor.clone() for name, tensor in load_file(str(target / "model.safetensors")).items()}
    record = json.loads((target / gguf_cache.CONVERSION_MARKER).read_text())["files"]
    assert record["model.safetensors"]["size"] == (target / "model.safetensors").stat().st_size
    assert gguf_cache._cache_damage(target) is None
    cut(target / "model.safetensors")
    capfd.readouterr()
    assert gguf_cache.ensure_converted(kind, str(tiny_gguf), Path(source)) == target
    err = capfd.readouterr().err
    rebuilt = [line for line in err.splitlines() if "rebuilding" in line]
    assert len(rebuilt) == 1
    assert_one_line(rebuilt[0], str(target), "damaged", "model.safetensors is", "its record says", str(tiny_gguf))
    assert gguf_cache._cache_damage(target) is None
    again = load_file(str(target / "model.safetensors"))
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    AutoModelForCausalLM.from_pretrained(str(target))  # loads
    # a changed byte, same size: found by the hash, rebuilt the same way
    data = bytearray((target / "tokenizer.json").read_bytes())
    data[-2] ^= 1
    (target / "tokenizer.json").write_bytes(bytes(data))
    assert "tokenizer.json does not match its recorded SHA-256" in gguf_cache._cache_damage(target)
    gguf_cache.ensure_converted(kind, str(tiny_gguf), Path(source), weights=False)
    assert gguf_cache._cache_damage(target) is None and no_temps(tmp_path / "cache")


