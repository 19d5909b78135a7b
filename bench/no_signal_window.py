"""How often the no-signal guard stops a run by chance, for each window length (a simulation, no model).

    python bench/no_signal_window.py                                  # row c: 79% all-equal groups, 4 a step
    python bench/no_signal_window.py --share 0.85 --groups-per-step 8 --steps 200

The guard (mathtune/training/grpo_guards.py) stops a GRPO run when >= 90% of the question groups of
the last ``--no-signal-steps`` steps got all-equal rewards. A run whose groups are all-equal with
probability ``--share`` each, independently (a run that learns, slowly), crosses that line now and
then by chance; this counts in how many of ``--runs`` simulated runs of ``--steps`` steps it does at
least once, and at which step a run that solves nothing (share 1.0) would stop.
"""

from __future__ import annotations

import argparse
import random
import sys

THRESHOLD = 0.9  # grpo_guards.NO_SIGNAL_SHARE


def stops_by_chance(share: float, groups_per_step: int, window: int, steps: int, runs: int, rng: random.Random) -> float:
    stopped = 0
    for _ in range(runs):
        equal = [sum(rng.random() < share for _ in range(groups_per_step)) for _ in range(steps)]
        if any(sum(equal[end - window:end]) >= THRESHOLD * window * groups_per_step
               for end in range(window, steps + 1)):
            stopped += 1
    return stopped / runs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--share", type=float, default=0.79, help="chance that a group's rewards are all equal")
    parser.add_argument("--groups-per-step", type=int, default=4)
    parser.add_argument("--steps", type=int, default=90, help="steps a run makes (55 min at ~36 s a step: ~90)")
    parser.add_argument("--windows", type=int, nargs="+", default=[10, 20, 30, 40])
    parser.add_argument("--runs", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    print(f"all-equal share {args.share}, {args.groups_per_step} groups a step, {args.steps} steps a run, "
          f"{args.runs} runs each")
    for window in args.windows:
        chance = stops_by_chance(args.share, args.groups_per_step, window, args.steps, args.runs, rng)
        print(f"--no-signal-steps {window:3d}: stops {chance:6.2%} of runs by chance; a run that solves nothing "
              f"stops at step {window}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
