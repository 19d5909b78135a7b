"""Tasks: local-file parsing and its errors, the hub fallback, and the generated unit conversions.

All problems below are made up for these tests; no GSM8K text is copied into the repo.
"""

import json
import re

from mathtune.calculator import calculate, evaluate
from pathlib import Path

import pytest

from mathtune.models import hub
from mathtune.answers import extract_strict, judge, parse_gold
from mathtune.errors import InputError, MathtuneError
from mathtune.tasks import TASK_NAMES, Example, get_task
from mathtune.tasks import unit_conversion as uc

GSM8K_TRAIN = Path(__file__).resolve().parents[2] / "shared/data/gsm8k/train.jsonl"

ROWS = [
    {"question": "Ana has 3 boxes of 4 pens. How many pens?", "answer": "3 * 4 = <<3*4=12>>12 pens.\n#### 12"},
    {"question": "A bus carries 30 people and 7 leave. How many stay?", "answer": "30 - 7 = <<30-7=23>>23\n#### 23"},
    {"question": "Milo saves $1,500 a year for 2 years. Total?", "answer": "1500 * 2 = 3000\n#### 3,000"},
]


def write_jsonl(path: Path, rows, extra_lines=()) -> Path:
    lines = [json.dumps(row) for row in rows] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------- registry


def test_task_names_and_unknown_task():
    assert TASK_NAMES == ["gsm8k", "unit-conversion", "file", "math"]
    with pytest.raises(MathtuneError, match="unknown task 'gsm9k': choose one of gsm8k, unit-conversion, file, math"):
        get_task("gsm9k")


def test_unknown_split(tmp_path):
    task = get_task("gsm8k", train_file=write_jsonl(tmp_path / "t.jsonl", ROWS))
    with pytest.raises(MathtuneError, match="unknown split 'test'"):
        task.examples("test")


def test_unit_conversion_refuses_files(tmp_path):
    with pytest.raises(MathtuneError, match="reads no files"):
        get_task("unit-conversion", train_file=tmp_path / "x.jsonl")


def test_file_task_needs_a_file():
    with pytest.raises(MathtuneError, match="--train-file and/or --eval-file"):
        get_task("file")


# ---------------------------------------------------------------- gsm8k from local JSONL


def test_gsm8k_jsonl_parsing(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    task = get_task("gsm8k", train_file=path)
    assert task.name == "gsm8k" and task.judge_rule == "exact"
    rows = task.examples("train")
    assert [r.id for r in rows] == ["train.jsonl:1", "train.jsonl:2", "train.jsonl:3"]
    assert [r.gold for r in rows] == [12.0, 23.0, 3000.0]
    assert rows[0] == Example("train.jsonl:1", ROWS[0]["question"], ROWS[0]["answer"], 12.0)
    assert task.examples("train") == rows  # deterministic, served again identically


def test_gsm8k_blank_lines_are_skipped_but_counted(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("\n" + json.dumps(ROWS[0]) + "\n\n   \n" + json.dumps(ROWS[1]) + "\n", encoding="utf-8")
    rows = get_task("gsm8k", train_file=path).examples("train")
    assert [r.id for r in rows] == ["t.jsonl:2", "t.jsonl:5"]  # ids keep the real line numbers


@pytest.mark.parametrize("task", ["gsm8k", "file"])
def test_jsonl_lines_end_at_newline_only(tmp_path, task):
    """JSON allows a raw U+2028 (and U+2029, \\x1c-\\x1e) inside a string, and json.dumps(...,
    ensure_ascii=False) -- how mathtune rft writes its rows -- leaves it raw: a reader splitting lines
    with str.splitlines() cut such a row in two ("not valid JSON"). CRLF files still read."""
    odd = dict(ROWS[0], question="Ana has 3 boxes\u2028of 4 pens.\u2029 How many\x1c pens?")
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(odd, ensure_ascii=False) + "\r\n" + json.dumps(ROWS[1]) + "\r\n", encoding="utf-8")
    rows = get_task(task, train_file=path).examples("train")
    assert [r.question for r in rows] == [odd["question"], ROWS[1]["question"]]
    assert [r.id for r in rows] == ["rows.jsonl:1", "rows.jsonl:2"] and [r.gold for r in rows] == [12.0, 23.0]



@pytest.mark.parametrize("task", ["gsm8k", "file"])
def test_a_torn_last_line_says_it_was_cut_short_and_how_to_mend_it(tmp_path, task):
    """A writer killed mid-line (SIGKILL, a full disk) leaves half a row and no newline after it: the
    error says so and names the mends, instead of a bare "not valid JSON"; a broken line in the middle
    of a file keeps the plain message."""
    whole = json.dumps(ROWS[0]) + "\n"
    torn = tmp_path / "torn.jsonl"
    torn.write_text(whole + json.dumps(ROWS[1])[:25], encoding="utf-8")
    with pytest.raises(InputError, match="the last line is cut short .*--resume") as info:
        get_task(task, train_file=torn).examples("train")
    assert info.value.line == 2
    ended = tmp_path / "ended.jsonl"  # the same broken row, but a newline after it: not a torn write
    ended.write_text(whole + json.dumps(ROWS[1])[:25] + "\n", encoding="utf-8")
    with pytest.raises(InputError, match="not valid JSON"):
        get_task(task, train_file=ended).examples("train")

def test_strip_calculator_option(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", ROWS)
    kept = get_task("gsm8k", train_file=path).examples("train")
    stripped = get_task("gsm8k", train_file=path, strip_calculator=True).examples("train")
    assert "<<3*4=12>>" in kept[0].answer_text
    assert stripped[0].answer_text == "3 * 4 = 12 pens.\n#### 12"
    assert [r.gold for r in stripped] == [r.gold for r in kept]


@pytest.mark.parametrize(
    "line, reason",
    [
        ('{"question": "Q?", "answer": "#### 1"', "not valid JSON"),
        ('["Q?", "#### 1"]', "expected a JSON object"),
        ('{"question": "Q?"}', "missing 'answer'"),
        ('{"answer": "#### 1"}', "missing 'question'"),
        ('{"question": "Q?", "answer": null}', "missing 'answer'"),
        ('{"question": 7, "answer": "#### 1"}', "'question' must be a non-empty string"),
        ('{"question": "  ", "answer": "#### 1"}', "'question' must be a non-empty string"),
        ('{"question": "Q?", "answer": 12}', "'answer' must be a non-empty string"),  # gsm8k: no bare numbers
        ('{"question": "Q?", "answer": "It is 12."}', "no final '#### <number>' line"),
        ('{"question": "Q?", "answer": "It is\\n#### twelve"}', "gold after '####' is not a number: 'twelve'"),
        ('{"question": "Q?", "answer": "#### "}', "nothing after '####'"),
        ('{"question": "Q?", "answer": "#### 3\\n#### 4"}', "more than one '####'"),
        ('{"question": "Q?", "answer": "#### 3\\nthanks"}', "text after the '#### <number>' line"),
    ],
)
def test_gsm8k_row_errors_name_file_and_line(tmp_path, line, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", ROWS[:2], extra_lines=[line, json.dumps(ROWS[2])])
    task = get_task("gsm8k", train_file=path)
    with pytest.raises(InputError, match=re.escape(reason)) as info:
        task.examples("train")
    assert info.value.line == 3 and info.value.path == str(path)
    assert str(info.value).startswith(f"{path}:3: ")


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_is_an_error(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match="no examples: the file is empty") as info:
        get_task("gsm8k", train_file=path).examples("train")
    assert info.value.line is None


def test_missing_file_names_the_flag(tmp_path):
    task = get_task("gsm8k", eval_file=tmp_path / "nope.jsonl")
    with pytest.raises(InputError, match="does not exist; check the path given to --eval-file"):
        task.examples("eval")


def test_non_utf8_file_reports_the_line(tmp_path):
    path = tmp_path / "latin.jsonl"
    latin = '{"question": "caf\xe9?", "answer": "#### 1"}'.encode("latin-1")
    path.write_bytes(json.dumps(ROWS[0]).encode() + b"\n" + latin)
    with pytest.raises(InputError, match="not UTF-8") as info:
        get_task("gsm8k", train_file=path).examples("train")
    assert info.value.line == 2


def test_split_without_its_file_names_the_flag(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", ROWS)
    with pytest.raises(MathtuneError, match="--eval-file"):
        get_task("gsm8k", train_file=path).examples("eval")
    with pytest.raises(MathtuneError, match="--train-file"):
        get_task("gsm8k", eval_file=path).examples("train")
    with pytest.raises(MathtuneError, match="--eval-file"):
        get_task("file", train_file=path).examples("eval")


@pytest.mark.parametrize("name", ["rows.json", "rows.CSV"])
def test_gsm8k_points_other_formats_to_the_file_task(tmp_path, name):
    path = tmp_path / name
    path.write_text("question,answer\nQ?,1\n", encoding="utf-8")
    with pytest.raises(MathtuneError, match="task gsm8k reads JSONL; for a JSON list or CSV use --task file"):
        get_task("gsm8k", train_file=path).examples("train")


# ---------------------------------------------------------------- gsm8k from the hub (faked)


def test_gsm8k_hub_offline_is_one_clear_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr(hub, "hub_local_only", lambda: False)  # the hub "answers", the load fails
    with pytest.raises(MathtuneError, match="pass --train-file/--eval-file with GSM8K JSONL"):
        get_task("gsm8k").examples("train")


def test_gsm8k_unreachable_hub_reads_only_the_local_cache(monkeypatch):
    # without the probe, datasets retries an unreachable hub for ~25 s before failing
    import datasets

    seen = []

    def not_cached(path, name, split, download_config):
        # datasets reads HF_HUB_OFFLINE from its config module: it must be on while loading
        seen.append((download_config.local_files_only, datasets.config.HF_HUB_OFFLINE))
        raise FileNotFoundError("Couldn't find cache for openai/gsm8k")

    before = datasets.config.HF_HUB_OFFLINE

    monkeypatch.setattr(datasets, "load_dataset", not_cached)
    monkeypatch.setattr(hub, "_hub_reachable", lambda: False)
    with pytest.raises(MathtuneError) as excinfo:
        get_task("gsm8k").examples("eval")
    assert seen == [(True, True)]
    assert datasets.config.HF_HUB_OFFLINE == before  # and restored afterwards
    assert "hub is unreachable and no cached copy exists" in str(excinfo.value)
    assert "pass --train-file/--eval-file" in str(excinfo.value)


def test_gsm8k_hub_rows_and_ids(monkeypatch):
    import datasets

    calls = []

    def fake(path, name, split, download_config):
        calls.append((path, name, split))
        assert download_config.local_files_only is False  # the hub answered: datasets may download
        return ROWS[:2]

    monkeypatch.setattr(datasets, "load_dataset", fake)
    monkeypatch.setattr(hub, "hub_local_only", lambda: False)
    task = get_task("gsm8k")
    assert [r.id for r in task.examples("train")] == ["gsm8k-train-00000", "gsm8k-train-00001"]
    assert [r.id for r in task.examples("eval")] == ["gsm8k-test-00000", "gsm8k-test-00001"]
    assert calls == [("openai/gsm8k", "main", "train"), ("openai/gsm8k", "main", "test")]


def test_shared_gsm8k_file_through_get_task():
    if not GSM8K_TRAIN.is_file():
        pytest.skip(f"GSM8K train file not present at {GSM8K_TRAIN}")
    rows = get_task("gsm8k", train_file=GSM8K_TRAIN).examples("train")
    assert len(rows) == 7473
    assert rows[0].id == "train.jsonl:1" and rows[-1].id == "train.jsonl:7473"
    assert all(r.answer_text.rsplit("\n", 1)[-1].startswith("#### ") for r in rows)
    assert sum("<<" in r.answer_text for r in rows) > 7000  # calculator annotations kept by default


# ---------------------------------------------------------------- task "file": JSONL, JSON, CSV


def test_file_task_jsonl_accepts_bare_numbers(tmp_path):
    bare = [{"question": "2+2?", "answer": "4"}, {"question": "Half of 5?", "answer": 2.5}]
    path = write_jsonl(tmp_path / "mine.jsonl", bare + ROWS[:1])
    task = get_task("file", train_file=path)
    assert task.name == "file" and task.judge_rule == "exact"
    rows = task.examples("train")
    assert [(r.answer_text, r.gold) for r in rows[:2]] == [("#### 4", 4.0), ("#### 2.5", 2.5)]
    assert rows[2].answer_text == ROWS[0]["answer"]


def test_file_task_json_list(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps([{"question": "3*3?", "answer": "$9"}, ROWS[1]]), encoding="utf-8")
    rows = get_task("file", eval_file=path).examples("eval")
    assert [(r.id, r.answer_text, r.gold) for r in rows] == [
        ("mine.json:1", "#### 9", 9.0),
        ("mine.json:2", ROWS[1]["answer"], 23.0),
    ]


@pytest.mark.parametrize(
    "items, reason",
    [
        ([{"question": "a?", "answer": "1"}, {"question": "b?"}], "item 2: missing 'answer'"),
        ([{"question": "a?", "answer": "about ten"}], "item 1: 'answer' 'about ten' is neither"),
        ([{"question": "a?", "answer": "It is\n#### ten"}], "item 1: gold after '####' is neither a number nor an answer "
                                                             "math-verify reads: 'ten' holds the word 'ten'"),
        ([{"question": "a?", "answer": True}], "item 1: 'answer' must be a non-empty string"),
        ({"question": "a?", "answer": "1"}, "expected a JSON list of objects"),
        ([], "no examples"),
    ],
)
def test_file_task_json_errors(tmp_path, items, reason):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(items), encoding="utf-8")
    with pytest.raises(InputError, match=re.escape(reason)) as info:
        get_task("file", train_file=path).examples("train")
    assert info.value.line is None


def test_file_task_broken_json(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text('[\n{"question": "a?", "answer": "1"},\n{"question": "b?" "answer": "2"}\n]', encoding="utf-8")
    with pytest.raises(InputError, match="not valid JSON") as info:
        get_task("file", train_file=path).examples("train")
    assert info.value.line == 3


def test_file_task_csv(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text(
        'question,answer\n"Tom has 2, Ann has 3. Total?","2 + 3 = 5\n#### 5"\n\nHow many legs do 2 cats have?,8\n',
        encoding="utf-8",
    )
    rows = get_task("file", train_file=path).examples("train")
    # line numbers count the header as line 1; the quoted answer spans lines 2-3
    assert [(r.id, r.question, r.answer_text, r.gold) for r in rows] == [
        ("mine.csv:2", "Tom has 2, Ann has 3. Total?", "2 + 3 = 5\n#### 5", 5.0),
        ("mine.csv:5", "How many legs do 2 cats have?", "#### 8", 8.0),
    ]


@pytest.mark.parametrize(
    "text, line, reason",
    [
        ("question,solution\nQ?,1\n", 1, "header must name the columns 'question' and 'answer'"),
        ("question,answer\nQ?,1\nTom has 2, Ann 3?,5\n", 3, "3 fields but the header has 2; quote fields"),
        ("question,answer\nQ?,1\nQ2?\n", 3, "missing 'answer'"),
        ("question,answer\nQ?,1\nQ2?,\n", 3, "'answer' must be a non-empty string"),
        ("question,answer\n\nQ?,#### ten\n", 3, "gold after '####' is neither a number nor an answer math-verify reads"),
        ("question,answer\nQ?,lots\n", 2, "is neither a solution ending in '#### <answer>' nor a bare answer"),
    ],
)
def test_file_task_csv_errors(tmp_path, text, line, reason):
    path = tmp_path / "mine.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InputError, match=re.escape(reason)) as info:
        get_task("file", train_file=path).examples("train")
    assert info.value.line == line


@pytest.mark.parametrize("text", ["", "question,answer\n", "question,answer\n\n"])
def test_file_task_empty_csv(tmp_path, text):
    path = tmp_path / "mine.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InputError, match="no examples"):
        get_task("file", train_file=path).examples("train")


def test_file_task_unknown_extension(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("Q? 1\n", encoding="utf-8")
    expected = r"unsupported file type '\.txt' for --train-file; use one of \.jsonl, \.json, \.csv"
    with pytest.raises(MathtuneError, match=expected):
        get_task("file", train_file=path).examples("train")


def test_file_task_strip_calculator(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", ROWS)
    rows = get_task("file", train_file=path, strip_calculator=True).examples("train")
    assert rows[1].answer_text == "30 - 7 = 23\n#### 23"


# ---------------------------------------------------------------- unit conversion


@pytest.fixture(scope="module")
def uc_splits():
    task = get_task("unit-conversion", seed=0)
    return task, task.examples("train"), task.examples("eval")


def test_unit_conversion_sizes_and_rule(uc_splits):
    task, train, evals = uc_splits
    assert task.name == "unit-conversion" and task.judge_rule == "rel_tol=0.05"
    assert (len(train), len(evals)) == (5000, 500)
    assert len({r.id for r in train + evals}) == 5500


def test_unit_conversion_deterministic_per_seed(uc_splits):
    _, train, evals = uc_splits
    again = get_task("unit-conversion", seed=0)
    assert again.examples("train") == train and again.examples("eval") == evals
    other = uc.generate(seed=1)
    assert other["train"] != train
    assert [r.question for r in other["eval"]] != [r.question for r in evals]


def test_unit_conversion_splits_share_no_question(uc_splits):
    _, train, evals = uc_splits
    train_questions = {r.question for r in train}
    assert len(train_questions) == len(train)  # deduplicated within a split too
    assert not train_questions & {r.question for r in evals}
    # stronger: no problem (unit pair and value) of eval is in train, under any phrasing
    assert all(uc.split_of(_problem_key(r)) == "eval" for r in evals)
    assert all(uc.split_of(_problem_key(r)) == "train" for r in train)


def test_unit_conversion_splits_disjoint_across_seeds(uc_splits):
    _, train, _ = uc_splits
    other_eval = {r.question for r in uc.generate(seed=7)["eval"]}
    assert not other_eval & {r.question for r in train}


def test_unit_conversion_every_category_in_both_splits(uc_splits):
    _, train, evals = uc_splits
    assert len(uc.CATEGORIES) == 7
    for rows in (train, evals):
        counts = {c: 0 for c in uc.CATEGORIES}
        for r in rows:
            counts[uc.category_of(r)] += 1
        # equal shares: 5000 / 7 -> 714 or 715 rows per category, 500 / 7 -> 71 or 72
        assert max(counts.values()) - min(counts.values()) <= 1 and min(counts.values()) > 0, counts


def test_unit_conversion_both_directions_present(uc_splits):
    _, train, evals = uc_splits
    keys = {c.key for conversions in uc.CONVERSIONS.values() for c in conversions}
    for key in keys:  # every unit pair is offered both ways round
        src, dst = key.split("->")
        assert f"{dst}->{src}" in keys, key
    assert {"->".join(_step_units(r)) for r in train} == keys
    # eval draws ~1/11 of each pair's problems: a pair with few problems may have none there
    assert len({"->".join(_step_units(r)) for r in evals}) >= len(keys) - 2


STEP = re.compile(r"^(?P<expr>.+?) = <<(?P<calc>[^=]+)=(?P<calc_result>-?[\d.]+)>>(?P<result>-?[\d.]+) (?P<unit>\S+)$")
UNIT = re.compile(r"[A-Za-z°³]+(?:/[A-Za-z°³]+)*")


def _step_units(row):
    step = row.answer_text.split("\n")[0]
    return UNIT.findall(STEP.match(step).group("expr"))[0], STEP.match(step).group("unit")


def _problem_key(row):
    src, dst = _step_units(row)
    x = re.search(r"-?\d+(?:\.\d+)?", row.answer_text).group()  # first number of the step
    return f"{src}->{dst}:{x}"


def test_unit_conversion_targets_are_consistent(uc_splits):
    _, train, evals = uc_splits
    for r in train + evals:
        step, final = r.answer_text.split("\n")
        gold_text = final.removeprefix("#### ")
        assert final == f"#### {gold_text}" and r.gold == parse_gold(r.answer_text) == extract_strict(r.answer_text)
        match = STEP.match(step)
        assert match, step
        assert float(match.group("result")) == r.gold
        # the step's own arithmetic gives the gold: evaluate it with units removed
        expr = UNIT.sub("", match.group("expr")).replace("×", "*").replace("÷", "/").replace("−", "-")
        assert re.fullmatch(r"[\d.\s()+\-*/]+", expr), expr
        assert float(evaluate(expr)) == pytest.approx(r.gold, rel=1e-9), (step, expr)
        # the annotation is the same expression, and its result is exactly what calculator-assisted
        # decoding forces: training targets and decoding agree to the character
        assert float(evaluate(match.group("calc"))) == pytest.approx(r.gold, rel=1e-9), step
        assert calculate(match.group("calc")) == match.group("calc_result") == match.group("result"), step
        # readable numbers: at most 3 decimals, no float noise, a question that states the value
        assert not re.search(r"\d\.\d{4,}", r.answer_text), r.answer_text
        assert match.group("expr").split(" ")[0].lstrip("(") in r.question


def test_unit_conversion_answer_is_never_a_number_of_the_question(uc_splits):
    """Echoing the question's value (what an untrained model often does) must be judged wrong."""
    _, train, evals = uc_splits
    for r in train + evals:
        for number in re.findall(r"\d+(?:\.\d+)?", r.question):
            assert not judge(float(number), r.gold, "rel_tol=0.05"), (r.question, r.gold)


def test_unit_conversion_values_stay_small(uc_splits):
    _, train, _ = uc_splits
    templates = {uc.category_of(r): set() for r in train}
    for r in train:
        first = float(re.search(r"-?\d+(?:\.\d+)?", r.answer_text).group())
        gold = r.gold
        # one side of every conversion is a value from the drawn pool: 0.5-99 (°C: 5-99)
        assert 0.5 <= min(abs(first), abs(gold)) <= 99
        templates[uc.category_of(r)].add(re.sub(r"-?\d+(?:\.\d+)?", "N", r.question).split(" ")[0])
    # several phrasings in every category, so no single sentence pattern can be memorized
    assert all(len(t) >= 4 for t in templates.values()), templates


def test_each_task_owns_its_policy_and_the_consumers_read_it(monkeypatch):
    from mathtune.config import GenerationArgs
    from mathtune.rft import RFTConfig
    from mathtune.tasks import TASK_NAMES, task_class
    from mathtune.tasks.files import FileTask
    from mathtune.tasks.gsm8k import GSM8KTask

    assert {name: task_class(name).calculator_by_default for name in TASK_NAMES} == {
        "gsm8k": True, "unit-conversion": True, "file": False, "math": False}
    assert task_class("gsm8k").hub_dataset == "openai/gsm8k" and task_class("file").hub_dataset is None
    assert GenerationArgs(calculator=None).resolved("gsm8k").calculator and not GenerationArgs(calculator=None).resolved("file").calculator
    assert not GenerationArgs(calculator=False).resolved("gsm8k").calculator and not GenerationArgs(calculator=None).resolved(None).calculator
    # the consumers ask the Task: change its policy and their answer follows
    monkeypatch.setattr(FileTask, "calculator_by_default", True)
    assert GenerationArgs(calculator=None).resolved("file").calculator
    monkeypatch.setattr(GSM8KTask, "supports_rft", False)
    with pytest.raises(MathtuneError, match="rft works for unit-conversion, file"):
        RFTConfig.from_flat(model="m", task="gsm8k", output="out.jsonl").validate()
