"""Calculator-assisted decoding: safe arithmetic for GSM8K's ``<<48/2=24>>`` annotations.

GSM8K solutions carry calculator annotations (Cobbe et al. 2021 trained with them so that a
calculator could fill in the results at sampling time). When a row's generated text ends in
``<<EXPR=`` and EXPR is plain arithmetic, ``evaluate`` computes it and ``CalculatorForcing`` (a
transformers LogitsProcessor) forces the tokens of ``RESULT>>`` into that row, one per decoding
step, inside the batched KV-cached generation: no prefix is recomputed, other rows decode on.

The evaluator never calls ``eval``: the expression is parsed with ``ast`` and only numbers,
``+ - * / ** ( )``, unary signs, ``N%`` (percent: N/100) and thousands commas (``1,000``) are
accepted. Arithmetic is exact (``fractions.Fraction``), so ``0.1+0.2`` is ``0.3``. Size and
magnitude are bounded so that one call does a bounded amount of work (tests/test_calculator.py
checks that the worst inputs build no number beyond MAX_MAGNITUDE**2): at most ``MAX_CHARS``
characters, integer exponents of at most ``MAX_EXPONENT`` whose result is checked *before* it is
computed, every intermediate value and denominator within ``MAX_MAGNITUDE``. Anything else is
refused (None) and the model keeps its own text.
"""

from __future__ import annotations

import ast
import math
import re
from decimal import Decimal, localcontext
from fractions import Fraction

# GSM8K's longest annotation expression in the train set is ~40 characters; 120 leaves room and
# keeps ast.parse in the tens of microseconds.
MAX_CHARS = 120
# 10**15: every GSM8K number is far below it, and a float still holds such integers exactly (2**53 ≈ 9e15).
MAX_MAGNITUDE = 10**15
MAX_EXPONENT = 64
RESULT_DECIMALS = 6  # 10/3 -> "3.333333" (GSM8K writes up to 3 decimals; 6 keeps more than it uses)

_ALLOWED_CHARS = re.compile(r"[0-9+\-*/().%, ]+")
_THOUSANDS = re.compile(r"(?<![\d.])\d{1,3}(?:,\d{3})+(?![\d,])")
# "20%" is 20/100 when the percent sign ends a number and an operator, ")" or the end follows
_PERCENT = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*%(?=\s*(?:[-+*/)]|$))")
# what a row's generated text must end with for the calculator to run: "<<EXPR="
PENDING_CALL = re.compile(r"<<([^<>=\n]{1," + str(MAX_CHARS) + r"})=$")


class _Refused(Exception):
    """The expression is not plain bounded arithmetic."""


def _check(value: Fraction) -> Fraction:
    if abs(value) > MAX_MAGNITUDE or value.denominator > MAX_MAGNITUDE:
        raise _Refused("out of bounds")
    return value


def _eval(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        # Fraction(str) of a float literal: "0.1" is exactly 1/10, not the binary double
        return _check(Fraction(repr(node.value)) if isinstance(node.value, float) else Fraction(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _eval(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Add):
            return _check(left + right)
        if isinstance(node.op, ast.Sub):
            return _check(left - right)
        if isinstance(node.op, ast.Mult):
            return _check(left * right)
        if isinstance(node.op, ast.Div):
            if right == 0:
                raise _Refused("division by zero")
            return _check(left / right)
        if isinstance(node.op, ast.Pow):
            if right.denominator != 1 or abs(right) > MAX_EXPONENT:
                raise _Refused("exponent must be a small integer")
            exponent = int(right)
            if left == 0:
                if exponent < 0:
                    raise _Refused("division by zero")
                return Fraction(int(exponent == 0))
            # size before computing: |left|**e has about e * log10|left| digits (numerator and
            # denominator bounded the same way), so 9**64 is refused without being built
            digits = abs(exponent) * max(math.log10(abs(left.numerator)), math.log10(left.denominator))
            if digits > math.log10(MAX_MAGNITUDE):
                raise _Refused("result too large")
            return _check(left**exponent)
    raise _Refused(f"{type(node).__name__} is not arithmetic")


def evaluate(expression: str) -> Fraction | None:
    """The exact value of a plain arithmetic ``expression``, or None when it is refused."""
    if not isinstance(expression, str) or len(expression) > MAX_CHARS:
        return None
    text = expression.strip()
    if not text or not _ALLOWED_CHARS.fullmatch(text):
        return None
    text = _THOUSANDS.sub(lambda m: m.group(0).replace(",", ""), text)
    text = _PERCENT.sub(r"(\1/100)", text)
    if "," in text or "%" in text:  # "3,4" or "10%3": ambiguous, so not ours to guess
        return None
    try:
        return _eval(ast.parse(text, mode="eval"))
    except (_Refused, SyntaxError, ValueError, ZeroDivisionError, RecursionError, MemoryError):
        return None


def format_result(value: Fraction) -> str:
    """``24``, ``-7``, ``0.125``, ``3.333333`` (rounded to ``RESULT_DECIMALS``): as GSM8K writes them."""
    if value.denominator == 1:
        return str(value.numerator)
    with localcontext() as ctx:
        ctx.prec = 40
        exact = Decimal(value.numerator) / Decimal(value.denominator)
    text = f"{exact.quantize(Decimal(1).scaleb(-RESULT_DECIMALS)).normalize():f}"
    return "0" if text in ("-0", "0") else text


def calculate(expression: str) -> str | None:
    """The result text the calculator writes for ``expression`` (None: refused)."""
    value = evaluate(expression)
    return None if value is None else format_result(value)


def is_call(expression: str) -> bool:
    """Is this ``<<EXPR=`` a calculator call at all (only calculator characters)? A refused call
    is still a call (logged with value None); ``<<x=`` is just text."""
    return bool(_ALLOWED_CHARS.fullmatch(expression.strip())) and any(c.isdigit() for c in expression)


# --------------------------------------------------------------------------- forcing in generation


def trigger_table(tokenizer):
    """Bool tensor over the vocabulary: does the token's text end with ``=``? Only after such a token
    can a row's text end in ``<<EXPR=``, so only those rows are decoded and checked."""
    import torch

    table = torch.zeros(len(tokenizer), dtype=torch.bool)
    # byte-level BPE and sentencepiece both keep the ASCII "=" as itself in the token string
    for token, index in tokenizer.get_vocab().items():
        if token.endswith("=") and index < len(table):
            table[index] = True
    return table


class CalculatorForcing:
    """A LogitsProcessor forcing ``RESULT>>`` after ``<<EXPR=`` in each row of a batch.

    One instance serves one batch across all of its ``generate()`` chunks: ``start`` is the width of
    the batch's prompt tensor (generated tokens follow it in every row), ``select(keep)`` follows the
    batch when finished rows leave it. ``calls[row]`` lists ``{"expr", "value"}`` per call (value
    None: refused, the model's own text stays).
    """

    def __init__(self, tokenizer, rows: int, start: int, triggers, tail_tokens: int = 64):
        self.tokenizer = tokenizer
        self.start = start
        self.triggers = triggers
        self.tail_tokens = tail_tokens  # enough for "<<" + MAX_CHARS characters of digits and signs
        self.pending: list[list[int]] = [[] for _ in range(rows)]
        self.calls: list[list[dict]] = [[] for _ in range(rows)]
        self.rows = list(range(rows))  # batch row of each tensor row
        # tensor rows the last call forced (GRPO's env_mask reads them: a scan of the scores for -inf
        # would also take tokens some other processor masked, and costs a pass over every logit)
        self.forced_rows: list[int] = []

    def select(self, keep: list[int]) -> None:
        self.pending = [self.pending[j] for j in keep]
        self.rows = [self.rows[j] for j in keep]

    def __call__(self, input_ids, scores):
        self.forced_rows = []
        if input_ids.shape[1] <= self.start:
            return scores
        last = input_ids[:, -1].cpu()
        candidates = self.triggers[last.clamp(max=len(self.triggers) - 1)]
        forced: dict[int, int] = {}
        for j, pending in enumerate(self.pending):
            if pending:
                forced[j] = pending.pop(0)
            elif candidates[j]:
                tail = input_ids[j, max(self.start, input_ids.shape[1] - self.tail_tokens):].tolist()
                match = PENDING_CALL.search(self.tokenizer.decode(tail, skip_special_tokens=True))
                if match is None or not is_call(match.group(1)):
                    continue
                result = calculate(match.group(1))
                self.calls[self.rows[j]].append({"expr": match.group(1).strip(), "value": result})
                if result is None:
                    continue  # refused: the model's own text stays
                tokens = self.tokenizer.encode(result + ">>", add_special_tokens=False)
                forced[j] = tokens[0]
                self.pending[j] = tokens[1:]
        if forced:
            rows = self.forced_rows = list(forced)
            scores[rows] = float("-inf")
            scores[rows, list(forced.values())] = 0.0
        return scores
