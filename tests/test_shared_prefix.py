"""mathtune.shared_prefix: the batch's common prompt prefix runs once, with the plain step's loss and
gradients to rounding; where the prefix must stop.

The training tests use the 2-layer tiny Llama from conftest (real SmolLM2 chat template, so the
rows really share the system turn) on unit-conversion rows in fp32.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mathtune import training
from mathtune.training import trainer as training_trainer

from conftest import tiny_train_config

pytestmark = pytest.mark.usefixtures("one_thread")


def make_config(model_dir, out, **overrides):
    return tiny_train_config(model_dir, out, **overrides)


def lora_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "adapter_model.safetensors"))


def max_relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)) for k in a)


def test_shared_prefix_runs_once_per_batch_with_the_same_loss_and_gradients(tiny_model_dir, tmp_path, monkeypatch):
    prefixes = []
    real_split = training_trainer.split_off_prefix

    def recording_split(model, inputs, prefix):
        prefixes.append(prefix)
        return real_split(model, inputs, prefix)

    monkeypatch.setattr(training_trainer, "split_off_prefix", recording_split)
    session = training.setup(make_config(tiny_model_dir, tmp_path / "run"))
    trainer, model = session.trainer, session.model
    assert trainer.shared_prefix
    batch = next(iter(trainer.get_train_dataloader()))
    supervised = batch["labels"][:, 1:].ne(-100).sum()
    model.train()
    results = {}
    for shared in (True, False):
        trainer.shared_prefix = shared
        model.zero_grad()
        loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=supervised)
        loss.backward()
        results[shared] = loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    # the split ran once, over the chat template's system turn and the user turn's opening
    system_turn = len(session.tokenizer("<|im_start|>system\n", add_special_tokens=False)["input_ids"])
    assert len(prefixes) == 1 and prefixes[0] > system_turn, prefixes
    assert torch.allclose(results[True][0], results[False][0], rtol=1e-6)
    assert max_relative_difference(results[True][1], results[False][1]) < 1e-5
    # the gradient reaches every LoRA matrix through the shared pass too (layer 0's keys/values)
    assert all(g.abs().sum() > 0 for n, g in results[True][1].items() if "lora_B" in n)


def test_shared_prefix_training_run_stays_within_adam_rounding(tiny_model_dir, tmp_path):
    on = training.run(training.setup(make_config(tiny_model_dir, tmp_path / "on", max_steps=2)))
    off = training.run(training.setup(make_config(tiny_model_dir, tmp_path / "off", max_steps=2, shared_prefix=False)))
    # Adam's first steps are ~lr x sign(g): gradients that differ by rounding near zero move a few
    # weights by up to 2 x lr, hence 1e-4 here where the gradients themselves agree to 1e-5 (above)
    assert max_relative_difference(lora_weights(on.run_dir), lora_weights(off.run_dir)) < 1e-4


def test_shared_prefix_stops_before_padding_differences_and_supervised_tokens():
    from mathtune.shared_prefix import shared_prefix_length, worth_sharing

    ids = torch.tensor([[1, 2, 3, 4, 5, 6], [1, 2, 3, 9, 9, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    unsupervised = torch.full_like(ids, -100)
    assert shared_prefix_length(ids, mask, unsupervised) == 3  # rows differ from position 3
    labels = unsupervised.clone()
    labels[0, 3] = 4  # position 2's logit predicts a supervised token: the prefix must end before it
    assert shared_prefix_length(ids, mask, labels) == 2
    assert shared_prefix_length(ids, torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]]), unsupervised) == 0
    assert shared_prefix_length(torch.tensor([[7, 2], [1, 2]]), torch.ones(2, 2), torch.full((2, 2), -100)) == 0
    # (rows - 1) x prefix against 15% of the batch's positions
    assert worth_sharing(8, 100, 18) and not worth_sharing(8, 100, 17) and not worth_sharing(1, 100, 50)
