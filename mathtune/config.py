"""Run configurations as dataclasses: one field per setting, its flag and help text beside it.

Settings come from three layers, later wins: the dataclass default, a YAML file (``--config``), the
command-line flags the user actually typed. ``validate()`` collects every problem and raises once
(``ConfigError``), so a user fixes a bad command in one go instead of one flag per run.

The CLI flags are generated from the fields (``add_config_arguments``) so a new setting is one new
field, never a field plus a flag plus a merge rule that can drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mathtune.budget import BUDGET_SCHEDULES
from mathtune.errors import ConfigError, MathtuneError
from mathtune.run_dir import RunDir

# Prompts decoded together by eval/compare. A decode step multiplies every weight by a [rows x 576]
# activation; on a 2-core CPU fp32 matmuls of 64 rows ran at ~60% of the speed of 128-row ones, so
# larger batches decode faster: the demo's 200 trained-model answers took 93.0 s at batch 50, 74.9 s
# at 100 and 64.3 s at 200 (same accuracy). Memory: the fp32 KV cache holds 30 layers x 2 x 192
# floats = 46 KB per token, so 128 GSM8K rows of ~400 tokens (prompt + 256 new) need ~2.4 GB.
EVAL_BATCH_SIZE = 128

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?|mps")
# transformers schedulers that step on an evaluation metric, which mathtune does not compute while training
_METRIC_SCHEDULERS = ("reduce_lr_on_plateau", "greedy")
METHODS = ("lora", "full")
COMPILE_SETTINGS = ("auto", "on", "off")  # --compile (mathtune/compilation.py)
# Fields that are never written to the saved run config (secrets or where to find them).
SECRET_FIELDS = ("wandb_key_file",)
# The names a Hugging Face Trainer / TRL script uses for a mathtune field: alias -> field. Flags and
# YAML keys both accept them (add_config_arguments adds "--alias" next to the field's own flag,
# build_config renames the YAML key), so a setting stays one field with one flag. Names that are
# already the same in both (learning_rate, warmup_ratio, output_dir, save_steps, logging_steps,
# gradient_accumulation_steps, report_to) need no entry: underscores are accepted for every flag.
FIELD_ALIASES = {
    "num_train_epochs": "num_epochs",
    "per_device_train_batch_size": "batch_size",
    "lr_scheduler_type": "lr_scheduler",
    "model_name_or_path": "model",
    "max_seq_length": "max_length",
    "dataset_name": "dataset",
}
# Trainer's report_to targets mathtune can set up (wandb needs its key handling: same as --wandb)
REPORT_TARGETS = ("none", "all", "tensorboard", "wandb")


def setting(default, help: str, **flag_options):
    """A config field with its help text; ``flag_options`` go to ``argparse.add_argument``."""
    factory = None
    if isinstance(default, list):
        factory, default = (lambda d=default: list(d)), dataclasses.MISSING
    kwargs = {"metadata": {"help": help, **flag_options}}
    if factory is not None:
        return field(default_factory=factory, **kwargs)
    return field(default=default, **kwargs)


def nested(factory, help: str, rename: dict[str, str] | None = None, flags: tuple[str, ...] | None = None,
           samples: bool = False):
    """A field holding a settings dataclass (``GenerationArgs``, ``EvalArgs``) whose own fields stay flat
    flags and YAML keys of the command: ``--temperature``, not ``--generation.temperature``, so every
    flag and YAML file written before the nesting keeps working.

    ``rename`` maps an inner field's dotted path (relative to this field) to the flag name it takes
    here (train's end-of-run eval: ``generation.batch_size`` -> ``eval_batch_size``, since
    ``batch_size`` is the training batch); ``flags`` lists the inner paths this command exposes (None:
    all). An unexposed field keeps its default and is neither a flag nor a YAML key of the command.
    ``samples``: these generation settings must draw different samples (temperature > 0: rft, grpo)."""
    return field(default_factory=factory, metadata={"help": help, "nested": True, "rename": dict(rename or {}),
                                                    "flags": flags, "samples": samples})


@dataclass(frozen=True)
class FlatField:
    """One leaf setting of a (possibly nested) config: its flag/YAML name and where it lives."""

    name: str  # flag and YAML key, with underscores (``eval_batch_size``)
    path: tuple[str, ...]  # attribute path in the config (``("eval", "generation", "batch_size")``)
    field: dataclasses.Field
    exposed: bool  # a flag and YAML key of this command


def flat_fields(cls) -> list[FlatField]:
    """Every leaf setting of config class ``cls``, nested ones flattened under their flag names."""
    result = []
    for f in dataclasses.fields(cls):
        if not f.metadata.get("nested"):
            result.append(FlatField(f.name, (f.name,), f, True))
            continue
        rename, exposed = f.metadata["rename"], f.metadata["flags"]
        for leaf in flat_fields(type(f.default_factory())):
            relative = ".".join(leaf.path)
            result.append(FlatField(rename.get(relative, leaf.name), (f.name, *leaf.path), leaf.field,
                                    leaf.exposed and (exposed is None or relative in exposed)))
    return result


def exposed_fields(cls) -> dict[str, FlatField]:
    """The flag/YAML names of ``cls`` -> their fields (nested ones included)."""
    return {ff.name: ff for ff in flat_fields(cls) if ff.exposed}


def get_path(config, path: tuple[str, ...]):
    for name in path:
        config = getattr(config, name)
    return config


def set_path(config, path: tuple[str, ...], value) -> None:
    for name in path[:-1]:
        config = getattr(config, name)
    setattr(config, path[-1], value)


def max_samples_problem(value: int) -> str | None:
    """The one rule for ``--max-samples`` (train, eval, compare, rft, grpo)."""
    if isinstance(value, bool) or not isinstance(value, int) or value == 0 or value < -1:
        return f"--max-samples must be a positive count or -1 for all (got {value!r})"
    return None


PROTOCOLS = ("chat", "lm-eval")


@dataclass
class GenerationArgs:
    """How to decode: the one declaration of the generation settings, nested in every command that
    generates (eval, compare, ask, rft, train's end-of-run comparison, grpo's sampler). Saved in every
    eval summary and part of the eval cache key. ``problems`` holds every rule about them."""

    max_new_tokens: int = setting(256, "longest answer generated, in tokens (the end-of-turn token counts)")
    temperature: float = setting(0.0, "0 = greedy; > 0 samples")
    top_p: float = setting(1.0, "nucleus sampling threshold (with --temperature > 0)")
    num_samples: int = setting(1, "samples per question for pass@k and maj@k (needs --temperature > 0 when > 1)")
    batch_size: int = setting(EVAL_BATCH_SIZE, "rows (prompt x sample) generated together")
    stop: list[str] = setting([], "extra stop strings (generation also stops at end-of-turn)", nargs="*")
    calculator: bool | None = setting(None, "calculator-assisted decoding: compute <<EXPR= results while generating "
                                            "(unset: on for tasks whose targets carry them, e.g. gsm8k)")
    loop_stop: bool = setting(True, "stop an output that repeats a line, an 8+ token span or one <<calculation>> 3 "
                                    "times (flagged 'loop' either way)")
    protocol: str = setting(
        "chat", "how prompts are built and answers scored: chat (zero-shot, chat template, mathtune's extraction) or "
        "lm-eval (lm-evaluation-harness' gsm8k: 5 shots from the train split, plain 'Question:/Answer:' text, its "
        "filters and exact_match, no calculator or loop stop; comparable with published lm-eval GSM8K numbers)",
        choices=PROTOCOLS)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def problems(self, flag=None, require_sampling: bool = False) -> list[str]:
        """Every rule about generation settings, in one place. ``flag(name)`` gives the flag a field
        has in the calling command (train's ``--eval-batch-size``); ``require_sampling``: the command
        needs different samples (rft, grpo)."""
        flag = flag or (lambda name: f"--{_flag(name)}")
        problems = []
        for name in ("max_new_tokens", "num_samples", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                problems.append(f"{flag(name)} must be a positive integer (got {value!r})")
        numeric = isinstance(self.temperature, (int, float)) and not isinstance(self.temperature, bool)
        if not numeric or self.temperature < 0:
            problems.append(f"{flag('temperature')} must be >= 0 (got {self.temperature!r})")
        elif require_sampling and self.temperature == 0:
            problems.append(f"{flag('temperature')} must be > 0: this command needs different samples (got 0)")
        elif self.greedy and isinstance(self.num_samples, int) and self.num_samples > 1:
            problems.append(f"{flag('num_samples')} > 1 needs {flag('temperature')} > 0 (greedy samples are all identical)")
        if not isinstance(self.top_p, (int, float)) or isinstance(self.top_p, bool) or not 0 < self.top_p <= 1:
            problems.append(f"{flag('top_p')} must be in (0, 1] (got {self.top_p!r})")
        if not isinstance(self.loop_stop, bool):
            problems.append(f"{flag('loop_stop')} takes true/false (got {self.loop_stop!r})")
        if self.calculator is not None and not isinstance(self.calculator, bool):
            problems.append(f"{flag('calculator')} takes true/false (got {self.calculator!r})")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            problems.append(f"{flag('stop')} takes a list of non-empty strings (got {self.stop!r})")
        if self.protocol == "lm-eval" and self.calculator:
            problems.append(f"{flag('calculator')} with --protocol lm-eval: lm-evaluation-harness decodes without a "
                            f"calculator, so the numbers would not be comparable; drop {flag('calculator')}")
        return problems

    def validate(self) -> "GenerationArgs":
        problems = self.problems()
        if problems:
            raise ConfigError(problems)
        return self

    def resolved(self, task: str | None) -> "GenerationArgs":
        """A copy with ``calculator`` decided: as given, else on for tasks whose targets carry
        calculator annotations (``Task.calculator_by_default``), off otherwise."""
        from mathtune.tasks import calculator_default

        calculator = bool(self.calculator) if self.calculator is not None else calculator_default(task)
        return dataclasses.replace(self, stop=list(self.stop), calculator=calculator)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "GenerationArgs":
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            names = ", ".join(f.name for f in dataclasses.fields(self))
            raise MathtuneError(f"unknown generation setting(s) {', '.join(unknown)}: use {names}")
        return dataclasses.replace(self, **changes).validate()


@dataclass
class EvalArgs:
    """Train's end-of-run comparison: how many held-out items, decoded how."""

    samples: int = setting(0, "after training, compare base vs trained on N held-out items (0: skip)")
    generation: GenerationArgs = nested(GenerationArgs, "how the comparison decodes")


@dataclass
class ModelSettings:
    """Settings shared by every command that loads a model and a task."""

    model: str = setting("smollm2-135m", "model spec: alias (smollm2-135m), hub id, local dir, .gguf file or LoRA adapter dir")
    task: str = setting("gsm8k", "task name: gsm8k, unit-conversion, file or math (competition style: "
                                 "\\boxed{} answers)")
    train_file: str | None = setting(None, "local training data: JSONL, JSON, CSV, Parquet or a datasets.save_to_disk "
                                           "dir with question/answer columns (see --question-field)")
    eval_file: str | None = setting(None, "local held-out data in the same formats as --train-file")
    dataset: str | None = setting(None, "Hugging Face dataset ORG/NAME[:CONFIG] read with datasets.load_dataset "
                                        "(with --task file or math; --train-split/--eval-split pick its splits)")
    train_split: str = setting("train", "the --dataset split to train on")
    eval_split: str = setting("test", "the --dataset split held out for evaluation")
    question_field: str = setting("question", "column holding the problem (e.g. query, problem; --task math: "
                                              "problem unless set)")
    answer_field: str = setting("answer", "column holding the gold answer: '#### X', \\boxed{X}, 'The answer is: "
                                          "X' or a bare answer, X a number or any math-verify reads (e.g. "
                                          "response, solution; --task math: solution unless set)")
    strip_calculator: bool = setting(False, "remove GSM8K calculator annotations <<a*b=c>> from targets")
    target_format: str = setting(
        "full", "gsm8k training targets: full (the worked solution), equations (only the <<expr=result>> chain "
        "and '#### N'; a row without annotations keeps its full text) or equations-drop (such rows are dropped "
        "and counted)", choices=("full", "equations", "equations-drop"))
    seed: int = setting(42, "random seed (data order, generated tasks, initialisation, sampling)")
    device: str = setting("auto", "where to run: auto, cpu, cuda, cuda:N or mps")
    precision: str = setting("auto", "auto picks bf16/fp16/fp32 from the hardware", choices=PRECISIONS)
    trust_remote_code: bool = setting(False, "allow model repos to run their own Python code (off by default)")
    allow_pickle: bool = setting(False, "allow loading pickle (.bin) checkpoints; safetensors is used otherwise")

    @classmethod
    def from_flat(cls, **values):
        """A config from flag names (``max_new_tokens=16``, ``eval_batch_size=4``), nested where they
        live, not validated (``build_config`` validates); for code and tests that build configs."""
        fields_by_name = exposed_fields(cls)
        unknown = sorted(set(values) - set(fields_by_name))
        if unknown:
            raise MathtuneError(f"unknown setting(s) of {cls.__name__}: {', '.join(unknown)}")
        config = cls()
        for name, value in values.items():
            set_path(config, fields_by_name[name].path, value)
        return config

    def with_flat(self, **values):
        """A copy with settings changed by flag name (nested ones included), not validated."""
        import copy

        fields_by_name = exposed_fields(type(self))
        unknown = sorted(set(values) - set(fields_by_name))
        if unknown:
            raise MathtuneError(f"unknown setting(s) of {type(self).__name__}: {', '.join(unknown)}")
        config = copy.deepcopy(self)
        for name, value in values.items():
            set_path(config, fields_by_name[name].path, value)
        return config

    def _common_problems(self) -> list[str]:
        problems = []
        # YAML values bypass argparse's choices and types: check both here, for YAML and flags alike
        for ff in flat_fields(type(self)):
            value, choices, name = get_path(self, ff.path), ff.field.metadata.get("choices"), _flag(ff.name)
            if choices is not None and value not in choices:
                problems.append(f"--{name} {value!r} is not one of {', '.join(choices)}")
            if isinstance(value, float) and not math.isfinite(value):
                problems.append(f"--{name} must be a finite number (got {value})")
            if isinstance(value, list) and not all(isinstance(item, str) for item in value):
                problems.append(f"--{name} must be a list of strings (got {value!r})")
        if not isinstance(self.device, str) or not _DEVICE_RE.fullmatch(self.device):
            problems.append(f"--device {self.device!r} is unknown: use auto, cpu, cuda, cuda:N or mps")
        for flag, path in (("--train-file", self.train_file), ("--eval-file", self.eval_file)):
            if path is not None and not Path(path).exists():
                problems.append(f"{flag} {path}: no such file or directory")
        if self.dataset is not None and (self.train_file is not None or self.eval_file is not None):
            problems.append("--dataset and --train-file/--eval-file name two data sources: keep one")
        from mathtune.tasks import source_problems  # which task reads what is the task's policy

        return problems + source_problems(self)

    def _max_samples_problems(self) -> list[str]:
        problem = max_samples_problem(self.max_samples)  # the one rule, for every command that has the field
        return [problem] if problem else []

    def _generation_problems(self, require_sampling: bool = False) -> list[str]:
        """``GenerationArgs.problems`` for every nested GenerationArgs, naming this command's flags."""
        leaves = flat_fields(type(self))
        problems = []
        for f_path in sorted({ff.path[:-1] for ff in leaves if len(ff.path) > 1}):
            args = get_path(self, f_path)
            if isinstance(args, GenerationArgs):
                names = {ff.path[-1]: ff.name for ff in leaves if ff.path[:-1] == f_path}
                top = next(f for f in dataclasses.fields(self) if f.name == f_path[0])
                sampling = require_sampling or top.metadata.get("samples", False)
                problems += args.problems(lambda name: f"--{_flag(names[name])}", sampling)
        return problems


@dataclass
class TrainConfig(ModelSettings):
    """Everything ``mathtune train`` needs; saved as mathtune_config.yaml in the run dir."""

    max_samples: int = setting(-1, "training rows to use from the start of the train split (-1: all)")
    max_length: int = setting(512, "longest tokenized prompt+answer; longer rows are dropped and counted")
    batch_size: int = setting(8, "rows per micro-batch (per device)")
    gradient_accumulation_steps: int = setting(1, "micro-batches per optimizer step")
    num_epochs: float = setting(1.0, "passes over the training rows (ignored when --max-steps is set)")
    max_steps: int = setting(-1, "optimizer steps to run; overrides --num-epochs when > 0")
    learning_rate: float = setting(2e-4, "peak learning rate (LoRA default; use ~2e-5 for --full)")
    lr_scheduler: str = setting("cosine", "transformers scheduler name, e.g. cosine, linear, constant")
    warmup_ratio: float = setting(0.03, "fraction of steps spent warming up the learning rate")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    max_grad_norm: float = setting(1.0, "gradient clipping norm (0 disables clipping)")
    max_time: float | None = setting(
        None, "time budget in seconds of training (a resumed run counts the seconds before it): the learning-rate "
        "schedule is laid over it, and training stops at the step boundary where the next step would overrun it")
    output_dir: str = setting("runs/latest", "run directory (model, metrics, report)")
    save_steps: int = setting(0, "write a checkpoint every N optimizer steps (0: only the final model)")
    save_total_limit: int | None = setting(3, "keep at most this many checkpoints")
    logging_steps: int = setting(1, "log metrics every N optimizer steps")
    report_to: list[str] | None = setting(
        None, f"where Trainer logs metrics: {', '.join(REPORT_TARGETS)} (wandb: same as --wandb); "
        "unset: tensorboard when installed, W&B with --wandb", nargs="+")
    method: str = setting("lora", "lora (default) or full fine-tuning", choices=METHODS)
    lora_r: int = setting(16, "LoRA rank")
    lora_alpha: int = setting(32, "LoRA alpha (scaling = alpha / r)")
    lora_dropout: float = setting(0.0, "LoRA dropout")
    target_modules: list[str] | None = setting(
        None,
        "module names LoRA adapts, or all-linear (default: the attention and MLP projections under the names of the "
        "model's family, e.g. q_proj k_proj v_proj o_proj gate_proj up_proj down_proj; Phi-3: qkv_proj o_proj "
        "gate_up_proj down_proj)",
        nargs="+",
    )
    gradient_checkpointing: bool = setting(False, "recompute activations to save memory (slower)")
    group_by_length: bool = setting(True, "batch rows of similar length together (less padding; batches in random order)")
    supervised_logits: bool = setting(True, "run the LM head only at answer positions (same loss, fewer FLOPs)")
    shared_prefix: bool = setting(True, "run the leading tokens every row of a batch shares (the system turn) once per batch, when that saves 15 percent or more of its positions (same loss; one process, no checkpointing)")
    bf16_frozen_base: bool = setting(True, "with bf16 precision and LoRA, store the frozen base weights in bf16 (autocast then makes no per-step bf16 copy of them; the LoRA weights stay fp32 master weights)")
    cpu_eager_attention: bool = setting(True, "on CPU, train batches shorter than 384 tokens with plain matmul+softmax attention and longer ones with torch's SDPA, each the faster there (false: SDPA for all)")
    compile: str = setting(
        "auto", "torch.compile the decoder layers for training: on, off, or auto (on only for a run long enough to "
        "earn back the compile time; the start summary says which and why)", choices=COMPILE_SETTINGS)
    resume: str | None = setting(None, "resume from 'auto' (newest complete checkpoint in --output-dir) or a checkpoint dir", nargs="?", const="auto")
    eval: EvalArgs = nested(EvalArgs, "the base-vs-trained comparison after training (--eval-samples)",
                            rename={"samples": "eval_samples", "generation.batch_size": "eval_batch_size"},
                            flags=("samples", "generation.batch_size", "generation.max_new_tokens",
                                   "generation.calculator"))
    sample_every: int = setting(50, "collapse check: generate from fixed prompts every N steps (0: only at the end)")
    guards: bool = setting(True, "run the preflight and in-training guards (--no-guards only to measure their cost)")
    wandb: bool = setting(False, "log to Weights & Biases (key from WANDB_API_KEY or --wandb-key-file)")
    wandb_project: str = setting("mathtune", "W&B project name")
    wandb_key_file: str | None = setting(None, "file holding the W&B API key (never printed or saved)")

    def validate(self) -> "TrainConfig":
        problems = self._common_problems() + self._generation_problems()
        positive = ("batch_size", "gradient_accumulation_steps", "max_length", "lora_r", "lora_alpha", "logging_steps")
        for name in positive:
            if getattr(self, name) <= 0:
                problems.append(f"--{_flag(name)} must be > 0 (got {getattr(self, name)})")
        problems += self._max_samples_problems()
        if self.max_steps <= 0 and self.max_steps != -1:
            problems.append(f"--max-steps must be > 0, or -1 to use --num-epochs (got {self.max_steps})")
        if self.max_steps == -1 and self.num_epochs <= 0:
            problems.append(f"--num-epochs must be > 0 (got {self.num_epochs})")
        if not self.learning_rate > 0:
            problems.append(f"--learning-rate must be > 0 (got {self.learning_rate})")
        schedulers = _scheduler_names()
        if self.lr_scheduler not in schedulers:
            close = difflib.get_close_matches(self.lr_scheduler, schedulers, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            problems.append(f"--lr-scheduler {self.lr_scheduler!r} is unknown: {hint}use one of {', '.join(schedulers)}")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"--warmup-ratio must be in [0, 1) (got {self.warmup_ratio})")
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"--lora-dropout must be in [0, 1) (got {self.lora_dropout})")
        if self.max_grad_norm < 0:
            problems.append(f"--max-grad-norm must be >= 0 (got {self.max_grad_norm})")
        if self.max_time is not None and self.max_time <= 0:
            problems.append(f"--max-time must be > 0 seconds (got {self.max_time})")
        if self.max_time is not None and self.lr_scheduler not in BUDGET_SCHEDULES:
            problems.append(f"--lr-scheduler {self.lr_scheduler} cannot be laid over --max-time: use one of "
                            f"{', '.join(BUDGET_SCHEDULES)}, or drop --max-time")
        for name, value in (("save_steps", self.save_steps), ("eval_samples", self.eval.samples),
                            ("sample_every", self.sample_every)):
            if value < 0:
                problems.append(f"--{_flag(name)} must be >= 0 (got {value})")
        if self.method == "lora" and self.target_modules is not None and not self.target_modules:
            problems.append("--target-modules needs at least one module name")
        if self.resume not in (None, "auto") and not Path(self.resume).is_dir():
            problems.append(f"--resume {self.resume}: not a checkpoint directory (use --resume auto or a "
                            f"{RunDir.CHECKPOINT_PREFIX}N dir)")
        if self.wandb_key_file is not None and not Path(self.wandb_key_file).is_file():
            problems.append(f"--wandb-key-file {self.wandb_key_file}: no such file")
        if self.eval.samples > 0 and self.eval_file is None and self.dataset is None:
            from mathtune.tasks import TASK_NAMES, task_class

            if self.task in TASK_NAMES and task_class(self.task).reads_dataset:  # no built-in held-out split
                problems.append(f"--eval-samples with --task {self.task} needs --eval-file")
        if self.report_to is not None:
            # Trainer's spelling "a,b" as well as "a b"
            self.report_to = [t.strip() for item in self.report_to for t in item.split(",") if t.strip()]
            unknown = [t for t in self.report_to if t not in REPORT_TARGETS]
            if unknown:
                problems.append(f"--report-to {' '.join(unknown)}: use one or more of {', '.join(REPORT_TARGETS)}")
            elif "none" in self.report_to and len(self.report_to) > 1:
                problems.append("--report-to none cannot be combined with other targets")
            elif "wandb" in self.report_to or "all" in self.report_to:
                self.wandb = True  # one code path for W&B: its key checks live with --wandb
        if problems:
            raise ConfigError(problems)
        return self

    @property
    def rows_per_step(self) -> int:
        # batch × accumulation = rows per optimizer step (per device)
        return self.batch_size * self.gradient_accumulation_steps


@dataclass
class EvalConfig(ModelSettings):
    """Everything ``mathtune eval`` / ``compare`` / ``ask`` need."""

    max_samples: int = setting(200, "held-out items to evaluate from the start of the eval split (-1: all)")
    all: bool = setting(False, "evaluate the whole eval split (same as --max-samples -1)")
    generation: GenerationArgs = nested(GenerationArgs, "how to decode")
    output: str | None = setting(None, "directory for per-item JSONL and summary JSON (default: eval/ in the model's run dir or ./eval)")
    no_cache: bool = setting(False, "ignore cached per-item results and evaluate again")

    def validate(self) -> "EvalConfig":
        problems = self._common_problems() + self._generation_problems()
        if self.generation.protocol == "lm-eval":
            from mathtune.tasks import lm_eval_problems

            problems += lm_eval_problems(self)
        if self.all:
            self.max_samples = -1
        problems += self._max_samples_problems()
        if problems:
            raise ConfigError(problems)
        return self


def _scheduler_names() -> list[str]:
    """The installed transformers' scheduler names (its SchedulerType), less the metric-driven ones."""
    from transformers.trainer_utils import SchedulerType

    return [s.value for s in SchedulerType if s.value not in _METRIC_SCHEDULERS]


def _flag(name: str) -> str:
    return name.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser, cls, only: tuple[str, ...] | None = None,
                         skip: tuple[str, ...] = ()) -> None:
    """Add one flag per dataclass field. Every flag defaults to None so we can tell what was typed.

    A field with a Trainer/TRL name in ``FIELD_ALIASES`` gets that name as a second option string
    (``--num-epochs`` / ``--num-train-epochs``); ``mathtune.cli`` reads underscores as hyphens, so
    ``--num_train_epochs`` reaches it too."""
    aliases: dict[str, list[str]] = {}
    for alias, name in FIELD_ALIASES.items():
        aliases.setdefault(name, []).append(f"--{_flag(alias)}")
    defaults = cls()
    for ff in exposed_fields(cls).values():
        f, name = ff.field, ff.name
        if (only is not None and name not in only) or name in skip:
            continue
        names = [f"--{_flag(name)}", *aliases.get(name, [])]
        meta = {k: v for k, v in f.metadata.items() if k not in ("nested", "rename", "flags")}
        help_text = meta.pop("help", "")
        default = get_path(defaults, ff.path)
        if str(f.type) == "bool | None":
            # tri-state: --x / --no-x, or neither (None: the command decides, e.g. by task)
            parser.add_argument(f"--{_flag(name)}", action=argparse.BooleanOptionalAction, default=None,
                                help=f"{help_text}")
            continue
        if (isinstance(default, bool) or f.type in ("bool", bool)) and name.startswith("no_"):
            # A field already named as a negation: BooleanOptionalAction would read its "--no-..." flag
            # as the negation of "--cache" (False), switching the behaviour off. A plain switch instead.
            parser.add_argument(f"--{_flag(name)}", action="store_true", default=None,
                                help=f"{help_text} (default: {default})")
            continue
        if isinstance(default, bool) or f.type in ("bool", bool):
            parser.add_argument(f"--{_flag(name)}", action=argparse.BooleanOptionalAction, default=None,
                                help=f"{help_text} (default: {default})")
            continue
        kind = _field_type(f)
        if kind is not None and "type" not in meta and "nargs" not in meta:
            meta["type"] = kind
        if "nargs" in meta and kind is not None and kind is not str and "type" not in meta:
            meta["type"] = kind
        parser.add_argument(*names, dest=name, default=None, help=f"{help_text} (default: {default})", **meta)


def _field_type(f: dataclasses.Field):
    text = str(f.type)
    for name, kind in (("float", float), ("int", int), ("str", str)):
        if text.startswith(name) or text.startswith(f"list[{name}"):
            return kind
    return None


def add_method_arguments(parser: argparse.ArgumentParser, *, lora_help: str, full_help: str) -> None:
    """``--lora`` / ``--full``: short for ``--method lora`` / ``--method full``, one or the other."""
    method = parser.add_mutually_exclusive_group()
    method.add_argument("--lora", dest="method", action="store_const", const="lora",
                        help=f"{lora_help} (same as --method lora; the default)")
    method.add_argument("--full", dest="method", action="store_const", const="full",
                        help=f"train every weight (same as --method full; {full_help})")


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise MathtuneError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise MathtuneError(f"{path}: not UTF-8 text (byte {exc.start}): save the config as UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())  # one line, whatever YAML said
        raise MathtuneError(f"{path}{line}: invalid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise MathtuneError(f"{path}: expected a mapping of setting: value, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


# What a run's mathtune_config.yaml records beside the settings (save_config's ``records``).
RECORD_KEYS = ("base_model",)


def build_config(cls, yaml_path: str | Path | None = None, overrides: dict[str, Any] | None = None):
    """Defaults < YAML < typed flags, then validate(). Unknown YAML keys are errors with a suggestion.

    Keys and ``overrides`` use the flat flag names (``eval_batch_size``, ``temperature``); a YAML file
    may also write a nested section as a mapping (``generation: {temperature: 0.7}``)."""
    fields_by_name = exposed_fields(cls)
    names = {name: ff.field for name, ff in fields_by_name.items()}
    values: dict[str, Any] = {}
    problems = []
    if yaml_path is not None:
        data = _flatten_sections(cls, load_yaml(yaml_path))
        for alias, name in FIELD_ALIASES.items():
            if alias in data and name in data:
                problems.append(f"{yaml_path}: '{alias}' and '{name}' are the same setting: keep one")
            elif alias in data and name in names:
                data[name] = data.pop(alias)  # a Trainer/TRL key: the mathtune field of that name
        for key, value in data.items():
            if key in RECORD_KEYS:
                continue  # a run's record, not a setting: its mathtune_config.yaml works as --config
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                problems.append(f"{yaml_path}: unknown setting '{key}'{hint}")
                continue
            value = yaml_switch(names[key], value)
            problem = _type_problem(names[key], value)
            if problem:
                problems.append(f"{yaml_path}: {key}: {problem}")
                continue
            values[key] = value
    if problems:
        raise ConfigError(problems)
    for key, value in (overrides or {}).items():
        if value is not None and key in names:
            values[key] = value
    if isinstance(values.get("target_modules"), str):
        values["target_modules"] = [m.strip() for m in values["target_modules"].split(",") if m.strip()]
    if isinstance(values.get("report_to"), str):
        values["report_to"] = [values["report_to"]]
    if isinstance(values.get("stop"), str):
        values["stop"] = [values["stop"]]
    config = cls()
    for name, value in values.items():
        set_path(config, fields_by_name[name].path, value)
    try:
        return config.validate()
    except ConfigError as err:
        # a bad value that came from the YAML file: name the file, not only the flag
        from_yaml = {f"--{_flag(k)}" for k in values if yaml_path is not None and (overrides or {}).get(k) is None}
        located = [f"{yaml_path}: {p}" if p.split(" ")[0] in from_yaml else p for p in err.problems]
        raise ConfigError(located) from None


def yaml_switch(f: dataclasses.Field, value: Any) -> Any:
    """YAML 1.1 reads an unquoted on/off as true/false: for a setting whose choices are the words
    "on" and "off" (``compile: on``, ``--set compile=on``), take the boolean back as the word."""
    choices = f.metadata.get("choices") or ()
    if isinstance(value, bool) and "on" in choices and "off" in choices:
        return "on" if value else "off"
    return value


def _type_problem(f: dataclasses.Field, value: Any) -> str | None:
    text = str(f.type)
    if value is None:
        return None if "None" in text else "must not be empty"
    if text.startswith("bool"):
        return None if isinstance(value, bool) else f"expected true/false, got {value!r}"
    if text.startswith("int"):
        return None if isinstance(value, int) and not isinstance(value, bool) else f"expected an integer, got {value!r}"
    if text.startswith("float"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else f"expected a number, got {value!r}"
    if text.startswith("list"):
        return None if isinstance(value, (list, str)) else f"expected a list, got {value!r}"
    if text.startswith("str"):
        return None if isinstance(value, str) else f"expected a string, got {value!r}"
    return None


def _flatten_sections(cls, data: dict[str, Any]) -> dict[str, Any]:
    """A YAML mapping under a nested field's name (``generation:``) -> its flat keys; other keys as they are."""
    leaves = flat_fields(cls)
    nested_names = {ff.path[0] for ff in leaves if len(ff.path) > 1}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in nested_names and isinstance(value, dict):
            for inner_key, inner_value in _dotted(value):
                path = (key, *inner_key.split("."))
                match = next((ff.name for ff in leaves if ff.path == path and ff.exposed), None)
                flat[match or f"{key}.{inner_key}"] = inner_value
        else:
            flat[key] = value
    return flat


def _dotted(mapping: dict, prefix: str = ""):
    for key, value in mapping.items():
        key = f"{prefix}{str(key).replace('-', '_')}"
        if isinstance(value, dict):
            yield from _dotted(value, key + ".")
        else:
            yield key, value


def config_from_args(cls, args: argparse.Namespace):
    """Build a validated config from parsed flags (and ``--config`` YAML when the parser has it)."""
    overrides = {name: getattr(args, name, None) for name in exposed_fields(cls)}
    return build_config(cls, getattr(args, "config", None), overrides)


def to_yaml_dict(config) -> dict[str, Any]:
    """The resolved config as plain data under its flag names (flat: a run's mathtune_config.yaml
    reads back as ``--config`` and in every mathtune version), without secrets."""
    return {name: _plain(get_path(config, ff.path)) for name, ff in exposed_fields(type(config)).items()
            if name not in SECRET_FIELDS}


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def save_config(config, path: str | Path, **records: Any) -> None:
    """The resolved settings plus ``records`` (keys in ``RECORD_KEYS``, e.g. ``base_model``: exactly
    which weights the run started from), written atomically."""
    from mathtune.atomic import write_text_atomically

    unknown = set(records) - set(RECORD_KEYS)
    if unknown:
        raise ValueError(f"not a record key of a run's saved config: {', '.join(sorted(unknown))}")
    write_text_atomically(path, yaml.safe_dump({**to_yaml_dict(config), **records}, sort_keys=False))
