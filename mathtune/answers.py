"""Answer extraction and judging: pure functions on strings, no model code.

Two scores, as in lm-evaluation-harness's GSM8K task: ``extract_strict`` reads only a ``#### N``
line (the format we train), ``extract`` also accepts the usual ways a model states a final answer.

Two rules, chosen by the gold (``judge_answer``, the one function eval, compare, rft and grpo call):
  numeric   the gold is one number (GSM8K, unit conversion, most MATH answers): the number a
            prediction states, compared by the task's rule (``exact`` or ``rel_tol=0.05``)
  symbolic  any other gold (``\\frac{\\sqrt{3}}{2}``, ``(2, 5]``, ``x^2+1``, ``\\text{(B)}``): Hugging
            Face's math-verify parses gold and prediction with sympy and decides equivalence
            (``mathtune.symbolic``, in a worker process with a deadline)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Decimal

# One number as written in text: optional minus, optional "$", then "1,234" (thousands groups of
# exactly three digits, so "3,4" is two numbers, not 34) or plain digits, an optional decimal part,
# and an optional "/denominator" for fractions like 3/4 (a "." after it that no digit follows ends
# the sentence: "The answer is 3/4." is 0.75, not 3). The minus counts only when it is not
# preceded by a word character or ")" so that "5-3" reads as 5 and 3, not 5 and -3.
_NUMBER = (
    r"(?:(?<![\w)])(?P<neg>[-−]))?\$?(?P<neg2>-)?"
    r"(?P<num>(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)"
    r"(?:/(?P<den>\d+(?:\.\d+)?)(?!\d|\.\d))?"
)
_NUMBER_RE = re.compile(_NUMBER)
_WHOLE_NUMBER_RE = re.compile(r"\+?" + _NUMBER + r"%?")

# `####` then the number; only spaces, "$" or "**" (markdown bold) may sit in between.
_HASHES_RE = re.compile(r"####[ \t*]*" + _NUMBER)
_BOXED_RE = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")
_FRAC_RE = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")
# "The answer is 5", "the final answer is: $1,234.", "The answer is **42**".
_ANSWER_IS_RE = re.compile(
    r"the\s+(?:final\s+)?answer\s+is\s*[:=]?[ \t*]*(?:\\\(|\$\$?)?[ \t]*" + _NUMBER, re.IGNORECASE
)
_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
_CALCULATOR_RE = re.compile(r"<<[^<>]*>>")

METHODS = ("####", "boxed", "answer_is", "answer_tag", "last_number", "none")


def _value(match: re.Match) -> float | None:
    """The float a ``_NUMBER`` match denotes; None for a zero denominator."""
    value = float(match.group("num").replace(",", ""))
    if match.group("den") is not None:
        den = float(match.group("den"))
        if den == 0:
            return None
        value /= den
    if match.group("neg") or match.group("neg2"):
        value = -value
    return value


def parse_number(text: str) -> float | None:
    """``"1,234"`` -> 1234.0, ``"$18.00"`` -> 18.0, ``"3/4"`` -> 0.75, ``"12%"`` -> 12.0; else None."""
    text = text.strip()
    # a sentence-final period ("5.") is punctuation, not a decimal point
    if text.endswith(".") and not text.endswith(".."):
        text = text[:-1].rstrip()
    match = _WHOLE_NUMBER_RE.fullmatch(text)
    return _value(match) if match else None


def _first_number(text: str) -> float | None:
    for match in _NUMBER_RE.finditer(text):
        value = _value(match)
        if value is not None:
            return value
    return None


def extract_strict(text: str) -> float | None:
    """The number right after the first ``####``; None when that is missing or not a number.

    Only the first occurrence counts: a model that keeps generating after its answer (a new
    "Question: ..." with its own ``####``) must not change the result.
    """
    start = text.find("####")
    if start < 0:
        return None
    match = _HASHES_RE.match(text, start)
    return _value(match) if match else None


def _boxed(text: str) -> float | None:
    match = _BOXED_RE.search(text)
    if match is None:
        return None
    inner = _FRAC_RE.sub(r"\1/\2", match.group(1))  # \frac{3}{4} -> 3/4
    # LaTeX spells a thousands comma "{,}" (1{,}000) and a dollar sign "\\$"
    inner = inner.replace("\\$", "$").replace("{,}", ",").replace("\\,", ",").replace("\\!", "")
    return _first_number(inner)


def extract(text: str) -> tuple[float | None, str]:
    """Flexible extraction: ``(value, method)`` with method in ``METHODS``, tried in that order.

    Marker-based methods take the first occurrence (text generated after a stated answer is
    noise); ``last_number`` is the fallback for free-form reasoning that ends on its result.
    """
    value = extract_strict(text)
    if value is not None:
        return value, "####"
    value = _boxed(text)
    if value is not None:
        return value, "boxed"
    for match in _ANSWER_IS_RE.finditer(text):
        value = _value(match)
        if value is not None:
            return value, "answer_is"
    for match in _ANSWER_TAG_RE.finditer(text):
        value = _first_number(match.group(1))
        if value is not None:
            return value, "answer_tag"
    values = [v for v in map(_value, _NUMBER_RE.finditer(text)) if v is not None]
    if values:
        return values[-1], "last_number"
    return None, "none"


def parse_gold(answer_text: str, *, symbolic_ok: bool = False) -> float | str:
    """The gold after ``####`` (to the end of that line); ValueError(reason) otherwise. A number, or
    with ``symbolic_ok`` any answer math-verify reads (``symbolic_gold``: LaTeX numbers stay numbers)."""
    start = answer_text.find("####")
    if start < 0:
        raise ValueError("no '#### <number>' final line")
    rest = answer_text[start + 4 :].split("\n", 1)[0].strip()
    if not rest:
        raise ValueError("nothing after '####'; write the final number there, e.g. '#### 42'")
    value = parse_number(rest)
    if value is None and symbolic_ok:
        try:
            return symbolic_gold(rest)
        except ValueError as err:
            raise ValueError(f"gold after '####' is neither a number nor an answer math-verify reads: {err}") from None
    if value is None:
        raise ValueError(f"gold after '####' is not a number: {rest!r}; write e.g. '#### 42'")
    return value


def judge(value: float | str | None, gold: float | str, rule: str) -> bool:
    """Is the extracted answer ``value`` right? A number gold: ``exact``: equal up to float noise;
    ``rel_tol=0.05``: within 5 % of gold. A symbolic gold (a string): math-verify's verdict on the
    answer text ``value`` (see ``judge_answer``, which also extracts it from a whole output)."""
    if rule == "exact":
        tol = 1e-6 * max(1.0, abs(gold)) if not isinstance(gold, str) else 0.0
    elif rule == "rel_tol=0.05":
        tol = 0.05 * abs(gold) if not isinstance(gold, str) else 0.0  # gold 0 -> tolerance 0 -> exact
    else:
        raise ValueError(f"unknown judge rule {rule!r}; use 'exact' or 'rel_tol=0.05'")
    if value is None:
        return False
    if isinstance(gold, str):
        return isinstance(value, str) and _verify(gold, value).correct
    return abs(value - gold) <= tol


def strip_calculator(text: str) -> str:
    """Remove GSM8K calculator annotations: ``48/2 = <<48/2=24>>24`` -> ``48/2 = 24``."""
    return _CALCULATOR_RE.sub("", text)


def format_number(value: float | Decimal) -> str:
    """Shortest plain rendering: 3500.0 -> "3500", 0.1 + 0.2 -> "0.3" (6 decimals at most)."""
    exact = value if isinstance(value, Decimal) else Decimal(str(round(float(value), 6)))
    text = f"{exact.normalize():f}"
    return "0" if text == "-0" else text


# --------------------------------------------------------------------------- lm-evaluation-harness rules
# lm-evaluation-harness' gsm8k task (lm_eval/tasks/gsm8k/gsm8k.yaml, version 3.0), copied rule for rule
# so that ``--protocol lm-eval`` scores a generation exactly as that harness does (tested against the
# real package in tests/test_lm_eval_protocol.py). Its extraction is string based: "18.00" is not "18".
LM_EVAL_STRICT_PATTERN = r"#### (\-?[0-9\.\,]+)"  # "strict-match" filter: first match
LM_EVAL_FLEXIBLE_PATTERN = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"  # "flexible-extract" filter: last match
LM_EVAL_FALLBACK = "[invalid]"  # what its regex filter returns when nothing matches
# exact_match's regexes_to_ignore, applied to prediction and reference alike, then lower-cased
_LM_EVAL_IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")


def lm_eval_regex_filter(text: str, pattern: str, group_select: int = 0) -> str:
    """lm-eval's ``regex`` filter on one response: the ``group_select``-th match of ``pattern`` (its
    first non-empty group when the pattern has several), stripped; ``"[invalid]"`` when none."""
    matches = re.findall(pattern, text)
    if not matches:
        return LM_EVAL_FALLBACK
    match = matches[group_select]
    if isinstance(match, tuple):
        match = next((group for group in match if group), LM_EVAL_FALLBACK)
    return match.strip()


def lm_eval_extract_strict(text: str) -> str:
    """lm-eval gsm8k "strict-match": the number after the first ``#### ``, as written."""
    return lm_eval_regex_filter(text, LM_EVAL_STRICT_PATTERN, 0)


def lm_eval_extract_flexible(text: str) -> str:
    """lm-eval gsm8k "flexible-extract": the last number-like run (``group_select: -1``), as written."""
    return lm_eval_regex_filter(text, LM_EVAL_FLEXIBLE_PATTERN, -1)


def lm_eval_normalize(text: str) -> str:
    """What lm-eval's exact_match compares: commas, "$", everything up to "#### " and a final "."
    removed (in that order), lower-cased."""
    for pattern in _LM_EVAL_IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


def lm_eval_exact_match(prediction: str, reference: str) -> bool:
    """lm-eval gsm8k exact_match of a filtered prediction against the full reference solution."""
    return lm_eval_normalize(prediction) == lm_eval_normalize(reference)


# --------------------------------------------------------------------------- gold answers in other datasets' forms
# MATH / NuminaMath end solutions in \boxed{...}, MetaMathQA in "The answer is: N", GSM8K in "#### N".
# These read a *gold* answer (a dataset's own, trusted to be final), so unlike ``extract`` they take
# the last \boxed{} and the last "The answer is" (a solution may box intermediate results). One number
# stays a number (the numeric rule); anything else must be readable by math-verify, or it is refused.
_ANSWER_IS_LINE_RE = re.compile(r"the\s+(?:final\s+)?answer\s+is\s*[:=]?\s*(.+?)\s*$", re.IGNORECASE)
_LATEX_FRAC_RE = re.compile(r"^(-?)\\[dt]?frac\s*\{\s*(-?\d+)\s*\}\s*\{\s*(\d+)\s*\}$")
_LATEX_FRAC_DIGITS_RE = re.compile(r"^(-?)\\[dt]?frac\s*(\d)(\d)$")  # \frac34, as TeX allows
_PLAIN_FRAC_RE = re.compile(r"^(-?)(\d+)\s*/\s*(\d+)$")
GOLD_FORMS = ("####", "boxed", "answer_is", "number", "text")  # text: a whole field that is not one number


def boxed_contents(text: str) -> list[str]:
    """The contents of every ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``, braces balanced
    (``\\boxed{\\frac{3}{4}}`` -> ``\\frac{3}{4}``); an unclosed one is left out."""
    found = []
    for match in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, start = 1, match.end()
        for index in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[index], 0)
            if depth == 0:
                found.append(text[start:index])
                break
    return found


def latex_number(text: str) -> tuple[float, str] | None:
    """One number written in LaTeX or plain text -> ``(value, plain)``, where ``plain`` is how a
    target states it (``\\dfrac{3}{4}`` -> (0.75, "3/4"), ``\\$1{,}234`` -> (1234.0, "1234"));
    None when the text is not exactly one number (``x+1``, ``(1, 2)``, ``\\sqrt{2}``)."""
    text = text.strip().strip("$").strip()
    # presentation only: \text{ cm}, \mbox{...}, \$, thin spaces, degrees, percent, \left/\right
    text = re.sub(r"\\(?:text|textbf|mathrm|mbox)\s*\{[^{}]*\}", "", text)
    for old, new in (("\\$", ""), ("{,}", ","), ("\\,", ""), ("\\!", ""), ("\\ ", ""), ("^\\circ", ""),
                     ("^{\\circ}", ""), ("\\%", ""), ("%", ""), ("\\left", ""), ("\\right", ""), ("$", "")):
        text = text.replace(old, new)
    text = text.strip()
    while text.startswith("{") and text.endswith("}") and _balanced(text[1:-1]):
        text = text[1:-1].strip()
    fraction = _LATEX_FRAC_RE.match(text) or _LATEX_FRAC_DIGITS_RE.match(text) or _PLAIN_FRAC_RE.match(text)
    if fraction:
        sign, num, den = fraction.groups()
        negative = (sign == "-") != num.startswith("-")
        num = num.lstrip("-")
        if int(den) == 0:
            return None
        value = int(num) / int(den)
        plain = f"{num}/{den}" if int(num) % int(den) else str(int(num) // int(den))
        return (-value, f"-{plain}") if negative else (value, plain)
    value = parse_number(text)
    if value is None:
        return None
    return value, format_number(value)


def _balanced(text: str) -> bool:
    depth = 0
    for char in text:
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth < 0:
            return False
    return depth == 0


def read_gold(answer_text: str) -> tuple[float | str, str, str]:
    """A dataset's gold answer in any supported form -> ``(value, plain, form)``, form in ``GOLD_FORMS``.

    ``#### X`` (GSM8K) is read by ``parse_gold``; else the last ``\\boxed{}`` (MATH, NuminaMath); else the
    last "The answer is: X" (MetaMathQA); else the whole text. One number -> ``value`` a float and
    ``plain`` how a target states it (``\\dfrac{3}{4}`` -> "3/4"); anything else math-verify reads ->
    ``value`` and ``plain`` its LaTeX text (``symbolic_gold``). ValueError(reason, with the fix) otherwise.
    """
    if "####" in answer_text:
        value = parse_gold(answer_text, symbolic_ok=True)
        return value, _plain(value), "####"
    boxes = boxed_contents(answer_text)
    if boxes:
        return (*_stated_gold(boxes[-1], f"\\boxed{{{boxes[-1][:40]}}}"), "boxed")
    matches = [m for line in answer_text.splitlines() for m in _ANSWER_IS_LINE_RE.finditer(line)]
    if matches:
        return (*_stated_gold(matches[-1].group(1), f"'The answer is: {matches[-1].group(1)[:40]}'"), "answer_is")
    parsed = latex_number(answer_text)
    if parsed is not None:
        return (*parsed, "number")
    if "\n" in answer_text.strip() or _word(answer_text):
        # prose, not an answer: math-verify would read "no final answer" as a product of symbols
        raise ValueError(f"{answer_text.strip()[:40]!r} is neither a solution ending in '#### <answer>' nor a bare "
                         "answer; end it with '#### X', \\boxed{X} or 'The answer is: X'")
    return (*_stated_gold(answer_text, repr(answer_text.strip()[:40])), "text")


# A word outside LaTeX commands and their {arguments}: math-verify would read "ten" as t*e*n, so a gold
# holding one is refused (MATH writes words as \text{Evelyn}; variables are single letters).
_WORD_RE = re.compile(r"[A-Za-z]{3,}")
_LATEX_COMMAND_RE = re.compile(r"\\[a-zA-Z]+\s*(?:\{[^{}]*\})?")


def _word(text: str) -> str | None:
    """The first word of three letters or more outside LaTeX commands (``\\text{...}`` included)."""
    match = _WORD_RE.search(_LATEX_COMMAND_RE.sub(" ", text))
    return match.group(0) if match else None


def _plain(value: float | str) -> str:
    """How a target's final line states a gold: the shortest number, or the LaTeX text as read."""
    return value if isinstance(value, str) else format_number(value)


def _stated_gold(text: str, where: str) -> tuple[float | str, str]:
    """``(value, plain)`` of a stated final answer: ``latex_number``'s for one number (``\\frac{3}{4}`` ->
    0.75, "3/4"), else ``symbolic_gold``'s text, with the place it was read from in its error."""
    text = text.strip()
    text = text[:-1] if text.endswith(".") else text
    number = latex_number(text)
    if number is not None:
        return number
    try:
        value = symbolic_gold(text)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    return value, _plain(value)


# --------------------------------------------------------------------------- answers beyond one number
# A gold that is not one number (MATH's \frac{\sqrt{3}}{2}, (2, 5], \{1, 3\}, x^2 + 1, \text{(B)}) is kept
# as its LaTeX text and judged by math-verify. A prediction's answer to it is read from its last \boxed{},
# else its first "#### " line (the target format; first, as for numbers), else its last "The answer is".
RULES = ("numeric", "symbolic")


@dataclass(frozen=True)
class Judgement:
    """One prediction judged against one gold: the verdict and how it was reached (the per-item log)."""

    correct: bool
    rule: str  # "numeric" (the task's number rule) or "symbolic" (math-verify), decided by the gold
    extracted: float | str | None  # the prediction's answer: a number, or (symbolic) its LaTeX text
    method: str  # where it was found: METHODS; "none" when nothing was
    gold_parsed: str | None  # the gold as the judge read it ("0.75"; sympy's "sqrt(3)/2")
    parsed: str | None  # the prediction's answer as the judge read it; None: no answer / unparsable
    note: str | None = None  # why a verdict is not the rule's own (math-verify timed out: judged wrong)


def is_symbolic(gold: float | str) -> bool:
    """A gold kept as text (not one number) is judged by math-verify."""
    return isinstance(gold, str)


def _finite(value: float | None) -> float | None:
    # A 400-digit "number" parses to inf, which JSON cannot hold and no gold equals: no answer.
    return value if value is not None and math.isfinite(value) else None


def _answer_text(text: str) -> str:
    """A stated answer as LaTeX: no math delimiters around it, no sentence-final period."""
    text = text.strip().strip("*").strip()
    if text.endswith(".") and not text.endswith(".."):
        text = text[:-1].rstrip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if text.startswith(left) and text.endswith(right) and len(text) > len(left) + len(right):
            return text[len(left):-len(right)].strip()
    return text


def extract_symbolic(text: str, *, strict: bool = False) -> tuple[str | None, str]:
    """The answer a prediction states, as text, for a symbolic gold -> ``(answer, method)``.

    ``strict``: only the first ``#### `` line counts (the trained format, as ``extract_strict``). Else
    the last ``\\boxed{}`` (competition style; earlier boxes hold intermediate results), the first
    ``#### `` line, the last "The answer is ..." line, in that order; ``(None, "none")`` otherwise.
    """
    start = text.find("####")
    hashes = _answer_text(text[start + 4:].split("\n", 1)[0]) if start >= 0 else ""
    if strict:
        return (hashes, "####") if hashes else (None, "none")
    boxes = [box for box in boxed_contents(text) if box.strip()]
    if boxes:
        return boxes[-1].strip(), "boxed"
    if hashes:
        return hashes, "####"
    stated = [_answer_text(m.group(1)) for line in text.splitlines() for m in _ANSWER_IS_LINE_RE.finditer(line)]
    stated = [answer for answer in stated if answer]
    if stated:
        return stated[-1], "answer_is"
    return None, "none"


def _verify(gold: str, answer: str):
    from mathtune import symbolic

    return symbolic.verify(symbolic.boxed(gold), symbolic.boxed(answer), symbolic.TIMEOUT_S)


def judge_answer(text: str, gold: float | str, rule: str, *, strict: bool = False) -> Judgement:
    """Judge one prediction ``text`` against ``gold``: the one judge eval, compare, rft and the RL reward use.

    A number gold: ``extract`` (``strict``: ``extract_strict``) and the task's ``rule``, exactly as
    before answers beyond numbers existed. A text gold: ``extract_symbolic`` and math-verify's
    ``verify(parse(gold), parse(answer))``, both wrapped in ``\\boxed{}``; a verdict math-verify does not
    reach within ``symbolic.TIMEOUT_S`` is "wrong", with a note saying so.
    """
    if not is_symbolic(gold):
        value, method = (extract_strict(text), "####") if strict else extract(text)
        value = _finite(value)
        method = method if value is not None else "none"
        return Judgement(judge(value, gold, rule), "numeric", value, method, format_number(gold),
                         format_number(value) if value is not None else None)
    judge(None, gold, rule)  # an unknown rule is an error here too, not only for number golds
    answer, method = extract_symbolic(text, strict=strict)
    if answer is None:
        from mathtune import symbolic

        return Judgement(False, "symbolic", None, "none", symbolic.parse(symbolic.boxed(gold)), None)
    verdict = _verify(gold, answer)
    return Judgement(verdict.correct, "symbolic", answer, method, verdict.gold_parsed, verdict.parsed, verdict.note)


def symbolic_gold(text: str) -> float | str:
    """A final answer that is not plain digits -> its number when it is one (``\\frac{3}{4}`` -> 0.75,
    ``45^\\circ`` -> 45), else its LaTeX text once math-verify can parse it; ValueError(reason) when
    it cannot (or takes longer than ``symbolic.TIMEOUT_S``)."""
    number = latex_number(text)
    if number is not None:
        return number[0]
    answer = " ".join(_answer_text(text).split())  # one line: a target states it after "#### "
    if not answer:
        raise ValueError("the final answer is empty; write it after '####', in \\boxed{} or after 'The answer is'")
    word = _word(answer)
    if word is not None:
        raise ValueError(f"{answer[:60]!r} holds the word {word!r}: write words inside \\text{{}} (\\text{{(B)}}), "
                         "or correct the answer")
    from mathtune import symbolic

    if symbolic.parse(symbolic.boxed(answer)) is None:
        raise ValueError(f"math-verify cannot read the gold answer {answer[:60]!r} as math (within "
                         f"{symbolic.TIMEOUT_S:g} s); correct it, or drop the row")
    return answer
