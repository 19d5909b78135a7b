"""Loop stop: the pure checks, the incremental batched monitor, and stopping inside generation."""

from __future__ import annotations

import random

import pytest
import torch

from mathtune.evaluation import format_summary, judge_generations
from mathtune.generation.engine import Generator
from mathtune.generation.settings import GenerationSettings, Generations
from mathtune.loops import LoopMonitor, ends_in_loop, newline_table, repeated_line, repeated_span
from mathtune.tasks import Example


@pytest.mark.parametrize("text, expected", [
    ("a\na\na\n", True),
    ("x = 5\nx = 5\n  x = 5  \n", True),  # surrounding spaces do not make a new line
    ("a\na\n\n\na\n", True),  # blank lines in between are not lines
    ("a\na\na", False),  # the third one is not complete yet
    ("a\na\nb\n", False),
    ("a\nb\na\nb\n", False),  # alternating lines: not the same line 3 times in a row
    ("a\na\n", False),
    ("", False),
])
def test_repeated_line(text, expected):
    assert repeated_line(text) is expected


SPAN = list(range(100, 108))  # 8 tokens


@pytest.mark.parametrize("ids, expected", [
    (SPAN * 3, True),
    ([1, 2] + SPAN * 3, True),
    (SPAN * 2, False),
    (SPAN * 3 + [1], False),  # not at the end any more
    (list(range(7)) * 3, False),  # a 7-token span is too short...
    (list(range(7)) * 4, False),  # ...and 4 x 7 tokens are a 14-token span only twice
    ([5] * 24, True),  # one token 24 times is an 8-token span 3 times
    ([5] * 23, False),
    (list(range(30)), False),
])
def test_repeated_span(ids, expected):
    assert repeated_span(ids) is expected


def test_monitor_agrees_with_the_pure_check_step_by_step(smol_tokenizer):
    """Random outputs with planted loops: the incremental monitor flags each row at exactly the
    first step where the pure check on the output so far says it loops."""
    tok = smol_tokenizer
    rng = random.Random(0)
    newline = tok.encode("\n", add_special_tokens=False)
    words = [tok.encode(w, add_special_tokens=False)[0] for w in (" apple", " pear", " 7", " plus", " is")]
    rows, prompt_width, steps = 12, 5, 90
    outputs = []
    for r in range(rows):
        out = [rng.choice(words) for _ in range(rng.randrange(0, 20))]
        kind = r % 3
        if kind == 0:
            unit = [rng.choice(words) for _ in range(rng.randrange(8, 14))]
            out += unit * 4
        elif kind == 1:
            line = [rng.choice(words) for _ in range(rng.randrange(2, 5))] + newline
            out += line * 4
        out += [rng.choice(words) for _ in range(steps)]
        outputs.append(out[:steps])
    prompt = [[tok.pad_token_id] * prompt_width for _ in range(rows)]
    monitor = LoopMonitor(tok, rows, prompt_width, max_new_tokens=steps, newlines=newline_table(tok))
    first_flag = [None] * rows
    for step in range(1, steps + 1):
        ids = torch.tensor([p + o[:step] for p, o in zip(prompt, outputs)])
        for r in monitor.step(ids).nonzero().flatten().tolist():
            first_flag[r] = step
    expected = []
    for out in outputs:
        hit = next((s for s in range(1, steps + 1)
                    if ends_in_loop(out[:s], tok.decode(out[:s], skip_special_tokens=True))), None)
        expected.append(hit)
    assert first_flag == expected
    assert sum(flag is not None for flag in first_flag) >= 8  # the planted loops were found


class _Script:
    """Makes the row that is tensor row r at the first step write ``scripts[r]`` (token ids); rows
    are recognised by their prompt part, so the script follows them when finished rows leave."""

    def __init__(self, scripts):
        self.scripts = scripts
        self.start = None
        self.by_prompt = {}

    def __call__(self, input_ids, scores):
        if self.start is None:
            self.start = input_ids.shape[1]
            self.by_prompt = {tuple(row[: self.start].tolist()): s for row, s in zip(input_ids, self.scripts)}
        step = input_ids.shape[1] - self.start
        for row in range(input_ids.shape[0]):
            script = self.by_prompt[tuple(input_ids[row, : self.start].tolist())]
            if step < len(script):
                scores[row] = float("-inf")
                scores[row, script[step]] = 0.0
        return scores


@pytest.mark.parametrize("fast", [True, False])
def test_looping_row_is_stopped_and_flagged_others_run_on(smol_tokenizer, one_thread, fast):
    from conftest import build_tiny_model

    tok = smol_tokenizer
    model = build_tiny_model(tok, seed=2)
    line = tok.encode("The answer is 5.\n", add_special_tokens=False)
    span = tok.encode(" and then we add two more apples to the basket", add_special_tokens=False)
    assert len(span) >= 8
    free = list(range(1000, 1060))  # 60 different tokens: no span or line repeats
    scripts = [line * 20, free, span * 10]
    questions = ["Q? " * (i + 1) for i in range(3)]  # longer question -> later row: row i is question i
    results = {}
    for stop in (True, False):
        settings = GenerationSettings(max_new_tokens=60, batch_size=8, loop_stop=stop)
        # the script runs before mathtune's own processors, on either decoding path
        gen = Generator(model, tok, settings, progress=False, fast=fast, chunk_tokens=16,
                        logits_processors=[_Script(scripts)])
        results[stop] = gen(questions)
    stopped, flagged = results[True], results[False]
    assert stopped.loops == [[True], [False], [True]] == flagged.loops
    # stopped right where the third repetition completed (tokens counted through that one)
    assert stopped.token_counts[0] == [3 * len(line)]
    assert stopped[0][0].count("The answer is 5.") == 3
    assert stopped.token_counts[2] == [3 * len(span)]
    # without --loop-stop the looping rows run on to the token limit
    assert flagged.token_counts[0] == [60] and flagged.token_counts[2] == [60]
    # the free row is the same either way
    assert stopped[1] == flagged[1] and stopped.token_counts[1] == flagged.token_counts[1]


def test_loop_rate_in_metrics_and_summary():
    examples = [Example(f"e{i}", f"q{i}", "#### 1", 1.0) for i in range(4)]
    outputs = Generations([["1"], ["1"], ["2\n2\n2\n"], ["x"]], [[1], [1], [6], [1]], 1.0,
                          loops=[[False], [False], [True], [False]],
                          calculator_calls=[[[{"expr": "1/1", "value": "1"}]], [[]], [[]], [[{"expr": "1/0", "value": None}]]])
    records, result = judge_generations(examples, outputs, "exact")
    assert [r["loop"] for r in records] == [False, False, True, False]
    assert result["loop_rate"] == 0.25
    assert result["calculator_calls"] == 2 and result["calculator_refused"] == 1
    summary = {"model": "m", "task": "gsm8k", "judge_rule": "exact", **result,
               "generation": {"calculator": True, "loop_stop": True}}
    text = format_summary(summary)
    assert "loop rate        25.0%" in text and "2 calls, 1 refused" in text


def test_plain_list_generator_has_no_loop_rate():
    examples = [Example("e0", "q0", "#### 1", 1.0)]
    _records, result = judge_generations(examples, [["1"]], "exact")
    assert result["loop_rate"] is None
