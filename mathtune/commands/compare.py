"""``mathtune compare``: base vs trained on the same items, with paired statistics.

Generation flags are EvalConfig's (so compare and eval can never drift apart); the two model specs
and the output JSON path are compare's own.
"""

from __future__ import annotations

import argparse

from mathtune.config import EvalConfig, add_config_arguments, config_from_args

# EvalConfig.model is replaced by the two specs; EvalConfig.output (a directory for eval logs) by
# --eval-dir, because here --output is the comparison JSON.
SKIPPED = ("model", "output")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-model", required=True, help="model spec before training (alias, hub id, dir, .gguf)")
    parser.add_argument("--trained-model", required=True, help="model spec after training (run dir, adapter dir, ...)")
    parser.add_argument("--output", default="model_comparison.json",
                        help="where to write the comparison JSON (default: model_comparison.json)")
    parser.add_argument("--eval-dir", default=None,
                        help="directory for the two per-item logs and summaries "
                             "(default: eval/ in each model's run dir, or ./eval)")
    add_config_arguments(parser, EvalConfig, skip=SKIPPED)


def run(args: argparse.Namespace) -> int:
    from mathtune.comparison import run_compare

    from mathtune.run_dir import check_writable

    config = config_from_args(EvalConfig, args)
    # before two evaluations, not after them
    check_writable(args.output, "--output", is_file=True)
    if args.eval_dir is not None:
        check_writable(args.eval_dir, "--eval-dir")
    run_compare(args.base_model, args.trained_model, config, output_path=args.output, output_dir=args.eval_dir)
    return 0
