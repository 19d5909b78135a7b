"""Real math datasets: Parquet, save_to_disk dirs, hub datasets (a local repo dir standing in for the
hub, read by the same datasets.load_dataset call), column mapping, and gold answers in every form."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mathtune.answers import judge, read_gold
from mathtune.errors import MathtuneError
from mathtune.tasks import get_task
from mathtune.tasks.files import Fields, read_examples

datasets = pytest.importorskip("datasets")

METAMATH = [  # MetaMathQA's columns and answer form
    {"query": "Tom has 3 apples and buys 15 more. How many?", "response": "3 + 15 = 18\nThe answer is: 18"},
    {"query": "What is half of 3/2?", "response": "Half of 3/2 is 3/4.\nThe answer is: \\frac{3}{4}"},
]
MATH = [  # MATH / NuminaMath: problem, solution with \boxed{}
    {"problem": "Compute 1000 + 234.", "solution": "We add: $\\boxed{1{,}234}$."},
    {"problem": "Simplify 6/8.", "solution": "First \\boxed{6/8} reduces to $\\boxed{\\dfrac{3}{4}}$."},
]


@pytest.mark.parametrize("text, value, plain, form", [
    ("48/2 = <<48/2=24>>24 clips\n#### 1,234", 1234, "1234", "####"),
    ("so the total is $\\boxed{\\$18}$", 18, "18", "boxed"),
    ("\\boxed{\\frac{3}{4}}", 0.75, "3/4", "boxed"),
    ("\\boxed{\\dfrac{1}{3}}", 1 / 3, "1/3", "boxed"),
    ("\\boxed{-\\frac{10}{4}}", -2.5, "-10/4", "boxed"),
    ("\\boxed{{\\frac{\\,6}{2}}}", 3, "3", "boxed"),  # nested braces, a thin space
    ("\\boxed{1{,}000 \\text{ cm}}", 1000, "1000", "boxed"),
    ("first \\boxed{2}, finally \\boxed{18}", 18, "18", "boxed"),  # the last box is the answer
    ("6 * 3 = 18\nThe answer is: 18", 18, "18", "answer_is"),
    ("The answer is: $-3.5$.", -3.5, "-3.5", "answer_is"),
    ("42", 42, "42", "number"),
])
def test_gold_forms_are_read(text, value, plain, form):
    got_value, got_plain, got_form = read_gold(text)
    assert (got_plain, got_form) == (plain, form)
    assert judge(got_value, value, "exact")


@pytest.mark.parametrize("text, message", [  # golds beyond numbers: tests/test_symbolic_answers.py
    ("\\boxed{x^2 + )(}", "math-verify cannot read the gold answer"),
    ("The answer is: about ten", "holds the word 'about'"),
    ("no final answer at all", "is neither a solution ending in '#### <answer>' nor a bare answer"),
])
def test_unreadable_gold_is_refused(text, message):
    with pytest.raises(ValueError, match=message):
        read_gold(text)


def test_jsonl_with_mapped_columns_trains_on_the_solution_with_a_final_line(tmp_path):
    path = tmp_path / "metamath.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in METAMATH))
    examples = read_examples(path, "--train-file", fields=Fields("query", "response"))
    assert [e.gold for e in examples] == [18, 0.75]
    assert examples[0].answer_text == "3 + 15 = 18\nThe answer is: 18\n#### 18"
    assert examples[1].answer_text.endswith("\n#### 3/4") and examples[1].id == "metamath.jsonl:2"
    with pytest.raises(MathtuneError, match=r"metamath.jsonl:1: no column 'problem' .*columns: query, response.*"
                                            r"--question-field"):
        read_examples(path, "--train-file", fields=Fields("problem", "response"))


def test_parquet_and_save_to_disk_are_read_by_datasets(tmp_path):
    table = datasets.Dataset.from_list(MATH)
    table.to_parquet(str(tmp_path / "math.parquet"))
    fields = Fields("problem", "solution")
    examples = read_examples(tmp_path / "math.parquet", "--train-file", fields=fields)
    assert [(e.id, e.gold) for e in examples] == [("math.parquet:0", 1234), ("math.parquet:1", 0.75)]
    datasets.DatasetDict({"train": table, "test": table.select([1])}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(MathtuneError, match="holds splits train, test: name one as"):
        read_examples(tmp_path / "saved", "--train-file", fields=fields)
    examples = read_examples(tmp_path / "saved" / "test", "--eval-file", fields=fields)
    assert [e.gold for e in examples] == [0.75]
    # a row whose gold cannot be read: the file and the row, one line
    datasets.Dataset.from_list(MATH + [{"problem": "Find x.", "solution": "$\\boxed{???}$"}]).to_parquet(
        str(tmp_path / "bad.parquet"))
    with pytest.raises(MathtuneError, match=r"bad.parquet: row 2: 'solution' \\boxed\{\?\?\?\}: math-verify cannot read"):
        read_examples(tmp_path / "bad.parquet", "--train-file", fields=fields)
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(MathtuneError, match="junk.parquet: not readable as a Parquet file"):
        read_examples(tmp_path / "junk.parquet", "--train-file")


def test_hub_dataset_through_load_dataset(tmp_path, monkeypatch):
    # A directory laid out like a hub dataset repo (a README declaring configs and splits):
    # datasets.load_dataset("org/name", "config") reads it from the working dir, the same call
    # that downloads a hub repo, so the hub code path runs for real, offline.
    repo = tmp_path / "mathorg" / "mixed"
    (repo / "meta").mkdir(parents=True)
    (repo / "meta" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in METAMATH))
    (repo / "meta" / "test.jsonl").write_text(json.dumps(METAMATH[0]) + "\n")
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: meta\n  data_files:\n  - split: train\n    path: meta/train.jsonl\n"
        "  - split: test\n    path: meta/test.jsonl\n---\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    task = get_task("file", dataset="mathorg/mixed:meta", fields=Fields("query", "response"),
                    splits={"train": "train", "eval": "test"})
    train = task.examples("train")
    assert [(e.id, e.gold) for e in train] == [("mathorg/mixed:meta:train:0", 18), ("mathorg/mixed:meta:train:1", 0.75)]
    assert [e.gold for e in task.examples("eval")] == [18]
    wrong = get_task("file", dataset="mathorg/mixed:meta", fields=Fields("query", "response"),
                     splits={"eval": "validation"})
    with pytest.raises(MathtuneError, match="has no split 'validation'; it has train, test"):
        wrong.examples("eval")
    missing = get_task("file", dataset="mathorg/nonexistent")
    with pytest.raises(MathtuneError, match="could not load --dataset mathorg/nonexistent split train"):
        missing.examples("train")
    with pytest.raises(MathtuneError, match="--dataset is read by --task file"):
        get_task("gsm8k", dataset="mathorg/mixed")


def test_config_maps_fields_and_dataset_from_flags_and_yaml(tmp_path):
    from mathtune.config import TrainConfig, build_config

    recipe = tmp_path / "r.yaml"
    recipe.write_text("task: file\ndataset_name: mathorg/mixed:meta\nquestion_field: query\nanswer_field: response\n")
    config = build_config(TrainConfig, recipe)
    assert (config.dataset, config.question_field, config.answer_field) == ("mathorg/mixed:meta", "query", "response")
    from mathtune.errors import ConfigError

    with pytest.raises(ConfigError, match="two data sources"):
        build_config(TrainConfig, recipe, {"train_file": str(recipe)})


def test_data_command_shows_the_mapping_and_extracted_gold(tiny_model_dir, tmp_path, capsys):
    from mathtune.cli import main

    path = tmp_path / "metamath.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in METAMATH))
    code = main(["data", "--model", str(tiny_model_dir), "--task", "file", "--train_file", str(path),
                 "--question_field", "query", "--answer_field", "response", "--show", "0"])
    out = capsys.readouterr().out
    assert code == 0
    assert "columns: question <- 'query', answer <- 'response'" in out
    assert "metamath.jsonl:2: gold 0.75  <- '#### 3/4'" in out
