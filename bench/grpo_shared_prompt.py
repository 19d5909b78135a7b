"""GRPO's training pass with each group's prompt computed once, against TRL's per-row forward (issue 31, item 3).

    .venv/bin/python bench/grpo_shared_prompt.py                    # 4 GSM8K questions x G 8, LoRA r16
    .venv/bin/python bench/grpo_shared_prompt.py --model DIR --questions 2 --samples 4 --completion-length 16

A GRPO step scores G completions of each question: TRL's ``GRPOTrainer`` runs every row as prompt +
completion (``_get_per_token_logps_and_entropies``: one forward of ``cat(prompt_ids, completion_ids)``
per row), so a question's prompt goes through the model G times, forward and backward. With GSM8K's
chat prompts (~110 tokens) and equation-chain completions (~60), that is 8 x 170 = 1,360 tokens a
group where 110 + 8 x 60 = 590 carry distinct work.

Both sides here compute the completion tokens' log-probabilities under a LoRA model in training mode
and back-propagate the same loss (the mean log-probability of the completion tokens), timed over
``--repeats`` passes after one warm-up:

  per-row   what TRL does: the left-padded prompt + right-padded completion of every row, one forward
  shared    the prompt of each group once (one row, gradients on), its KV cache repeated G times
            (``DynamicCache.batch_repeat_interleave``), the G completions on top of it; the first
            completion token is scored from the prompt pass's last logits

Prints the largest log-probability difference, the largest relative LoRA-gradient difference, both
times, the machine kind and ``speed-up: R×``. Completions are random tokens (lengths drawn between
half and all of ``--completion-length``): the cost depends on the lengths, not the text.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing

import torch  # noqa: E402

from bench.eval_throughput import load_questions, machine_kind  # noqa: E402
from mathtune.data import encode_prompt, format_prompt  # noqa: E402
from mathtune.families import lora_target_modules  # noqa: E402
from mathtune.models.load import apply_lora, load_model  # noqa: E402
from mathtune.models.spec import DEFAULT_MODEL  # noqa: E402


def per_row_logps(model, prompts, completions, pad_id):
    """TRL's way: each row is its prompt (left-padded) + its completion (right-padded), one forward."""
    width_p = max(map(len, prompts))
    width_c = max(map(len, completions))
    ids, mask = [], []
    for p, c in zip(prompts, completions):
        ids.append([pad_id] * (width_p - len(p)) + p + c + [pad_id] * (width_c - len(c)))
        mask.append([0] * (width_p - len(p)) + [1] * (len(p) + len(c)) + [0] * (width_c - len(c)))
    ids, mask = torch.tensor(ids), torch.tensor(mask)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                   logits_to_keep=width_c + 1).logits[:, :-1]
    targets = ids[:, width_p:]
    return torch.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1), mask[:, width_p:]


def shared_logps(model, group_prompts, group_completions, pad_id):
    """The prompt once per group, its KV cache repeated for the G completions (all rows of a group)."""
    from transformers import DynamicCache

    # transformers 5.24 renamed the forward's past_key_values to cache (the old name warns until 5.40)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cache_kw = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    out_logps, out_masks = [], []
    width_c = max(len(c) for completions in group_completions for c in completions)
    for prompt, completions in zip(group_prompts, group_completions):
        g, n = len(completions), len(prompt)
        cache = DynamicCache()
        first = model(input_ids=torch.tensor([prompt]), **{cache_kw: cache}, use_cache=True,
                      logits_to_keep=1).logits[:, -1]  # scores each completion's first token
        cache.batch_repeat_interleave(g)  # the G rows see the same prompt keys/values (autograd keeps one copy's grad)
        ids = torch.tensor([c + [pad_id] * (width_c - len(c)) for c in completions])
        comp_mask = torch.tensor([[1] * len(c) + [0] * (width_c - len(c)) for c in completions])
        mask = torch.cat([torch.ones(g, n, dtype=torch.long), comp_mask], dim=1)
        position_ids = torch.arange(n, n + width_c).expand(g, -1)
        rest = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], **{cache_kw: cache},
                     position_ids=position_ids[:, :-1], use_cache=True).logits
        logits = torch.cat([first.unsqueeze(1).expand(g, 1, -1), rest], dim=1)
        out_logps.append(torch.log_softmax(logits.float(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1))
        out_masks.append(comp_mask)
    return torch.cat(out_logps), torch.cat(out_masks)


def pass_once(model, fn, *args):
    model.zero_grad(set_to_none=True)
    started = time.perf_counter()
    logps, mask = fn(model, *args)
    loss = -(logps * mask).sum() / mask.sum()
    loss.backward()
    seconds = time.perf_counter() - started
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return seconds, (logps * mask).detach(), grads


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--data", choices=("auto", "gsm8k", "unit-conversion"), default="auto")
    parser.add_argument("--questions", type=int, default=4, help="question groups in the batch")
    parser.add_argument("--samples", type=int, default=8, help="completions per question (G)")
    parser.add_argument("--completion-length", type=int, default=64)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    questions, where = load_questions(args.data, args.questions)
    loaded = load_model(args.model, dtype=torch.float32)
    tokenizer = loaded.tokenizer
    model = apply_lora(loaded.model, r=args.lora_r, alpha=2 * args.lora_r, dropout=0.0,
                       target_modules=lora_target_modules(loaded.model))
    for name, param in model.named_parameters():  # LoRA B starts at 0: give it values so gradients reach A too
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    model.train()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = [encode_prompt(tokenizer, format_prompt(tokenizer, q)) for q in questions]
    vocab = model.config.vocab_size
    completions = [[torch.randint(0, vocab, (int(torch.randint(args.completion_length // 2,
                                                                args.completion_length + 1, ())),)).tolist()
                    for _ in range(args.samples)] for _ in prompts]
    rows_p = [p for p in prompts for _ in range(args.samples)]
    rows_c = [c for group in completions for c in group]
    tokens_row = sum(map(len, rows_p)) + sum(map(len, rows_c))
    tokens_shared = sum(map(len, prompts)) + sum(map(len, rows_c))
    print(f"model {args.model}; {where}; {args.questions} questions x G {args.samples}; prompts "
          f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens, completions {min(map(len, rows_c))}-"
          f"{max(map(len, rows_c))}; LoRA r{args.lora_r}; fp32; tokens through the model: per-row {tokens_row:,}, "
          f"shared {tokens_shared:,}")
    print(f"machine   {machine_kind()}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs; load avg {os.getloadavg()[0]:.2f}")
    times = {"per-row": [], "shared": []}
    results = {}
    for repeat in range(args.repeats + 1):  # the first pass of each is a warm-up
        for side in ("per-row", "shared") if repeat % 2 == 0 else ("shared", "per-row"):
            if side == "per-row":
                seconds, logps, grads = pass_once(model, per_row_logps, rows_p, rows_c, pad_id)
            else:
                seconds, logps, grads = pass_once(model, shared_logps, prompts, completions, pad_id)
            results[side] = (logps, grads)
            if repeat:
                times[side].append(seconds)
    logp_diff = (results["per-row"][0] - results["shared"][0]).abs().max().item()
    grad_diff = max(((results["per-row"][1][n] - results["shared"][1][n]).norm()
                     / results["per-row"][1][n].norm().clamp(min=1e-12)).item() for n in results["per-row"][1])
    print(f"agreement: max |logp difference| {logp_diff:.2e}; max relative LoRA-gradient difference {grad_diff:.2e}")
    for side, values in times.items():
        print(f"{side:8s}  forward+backward {', '.join(f'{v:.2f}' for v in values)} s "
              f"(min {min(values):.2f} s)")
    print(f"speed-up: {min(times['per-row']) / min(times['shared']):.2f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
