"""The eval path with a fake generator: every metric and every per-item field, plus the cache."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from mathtune.config import EvalConfig
from mathtune.errors import MathtuneError
from mathtune.evaluation import (
    default_output_dir,
    evaluate_items,
    evaluate_model,
    format_summary,
    items_sha,
    log_paths,
    majority_value,
    write_eval_log,
)
from mathtune.config import GenerationArgs
from mathtune.generation.settings import Generations
from mathtune.tasks import Example

ITEM_FIELDS = {"id", "question", "gold", "output", "outputs", "extracted", "method", "strict_extracted",
               "correct", "strict_correct", "answered", "majority", "output_tokens", "loop", "calculator_calls",
               "stop_reason", "rule", "gold_parsed", "parsed", "note"}
SUMMARY_FIELDS = {"model", "model_tag", "task", "judge_rule", "n", "accuracy", "strict_accuracy", "answer_rate",
                  "generation", "items_sha", "tokens_generated", "seconds", "tokens_per_second", "per_item_path"}

# (gold, model output) -> expected (extracted, method, strict_extracted, correct, strict_correct)
CASES = {
    "right": (42, "6 * 7 = 42\n#### 42", (42.0, "####", 42.0, True, True)),
    "wrong": (42, "6 * 7 = 41\n#### 41", (41.0, "####", 41.0, False, False)),
    "no-number": (5, "I am not sure how to solve this.", (None, "none", None, False, False)),
    "several": (7, "3 + 4 = 7, so she has 7 apples", (7.0, "last_number", None, True, False)),
    "thousands": (1234, "Total: 1,000 + 234\n#### 1,234", (1234.0, "####", 1234.0, True, True)),
    "negative": (-5, "The change is 3 - 8\n#### -5", (-5.0, "####", -5.0, True, True)),
    "decimal": (2.5, "5 / 2\n#### 2.5", (2.5, "####", 2.5, True, True)),
    "dollars": (18, "She earns 9 * 2 = 18. The answer is $18.00.", (18.0, "answer_is", None, True, False)),
    "text-after": (12, "#### 12\nQuestion: what is 99 + 1?\nAnswer: #### 100", (12.0, "####", 12.0, True, True)),
}


def make_examples(cases=CASES):
    return [Example(id=name, question=f"question {name}?", answer_text=f"#### {gold}", gold=float(gold))
            for name, (gold, _, _) in cases.items()]


def fake_generator(outputs_by_question, tokens=None):
    """questions -> list[list[str]] from a dict; with ``tokens``, a Generations with counts."""
    calls = []

    def generate(questions):
        calls.append(list(questions))
        texts = [list(outputs_by_question[q]) for q in questions]
        if tokens is None:
            return texts
        return Generations(texts, [[tokens] * len(t) for t in texts], seconds=2.0)

    generate.calls = calls
    return generate


def test_every_case_through_the_eval_path(tmp_path):
    examples = make_examples()
    outputs = {f"question {name}?": [text] for name, (_, text, _) in CASES.items()}
    records, result = evaluate_items(examples, fake_generator(outputs, tokens=10), "exact")

    for record, (name, (gold, text, expected)) in zip(records, CASES.items()):
        extracted, method, strict, correct, strict_correct = expected
        assert set(record) == ITEM_FIELDS, name
        assert record["id"] == name and record["question"] == f"question {name}?" and record["gold"] == gold
        assert record["output"] == text and record["outputs"] == [text]
        assert record["extracted"] == extracted, name
        assert record["method"] == method, name
        assert record["strict_extracted"] == strict, name
        assert record["correct"] is correct, name
        assert record["strict_correct"] is strict_correct, name
        assert record["answered"] is (extracted is not None), name
        assert record["majority"] == extracted, name
        assert record["output_tokens"] == 10

    n = len(CASES)
    assert result["n"] == n
    assert result["accuracy"] == pytest.approx(7 / n)  # right, several, thousands, negative, decimal, dollars, text-after
    assert result["strict_accuracy"] == pytest.approx(5 / n)  # no '####' in 'several' and 'dollars'
    assert result["answer_rate"] == pytest.approx(8 / n)
    assert "pass_at_k" not in result and "maj_at_k" not in result
    assert result["tokens_generated"] == 10 * n and result["seconds"] == 2.0
    assert result["tokens_per_second"] == pytest.approx(10 * n / 2.0)
    assert result["methods"] == {"####": 6, "none": 1, "last_number": 1, "answer_is": 1}

    # the files: one JSON object per item with exactly these values, and the summary
    summary = {"model": "m", "model_tag": "m", "task": "t", "judge_rule": "exact", **result,
               "generation": {"max_new_tokens": 8}, "items_sha": items_sha(examples)}
    items_path, summary_path = write_eval_log(tmp_path / "eval", "m", "t", records, summary)
    assert (items_path, summary_path) == log_paths(tmp_path / "eval", "m", "t")
    assert items_path.name == "m-t.jsonl" and summary_path.name == "m-t.summary.json"
    lines = items_path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == records
    written = json.loads(summary_path.read_text())
    assert SUMMARY_FIELDS <= set(written)
    assert written["per_item_path"] == str(items_path)
    assert written["accuracy"] == sum(r["correct"] for r in records) / len(records)


def test_judge_rule_of_the_task_is_used():
    examples = [Example("a", "q", "#### 100", 100.0)]
    outputs = {"q": ["#### 104"]}
    exact, _ = evaluate_items(examples, fake_generator(outputs), "exact")
    tolerant, _ = evaluate_items(examples, fake_generator(outputs), "rel_tol=0.05")
    assert exact[0]["correct"] is False and tolerant[0]["correct"] is True


def test_plain_list_generator_has_no_token_counts():
    records, result = evaluate_items(make_examples()[:2], fake_generator({f"question {n}?": [t] for n, (_, t, _) in CASES.items()}), "exact")
    assert records[0]["output_tokens"] is None
    assert result["tokens_generated"] is None and result["tokens_per_second"] is None


def test_empty_item_set_is_an_error():
    never = fake_generator({})
    with pytest.raises(MathtuneError, match="empty"):
        evaluate_items([], never, "exact")
    assert never.calls == []  # refused before generating anything


def test_stop_reason_of_the_first_sample_is_in_the_record():
    examples = make_examples()[:3]
    texts = [["#### 42"], ["1\n1\n1\n"], ["6 * 7 = 4"]]
    reasons = [["end_of_turn"], ["loop"], ["max_new_tokens"]]
    outputs = Generations(texts, [[3], [6], [5]], 1.0, stop_reasons=reasons)
    records, _ = evaluate_items(examples, lambda qs: outputs, "exact")
    assert [r["stop_reason"] for r in records] == ["end_of_turn", "loop", "max_new_tokens"]
    # a plain list of texts says nothing about why an output ended
    records, _ = evaluate_items(examples, lambda qs: texts, "exact")
    assert [r["stop_reason"] for r in records] == [None, None, None]


def test_generator_returning_the_wrong_shape_is_an_error():
    examples = make_examples()[:2]
    with pytest.raises(MathtuneError, match="2 questions"):
        evaluate_items(examples, lambda qs: [["#### 1"]], "exact")
    with pytest.raises(MathtuneError, match="list of strings"):
        evaluate_items(examples, lambda qs: ["#### 1", "#### 2"], "exact")
    with pytest.raises(MathtuneError, match="expected 3"):
        evaluate_items(examples, lambda qs: [["a"], ["b"]], "exact", num_samples=3)


def test_pass_at_k_and_maj_at_k_on_a_fake_sampler():
    golds = {"a": 5, "b": 2, "c": 4, "d": 7}
    samples = {
        "a": ["#### 5", "#### 6", "#### 6"],  # first right; majority 6 wrong
        "b": ["#### 1", "#### 2", "#### 2"],  # first wrong; majority 2 right
        "c": ["no idea", "#### 3", "still no"],  # none right; majority 3 (the only answer)
        "d": ["#### 8", "#### 7", "nothing"],  # tie 8 vs 7: the earliest sample (8) wins
    }
    examples = [Example(k, f"q{k}", f"#### {g}", float(g)) for k, g in golds.items()]
    gen = fake_generator({f"q{k}": v for k, v in samples.items()}, tokens=4)
    records, result = evaluate_items(examples, gen, "exact", num_samples=3)
    by_id = {r["id"]: r for r in records}
    assert by_id["a"]["sample_correct"] == [True, False, False] and by_id["a"]["majority"] == 6.0
    assert by_id["b"]["sample_correct"] == [False, True, True] and by_id["b"]["majority"] == 2.0
    assert by_id["c"]["sample_correct"] == [False, False, False] and by_id["c"]["majority"] == 3.0
    assert by_id["d"]["majority"] == 8.0
    assert by_id["a"]["output"] == "#### 5" and by_id["a"]["outputs"] == samples["a"]
    assert by_id["a"]["output_tokens"] == 12  # all three samples
    assert set(by_id["a"]) == ITEM_FIELDS | {"sample_correct", "sample_extracted", "majority_correct", "sample_loop", "sample_calculator_calls"}
    # the per-item majority verdicts add up to maj@k (what compare --score majority pairs)
    assert [by_id[i]["majority_correct"] for i in "abcd"] == [False, True, False, False]
    assert result["k"] == 3
    assert result["accuracy"] == pytest.approx(1 / 4)  # first sample: only a
    assert result["pass_at_k"] == pytest.approx(3 / 4)  # a, b, d
    assert result["maj_at_k"] == pytest.approx(1 / 4)  # b
    assert result["sample_accuracy"] == pytest.approx(4 / 12)
    assert by_id["c"]["sample_extracted"] == [None, 3.0, None]
    # k = 3: maj@2 and pass@2 over the first two samples come with it
    assert result["maj_at"] == {"2": pytest.approx(1 / 4)}  # a: 5 (tie 5/6, earliest); b: 1 wins the tie
    assert result["pass_at"] == {"2": pytest.approx(3 / 4)}  # a, b, d
    assert "maj@2 " in format_summary(dict(result, n=4, model="m", task="t", judge_rule="exact"))


def test_maj_at_prefixes_are_the_majority_of_the_first_j_samples():
    # 8 samples: the first 4 vote 1,1,2,2 (tie: 1 first) and all 8 vote 2 five times
    examples = [Example("x", "qx", "#### 2", 2.0)]
    votes = ["#### 1", "#### 1", "#### 2", "#### 2", "#### 2", "#### 2", "#### 3", "#### 2"]
    _, result = evaluate_items(examples, fake_generator({"qx": votes}, tokens=2), "exact", num_samples=8)
    assert result["maj_at"] == {"2": 0.0, "4": 0.0}  # 1,1 then 1,1,2,2 (tie, earliest = 1)
    assert result["pass_at"] == {"2": 0.0, "4": 1.0}
    assert result["maj_at_k"] == 1.0 and result["pass_at_k"] == 1.0


def test_majority_value_ignores_missing_answers():
    assert majority_value([None, None]) is None
    assert majority_value([None, 3.0, 4.0, 4.0]) == 4.0
    assert majority_value([2.0, 1.0]) == 2.0


def test_items_sha_depends_on_ids_and_questions():
    a = [Example("1", "q", "#### 1", 1.0)]
    assert items_sha(a) == items_sha([Example("1", "q", "#### 2", 2.0)])
    assert items_sha(a) != items_sha([Example("1", "q?", "#### 1", 1.0)])
    assert items_sha(a) != items_sha([Example("2", "q", "#### 1", 1.0)])


# --------------------------------------------------------------------------- evaluate_model + cache


@pytest.fixture
def counting_generator(monkeypatch, tmp_path):
    """Isolated cache dir; counts real Generator calls (the cache must skip them)."""
    import mathtune.generation.engine

    monkeypatch.setenv("MATHTUNE_CACHE", str(tmp_path / "cache"))
    original = mathtune.generation.engine.Generator.__call__
    calls = []

    def counted(self, questions, **overrides):
        calls.append(len(questions))
        return original(self, questions, **overrides)

    monkeypatch.setattr(mathtune.generation.engine.Generator, "__call__", counted)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # see conftest.one_thread
    yield calls
    torch.set_num_threads(before)


def eval_config(model_dir, **changes):
    base = dict(model=str(model_dir), task="unit-conversion", max_samples=3, max_new_tokens=4,
                batch_size=2, device="cpu", precision="fp32")
    return EvalConfig.from_flat(**{**base, **changes}).validate()


def test_evaluate_model_writes_logs_and_caches(tiny_model_dir, counting_generator, tmp_path, capsys):
    out = tmp_path / "out"
    config = eval_config(tiny_model_dir)
    summary, items = evaluate_model(str(tiny_model_dir), config, out)
    assert counting_generator == [3]
    assert summary["n"] == 3 and len(items) == 3 and summary["cached"] is False
    assert summary["task"] == "unit-conversion" and summary["judge_rule"] == "rel_tol=0.05"
    assert summary["generation"]["max_new_tokens"] == 4 and summary["precision"] == "fp32"
    assert summary["tokens_generated"] == sum(i["output_tokens"] for i in items) > 0
    assert all(0 < i["output_tokens"] <= 4 for i in items)
    items_path, summary_path = log_paths(out, summary["model_tag"], "unit-conversion")
    assert [json.loads(line) for line in items_path.read_text().splitlines()] == items
    assert json.loads(summary_path.read_text())["per_item_path"] == str(items_path) == summary["per_item_path"]
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "strict accuracy" in printed and "answer rate" in printed

    # unchanged model, task, items and settings: nothing is generated again, same results
    again, again_items = evaluate_model(str(tiny_model_dir), config, out)
    assert counting_generator == [3]
    assert again["cached"] is True and again_items == items
    assert again["tokens_generated"] == summary["tokens_generated"]

    # a different generation setting, or --no-cache, generates again
    evaluate_model(str(tiny_model_dir), eval_config(tiny_model_dir, max_new_tokens=5), out)
    assert counting_generator == [3, 3]
    evaluate_model(str(tiny_model_dir), dataclasses.replace(config, no_cache=True), out)
    assert counting_generator == [3, 3, 3]
    # other items miss too
    evaluate_model(str(tiny_model_dir), eval_config(tiny_model_dir, max_samples=2), out)
    assert counting_generator == [3, 3, 3, 2]


def test_changed_weights_miss_the_cache(tmp_path, smol_tokenizer, counting_generator):
    from conftest import build_tiny_model

    model_dir = tmp_path / "run"
    build_tiny_model(smol_tokenizer).save_pretrained(model_dir)
    smol_tokenizer.save_pretrained(model_dir)
    config = eval_config(model_dir, max_samples=2)
    evaluate_model(str(model_dir), config, tmp_path / "out", verbose=False)
    evaluate_model(str(model_dir), config, tmp_path / "out", verbose=False)
    assert counting_generator == [2]
    weights = model_dir / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # "retrained"
    evaluate_model(str(model_dir), config, tmp_path / "out", verbose=False)
    assert counting_generator == [2, 2]


def test_eval_split_bigger_than_asked_is_an_error(tiny_model_dir, counting_generator, tmp_path):
    with pytest.raises(MathtuneError, match="--max-samples"):
        evaluate_model(str(tiny_model_dir), eval_config(tiny_model_dir, max_samples=100000), tmp_path)
    assert counting_generator == []


def test_default_output_dir(tiny_model_dir):
    assert default_output_dir(str(tiny_model_dir)) == tiny_model_dir.resolve() / "eval"
    assert str(default_output_dir("smollm2-135m")) == "eval"


def test_cache_key_and_summary_record_calculator_and_loop_stop():
    """A calculator run and a plain run are different measurements: different cache keys."""
    from mathtune.config import EvalConfig, build_config
    from mathtune.evaluation import cache_key

    identity = {"spec": "m"}
    keys = set()
    for calculator in (None, True, False):
        for loop_stop in (True, False):
            config = build_config(EvalConfig, None, dict(task="unit-conversion", calculator=calculator,
                                                         loop_stop=loop_stop))
            settings = config.generation.resolved(config.task)
            keys.add(cache_key(identity, "unit-conversion", "sha", settings, "fp32", "cpu"))
            assert settings.to_dict()["calculator"] is (calculator is not False) and settings.loop_stop is loop_stop
    assert len(keys) == 4  # unset = on for unit-conversion (annotated targets), so None and True share keys
    assert EvalConfig.from_flat(task="gsm8k").generation.resolved("gsm8k").calculator is True
