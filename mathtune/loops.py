"""Loop stop: a generated row that repeats itself is stopped there and flagged ``loop``.

A row loops when its output ends with
  - the same non-blank line ``LOOP_REPEATS`` (3) times in a row,
  - the same span of at least ``MIN_SPAN_TOKENS`` (8) tokens 3 times in a row, or
  - the same calculator annotation ``<<expr=result>>`` 3 times in a row, only whitespace between.
Small models fall into such loops and then run to ``max_new_tokens``: in one 250-item GSM8K eval
of SmolLM2-135M, 90-101 outputs ran to the 256-token cap, almost all repeating one line. The
answer a loop holds was already written once; the rest is eval time spent on nothing.

The annotation rule is for ``--target-format equations`` outputs (``<<2*3=6>> <<6*2=12>> #### 12``),
one line of annotations: a short one is shorter than the span rule's 8 tokens (``' <<2*3=6>>'`` is 7
SmolLM2 tokens: `` <<``, 2, *, 3, =, 6, ``>>``), so ``<<2*3=6>> <<2*3=6>> <<2*3=6>>`` would run on to
the 7th copy before the 14-token span of two copies has repeated 3 times. The same calculation three
times in a row is never progress; a chain of different ones (``<<6*2=12>> <<12*2=24>> ...``) differs
in its numbers and is no loop under any rule. In worded solutions the result follows the annotation
(``2*3=<<2*3=6>>6``), so repeated annotations there are never only whitespace apart.

``ends_in_loop`` is the pure check (token ids + text); ``LoopMonitor`` is the same check made
incremental for batched decoding: per row and per period L it keeps how many consecutive new tokens
equalled the token L positions earlier; a run of 2L such tokens with 3L generated tokens is the span
of length L three times (one O(rows x periods) tensor update per step, no Python loop over rows).
Lines and annotations are checked only in rows whose newest token holds a newline or a ``>`` (only
such a token completes a line or an annotation's ``>>``).
"""

from __future__ import annotations

import re
from typing import Sequence

LOOP_REPEATS = 3
MIN_SPAN_TOKENS = 8


def repeated_line(text: str, repeats: int = LOOP_REPEATS) -> bool:
    """Do the last ``repeats`` complete (newline-terminated), non-blank lines of ``text`` match?"""
    complete = text.split("\n")[:-1]  # the part after the last newline is still being written
    lines = [line.strip() for line in complete if line.strip()]
    return len(lines) >= repeats and len(set(lines[-repeats:])) == 1


# one annotation, then the same one LOOP_REPEATS - 1 more times, whitespace only between, at the end
_REPEATED_ANNOTATION = re.compile(r"(<<[^<>]*>>)(?:\s*\1){%d}\s*$" % (LOOP_REPEATS - 1))


def repeated_annotation(text: str) -> bool:
    """Does ``text`` end with one ``<<expr=result>>`` annotation 3 times in a row, only whitespace between?"""
    return ">>" in text and _REPEATED_ANNOTATION.search(text) is not None


def repeated_span(ids: Sequence[int], min_span: int = MIN_SPAN_TOKENS, repeats: int = LOOP_REPEATS) -> bool:
    """Do ``ids`` end with one span of >= ``min_span`` tokens repeated ``repeats`` times in a row?"""
    ids = list(ids)
    for span in range(min_span, len(ids) // repeats + 1):
        tail = ids[len(ids) - span:]
        if all(ids[len(ids) - (r + 1) * span: len(ids) - r * span] == tail for r in range(1, repeats)):
            return True
    return False


def ends_in_loop(ids: Sequence[int], text: str) -> bool:
    """The loop check on one finished or partial output (its new token ids and their text)."""
    return repeated_span(ids) or repeated_line(text) or repeated_annotation(text)


def text_check_table(tokenizer):
    """Bool tensor over the vocabulary: can the token complete a line (holds a newline) or an
    annotation (holds a ``>``; the ``>>`` may come as ``>`` twice)? Only then can the text checks change."""
    import torch

    table = torch.zeros(len(tokenizer), dtype=torch.bool)
    ids = list(range(len(tokenizer)))
    for index, text in zip(ids, tokenizer.batch_decode([[i] for i in ids])):
        table[index] = "\n" in text or ">" in text
    return table


class LoopMonitor:
    """Watches one batch during decoding; ``step(input_ids)`` -> bool tensor of rows that now loop.

    ``start`` is the width of the batch's prompt tensor; ``max_span`` the longest period checked
    (``max_new_tokens // 3``: a longer one cannot repeat 3 times). ``select(keep)`` follows the batch
    when finished rows leave it.
    """

    def __init__(self, tokenizer, rows: int, start: int, max_new_tokens: int, text_checks):
        import torch

        self.tokenizer = tokenizer
        self.start = start
        self.text_checks = text_checks  # text_check_table(tokenizer)
        self.max_span = max(max_new_tokens // LOOP_REPEATS, 0)
        spans = torch.arange(1, self.max_span + 1)
        self.spans = spans
        self.checked = spans >= MIN_SPAN_TOKENS  # periods 1..7 are counted (for longer runs) but never flag
        self.runs = torch.zeros((rows, self.max_span), dtype=torch.long)
        self.looped = torch.zeros(rows, dtype=torch.bool)

    def select(self, keep: list[int]) -> None:
        self.runs = self.runs[keep]
        self.looped = self.looped[keep]

    def step(self, input_ids):
        import torch

        generated = input_ids.shape[1] - self.start
        found = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        if generated <= 0:
            return found
        ids = input_ids.cpu()
        if self.max_span > 0 and generated > 1:
            # new token vs the token `span` positions back, for every span that reaches into the output
            reach = min(self.max_span, generated - 1)
            back = ids[:, -1 - torch.arange(1, reach + 1)]
            same = back == ids[:, -1:]
            runs = torch.zeros_like(self.runs)
            runs[:, :reach] = (self.runs[:, :reach] + 1) * same
            self.runs = runs
            # span L three times = 2L tokens equal to the ones L earlier, inside 3L generated tokens
            hit = (self.runs >= 2 * self.spans) & self.checked & (3 * self.spans <= generated)
            found |= hit.any(dim=1)
        text_rows = self.text_checks[ids[:, -1].clamp(max=len(self.text_checks) - 1)] & ~found
        for j in text_rows.nonzero().flatten().tolist():
            text = self.tokenizer.decode(ids[j, self.start:].tolist(), skip_special_tokens=True)
            if repeated_line(text) or repeated_annotation(text):
                found[j] = True
        newly = found & ~self.looped
        self.looped |= found
        return newly
