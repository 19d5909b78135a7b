"""``GRPOSettings``: everything ``mathtune grpo`` needs; saved as mathtune_config.yaml in the run dir.

It is ``TrainConfig`` (the same model, task, data, optimizer, time budget, checkpoint, guard and
logging settings, with the same flags and YAML keys) plus the reinforcement-learning settings under
TRL ``GRPOConfig``'s own names (``num_generations``, ``max_completion_length``, ``beta``,
``loss_type``, ``temperature``, ...), so a TRL command line or YAML reads the same here. Flags,
YAML layering, underscore spellings and the Trainer/TRL aliases all come from config.py
(``add_config_arguments``, ``build_config``, ``config_from_args``): nothing is re-implemented.

``batch_size`` keeps TRL's meaning here: completions per micro-batch (``per_device_train_batch_size``),
so ``batch_size x gradient_accumulation_steps / num_generations`` questions are sampled per step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mathtune.config import GenerationArgs, TrainConfig, nested, setting
from mathtune.errors import ConfigError

# TRL 1.16's GRPOConfig.loss_type values that take the clipped-ratio path or its variants; the ones
# needing extra settings mathtune does not expose (luspo: sequence-level importance sampling; vespo)
# are left out.
LOSS_TYPES = ("dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo")
SCALE_REWARDS = ("group", "batch", "none")
# auto: mathtune's sampler where its CPU fast path serves the model family, TRL's generation otherwise
SAMPLERS = ("auto", "mathtune", "trl")

# TrainConfig fields that drive `train`'s supervised loss path only (supervised LM head, shared
# system-turn pass, length grouping of SFT rows, compiled layers): GRPO's loss is TRL's, so a value
# other than the default is refused instead of silently doing nothing. The command has no flag for them.
SFT_ONLY_FIELDS = ("supervised_logits", "shared_prefix", "group_by_length", "compile", "cpu_eager_attention")


def _grpo_sampling() -> GenerationArgs:
    # G = 8 samples per question at temperature 1.0 (TRL's defaults), up to 256 tokens each
    return GenerationArgs(num_samples=8, max_new_tokens=256, temperature=1.0)


@dataclass
class GRPOSettings(TrainConfig):
    """``TrainConfig`` + TRL GRPOConfig's names. Defaults: a CPU run of LoRA GRPO without a reference model."""

    # --- changed defaults of TrainConfig fields (meaning as in TrainConfig unless said)
    batch_size: int = setting(8, "completions per micro-batch (TRL's per_device_train_batch_size); a multiple of "
                                 "--num-generations keeps each question's group in one micro-batch")
    learning_rate: float = setting(1e-5, "peak learning rate (TRL's GRPOConfig default is 1e-6 for full fine-tuning; "
                                         "LoRA takes ~10x more)")
    max_length: int = setting(512, "longest tokenized prompt; longer questions are dropped and counted")
    warmup_ratio: float = setting(0.0, "fraction of steps spent warming up the learning rate")
    lr_scheduler: str = setting("constant", "transformers scheduler name, e.g. constant, cosine, linear")
    # --- GRPOConfig's names: the sampling settings are GenerationArgs under TRL's flag names
    # (--num-generations, --max-completion-length, --temperature, --loop-stop); --calculator is train's
    # and drives the samples and the end-of-run comparison alike
    sampling: GenerationArgs = nested(
        _grpo_sampling, "how completions are sampled: G per question (--num-generations), plain temperature "
        "sampling (no top-k/top-p, so the samples come from the policy the loss scores)",
        rename={"num_samples": "num_generations", "max_new_tokens": "max_completion_length"},
        flags=("num_samples", "max_new_tokens", "temperature", "loop_stop"), samples=True)
    beta: float = setting(0.0, "KL coefficient against the starting model (0: no reference model is kept)")
    loss_type: str = setting("dapo", f"TRL's loss formulation: {', '.join(LOSS_TYPES)}", choices=LOSS_TYPES)
    epsilon: float = setting(0.2, "PPO-style clipping of the probability ratio")
    scale_rewards: str = setting("group", "divide advantages by the reward std of the group, the batch, or none "
                                          "(Dr. GRPO)", choices=SCALE_REWARDS)
    mask_truncated_completions: bool = setting(False, "leave completions cut at --max-completion-length out of the loss")
    # --- mathtune's
    format_reward: float = setting(0.0, "weight of a format reward (1 when the completion ends its answer with "
                                        "'#### N'); 0: correctness alone")
    shared_prompt: bool = setting(True, "score each question's G completions on one pass of its prompt (the same "
                                        "loss and gradients as TRL's per-row pass; one process, no gradient "
                                        "checkpointing), and skip the groups whose rewards are all equal (their loss "
                                        "is exactly zero when --beta is 0)")
    no_signal_steps: int = setting(10, "steps the no-signal guard looks back over: it stops the run when nine in ten "
                                       "or more of the question groups in them got all-equal rewards; with few questions a step, "
                                       "a longer window keeps a chance streak from stopping a run that learns")
    sampler: str = setting("auto", "who samples: mathtune (its CPU fast path: one prefill per question group, the "
                                   "calculator, loop stop), trl (GRPOTrainer's own model.generate), or auto (mathtune "
                                   "where its fast path serves the model, trl otherwise, said once)", choices=SAMPLERS)

    def validate(self) -> "GRPOSettings":
        problems = []
        try:
            super().validate()
        except ConfigError as err:
            problems.extend(err.problems)
        problems.extend(self._grpo_problems())
        if problems:
            raise ConfigError(problems)
        return self

    def _grpo_problems(self) -> list[str]:
        problems = []
        g = self.num_generations
        if isinstance(g, int) and 0 < g < 2:
            problems.append(f"--num-generations must be >= 2: GRPO compares samples of one question (got {g})")
        elif isinstance(g, int) and g >= 2 and self.rows_per_step % g != 0:
            problems.append(f"--batch-size {self.batch_size} x --gradient-accumulation-steps "
                            f"{self.gradient_accumulation_steps} = {self.rows_per_step} completions per step is not a "
                            f"multiple of --num-generations {g}: make it one (e.g. --batch-size {g})")
        if self.beta < 0:
            problems.append(f"--beta must be >= 0 (got {self.beta})")
        if not self.epsilon > 0:
            problems.append(f"--epsilon must be > 0 (got {self.epsilon})")
        if not (isinstance(self.no_signal_steps, int) and self.no_signal_steps >= 1):
            problems.append(f"--no-signal-steps must be a whole number >= 1 (got {self.no_signal_steps!r})")
        if self.format_reward < 0:
            problems.append(f"--format-reward must be >= 0 (got {self.format_reward})")
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        for name in SFT_ONLY_FIELDS:
            if getattr(self, name) != defaults[name]:
                problems.append(f"{name}: {getattr(self, name)!r} is a `mathtune train` setting that GRPO does not "
                                f"use (its loss is TRL's): remove it")
        return problems

    @property
    def num_generations(self) -> int:
        """G, TRL's name for the samples per question."""
        return self.sampling.num_samples

    @property
    def max_completion_length(self) -> int:
        return self.sampling.max_new_tokens

    @property
    def questions_per_step(self) -> int:
        # completions per step / G = questions per optimizer step (per device)
        return self.rows_per_step // self.num_generations
