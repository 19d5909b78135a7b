"""``--protocol lm-eval`` against the real lm-evaluation-harness.

The rules are checked against lm-eval's own filter and metric objects, and one end-to-end test runs
the ``lm-eval`` CLI (``--model hf``, a task YAML made from the installed gsm8k.yaml over local JSONL
files) and ``mathtune.evaluate_model(protocol="lm-eval")`` on the same tiny model and items: the
generations, the filtered answers (lm-eval's ``filtered_resps``) and the exact_match flags must agree
item by item. The tiny model is first trained for a few steps on ``#### N`` solutions, so that its
outputs contain numbers and the extraction has something to extract.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

lm_eval = pytest.importorskip("lm_eval")

from mathtune.answers import (  # noqa: E402
    LM_EVAL_FLEXIBLE_PATTERN,
    LM_EVAL_STRICT_PATTERN,
    lm_eval_exact_match,
    lm_eval_extract_flexible,
    lm_eval_extract_strict,
)

from tests.conftest import build_tiny_model  # noqa: E402

RESPONSES = [
    "She pays 3 * 4 = $12.\n#### 12",
    "#### 1,234.50 and then #### 7",
    "The answer is -5. Next 3.",
    "no digits here",
    "x 7",
    "costs $18.00.",
    "#### -3\n#### 9",
    "1.2.3 and 45",
]


def test_extraction_equals_lm_eval_filters():
    from lm_eval.filters.extraction import RegexFilter

    strict = RegexFilter(regex_pattern=LM_EVAL_STRICT_PATTERN)
    flexible = RegexFilter(regex_pattern=LM_EVAL_FLEXIBLE_PATTERN, group_select=-1)
    theirs_strict = [r[0] for r in strict.apply([[r] for r in RESPONSES], None)]
    theirs_flexible = [r[0] for r in flexible.apply([[r] for r in RESPONSES], None)]
    assert [lm_eval_extract_strict(r) for r in RESPONSES] == theirs_strict
    assert [lm_eval_extract_flexible(r) for r in RESPONSES] == theirs_flexible
    assert "[invalid]" in theirs_strict and "12" in theirs_strict  # both branches exercised


def test_exact_match_equals_lm_eval_metric():
    from lm_eval.api.metrics import exact_match_hf_evaluate

    gsm = yaml.safe_load(Path(lm_eval.__file__).with_name("tasks").joinpath("gsm8k", "gsm8k.yaml").read_text())
    options = {k: v for k, v in gsm["metric_list"][0].items() if k not in ("metric", "aggregation", "higher_is_better")}
    reference = "He buys 2 at $6 = <<2*6=12>>12 dollars.\n#### 1,200"
    for prediction in ["1200", "1,200", "$1,200.", "1200.0", "#### 1200", "[invalid]", "12"]:
        theirs = exact_match_hf_evaluate(predictions=[prediction], references=[reference], **options)["exact_match"]
        assert lm_eval_exact_match(prediction, reference) == bool(theirs), prediction


def _rows(count: int, offset: int) -> list[dict]:
    rows = []
    for i in range(count):
        a, b = 2 + (i + offset) % 5, 3 + (i + offset) % 4
        rows.append({"question": f"Tom has {a} boxes of {b} pens. How many pens?",
                     "answer": f"{a} * {b} = <<{a}*{b}={a * b}>>{a * b} pens.\n#### {a * b}"})
    return rows


@pytest.fixture(scope="module")
def trained_tiny_dir(tmp_path_factory, smol_tokenizer):
    """A tiny model trained ~80 steps on 'Question: ...\\nAnswer: ... #### N' text: its greedy outputs
    contain digits and '####', and its logits are peaked enough that greedy decoding does not hinge on
    float noise between two harnesses."""
    model = build_tiny_model(smol_tokenizer, hidden=64)
    texts = [f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in _rows(24, 0)]
    ids = smol_tokenizer("".join(texts), return_tensors="pt")["input_ids"][:, :512]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    torch.manual_seed(0)
    for _ in range(80):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    path = tmp_path_factory.mktemp("lm-eval-tiny")
    model.save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return path


def test_protocol_lm_eval_equals_lm_evaluation_harness(trained_tiny_dir, tmp_path, one_thread):
    from mathtune.config import EvalConfig, build_config
    from mathtune.evaluation import evaluate_model

    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in _rows(12, 0)))
    test.write_text("".join(json.dumps(r) + "\n" for r in _rows(6, 30)))
    max_new = 40

    # lm-eval's own gsm8k task definition, pointed at the local files
    gsm = yaml.safe_load(Path(lm_eval.__file__).with_name("tasks").joinpath("gsm8k", "gsm8k.yaml").read_text())
    gsm.pop("tag", None)
    gsm.update(task="mathtune_gsm8k_local", dataset_path="json", dataset_name=None,
               dataset_kwargs={"data_files": {"train": str(train), "test": str(test)}})
    gsm["generation_kwargs"]["max_gen_toks"] = max_new
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    (tasks_dir / "local.yaml").write_text(yaml.safe_dump(gsm))
    out = tmp_path / "lm-eval-out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", HF_DATASETS_CACHE=str(tmp_path / "ds-cache"))
    command = [sys.executable, "-m", "lm_eval", "run", "--model", "hf",
               "--model_args", f"pretrained={trained_tiny_dir},dtype=float32",
               "--tasks", "mathtune_gsm8k_local", "--include_path", str(tasks_dir), "--device", "cpu",
               "--batch_size", "1", "--log_samples", "--output_path", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    sample_files = list(out.rglob("samples_mathtune_gsm8k_local_*.jsonl"))
    assert len(sample_files) == 1, list(out.rglob("*"))
    theirs = [json.loads(line) for line in sample_files[0].read_text().splitlines() if line.strip()]
    by_filter = {}
    for sample in theirs:
        by_filter.setdefault(sample["filter"], {})[sample["doc_id"]] = sample

    config = build_config(EvalConfig, None, dict(
        model=str(trained_tiny_dir), task="gsm8k", train_file=str(train), eval_file=str(test), protocol="lm-eval",
        max_samples=-1, max_new_tokens=max_new, precision="fp32", device="cpu", no_cache=True))
    summary, records = evaluate_model(str(trained_tiny_dir), config, tmp_path / "mathtune-out", verbose=False)

    assert summary["protocol"] == "lm-eval" and len(records) == 6
    strict, flexible = by_filter["strict-match"], by_filter["flexible-extract"]
    for i, record in enumerate(records):
        assert record["output"] == strict[i]["resps"][0][0]  # same prompt, same greedy generation
        assert record["lm_eval_strict"] == strict[i]["filtered_resps"][0]
        assert record["lm_eval_flexible"] == flexible[i]["filtered_resps"][0]
        assert record["strict_correct"] == bool(strict[i]["exact_match"])
        assert record["correct"] == bool(flexible[i]["exact_match"])
    # the case where extraction matters: some outputs have a number to extract
    assert any(r["lm_eval_flexible"] != "[invalid]" for r in records)
    assert any(r["lm_eval_strict"] != "[invalid]" for r in records)
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["mathtune_gsm8k_local"]
    assert summary["strict_accuracy"] == pytest.approx(results["exact_match,strict-match"])
    assert summary["accuracy"] == pytest.approx(results["exact_match,flexible-extract"])
