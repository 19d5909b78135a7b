"""One sampled token per row: ``torch.multinomial(softmax)`` vs mathtune's ``cpu.sampled_tokens`` (inverse CDF).

    .venv/bin/python bench/sampling_kernel.py --threads 2                 # 32 rows x 49152 (a GRPO rollout step)
    .venv/bin/python bench/sampling_kernel.py --rows 8 --vocab 151936      # Qwen2's vocabulary

Both draw from softmax(scores) of the same random ``[rows, vocab]`` fp32 scores (scaled like a small
model's tempered logits), each timed over ``--repeats`` calls after a warm-up, sides alternated. Also
checks that the two agree in distribution: over ``--check-draws`` draws from one row of a small
vocabulary, the largest gap between the two sides' token frequencies, in standard errors.
Prints ms per call each and ``speed-up: R×``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing

import torch  # noqa: E402

from bench.eval_throughput import machine_kind  # noqa: E402
from mathtune.generation.cpu import sampled_tokens  # noqa: E402


def multinomial(scores: torch.Tensor) -> torch.Tensor:
    return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)


def per_call_ms(draw, scores: torch.Tensor, repeats: int) -> float:
    draw(scores)
    started = time.perf_counter()
    for _ in range(repeats):
        draw(scores)
    return (time.perf_counter() - started) / repeats * 1000


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the two sides; the minimum is kept")
    parser.add_argument("--check-draws", type=int, default=200_000)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    scores = torch.randn(args.rows, args.vocab) * 3
    print(f"machine   {machine_kind()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.rows} rows x {args.vocab} vocabulary, fp32 scores")
    theirs = ours = float("inf")
    for _ in range(args.rounds):
        theirs = min(theirs, per_call_ms(multinomial, scores, args.repeats))
        ours = min(ours, per_call_ms(sampled_tokens, scores, args.repeats))
    small = torch.randn(1, 12).repeat(args.check_draws, 1)
    probs = torch.softmax(small[0].double(), dim=-1)
    gap = 0.0
    for draw in (multinomial, sampled_tokens):
        frequencies = torch.bincount(draw(small), minlength=12).double() / args.check_draws
        gap = max(gap, float(((frequencies - probs).abs() / (probs * (1 - probs) / args.check_draws).sqrt()).max()))
    print(f"agreement: largest frequency gap to softmax over {args.check_draws:,} draws: {gap:.2f} standard errors")
    print(f"multinomial  {theirs:.2f} ms a call")
    print(f"inverse CDF  {ours:.2f} ms a call")
    print(f"speed-up: {theirs / ours:.2f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
