"""Completion-only labels, boundary checks, truncation accounting, collation; `mathtune data` showing them."""

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


# --- length-grouped batches --------------------------------------------------------------------


def _padded(order, lengths, batch_rows):
    """Positions through the model (each batch padded to its longest row) per real token."""
    batches = [order[k : k + batch_rows] for k in range(0, len(order), batch_rows)]
    return sum(max(lengths[i] for i in b) * len(b) for b in batches) / sum(lengths)


def test_length_grouped_order_is_a_permutation_with_aligned_batches():
    import random

    from mathtune.data import length_grouped_order

    rng = random.Random(0)
    lengths = [rng.randint(40, 400) for _ in range(203)]  # not a multiple of the batch
    order = length_grouped_order(lengths, 8, seed=3, epoch=0)
    assert sorted(order) == list(range(203))
    # the only short batch is the last; the longest row is in the first batch (out of memory at step 1)
    assert len(order[200:]) == 3
    assert max(lengths) == max(lengths[i] for i in order[:8])
    # one group (203 rows < 50 batches): every full batch is a run of 8 of the sorted lengths
    ranked = sorted(lengths, reverse=True)
    runs = {tuple(ranked[k : k + 8]) for k in range(0, 200, 8)}
    assert {tuple(sorted((lengths[i] for i in order[k : k + 8]), reverse=True)) for k in range(0, 200, 8)} == runs


def test_length_grouped_order_pads_less_than_random_and_transformers_on_a_small_set():
    import random

    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from mathtune.data import length_grouped_order

    rng = random.Random(1)
    lengths = [rng.randint(60, 420) for _ in range(64)]
    ours = _padded(length_grouped_order(lengths, 8, seed=0), lengths, 8)
    theirs = _padded(get_length_grouped_indices(lengths, 8, generator=torch.Generator().manual_seed(0)), lengths, 8)
    shuffled = _padded(torch.randperm(64, generator=torch.Generator().manual_seed(0)).tolist(), lengths, 8)
    assert ours < theirs < shuffled


def test_length_grouped_order_is_deterministic_per_seed_and_epoch():
    from mathtune.data import length_grouped_order

    lengths = list(range(10, 650, 5))
    assert length_grouped_order(lengths, 4, seed=1, epoch=2) == length_grouped_order(lengths, 4, seed=1, epoch=2)
    assert length_grouped_order(lengths, 4, seed=1, epoch=2) != length_grouped_order(lengths, 4, seed=1, epoch=3)
    assert length_grouped_order(lengths, 4, seed=1, epoch=2) != length_grouped_order(lengths, 4, seed=2, epoch=2)
    with pytest.raises(MathtuneError, match="batch_rows must be > 0"):
        length_grouped_order(lengths, 0, seed=1)


def test_row_dataset_follows_the_epoch_it_is_told(tokenizer):
    from mathtune.data import RowDataset, length_grouped_order

    examples = [Example(str(i), "q " * (i % 7 + 1), "a " * (i % 5 + 1) + "#### 1", 1.0) for i in range(30)]
    rows, _ = prepare_examples(examples, tokenizer, max_length=128)
    dataset = RowDataset(rows, batch_rows=4, seed=5)
    lengths = [len(r.input_ids) for r in rows]
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        seen = [dataset[i]["input_ids"] for i in range(len(dataset))]
        assert seen == [rows[i].input_ids for i in length_grouped_order(lengths, 4, seed=5, epoch=epoch)]
    plain = RowDataset(rows)
    assert [plain[i]["input_ids"] for i in range(3)] == [r.input_ids for r in rows[:3]]


# --- mathtune data on the real CLI -------------------------------------------------------------


@pytest.mark.usefixtures("one_thread")
def test_data_command_shows_rows_tokens_and_the_supervised_span(tiny_model_dir, capsys):
    from mathtune.cli import main
    from mathtune.tasks import get_task

    assert main(["data", "--model", str(tiny_model_dir), "--task", "unit-conversion", "--max-samples", "5",
                 "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert f"task unit-conversion (train split), model {tiny_model_dir} (chat template), --max-length 512" in out
    assert "rows: read 5, kept 5, dropped 0" in out
    first = get_task("unit-conversion", seed=42).examples("train")[0]
    assert f"row {first.id}: non-masked labels:" in out
    # the supervised span is exactly the answer (plus the end-of-turn token), the prompt is outside it
    rendered = out.split("supervised span between \u27e6 \u27e7:\n", 1)[1]
    prompt, _, rest = rendered.partition("\u27e6")
    span = rest.partition("\u27e7")[0]
    assert span.startswith(first.answer_text) and first.question not in span
    assert first.question in prompt
    # a bad flag value: one line, exit 2
    assert main(["data", "--model", str(tiny_model_dir), "--task", "unit-conversion", "--max-length", "0"]) == 2
