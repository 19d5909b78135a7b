"""Answer extraction and judging (mathtune.answers): table-driven, strings only."""

import json
from pathlib import Path

import pytest

from mathtune.answers import (
    extract,
    extract_strict,
    format_number,
    judge,
    parse_gold,
    parse_number,
    strip_calculator,
)

GSM8K_TRAIN = Path(__file__).resolve().parents[2] / "shared/data/gsm8k/train.jsonl"

NUMBER_CASES = [
    ("1,234", 1234.0),
    ("$18.00", 18.0),
    ("-3", -3.0),
    ("5.", 5.0),
    ("3/4", 0.75),
    ("12%", 12.0),
    (" 42 ", 42.0),
    ("+7", 7.0),
    ("-$5", -5.0),
    ("$-5", -5.0),
    ("−2.5", -2.5),  # unicode minus, as some tokenizers emit
    (".5", 0.5),
    ("1,234,567.89", 1234567.89),
    ("0", 0.0),
    ("abc", None),
    ("", None),
    ("1e3", None),
    ("3/0", None),
    ("18 dollars", None),
    ("1,23", None),  # not a thousands grouping: rejected rather than read as 123
]


@pytest.mark.parametrize("text, expected", NUMBER_CASES)
def test_parse_number(text, expected):
    assert parse_number(text) == expected


# (model output, flexible value, flexible method, strict value)
EXTRACT_CASES = [
    # "####": the trained format; the first occurrence wins over anything generated after it
    ("#### 72", 72.0, "####", 72.0),
    ("She sold 48+24 = 72 clips.\n#### 72", 72.0, "####", 72.0),
    ("#### 72\nQuestion: Tom has 5 apples.\nAnswer: #### 5", 72.0, "####", 72.0),
    ("#### 72\nQuestion: how many are 9 and 10?", 72.0, "####", 72.0),
    ("####72", 72.0, "####", 72.0),
    ("#### $1,234.", 1234.0, "####", 1234.0),
    ("#### -15", -15.0, "####", -15.0),
    ("#### 18.00", 18.0, "####", 18.0),
    ("#### 3/4", 0.75, "####", 0.75),
    ("#### **42**", 42.0, "####", 42.0),
    ("#### 0.5 km", 0.5, "####", 0.5),
    # "####" with no number after it: strict gives up, flexible falls back
    ("#### unknown, but 5 + 3 = 8", 8.0, "last_number", None),
    ("The total is 9.\n####", 9.0, "last_number", None),
    # boxed
    ("So the answer is \\boxed{42}.", 42.0, "boxed", None),
    ("\\boxed{1,234}", 1234.0, "boxed", None),
    ("\\boxed{\\frac{3}{4}}", 0.75, "boxed", None),
    ("\\boxed{-7}", -7.0, "boxed", None),
    ("\\boxed{\\$18.50}", 18.5, "boxed", None),
    ("\\boxed{12} then 99", 12.0, "boxed", None),
    ("\\boxed{x} but 4", 4.0, "last_number", None),
    # "the (final) answer is"
    ("The answer is 5", 5.0, "answer_is", None),
    ("The answer is: $1,234.", 1234.0, "answer_is", None),
    ("so the final answer is 18.", 18.0, "answer_is", None),
    ("THE ANSWER IS -3 and then 10 more", -3.0, "answer_is", None),
    ("The answer is **42**.", 42.0, "answer_is", None),
    ("The final answer is: 2.5 hours", 2.5, "answer_is", None),
    ("the answer is 7 and the answer is 9", 7.0, "answer_is", None),
    ("The answer is unclear, maybe 6", 6.0, "last_number", None),
    # <answer> tags
    ("<answer>17</answer>", 17.0, "answer_tag", None),
    ("think 3 + 4\n<answer> $1,000 </answer>", 1000.0, "answer_tag", None),
    ("<ANSWER>-0.25</ANSWER> 99", -0.25, "answer_tag", None),
    # priority between methods
    ("\\boxed{3}\n#### 4", 4.0, "####", 4.0),
    ("The answer is 6. \\boxed{7}", 7.0, "boxed", None),
    ("<answer>8</answer> The answer is 9", 9.0, "answer_is", None),
    # last number fallback
    ("48/2 = 24 and 48 + 24 = 72", 72.0, "last_number", None),
    ("It costs $18.00.", 18.0, "last_number", None),
    ("x = -7.", -7.0, "last_number", None),
    ("5-3 = 2", 2.0, "last_number", None),
    ("a total of 1,234, give or take", 1234.0, "last_number", None),
    ("3,4 and 5", 5.0, "last_number", None),
    ("He ate 3/4 of it", 0.75, "last_number", None),
    ("it is 12%", 12.0, "last_number", None),
    ("The speed is 54 km/h", 54.0, "last_number", None),
    ("3500 m\n", 3500.0, "last_number", None),
    # nothing to find
    ("", None, "none", None),
    ("I do not know.", None, "none", None),
    ("####", None, "none", None),
]


@pytest.mark.parametrize("text, value, method, strict", EXTRACT_CASES)
def test_extract(text, value, method, strict):
    assert extract(text) == (value, method)
    assert extract_strict(text) == strict


@pytest.mark.parametrize(
    "answer, gold",
    [
        ("Natalie had 4 + 5 = <<4+5=9>>9 apples.\n#### 9", 9.0),
        ("#### 1,200", 1200.0),
        ("#### -3", -3.0),
        ("#### 2.5", 2.5),
        ("#### 72\n", 72.0),
        ("#### $18", 18.0),
    ],
)
def test_parse_gold(answer, gold):
    assert parse_gold(answer) == gold


@pytest.mark.parametrize(
    "answer, reason",
    [
        ("Natalie had 9 apples.", "no '#### <number>'"),
        ("#### ", "nothing after '####'"),
        ("#### nine", "not a number: 'nine'"),
        ("#### 72 apples", "not a number: '72 apples'"),
    ],
)
def test_parse_gold_errors(answer, reason):
    with pytest.raises(ValueError, match=reason):
        parse_gold(answer)


@pytest.mark.parametrize(
    "value, gold, rule, expected",
    [
        (18.0, 18.0, "exact", True),
        (18.0000001, 18.0, "exact", True),  # float noise from parsing "18.00" style answers
        (18.01, 18.0, "exact", False),
        (17.0, 18.0, "exact", False),
        (-3.0, -3.0, "exact", True),
        (3.0, -3.0, "exact", False),
        (0.0, 0.0, "exact", True),
        (1e-7, 0.0, "exact", True),  # absolute tolerance 1e-6 near zero
        (1e-5, 0.0, "exact", False),
        (1234000.5, 1234000.0, "exact", True),  # relative tolerance for big golds
        (None, 18.0, "exact", False),
        (104.9, 100.0, "rel_tol=0.05", True),
        (95.0, 100.0, "rel_tol=0.05", True),
        (94.9, 100.0, "rel_tol=0.05", False),
        (105.1, 100.0, "rel_tol=0.05", False),
        (-3.1, -3.0, "rel_tol=0.05", True),
        (3.0, -3.0, "rel_tol=0.05", False),
        (0.0, 0.0, "rel_tol=0.05", True),
        (0.001, 0.0, "rel_tol=0.05", False),  # gold 0: exact only
        (3500.0, 3584.0, "rel_tol=0.05", True),  # x1000 instead of x1024 passes
        (None, 5.0, "rel_tol=0.05", False),
    ],
)
def test_judge(value, gold, rule, expected):
    assert judge(value, gold, rule) is expected


@pytest.mark.parametrize("rule", ["rel_tol=0.1", "close", ""])
def test_judge_unknown_rule(rule):
    with pytest.raises(ValueError, match="unknown judge rule"):
        judge(1.0, 1.0, rule)


def test_strip_calculator():
    text = "Natalia sold 48/2 = <<48/2=24>>24 clips.\nIn all 48+24 = <<48+24=72>>72.\n#### 72"
    assert strip_calculator(text) == "Natalia sold 48/2 = 24 clips.\nIn all 48+24 = 72.\n#### 72"
    assert strip_calculator("no annotations 3 < 4 > 2") == "no annotations 3 < 4 > 2"


@pytest.mark.parametrize(
    "value, text",
    [(3500.0, "3500"), (0.1 + 0.2, "0.3"), (2.5 * 3.6, "9"), (-0.0, "0"), (-12.5, "-12.5"), (1e-7, "0")],
)
def test_format_number(value, text):
    assert format_number(value) == text
    assert parse_number(text) == pytest.approx(value, abs=1e-6)


def test_every_gsm8k_train_gold_parses():
    if not GSM8K_TRAIN.is_file():
        pytest.skip(f"GSM8K train file not present at {GSM8K_TRAIN}")
    rows = [json.loads(line) for line in GSM8K_TRAIN.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(rows) == 7473
    for row in rows:
        gold = parse_gold(row["answer"])
        # the text after "####" is the whole gold, and strict extraction reads the same number
        assert extract_strict(row["answer"]) == gold
        assert extract(row["answer"]) == (gold, "####")


def test_answer_is_3_over_4_with_a_full_stop_reads_0_75_not_3():
    assert extract("The answer is 3/4.") == (0.75, "answer_is")
    assert extract("so she has 3/4. Then") == (0.75, "last_number")
    assert extract("The answer is 3/4.5 cups") == (3 / 4.5, "answer_is")  # a decimal denominator still reads


def test_boxed_dollar_with_latex_thousands_separator_reads_1000_not_1():
    assert extract(r"\boxed{\$1{,}000}") == (1000.0, "boxed")
    assert extract(r"\boxed{12{,}345{,}678}") == (12345678.0, "boxed")
