"""GRPO sampling tokens/s: mathtune's rollout sampler vs transformers ``generate(num_return_sequences=G)``.

    .venv/bin/python bench/sampling_throughput.py                        # 64 GSM8K questions x 8 samples, T 0.7
    .venv/bin/python bench/sampling_throughput.py --model DIR --questions 2 --samples 4 --max-new-tokens 16

Both sides sample the same questions, G samples each, at the same temperature (no top-k/top-p), the same
max_new_tokens, the same model in the same precision (``hardware.choose_precision``: bf16 where the CPU
has native bf16 matmuls, fp32 otherwise), ``--questions-per-batch`` questions per call:

  mathtune   ``generation.rollout.RolloutSampler.sample`` (what ``mathtune grpo`` runs): the G rows of a
             question share one prompt prefill, decode on mathtune's CPU fast path, finished rows leave
             the batch every 32 tokens, calculator on (GSM8K) as in training
  baseline   ``model.generate(do_sample=True, temperature=T, top_k=0, top_p=1.0, num_return_sequences=G)``
             on the left-padded prompts of the batch, KV cache on, stopping at end-of-turn

tokens/s = tokens generated up to and including each sample's end-of-turn token / wall seconds.
Prints both rates, the machine kind and ``speed-up: R×``. GSM8K questions are read at run time from
../shared/data/gsm8k/train.jsonl (never copied into the repo); without it, unit-conversion questions.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing

import torch  # noqa: E402

from bench.eval_throughput import load_questions, machine_kind  # noqa: E402
from mathtune.data import encode_prompt, end_of_turn_token_id, format_prompt  # noqa: E402
from mathtune.hardware import choose_precision, dtype_of  # noqa: E402
from mathtune.models.load import load_model  # noqa: E402
from mathtune.models.spec import DEFAULT_MODEL  # noqa: E402


def mathtune_side(model, tokenizer, prompts, args, autocast, merge_lora: bool = True) -> tuple[int, float]:
    from mathtune.config import GenerationArgs
    from mathtune.generation.rollout import RolloutSampler

    settings = GenerationArgs(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              num_samples=args.samples, calculator=args.calculator)
    sampler = RolloutSampler(tokenizer, settings, seed=0, autocast_dtype=autocast, merge_lora=merge_lora)
    why_not = sampler.fast_path_serves(model)
    if why_not is not None:
        raise SystemExit(f"error: mathtune's fast path cannot serve this model: {why_not}")
    sampler.sample(model, [prompts[0]] * 2, step=-1)  # warm-up: vocabulary tables, kernel selection
    tokens, started = 0, time.perf_counter()
    for b in range(0, len(prompts), args.questions_per_batch):
        batch = [ids for ids in prompts[b:b + args.questions_per_batch] for _ in range(args.samples)]
        rollout = sampler.sample(model, batch, step=b)
        # every decoded token (calculator-forced ones too: they run through the model like the others);
        # the end-of-turn token a loop stop appends was not decoded
        tokens += sum(map(len, rollout.completion_ids)) - rollout.stop_reasons.count("loop")
    return tokens, time.perf_counter() - started


def baseline_side(model, tokenizer, prompts, args, autocast) -> tuple[int, float]:
    eot = end_of_turn_token_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot
    context = torch.autocast("cpu", dtype=autocast) if autocast is not None else torch.no_grad()
    with torch.no_grad(), context:  # warm-up, as on the mathtune side
        ids = torch.tensor([prompts[0]])
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=True,
                       top_k=0, eos_token_id=eot, pad_token_id=pad)
    tokens, started = 0, time.perf_counter()
    with torch.no_grad(), context:
        for b in range(0, len(prompts), args.questions_per_batch):
            batch = prompts[b:b + args.questions_per_batch]
            width = max(len(ids) for ids in batch)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=args.temperature,
                                 top_k=0, top_p=1.0, num_return_sequences=args.samples,
                                 max_new_tokens=args.max_new_tokens, eos_token_id=eot, pad_token_id=pad)
            for row in out[:, width:].tolist():
                tokens += row.index(eot) + 1 if eot in row else len(row)
    return tokens, time.perf_counter() - started


def add_sampling_arguments(parser: argparse.ArgumentParser, *, questions: int, max_new_tokens: int) -> None:
    """The flags of a GRPO sampling bench (this one and bench/rollout_batch.py): what is sampled and how."""
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--data", choices=("auto", "gsm8k", "unit-conversion"), default="auto")
    parser.add_argument("--questions", type=int, default=questions)
    parser.add_argument("--samples", type=int, default=8, help="samples per question (G)")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    parser.add_argument("--calculator", action=argparse.BooleanOptionalAction, default=None,
                        help="mathtune's calculator (default: on for GSM8K questions, as GRPO runs them)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")


def load_sampling_setup(args: argparse.Namespace):
    """(model, tokenizer, encoded prompts, where the questions came from, precision, why, autocast dtype);
    ``args.calculator`` left unset becomes on for GSM8K questions."""
    questions, where = load_questions(args.data, args.questions)
    if args.calculator is None:
        args.calculator = where.startswith("GSM8K")
    precision, reason = choose_precision(args.precision, "cpu")
    autocast = dtype_of(precision) if precision != "fp32" else None
    loaded = load_model(args.model, dtype=torch.float32)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    prompts = [encode_prompt(tokenizer, format_prompt(tokenizer, q)) for q in questions]
    return model, tokenizer, prompts, where, precision, reason, autocast


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_sampling_arguments(parser, questions=64, max_new_tokens=256)
    parser.add_argument("--questions-per-batch", type=int, default=8, help="questions sampled together (both sides)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, prompts, where, precision, reason, autocast = load_sampling_setup(args)
    print(f"model {args.model}; {where}; {args.samples} samples each at T {args.temperature}; max_new_tokens "
          f"{args.max_new_tokens}; {args.questions_per_batch} questions per call; precision {precision} ({reason}); "
          f"calculator {'on' if args.calculator else 'off'} (mathtune side)")
    print(f"machine   {machine_kind()}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs; load avg {os.getloadavg()[0]:.2f}")
    ours, ours_s = mathtune_side(model, tokenizer, prompts, args, autocast)
    print(f"mathtune  {ours:,} tokens in {ours_s:.1f} s: {ours / ours_s:,.1f} tok/s")
    theirs, theirs_s = baseline_side(model, tokenizer, prompts, args, autocast)
    print(f"generate  {theirs:,} tokens in {theirs_s:.1f} s: {theirs / theirs_s:,.1f} tok/s")
    print(f"speed-up: {(ours / ours_s) / (theirs / theirs_s):.2f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
