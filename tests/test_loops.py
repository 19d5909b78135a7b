"""Loop stop: the pure checks, the incremental batched monitor, and stopping inside generation."""

from __future__ import annotations

import random

import pytest
import torch

from mathtune.evaluation import format_summary, judge_generations
from mathtune.generation.engine import Generator
from mathtune.config import GenerationArgs
from mathtune.generation.settings import Generations
from mathtune.loops import (LoopMonitor, ends_in_loop, repeated_annotation, repeated_line, repeated_span,
                            text_check_table)
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
    monitor = LoopMonitor(tok, rows, prompt_width, max_new_tokens=steps, text_checks=text_check_table(tok))
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
        settings = GenerationArgs(max_new_tokens=60, batch_size=8, loop_stop=stop)
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


# ------------------------------------------------------------------ equation-only outputs (--target-format equations)

def equation_chain(start: int, count: int) -> str:
    """``count`` different annotations, each computing from the last result: legitimate progress."""
    steps, value = [], start
    for i in range(count):
        op, operand = [("*", 2), ("+", 7), ("-", 3)][i % 3]
        result = {"*": value * operand, "+": value + operand, "-": value - operand}[op]
        steps.append(f"<<{value}{op}{operand}={result}>>")
        value = result
    return " ".join(steps)


@pytest.mark.parametrize("text, expected", [
    ("<<2*3=6>> <<2*3=6>> <<2*3=6>>", True),
    ("<<2*3=6>>\n<<2*3=6>>  <<2*3=6>> ", True),  # any whitespace between and after
    ("<<1+1=2>> <<2*3=6>> <<2*3=6>> <<2*3=6>>", True),
    ("<<2*3=6>> <<2*3=6>>", False),
    ("<<2*3=6>> <<2*3=6>> <<2*3=", False),  # the third one is not complete yet
    ("<<2*3=6>> <<6*2=12>> <<12*2=24>> <<24*2=48>>", False),
    ("<<2*3=6>> <<3*2=6>> <<2*3=6>>", False),
    ("2*3=<<2*3=6>>6 and 2*3=<<2*3=6>>6 and 2*3=<<2*3=6>>", False),  # worded: results between them
    (equation_chain(3, 30), False),
])
def test_repeated_annotation(text, expected):
    assert repeated_annotation(text) is expected
    assert ends_in_loop([], text) is expected  # no token span repeats in []: the text rules decide


def test_monitor_agrees_with_the_pure_check_on_equation_outputs(smol_tokenizer):
    """Chains of annotations with one annotation planted 2-4 times in a row: the monitor flags each row
    at exactly the first step where the pure check says it loops."""
    tok = smol_tokenizer
    rng = random.Random(1)
    pieces = [f"<<{a}*{b}={a * b}>>" for a in (2, 3, 12) for b in (2, 5)]
    rows, steps = 12, 90
    outputs = []
    for r in range(rows):
        parts = [rng.choice(pieces) for _ in range(rng.randrange(0, 4))]
        parts += [rng.choice(pieces)] * (2 + r % 3)
        parts += [equation_chain(r + 2, 12)]
        outputs.append(tok.encode(" ".join(parts), add_special_tokens=False)[:steps])
    steps = min(len(o) for o in outputs)
    monitor = LoopMonitor(tok, rows, 0, max_new_tokens=steps, text_checks=text_check_table(tok))
    first_flag = [None] * rows
    for step in range(1, steps + 1):
        for r in monitor.step(torch.tensor([o[:step] for o in outputs])).nonzero().flatten().tolist():
            first_flag[r] = step
    expected = [next((s for s in range(1, steps + 1)
                      if ends_in_loop(o[:s], tok.decode(o[:s], skip_special_tokens=True))), None) for o in outputs]
    assert first_flag == expected
    assert sum(flag is not None for flag in first_flag) >= 3  # rows with 3 or 4 copies in a row loop


@pytest.mark.parametrize("fast", [True, False])
def test_equation_chain_runs_on_and_a_repeated_calculation_is_stopped(smol_tokenizer, one_thread, fast):
    """Calculator on, as gsm8k eval and rft decode: a long chain of different calculations on one line
    runs to the token limit; the same calculation 3 times in a row is stopped at the third, and a cycle
    of two calculations once the span of the two has come 3 times."""
    from conftest import build_tiny_model

    tok = smol_tokenizer
    model = build_tiny_model(tok, seed=3)
    limit = 90
    chain = equation_chain(3, 30)
    encode = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    assert len(encode(chain)) >= limit  # the whole output is the chain: nothing after it could loop
    same = "<<2*3=6>>" + " <<2*3=6>>" * 19
    cycle = "<<12*2=24>>" + " <<24/2=12>> <<12*2=24>>" * 6
    scripts = [encode(chain), encode(same), encode(cycle)]
    questions = ["Q? " * (i + 1) for i in range(3)]  # longer question -> later row: row i is question i
    results = {}
    for stop in (True, False):
        settings = GenerationArgs(max_new_tokens=limit, batch_size=8, calculator=True, loop_stop=stop)
        gen = Generator(model, tok, settings, progress=False, fast=fast, chunk_tokens=16,
                        logits_processors=[_Script(scripts)])
        results[stop] = gen(questions)
    stopped, flagged = results[True], results[False]
    assert stopped.loops == [[False], [True], [True]] == flagged.loops
    assert stopped[0] == flagged[0] and stopped[0][0] == tok.decode(scripts[0][:limit])
    assert stopped.token_counts[0] == [limit]
    # the calculator computed every result the chain wrote (its tokens are the script's own)
    written = stopped.calculator_calls[0][0]
    assert len(written) >= 8 and all(f"<<{c['expr']}={c['value']}>>" in chain for c in written)
    assert stopped[1][0] == "<<2*3=6>> <<2*3=6>> <<2*3=6>>" and stopped.token_counts[1] == [3 * 7]
    assert [c["expr"] for c in stopped.calculator_calls[1][0]] == ["2*3"] * 3
    # the cycle repeats with the period of ' <<24/2=12>> <<12*2=24>>' from its 2nd token on (its 1st, '<<',
    # differs from the later ' <<'): stopped where that period has come 3 times
    cycle_span = len(encode(" <<24/2=12>> <<12*2=24>>"))
    assert cycle_span >= 8 and stopped.token_counts[2] == [1 + 3 * cycle_span]
    assert flagged.token_counts[1] == [limit] and flagged.token_counts[2] == [limit]
