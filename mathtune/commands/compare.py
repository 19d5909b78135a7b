"""``mathtune compare``: base vs trained on the same items, with paired statistics.

Generation flags are EvalConfig's (so compare and eval can never drift apart); the two model specs
and the output JSON path are compare's own.
"""

from __future__ import annotations

import argparse

from mathtune.config import EvalConfig, add_config_arguments, config_from_args, exposed_fields
from mathtune.errors import ConfigError
from mathtune.run_dir import RunDir

# EvalConfig.model is replaced by the two specs; EvalConfig.output (a directory for eval logs) by
# --eval-dir, because here --output is the comparison JSON.
SKIPPED = ("model", "output")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-model", help="model spec before training (alias, hub id, dir, .gguf)")
    parser.add_argument("--trained-model", help="model spec after training (run dir, adapter dir, ...)")
    parser.add_argument("--base-log", help="instead of --base-model: a per-item log written by mathtune eval "
                                           "(pairs evaluations made with different settings, e.g. --calculator)")
    parser.add_argument("--trained-log", help="instead of --trained-model: a per-item log written by mathtune eval")
    parser.add_argument("--score", choices=("first", "majority"), default="first",
                        help="per-item verdict: the first output, or the majority vote of --num-samples "
                             "samples (maj@k) (default: first)")
    parser.add_argument("--output", default=RunDir.COMPARISON,
                        help=f"where to write the comparison JSON (default: {RunDir.COMPARISON})")
    parser.add_argument("--eval-dir", default=None,
                        help="directory for the two per-item logs and summaries "
                             "(default: eval/ in each model's run dir, or ./eval)")
    add_config_arguments(parser, EvalConfig, skip=SKIPPED)


def _check_sources(args: argparse.Namespace) -> bool:
    """True when the two sides are logs; one-line errors for a mixed or missing pair."""
    models = (args.base_model, args.trained_model)
    logs = (args.base_log, args.trained_log)
    if all(logs) and not any(models):
        return True
    if all(models) and not any(logs):
        return False
    raise ConfigError([  # a usage error (exit 2): the flags, not the run, are wrong
        "compare needs either --base-model and --trained-model (it evaluates both) "
        "or --base-log and --trained-log (per-item logs from mathtune eval), not a mix"
    ])


def run(args: argparse.Namespace) -> int:
    from mathtune.comparison import compare_logs, run_compare

    from mathtune.run_dir import check_writable

    from_logs = _check_sources(args)
    check_writable(args.output, "--output", is_file=True)
    if from_logs:
        # every config flag defaults to None, so a typed one is not None: it would change nothing
        typed = [f"--{name.replace('_', '-')}" for name in exposed_fields(EvalConfig)
                 if name not in SKIPPED and getattr(args, name, None) is not None]
        typed += ["--eval-dir"] * (args.eval_dir is not None) + ["--config"] * (getattr(args, "config", None) is not None)
        if typed:
            raise ConfigError([f"{', '.join(typed)}: with --base-log/--trained-log nothing is evaluated "
                               "(the logs hold the generations already), so these change nothing; drop them"])
        compare_logs(args.base_log, args.trained_log, output_path=args.output, score=args.score)
        return 0
    config = config_from_args(EvalConfig, args)
    if args.score == "majority" and config.generation.num_samples < 2:
        raise ConfigError(["--score majority needs --num-samples 2 or more (and --temperature > 0)"])
    # before two evaluations, not after them
    if args.eval_dir is not None:
        check_writable(args.eval_dir, "--eval-dir")
    run_compare(args.base_model, args.trained_model, config, output_path=args.output, output_dir=args.eval_dir,
                score=args.score)
    return 0
