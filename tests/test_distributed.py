"""Several processes: 2 ranks with gloo on CPU, the tiny model, one thread per process.

Each multi-process test launches ``python -m torch.distributed.run --nproc_per_node 2`` over
tests/dist_worker.py (``python -m mathtune`` plus test hooks) with a hard timeout, so a rank that
hangs in a collective fails the test instead of blocking the suite. The worker records, per rank,
every file it wrote under the run dir and the last step it finished.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mathtune import distributed, training
from mathtune.generation.sharding import shard_plan
from mathtune.run_dir import RunDir
from mathtune.training import recipe
from mathtune.config import EvalConfig, TrainConfig, build_config
from mathtune.errors import MathtuneError, TrainingHalted

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER = REPO_ROOT / "tests" / "dist_worker.py"
LAUNCH_TIMEOUT = 150  # seconds; a healthy launch takes ~20 s on a busy 2-core machine

needs_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with gloo is not available",
)


# --------------------------------------------------------------------------- helpers


def launch(tmp_path, mathtune_args: list[str], *hooks: str, watch: list[Path] = (), env: dict | None = None,
           processes: int = 2, report_name: str = "report"):
    """``processes`` ranks of ``python -m mathtune <mathtune_args>``: (returncode, output, per-rank reports)."""
    report = tmp_path / report_name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
           str(WORKER), "--report", str(report), *[f"--watch={w}" for w in watch], *hooks, "--", *mathtune_args]
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT), TOKENIZERS_PARALLELISM="false",
                    **(env or {}))
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, env=full_env, cwd=tmp_path)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        pytest.fail(f"{processes}-rank launch hung (> {LAUNCH_TIMEOUT} s):\n{out[-3000:]}")
    output = done.stdout + done.stderr
    reports = {}
    for r in range(processes):
        path = report / f"rank{r}.json"
        assert path.is_file(), f"rank {r} wrote no report:\n{output[-4000:]}"
        reports[r] = json.loads(path.read_text())
    return done.returncode, output, reports


def train_args(model_dir, out, *extra) -> list[str]:
    return ["train", "--model", str(model_dir), "--task", "unit-conversion", "--max-samples", "16",
            "--learning-rate", "1e-3", "--warmup-ratio", "0", "--lr-scheduler", "constant", "--lora-dropout", "0",
            "--precision", "fp32", "--device", "cpu", "--seed", "0", "--output-dir", str(out), *extra]


def written(report: dict) -> set[str]:
    return {path for _, path in report["writes"]}


def lora_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "adapter_model.safetensors"))


# --------------------------------------------------------------------------- 2 processes


@needs_gloo
def test_two_ranks_match_one_rank_with_the_global_batch_and_only_rank0_writes(tiny_model_dir, tmp_path, one_thread):
    run = tmp_path / "ddp"
    # random batches, not length-grouped: Trainer's LengthGroupedSampler groups by the PER-DEVICE
    # batch, so 2 x 4 and 1 x 8 would draw different rows into each step
    code, output, reports = launch(
        tmp_path, train_args(tiny_model_dir, run, "--batch-size", "4", "--max-steps", "3", "--save-steps", "2",
                             "--no-group-by-length"),
        watch=[run],
    )
    assert code == 0, output[-4000:]

    # (a) 2 ranks x batch 4 == 1 rank x batch 8 on the same rows (loss over the tokens of all ranks)
    single = build_config(TrainConfig, None, dict(
        model=str(tiny_model_dir), task="unit-conversion", max_samples=16, learning_rate=1e-3, warmup_ratio=0.0,
        lr_scheduler="constant", lora_dropout=0.0, precision="fp32", device="cpu", seed=0,
        output_dir=str(tmp_path / "single"), batch_size=8, max_steps=3, group_by_length=False))
    training.run(training.setup(single))
    two, one = lora_weights(run), lora_weights(tmp_path / "single")
    assert two.keys() == one.keys()
    rel = max(float((two[k] - one[k]).norm() / one[k].norm().clamp_min(1e-12)) for k in one)
    # fp32 rounding of a 4-row and an 8-row matmul differs by CPU kind (oneDNN picks other kernels):
    # 2.5e-5 after 3 Adam steps on an AVX512-BF16 CPU, under 1e-5 on an AVX2-only one. Adam turns
    # near-zero gradient entries into full-size steps, so the bound is relative to the update, not eps
    assert rel <= 1e-4, f"2x4 vs 1x8 LoRA weights differ by {rel:.2e} (relative)"
    moved = max(float(v.abs().max()) for k, v in one.items() if "lora_B" in k)
    assert moved > 0, "lora_B never left zero: the comparison would be vacuous"

    # (e) one writer: rank 1 wrote nothing in the run dir but Trainer's own per-rank RNG state
    # (it creates checkpoint-N for rng_state_1.pth, which torch.save writes from C++, unaudited)
    rank1 = written(reports[1])
    assert all(Path(p).name == "rng_state_1.pth" or Path(p).name.startswith("checkpoint-") for p in rank1), \
        sorted(rank1)
    rank0 = written(reports[0])
    for name in ("metrics.jsonl", "samples.jsonl", "mathtune_config.yaml", "trainer_state.json"):
        assert name in rank0, f"rank 0 did not write {name}"
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3]
    marked = RunDir(run).complete_checkpoints()
    assert [p.name for p in marked] == ["checkpoint-2", "checkpoint-3"]
    assert any(Path(p).parent.name == "checkpoint-2" and Path(p).name == RunDir.CHECKPOINT_MARKER
               for p in rank0), "the completion marker must be rank 0's"
    # rank 1 prints nothing: the start summary appears once
    assert output.count("global batch 4 × 1 × 2 = 8 rows per step") == 1, output[-3000:]


@needs_gloo
def test_nan_on_one_rank_stops_both_at_that_step(tiny_model_dir, tmp_path):
    run = tmp_path / "nan"
    code, output, reports = launch(
        tmp_path, train_args(tiny_model_dir, run, "--batch-size", "4", "--max-steps", "6"),
        "--nan-rank", "1", "--nan-step", "3", watch=[run],
    )
    assert code != 0
    message = "nonfinite_loss at step 3 on rank 1: micro-batch loss nan"
    assert output.count(message) == 1, output[-4000:]  # printed once, by rank 0
    # both ranks closed step 2 and neither applied step 3
    assert reports[0]["last_step"] == reports[1]["last_step"] == 2
    assert not (run / "adapter_model.safetensors").exists(), "a halted run must not save a final model"
    assert [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


@needs_gloo
def test_max_time_is_rank0s_clock_so_both_ranks_stop_after_the_same_step(tiny_model_dir, tmp_path):
    run = tmp_path / "timed"
    # rank 1's clock starts 4 s late and its steps are slower: on its own clock it would stop
    # several steps after rank 0 and wait forever in the next gradient all-reduce
    code, output, reports = launch(
        tmp_path, train_args(tiny_model_dir, run, "--batch-size", "2", "--max-steps", "10000", "--max-time", "5",
                             "--no-guards"),
        "--slow-rank", "1", "--slow-start", "4", "--slow-step", "0.05", watch=[run],
    )
    assert code == 0, output[-4000:]
    steps = reports[0]["last_step"]
    assert steps is not None and steps > 1
    assert reports[1]["last_step"] == steps
    assert "stopped on time" in output
    assert json.loads((run / "trainer_state.json").read_text())["global_step"] == steps


@pytest.fixture
def varied_model_dir(tmp_path, smol_tokenizer):
    """The tiny model with larger random weights: at the default init every greedy output is the
    same run of newlines, which would hide a reordering of items; at std 0.2 all 20 differ."""
    from conftest import build_tiny_model

    model = build_tiny_model(smol_tokenizer)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0, 0.2, generator=generator)
    path = tmp_path / "varied-model"
    model.save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return path


def scripted_rows(tokenizer, examples, plan) -> tuple[dict[int, str], list[dict]]:
    """On each rank, one item of each kind the per-item log must carry through sharding:
    ``calculator`` writes ``<<3*4=`` (the calculator forces ``12>>``), ``loop`` repeats a line until
    the loop stop ends it, ``answer`` writes the gold ``#### N`` and ends its turn. Returns
    ({item index: kind}, the entries for dist_worker's ``--script``)."""
    from mathtune.data import encode_prompt, end_of_turn_token_id, format_prompt

    prompts = [encode_prompt(tokenizer, format_prompt(tokenizer, e.question)) for e in examples]

    def tail(i):  # from the prompt's first token that differs from every other prompt: after any padding
        shared = max(next((n for n, (a, b) in enumerate(zip(prompts[i], other)) if a != b), len(other))
                     for j, other in enumerate(prompts) if j != i)
        return prompts[i][shared:]

    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    kinds, entries = {}, []
    for shard in plan:
        for kind, i in zip(("calculator", "loop", "answer"), (shard[0], shard[len(shard) // 2], shard[-1])):
            gold_line = examples[i].answer_text.splitlines()[-1]  # "#### 8.5"
            script = {"calculator": encode("<<3*4="), "loop": encode("7 km\n") * 6,
                      "answer": encode(gold_line) + [end_of_turn_token_id(tokenizer)]}[kind]
            kinds[i] = kind
            entries.append({"tail": tail(i), "script": script})
    return kinds, entries


@needs_gloo
def test_sharded_eval_equals_single_process_on_every_per_item_field(varied_model_dir, smol_tokenizer, tmp_path,
                                                                    monkeypatch):
    """2 processes vs 1, the same command, 1 thread per process (the same batches and thread count:
    the README's condition for identical outputs), calculator on, rows scripted to call the
    calculator, loop and answer right on both ranks: every field of every per-item record equal."""
    from mathtune.data import encode_prompt, format_prompt, take
    from mathtune.evaluation import log_paths
    from mathtune.models.spec import model_tag
    from mathtune.tasks import task_from_config

    model_dir = varied_model_dir
    n, batch = 20, 4
    config = build_config(EvalConfig, None, dict(model=str(model_dir), task="unit-conversion", max_samples=n))
    examples = take(task_from_config(config).examples("eval"), n, "eval")
    lengths = [len(encode_prompt(smol_tokenizer, format_prompt(smol_tokenizer, e.question))) for e in examples]
    plan = shard_plan(lengths, batch, 2)
    assert all(len(shard) >= 3 for shard in plan)
    kinds, entries = scripted_rows(smol_tokenizer, examples, plan)
    script = tmp_path / "script.json"
    script.write_text(json.dumps(entries))

    cache = tmp_path / "cache"
    monkeypatch.setenv("MATHTUNE_CACHE", str(cache))
    args = ["eval", "--model", str(model_dir), "--task", "unit-conversion", "--max-samples", str(n),
            "--batch-size", str(batch), "--max-new-tokens", "16", "--calculator", "--precision", "fp32",
            "--device", "cpu"]
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    code, output, reports = launch(tmp_path, [*args, "--output", str(sharded)], "--script", str(script),
                                   watch=[sharded, cache], env={"MATHTUNE_CACHE": str(cache)})
    assert code == 0, output[-4000:]
    assert written(reports[1]) == set(), f"rank 1 wrote {sorted(written(reports[1]))}"
    assert len(list((cache / "eval").glob("*.json"))) == 1  # the eval cache, written once
    code, output, _ = launch(tmp_path, [*args, "--no-cache", "--output", str(single)], "--script", str(script),
                             env={"MATHTUNE_CACHE": str(cache)}, processes=1, report_name="report-single")
    assert code == 0, output[-4000:]

    tag = model_tag(str(model_dir))
    two = [json.loads(l) for l in log_paths(sharded, tag, "unit-conversion")[0].read_text().splitlines()]
    one = [json.loads(l) for l in log_paths(single, tag, "unit-conversion")[0].read_text().splitlines()]
    assert len(two) == len(one) == n
    fields = {"id", "question", "gold", "output", "outputs", "extracted", "method", "strict_extracted", "correct",
              "strict_correct", "answered", "majority", "output_tokens", "loop", "calculator_calls", "stop_reason",
              "rule", "gold_parsed", "parsed", "note"}
    for i, (a, b) in enumerate(zip(two, one)):
        assert set(a) == set(b) == fields, i
        differ = sorted(f for f in fields if a[f] != b[f])
        assert not differ, f"item {i} ({kinds.get(i, 'free')}): 2 processes differ in {differ}: " \
                           f"{ {f: (a[f], b[f]) for f in differ} }"

    # the scripted rows really did what they were scripted to (on both ranks), so the comparison
    # above covered non-trivial loop flags, calculator calls, verdicts and stop reasons
    for i, kind in kinds.items():
        record = one[i]
        if kind == "calculator":
            assert record["calculator_calls"] == [{"expr": "3*4", "value": "12"}], record
            assert "<<3*4=12>>" in record["output"]
        elif kind == "loop":
            assert record["loop"] is True and record["stop_reason"] == "loop", record
        else:
            assert record["correct"] and record["strict_correct"] and record["stop_reason"] == "end_of_turn", record
    free = [r for i, r in enumerate(one) if i not in kinds]
    assert len({r["output"] for r in free}) > len(free) // 2, "outputs mostly equal: a reordering would not show"
    assert {r["stop_reason"] for r in one} >= {"loop", "end_of_turn", "max_new_tokens"}

    summaries = [json.loads(log_paths(d, tag, "unit-conversion")[1].read_text()) for d in (sharded, single)]
    for key in ("n", "accuracy", "strict_accuracy", "answer_rate", "items_sha", "tokens_generated", "loop_rate",
                "calculator_calls", "calculator_refused"):
        assert summaries[0][key] == summaries[1][key], key


# --------------------------------------------------------------------------- one process (no launcher)


def test_shard_plan_deals_whole_sorted_batches_round_robin():
    lengths = [5, 1, 4, 2, 3, 9, 7]
    plan = shard_plan(lengths, batch_size=2, ranks=2)
    # sorted by length: items 1,3 | 4,2 | 0,6 | 5  -> rank 0 gets batches 0 and 2, rank 1 batches 1 and 3
    assert plan == [[1, 3, 0, 6], [4, 2, 5]]
    assert sorted(i for shard in plan for i in shard) == list(range(len(lengths)))
    # more ranks than batches: the extra ranks are idle, nothing is lost
    assert shard_plan([1, 2, 3], batch_size=4, ranks=3) == [[0, 1, 2], [], []]


def test_single_process_helpers_are_local():
    assert distributed.world_size() == 1 and distributed.is_main_process() and not distributed.launched()
    assert distributed.on_main(lambda: 42) == 42
    assert distributed.main_clock(3.5) == 3.5
    assert distributed.any_rank(True) and not distributed.any_rank(False)
    assert distributed.local_device("cuda") == "cuda"
    marker = object()
    assert distributed.CollectiveCallback(marker) is marker  # no wrapper without a launcher
    halt = TrainingHalted("nonfinite_loss", "boom", 3)
    with pytest.raises(TrainingHalted) as caught:
        distributed.agree_on_halt(halt)
    assert caught.value is halt


def test_halt_names_its_rank():
    halt = TrainingHalted("nonfinite_loss", "micro-batch loss nan", 3, rank=1)
    assert str(halt) == "nonfinite_loss at step 3 on rank 1: micro-batch loss nan"
    assert halt.reason == "micro-batch loss nan" and halt.rank == 1


def test_start_summary_states_the_global_batch(tiny_model_dir, tmp_path, monkeypatch, one_thread):
    config = build_config(TrainConfig, None, dict(model=str(tiny_model_dir), task="unit-conversion", max_samples=16,
                                                  batch_size=4, gradient_accumulation_steps=2, max_steps=2,
                                                  precision="fp32", device="cpu", guards=False,
                                                  output_dir=str(tmp_path / "run")))
    session = training.setup(config)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    summary = training.start_summary(session)
    assert "4 batch × 2 accumulation × 2 processes" in summary
    assert "global batch 4 × 2 × 2 = 16 rows per step" in summary
    assert "checkpoints: final model only" in summary  # save_steps 0
    # save_total_limit null in a YAML (Trainer: never delete) reads "keep all", not "keep None"
    resolved = session.config  # setup resolved the LoRA target modules
    session.config = dict_replace(resolved, save_steps=60, save_total_limit=None)
    assert "checkpoints: every 60 steps (keep all)" in training.start_summary(session)
    session.config = dict_replace(resolved, save_steps=60, save_total_limit=2)
    assert "checkpoints: every 60 steps (keep the last 2)" in training.start_summary(session)
    # 16 rows, batch 4 -> 4 micro-batches, 2 per rank, 1 step per epoch at accumulation 2
    assert recipe._planned_steps(dict_replace(config, max_steps=-1, num_epochs=1), 16, 2) == 1
    assert recipe._planned_steps(dict_replace(config, max_steps=-1, num_epochs=1), 16, 1) == 2


def dict_replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


# --------------------------------------------------------------------------- launcher configs


ACCELERATE_CONFIGS = REPO_ROOT / "configs" / "accelerate"


@pytest.mark.parametrize("name,kind", [("ddp", "multi_gpu"), ("fsdp", "use_fsdp"), ("deepspeed-zero2", "use_deepspeed")])
def test_launcher_config_loads_as_accelerate_reads_it(name, kind):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    path = ACCELERATE_CONFIGS / f"{name}.yaml"
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# ") and any(f"--config_file configs/accelerate/{name}.yaml" in l for l in lines[:12]), \
        "a launcher config opens with the command that uses it"
    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "mathtune", "train"])
    args, _, _ = _validate_launch_command(args)
    assert getattr(args, kind) is True and args.num_processes == 2
    if name == "fsdp":
        from accelerate.utils import FullyShardedDataParallelPlugin, patch_environment
        from accelerate.utils.launch import prepare_multi_gpu_env

        env = {k: v for k, v in prepare_multi_gpu_env(args).items() if k.startswith(("FSDP_", "ACCELERATE_"))}
        with patch_environment(**env):
            plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2 and plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]


def test_deepspeed_launch_without_deepspeed_is_a_one_line_error(monkeypatch):
    from accelerate.utils import is_deepspeed_available

    if is_deepspeed_available():
        pytest.skip("deepspeed is installed")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(MathtuneError, match=r"pip install 'mathtune\[deepspeed\]'"):
        distributed.check_deepspeed()
