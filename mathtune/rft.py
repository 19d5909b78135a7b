"""Rejection-sampling fine-tuning data (RFT, Yuan et al. 2023): a model's own distinct correct solutions.

    mathtune rft --model runs/sft --task gsm8k --train-file train.jsonl --output rft.jsonl
    mathtune train --task gsm8k --train-file rft.jsonl ...            # then train on it as usual

Phases: sample ``num_samples`` completions per training question (temperature 0.7 by default, the
same batched Generator as eval, calculator and loop stop included) -> judge each with the task's
rule (flexible extraction, as ``accuracy`` scores) -> turn each correct one into a training target
in the task's format -> keep the distinct ones -> write the gold rows plus the kept ones (JSONL,
``{"question", "answer"}``, readable by the gsm8k and file tasks) -> print how many questions gained
how many solutions.

A target ends in ``#### N``: a sample that states its answer some other way ("The answer is 5")
gets ``#### <gold>`` appended; text after a ``#### N`` line is cut. Looping samples are never kept.
"Distinct" compares whitespace-normalised text, and a sample equal to the gold solution adds nothing.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from mathtune.config import ModelSettings, setting
from mathtune.errors import ConfigError, MathtuneError

RFT_TASKS = ("gsm8k", "unit-conversion", "file")


@dataclass
class RFTConfig(ModelSettings):
    """Everything ``mathtune rft`` needs (model/task settings are shared with train and eval)."""

    output: str | None = setting(None, "where to write the training file (.jsonl): gold rows + kept samples")
    num_samples: int = setting(4, "completions sampled per training question (k)")
    temperature: float = setting(0.7, "sampling temperature (> 0)")
    top_p: float = setting(1.0, "nucleus sampling threshold")
    max_new_tokens: int = setting(256, "longest completion")
    batch_size: int = setting(32, "rows (question x sample) generated together")
    max_samples: int = setting(-1, "training questions to sample for, from the start of the train split (-1: all)")
    loop_stop: bool = setting(True, "stop a sample that repeats a line or an 8+ token span 3 times (never kept)")

    def validate(self) -> "RFTConfig":
        problems = self._common_problems()
        if self.task not in RFT_TASKS:
            problems.append(f"--task {self.task}: rft works for {', '.join(RFT_TASKS)}")
        if self.output is None:
            problems.append("--output is required: the .jsonl training file to write")
        elif Path(self.output).suffix.lower() != ".jsonl":
            problems.append(f"--output {self.output}: write a .jsonl file (one {{question, answer}} object per line)")
        for name in ("num_samples", "max_new_tokens", "batch_size"):
            if getattr(self, name) <= 0:
                problems.append(f"--{name.replace('_', '-')} must be > 0 (got {getattr(self, name)})")
        if not self.temperature > 0:
            problems.append(f"--temperature must be > 0: rejection sampling needs different samples (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            problems.append(f"--top-p must be in (0, 1] (got {self.top_p})")
        if self.max_samples == 0 or self.max_samples < -1:
            problems.append(f"--max-samples must be a positive count or -1 for all (got {self.max_samples})")
        if problems:
            raise ConfigError(problems)
        return self


def _normalised(text: str) -> str:
    return " ".join(text.split())


def as_target(text: str, gold: float) -> str | None:
    """A correct sample as a training target ending in ``#### N``; None when it cannot be one."""
    from mathtune.answers import extract_strict, format_number
    from mathtune.tasks.gsm8k import check_row

    text = text.strip()
    if extract_strict(text) is not None:
        start = text.find("####")
        end = text.find("\n", start)
        text = text if end < 0 else text[:end].rstrip()  # what follows the answer line is noise
    else:
        text = f"{text}\n#### {format_number(gold)}" if text else f"#### {format_number(gold)}"
    try:
        _question, answer, _gold = check_row({"question": "q", "answer": text})
    except ValueError:
        return None  # e.g. two "####" in one sample
    return answer


@dataclass
class Selection:
    """Per question: the kept targets; overall counts of why samples were not kept."""

    kept: list[list[str]]
    rejected: Counter


def select_solutions(examples: Sequence, samples: Sequence[Sequence[str]], loops: Sequence[Sequence[bool]] | None,
                     is_correct: Callable[[str, object], bool]) -> Selection:
    """The distinct correct samples of each example, as targets (see the module docstring)."""
    kept: list[list[str]] = []
    rejected: Counter = Counter()
    for i, (example, texts) in enumerate(zip(examples, samples)):
        seen = {_normalised(example.answer_text)}
        mine = []
        for j, text in enumerate(texts):
            if loops is not None and loops[i][j]:
                rejected["loop"] += 1
                continue
            if not is_correct(text, example):
                rejected["wrong"] += 1
                continue
            target = as_target(text, example.gold)
            if target is None:
                rejected["not a valid target"] += 1
                continue
            key = _normalised(target)
            if key in seen:
                rejected["duplicate"] += 1
                continue
            seen.add(key)
            mine.append(target)
        kept.append(mine)
    return Selection(kept, rejected)


def task_judge(judge_rule: str) -> Callable[[str, object], bool]:
    """The task's judging rule on flexible extraction: what ``accuracy`` counts as right."""
    from mathtune.answers import extract, judge

    def is_correct(text: str, example) -> bool:
        value, _method = extract(text)
        return judge(value, example.gold, judge_rule)

    return is_correct


def run_rft(config: RFTConfig, *, is_correct: Callable[[str, object], bool] | None = None,
            generator=None, verbose: bool = True) -> dict:
    """Sample, judge, select, write ``config.output``; returns the counts it prints.

    ``is_correct(text, example)`` defaults to the task's judge; ``generator(questions) ->
    Generations`` defaults to the batched Generator on ``config.model`` (tests pass their own).
    """
    from mathtune.atomic import write_text_atomically
    from mathtune.data import take
    from mathtune.generation.settings import GenerationSettings, resolve_calculator
    from mathtune.tasks import get_task

    config.validate()
    task = get_task(config.task, train_file=config.train_file, eval_file=config.eval_file,
                    strip_calculator=config.strip_calculator, seed=config.seed)
    examples = take(task.examples("train"), config.max_samples, "train")
    if not examples:
        raise MathtuneError("no training questions: the train split is empty (check --train-file / --max-samples)")
    settings = GenerationSettings(
        max_new_tokens=config.max_new_tokens, temperature=float(config.temperature), top_p=float(config.top_p),
        num_samples=config.num_samples, batch_size=config.batch_size, seed=config.seed,
        calculator=resolve_calculator(config.calculator, config.task), loop_stop=config.loop_stop,
    ).validate()
    if generator is None:
        generator = _model_generator(config, settings)
    if verbose:
        calc = "on" if settings.calculator else "off"
        print(f"rft: sampling {config.num_samples} completions for each of {len(examples)} {config.task} training "
              f"questions from {config.model} (temperature {config.temperature:g}, calculator {calc})",
              file=sys.stderr, flush=True)
    outputs = generator([e.question for e in examples])
    if len(outputs) != len(examples):
        raise MathtuneError(f"the generator returned {len(outputs)} results for {len(examples)} questions")
    selection = select_solutions(examples, outputs, getattr(outputs, "loops", None),
                                 is_correct or task_judge(task.judge_rule))

    rows = [{"question": e.question, "answer": e.answer_text} for e in examples]
    rows += [{"question": e.question, "answer": target} for e, targets in zip(examples, selection.kept) for target in targets]
    output = Path(config.output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    except OSError as exc:
        raise MathtuneError(f"--output {output}: cannot write ({exc.strerror}); pick a writable path") from exc

    gained = Counter(len(targets) for targets in selection.kept)
    result = {
        "questions": len(examples),
        "samples": len(examples) * config.num_samples,
        "gold_rows": len(examples),
        "new_rows": sum(len(t) for t in selection.kept),
        "questions_gained": {n: gained[n] for n in sorted(gained)},
        "rejected": dict(selection.rejected),
        "output": str(output),
    }
    if verbose:
        print(format_result(result, config))
    return result


def format_result(result: dict, config: RFTConfig) -> str:
    with_new = sum(count for n, count in result["questions_gained"].items() if n > 0)
    lines = [
        f"questions: {result['questions']}, samples: {result['samples']}; "
        f"{with_new} questions gained at least one new solution",
        "solutions gained per question: " + ", ".join(
            f"{n}: {count} questions" for n, count in result["questions_gained"].items()),
        "samples not kept: " + (", ".join(f"{why} {n}" for why, n in sorted(result["rejected"].items())) or "none"),
        f"wrote {result['output']}: {result['gold_rows']} gold rows + {result['new_rows']} sampled solutions",
    ]
    task = "file" if config.task == "unit-conversion" else config.task  # unit-conversion reads no files
    lines.append(f"next: mathtune train --task {task} --train-file {result['output']} ...")
    return "\n".join(lines)


def _model_generator(config: RFTConfig, settings):
    from mathtune.evaluation import _torch_dtype
    from mathtune.generation.engine import Generator
    from mathtune.models import choose_device, choose_precision, load_model

    device, _ = choose_device(config.device)
    precision, _ = choose_precision(config.precision, device)
    loaded = load_model(config.model, device=device, dtype=_torch_dtype(precision), merge_adapter=True,
                        trust_remote_code=config.trust_remote_code, allow_pickle=config.allow_pickle)
    return Generator(loaded.model, loaded.tokenizer, settings)

