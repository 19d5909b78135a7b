"""``mathtune train``: fine-tune from a YAML recipe and/or flags (flags win), LoRA by default.

    mathtune train --config configs/smollm2-135m/lora-unit-conversion.yaml
    mathtune train --task gsm8k --train-file train.jsonl --full --learning-rate 2e-5 --max-steps 200

Every TrainConfig field is a flag (generated, so flags and YAML keys never drift apart);
``--lora`` / ``--full`` are short for ``--method lora`` / ``--method full``.
"""

from __future__ import annotations

import argparse

from mathtune.config import TrainConfig, add_config_arguments, add_method_arguments, config_from_args
from mathtune.run_dir import RunDir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML recipe (e.g. configs/smollm2-135m/lora-unit-conversion.yaml); flags win")
    add_config_arguments(parser, TrainConfig)
    add_method_arguments(parser, lora_help="LoRA adapters on a frozen base",
                         full_help="use a ~10x lower --learning-rate")


def comparison_lines(comparison: dict) -> list[str]:
    """Base vs trained accuracy from model_comparison.json content (the full table is printed by
    the comparison itself; this is the one-screen end summary)."""
    base, trained = comparison["base"], comparison["trained"]
    line = (f"accuracy on {comparison['n']} held-out items: base {base['accuracy']:.3f} -> "
            f"trained {trained['accuracy']:.3f} ({comparison['accuracy_difference']:+.3f}")
    ci = comparison.get("ci95")
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        line += f", 95% CI [{ci[0]:+.3f}, {ci[1]:+.3f}]"
    return [line + ")"]


def run(args: argparse.Namespace) -> int:
    from mathtune import training
    from mathtune.interrupt import TrainingInterrupted, report_interrupted

    config = config_from_args(TrainConfig, args)
    try:
        result = training.train(config)
    except TrainingInterrupted as stop:
        return report_interrupted(stop, "train")
    print(training.end_summary(result))
    if result.comparison is not None:
        for line in comparison_lines(result.comparison):
            print(line)
        run = RunDir(result.run_dir)
        print(f"comparison: {run.comparison}; report: {run.report}")
    return 0
