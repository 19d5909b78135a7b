"""Calculator-assisted decoding: the safe evaluator (table-driven) and forcing inside batched generation."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from mathtune.calculator import (MAX_CHARS, CalculatorForcing, calculate, evaluate, format_result, is_call,
                                 trigger_table)
from mathtune.generation.engine import Generator
from mathtune.config import GenerationArgs

CASES = [
    # precedence and grouping
    ("2+3*4", "14"),
    ("(2+3)*4", "20"),
    ("2*3**2", "18"),
    ("-2**2", "-4"),
    ("10-4-3", "3"),
    ("-20+10", "-10"),
    ("-14+-8+1", "-21"),
    # division: exact, then rounded only when written
    ("48/2", "24"),
    ("20/5000", "0.004"),
    ("37/40", "0.925"),
    ("10/3", "3.333333"),
    ("2/3", "0.666667"),
    ("8/4/2", "1"),
    # decimals are exact: no binary float noise
    ("0.1+0.2", "0.3"),
    (".5/100", "0.005"),
    ("1.5*4", "6"),
    # percent: N% is N/100 when an operator or the end follows
    ("50%*10", "5"),
    ("20%", "0.2"),
    ("200*15%", "30"),
    ("(10+10)%*5", None),  # a percent of a parenthesis is not a number's percent
    ("10%3", None),  # modulo or percent? refused, not guessed
    # thousands commas
    ("1,000*2", "2000"),
    ("1,234,567+1", "1234568"),
    ("3,4+1", None),
    ("12,34", None),
    # spaces
    (" 3 * 4 ", "12"),
    # refused: division by zero, huge values and exponents, non-arithmetic
    ("1/0", None),
    ("5/(2-2)", None),
    ("0**-1", None),
    ("9**9**9", None),
    ("10**16", None),
    ("2**0.5", None),
    ("2**65", None),
    ("99999999*99999999", None),
    ("1/3**40", None),
    ("", None),
    ("  ", None),
    ("x*2", None),
    ("2//3", None),
    ("__import__('os')", None),
    ("3+", None),
    ("1" * (MAX_CHARS + 1), None),
    ("((((((((((1))))))))))", "1"),
]


@pytest.mark.parametrize("expression, expected", CASES)
def test_evaluator_table(expression, expected):
    assert calculate(expression) == expected


def test_results_are_exact_fractions_and_format_like_gsm8k():
    assert evaluate("1/3") == Fraction(1, 3)
    assert format_result(Fraction(-1, 8)) == "-0.125"
    assert format_result(Fraction(1, 10**7)) == "0"  # below the 6 written decimals
    assert format_result(Fraction(144)) == "144"


def test_worst_inputs_build_only_bounded_numbers(monkeypatch):
    """The work of one call is bounded by construction, not by a clock (a timed test fails on a busy
    machine): at most one value per character of the expression; no computed value beyond
    MAX_MAGNITUDE**2 (a product of two in-bounds values; only a literal as written may be longer,
    and MAX_CHARS bounds it); no power beyond MAX_MAGNITUDE, because ``9**64`` or ``9**9**9`` are
    refused before the power is built."""
    import mathtune.calculator as calculator

    checked: list[Fraction] = []
    powers: list[Fraction] = []
    real_check, real_pow = calculator._check, Fraction.__pow__

    def recording_check(value):
        checked.append(value)
        return real_check(value)

    def recording_pow(base, exponent, *rest):
        value = real_pow(base, exponent, *rest)
        powers.append(value)
        return value

    monkeypatch.setattr(calculator, "_check", recording_check)
    monkeypatch.setattr(Fraction, "__pow__", recording_pow)
    worst = ["9**9**9", "9**64", "2**-64", "1" * MAX_CHARS, "(" * 55 + "1" + ")" * 55, "+".join(["999999"] * 17),
             "2**64/3**40*7", "1,000,000*" * 10 + "1", "1/7*" * 29 + "1", "999999999999999*999999999999999"]
    for expression in worst:
        checked.clear(), powers.clear()
        evaluate(expression)
        assert len(checked) + len(powers) <= len(expression), expression
        for value in checked:
            size = max(abs(value.numerator), value.denominator)
            assert size <= calculator.MAX_MAGNITUDE**2 or str(size) in expression, expression[:30]
        for value in powers:
            assert max(abs(value.numerator), value.denominator) <= calculator.MAX_MAGNITUDE, expression[:30]
    assert evaluate("9**9**9") is None and evaluate("9**64") is None and evaluate("2**-64") is None


def test_what_counts_as_a_call():
    assert is_call("48/2") and is_call("1/0")  # refused calls are still calls (logged, value None)
    assert not is_call("x") and not is_call("apples*2")


def test_calculator_default_follows_the_task():
    assert GenerationArgs(calculator=None).resolved("gsm8k").calculator is True
    assert GenerationArgs(calculator=None).resolved("unit-conversion").calculator is True  # its targets carry annotations too
    assert GenerationArgs(calculator=None).resolved("file").calculator is False
    assert GenerationArgs(calculator=False).resolved("gsm8k").calculator is False
    assert GenerationArgs(calculator=True).resolved("file").calculator is True


# --------------------------------------------------------------------------- forcing


def test_forcing_processor_forces_the_result_tokens_one_step_at_a_time(smol_tokenizer):
    tok = smol_tokenizer
    prompt = tok.encode("Q", add_special_tokens=False)
    rows = [prompt + tok.encode(" so <<48/2=", add_special_tokens=False),
            prompt + tok.encode(" just text", add_special_tokens=False),
            prompt + tok.encode(" <<7/0=", add_special_tokens=False)]
    width = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
    forcing = CalculatorForcing(tok, 3, start=width - 6, triggers=trigger_table(tok))
    # start: every row's generated part is its last 6 tokens at most (prompt tokens are not scanned)
    expected = tok.encode("24>>", add_special_tokens=False)
    got = []
    for _ in expected:
        scores = forcing(ids, torch.zeros(3, len(tok)))
        assert torch.isinf(scores[1]).sum() == 0 and torch.isinf(scores[2]).sum() == 0
        token = int(scores[0].argmax())
        assert scores[0].isfinite().sum() == 1
        got.append(token)
        ids = torch.cat([ids, torch.tensor([[token], [0], [0]])], dim=1)
    assert got == expected
    assert forcing.calls == [[{"expr": "48/2", "value": "24"}], [], [{"expr": "7/0", "value": None}]]


class _Script:
    """A LogitsProcessor that makes tensor row r write ``texts[r]`` first (then leaves it free)."""

    def __init__(self, tok, texts):
        self.scripts = [tok.encode(t, add_special_tokens=False) for t in texts]
        self.start = None

    def __call__(self, input_ids, scores):
        if self.start is None:
            self.start = input_ids.shape[1]
        step = input_ids.shape[1] - self.start
        for row, script in enumerate(self.scripts):
            if step < len(script):
                scores[row] = float("-inf")
                scores[row, script[step]] = 0.0
        return scores


@pytest.mark.parametrize("fast", [True, False])
def test_forced_result_in_a_batch_of_rows_at_different_positions(smol_tokenizer, one_thread, fast):
    """Each row writes "<<EXPR=" after a different number of tokens (and after a different amount
    of left padding); the random tiny model would continue with anything, but with the calculator
    each row continues with its own result and '>>', in one batched, KV-cached generation."""
    from conftest import build_tiny_model

    tok = smol_tokenizer
    model = build_tiny_model(tok, seed=5)
    cases = [("7*6", "42"), ("100/8", "12.5"), ("3+4*5", "23"), ("2**10", "1024"), ("1/0", None)]
    scripts = [f"{'so ' * i * 2}<<{expr}=" for i, (expr, _) in enumerate(cases)]
    # longer question -> later in the length-sorted batch: question i stays tensor row i
    questions = ["What is this? " * (i + 1) for i in range(len(cases))]
    # the script first, then mathtune's processors (the calculator), on either decoding path
    gen = Generator(model, tok, GenerationArgs(max_new_tokens=30, batch_size=8, calculator=True),
                    progress=False, fast=fast, chunk_tokens=64, logits_processors=[_Script(tok, scripts)])
    outs = gen(questions)
    plain = Generator(model, tok, GenerationArgs(max_new_tokens=30, batch_size=8, calculator=False),
                      progress=False, fast=fast, chunk_tokens=64)
    for (expr, result), prefix, text, calls in zip(cases, scripts, outs, outs.calculator_calls):
        assert text[0].startswith(prefix), text[0]
        assert calls[0] == [{"expr": expr, "value": result}]
        after = text[0][len(prefix):]
        if result is not None:
            assert after.startswith(f"{result}>>"), (expr, after)
        else:
            assert not after.startswith(">>")  # refused: nothing forced
    # without the script the tiny model never writes an annotation: no calls, nothing forced
    assert all(calls == [[]] for calls in plain(questions).calculator_calls)
