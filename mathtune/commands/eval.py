"""``mathtune eval``: accuracy of one model on a task's held-out split, with a per-item log.

    mathtune eval --model runs/lora-uc --task unit-conversion --max-samples 200
    mathtune eval --model smollm2-135m --task gsm8k --eval-file test.jsonl --all --batch-size 64

Writes ``<output>/<model-tag>-<task>.jsonl`` (one judged item per line) and ``.summary.json``;
the output dir defaults to ``<model dir>/eval`` for a run or adapter dir, else ``./eval``.
"""

from __future__ import annotations

import argparse

from mathtune.config import EvalConfig, add_config_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with eval settings (flags win)")
    # --train-file: where --protocol lm-eval draws its few-shot examples from
    add_config_arguments(parser, EvalConfig)


def run(args: argparse.Namespace) -> int:
    from mathtune.evaluation import default_output_dir, evaluate_model

    config = config_from_args(EvalConfig, args)
    output = config.output if config.output is not None else default_output_dir(config.model)
    evaluate_model(config.model, config, output)
    return 0
