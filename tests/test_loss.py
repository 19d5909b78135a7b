"""The LM head at supervised positions only: the same loss and gradients as full logits (fp32);
the token-normalised fallback loss for models that take no loss kwargs, run by Trainer."""

from __future__ import annotations

import pytest
import torch

from mathtune import training
from mathtune.loss import supervised_mask, supervised_only_loss, takes_logits_mask, token_normalised_loss
from mathtune.training import recipe

from conftest import tiny_train_config

pytestmark = pytest.mark.usefixtures("one_thread")


def batch(tokenizer, seed=0):
    """Three right-padded rows with prompts and answers of different lengths."""
    g = torch.Generator().manual_seed(seed)
    rows = [(5, 9), (12, 3), (7, 14)]  # (prompt tokens, answer tokens)
    longest = max(p + a for p, a in rows)
    ids = torch.full((len(rows), longest), tokenizer.pad_token_id)
    labels = torch.full((len(rows), longest), -100)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, (p, a) in enumerate(rows):
        tokens = torch.randint(100, 5000, (p + a,), generator=g)
        ids[i, : p + a], mask[i, : p + a] = tokens, 1
        labels[i, p : p + a] = tokens[p:]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_mask_marks_positions_that_predict_a_supervised_token():
    labels = torch.tensor([[-100, -100, 7, 8, -100], [-100, 5, 6, 7, 9]])
    assert supervised_mask(labels).tolist() == [[False, True, True, False, False], [True, True, True, True, False]]


def loss_and_grads(model, inputs, supervised: bool):
    model.zero_grad()
    labels = inputs["labels"]
    n = labels[:, 1:].ne(-100).sum()
    if supervised:
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    logits_to_keep=supervised_mask(labels))
        loss = supervised_only_loss(out, labels, n)
    else:
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        loss = token_normalised_loss(out, labels, n)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_supervised_only_loss_and_gradients_equal_the_full_logits_ones(tiny_model, tokenizer):
    model = tiny_model.float().train()
    inputs = batch(tokenizer)
    assert takes_logits_mask(model)
    full_loss, full_grads = loss_and_grads(model, inputs, supervised=False)
    ours_loss, ours_grads = loss_and_grads(model, inputs, supervised=True)
    assert torch.allclose(ours_loss, full_loss, rtol=1e-5, atol=0), (ours_loss, full_loss)
    assert full_grads.keys() == ours_grads.keys() and full_grads
    for name, grad in full_grads.items():
        scale = grad.abs().max().clamp_min(1e-12)
        assert float((ours_grads[name] - grad).abs().max() / scale) < 1e-5, name
    # and the model's own loss agrees (labels unshifted, mean over supervised tokens)
    own = model(**inputs).loss
    assert torch.allclose(own, full_loss, rtol=1e-5)


def test_supervised_only_loss_matches_under_peft_lora(tiny_model, tokenizer):
    from mathtune.models.load import apply_lora

    model = apply_lora(tiny_model.float(), r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the adapters a gradient path through B too
            torch.nn.init.normal_(param, std=0.02)
    assert takes_logits_mask(model)
    inputs = batch(tokenizer, seed=1)
    full_loss, full_grads = loss_and_grads(model.train(), inputs, supervised=False)
    ours_loss, ours_grads = loss_and_grads(model, inputs, supervised=True)
    assert torch.allclose(ours_loss, full_loss, rtol=1e-5)
    assert all("lora_" in name for name in full_grads)
    for name, grad in full_grads.items():
        assert float((ours_grads[name] - grad).abs().max() / grad.abs().max().clamp_min(1e-12)) < 1e-5, name


class IntOnlyLM(torch.nn.Module):
    """A causal LM of the older kind: ``logits_to_keep`` is an int count of last positions."""

    def __init__(self, takes_argument: bool = True):
        super().__init__()
        self.head = torch.nn.Embedding(10, 4)
        if not takes_argument:
            self.forward = lambda input_ids, **kwargs: {"logits": self.head(input_ids)}

    def forward(self, input_ids, logits_to_keep=0, use_cache=None):
        logits = self.head(input_ids)
        return {"logits": logits[:, slice(-logits_to_keep, None), :]}


def test_takes_logits_mask_asks_the_forward_itself(tiny_model):
    assert takes_logits_mask(tiny_model)
    assert not takes_logits_mask(IntOnlyLM())  # the mask as an int count raises: not taken
    assert not takes_logits_mask(IntOnlyLM(takes_argument=False))
    assert IntOnlyLM()(torch.zeros(1, 3, dtype=torch.long), logits_to_keep=1)["logits"].shape == (1, 1, 4)


def test_wrong_shaped_logits_name_the_flag():
    labels = torch.tensor([[-100, 3, 4]])
    with pytest.raises(RuntimeError, match="--no-supervised-logits"):
        supervised_only_loss({"logits": torch.zeros(1, 3, 10)}, labels)


# --------------------------------------------------------------------------- fallback loss, run by Trainer


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
        session = training.setup(tiny_train_config(tiny_model_dir, out, max_steps=2, batch_size=batch_size,
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
