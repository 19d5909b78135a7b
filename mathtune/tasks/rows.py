"""A source row -> the ``{question, answer}`` row GSM8K's checks read: the column mapping
(``--question-field`` / ``--answer-field``) and the gold answer in another dataset's form.

Shared by the file task (``mathtune.tasks.files``) and hub datasets (``mathtune.tasks.hub``).
"""

from __future__ import annotations

from dataclasses import dataclass

from mathtune.answers import read_gold


@dataclass(frozen=True)
class Fields:
    """Which columns hold the question and the gold answer (--question-field / --answer-field)."""

    question: str = "question"
    answer: str = "answer"

    def flags(self) -> str:
        return f"--question-field {self.question} --answer-field {self.answer}"


def normalize_row(row: object, fields: Fields) -> object:
    """A source row -> ``{question, answer}`` in GSM8K's shape; ValueError(reason) when it cannot be.

    Renames the mapped columns, and turns a gold answer in another dataset's form (\\boxed{}, "The
    answer is: X") into the solution plus a final ``#### X`` line (a fraction stays one: ``#### 3/4``;
    a symbolic answer keeps its LaTeX: ``#### \\frac{\\sqrt{3}}{2}``).
    """
    if not isinstance(row, dict):
        return row  # check_row names the problem
    missing = [name for name in (fields.question, fields.answer) if name not in row]
    if missing and (fields.question, fields.answer) != ("question", "answer"):
        found = ", ".join(map(str, row)) or "none"
        raise ValueError(f"no column {' or '.join(map(repr, missing))} (columns: {found}); "
                         "set --question-field/--answer-field")
    question, answer = row.get(fields.question), row.get(fields.answer)
    if isinstance(answer, str) and answer.strip() and "####" not in answer:
        try:
            _, plain, form = read_gold(answer)
        except ValueError as err:
            raise ValueError(f"'{fields.answer}' {err}") from None
        answer = f"#### {plain}" if form in ("number", "text") else f"{answer.rstrip()}\n#### {plain}"
    return {"question": question, "answer": answer}


def numbered_rows(rows, fields: Fields):
    """``(number, row)`` pairs -> the same numbers with normalized rows; a ValueError keeps its number."""
    for number, row in rows:
        try:
            yield number, normalize_row(row, fields)
        except ValueError as err:
            yield number, BadRow(str(err))


class BadRow(dict):
    """A row normalize_row refused: check_row sees no 'question', so the reason travels here instead."""

    def __init__(self, reason: str):
        super().__init__()
        self.reason = reason
