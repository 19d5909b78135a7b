"""Where a training step or an eval run spends its time, and how much faster it could get at most.

    .venv/bin/python bench/step_profile.py train               # 3 steps of 8 GSM8K rows, mathtune's path
    .venv/bin/python bench/step_profile.py decode              # 128 GSM8K questions, 128 new tokens
    .venv/bin/python bench/step_profile.py prefix              # --shared-prefix on vs off, per batch

The two throughput benches say how fast mathtune is against a hand-written baseline; this one says
why it is not faster. It runs mathtune's own path under ``torch.profiler`` and sorts the self CPU
time of every op into:

  weight matmuls     mm/addmm with a frozen (or, when decoding, any) linear layer's weight
  LoRA matmuls       mm with the LoRA rank as a dimension (the A and B matrices, forward and backward)
  LM head            mm with the vocabulary as a dimension (only at supervised positions when training)
  attention          the score and value bmm's (and SDPA where it runs)
  casts/copies       dtype casts and copies (autocast's bf16 copies of fp32 weights land here), cat, index
  elementwise        every other aten op: adds, muls, norms, softmax, activations, the loss
  autograd/dispatch  non-aten events: autograd's per-node wrappers, record_function scopes
  optimizer          train mode: the optimizer step, profiled on its own
  Python between ops wall time in no op on the main thread: Python, the Trainer, hooks

The matmul lines also give the FLOP/s they ran at (2 x M x K x N per mm, from the recorded shapes)
against a square matmul measured now, so a reader sees whether the matmuls themselves have room.
The last lines are the bound the issue's arithmetic needs: if every op outside the matmuls and the
attention took no time at all, the run would be at most wall / (matmuls + attention) faster than
now; multiply the speed-up a throughput bench measured by that factor for the most any fusion
(torch.compile, custom kernels) could reach without doing fewer FLOPs.

Train mode profiles ``MathtuneTrainer.training_step`` (forward + backward) and then the optimizer
step (the Trainer's own optimizer, once per batch) on batches from mathtune's own dataloader after one unprofiled warm-up step.
Prefix mode measures ``--shared-prefix`` (mathtune/shared_prefix.py) alone: each batch's forward +
backward with the rows' shared leading tokens run once (forced, whatever the threshold says) and
plain, best of 4 per batch, after checking that the gradients agree.
GSM8K rows/questions are read at run time from ../shared/data/gsm8k/train.jsonl (never copied).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench.eval_throughput import load_questions, matmul_peak  # noqa: E402
from bench.train_throughput import parse_settings, read_rows  # noqa: E402
from mathtune.errors import MathtuneError  # noqa: E402
from mathtune.hardware import choose_precision, dtype_of  # noqa: E402
from mathtune.models.spec import DEFAULT_MODEL  # noqa: E402

MATMUL_OPS = {"aten::mm", "aten::addmm"}
ATTENTION_OPS = {"aten::bmm", "aten::baddbmm"}
ATTENTION_PREFIX = "aten::_scaled_dot_product"  # SDPA's kernels, forward and backward
# dtype casts and memory copies: autocast's per-forward copies of fp32 weights into bf16 land here
COPY_OPS = {"aten::copy_", "aten::_to_copy", "aten::clone", "aten::cat", "aten::contiguous", "aten::index",
            "aten::index_put_", "aten::index_select", "aten::_unsafe_view", "aten::fill_", "aten::zero_",
            "aten::zeros", "aten::empty_like", "aten::stack", "aten::masked_select"}
CATEGORIES = ("weight matmuls", "LoRA matmuls", "LM head", "attention", "casts/copies", "elementwise",
              "autograd/dispatch", "optimizer")
# the ones a faster kernel cannot remove without doing fewer FLOPs: the bound's denominator
NEEDED = ("weight matmuls", "LoRA matmuls", "LM head", "attention")
PYTHON = "Python between ops"  # wall time no op was running on the main thread (report() adds it)


def matmul_dims(op: str, shapes: list) -> tuple[int, int, int] | None:
    """(M, K, N) of an mm/addmm from its recorded input shapes (addmm's first input is the bias)."""
    pair = shapes[1:3] if op == "aten::addmm" else shapes[:2]
    if len(pair) != 2 or any(len(s) != 2 for s in pair):
        return None
    (m, k), (_, n) = pair
    return m, k, n


def sort_ops(events, vocab: int, lora_rank: int | None, optimizer_events=()) -> tuple[dict, dict, float]:
    """Self CPU seconds and FLOPs per category, and the total self CPU seconds of every event.

    Every aten op that is not a matmul, attention or a cast/copy is elementwise work (adds, norms,
    softmax, activations, the loss); the non-aten events (autograd's per-node wrappers, the
    dispatcher's record_function scopes) are autograd/dispatch. ``optimizer_events``: a second
    profile, of the optimizer step alone, counted whole as optimizer time.
    """
    seconds, flops = defaultdict(float), defaultdict(float)
    total = 0.0
    for e in events:
        s = e.self_cpu_time_total / 1e6
        total += s
        if e.key in MATMUL_OPS:
            dims = matmul_dims(e.key, e.input_shapes)
            if dims is None:
                kind = "weight matmuls"
            elif vocab in dims:
                kind = "LM head"
            elif lora_rank is not None and lora_rank in dims:
                kind = "LoRA matmuls"
            else:
                kind = "weight matmuls"
            if dims is not None:
                m, k, n = dims
                flops[kind] += 2 * m * k * n * e.count
        elif e.key in ATTENTION_OPS or e.key.startswith(ATTENTION_PREFIX):
            kind = "attention"
        elif e.key in COPY_OPS:
            kind = "casts/copies"
        elif e.key.startswith("aten::"):
            kind = "elementwise"
        else:
            kind = "autograd/dispatch"
        seconds[kind] += s
    for e in optimizer_events:
        s = e.self_cpu_time_total / 1e6
        total += s
        seconds["optimizer"] += s
    return seconds, flops, total


def report(prof, wall: float, vocab: int, lora_rank: int | None, peak: float, dtype: str,
           optimizer_prof=None) -> None:
    opt_events = optimizer_prof.key_averages() if optimizer_prof is not None else ()
    seconds, flops, total = sort_ops(prof.key_averages(group_by_input_shape=True), vocab, lora_rank, opt_events)
    # self CPU time is the main thread's time inside each op (intra-op threads work inside it), so
    # the wall time no op covers is Python, the Trainer and hooks between ops
    seconds[PYTHON] = max(wall - total, 0.0)
    whole = total + seconds[PYTHON]
    print(f"self CPU time of every op: {total:.1f} s over {wall:.1f} s of wall time")
    for kind in (*CATEGORIES, PYTHON):
        rate = (f"; {flops[kind] / seconds[kind] / 1e9:.0f} GFLOP/s = {flops[kind] / seconds[kind] / peak:.0%} "
                f"of the {dtype} peak" if flops[kind] and seconds[kind] else "")
        print(f"  {kind:18s} {seconds[kind]:7.2f} s {seconds[kind] / whole:6.1%}{rate}")
    others = {}
    for e in prof.key_averages():  # by op name: which ops fill the categories a kernel could shrink
        if e.key not in MATMUL_OPS | ATTENTION_OPS and not e.key.startswith(ATTENTION_PREFIX):
            others[e.key] = (e.self_cpu_time_total / 1e6, e.count)
    top = sorted(others.items(), key=lambda item: -item[1][0])[:8]
    print("  largest others:  " + "; ".join(f"{name} {t:.2f} s / {n} calls" for name, (t, n) in top))
    needed = sum(seconds[c] for c in NEEDED)
    print(f"peak      torch.matmul 2048x2048 {dtype}: {peak / 1e9:.0f} GFLOP/s (measured now)")
    print(f"bound     with everything else free, at most {whole / needed:.2f}x faster than now "
          f"(wall / (matmuls + attention) = {whole:.1f} / {needed:.1f} s)")


def training_session(args, task: str, tmp: str):
    """``training.setup`` as ``mathtune train`` runs it, on the first ``--rows`` rows of ``task``, and
    the first ``--steps`` + 1 batches of its dataloader (the first one for warming up)."""
    from mathtune import training
    from mathtune.config import TrainConfig

    if task == "gsm8k":
        train_file = Path(tmp) / "rows.jsonl"
        train_file.write_text("".join(json.dumps(r) + "\n" for r in read_rows(args.rows)))
        data = {"train_file": str(train_file)}
    else:
        data = {"max_samples": args.rows}
    config = TrainConfig.from_flat(model=args.model, task=task, batch_size=args.batch_size, num_epochs=1,
                                   precision=args.precision, output_dir=str(Path(tmp) / "run"), logging_steps=1,
                                   **data, **parse_settings(args.set)).validate()
    session = training.setup(config)
    batches = [b for b, _ in zip(session.trainer.get_train_dataloader(), range(args.steps + 1))]
    if len(batches) < args.steps + 1:
        raise MathtuneError(f"--steps {args.steps}: {args.rows} rows make only {len(batches)} batches; raise --rows")
    return session, batches


def train(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        session, batches = training_session(args, "gsm8k", tmp)
        config, trainer = session.config, session.trainer
        model = trainer.model
        model.train()
        supervised = [int(b["labels"][:, 1:].ne(-100).sum()) for b in batches]
        # Trainer enters the precision's autocast around forward only inside train() (accelerate wraps
        # the model there): outside it, as here, enter it by hand, else a bf16 run profiles fp32 math
        autocast = trainer.accelerator.autocast
        with autocast():
            trainer.training_step(model, batches[0], torch.tensor(supervised[0]))  # warm-up: allocator, oneDNN
        print(f"{args.steps} steps of {args.batch_size} GSM8K rows, {session.precision}, shapes "
              f"{[tuple(b['input_ids'].shape) for b in batches[1:]]}")
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            started = time.perf_counter()
            for batch, n in zip(batches[1:], supervised[1:]):
                with autocast():
                    trainer.training_step(model, batch, torch.tensor(n))
            wall = time.perf_counter() - started
        # the optimizer step, as Trainer runs it once per step (its own profile: counted whole)
        optimizer = trainer.create_optimizer()
        optimizer.step()  # warm-up: creates the moment buffers
        with profile(activities=[ProfilerActivity.CPU]) as optimizer_prof:
            started = time.perf_counter()
            for _ in batches[1:]:
                optimizer.step()
            wall += time.perf_counter() - started
        vocab = model.get_output_embeddings().weight.shape[0]
        print(f"optimizer: {type(optimizer).__name__} ({trainer.args.optim}); base weights "
              f"{'/'.join(sorted({str(p.dtype)[6:] for p in model.parameters() if not p.requires_grad}))}")
        report(prof, wall, vocab, config.lora_r if config.method == "lora" else None,
               matmul_peak(dtype_of(session.precision), 2048), session.precision, optimizer_prof)


def decode(args) -> None:
    from mathtune.config import EVAL_BATCH_SIZE
    from mathtune.generation.engine import Generator
    from mathtune.config import GenerationArgs
    from mathtune.models.load import load_model

    questions, where = load_questions("auto", args.questions)
    precision, _ = choose_precision(args.precision, "cpu")
    loaded = load_model(args.model, dtype=dtype_of(precision))
    settings = GenerationArgs(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size or EVAL_BATCH_SIZE)
    generator = Generator(loaded.model, loaded.tokenizer, settings, progress=False)
    generator(questions[:2], max_new_tokens=2)  # warm-up
    print(f"{where}, {args.max_new_tokens} new tokens, batch {settings.batch_size}, {precision}")
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        started = time.perf_counter()
        out = generator(questions)
        wall = time.perf_counter() - started
    print(f"{out.tokens_generated} tokens generated: {out.tokens_generated / wall:.1f} tok/s under the profiler")
    vocab = loaded.model.get_output_embeddings().weight.shape[0]
    report(prof, wall, vocab, None, matmul_peak(dtype_of(precision), 2048), precision)


def prefix(args) -> None:
    import statistics

    from mathtune.loss import supervised_mask, supervised_only_loss
    from mathtune.shared_prefix import shared_prefix_length, split_off_prefix

    with tempfile.TemporaryDirectory() as tmp:
        session, batches = training_session(args, args.task, tmp)
    batches = batches[1:]  # (the first one is left for warming up, as in train mode)
    model = session.trainer.model
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]

    def step(batch, shared: bool) -> None:
        if shared:
            batch = split_off_prefix(model, batch, shared_prefix_length(
                batch["input_ids"], batch["attention_mask"], batch["labels"]))
        labels = batch.pop("labels")
        with session.trainer.accelerator.autocast():  # the training precision (see train())
            out = model(**batch, logits_to_keep=supervised_mask(labels))
        supervised_only_loss(out, labels).backward()

    grads = []
    for shared in (False, True):
        model.zero_grad()
        step(dict(batches[0]), shared)
        grads.append([p.grad.clone() for p in trainable])
    diff = max((a - b).abs().max().item() for a, b in zip(*grads))
    print(f"{args.task}, batch {args.batch_size}, {session.precision}: shared-prefix gradients differ from the "
          f"plain step's by at most {diff:.1e}")
    for batch in batches:
        times = {False: [], True: []}
        for _ in range(4):
            for shared in (False, True):
                model.zero_grad()
                started = time.perf_counter()
                step(dict(batch), shared)
                times[shared].append(time.perf_counter() - started)
        n = shared_prefix_length(batch["input_ids"], batch["attention_mask"], batch["labels"])
        plain, shared = min(times[False]), min(times[True])
        print(f"  batch of {tuple(batch['input_ids'].shape)}, {n} shared tokens: plain {plain:.2f} s (median "
              f"{statistics.median(times[False]):.2f}), shared {shared:.2f} s (median "
              f"{statistics.median(times[True]):.2f}): {plain / shared:.2f}x")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("train", "decode", "prefix"))
    parser.add_argument("--task", choices=("gsm8k", "unit-conversion"), default="gsm8k", help="prefix mode")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    parser.add_argument("--rows", type=int, default=64, help="train/prefix: training rows (first N)")
    parser.add_argument("--batch-size", type=int, default=None, help="train: 8; decode: eval's default")
    parser.add_argument("--steps", type=int, default=3, help="train/prefix: steps (after one warm-up batch)")
    parser.add_argument("--questions", type=int, default=128, help="decode: GSM8K questions")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="decode")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="train/prefix: a TrainConfig field to change (YAML value), e.g. bf16_frozen_base=false")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for flag, value in (("--rows", args.rows), ("--steps", args.steps), ("--questions", args.questions),
                        ("--max-new-tokens", args.max_new_tokens), ("--batch-size", args.batch_size or 1)):
        if value < 1:
            parser.error(f"{flag} must be >= 1 (got {value})")
    if args.mode in ("train", "prefix"):
        args.batch_size = args.batch_size or 8
        (train if args.mode == "train" else prefix)(args)
    else:
        decode(args)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MathtuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
