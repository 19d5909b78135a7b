"""Training attention by batch length: plain matmul + softmax ("eager") vs torch's SDPA, forward + backward.

    .venv/bin/python bench/attention_kernels.py                      # bf16 and fp32, 230 ... 1024 tokens
    .venv/bin/python bench/attention_kernels.py --lengths 384 467 --precisions bf16
    .venv/bin/python bench/attention_kernels.py --training-step --precisions bf16 --lengths 300 467 800

The threshold in mathtune/training/attention.py (SDPA_FROM_TOKENS) comes from these tables.

Layer mode (default): one layer of SmolLM2-135M's attention (9 query heads, 3 key/value heads of 64
dims, as transformers' Llama runs it:
``repeat_kv``, an additive float mask, the softmax in fp32), a batch of 8 rows padded to T tokens (one
row left-padded by a third), both kernels on the same tensors, best of a few repeats. Printed per T:
both times, SDPA's speed-up over eager, the time 30 layers would save per step, and the largest
difference between the two outputs (the kernels round differently, never more).

--training-step: what a run pays. ``mathtune train``'s own step (training.setup: the bundled model, LoRA
r16, batch 8, the precision asked for; forward + backward, no optimizer step) on one batch of 8 long
rows, each three consecutive GSM8K training rows joined (questions, then the first two answers' working
and the third's answer), cut to the first T tokens, SDPA then eager at each T. Needs
../shared/data/gsm8k/train.jsonl (read at run time). Eager needed more than 24 GiB at 934 tokens in bf16
and at 800 in fp32 (killed for memory): leave those lengths out on such a machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers.models.llama.modeling_llama import repeat_kv  # noqa: E402

from bench.eval_throughput import machine_kind  # noqa: E402

HEADS, KV_HEADS, DIM, LAYERS = 9, 3, 64, 30  # SmolLM2-135M


def eager(query, key, value, mask):
    """transformers' eager_attention_forward for Llama, without dropout."""
    key, value = repeat_kv(key, HEADS // KV_HEADS), repeat_kv(value, HEADS // KV_HEADS)
    scores = torch.matmul(query, key.transpose(2, 3)) * DIM ** -0.5 + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous()


def sdpa(query, key, value, mask):
    """transformers' sdpa_attention_forward for Llama: the same mask, handed to torch's kernel."""
    key, value = repeat_kv(key, HEADS // KV_HEADS), repeat_kv(value, HEADS // KV_HEADS)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=DIM ** -0.5)
    return out.transpose(1, 2).contiguous()


def padded_causal_mask(rows: int, length: int, dtype) -> torch.Tensor:
    """Additive mask: causal, the first row left-padded by a third (a padding query sees itself)."""
    allowed = torch.ones(length, length, dtype=torch.bool).tril()[None, None].repeat(rows, 1, 1, 1)
    allowed[0, :, :, : length // 3] = False
    allowed |= torch.eye(length, dtype=torch.bool)
    return torch.zeros(rows, 1, length, length, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def forward_backward_seconds(kernel, tensors, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        kernel(*tensors).float().sum().backward()
        best = min(best, time.perf_counter() - started)
    return best


def long_rows(count: int = 8) -> list[dict]:
    """``count`` rows of three GSM8K training rows each: ~600-930 tokens with the chat template."""
    from bench.train_throughput import read_rows

    raw = read_rows(3 * count)
    rows = []
    for first in range(0, 3 * count, 3):
        group = raw[first:first + 3]
        working = "\n".join(row["answer"].split("####")[0].strip() for row in group[:-1])
        rows.append({"question": " ".join(row["question"] for row in group) + " Answer the last question.",
                     "answer": working + "\n" + group[-1]["answer"]})
    return rows


def training_step_seconds(precision: str, lengths: list[int], rows: int) -> None:
    """Forward + backward of mathtune's training step on the same long rows cut to each length."""
    import json
    import tempfile

    from mathtune import training
    from mathtune.config import TrainConfig

    with tempfile.TemporaryDirectory() as tmp:
        train_file = Path(tmp) / "rows.jsonl"
        train_file.write_text("".join(json.dumps(row) + "\n" for row in long_rows(rows)))
        config = TrainConfig(model="smollm2-135m", task="gsm8k", train_file=str(train_file), batch_size=rows,
                             num_epochs=1, output_dir=str(Path(tmp) / "run"), seed=0, max_length=1024,
                             precision=precision).validate()
        session = training.setup(config)
        trainer, base = session.trainer, session.model.get_base_model()
        if trainer.attention is not None:
            trainer.attention.switchable = False  # the kernel set below stays for the step
        batches = list(trainer.get_train_dataloader())  # CPU tensors, where the model is
        longest = max(batches, key=lambda batch: batch["input_ids"].shape[1])
        width = longest["input_ids"].shape[1]
        print(f"{precision}: {rows} rows padded to {width} tokens ({int(longest['attention_mask'].sum())} real)")
        trainer.model.train()
        for length in [length for length in lengths if length <= width]:
            batch = {name: tensor[:, :length] for name, tensor in longest.items()}
            seconds = {}
            for kernel in ("sdpa", "eager"):
                base.set_attn_implementation(kernel)
                started = time.perf_counter()
                with trainer.accelerator.autocast():
                    loss = trainer.compute_loss(trainer.model, batch)
                loss.backward()
                trainer.model.zero_grad(set_to_none=True)
                seconds[kernel] = time.perf_counter() - started
            print(f"{precision:5s} T {length:5d}: training step eager {seconds['eager']:.2f} s, sdpa "
                  f"{seconds['sdpa']:.2f} s; sdpa {seconds['eager'] / seconds['sdpa']:.2f}x", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[230, 300, 384, 467, 640, 1024])
    parser.add_argument("--precisions", nargs="+", choices=("bf16", "fp32"), default=["bf16", "fp32"])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--training-step", action="store_true",
                        help="time mathtune's training step on long GSM8K rows instead of one layer")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.training_step:
        print(f"machine   {machine_kind()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
        for precision in args.precisions:
            training_step_seconds(precision, args.lengths, args.rows)
        return 0
    print(f"machine   {machine_kind()}; torch {torch.__version__}, {torch.get_num_threads()} threads; one attention "
          f"layer, {args.rows} rows, {HEADS} heads / {KV_HEADS} kv heads of {DIM}, forward + backward")
    for precision in args.precisions:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        for length in args.lengths:
            generator = torch.Generator().manual_seed(length)
            shapes = [(args.rows, heads, length, DIM) for heads in (HEADS, KV_HEADS, KV_HEADS)]  # query, key, value
            tensors = [torch.randn(*shape, generator=generator, dtype=dtype).requires_grad_() for shape in shapes]
            tensors.append(padded_causal_mask(args.rows, length, dtype))
            repeats = 3 if length > 600 else 5
            seconds = {name: forward_backward_seconds(kernel, tensors, repeats) for name, kernel in
                       (("eager", eager), ("sdpa", sdpa))}
            with torch.no_grad():
                difference = (eager(*tensors).float() - sdpa(*tensors).float()).abs().max().item()
            print(f"{precision:5s} T {length:5d}: eager {seconds['eager'] * 1e3:7.1f} ms, "
                  f"sdpa {seconds['sdpa'] * 1e3:7.1f} ms per layer; sdpa {seconds['eager'] / seconds['sdpa']:.2f}x; {LAYERS} layers: "
                  f"{LAYERS * (seconds['eager'] - seconds['sdpa']):+.2f} s per step with sdpa; "
                  f"outputs differ by {difference:.2g}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
