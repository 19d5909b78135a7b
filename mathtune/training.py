"""Fine-tuning: config -> transformers ``Trainer`` (+ PEFT LoRA, + guards) -> run directory.

Named phases, one direction (as in torchtune's single-device recipes):

  setup   device and precision policy, model (fp32 master weights) + LoRA, task rows -> prepared
          rows, TrainingArguments, ``MathtuneTrainer`` with our callbacks and the guards' callbacks
  run     preflight, ``trainer.train()``, final save (model, tokenizer, trainer_state.json)
  train   setup + run + (with ``--eval-samples N``) base-vs-trained comparison and report

There is no hand-written loop: ``Trainer`` owns forward/backward/optimizer/scheduler/checkpoints.
``MathtuneTrainer`` only records each micro-batch into a shared ``StepStats`` (what the guards and
the metrics logger need but callbacks never see) and saves LoRA adapters without a hub lookup.

Loss normalisation, the one thing that is easy to get silently wrong: with gradient accumulation
the loss must be (sum of token losses over ALL micro-batches of the step) / (supervised tokens in
the whole step), not the mean of per-micro-batch means (the 2024 transformers bug: short rows get
over-weighted). The installed Trainer does the right thing when the model accepts loss kwargs: it
counts ``num_items_in_batch`` over the step's labels and passes it to ``forward``, where the loss
is summed and divided by it. Llama/Qwen (and PEFT's wrapper, which forwards **kwargs) accept it;
for a model that does not, ``setup`` installs an equivalent ``compute_loss_func`` so the count is
still used. tests/test_training.py checks batch 8 × accumulation 1 == batch 2 × accumulation 4.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_callback import ProgressCallback

from mathtune import distributed
from mathtune.budget import TimeBudget
from mathtune.config import TrainConfig, save_config
from mathtune.data import CompletionCollator, DataStats, PreparedRow, RowDataset, format_prompt, prepare_examples, take
from mathtune.atomic import finish_tree, fsync_file, honour_umask, write_text_atomically
from mathtune.errors import MathtuneError, TrainingHalted
from mathtune.interrupt import InterruptCallback, TrainingInterrupted, signals_stop_training
from mathtune.loss import supervised_mask, supervised_only_loss, takes_logits_mask, token_normalised_loss
from mathtune import run_dir as run_dirs
from mathtune.step_stats import StepStats
from mathtune.shared_prefix import shared_prefix_length, split_off_prefix, takes_cache, worth_sharing

CHECKPOINT_MARKER = "mathtune_checkpoint.json"  # written by on_save once Trainer has finished writing
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "mathtune_config.yaml"
STATE_FILE = "trainer_state.json"
SAMPLE_PROMPTS = 3
ESTIMATE_AFTER_STEPS = 3  # steps timed before the time budget's step estimate is printed
# Outputs derived from a trained model: stale ones from an earlier run in the same --output-dir
# would be reused or reported as this run's (an eval cache keyed by the run dir's name, not its weights).
DERIVED_OUTPUTS = ("eval", "model_comparison.json", "report.md", "plots")


# --------------------------------------------------------------------------- results


@dataclass
class TrainResult:
    run_dir: Path
    steps: int  # optimizer steps done (global step, counting resumed ones)
    stopped_reason: str  # "completed" | "max_time"
    seconds: float  # wall time of trainer.train() in this process
    train_tokens_per_second: float  # non-padding input tokens / seconds
    supervised_tokens_per_second: float  # completion (loss-bearing) tokens / seconds
    first_loss: float | None  # first logged loss of this process
    last_loss: float | None
    comparison: dict | None = None  # model_comparison.json content with --eval-samples N


@dataclass
class TrainingSession:
    """Everything ``setup`` built; ``run`` consumes it."""

    config: TrainConfig
    trainer: MathtuneTrainer
    model: Any  # PeftModel (LoRA) or PreTrainedModel (full)
    tokenizer: Any
    rows: list[PreparedRow]
    data_stats: DataStats
    step_stats: StepStats
    device: str
    device_reason: str
    precision: str
    precision_reason: str
    run_dir: Path
    sample_prompts: list[str]
    resume_from: str | None  # checkpoint dir, resolved from --resume
    planned_steps: int
    trainable_params: int
    total_params: int
    judge_rule: str
    sample_source: str  # where the collapse detector's prompts came from (printed in the summary)
    callbacks: dict[str, Any] = field(default_factory=dict)  # our own callbacks by role

    @property
    def mean_row_tokens(self) -> float:
        return sum(len(r.input_ids) for r in self.rows) / len(self.rows)

    @property
    def mean_supervised_tokens(self) -> float:
        return sum(r.supervised_tokens for r in self.rows) / len(self.rows)


# --------------------------------------------------------------------------- trainer subclass


class MathtuneTrainer(Trainer):
    """Trainer that records every micro-batch into ``StepStats``, runs the LM head only at supervised
    positions (mathtune/loss.py), lays the LR schedule over a time budget (mathtune/budget.py) and
    saves adapters offline."""

    def __init__(self, *args, step_stats: StepStats, time_budget: TimeBudget | None = None,
                 supervised_logits: bool = False, shared_prefix: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.step_stats = step_stats
        self.time_budget = time_budget
        self.supervised_logits = supervised_logits
        self.shared_prefix = shared_prefix and supervised_logits
        if supervised_logits:
            self.compute_loss_func = supervised_only_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.shared_prefix and "labels" in inputs and not return_outputs:
            rows, positions = inputs["input_ids"].shape
            prefix = shared_prefix_length(inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
            if worth_sharing(rows, positions, prefix):
                # the shared system turn runs once at batch 1; the rows continue from its cache
                inputs = split_off_prefix(model, inputs, prefix)
        if self.supervised_logits and "labels" in inputs:
            # the LM head runs on these positions only; supervised_only_loss takes its cross-entropy
            inputs = {**inputs, "logits_to_keep": supervised_mask(inputs["labels"])}
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.time_budget is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        budget = self.time_budget
        # a plain function (not a bound method), so LambdaLR's state_dict stays the library's usual one
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer,
                                                              lambda step: budget.multiplier(step))
        return self.lr_scheduler

    def training_step(self, model, inputs, num_items_in_batch=None):
        first_of_step = self.step_stats.micro_batches == 0
        started = time.perf_counter()
        loss = super().training_step(model, inputs, num_items_in_batch)
        # The loss returned is already scaled for accumulation (this micro-batch's token-loss sum /
        # the step's supervised tokens), so the step's recorded losses sum to its mean token loss.
        self.step_stats.record_micro_batch(inputs, loss)
        if first_of_step:
            # record_micro_batch starts the step's clock after the first micro-batch ran: start it before
            self.step_stats.step_started = started
        return loss

    def _save(self, output_dir=None, state_dict=None):
        self._save_weights(output_dir, state_dict)
        if self.args.should_save:
            # safetensors writes through a 0600 temp file: give the weights the umask's mode, like
            # every other file of the run, and put them on disk (the run survives a power cut)
            for weights in Path(output_dir or self.args.output_dir).glob("*.safetensors"):
                honour_umask(weights)
                fsync_file(weights)

    def _save_weights(self, output_dir=None, state_dict=None):
        if not isinstance(self.model, PeftModel):
            return super()._save(output_dir, state_dict=state_dict)
        if not self.args.should_save:
            return  # under a launcher rank 0 alone writes (as Trainer._save does)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        # save_embedding_layers="auto" (peft's default) asks the hub whether the base config's vocab
        # changed, taking our alias for a repo id: offline that is a retry loop, and we never resize
        # embeddings, so the LoRA matrices are all there is to save.
        self.model.save_pretrained(output_dir, state_dict=state_dict, save_embedding_layers=False)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)


# --------------------------------------------------------------------------- callbacks


class StepCallback(TrainerCallback):
    """Closes each step in StepStats, enforces --max-time, writes metrics.jsonl.

    Must be the first of our callbacks: the guards' on_step_end reads StepStats.last_* after end_step().
    """

    def __init__(self, stats: StepStats, metrics_path: Path, budget: TimeBudget | None, seconds_offset: float = 0.0,
                 clock=time.perf_counter):
        self.stats = stats
        self.metrics_path = Path(metrics_path)
        self.budget = budget
        self.seconds_offset = seconds_offset  # training seconds of the run this one resumes
        self.clock = clock  # injectable: the time-budget tests drive a fake clock
        self.train_started: float | None = None
        self.stopped_on_time = False
        self.window = self._empty_window()
        self.total_input_tokens = 0
        self.total_supervised_tokens = 0
        self.first_loss: float | None = None
        self.last_loss: float | None = None

    @staticmethod
    def _empty_window() -> dict:
        return {"steps": 0, "supervised": 0, "input": 0, "seconds": 0.0}

    def elapsed(self) -> float:
        """Seconds since this process started training (what --max-time budgets)."""
        return self.clock() - self.train_started if self.train_started is not None else 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.train_started = self.clock()
        self._first_step = state.global_step
        if self.budget is not None:
            self.budget.start(state.global_step, self.seconds_offset)

    def on_step_end(self, args, state, control, **kwargs):
        stats = self.stats
        stats.end_step()
        self.window["steps"] += 1
        self.window["supervised"] += stats.last_supervised_tokens
        self.window["input"] += stats.last_input_tokens
        self.window["seconds"] += stats.last_step_seconds
        self.total_input_tokens += stats.last_input_tokens
        self.total_supervised_tokens += stats.last_supervised_tokens
        budget = self.budget
        if budget is not None:
            # rank 0's clock on every rank (one broadcast per step under a launcher): the stop decision
            # and the learning rate follow it, so all ranks stop after the same step with the same LR
            budget.step_ended(state.global_step, distributed.main_clock(self.seconds_offset + self.elapsed()))
            if budget.steps_done - self._first_step == ESTIMATE_AFTER_STEPS and distributed.is_main_process():
                tqdm.write(budget_estimate_line(budget), file=sys.stderr)
            if not control.should_training_stop and budget.should_stop():
                # a step boundary: the update is complete, so the model saved next is a consistent one
                self.stopped_on_time = True
                control.should_training_stop = True
        if control.should_training_stop:
            control.should_log = True  # the last step always reaches metrics.jsonl

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return  # the end-of-training summary (train_runtime, train_loss, ...) is not a step
        window, seconds = self.window, self.window["seconds"]
        line = {
            "step": state.global_step,
            "loss": logs["loss"],
            "grad_norm": logs.get("grad_norm"),
            "learning_rate": logs.get("learning_rate"),
            "epoch": logs.get("epoch", state.epoch),
            # tokens of the steps since the previous line (logging_steps of them)
            "supervised_tokens": window["supervised"],
            "input_tokens": window["input"],
            "supervised_tokens_per_second": window["supervised"] / seconds if seconds > 0 else None,
            "tokens_per_second": window["input"] / seconds if seconds > 0 else None,
            "step_seconds": seconds / max(window["steps"], 1),
            # wall seconds since training started; a resumed run continues the count
            "seconds": self.seconds_offset + self.elapsed(),
        }
        if distributed.is_main_process():  # logs are the same on every rank (losses gathered by Trainer)
            with self.metrics_path.open("a") as handle:
                handle.write(json.dumps(line) + "\n")
        if self.first_loss is None:
            self.first_loss = logs["loss"]
        self.last_loss = logs["loss"]
        self.window = self._empty_window()


class CheckpointMarker(TrainerCallback):
    """Marks checkpoint-N complete once Trainer has fully written it.

    on_save runs after the model, optimizer, scheduler, RNG state and trainer_state.json are on disk.
    Listed after the guards' callbacks, so a checkpoint a guard rejects is never marked. --resume auto
    trusts only marked checkpoints: a crash mid-write leaves an unmarked, ignored directory.
    """

    def __init__(self):
        self.last_complete: Path | None = None

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"

        def mark():
            if not (checkpoint / STATE_FILE).is_file():
                raise MathtuneError(f"{checkpoint}: Trainer reported a save but wrote no {STATE_FILE}")
            finish_tree(checkpoint)  # umask modes, every file on disk before the marker says "complete"
            # atomic and durable: the marker is whole or absent
            write_text_atomically(checkpoint / CHECKPOINT_MARKER,
                                  json.dumps({"step": state.global_step, "complete": True, "time": time.time()}) + "\n")

        # every rank writes its own shard/RNG state; on_main waits for all of them before rank 0 marks
        distributed.barrier()
        distributed.on_main(mark)
        self.last_complete = checkpoint


class ConsoleProgress(TrainerCallback):
    """One compact tqdm line (steps, loss, learning rate) instead of Trainer's printed dict per log."""

    def __init__(self):
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not distributed.is_main_process():
            return  # one bar per run, not one per rank
        self.bar = tqdm(total=state.max_steps, initial=state.global_step, unit="step", desc="train",
                        dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs.get('learning_rate', 0):.2e}")

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_train_end(self, args, state, control, **kwargs):
        self.close()


# --------------------------------------------------------------------------- run dir and resume


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """checkpoint-N dirs in ``output_dir`` that carry the completion marker, oldest step first."""
    root = Path(output_dir)
    found = []
    for path in root.glob("checkpoint-*") if root.is_dir() else []:
        step = path.name.partition("-")[2]
        if path.is_dir() and step.isdigit() and (path / CHECKPOINT_MARKER).is_file():
            found.append((int(step), path))
    return [path for _, path in sorted(found)]


def resolve_resume(resume: str | None, output_dir: str | Path) -> str | None:
    """--resume auto -> newest complete checkpoint in --output-dir; --resume PATH -> PATH, checked."""
    if resume is None:
        return None
    if resume == "auto":
        found = complete_checkpoints(output_dir)
        if not found:
            raise MathtuneError(
                f"--resume auto: no complete checkpoint in --output-dir {output_dir} (write them with "
                f"--save-steps N, point --output-dir at the run to continue, or drop --resume)"
            )
        return str(found[-1])
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise MathtuneError(f"--resume {resume}: no {STATE_FILE} there; pass a checkpoint-N dir or --resume auto")
    if not (path / CHECKPOINT_MARKER).is_file():
        raise MathtuneError(
            f"--resume {resume}: checkpoint not marked complete (its save was interrupted); "
            f"use an earlier checkpoint or --resume auto"
        )
    return str(path)


def _check_output_dir(run_dir: Path, resume_from: str | None) -> None:
    if resume_from is None and run_dir.is_dir():
        stale = sorted(p.name for p in run_dir.glob("checkpoint-*") if p.is_dir())
        if stale:
            # Trainer would rotate them with ours, and a later --resume auto could pick up a checkpoint
            # of a different run: make the user choose.
            raise MathtuneError(
                f"--output-dir {run_dir} holds checkpoints of an earlier run ({', '.join(stale[:3])}): "
                f"continue it with --resume auto, or use a new --output-dir"
            )


def _prepare_run_dir(config: TrainConfig, resume_from: str | None) -> tuple[Path, float]:
    """Create the run dir; clear outputs of an earlier run there. Returns (run_dir, seconds already trained)."""
    run_dir = Path(config.output_dir)
    _check_output_dir(run_dir, resume_from)
    run_dirs.lock_output_dir(run_dir)  # creates it; refuses a dir another mathtune train is using
    if resume_from is None:
        run_dirs.move_aside_earlier_weights(run_dir)
    else:
        run_dirs.remove_unmarked_checkpoints(run_dir, resume_from, CHECKPOINT_MARKER)
    for name in DERIVED_OUTPUTS:
        target = run_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    metrics = run_dir / METRICS_FILE
    offset = 0.0
    if resume_from is None:
        metrics.unlink(missing_ok=True)
    elif metrics.is_file():
        # keep the lines up to the resumed step: later ones belong to steps that will be redone
        # (a torn last line from a killed run is dropped with a notice)
        step = json.loads((Path(resume_from) / STATE_FILE).read_text())["global_step"]
        kept = run_dirs.keep_steps_up_to(metrics, step)
        if kept:
            offset = float(kept[-1].get("seconds") or 0.0)
    return run_dir, offset


# --------------------------------------------------------------------------- setup


def _report_to(config: TrainConfig) -> list[str]:
    from transformers.integrations import is_tensorboard_available, is_wandb_available

    targets = []
    if config.wandb:
        if not is_wandb_available():
            raise MathtuneError("--wandb needs the wandb package: pip install 'mathtune[wandb]', or drop --wandb")
        if config.wandb_key_file is not None:
            key = Path(config.wandb_key_file).read_text().strip()
            if not key:
                raise MathtuneError(f"--wandb-key-file {config.wandb_key_file}: the file is empty")
            # into this process's environment only: never printed, never saved (SECRET_FIELDS)
            os.environ["WANDB_API_KEY"] = key
        elif not os.environ.get("WANDB_API_KEY") and os.environ.get("WANDB_MODE") not in ("offline", "disabled"):
            raise MathtuneError(
                "--wandb needs an API key: set WANDB_API_KEY, pass --wandb-key-file FILE, or set WANDB_MODE=offline"
            )
        os.environ.setdefault("WANDB_PROJECT", config.wandb_project)
        targets.append("wandb")
    if is_tensorboard_available():
        targets.append("tensorboard")
    return targets


def _planned_steps(config: TrainConfig, n_rows: int, world: int = 1) -> int:
    if config.max_steps > 0:
        return config.max_steps
    # same arithmetic as Trainer: ceil(rows / batch) micro-batches, dealt to `world` ranks (accelerate
    # gives every rank the same count), ceil(that / accumulation) steps
    micro_batches = math.ceil(math.ceil(n_rows / config.batch_size) / world)
    per_epoch = max(math.ceil(micro_batches / config.gradient_accumulation_steps), 1)
    return math.ceil(config.num_epochs * per_epoch)


def _sample_prompts(task, tokenizer, config: TrainConfig) -> tuple[list[str], str]:
    """Three fixed held-out questions for the collapse detector, formatted as training formats them."""
    try:
        held_out = task.examples("eval")[:SAMPLE_PROMPTS]
        where = "eval split"
    except MathtuneError as exc:
        if config.eval_file is not None:
            raise  # a malformed --eval-file fails now, not after hours of training at the comparison
        # no eval split (e.g. only --train-file): the last train rows, unused when --max-samples leaves them
        train_rows = task.examples("train")
        held_out = train_rows[-SAMPLE_PROMPTS:]
        unused = config.max_samples != -1 and len(train_rows) - config.max_samples >= SAMPLE_PROMPTS
        where = f"last train rows ({'not trained on' if unused else 'ALSO trained on'}; no eval split: {exc})"
    return [format_prompt(tokenizer, ex.question) for ex in held_out], where


def _training_arguments(config: TrainConfig, run_dir: Path, device: str, precision: str,
                        report_to: list[str]) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(run_dir),
        run_name=run_dir.name,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        num_train_epochs=config.num_epochs,
        max_steps=config.max_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,  # a float in [0, 1) is a fraction of the total steps (v5)
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        # PEFT's wrapper hides forward's signature: without this Trainer cannot find the labels
        label_names=["labels"],
        # under a launcher, divide by the supervised tokens of ALL ranks (Trainer gathers the count and
        # scales by the world size, DDP averages): N ranks x batch b == 1 rank x batch N*b
        average_tokens_across_devices=True,
        # every trainable weight (LoRA matrices, or all weights with --full) is on the loss path: the
        # default (True for PEFT models) costs an extra autograd-graph walk per step and warns each run
        ddp_find_unused_parameters=False,
        # the default replaces NaN/inf step losses by the running mean: exactly the failure to see
        logging_nan_inf_filter=False,
        logging_strategy="steps",
        logging_steps=config.logging_steps,
        save_strategy="steps" if config.save_steps > 0 else "no",
        save_steps=config.save_steps or 500,  # ignored by save_strategy "no", but must be > 0
        save_total_limit=config.save_total_limit,
        # batches of similar-length rows: random batches of GSM8K rows pad to the longest of 8,
        # 1.43x the real tokens; grouped ones (data.length_grouped_order, which the dataset applies
        # per epoch, so the sampler reads it in sequence) to 1.11x on 64 rows, 1.02x on 256 or more
        # (transformers' LengthGroupedSampler: 1.30x and 1.09x; equal from ~2,000 rows)
        train_sampling_strategy="sequential" if config.group_by_length else "random",
        seed=config.seed,
        data_seed=config.seed,
        # bf16: autocast on fp32 master weights (CPU or CUDA); fp16: CUDA autocast + GradScaler
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=device == "cpu",
        # (activation_checkpointing is transformers 5's name for gradient checkpointing)
        activation_checkpointing=config.gradient_checkpointing,
        # non-reentrant checkpointing needs no requires_grad on the (frozen) input embeddings
        activation_checkpointing_kwargs={"use_reentrant": False} if config.gradient_checkpointing else None,
        report_to=report_to or "none",
        remove_unused_columns=False,  # our rows are plain dicts; nothing to drop
        dataloader_num_workers=0,  # tokenized rows in memory: workers would only add fork overhead
        disable_tqdm=False,  # keeps Trainer from adding PrinterCallback; its bar is swapped for ours
    )


def setup(config: TrainConfig) -> TrainingSession:
    """Build everything needed to train; nothing is trained yet. Prints the device and precision choice."""
    from mathtune import hardware
    from mathtune.models.load import apply_lora, load_model
    from mathtune.models.spec import base_record, resolve_model_source
    from mathtune.tasks import get_task

    device, device_reason = hardware.choose_device(config.device)
    hardware.check_training_device(device)  # Trainer would silently use cuda:0 / every GPU otherwise
    precision, precision_reason = hardware.choose_precision(config.precision, device)
    print(f"device: {device} ({device_reason})")
    print(f"precision: {precision} ({precision_reason})")
    distributed.init(device)  # under a launcher: join the process group before touching the run dir

    resume_from = resolve_resume(config.resume, config.output_dir)
    _check_output_dir(Path(config.output_dir), resume_from)  # before spending time loading the model
    run_dirs.check_writable(config.output_dir)
    if Path(config.output_dir).is_dir():  # ditto: a dir in use by another run is refused now (a new dir is
        run_dirs.lock_output_dir(config.output_dir)  # created only once model and data have loaded)
    if resolve_model_source(config.model)[0] == "adapter":
        raise MathtuneError(
            f"--model {config.model} is a LoRA adapter: train from the base model its adapter_config.json "
            f"names (to continue a run, use --resume with its checkpoint)"
        )
    loaded = load_model(config.model, device=distributed.local_device(device), dtype=torch.float32,  # fp32 master
                               trust_remote_code=config.trust_remote_code, allow_pickle=config.allow_pickle)
    tokenizer = loaded.tokenizer

    task = get_task(config.task, train_file=config.train_file, eval_file=config.eval_file,
                    strip_calculator=config.strip_calculator, seed=config.seed)
    examples = take(task.examples("train"), config.max_samples, "train")
    rows, data_stats = prepare_examples(examples, tokenizer, config.max_length)
    sample_prompts, sample_source = _sample_prompts(task, tokenizer, config)

    # LoRA matrices are initialised from the global RNG: seed first so a run is reproducible
    set_seed(config.seed)
    model = loaded.model
    if device == "cpu" and config.cpu_eager_attention:
        # torch's CPU flash-attention kernels (what "sdpa" runs) are slow in the backward pass in
        # bf16 at training lengths: on 8 GSM8K rows of ~300 tokens, plain matmul + softmax attention
        # made a forward+backward 12% faster (17.2 s vs 19.6 s for 3 steps, same losses to bf16
        # rounding). In fp32 the same 3 batches took 27.3 s with SDPA and 34.8 s with eager, yet
        # bench/train_throughput.py showed no gain from SDPA in fp32 (1.27x vs 1.33x, inside its
        # run-to-run spread), and SDPA's blockwise softmax rounds differently per padded length: 2
        # ranks x 4 rows then differ from 1 x 8 by 2e-5 instead of < 1e-5. So eager in fp32 too.
        # Memory: the attention probabilities are kept for backward, batch x heads x T^2 per layer
        # (8 x 9 x 512^2 x 4 B = 75 MB at --max-length 512), fine for CPU RAM.
        model.set_attn_implementation("eager")
    if config.method == "lora":
        model = apply_lora(model, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                                  target_modules=config.target_modules)
    else:
        for param in model.parameters():
            param.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    def prepare_run_dir():
        prepared = _prepare_run_dir(config, resume_from)
        save_config(config, prepared[0] / CONFIG_FILE, base_model=base_record(config.model))
        return prepared

    run_dir, seconds_offset = distributed.on_main(prepare_run_dir)  # one writer; the others wait for it
    report_to = _report_to(config)

    planned_steps = _planned_steps(config, len(rows), distributed.world_size())
    budget = None
    if config.max_time is not None:
        steps_per_epoch = _planned_steps(dataclasses.replace(config, max_steps=-1, num_epochs=1.0), len(rows),
                                         distributed.world_size())
        budget = TimeBudget(planned_steps=planned_steps, max_time=config.max_time, schedule=config.lr_scheduler,
                            warmup_ratio=config.warmup_ratio, steps_per_epoch=max(steps_per_epoch, 1))
    step_stats = StepStats()
    interrupt_cb = InterruptCallback()
    step_cb = StepCallback(step_stats, run_dir / METRICS_FILE, budget, seconds_offset)
    marker_cb = CheckpointMarker()
    progress_cb = ConsoleProgress()
    guard_cbs = []
    if config.guards:
        from mathtune import guards

        guard_cbs = list(guards.guard_callbacks(config, step_stats, tokenizer, sample_prompts, run_dir, precision))
        # under a launcher: a halt on any rank halts every rank at the same event (itself otherwise)
        guard_cbs = [distributed.CollectiveCallback(cb) for cb in guard_cbs]

    args = _training_arguments(config, run_dir, device, precision, report_to)
    # the LM head only at supervised positions, where the model's forward can take that mask
    supervised_logits = config.supervised_logits and takes_logits_mask(model)
    # a second forward pass per micro-batch: kept to one process (DDP/FSDP hook their own forward)
    # and off with checkpointing (transformers drops the cache inside checkpointed layers)
    shared_prefix = (config.shared_prefix and supervised_logits and distributed.world_size() == 1
                     and not config.gradient_checkpointing and takes_cache(model))
    trainer = MathtuneTrainer(
        model=model,
        args=args,
        data_collator=CompletionCollator(tokenizer.pad_token_id),
        # grouped per optimizer step (batch x accumulation x processes): the same rows make a step
        # however it is split into micro-batches or processes, as with accumulation off or one process
        train_dataset=RowDataset(rows, seed=config.seed, batch_rows=(
            config.batch_size * config.gradient_accumulation_steps * distributed.world_size()
            if config.group_by_length else None)),
        processing_class=tokenizer,
        # order matters: the interrupt callback first (its should_save/should_training_stop must reach
        # the step callback, which logs the last step, and the guards, which check weights before a
        # save); StepStats closes the step before guards read last_*; the checkpoint marker runs after
        # guards may have rejected a checkpoint
        callbacks=[interrupt_cb, step_cb, *guard_cbs, marker_cb, progress_cb],
        step_stats=step_stats,
        time_budget=budget,
        supervised_logits=supervised_logits,
        shared_prefix=shared_prefix,
    )
    trainer.remove_callback(ProgressCallback)
    if not supervised_logits and not trainer.model_accepts_loss_kwargs:
        # forward() cannot take num_items_in_batch: compute the token-normalised loss here instead
        trainer.compute_loss_func = token_normalised_loss

    session = TrainingSession(
        config=config, trainer=trainer, model=model, tokenizer=tokenizer, rows=rows, data_stats=data_stats,
        step_stats=step_stats, device=device, device_reason=device_reason, precision=precision,
        precision_reason=precision_reason, run_dir=run_dir, sample_prompts=sample_prompts,
        resume_from=resume_from, planned_steps=planned_steps, trainable_params=trainable,
        total_params=total, judge_rule=task.judge_rule, sample_source=sample_source,
        callbacks={"step": step_cb, "checkpoint": marker_cb, "progress": progress_cb, "guards": guard_cbs,
                   "interrupt": interrupt_cb},
    )
    return session


# --------------------------------------------------------------------------- run


def run(session: TrainingSession) -> TrainResult:
    """Preflight, train, save the final model. A guard halt saves nothing new and re-raises."""
    config, trainer = session.config, session.trainer
    step_cb, marker_cb = session.callbacks["step"], session.callbacks["checkpoint"]
    if config.guards:
        from mathtune import guards

        # every rank checks its own model; a failure on any rank stops all of them
        quiet = {} if distributed.is_main_process() else {"echo": None}  # rank 0 prints the checks
        distributed.collectively(guards.preflight, trainer, config, session.rows, session.device, session.precision,
                                 **quiet)
    if session.resume_from:
        print(f"resuming from {session.resume_from}")
    started = time.perf_counter()
    interrupt_cb = session.callbacks["interrupt"]
    try:
        with signals_stop_training(interrupt_cb):
            trainer.train(resume_from_checkpoint=session.resume_from)
    except TrainingHalted:
        session.callbacks["progress"].close()
        last = marker_cb.last_complete or (complete_checkpoints(session.run_dir) or [None])[-1]
        kept = f"last good checkpoint: {last}" if last else "no checkpoint was written (use --save-steps N)"
        if distributed.is_main_process():
            print(f"training halted; no final model saved; {kept}", file=sys.stderr)
        raise
    finally:
        session.callbacks["progress"].close()
    seconds = time.perf_counter() - started

    run_dir = session.run_dir
    if interrupt_cb.stopped_at is not None:
        _raise_interrupted(session)
    trainer.save_model(str(run_dir))  # every rank calls it (FSDP gathers shards); Trainer writes on rank 0
    distributed.on_main(lambda: trainer.state.save_to_json(str(run_dir / STATE_FILE)))
    stopped = "max_time" if step_cb.stopped_on_time else "completed"
    if stopped == "max_time":
        budget = trainer.time_budget
        print(f"stopped on time: --max-time {config.max_time:g} s bought {trainer.state.global_step} of "
              f"{budget.planned_steps} planned steps ({trainer.state.global_step / budget.steps_per_epoch:.2f} "
              f"epochs) in {budget.elapsed:.0f} s of training; learning rate ended at "
              f"{budget.multiplier(trainer.state.global_step):.1%} of its peak; final model saved")
    return TrainResult(
        run_dir=run_dir,
        steps=trainer.state.global_step,
        stopped_reason=stopped,
        seconds=seconds,
        train_tokens_per_second=step_cb.total_input_tokens / seconds if seconds > 0 else 0.0,
        supervised_tokens_per_second=step_cb.total_supervised_tokens / seconds if seconds > 0 else 0.0,
        first_loss=step_cb.first_loss,
        last_loss=step_cb.last_loss,
    )


def _raise_interrupted(session: TrainingSession) -> None:
    """After a signal stopped training: no final model (the checkpoint is the state), say how to continue."""
    import signal

    interrupt_cb, marker_cb = session.callbacks["interrupt"], session.callbacks["checkpoint"]
    checkpoint = marker_cb.last_complete
    name = signal.Signals(interrupt_cb.signal).name
    if checkpoint is None or checkpoint.name != f"checkpoint-{interrupt_cb.stopped_at}":
        raise TrainingInterrupted(f"{name}: stopped after step {interrupt_cb.stopped_at} but its checkpoint was not "
                                  f"completed; the newest marked checkpoint is the one to resume",
                                  interrupt_cb.exit_code)
    raise TrainingInterrupted(f"{name}: stopped after step {interrupt_cb.stopped_at}; checkpoint saved: {checkpoint}",
                              interrupt_cb.exit_code, checkpoint)


def compare_after_training(config: TrainConfig, result: TrainResult) -> TrainResult:
    """Base vs trained on ``config.eval_samples`` held-out items, then report.md (run dir)."""
    from mathtune.comparison import run_compare
    from mathtune.config import EvalConfig, ModelSettings
    from mathtune import report

    # the model/task settings both configs share (ModelSettings), so eval sees the same task and split
    shared = {f.name: getattr(config, f.name) for f in dataclasses.fields(ModelSettings) if f.name != "model"}
    eval_config = EvalConfig(model=config.model, max_samples=config.eval_samples, batch_size=config.eval_batch_size,
                             max_new_tokens=config.max_new_tokens, **shared).validate()
    print(f"\ncomparing base vs trained on {config.eval_samples} held-out {config.task} items")
    comparison = run_compare(
        config.model,
        str(result.run_dir),
        eval_config,
        output_path=result.run_dir / "model_comparison.json",
        output_dir=result.run_dir / "eval",
    )
    distributed.on_main(lambda: report.write_report(result.run_dir))
    return dataclasses.replace(result, comparison=comparison)


def train(config: TrainConfig) -> TrainResult:
    """setup + run + (with eval_samples > 0) the base-vs-trained comparison. Prints start/end summaries."""
    session = setup(config)
    try:
        print(start_summary(session))
        result = run(session)
        del session  # free the training model and optimizer state before two eval models load
        gc.collect()
        if config.eval_samples > 0:
            result = compare_after_training(config, result)
        return result
    finally:
        run_dirs.unlock_output_dir(config.output_dir)


# --------------------------------------------------------------------------- summaries


def budget_estimate_line(budget: TimeBudget) -> str:
    expected = budget.expected_steps()
    per_step = budget.seconds_per_step or 0.0
    if expected is None:
        return "time budget: no step timing yet"
    fits = "all" if expected >= budget.planned_steps else f"~{expected}"
    return (f"time budget: {per_step:.2f} s/step -> {fits} of {budget.planned_steps} planned steps "
            f"({expected / budget.steps_per_epoch:.2f} epochs) fit in --max-time {budget.max_time:g} s; "
            f"the learning-rate schedule is laid over them")


def start_summary(session: TrainingSession) -> str:
    c, s = session.config, session.data_stats
    lines = []
    if c.method == "lora":
        how = f"LoRA r={c.lora_r} alpha={c.lora_alpha} on {', '.join(c.target_modules)}"
    else:
        how = "full fine-tuning"
    from mathtune.models.spec import describe_model

    lines.append(f"model: {describe_model(c.model)}; {how}: {session.trainable_params:,} trainable of "
                 f"{session.total_params:,} parameters ({session.trainable_params / session.total_params:.2%})")
    dropped = ", ".join(f"{n} {reason}" for reason, n in s.dropped.items()) or "none"
    lines.append(f"task: {c.task} (judge {session.judge_rule}); rows read {s.read}, kept {s.kept}, dropped "
                 f"{s.dropped_total} ({dropped}); --max-length {c.max_length}")
    mean_tokens, mean_sup = session.mean_row_tokens, session.mean_supervised_tokens
    world = distributed.world_size()
    # the global batch: every rank takes its own batch x accumulation micro-batch rows per step
    rows_per_step = c.batch_size * c.gradient_accumulation_steps * world
    ranks = f" × {world} processes" if world > 1 else ""
    lines.append(f"tokens per step: {c.batch_size} batch × {c.gradient_accumulation_steps} accumulation{ranks} × "
                 f"{mean_tokens:.1f} mean tokens = {rows_per_step * mean_tokens:,.0f} "
                 f"({rows_per_step * mean_sup:,.0f} supervised; the loss is averaged over those"
                 f"{' on all ranks' if world > 1 else ''})")
    if world > 1:
        lines.append(f"processes: {distributed.describe()}; global batch {c.batch_size} × "
                     f"{c.gradient_accumulation_steps} × {world} = {rows_per_step} rows per step")
    if c.max_steps > 0:
        lines.append(f"steps: {session.planned_steps} (--max-steps; {session.planned_steps * rows_per_step / s.kept:.2f}"
                     f" epochs of {s.kept} rows)")
    else:
        lines.append(f"steps: {session.planned_steps} ({c.num_epochs:g} epochs × ceil({s.kept} rows / "
                     f"{rows_per_step} rows per step))")
    lines.append(f"optimizer: AdamW lr {c.learning_rate:g}, {c.lr_scheduler} schedule, warmup {c.warmup_ratio:g} "
                 f"of steps, seed {c.seed}")
    if c.max_time is not None:
        lines.append(f"time budget: --max-time {c.max_time:g} s: the {c.lr_scheduler} schedule runs over whichever "
                     f"ends first, {session.planned_steps} steps or {c.max_time:g} s; the steps it buys are "
                     f"estimated after step {ESTIMATE_AFTER_STEPS}")
    checkpoints = f"every {c.save_steps} steps (keep {c.save_total_limit})" if c.save_steps else "final model only"
    lines.append(f"run dir: {session.run_dir}; checkpoints: {checkpoints}")
    lines.append(f"guards: {'on' if c.guards else 'OFF (--no-guards)'}; collapse prompts from "
                 f"{session.sample_source}")
    return "\n".join(lines)


def end_summary(result: TrainResult) -> str:
    how = "stopped on time (--max-time)" if result.stopped_reason == "max_time" else "completed"
    losses = ""
    if result.first_loss is not None:
        losses = f"; loss {result.first_loss:.4f} -> {result.last_loss:.4f}"
    lines = [
        f"training {how}: {result.steps} steps in {result.seconds:.0f} s{losses}",
        f"throughput: {result.train_tokens_per_second:,.0f} tokens/s, "
        f"{result.supervised_tokens_per_second:,.0f} supervised tokens/s",
        f"run dir: {result.run_dir}",
    ]
    return "\n".join(lines)
