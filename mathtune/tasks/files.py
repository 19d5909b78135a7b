"""Task "file": your own problems from JSONL, a JSON list, or CSV (columns question, answer).

The answer is a worked solution ending in ``#### N`` or a bare number (target ``"#### N"``).
Row checks are GSM8K's (``mathtune.tasks.gsm8k.check_row``), so both tasks accept and reject
exactly the same rows. Locations: JSONL and CSV by line (the CSV header is line 1), JSON by item.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from mathtune.errors import InputError, MathtuneError
from mathtune.tasks import Example, Task
from mathtune.tasks.gsm8k import SPLIT_FLAGS, make_example, read_jsonl_examples, read_text, require_rows

SUPPORTED = (".jsonl", ".json", ".csv")


def _read_json_list(path: Path, flag: str, strip_calc: bool) -> list[Example]:
    text = read_text(path, flag)
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(path, err.lineno, f"not valid JSON ({err.msg} at column {err.colno})") from err
    if not isinstance(items, list):
        raise InputError(path, None, f"expected a JSON list of objects, got {type(items).__name__}; use .jsonl for one object per line")
    examples = []
    for number, item in enumerate(items, start=1):  # "item 1" is the first, as a person counts
        try:
            examples.append(make_example(f"{path.name}:{number}", item, strip_calc=strip_calc, bare_number_ok=True))
        except ValueError as err:
            raise InputError(path, None, f"item {number}: {err}") from err
    return require_rows(path, examples, "write a list of objects with 'question' and 'answer'")


def _read_csv(path: Path, flag: str, strip_calc: bool) -> list[Example]:
    reader = csv.reader(io.StringIO(read_text(path, flag), newline=""))
    examples, header, end = [], None, 0
    for record in reader:
        # a quoted field may span lines: report the line the record starts on
        number, end = end + 1, reader.line_num
        if not any(field.strip() for field in record):
            continue  # blank lines hold no data: allowed
        if header is None:
            header = [field.strip() for field in record]
            if "question" not in header or "answer" not in header:
                raise InputError(path, number, f"header must name the columns 'question' and 'answer', found {header}")
            continue
        if len(record) > len(header):
            raise InputError(path, number, f"{len(record)} fields but the header has {len(header)}; quote fields that contain commas")
        row = dict(zip(header, record))
        try:
            examples.append(make_example(f"{path.name}:{number}", row, strip_calc=strip_calc, bare_number_ok=True))
        except ValueError as err:
            raise InputError(path, number, str(err)) from err
    return require_rows(path, examples, "write a header row 'question,answer' and one row per problem")


def read_examples(path, flag: str, *, strip_calc: bool = False) -> list[Example]:
    """Examples from ``path``, format chosen by extension; ids ``"<filename>:<line or item>"``."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl_examples(path, flag, strip_calc=strip_calc, bare_number_ok=True)
    if suffix == ".json":
        return _read_json_list(path, flag, strip_calc)
    if suffix == ".csv":
        return _read_csv(path, flag, strip_calc)
    raise MathtuneError(f"{path}: unsupported file type {suffix or '(none)'!r} for {flag}; use one of {', '.join(SUPPORTED)}")


class FileTask(Task):
    name = "file"
    judge_rule = "exact"

    def __init__(self, *, train_file=None, eval_file=None, strip_calculator: bool = False):
        super().__init__()
        self.files = {"train": train_file, "eval": eval_file}
        self.strip_calculator = strip_calculator

    def _load(self, split: str) -> list[Example]:
        flag = SPLIT_FLAGS[split]
        if self.files[split] is None:
            raise MathtuneError(f"task 'file' has no {split} data: pass {flag}")
        return read_examples(self.files[split], flag, strip_calc=self.strip_calculator)
