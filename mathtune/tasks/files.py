"""Task "file": your own problems from JSONL, a JSON list, or CSV (columns question, answer).

The answer is a worked solution ending in ``#### N`` or a bare number (target ``"#### N"``).
Rows are checked by GSM8K's code (``mathtune.tasks.gsm8k``), so a solution this task accepts is
one the gsm8k task accepts too. Locations: JSONL and CSV by line (the CSV header is line 1), JSON by item.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Iterator

from mathtune.errors import InputError, MathtuneError
from mathtune.tasks import Example, FileBackedTask
from mathtune.tasks.gsm8k import SPLIT_FLAGS, build_examples, read_jsonl_examples, read_text

SUPPORTED = (".jsonl", ".json", ".csv")


def _json_items(path: Path, text: str) -> list:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(path, err.lineno, f"not valid JSON ({err.msg} at column {err.colno})") from err
    except RecursionError:  # json recurses per nesting level: "[[[[..." thousands deep
        raise InputError(path, None, "JSON nested too deeply; write a list of flat objects") from None
    if not isinstance(items, list):
        kind = type(items).__name__
        raise InputError(path, None, f"expected a JSON list of objects, got {kind}; use .jsonl for one object per line")
    return items


def _csv_rows(path: Path, text: str) -> Iterator[tuple[int, dict]]:
    """``(line, {column: value})`` per record; the header is line 1, blank lines are skipped."""
    reader = csv.reader(io.StringIO(text, newline=""))
    header, end = None, 0
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            # a field over csv's limit (131,072 characters) or a stray quote: the row, not a traceback
            raise InputError(path, end + 1, f"unreadable CSV ({err}); check quoting and field length") from None
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
            reason = f"{len(record)} fields but the header has {len(header)}; quote fields that contain commas"
            raise InputError(path, number, reason)
        yield number, dict(zip(header, record))  # a short record lacks 'answer': check_row reports it


def read_examples(path, flag: str, *, strip_calc: bool = False) -> list[Example]:
    """Examples from ``path``, format chosen by extension; ids ``"<filename>:<line or item>"``."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl_examples(path, flag, strip_calc=strip_calc, bare_number_ok=True)
    if suffix == ".json":
        items = enumerate(_json_items(path, read_text(path, flag)), start=1)  # "item 1" is the first
        hint = "write a list of objects with 'question' and 'answer'"
        return build_examples(path, items, strip_calc=strip_calc, bare_number_ok=True, hint=hint, by_item=True)
    if suffix == ".csv":
        rows = _csv_rows(path, read_text(path, flag))
        hint = "write a header row 'question,answer' and one row per problem"
        return build_examples(path, rows, strip_calc=strip_calc, bare_number_ok=True, hint=hint)
    kind = suffix or "(none)"
    raise MathtuneError(f"{path}: unsupported file type {kind!r} for {flag}; use one of {', '.join(SUPPORTED)}")


class FileTask(FileBackedTask):
    name = "file"
    judge_rule = "exact"

    def _load(self, split: str) -> list[Example]:
        flag = SPLIT_FLAGS[split]
        if self.files[split] is None:
            raise MathtuneError(f"task 'file' has no {split} data: pass {flag}")
        return read_examples(self.files[split], flag, strip_calc=self.strip_calculator)
