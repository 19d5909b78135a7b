"""GRPO sampling of a LoRA policy: its adapter merged into the base weights while sampling vs left unmerged.

    .venv/bin/python bench/rollout_lora_merge.py --model RUN_DIR --threads 2      # 8 GSM8K questions, 3 rounds
    .venv/bin/python bench/rollout_lora_merge.py --model DIR --questions 2 --rounds 1 --max-new-tokens 8

``mathtune grpo`` trains a LoRA by default, and its sampler decodes with that LoRA: unmerged, each of
the 7 projections of each layer runs the base matmul, then A, B, the scale and an add (SmolLM2-135M: 210
projections a decode step); merged (``models.load.lora_merged``, PEFT's ``merge_adapter`` /
``unmerge_adapter``), one matmul each, at the price of one merge + unmerge a rollout call. This bench puts
a fresh LoRA (``--lora-r``, the family's projections, the recipe's r 16 by default) on the model and
samples the same questions (G each, same temperature, lengths and calculator, ``--per-call`` questions
a call) unmerged then merged, ``--rounds`` times in turn, on the one loaded model. A fresh LoRA's B is
zero, so both sides draw the same tokens and do the same work but for the adapter ops. Prints each
round, the merge + unmerge cost, the machine kind and ``speed-up: R×`` (unmerged seconds / merged).

GSM8K questions are read at run time from ../shared/data/gsm8k/train.jsonl (never copied into the
repo); without it, unit-conversion questions. A trained run dir (an SFT run) gives realistic lengths.
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

from bench.eval_throughput import machine_kind  # noqa: E402
from bench.sampling_throughput import add_sampling_arguments, load_sampling_setup, mathtune_side  # noqa: E402
from mathtune.models.load import apply_lora, lora_merged  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_sampling_arguments(parser, questions=8, max_new_tokens=128)
    parser.add_argument("--per-call", type=int, default=4, help="questions sampled in one call (the recipe's 4)")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="unmerged then merged, this many times in turn")
    args = parser.parse_args(argv)
    if args.per_call < 1 or args.questions % args.per_call:
        parser.error(f"--per-call {args.per_call}: must be >= 1 and divide --questions {args.questions}")
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer, prompts, where, precision, reason, autocast = load_sampling_setup(args)
    policy = apply_lora(model, r=args.lora_r, alpha=2 * args.lora_r, dropout=0.0)
    print(f"model {args.model} + fresh LoRA r{args.lora_r}; {where}; G {args.samples} at T {args.temperature}; "
          f"max_new_tokens {args.max_new_tokens}; {args.per_call} questions a call; calculator "
          f"{'on' if args.calculator else 'off'}; precision {precision} ({reason})")
    print(f"machine   {machine_kind()}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs; load avg {os.getloadavg()[0]:.2f}")
    with torch.no_grad():
        started = time.perf_counter()
        for _ in range(5):
            with lora_merged(policy) as why_not:
                if why_not is not None:
                    raise SystemExit(f"error: the LoRA does not merge: {why_not}")
        print(f"merge + unmerge: {(time.perf_counter() - started) / 5:.3f} s (paid once a rollout call)")
    sides = argparse.Namespace(**{**vars(args), "questions_per_batch": args.per_call})
    seconds = {False: 0.0, True: 0.0}
    for round_ in range(1, args.rounds + 1):
        for merge in (False, True):
            tokens, took = mathtune_side(policy, tokenizer, prompts, sides, autocast, merge_lora=merge)
            seconds[merge] += took
            print(f"round {round_} {'merged  ' if merge else 'unmerged'} {tokens:,} tokens in {took:.1f} s: "
                  f"{tokens / took:.1f} tok/s")
    print(f"unmerged {seconds[False]:.1f} s, merged {seconds[True]:.1f} s")
    print(f"speed-up: {seconds[False] / seconds[True]:.2f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
