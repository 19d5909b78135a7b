"""Rows -> prompt and completion text -> token ids -> completion-only labels, with checks.

Stages, in order (each one can only drop a row by counting it under a named reason):
  format    chat template for instruct models, ``Question: ...\\nAnswer:`` for base models
  tokenize  prompt alone and prompt+completion; the first must be a prefix of the second
  label     -100 on the prompt, token ids on the completion and its end-of-turn token
  truncate  a row that does not fit ``max_length`` whole is dropped: cutting it would remove the
            final ``#### N`` line and the end-of-turn token (or every supervised token, which makes
            the mean loss NaN or a silent 0.0)

Labels are NOT shifted here: the model shifts them itself, and a double shift trains it to copy
the current token (a known cause of ``!!!!`` output).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch

from mathtune.errors import MathtuneError

IGNORE_INDEX = -100
DROP_PROMPT_TOO_LONG = "prompt longer than --max-length (no answer token would be supervised)"
DROP_COMPLETION_TRUNCATED = "answer cut by --max-length (the '#### N' line and end-of-turn would be lost)"
BASE_PROMPT = "Question: {question}\nAnswer:"
_ANSWER_MARKER = "\u2063MATHTUNE_ANSWER\u2063"


def is_chat_model(tokenizer) -> bool:
    """Instruct models ship a chat template; base models are prompted with plain text."""
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer, question: str) -> str:
    if is_chat_model(tokenizer):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
    return BASE_PROMPT.format(question=question)


def end_of_turn_token(tokenizer) -> str:
    """The token that closes an assistant turn: what the template writes right after the answer.

    For SmolLM2 and Qwen2.5 that is ``<|im_end|>``; Llama 3 uses ``<|eot_id|>``; base models use EOS.
    Reading it off the rendered template (rather than assuming EOS) keeps training and generation
    stopping on the same token the model was instruction-tuned with.
    """
    if is_chat_model(tokenizer):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": _ANSWER_MARKER}],
            tokenize=False,
        )
        after = rendered.split(_ANSWER_MARKER, 1)[-1]
        special = sorted(
            (tok for tok in tokenizer.all_special_tokens + list(tokenizer.get_added_vocab()) if tok and tok in after),
            key=after.index,
        )
        if special:
            return special[0]
    if tokenizer.eos_token is None:
        raise MathtuneError("the tokenizer has no EOS token and no chat template: cannot mark where answers end")
    return tokenizer.eos_token


def end_of_turn_token_id(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer))


def completion_text(tokenizer, answer_text: str) -> str:
    separator = "" if is_chat_model(tokenizer) else " "
    return f"{separator}{answer_text}{end_of_turn_token(tokenizer)}"


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a formatted prompt, exactly as training saw them (shared with generation)."""
    # A chat template already writes its special tokens; base models get the tokenizer's own BOS.
    return tokenizer(prompt, add_special_tokens=not is_chat_model(tokenizer))["input_ids"]


@dataclass
class PreparedRow:
    id: str
    input_ids: list[int]
    labels: list[int]
    prompt_len: int

    @property
    def supervised_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


@dataclass
class DataStats:
    read: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    dropped_ids: dict[str, list[str]] = field(default_factory=dict)
    prompt_lengths: list[int] = field(default_factory=list)
    completion_lengths: list[int] = field(default_factory=list)
    max_length: int = 0

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    @property
    def supervised_tokens(self) -> int:
        """Completion tokens of the kept rows: the tokens the loss is averaged over."""
        return int(sum(self.completion_lengths))

    def percentiles(self, which: str) -> dict[str, int]:
        values = self.prompt_lengths if which == "prompt" else self.completion_lengths
        if not values:
            return {}
        arr = np.asarray(values)
        return {f"p{q}": int(np.percentile(arr, q)) for q in (50, 90, 99)} | {"max": int(arr.max()), "min": int(arr.min())}


def prepare_examples(examples: Iterable, tokenizer, max_length: int,
                     max_drop_fraction: float = 0.05) -> tuple[list[PreparedRow], DataStats]:
    """Format, tokenize and label every example; drop (and count) rows that do not fit.

    Raises MathtuneError if more than ``max_drop_fraction`` of the rows were dropped, or if the
    tokenizer splits differently at the prompt/answer boundary than on the prompt alone.
    """
    eot_id = end_of_turn_token_id(tokenizer)
    stats = DataStats(max_length=max_length)
    rows: list[PreparedRow] = []
    for example in examples:
        stats.read += 1
        prompt = format_prompt(tokenizer, example.question)
        prompt_ids = encode_prompt(tokenizer, prompt)
        full_ids = encode_prompt(tokenizer, prompt + completion_text(tokenizer, example.answer_text))
        if full_ids[: len(prompt_ids)] != prompt_ids:
            raise MathtuneError(
                f"row {example.id}: the tokenizer splits the prompt differently when the answer follows it "
                "(chat template and tokenizer disagree at the boundary); check the model's chat template"
            )
        if full_ids[-1] != eot_id:
            raise MathtuneError(
                f"row {example.id}: the answer does not end with the end-of-turn token "
                f"{tokenizer.convert_ids_to_tokens(eot_id)!r}; the tokenizer merged it into other text"
            )
        completion_len = len(full_ids) - len(prompt_ids)
        if len(full_ids) > max_length:
            reason = DROP_PROMPT_TOO_LONG if len(prompt_ids) >= max_length else DROP_COMPLETION_TRUNCATED
            stats.dropped[reason] += 1
            stats.dropped_ids.setdefault(reason, []).append(example.id)
            continue
        labels = [IGNORE_INDEX] * len(prompt_ids) + full_ids[len(prompt_ids):]
        rows.append(PreparedRow(example.id, full_ids, labels, len(prompt_ids)))
        stats.kept += 1
        stats.prompt_lengths.append(len(prompt_ids))
        stats.completion_lengths.append(completion_len)
    if stats.read == 0:
        raise MathtuneError("no rows to prepare: the split is empty (check --train-file / --max-samples)")
    if stats.dropped_total > max_drop_fraction * stats.read:
        reasons = "; ".join(f"{n} {reason}" for reason, n in stats.dropped.items())
        raise MathtuneError(
            f"{stats.dropped_total} of {stats.read} rows dropped ({stats.dropped_total / stats.read:.1%} > "
            f"{max_drop_fraction:.0%} allowed): {reasons}. Raise --max-length (now {max_length})"
        )
    return rows, stats


class CompletionCollator:
    """Pads a list of PreparedRow-like dicts on the right: pad id in inputs, -100 in labels.

    Right padding for training keeps position ids of real tokens at 0..n-1 for every row.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids, labels, attention = [], [], []
        for f in features:
            pad = longest - len(f["input_ids"])
            input_ids.append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            labels.append(list(f["labels"]) + [IGNORE_INDEX] * pad)
            attention.append([1] * len(f["input_ids"]) + [0] * pad)
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "attention_mask": torch.tensor(attention, dtype=torch.long),
        }


# Rows sorted together per group: 50 batches, as transformers' LengthGroupedSampler at most.
GROUP_BATCHES = 50


def length_grouped_order(lengths: Sequence[int], batch_rows: int, seed: int, epoch: int = 0) -> list[int]:
    """One epoch's row order: consecutive runs of ``batch_rows`` rows have similar lengths.

    Training passes the rows of one optimizer step as ``batch_rows``: each micro-batch the
    DataLoader cuts from a run is then a sorted stretch of it, and the rows of a step do not depend on
    how it is split into micro-batches or processes.

    Rows are shuffled, cut into groups of ``GROUP_BATCHES`` batches, each group sorted by length and
    cut into batches; then the batches are shuffled (the one holding the longest row first, so an
    out-of-memory shows at step 1) and only the last batch of the epoch may be short.

    Why not transformers' ``LengthGroupedSampler``: it makes at least 4 groups, so a 64-row set
    (batch 8) is sorted only within 16 rows; on the first 64 GSM8K rows that pads the model's input
    to 1.30x the real tokens, against 1.11x for one sorted group. And within a group its batches go
    longest to shortest in every epoch; here their order is random. Same ``seed`` and ``epoch``:
    same order (a resumed run skips exactly the batches it trained on).
    """
    n = len(lengths)
    if batch_rows <= 0:
        raise MathtuneError(f"batch_rows must be > 0 (got {batch_rows})")
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    shuffled = torch.randperm(n, generator=generator).tolist()
    group_rows = GROUP_BATCHES * batch_rows
    batches: list[list[int]] = []
    for start in range(0, n, group_rows):
        group = sorted(shuffled[start : start + group_rows], key=lambda i: lengths[i], reverse=True)
        batches += [group[k : k + batch_rows] for k in range(0, len(group), batch_rows)]
    # a short batch (n not a multiple of batch_rows) stays last: anywhere else it would shift every
    # later batch boundary of the DataLoader, which cuts the flat order into runs of batch_rows
    short = [batches.pop()] if batches and len(batches[-1]) < batch_rows else []
    batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    if batches:
        longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
        batches[0], batches[longest] = batches[longest], batches[0]
    return [i for batch in batches + short for i in batch]


class RowDataset(torch.utils.data.Dataset):
    """PreparedRows as the dicts Trainer feeds the collator (ids kept for diagnostics).

    With ``batch_rows`` the dataset presents its rows in ``length_grouped_order`` for the epoch that
    Trainer announces through ``set_epoch`` (read it with a sequential sampler); without, in file order.
    """

    def __init__(self, rows: Sequence[PreparedRow], *, batch_rows: int | None = None, seed: int = 0):
        self.rows = list(rows)
        self.batch_rows, self.seed = batch_rows, seed
        self.lengths = [len(r.input_ids) for r in self.rows]
        self.order: list[int] | None = None
        self.epoch: int | None = None
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        # Trainer announces epoch 0 again before its first pass: the order is made once per epoch
        if self.batch_rows is not None and epoch != self.epoch:
            self.order = length_grouped_order(self.lengths, self.batch_rows, self.seed, epoch)
            self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = self.rows[self.order[index] if self.order is not None else index]
        return {"input_ids": row.input_ids, "labels": row.labels}


def render_supervised(tokenizer, row: PreparedRow, open_mark: str = "\u27e6", close_mark: str = "\u27e7") -> str:
    """The row's text with the supervised (loss-bearing) span wrapped in marks."""
    prompt = tokenizer.decode(row.input_ids[: row.prompt_len])
    answer = tokenizer.decode(row.input_ids[row.prompt_len:])
    return f"{prompt}{open_mark}{answer}{close_mark}"


def take(examples: Sequence, max_samples: int, split: str, flag: str = "--max-samples") -> list:
    """The first ``max_samples`` examples (-1: all). Asking for more than exist is an error, not a clamp."""
    if max_samples == -1:
        return list(examples)
    if max_samples > len(examples):
        raise MathtuneError(
            f"{flag} {max_samples} exceeds the {len(examples)} rows of the {split} split: use {flag} -1 for all"
        )
    return list(examples[:max_samples])
