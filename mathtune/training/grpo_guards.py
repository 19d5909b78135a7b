"""Guards for reinforcement learning, and the per-step figures they (and metrics.jsonl) read.

``RLStats`` is filled by the correctness reward (mathtune/training/grpo.py) once per generation
batch, i.e. once per optimizer step: reward, pass rate, the share of question groups whose G rewards
are all equal (zero advantage: no learning signal), mean completion length, the share cut at
``max_completion_length``, seconds sampling and scoring.

``RLSignalGuard`` halts (``TrainingHalted``, at the step boundary, before that step's checkpoint) on:

  no_signal        >= 90% of groups all-equal over the last 10 steps (``--no-signal-steps``): the model
                   solves none (or all) of the sampled questions, so every advantage is 0 and nothing
                   is learned. 10 steps of 4 groups are a noisy window: a run at 79% all-equal groups
                   (GSM8K from the 30-minute SFT recipe) crosses 90% by chance in 78% of 90-step runs,
                   13% at 20 steps, 1.4% at 30, 0.15% at 40 (``python bench/no_signal_window.py``:
                   groups independent); the GSM8K GRPO recipe sets 40
  reward_collapse  the reward's 50-step mean falls below half of its best 50-step mean
  runaway_length   >= 50% of completions cut at max_completion_length over the last 10 steps

``RLNumericGuard`` is guards.NumericGuard without its zero-loss checks: a GRPO loss of exactly 0 is
normal (all advantages 0), while a non-finite loss or gradient still stops the step before the update.
The output-collapse check is guards.CollapseDetector, unchanged.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import TrainerCallback

from mathtune.errors import TrainingHalted
from mathtune.guards import CollapseDetector, NumericGuard, _grad_norm
from mathtune.step_stats import StepStats

NO_SIGNAL_SHARE, NO_SIGNAL_STEPS = 0.9, 10
COLLAPSE_WINDOW, COLLAPSE_FRACTION = 50, 0.5
RUNAWAY_SHARE, RUNAWAY_STEPS = 0.5, 10


class RLStats:
    """Per-step RL figures (``steps``: one dict per generation batch) and the window since the last log line."""

    def __init__(self, num_generations: int, max_completion_length: int):
        self.num_generations = num_generations
        self.max_completion_length = max_completion_length
        self.steps: list[dict] = []
        self.window: list[dict] = []
        self.sampler = None  # the RolloutSampler, when mathtune samples (its last rollout's seconds)

    @property
    def rewards(self) -> list[float]:
        return [s["pass_rate"] for s in self.steps]

    def record_scores(self, rewards: list[float], lengths: list[int], stop_reasons: list[str] | None,
                      score_seconds: float) -> dict:
        g = self.num_generations
        groups = [rewards[i:i + g] for i in range(0, len(rewards), g)]
        if stop_reasons is not None:
            truncated = [reason == "max_completion_length" for reason in stop_reasons]
        else:  # TRL's generation: a completion as long as the limit was cut there
            truncated = [n >= self.max_completion_length for n in lengths]
        rollout = getattr(self.sampler, "last", None)
        record = {
            "pass_rate": sum(rewards) / len(rewards),
            "zero_signal_share": sum(len(set(group)) == 1 for group in groups) / len(groups),
            "completion_length": sum(lengths) / len(lengths),
            "truncated_share": sum(truncated) / len(truncated),
            "sample_seconds": rollout.seconds if rollout is not None else None,
            "score_seconds": score_seconds,
        }
        self.steps.append(record)
        self.window.append(record)
        return record

    def log_fields(self, logs: dict, line: dict) -> dict:
        """The RL fields of one metrics.jsonl line (StepCallback's ``extra_fields``): means over the steps
        since the previous line; ``reward`` is TRL's weighted total."""
        window, self.window = self.window, []
        if not window:
            return {}
        fields = {"reward": logs.get("reward")}
        for key in ("pass_rate", "zero_signal_share", "completion_length", "truncated_share", "sample_seconds",
                    "score_seconds"):
            values = [r[key] for r in window if r[key] is not None]
            fields[key] = sum(values) / len(values) if values else None
        step = line.get("step_seconds")
        spent = (fields["sample_seconds"] or 0.0) + (fields["score_seconds"] or 0.0)
        fields["train_seconds"] = max(step - spent, 0.0) if step is not None else None
        logs.update({k: v for k, v in fields.items() if v is not None})  # the progress bar shows them
        return fields


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


class RLSignalGuard(TrainerCallback):
    """Stops a run that cannot learn: no signal, reward collapse, runaway length (module docstring)."""

    def __init__(self, stats: RLStats, config, *, no_signal_steps: int = NO_SIGNAL_STEPS,
                 collapse_window: int = COLLAPSE_WINDOW, runaway_steps: int = RUNAWAY_STEPS):
        self.stats = stats
        self.config = config
        self.no_signal_steps = no_signal_steps
        self.collapse_window = collapse_window
        self.runaway_steps = runaway_steps
        self.best_window_reward: float | None = None

    def on_step_end(self, args, state, control, **kwargs):
        steps, step = self.stats.steps, state.global_step
        if len(steps) >= self.no_signal_steps:
            recent = steps[-self.no_signal_steps:]
            share = _mean(r["zero_signal_share"] for r in recent)
            if share >= NO_SIGNAL_SHARE:
                solved = _mean(r["pass_rate"] for r in recent)
                which = "none" if solved < 0.5 else "all"
                raise TrainingHalted(
                    "no_signal",
                    f"{share:.0%} of question groups got {self.config.num_generations} equal rewards over the last "
                    f"{self.no_signal_steps} steps (pass rate {solved:.2f}): the model solves {which} of the sampled "
                    f"questions, so there is nothing to learn: start from an SFT run, raise --num-generations, or "
                    f"use {'easier' if which == 'none' else 'harder'} data (a chance streak of a run that does learn: "
                    f"raise --no-signal-steps)", step)
        if len(steps) >= self.runaway_steps:
            share = _mean(r["truncated_share"] for r in steps[-self.runaway_steps:])
            if share >= RUNAWAY_SHARE:
                raise TrainingHalted(
                    "runaway_length",
                    f"{share:.0%} of completions ran to --max-completion-length {self.config.max_completion_length} "
                    f"over the last {self.runaway_steps} steps: the model does not end its answers: start from an SFT "
                    f"run that ends with the end-of-turn token, raise --max-completion-length, or set "
                    f"--mask-truncated-completions", step)
        if len(steps) >= self.collapse_window:
            current = _mean(r["pass_rate"] for r in steps[-self.collapse_window:])
            best = self.best_window_reward
            if best is not None and best > 0 and current < COLLAPSE_FRACTION * best:
                raise TrainingHalted(
                    "reward_collapse",
                    f"the reward's {self.collapse_window}-step mean fell to {current:.3f}, below half of its best "
                    f"{best:.3f}: the policy is unlearning: lower --learning-rate (now {self.config.learning_rate:g}), "
                    f"set --beta (e.g. 0.04) to hold it near the start, and resume from the last good checkpoint",
                    step)
            self.best_window_reward = current if best is None else max(best, current)


class RLNumericGuard(NumericGuard):
    """Non-finite loss or gradients stop the step before the optimizer applies it; an exact-zero loss does
    not (GRPO's loss is 0 whenever every advantage is)."""

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = state.global_step + 1
        if not self.stats.losses_finite():
            values = ", ".join(f"{float(l):g}" for l in self.stats.losses)
            raise TrainingHalted("nonfinite_loss", f"micro-batch loss {values}: {self._diverged(args)}", step)
        norm, _ = _grad_norm(self._trainable(model))
        self.last_grad_norm = norm
        if not math.isfinite(norm):
            raise TrainingHalted("nonfinite_grad", f"gradient norm {norm}: {self._diverged(args)}", step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            raise TrainingHalted("nonfinite_loss", f"logged loss {loss}: {self._diverged(args)}", state.global_step)


def rl_guard_callbacks(config, step_stats: StepStats, rl_stats: RLStats, tokenizer, sample_questions: list[str],
                       run_dir: Path, precision: str) -> list[TrainerCallback]:
    return [
        RLNumericGuard(config, step_stats, precision),
        RLSignalGuard(rl_stats, config, no_signal_steps=config.no_signal_steps),
        CollapseDetector(config, tokenizer, sample_questions, Path(run_dir), precision),
    ]
