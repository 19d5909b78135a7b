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


# --------------------------------------------------------------------------- GRPO: one prompt per group
#
# A GRPO batch holds G completions of each question, its prompt repeated on G consecutive rows. TRL's
# GRPOTrainer scores every row as prompt + completion, so each prompt runs G times forward and backward:
# with GSM8K's chat prompts (~85-110 tokens) and equation-chain completions (~40), 4 questions x G 8 are
# 32 x ~130 = ~4,100 positions where 4 x ~100 + 32 x 41 = ~1,700 carry distinct work. Here each group's
# prompt (all but its last token) runs once at batch 1 into a cache that its G rows share, and the rows
# run [last prompt token, completion] on top, scored by the same TRL LM head (``fused_lm_head=True``:
# the temperature and the kernel are TRL's own), so log-probabilities, entropies and gradients are TRL's
# to rounding (tests/test_grpo.py). Measured: bench/grpo_shared_prompt.py, BENCHMARKS.md.


def prompt_groups(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> list[list[int]]:
    """Rows with identical (left-padded) prompts, each group's rows in order. Not only consecutive runs:
    TRL shuffles a generation batch's rows before cutting it into micro-batches."""
    groups: dict[tuple, list[int]] = {}
    for row in range(prompt_ids.shape[0]):
        key = tuple(prompt_ids[row][prompt_mask[row].bool()].tolist())
        groups.setdefault(key, []).append(row)
    return list(groups.values())


def score_completions_by_group(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_width: int,
                               compute_entropy: bool, groups: list[list[int]] | None = None,
                               frozen_groups: set[int] = frozenset()):
    """(log-probabilities, entropies or None), each (rows, completion_width), of the completion tokens
    (the last ``completion_width`` columns, right-padded) under ``model`` patched with TRL's
    ``add_fused_lm_head``. ``groups``: the rows to score, grouped by prompt (``prompt_groups``; default:
    every row); the result holds those rows in ascending row order. ``frozen_groups``: indices into
    ``groups`` run without gradients (their loss terms are zero, e.g. all-zero advantages), which saves
    their backward pass."""
    from transformers import DynamicCache

    width = input_ids.shape[1] - completion_width
    prompt_ids, prompt_mask = input_ids[:, :width], attention_mask[:, :width]
    completion_ids, completion_mask = input_ids[:, width:], attention_mask[:, width:]
    log_probs, entropies, order = [], [], []
    for index, members in enumerate(prompt_groups(prompt_ids, prompt_mask) if groups is None else groups):
        rows, take = len(members), torch.tensor(members, device=input_ids.device)
        prompt = prompt_ids[members[0]][prompt_mask[members[0]].bool()]
        length = prompt.numel()
        with torch.set_grad_enabled(torch.is_grad_enabled() and index not in frozen_groups):
            cache = DynamicCache(config=model.config)
            if length > 1:  # logits at no position: the prompt's last token runs with the rows below
                model(input_ids=prompt[None, :-1], cache=cache, use_cache=True,
                      logits_to_keep=torch.zeros(1, length - 1, dtype=torch.bool, device=prompt.device))
                cache.batch_repeat_interleave(rows)
            ids = torch.cat([prompt[-1:].expand(rows, 1), completion_ids[take]], dim=1)
            mask = torch.cat([torch.ones(rows, length, dtype=completion_mask.dtype, device=ids.device),
                              completion_mask[take]], dim=1)
            labels = ids.masked_fill(mask[:, length - 1:] == 0, -100)
            positions = torch.arange(length - 1, length + completion_width, device=ids.device).expand(rows, -1)
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, labels=labels,
                        fused_lm_head=True, **({"cache": cache} if length > 1 else {}))
        log_probs.append(out.log_probs)
        if compute_entropy:
            entropies.append(out.entropy)
        order.extend(members)
    back = torch.argsort(torch.tensor(order, device=input_ids.device))  # ascending rows: the batch's own order
    return torch.cat(log_probs)[back], (torch.cat(entropies)[back] if compute_entropy else None)
