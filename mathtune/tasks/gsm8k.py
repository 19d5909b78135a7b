"""GSM8K: grade-school math word problems, solutions ending in ``#### N``.

Rows come from local JSONL files in the GSM8K schema (``{"question": ..., "answer": ...}``) or
from the Hugging Face hub (``openai/gsm8k``, config ``main``; our eval split is its test split).
The row checks here are shared with the custom-file task (``mathtune.tasks.files``).
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Iterable, Iterator

from mathtune.answers import format_number, parse_gold, parse_number, strip_calculator
from mathtune.errors import InputError, MathtuneError
from mathtune.tasks import Example, FileBackedTask

HUB_ID, HUB_CONFIG = "openai/gsm8k", "main"
HUB_SPLITS = {"train": "train", "eval": "test"}
SPLIT_FLAGS = {"train": "--train-file", "eval": "--eval-file"}


def read_text(path: Path, flag: str) -> str:
    """The file's UTF-8 text; a missing or undecodable file is an InputError naming ``flag``."""
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise InputError(path, None, f"file {what}; check the path given to {flag}")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # -sig: spreadsheet exports often start with a BOM
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise InputError(path, line, "not UTF-8 text; re-save the file as UTF-8") from err


def iter_jsonl(path: Path, text: str) -> Iterator[tuple[int, object]]:
    """``(line_number, parsed_value)`` per non-blank line (1-based); broken JSON is an error."""
    # Lines end at "\n" only (JSON Lines): str.splitlines() would also split inside a string at a raw
    # U+2028/U+2029 or \x1c-\x1e, which JSON allows unescaped (GSM8K's train split has a question with
    # U+2028, and json.dumps(..., ensure_ascii=False) -- mathtune rft's output -- writes it raw).
    lines = text.split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue  # blank lines separate nothing and hold no data: allowed
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):  # broken, and no newline after it: its writer stopped mid-line
                reason = (f"the last line is cut short ({err.msg} at column {err.colno}, no newline after it: "
                          f"its writer was stopped mid-line); delete that line, or rerun what wrote the file "
                          f"(mathtune rft: the same command with --resume)")
            else:
                reason = f"not valid JSON ({err.msg} at column {err.colno}); write one JSON object per line"
            raise InputError(path, number, reason) from err
        except RecursionError:  # json recurses per nesting level: "[[[[..." thousands deep
            raise InputError(path, number, "JSON nested too deeply; write one flat JSON object per line") from None


def check_row(row: object, *, bare_number_ok: bool = False, symbolic_ok: bool = False) -> tuple[str, str, float | str]:
    """Validate one ``{question, answer}`` row -> ``(question, answer_text, gold)``.

    Raises ValueError(reason) with the fix; the caller adds the file and line. With
    ``bare_number_ok`` an answer that is just a number becomes the target ``"#### N"``. With
    ``symbolic_ok`` the final ``#### X`` may be any answer math-verify reads (``answers.parse_gold``):
    GSM8K's golds are numbers, other datasets' need not be.
    """
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object with 'question' and 'answer', got {type(row).__name__}")
    missing = [key for key in ("question", "answer") if row.get(key) is None]
    if missing:
        names = " and ".join(repr(key) for key in missing)
        raise ValueError(f"missing {names}; every row needs both 'question' and 'answer'")
    question, answer = row["question"], row["answer"]
    if not isinstance(question, str) or not question.strip():
        raise ValueError("'question' must be a non-empty string")
    if bare_number_ok and isinstance(answer, (int, float)) and not isinstance(answer, bool):
        if not math.isfinite(answer):
            raise ValueError(f"'answer' {answer} is not a finite number")
        target = f"#### {format_number(answer)}"
        return question.strip(), target, parse_gold(target)  # gold as the target states it
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError("'answer' must be a non-empty string ending in '#### <number>'")
    answer = answer.strip()
    if "####" not in answer:
        if bare_number_ok:
            value = parse_number(answer)
            if value is None:
                raise ValueError(f"'answer' {answer[:40]!r} is neither a solution ending in '#### <number>'"
                                 " nor a bare number")
            target = f"#### {format_number(value)}"
            return question.strip(), target, parse_gold(target)
        raise ValueError("'answer' has no final '#### <number>' line; end the solution with e.g. '#### 42'")
    if answer.count("####") > 1:
        raise ValueError("'answer' has more than one '####'; keep only the final '#### <number>' line")
    gold = parse_gold(answer, symbolic_ok=symbolic_ok)
    if "\n" in answer.split("####", 1)[1]:
        # a target that goes on after its answer teaches the model to keep talking
        raise ValueError("text after the '#### <number>' line; the final answer must be the last line")
    return question.strip(), answer, gold


# --target-format: what a training target holds.
#   full             the whole worked solution (default)
#   equations        only the chain of <<expr=result>> annotations, in order, space-separated, then the
#                    final "#### N": "<<10/5=2>> <<2*2=4>> #### 4". The annotations stay, so calculator
#                    decoding still fills their results. A row without annotations keeps its full text.
#   equations-drop   as equations, but rows without annotations are dropped (and counted)
TARGET_FORMATS = ("full", "equations", "equations-drop")
_ANNOTATION_RE = re.compile(r"<<[^<>]*>>")


def equations_target(answer_text: str) -> str | None:
    """``answer_text`` as its annotation chain plus the final ``#### N`` line; None without annotations."""
    body, _, final = answer_text.rpartition("####")
    equations = _ANNOTATION_RE.findall(body)
    if not equations:
        return None
    return " ".join(equations) + " #### " + final.strip()


def format_target(answer_text: str, *, strip_calc: bool, target_format: str = "full") -> str | None:
    """A checked solution (``check_row``'s answer) as the training target: the target format, then
    optional calculator stripping; None where ``equations-drop`` drops it. Gold rows and the solutions
    ``mathtune rft`` harvests both go through here, so both end up in one format. Idempotent for
    every format: an equation chain is its own chain."""
    if target_format != "full":
        equations = equations_target(answer_text)
        if equations is None and target_format == "equations-drop":
            return None
        answer_text = equations if equations is not None else answer_text
    if strip_calc:
        answer_text = strip_calculator(answer_text)
    return answer_text


def make_example(example_id: str, row: object, *, strip_calc: bool, bare_number_ok: bool = False,
                 target_format: str = "full", symbolic_ok: bool = False) -> Example | None:
    """``check_row`` plus the target format and optional calculator stripping (``format_target``);
    ValueError(reason) on a bad row, None for a row that ``equations-drop`` drops."""
    question, answer_text, gold = check_row(row, bare_number_ok=bare_number_ok, symbolic_ok=symbolic_ok)
    answer_text = format_target(answer_text, strip_calc=strip_calc, target_format=target_format)
    if answer_text is None:
        return None
    return Example(id=example_id, question=question, answer_text=answer_text, gold=gold)


def build_examples(
    path: Path, numbered_rows: Iterable[tuple[int, object]], *, strip_calc: bool, bare_number_ok: bool,
    hint: str, by_item: bool = False, target_format: str = "full", symbolic_ok: bool = False,
) -> list[Example]:
    """Examples with ids ``"<filename>:<number>"``; a bad row is an InputError at its line.

    ``by_item``: numbers are JSON list positions, reported as "item N" rather than as lines.
    """
    examples, dropped = [], []
    for number, row in numbered_rows:
        try:
            example = make_example(f"{path.name}:{number}", row, strip_calc=strip_calc,
                                   bare_number_ok=bare_number_ok, target_format=target_format,
                                   symbolic_ok=symbolic_ok)
        except ValueError as err:
            if by_item:
                raise InputError(path, None, f"item {number}: {err}") from err
            raise InputError(path, number, str(err)) from err
        if example is None:
            dropped.append(f"{path.name}:{number}")
        else:
            examples.append(example)
    report_dropped(dropped, len(examples) + len(dropped), str(path))
    if not examples:  # training or scoring on nothing proves nothing
        raise InputError(path, None, f"no examples: the file is empty; {hint}")
    return examples


def report_dropped(dropped: list[str], total: int, where: str) -> None:
    """Say how many rows ``--target-format equations-drop`` dropped (nothing is skipped silently)."""
    if dropped:
        print(f"{where}: --target-format equations-drop dropped {len(dropped)} of {total} rows without "
              f"<<expr=result>> annotations (e.g. {', '.join(dropped[:3])})", file=sys.stderr)


def read_jsonl_examples(path: Path, flag: str, *, strip_calc: bool, bare_number_ok: bool = False,
                        target_format: str = "full") -> list[Example]:
    """Examples from a JSONL file, one object per line; any bad line is an InputError."""
    rows = iter_jsonl(path, read_text(path, flag))
    hint = "write one JSON object per line with 'question' and 'answer'"
    return build_examples(path, rows, strip_calc=strip_calc, bare_number_ok=bare_number_ok, hint=hint,
                          target_format=target_format)


def load_hub_rows(split: str) -> list[dict]:
    """GSM8K rows from the hub; any failure (offline, renamed dataset) becomes one clear line."""
    from mathtune.compat import hub_offline
    from mathtune.models.hub import hub_local_only

    fix = "pass --train-file/--eval-file with GSM8K JSONL"
    # unreachable hub: datasets would spend ~25 s on retries before failing; a cached copy still loads
    local_only = hub_local_only()
    try:
        from datasets import DownloadConfig, load_dataset

        with hub_offline(local_only):
            return list(load_dataset(HUB_ID, HUB_CONFIG, split=HUB_SPLITS[split],
                                     download_config=DownloadConfig(local_files_only=local_only)))
    except Exception as err:  # network, auth and schema errors all end the same way for the user
        where = "the hub is unreachable and no cached copy exists" if local_only else type(err).__name__
        raise MathtuneError(f"could not load GSM8K from the Hugging Face hub ({HUB_ID}: {where}); {fix}") from err


class GSM8KTask(FileBackedTask):
    name = "gsm8k"
    judge_rule = "exact"
    calculator_by_default = True  # GSM8K solutions carry <<48/2=24>> annotations
    hub_dataset = "openai/gsm8k"
    lm_eval_shots_from_train_file = True  # lm-eval gsm8k draws its 5 shots from the train split
    target_formats = TARGET_FORMATS

    def _load(self, split: str) -> list[Example]:
        path = self.files[split]
        if path is not None:
            path = Path(path)
            if path.suffix.lower() in (".json", ".csv"):  # else every line would be "not valid JSON"
                raise MathtuneError(f"{path}: task gsm8k reads JSONL; for a JSON list or CSV use --task file")
            return read_jsonl_examples(path, SPLIT_FLAGS[split], strip_calc=self.strip_calculator,
                                       target_format=self.target_format)
        if any(self.files.values()):
            # mixing a local file with the hub would silently change the data source
            raise MathtuneError(f"no {split} data: pass {SPLIT_FLAGS[split]} (GSM8K JSONL) as well")
        hub_split = HUB_SPLITS[split]
        examples, dropped = [], []
        for index, row in enumerate(load_hub_rows(split)):
            example_id = f"gsm8k-{hub_split}-{index:05d}"
            try:
                example = make_example(example_id, row, strip_calc=self.strip_calculator,
                                       target_format=self.target_format)
            except ValueError as err:  # the hub schema changed under us
                raise MathtuneError(f"{HUB_ID} {hub_split} row {index}: {err}") from err
            (examples.append(example) if example is not None else dropped.append(example_id))
        report_dropped(dropped, len(examples) + len(dropped), f"{HUB_ID} {hub_split}")
        return examples
