"""Task "math": competition-style problems (MATH, NuminaMath, DeepMath, OpenMathInstruct) from your files
or a hub dataset, read like task "file" but with the competition conventions.

- Columns ``problem`` and ``solution`` by default (MATH's); ``--question-field``/``--answer-field`` map others.
- Each prompt asks for the final answer in ``\\boxed{}``, in the words Qwen2.5-Math and DeepSeek-R1 are
  prompted with, so a model tuned elsewhere answers in the form the judge reads first.
- The gold is the solution's last ``\\boxed{}`` (or ``#### X``, "The answer is", the whole field): one
  number is judged by the numeric rule, anything else by math-verify (``mathtune.answers``).
"""

from __future__ import annotations

import dataclasses

from mathtune.tasks import Example
from mathtune.tasks.files import FileTask
from mathtune.tasks.rows import Fields

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
MATH_FIELDS = Fields("problem", "solution")


class MathTask(FileTask):
    name = "math"
    judge_rule = "exact"  # for golds that are one number; the others are math-verify's

    def __init__(self, *, fields: Fields | None = None, **kwargs):
        # the generic defaults (question/answer) mean "not mapped": MATH's own names then
        super().__init__(fields=MATH_FIELDS if fields in (None, Fields()) else fields, **kwargs)

    def _load(self, split: str) -> list[Example]:
        return [dataclasses.replace(example, question=prompt(example.question)) for example in super()._load(split)]


def prompt(problem: str) -> str:
    """The problem as the model sees it: the question, then the request for a boxed final answer."""
    return f"{problem}\n\n{INSTRUCTION}"
