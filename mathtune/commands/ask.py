"""``mathtune ask MODEL "question" ...``: answers from the command line, generated exactly as eval does.

    mathtune ask runs/lora-uc "How many grams are in 2.5 kilograms?"
    printf 'What is 12 * 7?\\nConvert 3 km to m.\\n' | mathtune ask runs/lora-uc

Same path as ``mathtune eval``: the model loaded by ``models.load.load_for_inference`` (adapter merged) under the
device/precision policy, ``EvalConfig.generation`` resolved for the task (so every generation
setting eval has is a flag here too, and reaches the ``Generator`` the same way), the training prompt
format and the end-of-turn stop. Then the answer extraction ``accuracy`` scores with.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

from mathtune.config import EvalConfig, add_config_arguments, build_config, config_from_args, exposed_fields
from mathtune.errors import MathtuneError

# EvalConfig fields that choose or judge eval items, not how one answer is generated
SKIPPED = ("model", "task", "train_file", "eval_file", "strip_calculator", "target_format", "max_samples", "all",
           "num_samples", "output", "no_cache")


@dataclass
class Answer:
    question: str
    text: str  # the generated completion
    value: float | None  # the extracted final number, None when there is none
    method: str | None  # how it was extracted ("####", "boxed", "last number", ...)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="run dir, adapter dir, model dir, alias, .gguf or hub id")
    parser.add_argument("questions", metavar="QUESTION", nargs="*",
                        help="questions to answer; none: read them from stdin, one per line")
    add_config_arguments(parser, EvalConfig, skip=SKIPPED)


def ask(model: str, questions, **settings) -> list[Answer]:
    """Answer ``questions`` with ``model``; ``settings`` are EvalConfig fields (temperature,
    max_new_tokens, device, precision, ...). Also ``mathtune.ask``."""
    unknown = sorted(set(settings) - set(exposed_fields(EvalConfig)))
    if unknown:
        raise MathtuneError(f"unknown setting(s) {', '.join(unknown)}: use EvalConfig fields such as "
                            f"temperature, max_new_tokens, device, precision")
    return answer_questions(build_config(EvalConfig, None, {**settings, "model": str(model)}), questions)


def answer_questions(config: EvalConfig, questions) -> list[Answer]:
    """The eval path's answers through the Python API (``mathtune.load``): one loader, one generator."""
    from mathtune.answers import extract
    from mathtune.api import load

    if isinstance(questions, str):
        questions = [questions]
    questions = list(questions)
    if not questions:
        raise MathtuneError("no questions: pass them as arguments, or one per line on stdin")
    for i, q in enumerate(questions):
        if not isinstance(q, str) or not q.strip():
            raise MathtuneError(f"question {i + 1} is empty: every question needs some text")
    settings = config.generation.resolved(config.task).to_dict()
    model = load(config.model, config.device, config.precision, trust_remote_code=config.trust_remote_code,
                 allow_pickle=config.allow_pickle, seed=config.seed, **settings)
    answers = []
    for question, text in zip(questions, model.batched_generate(questions)):
        value, method = extract(text)
        answers.append(Answer(question, text, value, method))
    return answers


def read_questions(stream) -> list[str]:
    """One question per line; blank lines separate nothing and are not questions."""
    return [line.strip() for line in stream if line.strip()]


def format_value(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "none (no number found)"
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def run(args: argparse.Namespace) -> int:
    questions = list(args.questions)
    if not questions:
        if sys.stdin.isatty():
            print("reading questions from stdin, one per line (Ctrl-D to finish)", file=sys.stderr, flush=True)
        questions = read_questions(sys.stdin)
    config = config_from_args(EvalConfig, args)
    answers = answer_questions(config, questions)
    for number, answer in enumerate(answers, 1):
        if number > 1:
            print()
        print(f"Q: {answer.question}")
        print(f"A: {answer.text.strip()}")
        via = f" (from {answer.method})" if answer.value is not None and answer.method else ""
        print(f"answer: {format_value(answer.value)}{via}")
    return 0
