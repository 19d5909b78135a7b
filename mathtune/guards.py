"""Guards: training that cannot fail silently.

Two layers, both raising ``TrainingHalted(check, message, step)`` whose message names the likely
cause and the fix:

``preflight``        runs once, before the first optimizer step: the rows, the labels, the precision,
                     the trainable parameters, the Trainer's ``label_names`` and one real
                     forward+backward. Each check is one ``CheckResult`` (name, passed, measured value),
                     the rows of ``mathtune doctor``'s table.
``guard_callbacks``  ``TrainerCallback``s that watch every optimizer step. The numeric guard runs in
                     ``on_pre_optimizer_step``, i.e. after backward and clipping but BEFORE
                     ``optimizer.step()``: bf16 and fp32 have no loss scaler, so a NaN gradient let
                     through goes straight into the weights, and every later checkpoint is poisoned.
                     The collapse detector generates from fixed prompts every ``sample_every`` steps and
                     stops a run whose outputs have degenerated (``!!!!``, empty, all identical).

Cost: the numeric guard is one norm over the trainable gradients and one read of the step's
losses per optimizer step; the collapse check is a short batched greedy generation every
``sample_every`` steps. ``bench/guard_overhead.py`` measures both against ``--no-guards``.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import TrainerCallback

from mathtune import compilation
from mathtune.config import GenerationArgs
from mathtune.data import IGNORE_INDEX, encode_prompt, format_prompt
from mathtune.errors import MathtuneError, TrainingHalted
from mathtune.hardware import dtype_of
from mathtune.run_dir import RunDir
from mathtune.step_stats import StepStats

# Collapse detector: short generations are enough to see "!!!!", empty or identical answers, and
# generation is the guards' one costly part (see bench/guard_overhead.py).
SAMPLE_NEW_TOKENS = 32
# A repeated single token shorter than this is a plausible answer ("5", "00"); longer is a loop.
REPEAT_MIN_TOKENS = 4
# One flagged check can be a bad moment; two in a row is a trend worth stopping for.
COLLAPSE_CHECKS_IN_A_ROW = 2
# fp16 + GradScaler: the scaler starts at 2**16 and halves on every overflow, skipping that step.
# A few skips while it calibrates are normal; this many in a row means gradients overflow at any scale.
SCALER_MAX_CONSECUTIVE_SKIPS = 10
# Below this scale the scaled loss is smaller than the loss itself: the scaler cannot help any more.
SCALER_MIN_SCALE = 1.0

PRE_SHIFT_MESSAGE = (
    "labels are pre-shifted by one; the model shifts them itself: pass unshifted labels "
    "(a known cause of !!!! output)"
)
LABEL_NAMES_MESSAGE = (
    "PEFT models hide the forward signature, so Trainer ignores the labels: set label_names=['labels']"
)
FP16_MESSAGE = "fp16 overflow: use --precision bf16 or fp32"
ZERO_SUPERVISED_MESSAGE = (
    "every label is -100: answers truncated away or prompts not masked correctly: raise --max-length, "
    "run `mathtune data`"
)


@dataclass
class CheckResult:
    name: str
    passed: bool
    value: str  # the measured figure shown in tables ("7,372,800 of 142,000,000 (5.2%)")
    message: str = ""  # on failure: cause and fix


# --------------------------------------------------------------------------- shared helpers


def _trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _grad_norm(params: list[torch.nn.Parameter]) -> tuple[float, int]:
    """(total L2 norm of the gradients, number of trainable tensors that received one)."""
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return 0.0, 0
    # In fp32 (fp16 grads could overflow the sum of squares and raise a false alarm); .float() on
    # fp32 grads is free. One fused foreach pass, the arithmetic clip_grad_norm_ does.
    return float(torch.nn.utils.get_total_norm([g.float() for g in grads], 2.0)), len(grads)


def _all_finite(params: list[torch.nn.Parameter]) -> bool:
    return all(bool(torch.isfinite(p.detach()).all()) for p in params)


def diverged_message(precision: str, learning_rate: float, max_grad_norm: float) -> str:
    """The fix for a non-finite loss or gradient, by precision (fp16 overflows; others diverge)."""
    if precision == "fp16":
        return FP16_MESSAGE
    grad = "keep --max-grad-norm 1.0" if max_grad_norm == 1.0 else f"set --max-grad-norm 1.0 (now {max_grad_norm:g})"
    return f"loss/gradients diverged: lower --learning-rate (now {learning_rate:g}), {grad}, check for NaN inputs"


@contextlib.contextmanager
def _rng_preserved():
    """Run a block without moving the global RNG: guards must not change which data or dropout a
    seeded run sees (``--no-guards`` must train the very same run, for the overhead benchmark)."""
    cpu = torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device):
    """Decode on one CPU thread. A decoding step is thousands of tiny ops, and each parallel op waits
    at a barrier for every intra-op thread: on a busy machine that wait dominates (BENCHMARKS.md has
    the timings). Training's large matmuls keep all threads: the count is restored afterwards."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- preflight


def check_rows(rows) -> list[CheckResult]:
    """Every row supervises at least one token, and its labels are the input ids (unshifted)."""
    if not rows:
        raise TrainingHalted("supervised_tokens", "no training rows: check --train-file / --max-samples")
    empty = [row.id for row in rows if all(label == IGNORE_INDEX for label in row.labels)]
    total = sum(sum(1 for label in row.labels if label != IGNORE_INDEX) for row in rows)
    if empty:
        raise TrainingHalted(
            "supervised_tokens",
            f"{len(empty)} of {len(rows)} rows (e.g. {', '.join(empty[:3])}) have every label -100: answers "
            f"truncated away or prompts not masked correctly: raise --max-length, run `mathtune data`",
        )
    results = [CheckResult("supervised_tokens", True, f"{total:,} in {len(rows):,} rows (min {min(r.supervised_tokens for r in rows)}/row)")]

    for row in rows:
        if len(row.labels) != len(row.input_ids):
            raise TrainingHalted(
                "labels_aligned",
                f"row {row.id}: {len(row.labels)} labels for {len(row.input_ids)} input ids: labels must have one "
                f"entry per input token (-100 where not supervised)",
            )
        supervised = [i for i, label in enumerate(row.labels) if label != IGNORE_INDEX]
        if all(row.labels[i] == row.input_ids[i] for i in supervised):
            continue
        n = len(row.input_ids)
        shifted = [i for i in supervised if i + 1 < n]
        if shifted and all(row.labels[i] == row.input_ids[i + 1] for i in shifted):
            raise TrainingHalted("labels_aligned", f"row {row.id}: {PRE_SHIFT_MESSAGE}")
        bad = next(i for i in supervised if row.labels[i] != row.input_ids[i])
        raise TrainingHalted(
            "labels_aligned",
            f"row {row.id}: label {row.labels[bad]} at position {bad} differs from input id {row.input_ids[bad]}: "
            f"supervised labels must equal the input ids at the same position (-100 elsewhere)",
        )
    results.append(CheckResult("labels_aligned", True, f"unshifted in {len(rows):,} rows"))
    return results


def check_precision(model, trainer_args, device: str, precision: str) -> CheckResult:
    dev = device.split(":")[0].lower()
    if precision == "fp16" and dev in ("cpu", "mps"):
        raise TrainingHalted(
            "precision", f"fp16 on {dev} has no loss scaling and overflows: use --precision bf16 or fp32"
        )
    # The Trainer must run the precision the run asked for (autocast flags), else every message
    # below (and the user's reading of the results) would be about the wrong arithmetic.
    amp = "fp16" if trainer_args.fp16 else "bf16" if trainer_args.bf16 else "fp32"
    params = _trainable(model)
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in params}) or ["-"]
    devices = sorted({p.device.type for p in model.parameters()})
    value = f"{precision} on {device}, trainable weights {'/'.join(dtypes)}"
    if amp != precision:
        raise TrainingHalted(
            "precision",
            f"the Trainer's mixed precision is {amp} but the run asked for {precision}: the trainer arguments "
            f"(fp16/bf16) must follow --precision",
        )
    if any(p.dtype == torch.float16 for p in params) and amp == "fp16":
        raise TrainingHalted(
            "precision",
            "trainable weights are fp16 under fp16 autocast: the optimizer needs fp32 master weights; load the "
            "model in fp32 (--precision only sets autocast)",
        )
    if devices != [dev]:
        raise TrainingHalted(
            "device", f"model weights are on {'/'.join(devices)} but training runs on {device}: load the model on {device}"
        )
    return CheckResult("precision", True, value)


def check_trainable(model) -> CheckResult:
    trainable = sum(p.numel() for p in _trainable(model))
    total = sum(p.numel() for p in model.parameters())
    if trainable == 0:
        raise TrainingHalted(
            "trainable_params",
            "no parameter requires a gradient, so training would change nothing: use --method lora (with "
            "--target-modules naming modules of this model) or --method full",
        )
    return CheckResult("trainable_params", True, f"{trainable:,} of {total:,} ({trainable / total:.2%})")


def check_label_names(trainer) -> CheckResult:
    names = trainer.args.label_names
    if names != ["labels"]:
        raise TrainingHalted("label_names", f"{LABEL_NAMES_MESSAGE} (now {names!r})")
    return CheckResult("label_names", True, "['labels']")


def check_forward_backward(trainer, precision: str) -> list[CheckResult]:
    """One forward+backward on a real batch, in the training precision; gradients zeroed afterwards."""
    model = trainer.model
    dataset = trainer.train_dataset
    n = min(len(dataset), trainer.args.per_device_train_batch_size)
    # The first rows through the trainer's own collator: the batch layout training will see.
    batch = trainer.data_collator([dataset[i] for i in range(n)])
    device = next(model.parameters()).device
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    params = _trainable(model)
    was_training = model.training
    # eager even with --compile: a check of the model, so compiling (and its seconds) stays in the training steps
    with _rng_preserved(), compilation.eager():
        model.train()
        try:
            # Before train() the model is not yet wrapped by accelerate, so autocast is entered here
            # by hand: the same context accelerate applies to forward during training.
            with trainer.accelerator.autocast():
                outputs = model(**inputs)
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
            loss_value = float(loss.detach().float())
            if not math.isfinite(loss_value):
                raise TrainingHalted(
                    "forward_backward",
                    f"the first batch gives a non-finite loss ({loss_value}): "
                    + (FP16_MESSAGE if precision == "fp16" else "check the model weights and inputs for NaN, or use --precision fp32"),
                )
            if loss_value <= 0.0:
                raise TrainingHalted(
                    "forward_backward",
                    f"the first batch gives loss {loss_value}: no label reaches the loss (check that labels are "
                    f"passed and not all -100: run `mathtune data`)",
                )
            loss.backward()
            norm, with_grad = _grad_norm(params)
        finally:
            model.zero_grad(set_to_none=True)
            model.train(was_training)
    if with_grad == 0:
        raise TrainingHalted(
            "forward_backward",
            "no trainable parameter received a gradient: the trainable modules are not on the loss path "
            "(check --target-modules)",
        )
    if not math.isfinite(norm):
        raise TrainingHalted("forward_backward", f"the first batch gives a non-finite gradient norm ({norm}): "
                             + diverged_message(precision, trainer.args.learning_rate, trainer.args.max_grad_norm))
    if norm == 0.0:
        raise TrainingHalted(
            "forward_backward",
            "every gradient is zero: the loss does not depend on the trainable parameters (check "
            "--target-modules and that the adapters are enabled)",
        )
    return [
        CheckResult("first_loss", True, f"{loss_value:.4f} on {n} rows"),
        CheckResult("first_grad_norm", True, f"{norm:.4g} over {with_grad}/{len(params)} trainable tensors"),
    ]


def preflight(trainer, config, rows, device: str, precision: str, *,
              echo: Callable[[str], None] | None = print, results: list[CheckResult] | None = None
              ) -> list[CheckResult]:
    """Check everything that can be checked before the first optimizer step; return the results.

    Raises ``TrainingHalted`` at the first failing check. Each passed check is appended to
    ``results`` as it passes (a caller's list: training keeps it on its session, so mathtune doctor
    can show the checks that passed before a halt). ``echo`` prints one line per passed check
    (trainable parameter count included); None is quiet.
    """
    results = [] if results is None else results
    steps = (
        lambda: check_rows(rows),
        lambda: check_precision(trainer.model, trainer.args, device, precision),
        lambda: check_trainable(trainer.model),
        lambda: check_label_names(trainer),
        lambda: check_forward_backward(trainer, precision),
    )
    for step in steps:
        produced = step()
        for result in produced if isinstance(produced, list) else [produced]:
            results.append(result)
            if echo is not None:
                echo(f"preflight {result.name:<18} ok  {result.value}")
    return results


# --------------------------------------------------------------------------- in-training guards


class NumericGuard(TrainerCallback):
    """Stops the run before a bad update: non-finite loss/gradient, zero supervised tokens, zero loss;
    refuses to let a checkpoint (or the final model) hold non-finite weights."""

    def __init__(self, config, stats: StepStats, precision: str):
        self.config = config
        self.stats = stats
        self.precision = precision
        self.consecutive_skips = 0
        self.last_grad_norm: float | None = None
        self._params: tuple[object, list[torch.nn.Parameter]] | None = None

    def _trainable(self, model) -> list[torch.nn.Parameter]:
        # Listed once per model (walking every module each step would cost more than the check).
        if self._params is None or self._params[0] is not model:
            self._params = (model, _trainable(model))
        return self._params[1]

    def _diverged(self, args) -> str:
        return diverged_message(self.precision, args.learning_rate, args.max_grad_norm)

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = state.global_step + 1  # the step about to be applied
        stats = self.stats
        if stats.micro_batches == 0:
            # Without recorded micro-batches every check below would pass vacuously.
            raise MathtuneError(
                "guards: no micro-batch was recorded for this step: the trainer must record into the shared "
                "StepStats (use mathtune.training.MathtuneTrainer)"
            )
        if stats.supervised_tokens == 0:
            raise TrainingHalted("zero_supervised_tokens", ZERO_SUPERVISED_MESSAGE, step)
        if not stats.losses_finite():
            values = ", ".join(f"{float(l):g}" for l in stats.losses)
            raise TrainingHalted("nonfinite_loss", f"micro-batch loss {values}: {self._diverged(args)}", step)
        if bool(torch.stack([l.float() for l in stats.losses]).eq(0).all()):  # one device sync, not one per loss
            raise TrainingHalted("zero_loss", _zero_loss_message(), step)

        norm, _ = _grad_norm(self._trainable(model))
        self.last_grad_norm = norm
        if math.isfinite(norm):
            self.consecutive_skips = 0
            return
        scaler = getattr(optimizer, "scaler", None)
        if self.precision == "fp16" and scaler is not None and scaler.is_enabled():
            # GradScaler finds the inf in these (unscaled) gradients and skips this step, then halves
            # its scale: normal while it calibrates. Stop only if it cannot find a working scale.
            self.consecutive_skips += 1
            scale = float(scaler.get_scale())
            if self.consecutive_skips >= SCALER_MAX_CONSECUTIVE_SKIPS or scale < SCALER_MIN_SCALE:
                raise TrainingHalted(
                    "nonfinite_grad",
                    f"{self.consecutive_skips} consecutive steps overflowed (loss scale now {scale:g}): {FP16_MESSAGE}",
                    step,
                )
            return
        raise TrainingHalted("nonfinite_grad", f"gradient norm {norm}: {self._diverged(args)}", step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # DefaultFlowCallback (always first) has just decided whether this step saves a checkpoint.
        if control.should_save:
            self._refuse_nonfinite(model, state.global_step, "checkpoint")

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is None:
            return
        if loss == 0.0:
            raise TrainingHalted("zero_loss", _zero_loss_message(), state.global_step)
        if not math.isfinite(loss):
            raise TrainingHalted("nonfinite_loss", f"logged loss {loss}: {self._diverged(args)}", state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        # training.py saves the final model after train() returns: refuse here, before it does.
        self._refuse_nonfinite(model, state.global_step, "final model")

    def _refuse_nonfinite(self, model, step: int, what: str) -> None:
        if not _all_finite(self._trainable(model)):
            raise TrainingHalted(
                "nonfinite_weights",
                f"trainable weights contain NaN/inf, so the {what} is not saved (the last good checkpoint stays): "
                f"{diverged_message(self.precision, self.config.learning_rate, self.config.max_grad_norm)}",
                step,
            )


def _zero_loss_message() -> str:
    return (
        "loss is exactly 0.0: no label reaches the loss (all -100 or ignored) or NaN steps are logged as 0; "
        "run `mathtune data` to see the supervised span and keep logging_nan_inf_filter=False"
    )


def output_flags(outputs: list[tuple[str, list[int]]]) -> list[list[str]]:
    """Flags per generated output (text, new token ids): empty, repeated (one token/char looping),
    identical (every prompt got the same output; needs >= 2 prompts)."""
    flags: list[list[str]] = []
    for text, ids in outputs:
        f = []
        stripped = "".join(text.split())
        if not stripped:
            f.append("empty")
        if (len(ids) >= REPEAT_MIN_TOKENS and len(set(ids)) == 1) or (
            len(stripped) >= REPEAT_MIN_TOKENS and len(set(stripped)) == 1
        ):
            f.append("repeated")
        flags.append(f)
    if len(outputs) >= 2 and len({text for text, _ in outputs}) == 1:
        for f in flags:
            f.append("identical")
    return flags


class CollapseDetector(TrainerCallback):
    """Greedy samples from fixed questions every ``sample_every`` steps and at the end of training.

    A check is flagged when every output is flagged (empty, one token repeated, identical across
    prompts); two flagged checks in a row stop the run. Every generation goes to samples.jsonl.
    """

    def __init__(self, config, tokenizer, sample_questions: list[str], run_dir: Path, precision: str):
        if not sample_questions:
            raise MathtuneError("guards: the collapse detector needs at least one sample question")
        self.config = config
        self.tokenizer = tokenizer
        self.questions = list(sample_questions)
        self.path = RunDir(run_dir).samples
        self.precision = precision
        # greedy, no calculator and no loop stop: a collapsed model's one-token loops must show in full
        self.args = GenerationArgs(max_new_tokens=min(SAMPLE_NEW_TOKENS, config.eval.generation.max_new_tokens),
                                   batch_size=len(self.questions), calculator=False, loop_stop=False)
        # encode_prompt: the very ids training put in front of each answer
        self.prompt_ids = [encode_prompt(tokenizer, format_prompt(tokenizer, q)) for q in self.questions]
        # the end-of-turn token ends a row; so does EOS (a NaN model's token 0 in SmolLM2 is end-of-text)
        self.stop_ids = [i for i in (tokenizer.eos_token_id,) if i is not None]
        self.generator_options: dict = {}  # extra Generator(...) arguments (tests script outputs with them)
        self.flagged_in_a_row = 0
        self.last_checked_step: int | None = None
        self.last_flags: list[list[str]] = []
        self.last_outputs: list[str] = []
        self.seconds = 0.0  # time spent generating, for the overhead benchmark

    def on_train_begin(self, args, state, control, **kwargs):
        # A fresh run (step 0) starts an empty samples.jsonl; a resumed one keeps the lines up to the
        # step it resumes from (later ones belong to steps that will be redone). Rank 0 alone writes it.
        # (a torn last line from a killed run is dropped with a notice, not a traceback)
        from mathtune.distributed import is_main_process
        from mathtune.run_dir import keep_steps_up_to

        if is_main_process():
            keep_steps_up_to(self.path, state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        every = self.config.sample_every
        if every > 0 and state.global_step % every == 0:
            self.check(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.last_checked_step != state.global_step:
            self.check(model, state.global_step)

    def generate(self, model) -> list[tuple[str, list[int]]]:
        """Greedy continuations of the fixed prompts, (text, token ids before the stop), through the one
        generation path. Plain ``generate()`` (``fast=False``): mid-training the model may be compiled or
        wrapped for a launcher, and the fast path would swap its attention kernel under the trainer."""
        from mathtune.generation.engine import Generator

        device = next(model.parameters()).device
        generator = Generator(model, self.tokenizer, self.args, fast=False, progress=False,
                              stop_token_ids=self.stop_ids, **self.generator_options)
        # Sampled under the training autocast: the numerics training uses, and on CPUs with bf16
        # support it is the fast path (fp32 matmuls as skinny as one decoding step, LoRA's above all,
        # measured several times slower than their bf16 autocast version).
        half = dtype_of(self.precision) if self.precision != "fp32" else None
        autocast = torch.autocast(device.type, dtype=half) if half is not None else contextlib.nullcontext()
        with autocast, _one_cpu_thread(device):
            out = generator.generate_ids(self.prompt_ids)
        results = []
        for texts, ids in zip(out.texts, out.token_ids):
            ids = ids[0][:-1] if ids[0] and ids[0][-1] in generator.stop_ids else ids[0]
            results.append((texts[0], ids))
        return results

    def check(self, model, step: int) -> list[list[str]]:
        import time

        started = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            # eager with --compile: generating (eval mode, no gradients, new lengths) would recompile
            # the training graph of every compiled layer
            with _rng_preserved(), compilation.eager():
                outputs = self.generate(model)
        finally:
            model.train(was_training)
        flags = output_flags(outputs)
        self.seconds += time.perf_counter() - started
        self.last_checked_step = step
        self.last_flags = flags
        self.last_outputs = [text for text, _ in outputs]
        from mathtune.distributed import is_main_process

        if is_main_process():  # every rank generates (FSDP needs all of them); rank 0 writes
            self.path.parent.mkdir(parents=True, exist_ok=True)
            from mathtune.atomic import append_whole

            lines = "".join(json.dumps({"step": step, "prompt": question, "output": text, "flags": f}) + "\n"
                            for question, (text, _), f in zip(self.questions, outputs, flags))
            with self.path.open("a", encoding="utf-8") as fh:
                append_whole(fh, lines)  # whole lines or none, also on a full disk (one error line)
        if all(flags):
            self.flagged_in_a_row += 1
        else:
            self.flagged_in_a_row = 0
        if self.flagged_in_a_row >= COLLAPSE_CHECKS_IN_A_ROW:
            kinds = sorted({k for f in flags for k in f})
            example = self.last_outputs[0][:20]
            raise TrainingHalted(
                "collapse",
                f"model collapsed: outputs are {'/'.join(kinds)} (e.g. {example!r}) in {self.flagged_in_a_row} "
                f"checks in a row (see {self.path.name}); likely NaN logits / pre-shifted labels / too high learning "
                f"rate (now {self.config.learning_rate:g})",
                step,
            )
        return flags


def guard_callbacks(config, stats: StepStats, tokenizer, sample_questions: list[str], run_dir: Path,
                    precision: str) -> list[TrainerCallback]:
    """The in-training guards, to pass as ``Trainer(callbacks=...)`` (after training's own callback)."""
    return [
        NumericGuard(config, stats, precision),
        CollapseDetector(config, tokenizer, sample_questions, Path(run_dir), precision),
    ]
