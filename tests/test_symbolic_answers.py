"""Answers beyond one number: gold reading, the numeric/symbolic judge, math-verify as the reference,
the timeout outside the main thread, and a MATH-style file through data, train, eval and compare."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest

from mathtune import symbolic
from mathtune.answers import extract, judge, judge_answer, read_gold
from mathtune.evaluation import judge_item
from mathtune.rft import task_judge
from mathtune.tasks import Example

math_verify = pytest.importorskip("math_verify")

DATA = Path(__file__).parent / "data"


# --------------------------------------------------------------------------- numbers judge as before
# tests/data/judge_regression.jsonl: 110 fixed outputs (GSM8K-style and unit-conversion golds; chat and
# lm-eval protocols; one sample and four) with the per-item records judge_item wrote for them at commit
# d17dbe6, before answers beyond numbers existed. Recorded once from that code (not recomputed here): a
# change to the numeric path shows up as a difference in some record.
REGRESSION = [json.loads(line) for line in (DATA / "judge_regression.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("case", REGRESSION, ids=lambda c: f"{c['record']['id']}-{c['protocol']}-k{len(c['outputs'])}")
def test_number_golds_are_judged_exactly_as_before(case):
    example = Example(id=case["record"]["id"], question="q", answer_text=case["answer_text"], gold=case["gold"])
    record = judge_item(example, case["outputs"], case["rule"], protocol=case["protocol"])
    assert {key: record[key] for key in case["record"]} == case["record"]
    assert record["rule"] == ("numeric" if case["protocol"] == "chat" else "lm-eval")
    if case["protocol"] == "chat":  # rft keeps a sample when eval counts it right
        assert task_judge(case["rule"])(case["outputs"][0], example) == case["record"]["correct"]


# --------------------------------------------------------------------------- MATH-style answers
# (gold field as a dataset writes it, a model's output, the verdict). Where mathtune reads the gold as
# symbolic the test also asks math-verify itself, ``verify(parse(gold), parse(output))`` with its
# defaults, and mathtune must agree with it; where the gold is one number the verdict is the one the
# numeric judge at d17dbe6 gave (recorded when this table was written; the numeric path is unchanged).
PAIRS = [
    # fractions
    ("So $x = \\boxed{\\frac{1}{2}}$.", "Thus $\\boxed{0.5}$.", True),
    ("$\\boxed{\\frac{1}{2}}$", "The answer is \\boxed{1/2}", True),
    ("$\\boxed{\\dfrac{3}{4}}$", "\\boxed{\\frac{6}{8}}", True),
    ("\\boxed{-\\frac{7}{3}}", "\\boxed{-\\frac{7}{3}}", True),
    ("\\boxed{\\frac{2}{3}}", "\\boxed{0.67}", False),
    ("\\boxed{\\frac{1}{3}}", "\\boxed{\\frac{1}{4}}", False),
    ("\\boxed{\\frac{a}{b}}", "\\boxed{a/b}", True),
    ("\\boxed{\\frac{x+1}{x-1}}", "\\boxed{\\frac{x-1}{x+1}}", False),
    # radicals
    ("\\boxed{2\\sqrt{5}}", "\\boxed{\\sqrt{20}}", True),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "so the answer is $\\boxed{\\frac{\\sqrt3}{2}}$", True),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\boxed{\\frac{1}{\\sqrt{3}}}", False),
    ("\\boxed{3\\sqrt{2}}", "\\boxed{\\sqrt{18}}", True),
    ("\\boxed{3\\sqrt{2}}", "\\boxed{2\\sqrt{3}}", False),
    ("\\boxed{\\sqrt[3]{2}}", "\\boxed{2^{1/3}}", True),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\boxed{\\frac{1}{\\sqrt{2}}}", True),
    ("\\boxed{1+\\sqrt{2}}", "\\boxed{\\sqrt{2}+1}", True),
    ("\\boxed{1+\\sqrt{2}}", "\\boxed{1-\\sqrt{2}}", False),
    # decimals
    ("\\boxed{0.25}", "\\boxed{\\frac{1}{4}}", True),
    ("\\boxed{3.14}", "\\boxed{3.14}", True),
    ("\\boxed{2.5}", "\\boxed{2.50}", True),
    ("\\boxed{2.5}", "\\boxed{2.05}", False),
    ("\\boxed{1.5\\pi}", "\\boxed{\\frac{3\\pi}{2}}", True),
    # percentages
    ("\\boxed{50\\%}", "\\boxed{50\\%}", True),
    ("\\boxed{50\\%}", "\\boxed{50}", True),
    ("\\boxed{12.5\\%}", "\\boxed{12.5}", True),
    ("\\boxed{40\\%}", "\\boxed{45\\%}", False),
    # intervals
    ("\\boxed{(2, 5]}", "\\boxed{(2,5]}", True),
    ("\\boxed{(2, 5]}", "\\boxed{[2, 5]}", False),
    ("\\boxed{(-\\infty, 3)}", "\\boxed{(-\\infty,3)}", True),
    ("\\boxed{(-\\infty, 3)}", "\\boxed{(-\\infty, 3]}", False),
    ("\\boxed{[0, 1) \\cup (1, \\infty)}", "\\boxed{[0,1)\\cup(1,\\infty)}", True),
    ("\\boxed{[-2, 7]}", "\\boxed{[-2, 8]}", False),
    # sets
    ("\\boxed{\\{1, 3\\}}", "\\boxed{\\{3, 1\\}}", True),
    ("\\boxed{\\{1, 3\\}}", "\\boxed{\\{1, 2\\}}", False),
    ("\\boxed{1, 3}", "\\boxed{3, 1}", True),
    ("\\boxed{-2, 2}", "\\boxed{\\pm 2}", True),
    ("\\boxed{-2, 2}", "\\boxed{2}", False),
    ("\\boxed{\\emptyset}", "\\boxed{\\emptyset}", True),
    # tuples
    ("\\boxed{(2, 3)}", "\\boxed{(2,3)}", True),
    ("\\boxed{(2, 3)}", "\\boxed{(3, 2)}", False),
    ("\\boxed{(1, -2, 5)}", "\\boxed{(1,-2,5)}", True),
    ("\\boxed{(1, -2, 5)}", "\\boxed{(1, 2, 5)}", False),
    ("\\boxed{\\left( \\frac{1}{2}, 3 \\right)}", "\\boxed{(0.5, 3)}", True),
    # expressions
    ("\\boxed{x^2 + 1}", "\\boxed{1 + x^2}", True),
    ("\\boxed{x^2 + 1}", "\\boxed{x^2 - 1}", False),
    ("\\boxed{(x+1)^2}", "\\boxed{x^2+2x+1}", True),
    ("\\boxed{(x+1)^2}", "\\boxed{x^2+x+1}", False),
    ("\\boxed{2x - 3}", "\\boxed{-3 + 2x}", True),
    ("\\boxed{y = 2x + 3}", "\\boxed{y = 3 + 2x}", True),
    ("\\boxed{y = 2x + 3}", "\\boxed{y = 2x - 3}", False),
    ("\\boxed{\\pi r^2}", "\\boxed{r^2\\pi}", True),
    ("\\boxed{6\\pi}", "\\boxed{6\\pi}", True),
    ("\\boxed{6\\pi}", "\\boxed{3\\pi}", False),
    ("\\boxed{\\log_2 8}", "\\boxed{3}", True),
    ("\\boxed{e^{2}}", "\\boxed{e^2}", True),
    ("\\boxed{2^{-1}}", "\\boxed{\\frac{1}{2}}", True),
    # degrees
    ("\\boxed{45^\\circ}", "\\boxed{45}", True),
    ("\\boxed{45^\\circ}", "\\boxed{45^{\\circ}}", True),
    ("\\boxed{30^\\circ}", "\\boxed{60^\\circ}", False),
    ("\\boxed{\\frac{\\pi}{4}}", "\\boxed{\\frac{\\pi}{4}}", True),
    # text choices and words
    ("\\boxed{\\text{(B)}}", "\\boxed{B}", True),
    ("\\boxed{\\text{(B)}}", "\\boxed{\\text{(B)}}", True),
    ("\\boxed{\\text{(B)}}", "\\boxed{(C)}", False),
    ("\\boxed{\\text{(A)}}", "The answer is $\\text{(A)}$.", True),
    ("\\boxed{\\text{Evelyn}}", "\\boxed{\\text{Evelyn}}", True),
    ("\\boxed{\\text{Evelyn}}", "\\boxed{\\text{Angela}}", False),
    ("\\boxed{\\text{odd}}", "\\boxed{\\text{odd}}", True),
    # matrices
    ("\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}", "\\boxed{\\begin{pmatrix}1\\\\2\\end{pmatrix}}", True),
    ("\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}", "\\boxed{\\begin{pmatrix}2\\\\1\\end{pmatrix}}", False),
    # other answer forms
    ("so $f(x) = \\boxed{x^2 + 1}$.", "The answer is $x^2+1$.", True),
    ("\\boxed{x^2+1}", "\\boxed{x^{2}+1}", True),
    ("\\boxed{(2, 5]}", "\\boxed{(2, 5)}", False),
    ("\\boxed{x^2 + 1}", "no answer stated", False),
    # numbers in MATH form (the numeric rule)
    ("\\boxed{18}", "\\boxed{18}", True),
    ("\\boxed{18}", "\\boxed{18.0}", True),
    ("\\boxed{1{,}234}", "The answer is $1,234$.", True),
    ("\\boxed{\\$18.90}", "\\boxed{18.9}", True),
    ("\\boxed{-5}", "\\boxed{5}", False),
    ("\\boxed{\\frac{3}{4}}", "\\boxed{\\frac{3}{4}}", True),
]


def test_the_table_covers_every_answer_form_and_both_rules():
    rules = [judge_answer(output, read_gold(gold)[0], "exact").rule for gold, output, _ in PAIRS]
    assert len(PAIRS) >= 60 and rules.count("symbolic") >= 50 and rules.count("numeric") >= 15
    assert sum(not verdict for *_, verdict in PAIRS) >= 25  # near misses: judged wrong


@pytest.mark.parametrize("gold, output, verdict", PAIRS, ids=lambda value: str(value)[:30])
def test_mathtune_judges_as_math_verify_does(gold, output, verdict):
    value, _plain, _form = read_gold(gold)
    judgement = judge_answer(output, value, "exact")
    if judgement.rule == "symbolic":
        reference = math_verify.verify(math_verify.parse(gold), math_verify.parse(output))
        assert judgement.correct == reference, (judgement, reference)
        assert judgement.gold_parsed is not None and judgement.note is None
    else:
        assert isinstance(value, float) and judgement.gold_parsed is not None
    assert judgement.correct is verdict
    # the value-level judge (majority votes, maj@j) agrees with the judgement of the whole output
    assert judge(judgement.extracted, value, "exact") is judgement.correct


@pytest.mark.parametrize("text, gold, plain, form", [
    ("so $x = \\boxed{\\frac{\\sqrt{3}}{2}}$.", "\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt{3}}{2}", "boxed"),
    ("first \\boxed{x}, then \\boxed{(2,\n 5]}", "(2, 5]", "(2, 5]", "boxed"),  # last box, one line
    ("We get f(x) = x^2 + 1.\nThe answer is: $x^2 + 1$.", "x^2 + 1", "x^2 + 1", "answer_is"),
    ("Work.\n#### \\text{(B)}", "\\text{(B)}", "\\text{(B)}", "####"),
    ("\\{1, 3\\}", "\\{1, 3\\}", "\\{1, 3\\}", "text"),
    ("\\boxed{\\dfrac{3}{4}}", 0.75, "3/4", "boxed"),  # one number stays one: the numeric rule
    ("\\boxed{45^\\circ}", 45.0, "45", "boxed"),
    ("#### \\frac{1}{2}", 0.5, "0.5", "####"),
])
def test_golds_are_read_from_every_form(text, gold, plain, form):
    assert read_gold(text) == (gold, plain, form)


@pytest.mark.parametrize("text, message", [
    ("\\boxed{???}", "math-verify cannot read the gold answer '???' as math"),
    ("The answer is: )(", "math-verify cannot read the gold answer"),
    ("\\boxed{}", "the final answer is empty"),
    ("no final answer at all", "is neither a solution ending in '#### <answer>' nor a bare answer"),
])
def test_unreadable_gold_is_refused(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        read_gold(text)


def test_prediction_forms_for_a_symbolic_gold():
    gold = "\\frac{\\sqrt{3}}{2}"
    cases = {  # output -> (method, correct, strict_correct)
        "So \\boxed{1} and finally \\boxed{\\frac{\\sqrt{3}}{2}}.": ("boxed", True, False),
        "Work.\n#### \\sqrt{3}/2\nQuestion: next\n#### 7": ("####", True, True),  # the first #### line
        "The answer is $\\frac{\\sqrt3}{2}$.": ("answer_is", True, False),
        "It is \\sqrt{3}/2 or so": ("none", False, False),
    }
    for output, (method, correct, strict) in cases.items():
        judgement = judge_answer(output, gold, "exact")
        assert (judgement.method, judgement.correct, judgement.rule) == (method, correct, "symbolic"), output
        assert judge_answer(output, gold, "exact", strict=True).correct is strict
        assert judgement.gold_parsed == "sqrt(3)/2"
    with pytest.raises(ValueError, match="unknown judge rule"):
        judge_answer("\\boxed{1}", gold, "approximately")


def test_eval_records_say_which_rule_judged_and_the_parsed_forms():
    example = Example(id="m:1", question="q", answer_text="...\n#### \\frac{\\sqrt{3}}{2}", gold="\\frac{\\sqrt{3}}{2}")
    outputs = ["\\boxed{\\sqrt{3}/2}", "\\boxed{\\frac{\\sqrt3}{2}}", "\\boxed{1}", "\\boxed{\\sqrt{3}/2}"]
    record = judge_item(example, outputs, "exact")
    assert (record["rule"], record["gold_parsed"], record["parsed"], record["note"]) == (
        "symbolic", "sqrt(3)/2", "sqrt(3)/2", None)
    assert record["correct"] and not record["strict_correct"] and record["method"] == "boxed"
    assert record["sample_correct"] == [True, True, False, True]
    assert record["majority"] == "\\sqrt{3}/2" and record["majority_correct"]
    json.dumps(record)  # the per-item log is JSON


# --------------------------------------------------------------------------- the timeout
# Compared with 1, this interval's end runs sympy into big-integer arithmetic that does not return
# for minutes (math-verify's own signal alarm stops it, but only in a main thread).
PATHOLOGICAL = "\\boxed{(10^{10^{10}} - 10^{10^{10}} + 1, 2)}"


def test_a_pathological_answer_is_cut_off_in_a_worker_thread(monkeypatch):
    monkeypatch.setattr(symbolic, "TIMEOUT_S", 2.0)
    results = {}

    def work():  # math-verify's signal-based timeout raises ValueError outside the main thread
        started = time.monotonic()
        results["slow"] = judge_answer(PATHOLOGICAL, "(1, 2)", "exact")
        results["seconds"] = time.monotonic() - started
        results["next"] = judge_answer("\\boxed{(1,2)}", "(1, 2)", "exact")  # a fresh worker answers

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=180)
    assert not thread.is_alive(), "the judge hung"
    slow = results["slow"]
    assert slow.correct is False and slow.rule == "symbolic"
    assert slow.note == "math-verify gave no verdict within 2 s: judged wrong"
    assert 2.0 <= results["seconds"] < 60
    assert results["next"].correct and results["next"].note is None


def test_many_threads_share_the_worker():
    from concurrent.futures import ThreadPoolExecutor

    pairs = [(gold, output) for gold, output, _ in PAIRS
             if judge_answer(output, read_gold(gold)[0], "exact").rule == "symbolic"]
    symbolic.verify.cache_clear()  # judged for real again, now from four threads at once
    with ThreadPoolExecutor(4) as pool:
        verdicts = list(pool.map(lambda pair: judge_answer(pair[1], read_gold(pair[0])[0], "exact").correct, pairs))
    expected = [verdict for gold, output, verdict in PAIRS if (gold, output) in set(pairs)]
    assert verdicts == expected


# --------------------------------------------------------------------------- a MATH-style file, end to end
MATH_ROWS = [  # MATH's columns; golds: numbers (the numeric rule) and expressions (math-verify)
    {"problem": "Compute $\\sin 60^\\circ$.", "solution": "It is $\\boxed{\\frac{\\sqrt{3}}{2}}$."},
    {"problem": "Simplify $\\sqrt{20}$.", "solution": "$\\sqrt{20} = \\sqrt{4 \\cdot 5} = \\boxed{2\\sqrt{5}}$."},
    {"problem": "Solve $2 < x \\le 5$ as an interval.", "solution": "The interval is $\\boxed{(2, 5]}$."},
    {"problem": "Which roots does $x^2 - 4x + 3$ have?", "solution": "It factors: $\\boxed{\\{1, 3\\}}$."},
    {"problem": "Expand $(x+1)^2 - 2x$.", "solution": "We get $\\boxed{x^2 + 1}$."},
    {"problem": "Which choice is prime: (A) 4 (B) 7?", "solution": "Seven is prime: $\\boxed{\\text{(B)}}$."},
    {"problem": "Compute $3 \\cdot 6$.", "solution": "$3 \\cdot 6 = \\boxed{18}$."},
    {"problem": "What is half of $\\frac{3}{2}$?", "solution": "Half is $\\boxed{\\dfrac{3}{4}}$."},
]


@pytest.fixture
def math_files(tmp_path):
    train, held_out = tmp_path / "math-train.jsonl", tmp_path / "math-test.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in MATH_ROWS))
    held_out.write_text("".join(json.dumps(row) + "\n" for row in MATH_ROWS[:4] + MATH_ROWS[6:]))
    return train, held_out


def test_math_task_reads_golds_prompts_and_targets(math_files):
    from mathtune.tasks import get_task

    train, _ = math_files
    examples = get_task("math", train_file=train).examples("train")
    assert [e.gold for e in examples] == ["\\frac{\\sqrt{3}}{2}", "2\\sqrt{5}", "(2, 5]", "\\{1, 3\\}", "x^2 + 1",
                                          "\\text{(B)}", 18.0, 0.75]
    assert examples[0].question.endswith("put your final answer within \\boxed{}.")
    assert examples[0].answer_text == "It is $\\boxed{\\frac{\\sqrt{3}}{2}}$.\n#### \\frac{\\sqrt{3}}{2}"
    assert examples[7].answer_text.endswith("\n#### 3/4")
    # task file reads the same rows with the columns mapped, without the prompt's request
    from mathtune.tasks.files import Fields

    mapped = get_task("file", train_file=train, fields=Fields("problem", "solution")).examples("train")
    assert [e.gold for e in mapped] == [e.gold for e in examples] and mapped[0].question == MATH_ROWS[0]["problem"]
    # a correct sample of a symbolic item is a valid target for mathtune rft
    from mathtune.rft import as_target

    assert as_target("Since ... $\\boxed{x^2+1}$", "x^2 + 1") == "Since ... $\\boxed{x^2+1}$\n#### x^2 + 1"
    assert as_target("So \\boxed{1+x^2}.\n#### x^2+1\nQuestion: next", "x^2 + 1") == "So \\boxed{1+x^2}.\n#### x^2+1"
    assert as_target("So \\boxed{x^2+1}.\n#### x^2", "x^2 + 1") is None  # its final line states a wrong answer


def test_math_file_through_data_train_eval_and_compare(math_files, tiny_model_dir, tmp_path, capsys, monkeypatch):
    import subprocess
    import sys

    from mathtune.cli import main

    train, held_out = math_files
    monkeypatch.setenv("MATHTUNE_CACHE", str(tmp_path / "cache"))
    assert main(["data", "--model", str(tiny_model_dir), "--task", "math", "--train-file", str(train),
                 "--show", "0"]) == 0
    out = capsys.readouterr().out
    assert "columns: question <- 'problem', answer <- 'solution'" in out  # math's defaults
    assert "math-train.jsonl:1: gold \\frac{\\sqrt{3}}{2} (symbolic: math-verify reads sqrt(3)/2)" in out
    assert "math-train.jsonl:3: gold (2, 5] (symbolic: math-verify reads Interval.Lopen(2, 5))" in out

    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "mathtune.cli", "train", "--model", str(tiny_model_dir), "--task", "math",
         "--train-file", str(train), "--eval-file", str(held_out), "--max-steps", "2", "--batch-size", "4",
         "--no-wandb", "--output-dir", str(run_dir), "--eval-samples", "6", "--eval-batch-size", "6",
         "--max-new-tokens", "8", "--device", "cpu"],
        capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training completed: 2 steps" in proc.stdout
    comparison = json.loads((run_dir / "model_comparison.json").read_text())
    assert comparison["n"] == 6 and comparison["task"] == "math"

    # eval of the run and of its base, then compare the two logs
    for model, where in ((run_dir, tmp_path / "eval-run"), (tiny_model_dir, tmp_path / "eval-base")):
        assert main(["eval", "--model", str(model), "--task", "math", "--eval-file", str(held_out),
                     "--max-samples", "-1", "--max-new-tokens", "8", "--device", "cpu", "--output", str(where)]) == 0
    logs = {name: next((tmp_path / f"eval-{name}").glob("*-math.jsonl")) for name in ("run", "base")}
    records = [json.loads(line) for line in logs["run"].read_text().splitlines()]
    assert [r["rule"] for r in records] == ["symbolic"] * 4 + ["numeric"] * 2
    assert [r["gold"] for r in records] == ["\\frac{\\sqrt{3}}{2}", "2\\sqrt{5}", "(2, 5]", "\\{1, 3\\}", 18.0, 0.75]
    assert records[0]["gold_parsed"] == "sqrt(3)/2" and records[4]["gold_parsed"] == "18"
    for record in records:  # each verdict is the judge's on the logged output
        assert record["correct"] == judge_answer(record["output"], record["gold"], "exact").correct
    assert main(["compare", "--base-log", str(logs["base"]), "--trained-log", str(logs["run"]),
                 "--output", str(tmp_path / "cmp.json")]) == 0
    assert json.loads((tmp_path / "cmp.json").read_text())["n"] == 6


def test_math_verify_and_sympy_load_only_in_the_worker():
    import os
    import subprocess
    import sys

    code = ("import sys\nfrom mathtune.answers import judge_answer\n"
            "assert judge_answer('\\\\boxed{\\\\sqrt{20}}', '2\\\\sqrt{5}', 'exact').correct\n"
            "print(sorted(m for m in ('math_verify', 'sympy', 'latex2sympy2_extended') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_a_forked_child_starts_its_own_worker():
    import os

    assert judge_answer("\\boxed{\\sqrt{18}}", "3\\sqrt{2}", "exact").correct  # the parent's worker is up
    symbolic.verify.cache_clear()
    pid = os.fork()
    if pid == 0:  # the child must not talk over the parent's pipes
        ok = judge_answer("\\boxed{\\sqrt{8}}", "2\\sqrt{2}", "exact").correct
        symbolic.shutdown()
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert judge_answer("\\boxed{\\sqrt{12}}", "2\\sqrt{3}", "exact").correct  # and the parent's still answers


def test_a_worker_that_cannot_start_is_one_clear_error(monkeypatch):
    from mathtune.errors import MathtuneError

    monkeypatch.setattr(symbolic.sys, "executable", "/bin/false")  # a child that exits at once, never ready
    worker = symbolic._Worker()
    with pytest.raises(MathtuneError, match=r"the math-verify worker did not start: install it with pip install "
                                            r"'math-verify>=0.9,<1'"):
        worker.ask({"parse": "\\boxed{1}"}, 5.0)
