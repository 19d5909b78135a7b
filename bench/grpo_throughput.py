"""GRPO questions trained per minute: ``mathtune grpo`` vs stock TRL ``GRPOTrainer`` on the same machine.

    .venv/bin/python bench/grpo_throughput.py                                  # SmolLM2-135M, GSM8K, 8 steps each
    .venv/bin/python bench/grpo_throughput.py --model DIR --task unit-conversion --steps 2 --max-completion-length 16

Both sides train the same model (fp32 master weights, the same fresh LoRA), on the same questions, with the
same G, batch, accumulation, completion length, temperature, learning rate and loss, in the precision
``hardware.choose_precision`` picks, for ``--steps`` optimizer steps:

  mathtune  ``mathtune.training.grpo`` (what ``mathtune grpo`` runs): the rollout sampler on mathtune's CPU
            fast path (one prefill per question group, calculator on for GSM8K), mathtune's callbacks and
            guards (guards off here: the tiny-model runs would stop on "no signal")
  stock     ``trl.GRPOTrainer`` as its docs show it: conversational prompts, its own ``model.generate``,
            the same correctness reward, no mathtune callbacks

questions/min = steps x questions per step / wall minutes of ``trainer.train()`` (model loading excluded).
Prints both, the machine kind and ``speed-up: R×``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from bench.eval_throughput import machine_kind  # noqa: E402
from mathtune.config import build_config  # noqa: E402
from mathtune.grpo_config import GRPOSettings  # noqa: E402
from mathtune.models.spec import DEFAULT_MODEL  # noqa: E402


def settings(args, out: Path, sampler: str) -> GRPOSettings:
    return build_config(GRPOSettings, None, dict(
        model=args.model, task=args.task, train_file=args.train_file, max_samples=args.questions,
        num_generations=args.num_generations, batch_size=args.batch_size, max_steps=args.steps,
        max_completion_length=args.max_completion_length, temperature=args.temperature, precision=args.precision,
        device="cpu", output_dir=str(out), guards=False, sample_every=0, sampler=sampler, seed=0,
        learning_rate=1e-5))


def mathtune_side(args, out: Path) -> tuple[float, str]:
    from mathtune.training import grpo

    session = grpo.setup(settings(args, out, "auto"))
    started = time.perf_counter()
    session.trainer.train()
    seconds = time.perf_counter() - started
    return seconds, f"{session.sampler} ({session.sampler_reason}); precision {session.placement.precision}"


def stock_side(args, out: Path) -> float:
    from trl import GRPOTrainer

    from mathtune.training import grpo

    config = settings(args, out, "trl")
    session = grpo.setup(config)  # the same model, LoRA, questions, precision and GRPOConfig
    dataset = session.trainer.train_dataset.map(lambda row: {"prompt": [{"role": "user", "content": row["prompt"]}]})
    trainer = GRPOTrainer(model=session.model, reward_funcs=[grpo.correctness_reward(session.judge_rule)],
                          args=session.trainer.args, train_dataset=dataset, processing_class=session.tokenizer)
    started = time.perf_counter()
    trainer.train()
    return time.perf_counter() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--task", default="gsm8k")
    parser.add_argument("--train-file", default=None, help="(gsm8k: default ../shared/data/gsm8k/train.jsonl)")
    parser.add_argument("--questions", type=int, default=64, help="training questions to draw from")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-completion-length", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shared = REPO_ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
    if args.task == "gsm8k" and args.train_file is None and shared.is_file():
        args.train_file = str(shared)
    questions_per_step = args.batch_size // args.num_generations
    print(f"machine   {machine_kind()}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs; load avg {os.getloadavg()[0]:.2f}")
    print(f"model {args.model}; task {args.task}; G {args.num_generations}; batch {args.batch_size} "
          f"({questions_per_step} questions per step); max completion {args.max_completion_length}; "
          f"T {args.temperature}; {args.steps} steps each")
    with tempfile.TemporaryDirectory() as tmp:
        ours, how = mathtune_side(args, Path(tmp) / "mathtune")
        theirs = stock_side(args, Path(tmp) / "stock")
    rate = lambda seconds: args.steps * questions_per_step / (seconds / 60)  # noqa: E731
    print(f"mathtune  {ours:.1f} s: {rate(ours):.2f} questions/min; sampler {how}")
    print(f"stock     {theirs:.1f} s: {rate(theirs):.2f} questions/min (TRL's own generation)")
    print(f"speed-up: {rate(ours) / rate(theirs):.2f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
