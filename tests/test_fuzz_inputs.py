"""Property-based: every bad input is a one-line MathtuneError naming the file (and line), never a traceback.

Hypothesis writes train/eval files in each accepted format (JSONL, JSON, CSV) from a mix of valid
rows and the ways real files go wrong: random bytes, a BOM, Latin-1 instead of UTF-8, empty files,
one 10 MB line, NaN/inf/empty gold answers, repeated rows, non-object rows, missing columns. A file
is either read into examples that are all usable (finite gold, non-empty question, unique ids) or
refused with one line. Seeded (derandomize), 200 inputs per format.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from mathtune.config import TrainConfig, build_config
from mathtune.errors import MathtuneError
from mathtune.tasks.files import read_examples

FUZZ = settings(max_examples=200, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])

answers = st.one_of(
    st.sampled_from(["#### 42", "6 * 7 = 42\n#### 42", "42", "3/4", "$1,000", "", " ", "NaN", "inf", "-inf",
                     "#### NaN", "#### inf", "#### ", "####", "#### 1 #### 2", "#### 5\nmore", "1e309", "#### 1e309"]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-10**30, max_value=10**30),
    st.text(max_size=30),
    st.none(), st.booleans(), st.lists(st.integers(), max_size=2),
)
questions = st.one_of(st.sampled_from(["How much is 6 times 7?", "", "  ", "q\nwith\nlines"]), st.text(max_size=40),
                      st.none(), st.integers())


@st.composite
def rows(draw):
    """A row as a Python value: usually an object with (some of) question/answer, sometimes not an object."""
    kind = draw(st.sampled_from(["ok", "ok", "ok", "missing", "extra", "not_object"]))
    if kind == "not_object":
        return draw(st.one_of(st.integers(), st.text(max_size=10), st.lists(st.integers(), max_size=3), st.none()))
    row = {"question": draw(questions), "answer": draw(answers)}
    if kind == "ok":
        row = {"question": "How much is 6 times 7?", "answer": draw(answers)}
    if kind == "missing":
        row.pop(draw(st.sampled_from(["question", "answer"])))
    if kind == "extra":
        row["id"] = draw(st.sampled_from(["dup", "dup", "x"]))  # repeated ids in the user's own column
    return row


def _json_line(value) -> str:
    return json.dumps(value)  # NaN/Infinity come out as the bare tokens Python's json reads back


def _csv_field(value) -> str:
    text = "" if value is None else str(value)
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n\r') else text


def render(fmt: str, values: list) -> str:
    if fmt == "jsonl":
        return "".join(_json_line(v) + "\n" for v in values)
    if fmt == "json":
        return json.dumps(values)
    header = "question,answer\n"
    lines = []
    for v in values:
        if isinstance(v, dict):
            lines.append(",".join(_csv_field(v.get(k)) for k in ("question", "answer") if k in v))
        else:
            lines.append(_csv_field(v))
    return header + "\n".join(lines) + "\n"


@st.composite
def file_bytes(draw, fmt: str) -> bytes:
    how = draw(st.sampled_from(["rows", "rows", "rows", "random", "empty", "bom", "latin1", "huge", "truncated",
                                "duplicates"]))
    if how == "random":
        return draw(st.binary(max_size=300))
    if how == "empty":
        return draw(st.sampled_from([b"", b"\n", b"  \n\n", b"\xef\xbb\xbf"]))
    values = draw(st.lists(rows(), min_size=1, max_size=6))
    if how == "duplicates":
        values = values + values
    text = render(fmt, values)
    if how == "bom":
        return b"\xef\xbb\xbf" + text.encode()
    if how == "latin1":
        return text.replace("6 times", "6 fois \u00e9").encode("latin-1", errors="replace")
    if how == "huge":  # one 10 MB line (a field: CSV readers cap them)
        big = {"question": "x" * 10_000_000, "answer": "#### 1"}
        return render(fmt, [big, *values]).encode()
    if how == "truncated":
        data = text.encode()
        return data[: draw(st.integers(min_value=0, max_value=max(len(data) - 1, 0)))]
    return text.encode()


def check_one(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    try:
        examples = read_examples(path, "--train-file")
    except MathtuneError as err:
        message = str(err)
        assert "\n" not in message and "\r" not in message, message[:300]
        assert message.startswith(str(path)), message[:300]  # names the file (and line/item where known)
        assert len(message) < 600, message[:300]  # one readable line, not a 10 MB echo of the input
        return
    assert examples
    assert len({ex.id for ex in examples}) == len(examples)
    for ex in examples:
        # a number, or an answer math-verify reads kept as its one-line text (tests/test_symbolic_answers.py)
        assert (ex.gold.strip() and "\n" not in ex.gold) if isinstance(ex.gold, str) else math.isfinite(ex.gold)
        assert ex.question.strip() and ex.answer_text.strip()


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv"])
def test_any_file_is_read_or_refused_in_one_line(fmt, tmp_path):
    path = tmp_path / f"data.{fmt}"
    seen = []

    @FUZZ
    @given(data=file_bytes(fmt))
    def run(data):
        seen.append(len(data))
        check_one(path, data)

    run()
    assert len(seen) >= 200  # generated inputs actually tried (hypothesis stops early on a small space)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv"])
def test_known_bad_files_are_one_line_errors(fmt, tmp_path):
    path = tmp_path / f"data.{fmt}"
    cases = [b"", b"\xff\xfe\x00\x01", b"\xef\xbb\xbf", b"[" * 100_000, b'{"question": "q", "answer": NaN}\n',
             render(fmt, [{"question": "q", "answer": float("inf")}]).encode(),
             render(fmt, [{"question": "q", "answer": ""}]).encode(),
             render(fmt, [{"question": "q"}]).encode(), render(fmt, [5, "x"]).encode()]
    if fmt == "csv":  # a 10 MB field is over csv's field limit (JSON has none: there it is a valid, long row)
        cases.append(render(fmt, [{"question": "x" * 10_000_000, "answer": "#### 1"}]).encode())
    for data in cases:
        path.write_bytes(data)
        with pytest.raises(MathtuneError) as err:
            read_examples(path, "--train-file")
        assert "\n" not in str(err.value) and str(err.value).startswith(str(path)) and len(str(err.value)) < 600


# --------------------------------------------------------------------------- YAML configs and flag values


yaml_values = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12),
                        st.lists(st.one_of(st.integers(), st.text(max_size=5)), max_size=3))
yaml_keys = st.one_of(st.sampled_from(["learning_rate", "lr_scheduler", "max_steps", "warmup_ratio", "device",
                                       "method", "precision", "target_modules", "num_epochs", "batch_size",
                                       "lerning_rate", "max-steps", "weight_decay"]), st.text(max_size=8))


@FUZZ
@given(data=st.one_of(st.dictionaries(yaml_keys, yaml_values, max_size=4), st.binary(max_size=200),
                      st.sampled_from([b"lr_scheduler: cosin\n", b"max_steps: 1.5\n", b"- a\n- b\n", b"max_steps: [\n",
                                       b"learning_rate: .nan\n", b"num_epochs: .inf\n", b"device: cuda:x\n",
                                       b"method: qlora\n", b"\xff\xfe", b"target_modules: [1, 2]\n"])))
def test_any_yaml_config_is_accepted_or_refused_in_one_line(tmp_path_factory, data):
    import yaml

    path = tmp_path_factory.mktemp("cfg") / "recipe.yaml"
    path.write_bytes(data if isinstance(data, bytes) else yaml.safe_dump(data).encode())
    try:
        config = build_config(TrainConfig, path, {})
    except MathtuneError as err:
        assert "\n" not in str(err) and str(path) in str(err), str(err)[:300]
        return
    assert math.isfinite(config.learning_rate) and config.learning_rate > 0


@pytest.mark.parametrize("argv, expected", [
    (["--lr-scheduler", "cosin"], "--lr-scheduler 'cosin' is unknown: did you mean 'cosine'?"),
    (["--device", "gpu"], "--device 'gpu' is unknown"),
    (["--learning-rate", "nan"], "--learning-rate must be a finite number"),
    (["--num-epochs", "inf"], "--num-epochs must be a finite number"),
    (["--warmup-ratio", "1.5"], "--warmup-ratio must be in [0, 1)"),
])
def test_bad_flag_values_are_one_line_errors(argv, expected, tmp_path, capsys):
    from mathtune.cli import main

    assert main(["train", *argv, "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "run").exists()  # nothing written
