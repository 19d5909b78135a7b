"""Run the leading tokens every row of a batch shares once, not once per row.

A chat model's prompt starts with the same system turn on every row (SmolLM2: ``<|im_start|>system
You are a helpful AI assistant named SmolLM, ...<|im_end|> <|im_start|>user``, 24 tokens). With
causal attention those positions see only each other, so their keys and values are the same on
every row: one forward pass at batch 1 gives them, ``DynamicCache.batch_repeat_interleave`` (a
public transformers API, differentiable) hands a copy to each row, and the rows' own tokens run on
top as if they followed the prefix in one sequence. Backward sums each row's gradient into the
prefix pass, so loss and gradients are the plain step's to rounding (tests/test_shared_prefix.py).

Why hand-written: transformers shares prompt prefixes only when generating (prefix caching in
continuous batching); nothing in Trainer does it for a training step.

When it pays (measured with ``bench/step_profile.py prefix``, fp32, 2-core CPU, batch 8): the
prefix pass at batch 1 is weight-read bound (24 tokens through every weight: ~0.4 s forward),
while the rows save 7 x 24 token positions of forward and backward. Unit-conversion batches of
76-90 tokens, where those are ~25% of the batch's positions: 1.11-1.22x per step. GSM8K batches of
158-255 tokens, ~10%: 0.97-1.04x, no gain. Hence ``MIN_SAVED_SHARE``.
"""

from __future__ import annotations

import inspect

import torch

from mathtune.loss import IGNORE_INDEX

# Share the prefix only when the positions saved, (rows - 1) x prefix, are at least this share of
# the batch's positions: ~25% gained 11-22% per step, ~10% gained nothing (module docstring).
MIN_SAVED_SHARE = 0.15


def shared_prefix_length(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> int:
    """Leading positions that every row holds identically, unpadded and unsupervised.

    The logit of the prefix's last position predicts the first token after it, and the prefix pass
    computes no logits, so that token must be unsupervised as well: the prefix stops one short of
    the first supervised label.
    """
    unsupervised = labels.eq(IGNORE_INDEX).all(0)
    same = (input_ids == input_ids[:1]).all(0) & attention_mask.bool().all(0) & unsupervised
    shared = int(torch.cumprod(same.int(), 0).sum())
    before_first_label = int(torch.cumprod(unsupervised.int(), 0).sum()) - 1
    return max(0, min(shared, before_first_label))


def worth_sharing(rows: int, positions: int, prefix: int) -> bool:
    return rows > 1 and prefix > 0 and (rows - 1) * prefix >= MIN_SAVED_SHARE * rows * positions


def takes_cache(model) -> bool:
    """True when the (unwrapped) causal LM's forward takes transformers 5's ``cache`` argument."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "cache" in inspect.signature(type(base).forward).parameters
    except (TypeError, ValueError):
        return False


def split_off_prefix(model, inputs: dict, prefix: int) -> dict:
    """Run the first ``prefix`` positions of row 0 through ``model`` (with gradients) and return the
    inputs for the rest of the batch: their own tokens and labels, the full attention mask, and a
    cache holding the prefix's keys and values for every row."""
    from transformers import DynamicCache

    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    cache = DynamicCache(config=model.config)
    # logits at no position: the prefix predicts nothing that is supervised (shared_prefix_length)
    model(input_ids=input_ids[:1, :prefix], attention_mask=attention_mask[:1, :prefix], cache=cache,
          use_cache=True, logits_to_keep=torch.zeros(1, prefix, dtype=torch.bool, device=input_ids.device))
    cache.batch_repeat_interleave(input_ids.shape[0])
    rest = {k: v for k, v in inputs.items() if k not in ("input_ids", "labels")}
    return {**rest, "input_ids": input_ids[:, prefix:], "labels": inputs["labels"][:, prefix:],
            "attention_mask": attention_mask, "cache": cache, "use_cache": True}
