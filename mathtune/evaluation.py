"""Evaluation: generate for held-out items, judge each output, write the per-item log and a summary.

Two entry points:

  evaluate_items(examples, generate, judge_rule)   any generator callable (questions -> list of
                                                   completions per question); pure, used by tests
  evaluate_model(spec, config, output_dir)         loads the model, runs the batched Generator,
                                                   caches the generations, writes the files

Scores, as in lm-evaluation-harness's GSM8K task:
  accuracy         flexible extraction (``answers.extract``) of the first sample, judged by the task's rule
  strict_accuracy  only a ``#### N`` line counts (``answers.extract_strict``): the trained format
  answer_rate      fraction of items where any number could be extracted at all
  pass_at_k        (k > 1) fraction of items where at least one of the k samples is right
  maj_at_k         (k > 1) fraction where the most common extracted value (ties: earliest sample) is right
  maj_at, pass_at  (k > 2) the same over the first j samples, j = 2, 4, 8 ... < k: samples are drawn
                   independently, so one k = 8 run also measures maj@4 and pass@4 at no extra cost
  loop_rate        fraction of items whose (first) output repeated a line, an 8+ token span or a <<calculation>> 3 times
                   (``mathtune.loops``; stopped there unless --no-loop-stop)
  calculator_calls calculator calls in the first outputs (``mathtune.calculator``), and how many refused

Files (read by comparison.py and report.py), in ``<output dir>``:

  <model_tag>-<task>.jsonl         one ``judge_item`` record per item: id, question, gold, output (first
                                   sample), outputs, extracted, method, strict_extracted, correct,
                                   strict_correct, answered, majority, output_tokens, loop, calculator_calls
                                   ({"expr", "value"} per call; value null: refused), stop_reason (why the
                                   first output ended: ``generation.settings.STOP_REASONS``), rule (numeric:
                                   the task's number rule; symbolic: math-verify; lm-eval), gold_parsed and
                                   parsed (gold and answer as the rule read them), note (e.g. a timeout)
                                   (+ sample_correct, sample_extracted, majority_correct, sample_loop,
                                   sample_calculator_calls, k > 1) (+ lm_eval_strict, lm_eval_flexible:
                                   lm-eval's filtered strings, under --protocol lm-eval)
  <model_tag>-<task>.summary.json  the metrics above, model (the spec as given), model_dir (its resolved dir,
                                   for local dirs), protocol, generation settings, items_sha, tokens_generated,
                                   seconds, tokens_per_second, per_item_path (see ``evaluate_model``)
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from mathtune import distributed
from mathtune.answers import (LM_EVAL_FALLBACK, judge, judge_answer, lm_eval_exact_match, lm_eval_extract_flexible,
                              lm_eval_extract_strict, parse_number)
from mathtune.atomic import write_files_atomically, write_text_atomically
from mathtune.errors import MathtuneError
from mathtune.config import GenerationArgs
from mathtune.hardware import Placement

# Bumped when the cached payload (generations) changes meaning; part of every cache key.
# 2: adapters are merged into their base before generating (slightly different bf16 numerics).
# 3: entries also hold loop flags and calculator calls per output.
# 4: entries hold the whole Generations record (stop reasons too); keys add threads, processes, peft.
# 5: the loop stop also stops one <<calculation>> repeated 3 times (equation-only outputs stop sooner).
# 6: generation settings are GenerationArgs (protocol inside, seed beside); entries hold token ids.
CACHE_VERSION = 6

# Files in a model dir that decide what it generates: weights, architecture, tokenizer, template.
# Other files in a run dir (metrics.jsonl, eval/, checkpoints) change without changing the model.
_IDENTITY_FILES = (
    "config.json",
    "generation_config.json",
    "adapter_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
_IDENTITY_SUFFIXES = (".safetensors", ".bin", ".gguf", ".safetensors.index.json")


# --------------------------------------------------------------------------- protocols
# How a question becomes a prompt and how an output is scored (``--protocol``):
#   chat     mathtune's own: zero-shot, the model's chat template, ``answers.extract`` / ``extract_strict``
#            judged numerically by the task's rule. Not comparable with published GSM8K numbers.
#   lm-eval  lm-evaluation-harness' gsm8k task (lm_eval/tasks/gsm8k/gsm8k.yaml): 5 shots from the
#            train split, plain "Question: ...\nAnswer:" text, no chat template, stop at "Question:",
#            its regex filters and string exact_match. What published 5-shot GSM8K numbers use.
LM_EVAL_NUM_FEWSHOT = 5  # gsm8k.yaml num_fewshot
LM_EVAL_FEWSHOT_SEED = 1234  # lm_eval.defaults.DEFAULT_OTHER_SEED: simple_evaluate's fewshot_random_seed
LM_EVAL_UNTIL = ("Question:", "</s>", "<|im_end|>")  # gsm8k.yaml generation_kwargs.until (+ the EOS text)
_LM_EVAL_DOC = "Question: {question}\nAnswer:"  # doc_to_text
_LM_EVAL_TARGET_DELIMITER, _LM_EVAL_FEWSHOT_DELIMITER = " ", "\n\n"


def lm_eval_prompts(examples: Sequence, fewshot_pool: Sequence, num_fewshot: int = LM_EVAL_NUM_FEWSHOT,
                    seed: int = LM_EVAL_FEWSHOT_SEED) -> list[str]:
    """lm-eval's gsm8k prompts for ``examples``, shots drawn from ``fewshot_pool`` (the train split).

    lm-eval's default ContextSampler holds one ``random.Random(seed)`` per task and, for each eval
    doc in order, takes ``rnd.sample(train_docs, num_fewshot)`` (the shots come from another split
    than the eval doc, so none is removed). Replaying the same calls on the same pool in the same
    order gives the same shots: item i's shots depend on items 0..i-1 having drawn before it.
    """
    import random

    pool = list(fewshot_pool)
    if len(pool) < num_fewshot:
        raise MathtuneError(f"--protocol lm-eval needs {num_fewshot} few-shot rows from the train split, "
                            f"which has {len(pool)}: pass a larger --train-file")
    rnd = random.Random(seed)
    prompts = []
    for example in examples:
        shots = rnd.sample(pool, num_fewshot)
        context = "".join(_LM_EVAL_DOC.format(question=shot.question) + _LM_EVAL_TARGET_DELIMITER
                          + shot.answer_text + _LM_EVAL_FEWSHOT_DELIMITER for shot in shots)
        prompts.append(context + _LM_EVAL_DOC.format(question=example.question))
    return prompts


def lm_eval_verdict(text: str, reference: str) -> dict:
    """lm-eval's filtered answers of one output (strings, as that harness logs them in
    ``filtered_resps``) and their exact_match against the reference solution."""
    strict, flexible = lm_eval_extract_strict(text), lm_eval_extract_flexible(text)
    return {
        "lm_eval_strict": strict,
        "lm_eval_flexible": flexible,
        "strict_correct": lm_eval_exact_match(strict, reference),
        "correct": lm_eval_exact_match(flexible, reference),
    }


# --------------------------------------------------------------------------- judging


def _finite(value: float | None) -> float | None:
    # A 400-digit "number" parses to inf, which JSON cannot hold and no gold equals: no answer.
    return value if value is not None and math.isfinite(value) else None


def majority_value(values: Sequence[float | None]) -> float | None:
    """Most common non-null value; a tie goes to the value seen first (the earliest sample)."""
    counts = Counter(v for v in values if v is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(v for v in values if v is not None and counts[v] == best)


def judge_item(example, outputs: Sequence[str], judge_rule: str, token_counts: Sequence[int] | None = None,
               loops: Sequence[bool] | None = None, calculator_calls: Sequence[list] | None = None,
               protocol: str = "chat", stop_reasons: Sequence[str] | None = None) -> dict:
    """The per-item log record for one example and its sampled outputs (first = the scored one).

    ``protocol`` "lm-eval": lm-eval's string filters and exact_match decide ``correct`` and
    ``strict_correct`` (``lm_eval_strict`` / ``lm_eval_flexible`` hold the filtered strings);
    ``extracted`` is the flexible string read as a number, for the majority vote and the logs."""
    if protocol == "lm-eval":
        verdicts = [lm_eval_verdict(text, example.answer_text) for text in outputs]
        judged = [(_finite(parse_number(v["lm_eval_flexible"])) if v["lm_eval_flexible"] != LM_EVAL_FALLBACK
                   else None, "lm-eval flexible") for v in verdicts]
        judged = [(value, method if value is not None else "none") for value, method in judged]
        strict_text = verdicts[0]["lm_eval_strict"]
        strict = _finite(parse_number(strict_text)) if strict_text != LM_EVAL_FALLBACK else None
    else:
        verdicts = None
        # answers.judge_answer: the numeric rule for a number gold, math-verify for any other
        judgements = [judge_answer(text, example.gold, judge_rule) for text in outputs]
        judged = [(j.extracted, j.method) for j in judgements]
        strict = judge_answer(outputs[0], example.gold, judge_rule, strict=True).extracted
    first_value, first_method = judged[0]
    record = {
        "id": example.id,
        "question": example.question,
        "gold": example.gold,
        "output": outputs[0],
        "outputs": list(outputs),
        "extracted": first_value,
        "method": first_method,
        "strict_extracted": strict,
        "correct": judge(first_value, example.gold, judge_rule),
        "strict_correct": judge(strict, example.gold, judge_rule),
        "answered": first_value is not None,
    }
    if verdicts is not None:
        record.update(verdicts[0])
        record["answered"] = verdicts[0]["lm_eval_flexible"] != LM_EVAL_FALLBACK
        record["rule"] = "lm-eval"
    else:  # which rule judged, the gold and the answer as it read them, and why a verdict is not its own
        first = judgements[0]
        record.update(rule=first.rule, gold_parsed=first.gold_parsed, parsed=first.parsed, note=first.note)
    values = [value for value, _ in judged]
    record["majority"] = majority_value(values)
    if len(outputs) > 1:
        record["sample_correct"] = ([v["correct"] for v in verdicts] if verdicts is not None
                                    else [judge(v, example.gold, judge_rule) for v in values])
        record["sample_extracted"] = values  # each sample's answer: maj@j over the first j samples
        # per item, so ``mathtune compare --score majority`` can pair maj@k against another log
        record["majority_correct"] = judge(record["majority"], example.gold, judge_rule)
    record.update(_generation_fields(len(outputs), token_counts, loops, calculator_calls, stop_reasons))
    return record


def _generation_fields(k: int, token_counts, loops, calculator_calls, stop_reasons) -> dict:
    """What generating the item's ``k`` outputs did; None where the generator does not report it (a
    plain list of texts)."""
    fields = {
        # all samples' tokens: what the item cost to generate
        "output_tokens": int(sum(token_counts)) if token_counts is not None else None,
        "loop": bool(loops[0]) if loops is not None else None,
        "calculator_calls": list(calculator_calls[0]) if calculator_calls is not None else None,
        "stop_reason": stop_reasons[0] if stop_reasons is not None else None,
    }
    if k > 1 and loops is not None:
        fields["sample_loop"] = [bool(flag) for flag in loops]
    if k > 1 and calculator_calls is not None:
        fields["sample_calculator_calls"] = [list(calls) for calls in calculator_calls]
    return fields


def items_sha(examples) -> str:
    """sha256 of the items' ids and questions: two evals are comparable only when these match."""
    payload = json.dumps([[e.id, e.question] for e in examples], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def metrics(records: Sequence[dict], num_samples: int, judge_rule: str) -> dict:
    """Accuracy figures of judged records (see the module docstring for definitions)."""
    n = len(records)
    if n == 0:
        raise MathtuneError("no items to score: the eval set is empty (check --eval-file / --max-samples)")
    out = {
        "n": n,
        "accuracy": sum(r["correct"] for r in records) / n,
        "strict_accuracy": sum(r["strict_correct"] for r in records) / n,
        "answer_rate": sum(r["answered"] for r in records) / n,
    }
    if num_samples > 1:
        out["k"] = num_samples
        out["pass_at_k"] = sum(any(r["sample_correct"]) for r in records) / n
        out["maj_at_k"] = sum(r["majority_correct"] for r in records) / n
        prefixes = [j for j in (2 ** p for p in range(1, num_samples.bit_length())) if j < num_samples]
        if prefixes:
            out["maj_at"] = {str(j): sum(judge(majority_value(r["sample_extracted"][:j]), r["gold"], judge_rule)
                                         for r in records) / n for j in prefixes}
            out["pass_at"] = {str(j): sum(any(r["sample_correct"][:j]) for r in records) / n for j in prefixes}
        # mean over all n*k samples: a lower-variance estimate of single-sample accuracy
        out["sample_accuracy"] = sum(sum(r["sample_correct"]) for r in records) / (n * num_samples)
    flagged = [r["loop"] for r in records if r.get("loop") is not None]
    out["loop_rate"] = sum(flagged) / n if len(flagged) == n else None
    calls = [c for r in records for c in (r.get("calculator_calls") or [])]
    out["calculator_calls"] = len(calls)
    out["calculator_refused"] = sum(c["value"] is None for c in calls)
    out["methods"] = dict(Counter(r["method"] for r in records).most_common())
    return out


def _check_generations(outputs, n: int, num_samples: int | None) -> int:
    if len(outputs) != n:
        raise MathtuneError(f"the generator returned {len(outputs)} results for {n} questions: it must return one list per question")
    k = len(outputs[0]) if n else 0
    for i, samples in enumerate(outputs):
        if isinstance(samples, str) or not all(isinstance(s, str) for s in samples):
            raise MathtuneError(f"the generator's result {i} is not a list of strings: return list[list[str]]")
        if len(samples) == 0 or len(samples) != k or (num_samples is not None and len(samples) != num_samples):
            want = num_samples if num_samples is not None else k
            raise MathtuneError(f"the generator returned {len(samples)} samples for question {i}, expected {want} for every question")
    return k


def evaluate_items(examples: Sequence, generate: Callable[[list[str]], Sequence[Sequence[str]]], judge_rule: str,
                   *, num_samples: int | None = None) -> tuple[list[dict], dict]:
    """Generate for ``examples`` through ``generate`` and judge: ``(records, metrics)``.

    ``generate(questions) -> list[list[str]]`` returns, per question, its samples (first = scored).
    A ``generate.Generations`` result also carries token counts and timing, which go into the
    metrics (``tokens_generated``, ``seconds``); a plain list leaves them None.
    """
    examples = list(examples)
    if not examples:
        raise MathtuneError("no items to evaluate: the eval set is empty (check --eval-file / --max-samples)")
    start = time.perf_counter()
    outputs = generate([e.question for e in examples])
    wall = time.perf_counter() - start
    return judge_generations(examples, outputs, judge_rule, num_samples=num_samples, wall_seconds=wall)


def judge_generations(examples: Sequence, outputs, judge_rule: str, *, num_samples: int | None = None,
                      wall_seconds: float | None = None, protocol: str = "chat") -> tuple[list[dict], dict]:
    """Judge given generations (e.g. from the cache); see ``evaluate_items``."""
    examples = list(examples)
    k = _check_generations(outputs, len(examples), num_samples)
    counts = getattr(outputs, "token_counts", None)
    loops = getattr(outputs, "loops", None)
    calls = getattr(outputs, "calculator_calls", None)
    reasons = getattr(outputs, "stop_reasons", None)
    records = [
        judge_item(e, samples, judge_rule, counts[i] if counts is not None else None,
                   loops[i] if loops is not None else None, calls[i] if calls is not None else None, protocol,
                   reasons[i] if reasons is not None else None)
        for i, (e, samples) in enumerate(zip(examples, outputs))
    ]
    result = metrics(records, k, judge_rule)
    result["protocol"] = protocol
    seconds = getattr(outputs, "seconds", wall_seconds)
    tokens = sum(r["output_tokens"] for r in records) if counts is not None else None
    result["tokens_generated"] = tokens
    result["seconds"] = round(seconds, 3) if seconds is not None else None
    result["tokens_per_second"] = round(tokens / seconds, 2) if tokens is not None and seconds else None
    return records, result


# --------------------------------------------------------------------------- files


def log_paths(output_dir: str | Path, model_tag: str, task: str) -> tuple[Path, Path]:
    """(per-item JSONL, summary JSON) for a model and task under ``output_dir``."""
    base = Path(output_dir) / f"{model_tag}-{task}"
    return base.with_name(base.name + ".jsonl"), base.with_name(base.name + ".summary.json")


def write_eval_log(output_dir: str | Path, model_tag: str, task: str, records: Sequence[dict], summary: dict) -> tuple[Path, Path]:
    """Write ``<dir>/<model_tag>-<task>.jsonl`` (one record per item) and ``.summary.json``."""
    output_dir = Path(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MathtuneError(f"--output {output_dir}: cannot create the directory ({exc.strerror}); pick a writable path") from exc
    items_path, summary_path = log_paths(output_dir, model_tag, task)
    # allow_nan=False: a NaN would make the file unreadable by strict JSON readers; fail loudly instead
    lines = "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in records)
    summary = dict(summary, per_item_path=str(items_path))
    summary_text = json.dumps(summary, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    # both renamed into place only once both are written: a full disk leaves the earlier pair as it was
    write_files_atomically({items_path: lines, summary_path: summary_text},
                           hint="free space there or pass another --output, and run the eval again")
    return items_path, summary_path


# --------------------------------------------------------------------------- cache


def _file_fingerprints(root: Path) -> list[list]:
    if root.is_file():
        stat = root.stat()
        return [[root.name, stat.st_size, stat.st_mtime_ns]]
    found = []
    for path in sorted(root.iterdir()):
        if path.is_file() and (path.name in _IDENTITY_FILES or path.name.endswith(_IDENTITY_SUFFIXES)):
            stat = path.stat()
            found.append([path.name, stat.st_size, stat.st_mtime_ns])
    return found


def _hub_snapshot(hub_id: str) -> Path | None:
    """The local snapshot dir of a hub model, when its config.json is in the HF cache."""
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(hub_id, "config.json")
    return Path(hit).parent if isinstance(hit, str) else None


def model_identity(spec: str) -> dict | None:
    """What identifies a model's weights without loading them: the spec plus size and mtime of its
    weight, config and tokenizer files (an adapter also names its base's identity). None when the
    weights are not on disk yet (a hub model never downloaded): such a run is not looked up."""
    from mathtune.models.load import read_adapter_base
    from mathtune.models.spec import resolve_model_source

    kind, source = resolve_model_source(spec)
    identity: dict[str, Any] = {"spec": str(spec).strip(), "kind": kind}
    if kind == "hub":
        snapshot = _hub_snapshot(source)
        if snapshot is None:
            return None
        identity["snapshot"] = snapshot.name  # the commit hash of the cached revision
        identity["files"] = _file_fingerprints(snapshot)
    elif kind in ("alias-gguf", "gguf-file"):
        # the converted checkpoint exists only after a first load; the GGUF itself identifies it
        from mathtune.models.spec import bundled_gguf

        gguf = bundled_gguf(spec.strip().lower()) if kind == "alias-gguf" else Path(spec.strip()).expanduser().resolve()
        identity["files"] = _file_fingerprints(gguf)
    else:
        identity["source"] = source
        identity["files"] = _file_fingerprints(Path(source))
        if kind == "adapter":
            base = model_identity(read_adapter_base(Path(source)))
            if base is None:
                return None
            identity["base"] = base
    return identity


def cache_key(identity: dict, task: str, sha: str, settings: GenerationArgs, precision: str, device: str,
              seed: int = 0) -> str:
    # Everything that can change an output: precision, device, library versions and the torch thread
    # count change the float rounding (a near-tie in fp32 flipped between 2 threads and 1), and the
    # number of processes changes the thread count each one gets.
    import peft
    import torch
    import transformers

    material = {
        "versions": [torch.__version__, transformers.__version__, peft.__version__],
        "threads": torch.get_num_threads(),
        "world_size": distributed.world_size(),
        "version": CACHE_VERSION,
        "model": identity,
        "task": task,
        "items_sha": sha,
        "generation": settings.to_dict(),  # the protocol too: prompts differ between protocols
        "seed": seed,
        "precision": precision,
        "device": device.split(":")[0],
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:24]


def _cache_path(key: str) -> Path:
    from mathtune.models.spec import cache_dir

    return cache_dir() / "eval" / f"{key}.json"


def _load_cached(key: str):
    from mathtune.generation.settings import Generations

    path = _cache_path(key)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return Generations.from_dict(data["generations"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MathtuneError(f"eval cache entry {path} is unreadable ({type(exc).__name__}): delete it, or pass --no-cache") from exc


def _store_cached(key: str, outputs, meta: dict) -> None:
    path = _cache_path(key)
    payload = dict(meta, generations=outputs.to_dict())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(path, json.dumps(payload, ensure_ascii=False),
                              hint="free space, set MATHTUNE_CACHE to a disk with room, or pass --no-cache")
    except OSError as exc:
        raise MathtuneError(f"cannot write the eval cache {path} ({exc.strerror}): set MATHTUNE_CACHE to a "
                            f"writable directory") from exc


# --------------------------------------------------------------------------- model evaluation


def default_output_dir(spec: str) -> Path:
    """``<model dir>/eval`` when the spec is a local model/run or adapter dir, else ``./eval``."""
    from mathtune.models.spec import resolve_model_source
    from mathtune.run_dir import RunDir

    kind, source = resolve_model_source(spec)
    if kind in ("local-dir", "adapter"):
        return RunDir(source).eval_dir
    return Path("eval")


def model_dir_of(spec: str) -> str | None:
    """The resolved directory behind a local model dir, run dir or ``checkpoint-N`` spec; None for an
    alias, a hub id or a .gguf file (their spec string alone names them)."""
    from mathtune.models.spec import resolve_model_source

    kind, source = resolve_model_source(spec)
    return source if kind in ("local-dir", "adapter") else None


@dataclass
class EvalPlan:
    """What one evaluation will do, decided before any model loads (``plan_eval``)."""

    spec: str
    config: Any  # EvalConfig
    settings: GenerationArgs  # resolved: calculator decided, lm-eval's stop strings added
    placement: Placement
    task: Any  # tasks.Task
    examples: list
    prompts: list[str] | None  # --protocol lm-eval's few-shot prompts; None: the chat template
    sha: str
    tag: str
    output_dir: Path
    verbose: bool
    progress: bool | None

    @property
    def protocol(self) -> str:
        return self.settings.protocol

    def key(self) -> str | None:
        """The eval cache key (None while the model's weights are not on disk: a hub model not downloaded)."""
        identity = model_identity(self.spec)
        if identity is None:
            return None
        return cache_key(identity, self.config.task, self.sha, self.settings, self.placement.precision,
                         self.placement.device, self.config.seed)


def eval_settings(config) -> GenerationArgs:
    """The config's generation settings, resolved for its task and protocol."""
    settings = config.generation.resolved(config.task)
    if settings.protocol == "lm-eval":
        # lm-eval decodes with neither a calculator nor a loop stop (either would change which number
        # its last-match filter reads); it stops at its `until` strings, which the settings record
        settings = settings.replace(calculator=False, loop_stop=False,
                                    stop=list(dict.fromkeys([*LM_EVAL_UNTIL, *settings.stop])))
    return settings


def plan_eval(spec: str, config, output_dir: str | Path | None, verbose: bool, progress: bool | None) -> EvalPlan:
    """Settings, placement (and, under a launcher, this rank's device), items and prompts."""
    from mathtune.data import take
    from mathtune.models.spec import model_tag
    from mathtune.tasks import task_from_config

    config.validate()
    settings = eval_settings(config)
    placement = Placement.choose(config.device, config.precision)
    # under a launcher: join the process group; each rank generates a share, rank 0 alone prints and writes
    distributed.init(placement.device)
    placement = placement.on(distributed.local_device(placement.device))
    lm_eval = settings.protocol == "lm-eval"
    task = task_from_config(config, train_file=lm_eval)  # the train split only feeds lm-eval's few shots
    examples = take(task.examples("eval"), config.max_samples, "eval")
    if not examples:
        raise MathtuneError("no items to evaluate: the eval split is empty (check --eval-file / --max-samples)")
    if lm_eval and distributed.launched():
        raise MathtuneError("--protocol lm-eval runs in one process: start mathtune eval without torchrun/accelerate")
    prompts = lm_eval_prompts(examples, task.examples("train")) if lm_eval else None
    main = distributed.is_main_process()
    return EvalPlan(spec, config, settings, placement, task, examples, prompts, items_sha(examples), model_tag(spec),
                    Path(output_dir) if output_dir is not None else default_output_dir(spec),
                    verbose and main, progress if main else False)


def cached_generations(plan: EvalPlan, key: str | None):
    """Rank 0 reads the cache and shares what it found: every rank then generates, or none does."""
    if key is None or plan.config.no_cache:
        return None
    return distributed.on_main(lambda: _load_cached(key))


def generate_for(plan: EvalPlan):
    """Load the model on the plan's placement and generate: one process, or whole batches per rank."""
    from mathtune.generation.engine import Generator
    from mathtune.models.load import load_for_inference

    config = plan.config
    loaded = load_for_inference(plan.spec, device=plan.placement.device, precision=plan.placement.precision,
                                trust_remote_code=config.trust_remote_code, allow_pickle=config.allow_pickle)
    generator = Generator(loaded.model, loaded.tokenizer, plan.settings, seed=config.seed, progress=plan.progress)
    if plan.prompts is not None:
        # plain text encoded with the tokenizer's defaults, as lm-eval's hf model does
        return generator.generate_ids([loaded.tokenizer(p)["input_ids"] for p in plan.prompts])
    return generator.generate_sharded([e.question for e in plan.examples])


def judge_plan(plan: EvalPlan, outputs, cached: bool, key: str | None) -> tuple[list[dict], dict]:
    """Per-item records and the summary."""
    records, result = judge_generations(plan.examples, outputs, plan.task.judge_rule,
                                        num_samples=plan.settings.num_samples, protocol=plan.protocol)
    summary = {
        "model": str(plan.spec),
        "model_tag": plan.tag,
        # the absolute dir a local model/run/checkpoint spec named: ``model`` is as typed (relative to
        # the eval's working dir); mathtune report matches a run's checkpoints by this path
        "model_dir": model_dir_of(plan.spec),
        "task": plan.config.task,
        "judge_rule": plan.task.judge_rule if plan.protocol == "chat" else "lm-eval exact_match",
        **result,
        "generation": plan.settings.to_dict(),
        "seed": plan.config.seed,
        "precision": plan.placement.precision,
        "device": plan.placement.device,
        "items_sha": plan.sha,
        "cached": cached,
        "cache_key": key,
    }
    return records, summary


def _announce(plan: EvalPlan, cached: bool) -> None:
    if not plan.verbose:
        return
    placement = plan.placement
    # the precision reason's first clause (the rest describes training's autocast)
    where = ("cached generations (pass --no-cache to generate again)" if cached
             else f"{placement.device} ({placement.device_reason}), {placement.precision} weights "
                  f"({placement.precision_reason.split(':')[0]})")
    from mathtune.models.spec import describe_model

    print(f"evaluating {describe_model(plan.spec)} on {plan.config.task}: {len(plan.examples)} items, {where}",
          file=sys.stderr, flush=True)


def evaluate_model(spec: str, config, output_dir: str | Path | None = None, *, verbose: bool = True,
                   progress: bool | None = None) -> tuple[dict, list[dict]]:
    """Evaluate model ``spec`` on ``config.task``'s eval split: ``(summary, per-item records)``.

    ``config`` is an ``EvalConfig`` (its ``model`` field is ignored in favour of ``spec``). Files go to
    ``output_dir`` (default ``default_output_dir(spec)``). Generations are cached under
    ``models.spec.cache_dir()/eval`` keyed by model identity, task, items, settings and precision, so
    evaluating an unchanged model again only re-judges (``config.no_cache`` forces generation).
    Steps: plan -> (cache | load + generate) -> judge -> write.
    """
    plan = plan_eval(spec, config, output_dir, verbose, progress)
    key = distributed.broadcast_object(plan.key())  # rank 0's files decide (another machine's copy may differ)
    outputs = cached_generations(plan, key)
    cached = outputs is not None
    _announce(plan, cached)
    if outputs is None:
        outputs = generate_for(plan)
        key = key or plan.key()  # a hub model downloaded just now: its identity is known from here on
        # written once, by rank 0 (whose key decides)
        distributed.on_main(lambda: key is not None and _store_cached(
            key, outputs, {"spec": str(spec), "task": config.task, "items_sha": plan.sha}))
    records, summary = judge_plan(plan, outputs, cached, key)
    items_path, summary_path = distributed.on_main(
        lambda: write_eval_log(plan.output_dir, plan.tag, config.task, records, summary))
    summary["per_item_path"] = str(items_path)
    if plan.verbose:
        print(format_summary(summary))
        print(f"per-item log: {items_path}\nsummary:      {summary_path}")
    return summary, records


def protocol_description(protocol: str) -> str:
    """One line saying how the numbers were measured, for every summary a person reads."""
    if protocol == "lm-eval":
        return ("lm-eval: 5-shot 'Question:/Answer:', no chat template, lm-evaluation-harness gsm8k "
                "filters and exact_match (comparable with published lm-eval GSM8K numbers)")
    return ("chat: zero-shot with the chat template, mathtune's extraction (not comparable with "
            "published 5-shot lm-eval numbers; use --protocol lm-eval for those)")


def format_summary(summary: dict) -> str:
    """The headline numbers as a few readable lines."""
    n = summary["n"]
    lines = [
        f"{summary['model']} on {summary['task']} ({n} items, judge {summary['judge_rule']}):",
        f"  protocol         {protocol_description(summary.get('protocol', 'chat'))}",
        f"  accuracy         {summary['accuracy']:.1%}  ({round(summary['accuracy'] * n)}/{n}, flexible extraction)",
        f"  strict accuracy  {summary['strict_accuracy']:.1%}  ('#### N' present and right)",
        f"  answer rate      {summary['answer_rate']:.1%}  (a number could be extracted)",
    ]
    generation = summary.get("generation") or {}
    if summary.get("loop_rate") is not None:
        action = "stopped there" if generation.get("loop_stop", True) else "flagged only, --no-loop-stop"
        lines.append(f"  loop rate        {summary['loop_rate']:.1%}  (output repeated a line or span 3 times; {action})")
    if generation.get("calculator"):
        lines.append(f"  calculator       on: {summary.get('calculator_calls', 0)} calls, "
                     f"{summary.get('calculator_refused', 0)} refused (model's own text kept)")
    if "pass_at_k" in summary:
        k = summary["k"]
        lines.append(f"  pass@{k}           {summary['pass_at_k']:.1%}")
        lines.append(f"  maj@{k}            {summary['maj_at_k']:.1%}")
        for j, value in (summary.get("maj_at") or {}).items():
            lines.append(f"  maj@{j:<2}           {value:.1%}  (first {j} of the {k} samples; "
                         f"pass@{j} {summary['pass_at'][j]:.1%})")
    if summary.get("tokens_per_second"):
        note = " (from the cached run)" if summary.get("cached") else ""
        lines.append(f"  generated {summary['tokens_generated']} tokens in {summary['seconds']:.1f} s = "
                     f"{summary['tokens_per_second']:.0f} tokens/s{note}")
    return "\n".join(lines)
