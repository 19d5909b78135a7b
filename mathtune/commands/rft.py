"""``mathtune rft``: rejection-sampling fine-tuning data from a model's own correct solutions.

    mathtune rft --model runs/sft --task gsm8k --train-file train.jsonl --output runs/rft.jsonl
    mathtune train --task gsm8k --train-file runs/rft.jsonl ...

Every RFTConfig field is a flag (see ``mathtune.rft``).
"""

from __future__ import annotations

import argparse

from mathtune.config import add_config_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mathtune.rft import RFTConfig

    parser.add_argument("--config", help="YAML file with rft settings (flags win)")
    add_config_arguments(parser, RFTConfig)


def run(args: argparse.Namespace) -> int:
    from mathtune.rft import RFTConfig, run_rft

    run_rft(config_from_args(RFTConfig, args))
    return 0
