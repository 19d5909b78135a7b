"""Reinforcement learning from verifiable rewards: config -> TRL ``GRPOTrainer`` (+ LoRA, + guards) -> run dir.

The same named phases as ``recipe`` (setup -> run -> train) and the same run-dir, time-budget,
checkpoint, SIGTERM and ``--resume auto`` machinery (``StepCallback``, ``CheckpointMarker``,
``InterruptCallback``, ``TimeBudget``, ``RunDir``): only the trainer and the data differ.

  data     the task's train rows become a dataset of ``prompt`` (the question) + ``gold`` + ``id``;
           TRL's RepeatSampler repeats each question ``num_generations`` times in a row
  sample   ``RolloutSampler`` (mathtune/generation/rollout.py) through TRL's ``rollout_func``,
           or TRL's own ``model.generate`` (``--sampler trl``, or a family the fast path cannot serve)
  score    ``correctness``: the per-item rule of eval's ``accuracy`` (``evaluation.judge_item``'s
           ``correct``: flexible extraction, then the task's judge rule), 1 or 0; optionally a
           format reward (``#### N`` present), weighted by ``--format-reward``
  update   TRL's loss (``--loss-type``), advantages within each group of G; with ``beta`` 0 no
           reference model is kept

One optimizer step = one generation batch (TRL's ``steps_per_generation`` = accumulation steps):
``batch_size x accumulation / G`` questions, each sampled G times, then scored, then trained on.

The setup phases shared with ``train`` are ``training.recipe``'s (placement, run-dir checks, LoRA
targets, report targets, collapse-check questions, the interrupt exit); the judge is
``answers.judge_answer`` and the sampler ``generation.rollout`` on the ``Generator``'s fast path.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import set_seed
from transformers.trainer_callback import ProgressCallback

from mathtune import compat, distributed
from mathtune.budget import TimeBudget
from mathtune.config import save_config
from mathtune.errors import MathtuneError, TrainingHalted
from mathtune.grpo_config import GRPOSettings
from mathtune.interrupt import InterruptCallback, signals_stop_training
from mathtune.run_dir import RunDir
from mathtune.shared_prefix import prompt_groups, score_completions_by_group
from mathtune.step_stats import StepStats
from mathtune.training import recipe
from mathtune.training.callbacks import (ESTIMATE_AFTER_STEPS, CheckpointMarker, ConsoleProgress, StepCallback,
                                         TrainingCallbacks)
from mathtune.training.grpo_guards import RLStats, rl_guard_callbacks
from mathtune.training.trainer import MathtuneTrainer

_TRL_IMPORTED = False


def _import_trl():
    """TRL, quietly: its rollout_func notice is printed once by mathtune's own start summary instead."""
    global _TRL_IMPORTED
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import trl

    _TRL_IMPORTED = True
    return trl


# --------------------------------------------------------------------------- rewards


def is_correct(text: str, gold: float | str, judge_rule: str) -> bool:
    """The per-item rule ``accuracy`` uses: ``answers.judge_answer``, the one judge of eval, compare,
    rft and this reward (a number gold by the task's rule, a LaTeX gold by math-verify)."""
    from mathtune.answers import judge_answer

    return judge_answer(text, gold, judge_rule).correct


def has_final_answer(text: str) -> bool:
    from mathtune.answers import extract_strict

    return extract_strict(text) is not None


def correctness_reward(judge_rule: str, stats: RLStats | None = None):
    """TRL reward function: 1.0 for a correct completion, 0.0 otherwise (records the step's figures in ``stats``)."""

    def correctness(prompts, completions, completion_ids, gold, **kwargs):
        started = time.perf_counter()
        # golds travel as JSON text: a number or a LaTeX answer in one dataset column
        rewards = [float(is_correct(_text(c), json.loads(g), judge_rule)) for c, g in zip(completions, gold)]
        if stats is not None:
            stats.record_scores(rewards, [len(c) for c in completion_ids], kwargs.get("stop_reason"),
                                time.perf_counter() - started)
        return rewards

    return correctness


def format_reward(prompts, completions, **kwargs):
    """TRL reward function: 1.0 when the completion states its answer as ``#### N``."""
    return [float(has_final_answer(_text(c))) for c in completions]


def _text(completion) -> str:
    """A completion as TRL passes it: text, or (conversational prompts) ``[{"role": "assistant", "content": text}]``."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


# --------------------------------------------------------------------------- the trainer


def _grpo_trainer_class():
    trl = _import_trl()

    class MathtuneGRPOTrainer(MathtuneTrainer, trl.GRPOTrainer):
        """TRL's GRPOTrainer with MathtuneTrainer's time-budget schedule and offline adapter saves, recording
        each micro-batch into ``StepStats`` (the guards and metrics.jsonl read it)."""

        def __init__(self, *args, rl_stats: RLStats, shared_prompt: bool = False, **kwargs):
            # supervised_logits / shared_prefix / attention: MathtuneTrainer's SFT paths, off (GRPO's loss is TRL's)
            super().__init__(*args, supervised_logits=False, shared_prefix=False, attention=None, **kwargs)
            self.rl_stats = rl_stats
            self.shared_prompt = shared_prompt
            self.loss_inputs: dict | None = None  # the micro-batch compute_loss is scoring (_score_completions)

        def train(self, *args, **kwargs):
            # GRPOTrainer's scoring pass asks transformers' deprecated is_gradient_checkpointing: hidden here, so
            # every caller of this trainer (the command, the Python API, the benches) is spared the library noise
            from mathtune.models.load import quiet_checkpointing_deprecation

            with quiet_checkpointing_deprecation():
                return super().train(*args, **kwargs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self.loss_inputs = inputs
            try:
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            finally:
                self.loss_inputs = None

        def training_step(self, model, inputs, num_items_in_batch=None):
            first_of_step = self.step_stats.micro_batches == 0
            started = time.perf_counter()
            # GRPOTrainer.training_step (MathtuneTrainer's records SFT batches, which GRPO's are not)
            loss = trl.GRPOTrainer.training_step(self, model, inputs, num_items_in_batch)
            batch = self._buffered_inputs[(self._step - 1) % self.args.steps_per_generation]
            self.step_stats.record_micro_batch(_as_labelled(batch), loss)
            if first_of_step:
                self.step_stats.step_started = started
            return loss

    problem = compat.install_grpo_scoring(MathtuneGRPOTrainer, _score_completions)
    MathtuneGRPOTrainer.shared_prompt_problem = problem
    return MathtuneGRPOTrainer


def _score_completions(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                       compute_entropy=False, compute_aux_loss=False, **multimodal):
    """TRL's scoring (completion log-probabilities and entropies) with each question group's prompt run
    once (shared_prefix.score_completions_by_group), groups without a learning signal run without a
    backward graph (``_frozen_groups``) or not at all (``_recorded_scores``); TRL's own per-row pass
    where that cannot apply."""
    import trl

    # DDP: one forward per backward (the prompt and row passes would be two); checkpointing drops caches
    if (not self.shared_prompt or compute_aux_loss or self.args.gradient_checkpointing
            or self.accelerator.num_processes > 1 or any(value is not None for value in multimodal.values())):
        return compat.call_trl_scoring(self, trl.GRPOTrainer, model, input_ids, attention_mask, logits_to_keep,
                                       batch_size=batch_size, compute_entropy=compute_entropy,
                                       compute_aux_loss=compute_aux_loss, **multimodal)
    rows, width = input_ids.shape[0], input_ids.shape[1] - logits_to_keep
    groups = prompt_groups(input_ids[:, :width], attention_mask[:, :width])
    frozen = _frozen_groups(self, groups, rows)
    recorded = _recorded_scores(self, input_ids, attention_mask, logits_to_keep, groups, frozen)
    run = [index for index in range(len(groups)) if index not in recorded]
    log_probs = torch.zeros(rows, logits_to_keep, device=input_ids.device)
    entropies = torch.zeros(rows, logits_to_keep, device=input_ids.device) if compute_entropy else None
    if run:
        scored_rows = torch.tensor(sorted(row for index in run for row in groups[index]), device=input_ids.device)
        with self.accelerator.autocast():
            scored = score_completions_by_group(model, input_ids, attention_mask, logits_to_keep, compute_entropy,
                                                groups=[groups[index] for index in run],
                                                frozen_groups={k for k, index in enumerate(run) if index in frozen})
        log_probs = log_probs.to(scored[0].dtype).index_put((scored_rows,), scored[0])
        if compute_entropy:
            entropies = entropies.to(scored[1].dtype).index_put((scored_rows,), scored[1])
    for index, (logps, ents) in recorded.items():
        take = torch.tensor(groups[index], device=input_ids.device)
        log_probs[take] = logps.to(log_probs.dtype)
        if compute_entropy:
            entropies[take] = ents.to(entropies.dtype)
    if torch.is_grad_enabled() and not log_probs.requires_grad:
        # every group frozen: the loss is exactly zero; a zero-weighted sum of the trainable weights
        # gives backward() a graph whose gradients are zero, as TRL's pass would give
        log_probs = log_probs + 0.0 * sum(p.sum() for p in model.parameters() if p.requires_grad)
    return log_probs, entropies, None


def _frozen_groups(trainer, groups: list[list[int]], rows: int) -> set[int]:
    """Groups of the micro-batch being trained whose advantages are all zero. With no KL term (beta 0)
    and no entropy bonus, every loss type TRL offers here multiplies each token's term by its
    advantage, so such a group adds exactly zero loss and zero gradient: it needs no backward graph."""
    advantages = (trainer.loss_inputs or {}).get("advantages")
    if (advantages is None or not torch.is_grad_enabled() or trainer.beta != 0 or advantages.shape[0] != rows
            or trainer.args.entropy_coef != 0 or trainer.args.use_adaptive_entropy):
        return set()
    zero_rows = (advantages.reshape(rows, -1).abs().sum(dim=-1) == 0).tolist()  # one device sync, not one a group
    return {index for index, members in enumerate(groups) if all(zero_rows[row] for row in members)}


def _recorded_scores(trainer, input_ids, attention_mask, logits_to_keep, groups, frozen) -> dict[int, tuple]:
    """Frozen groups whose log-probabilities and entropies the sampler already computed, by group index:
    (log-probabilities, entropies) tensors of the group's rows. They need no forward pass at all.

    Exact for the loss and gradient (a frozen group's terms are zero whatever its log-probabilities)
    and for TRL's metrics to the sampler's rounding (its log-softmax of the same weights at the same
    temperature; tests check 1e-4 in fp32), under the condition that makes them the same weights: TRL
    computed no ``old_per_token_logps`` for the batch, i.e. the step trains the weights that sampled
    it (one generation per optimizer step, one iteration). TRL features that read a frozen group's
    entropies across the batch (``top_entropy_quantile`` < 1) or re-weigh by sampling log-probs
    (``off_policy_mask_threshold``) keep the forward pass. Measured on GSM8K (79% of groups without
    signal): BENCHMARKS.md, "Reinforcement learning"."""
    from mathtune.generation.rollout import RolloutSampler

    sampler, inputs = getattr(trainer, "rollout_func", None), trainer.loss_inputs or {}
    if (not frozen or not isinstance(sampler, RolloutSampler) or sampler.last is None
            or inputs.get("old_per_token_logps") is not None or trainer.args.top_entropy_quantile < 1.0
            or trainer.args.off_policy_mask_threshold is not None):
        return {}
    width = input_ids.shape[1] - logits_to_keep
    prompt_mask, completion_mask = attention_mask[:, :width].bool(), attention_mask[:, width:].bool()
    recorded = {}
    for index in frozen:
        found = [sampler.last.scores_of(input_ids[row, :width][prompt_mask[row]].tolist(),
                                        input_ids[row, width:][completion_mask[row]].tolist())
                 for row in groups[index]]
        if any(scores is None for scores in found):  # e.g. a completion TRL cut or masked: run the group
            continue
        padded = [[values + [0.0] * (logits_to_keep - len(values)) for values in pair] for pair in found]
        recorded[index] = tuple(torch.tensor([pair[k] for pair in padded], device=input_ids.device)
                                for k in range(2))
    return recorded


def _as_labelled(batch: dict) -> dict:
    """A GRPO micro-batch as StepStats counts an SFT one: labels = the completion tokens the loss sees."""
    loss_mask = batch["completion_mask"]
    if "tool_mask" in batch:
        loss_mask = loss_mask * batch["tool_mask"]
    labels = torch.cat([torch.full_like(batch["prompt_ids"], -100),
                        batch["completion_ids"].masked_fill(loss_mask == 0, -100)], dim=1)
    return {"labels": labels, "attention_mask": torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)}


# --------------------------------------------------------------------------- setup


@dataclass
class GRPOSession:
    config: GRPOSettings
    placement: recipe.Placement
    run_dir: Path
    resume_from: str | None
    model: Any
    tokenizer: Any
    questions: int  # training questions kept
    dropped: int  # questions dropped (prompt longer than --max-length)
    judge_rule: str
    calculator: bool
    sampler: str  # "mathtune" | "trl"
    sampler_reason: str
    planned_steps: int
    callbacks: TrainingCallbacks
    trainer: Any
    rl_stats: RLStats
    preflight: list = field(default_factory=list)

    @property
    def files(self) -> RunDir:
        return RunDir(self.run_dir)


@dataclass
class GRPOResult:
    run_dir: Path
    steps: int
    stopped_reason: str  # "completed" | "max_time"
    seconds: float
    first_reward: float | None
    last_reward: float | None
    comparison: dict | None = None


def setup(config: GRPOSettings) -> GRPOSession:
    """Everything needed to train, nothing trained yet (the cheap checks first, as ``recipe.setup``)."""
    trl = _import_trl()
    placement = recipe.setup_placement(config, None)
    if placement.precision == "fp16":
        raise MathtuneError("mathtune grpo runs in bf16 or fp32: use --precision bf16 or fp32")
    run, resume_from = recipe.setup_run_dir_checks(config)
    model, tokenizer = _setup_model(config, placement)
    # a LoRA run dir was merged: a fresh LoRA on top needs those merged weights as its base (below)
    start_weights = dict(model.state_dict()) if _starts_from_adapter(config) and config.method == "lora" else None
    dataset, judge_rule, calculator, dropped, sample_questions, sample_source = _setup_data(config, tokenizer)
    set_seed(config.seed)
    config = recipe.setup_lora_targets(config, model)
    model = _setup_trainable(config, placement, model)
    seconds_offset = recipe.setup_run_dir(config, run, resume_from)
    if start_weights is not None:
        _keep_start_model(model, tokenizer, start_weights, run.root)
    report_to = recipe.setup_report_to(config)
    planned_steps = config.max_steps if config.max_steps > 0 else _planned_steps(config, len(dataset))
    budget = None
    if config.max_time is not None:
        per_epoch = max(_planned_steps(dataclasses.replace(config, max_steps=-1, num_epochs=1.0), len(dataset)), 1)
        budget = TimeBudget(planned_steps=planned_steps, max_time=config.max_time, schedule=config.lr_scheduler,
                            warmup_ratio=config.warmup_ratio, steps_per_epoch=per_epoch)
    rl_stats = RLStats(config.num_generations, config.max_completion_length)
    data = recipe.TrainingData(rows=[], stats=None, judge_rule=judge_rule, sample_questions=sample_questions,
                               sample_source=sample_source)
    callbacks = _setup_callbacks(config, placement, run, tokenizer, data, budget, seconds_offset, rl_stats)
    sampler, reason, rollout = _setup_sampler(config, placement, model, tokenizer, calculator)
    rl_stats.sampler = rollout
    reward_funcs = [correctness_reward(judge_rule, rl_stats)]
    weights = [1.0]
    if config.format_reward > 0:
        reward_funcs.append(format_reward)
        weights.append(config.format_reward)
    args = _grpo_arguments(trl, config, run.root, placement, report_to, weights)
    trainer = _grpo_trainer_class()(
        model=model, reward_funcs=reward_funcs, args=args, train_dataset=dataset, processing_class=tokenizer,
        callbacks=callbacks.in_order(), rollout_func=rollout, step_stats=callbacks.step.stats, time_budget=budget,
        rl_stats=rl_stats, shared_prompt=config.shared_prompt,
    )
    trainer.remove_callback(ProgressCallback)
    return GRPOSession(config=config, placement=placement, run_dir=run.root, resume_from=resume_from, model=model,
                       tokenizer=tokenizer, questions=len(dataset), dropped=dropped, judge_rule=judge_rule,
                       calculator=calculator, sampler=sampler, sampler_reason=reason, planned_steps=planned_steps,
                       callbacks=callbacks, trainer=trainer, rl_stats=rl_stats)


def _starts_from_adapter(config: GRPOSettings) -> bool:
    from mathtune.models.spec import resolve_model_source

    return resolve_model_source(config.model)[0] == "adapter"


def _setup_model(config: GRPOSettings, placement):
    """fp32 master weights. A LoRA run dir (adapter) is merged into its base first: GRPO then trains a
    fresh LoRA on top of the SFT model (``--method full``: every weight of the merged model)."""
    from mathtune.models.load import load_model

    loaded = load_model(config.model, device=distributed.local_device(placement.device), dtype=torch.float32,
                        trust_remote_code=config.trust_remote_code, allow_pickle=config.allow_pickle,
                        merge_adapter=_starts_from_adapter(config))
    return loaded.model, loaded.tokenizer


def _keep_start_model(model, tokenizer, start_weights: dict, run_root: Path) -> None:
    """Save the merged starting weights as ``<run>/start-model`` (once; a resumed run finds them) and
    make it the base every adapter of this run names, so the run dir and its checkpoints load as
    base + adapter in mathtune, PEFT and export alike. Without it the new LoRA would name the SFT run's
    own base and load without the SFT adapter it was trained on top of (~540 MB for SmolLM2-135M)."""
    from mathtune.models.gguf_cache import build_dir_atomically
    from mathtune.models.load import START_MODEL_DIR

    target = run_root / START_MODEL_DIR

    def build(tmp: Path) -> None:
        model.get_base_model().save_pretrained(tmp, state_dict=start_weights)
        tokenizer.save_pretrained(tmp)

    def save() -> None:
        if not (target / "config.json").is_file():
            build_dir_atomically(target, build, what="the merged starting model",
                                 hint="free space there or pass another --output-dir")

    distributed.on_main(save)
    for peft_config in model.peft_config.values():
        peft_config.base_model_name_or_path = str(target.resolve())


def _setup_data(config: GRPOSettings, tokenizer):
    """The task's train questions as TRL's prompt dataset; prompts over --max-length tokens dropped and counted."""
    from datasets import Dataset

    from mathtune.data import encode_prompt, format_prompt, take
    from mathtune.tasks import task_from_config

    task = task_from_config(config)
    examples = take(task.examples("train"), config.max_samples, "train")
    rows, dropped = [], 0
    for ex in examples:
        if len(encode_prompt(tokenizer, format_prompt(tokenizer, ex.question))) > config.max_length:
            dropped += 1
            continue
        rows.append({"prompt": ex.question, "gold": json.dumps(ex.gold), "id": str(ex.id)})
    if not rows:
        raise MathtuneError(f"no training question fits --max-length {config.max_length} tokens "
                            f"({dropped} dropped): raise --max-length")
    questions, source = recipe.sample_questions(task, config)
    # --calculator (train's flag) drives the samples as it drives the end-of-run comparison
    calculator = config.eval.generation.resolved(config.task).calculator
    return Dataset.from_list(rows), task.judge_rule, calculator, dropped, questions, source


def _setup_trainable(config: GRPOSettings, placement, model):
    if config.method == "lora":
        from mathtune.models.load import apply_lora

        model = apply_lora(model, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                           target_modules=config.target_modules)
        if placement.precision == "bf16" and config.bf16_frozen_base:
            recipe.store_frozen_weights_in_bf16(model)
        return model
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def _planned_steps(config: GRPOSettings, questions: int) -> int:
    import math

    if config.max_steps > 0:
        return config.max_steps
    # questions x G completions per epoch / (batch x accumulation x processes) completions per step
    per_epoch = math.ceil(questions * config.num_generations / (config.rows_per_step * distributed.world_size()))
    return math.ceil(config.num_epochs * max(per_epoch, 1))


def _setup_sampler(config: GRPOSettings, placement, model, tokenizer, calculator: bool):
    """("mathtune" | "trl", why, the rollout_func or None). Decided once, on a probe through the real fast path."""
    from mathtune.generation.rollout import RolloutSampler
    from mathtune.models.load import lora_merge_blocker

    if config.sampler == "trl":
        return "trl", "--sampler trl", None
    settings = dataclasses.replace(config.sampling, calculator=calculator)
    autocast = torch.bfloat16 if placement.precision == "bf16" else None
    rollout = RolloutSampler(tokenizer, settings, seed=config.seed, autocast_dtype=autocast)
    why_not = rollout.fast_path_serves(model)
    if why_not is None:
        how = "mathtune's fast path: one prefill per question group"
        unmerged_why = lora_merge_blocker(model)  # what the sampler's lora_merged will find at each call
        if unmerged_why is None:
            how += ", LoRA merged while sampling"
        elif unmerged_why != "no LoRA adapter":
            how += f", LoRA unmerged ({unmerged_why})"
        return "mathtune", f"{how}{', calculator on (forced tokens masked)' if calculator else ''}", rollout
    if config.sampler == "mathtune":
        raise MathtuneError(f"--sampler mathtune: its fast path cannot serve this model ({why_not}): use --sampler "
                            f"trl or auto")
    print(f"mathtune grpo: sampling with TRL's own generation: mathtune's fast path cannot serve "
          f"{type(model).__name__} ({why_not}); no calculator, slower", file=sys.stderr)
    return "trl", f"TRL's generation (fast path: {why_not})", None


def _setup_callbacks(config, placement, run: RunDir, tokenizer, data, budget, seconds_offset: float,
                     rl_stats: RLStats) -> TrainingCallbacks:
    step_stats = StepStats()
    guard_cbs = []
    if config.guards:
        guard_cbs = rl_guard_callbacks(config, step_stats, rl_stats, tokenizer, data.sample_questions, run.root,
                                       placement.precision)
    return TrainingCallbacks(
        interrupt=InterruptCallback(),
        step=StepCallback(step_stats, run.metrics, budget, seconds_offset, extra_fields=rl_stats.log_fields),
        checkpoint=CheckpointMarker(),
        progress=GRPOProgress(),
        guards=guard_cbs,
    )


def _grpo_arguments(trl, config: GRPOSettings, run_dir: Path, placement, report_to: list[str], weights):
    return trl.GRPOConfig(
        **recipe.common_trainer_arguments(config, run_dir, placement.device, placement.precision, report_to),
        # GRPO
        num_generations=config.num_generations,
        max_completion_length=config.max_completion_length,
        temperature=config.sampling.temperature,
        top_p=1.0,
        top_k=0,
        beta=config.beta,
        loss_type=config.loss_type,
        epsilon=config.epsilon,
        scale_rewards=config.scale_rewards,
        mask_truncated_completions=config.mask_truncated_completions,
        reward_weights=weights,
        log_completions=False,
    )


# --------------------------------------------------------------------------- progress


class GRPOProgress(ConsoleProgress):
    """The tqdm line with the RL figures: reward, pass rate, zero-signal share, length, seconds per phase."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs or "loss" not in logs:
            return
        shown = {"loss": f"{logs['loss']:.4f}"}
        for key, label, fmt in (("reward", "reward", ".3f"), ("pass_rate", "pass", ".2f"),
                                ("zero_signal_share", "zero", ".2f"), ("completion_length", "len", ".0f"),
                                ("sample_seconds", "s_sample", ".1f"), ("score_seconds", "s_score", ".2f"),
                                ("train_seconds", "s_train", ".1f")):
            value = logs.get(key)
            if value is not None:
                shown[label] = format(value, fmt)
        self.bar.set_postfix(**shown)


# --------------------------------------------------------------------------- run


def run(session: GRPOSession) -> GRPOResult:
    config, trainer, callbacks = session.config, session.trainer, session.callbacks
    if config.guards:
        from mathtune import guards

        for result in (guards.check_precision(trainer.model, trainer.args, session.placement.device,
                                              session.placement.precision),
                       guards.check_trainable(trainer.model)):
            session.preflight.append(result)
            if distributed.is_main_process():
                print(f"preflight {result.name:<18} ok  {result.value}")
    if session.resume_from:
        print(f"resuming from {session.resume_from}")
    started = time.perf_counter()
    try:
        with signals_stop_training(callbacks.interrupt):
            trainer.train(resume_from_checkpoint=session.resume_from)
    except TrainingHalted:
        callbacks.progress.close()
        last = callbacks.checkpoint.last_complete or (session.files.complete_checkpoints() or [None])[-1]
        kept = f"last good checkpoint: {last}" if last else "no checkpoint was written (use --save-steps N)"
        if distributed.is_main_process():
            print(f"training halted; no final model saved; {kept}", file=sys.stderr)
        raise
    finally:
        callbacks.progress.close()
    seconds = time.perf_counter() - started
    if callbacks.interrupt.stopped_at is not None:
        recipe.raise_interrupted(session)
    trainer.save_model(str(session.run_dir))
    distributed.on_main(lambda: trainer.state.save_to_json(str(session.files.trainer_state)))
    stopped = "max_time" if callbacks.step.stopped_on_time else "completed"
    if stopped == "max_time":
        print(f"stopped on time: --max-time {config.max_time:g} s bought {trainer.state.global_step} of "
              f"{session.planned_steps} planned steps; final model saved")
    rewards = session.rl_stats.rewards
    return GRPOResult(run_dir=session.run_dir, steps=trainer.state.global_step, stopped_reason=stopped,
                      seconds=seconds, first_reward=rewards[0] if rewards else None,
                      last_reward=rewards[-1] if rewards else None)


def train(config: GRPOSettings) -> GRPOResult:
    """setup + run + (with eval_samples > 0) the base-vs-trained comparison."""
    session = setup(config)
    try:
        print(start_summary(session))
        result = run(session)
        del session
        gc.collect()
        if config.eval.samples > 0:
            compared = recipe.compare_after_training(config, result)  # any run dir: works on ours
            result = compared
        return result
    finally:
        RunDir(config.output_dir).unlock()


def start_summary(session: GRPOSession) -> str:
    from mathtune.models.spec import describe_model

    c = session.config
    trainable = sum(p.numel() for p in session.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in session.model.parameters())
    how = f"LoRA r={c.lora_r} alpha={c.lora_alpha}" if c.method == "lora" else "full fine-tuning"
    lines = [
        f"model: {describe_model(c.model)}; {how}: {trainable:,} trainable of {total:,} parameters",
        f"task: {c.task} (reward: judge {session.judge_rule}, 1 correct / 0 wrong"
        f"{f'; + {c.format_reward:g} x format' if c.format_reward > 0 else ''}); {session.questions} questions "
        f"({session.dropped} dropped over --max-length {c.max_length})",
        f"GRPO: G={c.num_generations} samples per question, {c.questions_per_step} questions per step "
        f"({c.batch_size} batch x {c.gradient_accumulation_steps} accumulation / G), loss {c.loss_type}, beta "
        f"{c.beta:g}, temperature {c.sampling.temperature:g}, max completion {c.max_completion_length} tokens",
        f"sampler: {session.sampler} ({session.sampler_reason})",
        f"scoring: {scoring_mode(session)}",
        f"optimizer: AdamW lr {c.learning_rate:g}, {c.lr_scheduler} schedule, warmup {c.warmup_ratio:g}; "
        f"steps: {session.planned_steps}",
    ]
    if c.max_time is not None:
        lines.append(f"time budget: --max-time {c.max_time:g} s: the {c.lr_scheduler} schedule runs over whichever "
                     f"ends first, {session.planned_steps} steps or {c.max_time:g} s (estimated after step "
                     f"{ESTIMATE_AFTER_STEPS})")
    checkpoints = f"every {c.save_steps} steps" if c.save_steps else "final model only"
    lines.append(f"run dir: {session.run_dir}; checkpoints: {checkpoints}; guards: "
                 f"{'on' if c.guards else 'OFF (--no-guards)'}")
    return "\n".join(lines)


def scoring_mode(session: GRPOSession) -> str:
    """How the loss pass runs the model: one prompt pass per question group, or TRL's per-row pass and why."""
    c, trainer = session.config, session.trainer
    why_not = ("--no-shared-prompt" if not c.shared_prompt else trainer.shared_prompt_problem
               or ("--gradient-checkpointing" if c.gradient_checkpointing else None)
               or ("more than one process" if distributed.world_size() > 1 else None))
    if why_not:
        return f"TRL's per-row pass ({why_not})"
    skip = ("groups with all-equal rewards not rerun (their loss is zero; TRL's metrics take the sampler's "
            "log-probabilities and entropies)" if c.beta == 0 else "every group with gradients (beta > 0)")
    return f"one prompt pass per question group, shared by its G completions; {skip}"


def end_summary(result: GRPOResult) -> str:
    how = "stopped on time (--max-time)" if result.stopped_reason == "max_time" else "completed"
    reward = ""
    if result.first_reward is not None:
        reward = f"; reward {result.first_reward:.3f} -> {result.last_reward:.3f}"
    return f"grpo {how}: {result.steps} steps in {result.seconds:.0f} s{reward}\nrun dir: {result.run_dir}"
