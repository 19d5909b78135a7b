"""Greedy decoding on one device: mathtune's generation path vs transformers' ``generate_batch``.

    .venv/bin/python bench/gpu_generate_compare.py                 # CUDA, 1,319 GSM8K questions
    .venv/bin/python bench/gpu_generate_compare.py --dry-run       # CPU, 8 questions, 16 tokens

Both sides decode the same token ids (mathtune's own prompt formatting) greedily with the same
max_new_tokens and the same end-of-turn stop; the calculator and the loop stop are off so that the
two do the same work. transformers' ``generate_batch`` is its continuous-batching engine (paged KV
cache, requests join and leave the batch every step), the candidate for mathtune's CUDA default.
Whichever side gives more generated tokens per second on the GPU should become mathtune's CUDA
default; the script prints both, the ratio and how many outputs agree token for token.

GSM8K questions are read at run time from ../shared/data/gsm8k/train.jsonl (its first rows; never
copied into the repo); without that file the unit-conversion eval split stands in.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing

import torch  # noqa: E402

from mathtune.errors import MathtuneError  # noqa: E402

SHARED_GSM8K = REPO_ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"


def questions(n: int) -> tuple[list[str], str]:
    if SHARED_GSM8K.is_file():
        with SHARED_GSM8K.open(encoding="utf-8") as f:
            rows = [json.loads(line)["question"] for line, _ in zip(f, range(n))]
        return rows, f"GSM8K train.jsonl (first {len(rows)})"
    from mathtune.tasks import get_task

    rows = [e.question for e in get_task("unit-conversion").examples("eval")[:n]]
    return rows, f"unit-conversion eval split (first {len(rows)}; GSM8K file not found)"


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--items", type=int, default=1319)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=None, help="mathtune's rows per batch (default: its own)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--dry-run", action="store_true", help="CPU, fp32, 8 items, 16 tokens: checks the script runs")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.device, args.precision, args.items, args.max_new_tokens = "cpu", "fp32", 8, 16
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise MathtuneError("--device cuda: no CUDA device visible; use --dry-run on a CPU")

    from transformers import GenerationConfig

    from mathtune.data import encode_prompt, end_of_turn_token_id, format_prompt
    from mathtune.generation.engine import generate
    from mathtune.config import GenerationArgs
    from mathtune.models.load import load_for_inference

    loaded = load_for_inference(args.model, device=args.device, precision=args.precision)
    model, tokenizer = loaded.model, loaded.tokenizer
    texts, where = questions(args.items)
    ids = [encode_prompt(tokenizer, format_prompt(tokenizer, q)) for q in texts]
    eot = end_of_turn_token_id(tokenizer)
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    print(f"{len(texts)} prompts from {where}; {args.model} in {args.precision} on {device_name}; "
          f"greedy, max_new_tokens {args.max_new_tokens}", flush=True)

    # mathtune: what `mathtune eval` runs (calculator and loop stop off: the same work as the other side)
    settings = GenerationArgs(max_new_tokens=args.max_new_tokens, calculator=False, loop_stop=False)
    if args.batch_size:
        settings = settings.replace(batch_size=args.batch_size)
    synchronize(args.device)
    start = time.perf_counter()
    ours = generate(model, tokenizer, texts, settings, progress=False)
    synchronize(args.device)
    ours_seconds = time.perf_counter() - start
    ours_tokens = ours.tokens_generated

    # transformers' continuous batching
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=False, eos_token_id=eot,
                              pad_token_id=tokenizer.pad_token_id)
    synchronize(args.device)
    start = time.perf_counter()
    outputs = model.generate_batch(inputs=ids, generation_config=config)
    synchronize(args.device)
    theirs_seconds = time.perf_counter() - start
    by_request = sorted(outputs.values(), key=lambda out: int(str(out.request_id).rsplit("_", 1)[-1]))
    theirs_ids = [list(out.generated_tokens) for out in by_request]
    theirs_tokens = sum(len(t) for t in theirs_ids)

    theirs_texts = [tokenizer.decode([t for t in row if t != eot], skip_special_tokens=True) for row in theirs_ids]
    same = sum(a[0] == b for a, b in zip(ours, theirs_texts))
    result = {
        "device": device_name, "precision": args.precision, "items": len(texts),
        "mathtune_tok_s": round(ours_tokens / ours_seconds, 1), "mathtune_seconds": round(ours_seconds, 1),
        "generate_batch_tok_s": round(theirs_tokens / theirs_seconds, 1),
        "generate_batch_seconds": round(theirs_seconds, 1),
        "mathtune_over_generate_batch": round((ours_tokens / ours_seconds) / (theirs_tokens / theirs_seconds), 2),
        "same_text": f"{same}/{len(texts)}",
    }
    print(json.dumps(result), flush=True)
    faster = "mathtune" if result["mathtune_over_generate_batch"] >= 1 else "generate_batch"
    print(f"faster on {device_name}: {faster}", flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MathtuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
