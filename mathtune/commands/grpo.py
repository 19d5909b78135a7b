"""``mathtune grpo``: reinforcement learning from the task's verifiable answers (GRPO on TRL's GRPOTrainer).

    mathtune grpo --model runs/sft --task gsm8k --max-time 3300 --num-generations 8
    mathtune grpo --model tiny-model-dir --task unit-conversion --max-steps 2

Flags are ``train``'s plus TRL GRPOConfig's names (``--num-generations``, ``--max-completion-length``,
``--beta``, ``--loss-type``, ``--temperature``, ...), underscores accepted, in flags and YAML alike.
"""

from __future__ import annotations

import argparse

from mathtune.config import add_config_arguments, add_method_arguments, config_from_args
from mathtune.grpo_config import SFT_ONLY_FIELDS, GRPOSettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML recipe (e.g. configs/smollm2-135m/grpo-gsm8k-cpu.yaml); flags win")
    add_config_arguments(parser, GRPOSettings, skip=SFT_ONLY_FIELDS)
    add_method_arguments(parser, lora_help="a fresh LoRA adapter on the (merged) starting model",
                         full_help="--learning-rate's default, 1e-5, is set for it")


def run(args: argparse.Namespace) -> int:
    from mathtune.interrupt import TrainingInterrupted, report_interrupted
    from mathtune.training import grpo

    config = config_from_args(GRPOSettings, args)
    try:
        result = grpo.train(config)
    except TrainingInterrupted as stop:
        return report_interrupted(stop, "grpo")
    print(grpo.end_summary(result))
    return 0
