"""GRPO sampling cost per question against the questions sampled in one rollout call.

    .venv/bin/python bench/rollout_batch.py --model RUN_DIR --threads 2            # 16 GSM8K questions, 4 / 8 / 16 a call
    .venv/bin/python bench/rollout_batch.py --model DIR --questions 2 --per-call 1 2 --max-new-tokens 8

``mathtune grpo`` samples ``batch_size x gradient_accumulation_steps / num_generations`` questions a
step in one call of its sampler (``generation.rollout.RolloutSampler``), G rows each. On a CPU a
decode step of a small model reads every weight once whatever the number of rows (SmolLM2-135M:
~540 MB in fp32), so below the rows where the matmuls turn compute-bound a step of 64 rows costs
little more than one of 32: more questions a call buy more tokens a second. This bench samples the
same questions (G each, same temperature, lengths and calculator) at each ``--per-call`` size, on the
same loaded model in one run, and prints seconds per question and tokens/s for each, and each size's
cost per question as a ratio of the first size's.

GSM8K questions are read at run time from ../shared/data/gsm8k/train.jsonl (never copied into the
repo); without it, unit-conversion questions. A trained run dir (an SFT run) gives realistic answer
lengths; the bundled base model's answers are longer and more often cut at --max-new-tokens.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing

import torch  # noqa: E402

from bench.eval_throughput import machine_kind  # noqa: E402
from bench.sampling_throughput import add_sampling_arguments, load_sampling_setup, mathtune_side  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_sampling_arguments(parser, questions=16, max_new_tokens=128)
    parser.add_argument("--per-call", type=int, nargs="+", default=[4, 8, 16],
                        help="questions sampled in one call, each size in turn (the first is the reference)")
    args = parser.parse_args(argv)
    bad = [n for n in args.per_call if n < 1 or args.questions % n]
    if bad:
        parser.error(f"--per-call {' '.join(map(str, bad))}: each size must be >= 1 and divide --questions "
                     f"{args.questions}, so every size samples the same questions")
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer, prompts, where, precision, reason, autocast = load_sampling_setup(args)
    print(f"model {args.model}; {where}; G {args.samples} at T {args.temperature}; max_new_tokens "
          f"{args.max_new_tokens}; calculator {'on' if args.calculator else 'off'}; precision {precision} ({reason})")
    print(f"machine   {machine_kind()}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs; load avg {os.getloadavg()[0]:.2f}")
    reference = None
    for per_call in args.per_call:
        # sampling_throughput's mathtune side: a fresh sampler, a warm-up call, then every question
        tokens, seconds = mathtune_side(model, tokenizer, prompts, argparse.Namespace(**{
            **vars(args), "questions_per_batch": per_call}), autocast)
        per_question = seconds / len(prompts)
        reference = reference or per_question
        print(f"{per_call:3d} questions a call ({per_call * args.samples} rows): {tokens:,} tokens in {seconds:.1f} s, "
              f"{tokens / seconds:.1f} tok/s, {per_question:.2f} s a question; cost a question "
              f"{per_question / reference:.2f}× of {args.per_call[0]} a call")
    return 0


if __name__ == "__main__":
    sys.exit(main())
