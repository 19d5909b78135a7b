"""Fine-tuning: config -> transformers ``Trainer`` (+ PEFT LoRA, + guards) -> run directory.

Named phases, one direction (as in torchtune's single-device recipes):

  setup   named ``_setup_*`` steps: device and precision policy, run-dir checks (resume, lock),
          model (fp32 master weights) + LoRA, task rows -> prepared rows, run-dir preparation,
          time budget, callbacks (training/callbacks.py), ``MathtuneTrainer`` (training/trainer.py),
          --compile resolved (mathtune/compilation.py: decoder layers compiled in place when on)
  run     preflight, ``trainer.train()``, final save (model, tokenizer, trainer_state.json)
  train   setup + run + (with ``--eval-samples N``) base-vs-trained comparison and report

There is no hand-written loop: ``Trainer`` owns forward/backward/optimizer/scheduler/checkpoints.

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
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments, set_seed
from transformers.trainer_callback import ProgressCallback

from mathtune import compilation, distributed
from mathtune.budget import TimeBudget
from mathtune.compat import switch_attention
from mathtune.compilation import CompileDecision
from mathtune.config import TrainConfig, save_config
from mathtune.data import CompletionCollator, DataStats, PreparedRow, RowDataset, prepare_examples, take
from mathtune.errors import MathtuneError, TrainingHalted
from mathtune.hardware import Placement
from mathtune.interrupt import InterruptCallback, TrainingInterrupted, signals_stop_training
from mathtune.loss import takes_logits_mask, token_normalised_loss
from mathtune.run_dir import RunDir, check_writable
from mathtune.shared_prefix import takes_cache
from mathtune.step_stats import StepStats
from mathtune.training.attention import AttentionByLength
from mathtune.training.callbacks import (ESTIMATE_AFTER_STEPS, CheckpointMarker, ConsoleProgress, StepCallback,
                                         TrainingCallbacks, checkpoint_write_failure, final_save_failure,
                                         snapshot_files)
from mathtune.training.trainer import MathtuneTrainer

SAMPLE_QUESTIONS = 3  # held-out questions the collapse detector samples from


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
class TrainingData:
    """The prepared training rows and the collapse detector's questions."""

    rows: list[PreparedRow]
    stats: DataStats
    judge_rule: str
    sample_questions: list[str]  # bare questions; the collapse detector formats them as training does
    sample_source: str  # where they came from (printed in the summary)


@dataclass
class TrainingSession:
    """Everything ``setup`` built; ``run`` consumes it."""

    config: TrainConfig
    placement: Placement
    run_dir: Path
    resume_from: str | None  # checkpoint dir, resolved from --resume
    model: Any  # PeftModel (LoRA) or PreTrainedModel (full)
    tokenizer: Any
    data: TrainingData
    planned_steps: int
    callbacks: TrainingCallbacks
    trainer: MathtuneTrainer
    compile: CompileDecision  # --compile resolved: whether the decoder layers are compiled, and why
    # preflight checks that passed, in order, filled by ``run`` (mathtune doctor shows them)
    preflight: list = field(default_factory=list)

    @property
    def files(self) -> RunDir:
        return RunDir(self.run_dir)

    @property
    def rows(self) -> list[PreparedRow]:
        return self.data.rows

    @property
    def data_stats(self) -> DataStats:
        return self.data.stats

    @property
    def device(self) -> str:
        return self.placement.device

    @property
    def precision(self) -> str:
        return self.placement.precision

    @property
    def step_stats(self) -> StepStats:
        return self.trainer.step_stats

    @property
    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    @property
    def total_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def mean_row_tokens(self) -> float:
        return sum(len(r.input_ids) for r in self.rows) / len(self.rows)

    @property
    def mean_supervised_tokens(self) -> float:
        return sum(r.supervised_tokens for r in self.rows) / len(self.rows)


# --------------------------------------------------------------------------- setup


def setup(config: TrainConfig, placement: Placement | None = None) -> TrainingSession:
    """Build everything needed to train; nothing is trained yet. Prints the device and precision choice
    (``placement``: one already chosen from ``config``, as mathtune doctor does to report each choice).

    The cheap checks come first (a bad --resume or a dir in use fails before a model loads); the run
    dir is written only once model and data have loaded (a failed load leaves no half-prepared dir).
    """
    placement = setup_placement(config, placement)
    # the compiler lookup, once: --compile on without a compiler fails before the model loads, and
    # _setup_compile decides auto on the same answer
    compiler_missing = compilation.check_compiler(config.compile, placement.device)
    run, resume_from = setup_run_dir_checks(config)
    model, tokenizer = _setup_model(config, placement)
    data = _setup_data(config, tokenizer)
    # LoRA matrices are initialised from the global RNG: seed first so a run is reproducible
    set_seed(config.seed)
    config = setup_lora_targets(config, model)
    model = _setup_trainable(config, placement, model)
    seconds_offset = setup_run_dir(config, run, resume_from)
    report_to = setup_report_to(config)
    planned_steps, budget = _setup_time_budget(config, len(data.rows))
    callbacks = _setup_callbacks(config, placement, run, tokenizer, data, budget, seconds_offset)
    compile_decision = _setup_compile(config, placement, model, planned_steps, compiler_missing)
    trainer = _setup_trainer(config, placement, run, model, tokenizer, data, callbacks, budget, report_to,
                             compiled=compile_decision.enabled)
    return TrainingSession(config=config, placement=placement, run_dir=run.root, resume_from=resume_from,
                           model=model, tokenizer=tokenizer, data=data, planned_steps=planned_steps,
                           callbacks=callbacks, trainer=trainer, compile=compile_decision)


def setup_placement(config: TrainConfig, placement: Placement | None) -> Placement:
    from mathtune.hardware import check_training_device

    placement = placement or Placement.choose(config.device, config.precision)
    check_training_device(placement.device)  # Trainer would silently use cuda:0 / every GPU otherwise
    print(f"device: {placement.device} ({placement.device_reason})")
    print(f"precision: {placement.precision} ({placement.precision_reason})")
    distributed.init(placement.device)  # under a launcher: join the process group before touching the run dir
    return placement


def setup_run_dir_checks(config: TrainConfig) -> tuple[RunDir, str | None]:
    """--resume resolved, earlier checkpoints refused, the dir writable and (when it exists) locked:
    all before spending time loading the model. A new dir is created (and locked) by setup_run_dir."""
    run = RunDir(config.output_dir)
    resume_from = run.resolve_resume(config.resume)
    run.refuse_earlier_checkpoints(resume_from)
    check_writable(run.root)
    if run.root.is_dir():
        run.lock()  # a dir in use by another run is refused now
    return run, resume_from


def _setup_model(config: TrainConfig, placement: Placement):
    from mathtune.models.load import load_model
    from mathtune.models.spec import resolve_model_source

    if resolve_model_source(config.model)[0] == "adapter":
        raise MathtuneError(
            f"--model {config.model} is a LoRA adapter: train from the base model its adapter_config.json "
            f"names (to continue a run, use --resume with its checkpoint)"
        )
    loaded = load_model(config.model, device=distributed.local_device(placement.device),
                               dtype=torch.float32,  # fp32 master weights; bf16/fp16 run as autocast
                               trust_remote_code=config.trust_remote_code, allow_pickle=config.allow_pickle)
    return loaded.model, loaded.tokenizer


def _setup_data(config: TrainConfig, tokenizer) -> TrainingData:
    from mathtune.tasks import task_from_config

    task = task_from_config(config)
    examples = take(task.examples("train"), config.max_samples, "train")
    rows, stats = prepare_examples(examples, tokenizer, config.max_length)
    questions, source = sample_questions(task, config)
    return TrainingData(rows=rows, stats=stats, judge_rule=task.judge_rule, sample_questions=questions,
                        sample_source=source)


def setup_lora_targets(config: TrainConfig, model) -> TrainConfig:
    """--target-modules unset: the model family's default (mathtune.families), resolved now so that the
    run's saved config, the start summary and the model card name the real list."""
    if config.method != "lora" or config.target_modules is not None:
        return config
    from mathtune.families import lora_target_modules

    return dataclasses.replace(config, target_modules=lora_target_modules(model))


def _setup_trainable(config: TrainConfig, placement: Placement, model):
    """Attention kernel, then LoRA adapters (or every weight trainable with --full); with LoRA in bf16,
    the frozen base stored in bf16 (``store_frozen_weights_in_bf16``)."""

    if placement.device == "cpu" and config.cpu_eager_attention:
        # torch's CPU flash-attention kernels (what "sdpa" runs) are slow in the backward pass in
        # bf16 at training lengths, and SDPA's blockwise softmax rounds differently per padded
        # length (2 ranks x 4 rows would then differ from 1 x 8 by more than 1e-5), so plain matmul +
        # softmax attention in fp32 too (timings in BENCHMARKS.md). Memory: the attention
        # probabilities are kept for backward, batch x heads x T^2 per layer
        # (8 x 9 x 512^2 x 4 B = 75 MB at --max-length 512), fine for CPU RAM. Batches of 384 tokens
        # and more switch to SDPA, faster there (mathtune/training/attention.py).
        switch_attention(model, "eager")
    if config.method == "lora":
        from mathtune.models.load import apply_lora

        model = apply_lora(model, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                           target_modules=config.target_modules)
        if placement.precision == "bf16" and config.bf16_frozen_base:
            store_frozen_weights_in_bf16(model)
        return model
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def store_frozen_weights_in_bf16(model) -> int:
    """Cast the frozen weights that autocast would cast anyway to bf16, once; return how many.

    Under bf16 autocast every linear layer copies its fp32 weight into bf16 on each forward call: the
    cast cache keeps only leaf tensors that require grad, so a frozen base (134.5M of SmolLM2-135M's
    weights with LoRA) is copied again every micro-batch, 269 MB written per forward, on top of the
    matmuls. Stored in bf16 the matmuls read it as it is. The numbers the matmuls see do not change
    (autocast rounds the same fp32 weight to the same bf16 one); the LoRA matrices stay fp32 master
    weights for AdamW, and only they are saved, so a merge/export still adds them to the fp32 base.

    The input embedding is tied to the LM head in most small models, so it is cast too (the one
    change in numerics: the lookup reads bf16-rounded rows); its output is turned back into fp32 so
    that the residual stream stays fp32, as on the autocast path (a bf16 stream would round every
    layer's sum). RMSNorm weights stay fp32 (autocast
    does not cast them; they are 0.02% of the weights).
    """
    casts = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) and weight is not None
                and not weight.requires_grad and weight.dtype == torch.float32):
            module.to(torch.bfloat16)  # in place (param.data), so a tied weight stays tied
            casts += 1
    embeddings = model.get_input_embeddings()
    if embeddings is not None and embeddings.weight.dtype == torch.bfloat16:
        embeddings.register_forward_hook(_fp32_output)
    return casts


def _fp32_output(module, args, output):
    return output.float()


def setup_run_dir(config: TrainConfig, run: RunDir, resume_from: str | None) -> float:
    """Prepare the run dir and save the resolved config (rank 0 writes; the others wait for it).
    Returns the training seconds of the run resumed."""
    from mathtune.models.spec import base_record

    def prepare() -> float:
        offset = run.prepare(resume_from)
        save_config(config, run.config, base_model=base_record(config.model))
        return offset

    return distributed.on_main(prepare)


def _setup_compile(config: TrainConfig, placement: Placement, model, planned_steps: int,
                   compiler_missing: str | None) -> CompileDecision:
    """--compile resolved (mathtune/compilation.py) on setup's compiler lookup; when on, the decoder layers
    compiled in place (lazily: the compiling happens in the first training step, inside trainer.train())."""
    decision = compilation.decide(config.compile, device=placement.device, precision=placement.precision,
                                  planned_steps=planned_steps, rows_per_step=config.rows_per_step,
                                  world_size=distributed.world_size(), max_time=config.max_time,
                                  compiler_missing=compiler_missing)
    if decision.enabled:
        compilation.compile_decoder_layers(model)
    return decision


def setup_report_to(config: TrainConfig) -> list[str]:
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
    # --report-to (Trainer's name) narrows the default "tensorboard when installed"; its wandb is --wandb
    wanted = config.report_to or ["tensorboard"]
    if any(t in wanted for t in ("tensorboard", "all")):
        if not is_tensorboard_available():
            if "tensorboard" in (config.report_to or []):  # asked for by name: say so, not log nowhere
                raise MathtuneError("--report-to tensorboard needs the tensorboard package: pip install tensorboard")
        else:
            targets.append("tensorboard")
    return targets


def _setup_time_budget(config: TrainConfig, n_rows: int) -> tuple[int, TimeBudget | None]:
    """(planned optimizer steps, the --max-time budget the LR schedule is laid over, if any)."""
    planned_steps = _planned_steps(config, n_rows, distributed.world_size())
    if config.max_time is None:
        return planned_steps, None
    steps_per_epoch = _planned_steps(dataclasses.replace(config, max_steps=-1, num_epochs=1.0), n_rows,
                                     distributed.world_size())
    return planned_steps, TimeBudget(planned_steps=planned_steps, max_time=config.max_time,
                                     schedule=config.lr_scheduler, warmup_ratio=config.warmup_ratio,
                                     steps_per_epoch=max(steps_per_epoch, 1))


def _setup_callbacks(config: TrainConfig, placement: Placement, run: RunDir, tokenizer, data: TrainingData,
                     budget: TimeBudget | None, seconds_offset: float) -> TrainingCallbacks:
    step_stats = StepStats()
    guard_cbs = []
    if config.guards:
        from mathtune import guards

        guard_cbs = list(guards.guard_callbacks(config, step_stats, tokenizer, data.sample_questions, run.root,
                                                placement.precision))
    return TrainingCallbacks(
        interrupt=InterruptCallback(),
        step=StepCallback(step_stats, run.metrics, budget, seconds_offset),
        checkpoint=CheckpointMarker(),
        progress=ConsoleProgress(),
        guards=guard_cbs,
    )


def _setup_trainer(config: TrainConfig, placement: Placement, run: RunDir, model, tokenizer, data: TrainingData,
                   callbacks: TrainingCallbacks, budget: TimeBudget | None, report_to: list[str],
                   compiled: bool) -> MathtuneTrainer:
    args = _training_arguments(config, run.root, placement.device, placement.precision, report_to)
    # the LM head only at supervised positions, where the model's forward can take that mask
    supervised_logits = config.supervised_logits and takes_logits_mask(model)
    # a second forward pass per micro-batch: kept to one process (DDP/FSDP hook their own forward)
    # and off with checkpointing (transformers drops the cache inside checkpointed layers). Off for
    # compiled layers too: dynamo guards on each layer's slot in the pass's KV cache (layer_idx), so
    # every compiled layer recompiled until dynamo's limit (8). On the train bench (256 GSM8K rows, 32
    # steps, BENCHMARKS.md) compiled with the pass took 200.8 s, without it 134.4 s, eager ~150 s either way.
    shared_prefix = (config.shared_prefix and supervised_logits and distributed.world_size() == 1
                     and not config.gradient_checkpointing and not compiled and takes_cache(model))
    # rows per optimizer step: batch x accumulation x processes
    rows_per_step = config.batch_size * config.gradient_accumulation_steps * distributed.world_size()
    # long batches on SDPA, short ones on eager (CPU); compiled layers stay on one kernel (a switch
    # would trace each layer again)
    attention = (AttentionByLength(model) if placement.device == "cpu" and config.cpu_eager_attention
                 and not compiled else None)
    trainer = MathtuneTrainer(
        model=model,
        args=args,
        data_collator=CompletionCollator(tokenizer.pad_token_id),
        # grouped per optimizer step: the same rows make a step however it is split into
        # micro-batches or processes, as with accumulation off or one process
        train_dataset=RowDataset(data.rows, seed=config.seed,
                                 batch_rows=rows_per_step if config.group_by_length else None),
        processing_class=tokenizer,
        callbacks=callbacks.in_order(),
        step_stats=callbacks.step.stats,
        time_budget=budget,
        supervised_logits=supervised_logits,
        shared_prefix=shared_prefix,
        attention=attention,
    )
    trainer.remove_callback(ProgressCallback)
    if not supervised_logits and not trainer.model_accepts_loss_kwargs:
        # forward() cannot take num_items_in_batch: compute the token-normalised loss here instead
        trainer.compute_loss_func = token_normalised_loss
    return trainer


def _planned_steps(config: TrainConfig, n_rows: int, world: int = 1) -> int:
    if config.max_steps > 0:
        return config.max_steps
    # same arithmetic as Trainer: ceil(rows / batch) micro-batches, dealt to `world` ranks (accelerate
    # gives every rank the same count), ceil(that / accumulation) steps
    micro_batches = math.ceil(math.ceil(n_rows / config.batch_size) / world)
    per_epoch = max(math.ceil(micro_batches / config.gradient_accumulation_steps), 1)
    return math.ceil(config.num_epochs * per_epoch)


def sample_questions(task, config: TrainConfig) -> tuple[list[str], str]:
    """Three fixed held-out questions for the collapse detector, and where they came from."""
    try:
        held_out = task.examples("eval")[:SAMPLE_QUESTIONS]
        where = "eval split"
    except MathtuneError as exc:
        if config.eval_file is not None:
            raise  # a malformed --eval-file fails now, not after hours of training at the comparison
        # no eval split (e.g. only --train-file): the last train rows, unused when --max-samples leaves them
        train_rows = task.examples("train")
        held_out = train_rows[-SAMPLE_QUESTIONS:]
        unused = config.max_samples != -1 and len(train_rows) - config.max_samples >= SAMPLE_QUESTIONS
        where = f"last train rows ({'not trained on' if unused else 'ALSO trained on'}; no eval split: {exc})"
    return [ex.question for ex in held_out], where


def common_trainer_arguments(config: TrainConfig, run_dir: Path, device: str, precision: str,
                             report_to: list[str]) -> dict:
    """The ``TrainingArguments`` settings every mathtune trainer takes (train's, and grpo's
    ``GRPOConfig``, a subclass): optimizer, schedule, logging, saving, placement, reporting."""
    return dict(
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
        seed=config.seed,
        data_seed=config.seed,
        # bf16: autocast on fp32 master weights (CPU or CUDA); fp16: CUDA autocast + GradScaler. Set
        # always: GRPOConfig's own defaults (bf16=True, checkpointing on) must not decide
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=device == "cpu",
        # (activation_checkpointing is transformers 5's name for gradient checkpointing)
        activation_checkpointing=config.gradient_checkpointing,
        # non-reentrant checkpointing needs no requires_grad on the (frozen) input embeddings
        activation_checkpointing_kwargs={"use_reentrant": False} if config.gradient_checkpointing else None,
        report_to=report_to or "none",
        dataloader_num_workers=0,  # rows in memory: workers would only add fork overhead
        disable_tqdm=False,  # keeps Trainer from adding PrinterCallback; its bar is swapped for ours
    )


def _training_arguments(config: TrainConfig, run_dir: Path, device: str, precision: str,
                        report_to: list[str]) -> TrainingArguments:
    return TrainingArguments(
        **common_trainer_arguments(config, run_dir, device, precision, report_to),
        # PEFT's wrapper hides forward's signature: without this Trainer cannot find the labels
        label_names=["labels"],
        # under a launcher, divide by the supervised tokens of ALL ranks (Trainer gathers the count and
        # scales by the world size, DDP averages): N ranks x batch b == 1 rank x batch N*b
        average_tokens_across_devices=True,
        # batches of similar-length rows: random batches of GSM8K rows pad to the longest of 8,
        # 1.43x the real tokens; grouped ones (data.length_grouped_order, which the dataset applies
        # per epoch, so the sampler reads it in sequence) to 1.11x on 64 rows, 1.02x on 256 or more
        # (transformers' LengthGroupedSampler: 1.30x and 1.09x; equal from ~2,000 rows)
        train_sampling_strategy="sequential" if config.group_by_length else "random",
        remove_unused_columns=False,  # our rows are plain dicts; nothing to drop
    )


# --------------------------------------------------------------------------- run


def run(session: TrainingSession) -> TrainResult:
    """Preflight, train, save the final model. A guard halt saves nothing new and re-raises."""
    config, trainer = session.config, session.trainer
    callbacks = session.callbacks
    step_cb, marker_cb, interrupt_cb = callbacks.step, callbacks.checkpoint, callbacks.interrupt
    if config.guards:
        from mathtune import guards

        # every rank checks its own model; a failure on any rank stops all of them
        quiet = {} if distributed.is_main_process() else {"echo": None}  # rank 0 prints the checks
        # the checks that pass land in session.preflight (also when a later one halts)
        distributed.collectively(guards.preflight, trainer, config, session.rows, session.device, session.precision,
                                 results=session.preflight, **quiet)
    if session.resume_from:
        print(f"resuming from {session.resume_from}")
    started = time.perf_counter()
    try:
        with signals_stop_training(interrupt_cb):
            trainer.train(resume_from_checkpoint=session.resume_from)
    except TrainingHalted:
        callbacks.progress.close()
        last = marker_cb.last_complete or (session.files.complete_checkpoints() or [None])[-1]
        kept = f"last good checkpoint: {last}" if last else "no checkpoint was written (use --save-steps N)"
        if distributed.is_main_process():
            print(f"training halted; no final model saved; {kept}", file=sys.stderr)
        raise
    except Exception as exc:
        # a checkpoint save that ran out of space: the partial checkpoint-N goes, earlier ones stay
        failure = checkpoint_write_failure(exc, session.files, trainer.state.global_step,
                                           estimate=_checkpoint_bytes(session.model))
        if failure is None:
            raise
        raise failure from exc
    finally:
        callbacks.progress.close()
    seconds = time.perf_counter() - started

    run_dir = session.run_dir
    if interrupt_cb.stopped_at is not None:
        raise_interrupted(session)
    _write_final_model(session)
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


def _checkpoint_bytes(model) -> int:
    """About what a checkpoint takes before one exists to measure: the trained weights and AdamW's two
    moments, fp32 each (the tokenizer's few MB aside)."""
    return 12 * sum(p.numel() for p in model.parameters() if p.requires_grad)


def _write_final_model(session: TrainingSession) -> None:
    """The final model and trainer state into the run dir; a save that fails writing (full disk) removes
    what it wrote and is one line naming the checkpoint to resume from."""
    trainer, run = session.trainer, session.files
    before = snapshot_files(run.root)
    try:
        trainer.save_model(str(session.run_dir))  # every rank calls it (FSDP gathers shards); Trainer writes on rank 0
        distributed.on_main(lambda: trainer.state.save_to_json(str(run.trainer_state)))
    except Exception as exc:
        failure = final_save_failure(exc, run, before, estimate=_checkpoint_bytes(session.model) // 3)
        if failure is None:
            raise
        raise failure from exc


def raise_interrupted(session: TrainingSession) -> None:
    """After a signal stopped training: no final model (the checkpoint is the state), say how to continue."""
    import signal

    interrupt_cb, marker_cb = session.callbacks.interrupt, session.callbacks.checkpoint
    checkpoint = marker_cb.last_complete
    name = signal.Signals(interrupt_cb.signal).name
    if checkpoint is None or checkpoint != session.files.checkpoint(interrupt_cb.stopped_at):
        raise TrainingInterrupted(f"{name}: stopped after step {interrupt_cb.stopped_at} but its checkpoint was not "
                                  f"completed; the newest marked checkpoint is the one to resume",
                                  interrupt_cb.exit_code)
    raise TrainingInterrupted(f"{name}: stopped after step {interrupt_cb.stopped_at}; checkpoint saved: {checkpoint}",
                              interrupt_cb.exit_code, checkpoint)


def compare_after_training(config: TrainConfig, result: TrainResult) -> TrainResult:
    """Base vs trained on ``config.eval.samples`` held-out items, then report.md (run dir)."""
    from mathtune.comparison import run_compare
    from mathtune.config import EvalConfig, ModelSettings
    from mathtune import report

    # the model/task settings both configs share (ModelSettings), so eval sees the same task and split
    shared = {f.name: getattr(config, f.name) for f in dataclasses.fields(ModelSettings)}
    eval_config = EvalConfig(**shared, max_samples=config.eval.samples,
                             generation=dataclasses.replace(config.eval.generation)).validate()
    print(f"\ncomparing base vs trained on {config.eval.samples} held-out {config.task} items")
    comparison = run_compare(
        config.model,
        str(result.run_dir),
        eval_config,
        output_path=RunDir(result.run_dir).comparison,
        output_dir=RunDir(result.run_dir).eval_dir,
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
        if config.eval.samples > 0:
            result = compare_after_training(config, result)
        return result
    finally:
        RunDir(config.output_dir).unlock()


# --------------------------------------------------------------------------- summaries


def start_summary(session: TrainingSession) -> str:
    from mathtune.models.spec import describe_model

    c, s = session.config, session.data_stats
    lines = []
    if c.method == "lora":
        how = f"LoRA r={c.lora_r} alpha={c.lora_alpha} on {', '.join(c.target_modules)}"
        frozen = sorted({str(p.dtype)[6:] for p in session.model.parameters() if not p.requires_grad})
        if "bfloat16" in frozen:  # store_frozen_weights_in_bf16 ran
            how += " (frozen base weights stored in bf16, LoRA weights fp32)"
    else:
        how = "full fine-tuning"
    lines.append(f"model: {describe_model(c.model)}; {how}: {session.trainable_params:,} trainable of "
                 f"{session.total_params:,} parameters ({session.trainable_params / session.total_params:.2%})")
    dropped = ", ".join(f"{n} {reason}" for reason, n in s.dropped.items()) or "none"
    lines.append(f"task: {c.task} (judge {session.data.judge_rule}); rows read {s.read}, kept {s.kept}, dropped "
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
    lines.append(session.compile.summary_line())
    lines.append(f"optimizer: AdamW lr {c.learning_rate:g}, {c.lr_scheduler} schedule, warmup {c.warmup_ratio:g} "
                 f"of steps, seed {c.seed}")
    if c.max_time is not None:
        lines.append(f"time budget: --max-time {c.max_time:g} s: the {c.lr_scheduler} schedule runs over whichever "
                     f"ends first, {session.planned_steps} steps or {c.max_time:g} s; the steps it buys are "
                     f"estimated after step {ESTIMATE_AFTER_STEPS}")
    # save_total_limit None is Trainer's "never delete a checkpoint"
    keep = "all" if c.save_total_limit is None else f"the last {c.save_total_limit}"
    checkpoints = f"every {c.save_steps} steps (keep {keep})" if c.save_steps else "final model only"
    lines.append(f"run dir: {session.run_dir}; checkpoints: {checkpoints}")
    lines.append(f"guards: {'on' if c.guards else 'OFF (--no-guards)'}; collapse prompts from "
                 f"{session.data.sample_source}")
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
