"""``mathtune rft``: selection rules, and end to end on the tiny model with a fake judge."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from mathtune.errors import ConfigError
from mathtune.generation.settings import Generations
from mathtune.rft import RFTConfig, as_target, run_rft, select_solutions, task_judge
from mathtune.tasks import Example, get_task

GOLD = Example("q1", "Tom has 3 apples and buys 4. How many?", "3+4=<<3+4=7>>7\n#### 7", 7.0)


def test_selection_keeps_distinct_correct_solutions_in_the_task_format():
    samples = [[
        "He has 3+4=<<3+4=7>>7 apples.\n#### 7",  # correct, new
        "He has  3+4=<<3+4=7>>7   apples.\n#### 7",  # the same up to whitespace: duplicate
        "3+4=<<3+4=7>>7\n#### 7",  # the gold solution itself: nothing new
        "3*4=12\n#### 12",  # wrong
        "So the answer is 7.",  # right by flexible extraction: gets '#### 7' appended
        "4+3=7\n#### 7\nQuestion: and then?",  # text after the answer line is cut
        "7\n#### 7\n#### 7",  # correct but two '####' lines: not a valid target... cut to the first line
        "7 7 7 7",  # a loop (flagged below): never kept
    ]]
    loops = [[False] * 7 + [True]]
    selection = select_solutions([GOLD], samples, loops, task_judge("exact"))
    assert selection.kept == [[
        "He has 3+4=<<3+4=7>>7 apples.\n#### 7",
        "So the answer is 7.\n#### 7",
        "4+3=7\n#### 7",
        "7\n#### 7",
    ]]
    assert selection.rejected == {"duplicate": 2, "wrong": 1, "loop": 1}


def test_as_target_rejects_what_the_task_would_reject():
    assert as_target("#### 7 #### 7", 7.0) is None  # two '####' on one line
    assert as_target("", 7.0) == "#### 7"


def test_config_problems_are_reported_together(tmp_path):
    with pytest.raises(ConfigError) as err:
        RFTConfig(task="gsm8k", output=str(tmp_path / "x.csv"), temperature=0.0, num_samples=0).validate()
    text = str(err.value)
    assert "--output" in text and "--temperature" in text and "--num-samples" in text
    with pytest.raises(ConfigError, match="--output is required"):
        RFTConfig().validate()


@pytest.fixture
def train_file(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [{"question": f"Sam has {a} pens and gets {b} more. How many pens?",
             "answer": f"{a}+{b}=<<{a}+{b}={a + b}>>{a + b}\n#### {a + b}"} for a, b in ((2, 3), (10, 5), (7, 8))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("task", ["gsm8k", "file"])
def test_end_to_end_on_the_tiny_model_with_a_fake_judge(tiny_model_dir, train_file, tmp_path, task, one_thread, capsys):
    """Real sampling from the tiny model (k=4, temperature 0.7); a fake judge calls every sample
    of the first and third questions correct. The file holds the gold rows, then the distinct
    samples turned into '#### gold' targets, and the task reads it back as training data."""
    out = tmp_path / "rft.jsonl"
    config = RFTConfig(model=str(tiny_model_dir), task=task, train_file=str(train_file), output=str(out),
                       max_new_tokens=12, batch_size=8, device="cpu", precision="fp32")
    lucky = {0, 2}
    questions = get_task(task, train_file=str(train_file)).examples("train")
    judged = []

    def fake_judge(text, example):
        judged.append(example.id)
        return questions.index(example) in lucky

    result = run_rft(config, is_correct=fake_judge)
    assert len(judged) == 3 * 4  # every sample judged once
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[:3] == [{"question": q.question, "answer": q.answer_text} for q in questions]
    new = rows[3:]
    assert len(new) == result["new_rows"] and 1 <= len(new) <= 8
    assert {r["question"] for r in new} <= {questions[i].question for i in lucky}
    for r in new:
        gold = next(q for q in questions if q.question == r["question"]).gold
        assert r["answer"].endswith(f"#### {gold:g}")
    assert len({(r["question"], " ".join(r["answer"].split())) for r in new}) == len(new)  # distinct
    gained = result["questions_gained"]
    assert gained.get(0, 0) >= 1 and sum(gained.values()) == 3
    printed = capsys.readouterr().out
    assert f"{result['gold_rows']} gold rows + {result['new_rows']} sampled solutions" in printed
    # the written file is training data for the same task: every row passes its checks
    reread = get_task(task, train_file=str(out)).examples("train")
    assert len(reread) == len(rows)


def test_sampled_correct_solutions_from_a_scripted_generator(train_file, tmp_path):
    """The task's own judge (exact, flexible extraction) with a generator stub: which samples are
    kept is decided by their text alone."""
    texts = [["2+3=5\n#### 5", "2+3=6\n#### 6", "5", "2+3=5\n#### 5"],
             ["#### 14", "#### 16", "#### 16", "15 pens"],
             ["no idea"] * 4]
    generator = lambda questions: Generations(texts, [[1] * 4] * 3, 0.1)  # noqa: E731
    out = tmp_path / "rft.jsonl"
    result = run_rft(RFTConfig(task="gsm8k", train_file=str(train_file), output=str(out)), generator=generator,
                     verbose=False)
    assert result["questions_gained"] == {0: 1, 1: 1, 2: 1}
    assert result["rejected"] == {"wrong": 8, "duplicate": 1}
    new = [json.loads(line)["answer"] for line in out.read_text().splitlines()[3:]]
    assert new == ["2+3=5\n#### 5", "5\n#### 5", "15 pens\n#### 15"]


def test_cli_rft_bad_flags_exit_2():
    proc = subprocess.run([sys.executable, "-m", "mathtune.cli", "rft", "--task", "unit-conversion",
                           "--output", "x.txt", "--temperature", "0"],
                          capture_output=True, text=True, cwd=REPO_ROOT, env={"PYTHONPATH": str(REPO_ROOT), "PATH": ""})
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") and "--output x.txt" in proc.stderr and "--temperature" in proc.stderr
