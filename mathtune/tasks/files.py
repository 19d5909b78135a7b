"""Task "file": your own problems from JSONL, a JSON list, CSV, Parquet, a ``datasets.save_to_disk``
dir, or a Hugging Face dataset (``--dataset``, read in ``mathtune.tasks.hub``).

Columns ``question`` and ``answer`` by default; ``--question-field`` / ``--answer-field`` map others
(MetaMathQA's query/response, MATH's problem/solution). The answer is a worked solution ending in
``#### X``, ``\\boxed{X}`` or "The answer is: X", or a bare answer (``mathtune.answers.read_gold``); X
is one number (judged by the numeric rule) or any answer math-verify reads (``\\frac{\\sqrt{3}}{2}``,
``(2, 5]``: judged by math-verify). A solution without ``####`` is trained as itself plus a final
``#### X`` line, the form every task targets. Rows are then checked by GSM8K's code (``mathtune.tasks.gsm8k``),
so a solution this task accepts is one the gsm8k task accepts too when its X is a number (GSM8K's golds
are; this task also takes the others). Locations: JSONL and CSV by line (the CSV header is line
1), JSON by item, Parquet and dataset dirs by row (0-based, as ``dataset[N]`` reads it).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Iterator

from mathtune.errors import InputError, MathtuneError
from mathtune.tasks import Example, FileBackedTask
from mathtune.tasks.gsm8k import SPLIT_FLAGS, build_examples, iter_jsonl, read_text
from mathtune.tasks.rows import BadRow, Fields, numbered_rows

SUPPORTED = (".jsonl", ".json", ".csv", ".parquet", "a datasets.save_to_disk directory")


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


def _csv_rows(path: Path, text: str, fields: Fields = Fields()) -> Iterator[tuple[int, dict]]:
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
            if fields.question not in header or fields.answer not in header:
                raise InputError(path, number, f"header must name the columns '{fields.question}' and "
                                               f"'{fields.answer}', found {header}; or set --question-field/--answer-field")
            continue
        if len(record) > len(header):
            reason = f"{len(record)} fields but the header has {len(header)}; quote fields that contain commas"
            raise InputError(path, number, reason)
        yield number, dict(zip(header, record))  # a short record lacks 'answer': check_row reports it


def load_dataset_rows(path: Path, flag: str, split: str | None = None) -> list[dict]:
    """Rows of a Parquet file or a ``datasets.save_to_disk`` dir, read by the datasets library."""
    try:
        import datasets
    except ImportError as err:  # a core dependency, but say what to do rather than trace back
        raise MathtuneError(f"{flag} {path}: reading it needs the datasets package: pip install datasets") from err
    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
        else:
            loaded = datasets.load_dataset("parquet", data_files=str(path), split="train")
    except Exception as err:  # pyarrow and datasets raise many types; the user needs the file and the fix
        what = "a datasets.save_to_disk directory" if path.is_dir() else "a Parquet file"
        raise InputError(path, None, f"not readable as {what} ({type(err).__name__}: {_first_line(err)}); "
                                     f"check the path given to {flag}") from None
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        if split is None and len(names) == 1:
            split = names[0]
        if split not in loaded:
            raise InputError(path, None, f"holds splits {', '.join(names)}: name one as {path / (split or names[0])}")
        loaded = loaded[split]
    return list(loaded)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:200]


def read_examples(path, flag: str, *, strip_calc: bool = False, fields: Fields = Fields()) -> list[Example]:
    """Examples from ``path``, format chosen by extension; ids ``"<filename>:<line, item or row>"``."""
    path = Path(path)
    suffix = path.suffix.lower()
    hint = f"write rows with '{fields.question}' and '{fields.answer}'"
    if suffix == ".jsonl":
        rows = iter_jsonl(path, read_text(path, flag))
        return _build(path, numbered_rows(rows, fields), strip_calc, hint + ", one JSON object per line")
    if suffix == ".json":
        items = enumerate(_json_items(path, read_text(path, flag)), start=1)  # "item 1" is the first
        return _build(path, numbered_rows(items, fields), strip_calc, hint + " as a list of objects", by_item=True)
    if suffix == ".csv":
        rows = _csv_rows(path, read_text(path, flag), fields)
        return _build(path, numbered_rows(rows, fields), strip_calc, hint + " as header columns, one row per problem")
    if suffix == ".parquet" or path.is_dir():
        rows = enumerate(load_dataset_rows(path, flag))
        return _build(path, numbered_rows(rows, fields), strip_calc, hint, by_row=True)
    kind = suffix or "(none)"
    raise MathtuneError(f"{path}: unsupported file type {kind!r} for {flag}; use one of {', '.join(SUPPORTED)}")


def _build(path: Path, rows, strip_calc: bool, hint: str, *, by_item: bool = False,
           by_row: bool = False) -> list[Example]:
    """``build_examples`` with the refusals of ``normalize_row`` located like its own."""
    def checked():
        for number, row in rows:
            if isinstance(row, BadRow):
                where = f"item {number}" if by_item else f"row {number}" if by_row else None
                raise InputError(path, None if where else number, f"{where}: {row.reason}" if where else row.reason)
            yield number, row

    if by_row:  # 0-based positions, reported as "row N" (build_examples would say "item N")
        try:
            return build_examples(path, checked(), strip_calc=strip_calc, bare_number_ok=True, hint=hint, by_item=True,
                                  symbolic_ok=True)
        except InputError as err:
            raise InputError(path, None, err.reason.replace("item ", "row ", 1)) from None
    return build_examples(path, checked(), strip_calc=strip_calc, bare_number_ok=True, hint=hint, by_item=by_item,
                          symbolic_ok=True)


class FileTask(FileBackedTask):
    name = "file"
    reads_dataset = True  # --dataset, --question-field/--answer-field
    judge_rule = "exact"

    def __init__(self, *, train_file=None, eval_file=None, strip_calculator: bool = False,
                 fields: Fields = Fields(), dataset: str | None = None, splits: dict | None = None):
        super().__init__(train_file=train_file, eval_file=eval_file, strip_calculator=strip_calculator)
        self.fields = fields
        self.dataset = dataset  # ORG/NAME[:CONFIG] on the hub (mathtune.tasks.hub)
        self.splits = {"train": "train", "eval": "test", **(splits or {})}

    def _load(self, split: str) -> list[Example]:
        if self.dataset is not None:
            from mathtune.tasks.hub import hub_examples

            return hub_examples(self.dataset, self.splits[split], self.fields, strip_calc=self.strip_calculator)
        flag = SPLIT_FLAGS[split]
        if self.files[split] is None:
            raise MathtuneError(f"task '{self.name}' has no {split} data: pass {flag}")
        return read_examples(self.files[split], flag, strip_calc=self.strip_calculator, fields=self.fields)
