"""Completion-only labels, boundary checks, truncation accounting, collation."""

from __future__ import annotations

import pytest

from mathtune.data import (
    DROP_COMPLETION_TRUNCATED,
    DROP_PROMPT_TOO_LONG,
    IGNORE_INDEX,
    CompletionCollator,
    end_of_turn_token,
    format_prompt,
    prepare_examples,
    render_supervised,
    take,
)
from mathtune.errors import MathtuneError
from mathtune.tasks import Example


def ex(i: int, question: str = "Tom has 3 apples and buys 4 more. How many apples?", answer: str = "3 + 4 = 7\n#### 7"):
    return Example(id=f"row-{i}", question=question, answer_text=answer, gold=7.0)


def test_labels_mask_prompt_and_supervise_answer_and_end_of_turn(tokenizer):
    rows, stats = prepare_examples([ex(0)], tokenizer, max_length=512)
    row = rows[0]
    prompt_ids = tokenizer(format_prompt(tokenizer, ex(0).question), add_special_tokens=False)["input_ids"]
    assert row.prompt_len == len(prompt_ids)
    assert row.input_ids[: row.prompt_len] == prompt_ids
    assert all(label == IGNORE_INDEX for label in row.labels[: row.prompt_len])
    # not shifted: each supervised label is the token at the same position
    assert row.labels[row.prompt_len:] == row.input_ids[row.prompt_len:]
    assert tokenizer.decode(row.input_ids[row.prompt_len:]) == "3 + 4 = 7\n#### 7<|im_end|>"
    assert row.labels[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert stats.kept == 1 and stats.supervised_tokens == row.supervised_tokens > 0


def test_chat_model_end_of_turn_is_im_end(tokenizer):
    assert end_of_turn_token(tokenizer) == "<|im_end|>"


def test_base_model_uses_plain_prompt_and_eos(base_tokenizer):
    prompt = format_prompt(base_tokenizer, "What is 2+2?")
    assert prompt == "Question: What is 2+2?\nAnswer:"
    rows, _ = prepare_examples([ex(0)], base_tokenizer, max_length=512)
    answer = base_tokenizer.decode(rows[0].input_ids[rows[0].prompt_len:])
    assert answer == " 3 + 4 = 7\n#### 7" + base_tokenizer.eos_token


def test_prefix_mismatch_names_the_row(tokenizer):
    # A generation prompt ending in a space: BPE merges it with the answer's first token,
    # so the prompt's ids are no longer a prefix of prompt+answer.
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if m['role'] == 'assistant' %}<|im_end|>{% endif %}\n"
        "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(MathtuneError, match="row row-3: the tokenizer splits the prompt differently"):
        prepare_examples([ex(3, answer="The sum is 7\n#### 7")], tokenizer, max_length=512)


def test_truncated_rows_are_dropped_and_counted_never_all_masked(tokenizer):
    long_answer = "step " * 60 + "\n#### 7"
    examples = [ex(i) for i in range(40)] + [ex(99, answer=long_answer)]
    rows, stats = prepare_examples(examples, tokenizer, max_length=80)
    assert stats.read == 41 and stats.kept == 40 and stats.dropped[DROP_COMPLETION_TRUNCATED] == 1
    assert stats.dropped_ids[DROP_COMPLETION_TRUNCATED] == ["row-99"]
    assert all(row.supervised_tokens > 0 and len(row.input_ids) <= 80 for row in rows)


def test_prompt_longer_than_max_length_is_its_own_reason(tokenizer):
    examples = [ex(i) for i in range(30)] + [ex(77, question="word " * 200)]
    _, stats = prepare_examples(examples, tokenizer, max_length=100)
    assert stats.dropped[DROP_PROMPT_TOO_LONG] == 1


def test_too_many_drops_fail_with_the_fix(tokenizer):
    examples = [ex(i) for i in range(10)]
    with pytest.raises(MathtuneError, match=r"10 of 10 rows dropped .*Raise --max-length \(now 20\)"):
        prepare_examples(examples, tokenizer, max_length=20)


def test_empty_input_is_an_error(tokenizer):
    with pytest.raises(MathtuneError, match="no rows"):
        prepare_examples([], tokenizer, max_length=64)


def test_collator_pads_right_with_ignored_labels(tokenizer):
    rows, _ = prepare_examples([ex(0), ex(1, answer="7\n#### 7")], tokenizer, max_length=512)
    batch = CompletionCollator(pad_token_id=tokenizer.pad_token_id)(
        [{"input_ids": r.input_ids, "labels": r.labels} for r in rows]
    )
    short, long_ = sorted(rows, key=lambda r: len(r.input_ids))
    width = len(long_.input_ids)
    assert batch["input_ids"].shape == (2, width)
    i = rows.index(short)
    pad = width - len(short.input_ids)
    assert pad > 0
    assert batch["labels"][i, -pad:].eq(IGNORE_INDEX).all()
    assert batch["attention_mask"][i, -pad:].eq(0).all() and batch["attention_mask"][i, :-pad].eq(1).all()


def test_render_marks_the_supervised_span(tokenizer):
    rows, _ = prepare_examples([ex(0)], tokenizer, max_length=512)
    text = render_supervised(tokenizer, rows[0])
    assert text.endswith("\u27e63 + 4 = 7\n#### 7<|im_end|>\u27e7")


def test_take_refuses_to_clamp():
    assert take([1, 2, 3], 2, "train") == [1, 2]
    assert take([1, 2, 3], -1, "train") == [1, 2, 3]
    with pytest.raises(MathtuneError, match="--max-samples 5 exceeds the 3 rows of the train split"):
        take([1, 2, 3], 5, "train")
