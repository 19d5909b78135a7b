"""``--target-format equations``: GSM8K targets made of the <<expr=result>> chain and '#### N'."""

from __future__ import annotations

import json

import pytest
import torch

from mathtune.answers import extract, extract_strict, lm_eval_extract_strict
from mathtune.errors import MathtuneError
from mathtune.tasks import get_task
from mathtune.tasks.gsm8k import equations_target

ROWS = [
    {"question": "Ann has 10 apples for 5 kids, then doubles each share. How many each?",
     "answer": "Each kid gets 10/5 = <<10/5=2>>2 apples.\nDoubled: 2*2 = <<2*2=4>>4.\n#### 4"},
    {"question": "What is 3 plus 4?", "answer": "3 plus 4 is 7.\n#### 7"},
]


@pytest.fixture
def rows_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return path


def test_equations_target_keeps_the_annotations_in_order_and_the_final_line():
    assert equations_target(ROWS[0]["answer"]) == "<<10/5=2>> <<2*2=4>> #### 4"
    assert equations_target(ROWS[1]["answer"]) is None


def test_task_formats_keep_or_drop_rows_without_annotations(rows_file, capsys):
    full = get_task("gsm8k", train_file=rows_file).examples("train")
    kept = get_task("gsm8k", train_file=rows_file, target_format="equations").examples("train")
    dropped = get_task("gsm8k", train_file=rows_file, target_format="equations-drop").examples("train")
    assert [e.answer_text for e in full] == [r["answer"] for r in ROWS]
    assert [e.answer_text for e in kept] == ["<<10/5=2>> <<2*2=4>> #### 4", ROWS[1]["answer"]]
    assert [e.answer_text for e in dropped] == ["<<10/5=2>> <<2*2=4>> #### 4"]
    assert "dropped 1 of 2 rows" in capsys.readouterr().err and all(e.gold in (4, 7) for e in kept)
    with pytest.raises(MathtuneError, match="--target-format equations applies to --task gsm8k"):
        get_task("unit-conversion", target_format="equations")


def test_answers_read_equation_only_outputs():
    output = "<<10/5=2>> <<2*2=4>> #### 4"
    assert extract(output) == (4.0, "####")
    assert extract_strict(output) == 4.0
    assert lm_eval_extract_strict(output) == "4"
    # without the final line, the last number is the last annotation's result
    assert extract("<<10/5=2>> <<2*2=4>>") == (4.0, "last_number")


def test_data_supervises_the_equation_target(rows_file, tokenizer):
    from mathtune.data import prepare_examples, render_supervised

    examples = get_task("gsm8k", train_file=rows_file, target_format="equations").examples("train")
    rows, stats = prepare_examples(examples, tokenizer, 512)
    assert stats.kept == 2
    assert "\u27e6<<10/5=2>> <<2*2=4>> #### 4" in render_supervised(tokenizer, rows[0])


def test_calculator_fills_results_in_the_equation_format(smol_tokenizer, one_thread):
    """The model is made to write the first annotation's head and, in a second row, a whole first
    annotation then the head of the next; the calculator completes each with its result and '>>'."""
    from conftest import build_tiny_model
    from mathtune.generation.engine import Generator
    from mathtune.config import GenerationArgs

    tok = smol_tokenizer
    model = build_tiny_model(tok, seed=5)
    scripts = ["<<10/5=", "<<10/5=2>> <<2*2="]
    encoded = [tok.encode(t, add_special_tokens=False) for t in scripts]
    start = {}

    def script(input_ids, scores):
        start.setdefault("at", input_ids.shape[1])
        step = input_ids.shape[1] - start["at"]
        for row, ids in enumerate(encoded):
            if step < len(ids):
                scores[row] = float("-inf")
                scores[row, ids[step]] = 0.0
        return scores

    # the script first, then mathtune's processors (the calculator), on either decoding path
    gen = Generator(model, tok, GenerationArgs(max_new_tokens=20, batch_size=4, calculator=True),
                    progress=False, chunk_tokens=64, logits_processors=[script])
    outs = gen(["Ann has 10 apples?", "Ann has 10 apples for 5 kids?"])
    assert outs[0][0].startswith("<<10/5=2>>"), outs[0][0]
    assert outs[1][0].startswith("<<10/5=2>> <<2*2=4>>"), outs[1][0]
    assert outs.calculator_calls[1][0][-1] == {"expr": "2*2", "value": "4"}
