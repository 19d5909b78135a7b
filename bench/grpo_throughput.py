"""GRPO questions trained per minute: ``mathtune grpo`` vs stock TRL ``GRPOTrainer`` on the same machine.

    .venv/bin/python bench/grpo_throughput.py                                  # SmolLM2-135M, GSM8K, 8 steps each
    .venv/bin/python bench/grpo_throughput.py --model DIR --task unit-conversion --steps 2 --max-completion-length 16

Both sides train the same model (fp32 master weights, the same fresh LoRA), on the same questions, with the
same G, batch, accumulation, completion length, temperature, learning rate and loss, in the precision
``hardware.choose_precision`` picks, for ``--steps`` optimizer steps:

  mathtune  ``mathtune.training.grpo`` (what ``mathtune grpo`` runs): the rollout sampler on mathtune's CPU
            fast path (one prefill per question group, calculator on for GSM8K), mathtune's callbacks and
            guards (guards off here: the tiny-model runs would stop on "no signal")
  stock     ``trl.GRPOTrainer`` as its docs show it, on its own model: the same weights loaded afresh with
            ``AutoModelForCausalLM.from_pretrained`` (a GGUF alias from the plain dir mathtune converted it
            to, a LoRA run dir merged and saved to a temporary dir first), never the model object mathtune
            trained; the same LoRA settings handed to TRL as ``peft_config``; conversational prompts,
            TRL's own ``model.generate`` (no ``rollout_func``), the same correctness reward, the same
            GRPOConfig values, no mathtune callbacks

questions/min = steps x questions per step / wall minutes of ``trainer.train()`` (model loading excluded).
Prints both, the machine kind and ``speed-up: R×``.
"""

from __future__ import annotations

import argparse
import gc
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


def mathtune_side(args, out: Path):
    """(seconds, how it sampled, the training questions as a dataset): what ``mathtune grpo`` runs."""
    from mathtune.training import grpo

    session = grpo.setup(settings(args, out, "auto"))
    started = time.perf_counter()
    session.trainer.train()
    seconds = time.perf_counter() - started
    how = f"{session.sampler} ({session.sampler_reason}); precision {session.placement.precision}"
    return seconds, how, session.trainer.train_dataset


def plain_model_dir(spec: str, scratch: Path) -> str:
    """A directory (or hub id) ``from_pretrained`` loads with no mathtune code: the model ``spec`` names."""
    from mathtune.models.gguf_cache import ensure_converted
    from mathtune.models.load import load_model
    from mathtune.models.spec import resolve_model_source

    kind, source = resolve_model_source(spec)
    if kind in ("alias-gguf", "gguf-file"):
        return str(ensure_converted(kind, spec, Path(source)))  # the plain HF dir the GGUF was converted to
    if kind == "adapter":  # what mathtune grpo starts from: the run's adapter merged into its base
        loaded = load_model(spec, dtype=torch.float32, merge_adapter=True)
        loaded.model.save_pretrained(scratch)
        loaded.tokenizer.save_pretrained(scratch)
        del loaded
        return str(scratch)
    return source


def stock_side(args, out: Path, dataset) -> float:
    """Stock TRL on a freshly loaded model: nothing of the mathtune side's model, sampler or trainer."""
    import trl
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mathtune.families import lora_target_modules
    from mathtune.tasks import task_from_config
    from mathtune.training import grpo, recipe

    config = settings(args, out, "trl")
    source = plain_model_dir(args.model, out.parent / "stock-model")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)  # fp32 master weights, as ours
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=lora_target_modules(model), task_type="CAUSAL_LM")
    # the same GRPOConfig values as the mathtune side (G, batch, lengths, temperature, loss, lr, precision)
    placement = recipe.setup_placement(config, None)
    grpo_args = grpo._grpo_arguments(trl, config, out, placement, [], [1.0])
    judge_rule = task_from_config(config).judge_rule
    prompts = dataset.map(lambda row: {"prompt": [{"role": "user", "content": row["prompt"]}]})
    trainer = trl.GRPOTrainer(model=model, reward_funcs=[grpo.correctness_reward(judge_rule)], args=grpo_args,
                              train_dataset=prompts, processing_class=tokenizer, peft_config=lora)
    if trainer.rollout_func is not None:
        raise SystemExit("the stock side must sample with TRL's own generation, but a rollout_func is set")
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
        ours, how, dataset = mathtune_side(args, Path(tmp) / "mathtune")
        gc.collect()  # the mathtune side's model and trainer are gone before the stock side loads its own
        theirs = stock_side(args, Path(tmp) / "stock", dataset)
    rate = lambda seconds: args.steps * questions_per_step / (seconds / 60)  # noqa: E731
    print(f"mathtune  {ours:.1f} s: {rate(ours):.2f} questions/min; sampler {how}")
    print(f"stock     {theirs:.1f} s: {rate(theirs):.2f} questions/min (TRL's own generation)")
    print(f"speed-up: {rate(ours) / rate(theirs):.2f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
