"""``--compile auto|on|off``: regional ``torch.compile`` of the decoder layers for training.

Regional, not the whole model: every decoder layer of a causal LM runs the same code on the same
shapes, so torch compiles one layer and the others reuse its graph (compile time of one layer, not
thirty), and the parts between the layers (embedding, the LM head at supervised positions only,
the loss, PEFT's wrapper) stay eager Python that mathtune shapes per batch. transformers'
``TrainingArguments(torch_compile=True)`` instead has accelerate wrap the whole model in one
``torch.compile`` (an ``OptimizedModule``): the graph then spans the per-batch ``logits_to_keep``
mask and the shared-prefix cache, and every ``state_dict`` key gains an ``_orig_mod.`` prefix.
``module.compile()`` compiles a layer in place: parameters, names and saved adapters are unchanged.

The collapse check generates from the training model in eval mode without gradients, which is a
new graph (a recompile per generated length at first, up to dynamo's recompile limit); ``eager()``
runs such code with ``torch.compiler.set_stance("force_eager")``, so the compiled training graph is
neither recompiled nor used there.

Compiled layers train the same with gradient checkpointing (transformers checkpoints inside the
layer's forward, which dynamo traces). The shared-prefix pass (a batch-1 prefix pass with a KV cache)
is turned off when the layers are compiled: dynamo guards on each layer's slot in the cache, so every
layer recompiled until the recompile limit, and the run was slower than eager (training/recipe.py).

``auto`` turns compiling on only where it was measured to pay back its cost within the run (the
rule and its arithmetic are at ``AUTO_MARGIN`` below).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
from dataclasses import dataclass

import torch

from mathtune.config import COMPILE_SETTINGS
from mathtune.errors import MathtuneError

# The measurement behind auto (BENCHMARKS.md, "torch.compile of each decoder layer"): SmolLM2-135M,
# LoRA, bf16 autocast on a 2-core AVX512-BF16 CPU, GSM8K rows at batch 8. Compiling the layers took
# ~35 s; a steady step then took 3.38 s instead of 4.01 s: 0.63 s saved per 8 rows. The saving is
# taken as proportional to the rows a step trains (the per-row elementwise work compiling fuses).
COMPILE_SECONDS = 35.0
SECONDS_SAVED_PER_ROW = (4.01 - 3.38) / 8  # 0.079 s
# Break-even at 8 rows per step: 35 s / 0.63 s per step = 56 steps. auto asks for 4x that (223 steps
# at 8 rows, 56 at 32): compile time grows with the model and the machine's load while the saving
# was measured once, so a run must be long enough that a compile twice as slow and a saving half as
# large would still pay (2 x 2 = 4).
AUTO_MARGIN = 4
# A budget (--max-time) caps the steps before the step count does on a CPU. The saving is a share of
# wall time, 0.63 / 4.01 = 15.7% of a step, so 35 s of compiling is earned back after 35 / 0.157 = 223 s
# of training; auto asks a budget of AUTO_MARGIN x that (892 s): a 6-minute demo stays eager, an
# hour's recipe compiles.
SAVED_SHARE_OF_STEP = (4.01 - 3.38) / 4.01
AUTO_MIN_MAX_TIME = AUTO_MARGIN * COMPILE_SECONDS / SAVED_SHARE_OF_STEP


@dataclass(frozen=True)
class CompileDecision:
    """Whether training compiles its decoder layers, and why (printed in the start summary)."""

    enabled: bool
    reason: str

    def summary_line(self) -> str:
        return f"compile: {'on' if self.enabled else 'off'} ({self.reason})"


def auto_threshold_steps(rows_per_step: int) -> int:
    """Planned optimizer steps from which auto compiles: AUTO_MARGIN x the break-even step count."""
    saved_per_step = SECONDS_SAVED_PER_ROW * rows_per_step
    return math.ceil(AUTO_MARGIN * COMPILE_SECONDS / saved_per_step)


def inductor_compiler_missing(device: str) -> str | None:
    """Why torch's default backend (inductor) cannot build kernels for ``device``, or None if it can.

    On the CPU inductor writes C++ and builds it with ``$CXX``, else ``g++`` (``clang++`` on macOS):
    the same lookup as torch's own, done with ``shutil.which`` rather than torch's private helpers.
    On CUDA it writes Triton kernels, which need the ``triton`` package."""
    kind = device.split(":")[0]
    if kind == "cpu":
        compiler = os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")
        if shutil.which(compiler) is None:
            return (f"no C++ compiler '{compiler}' for torch's inductor on the CPU: install one (e.g. apt-get "
                    f"install g++) or set CXX to one")
        return None
    if kind == "cuda":
        import importlib.util

        if importlib.util.find_spec("triton") is None:
            return "torch's inductor needs the triton package on CUDA: install the triton build for your torch"
        return None
    return f"torch.compile's inductor backend does not train on {kind}"


def check_compiler(setting: str, device: str) -> str | None:
    """The compiler lookup ``--compile setting`` needs on ``device``, done once, before the model loads:
    ``on`` where compiling cannot work is a one-line MathtuneError naming the flag and the fix; else why
    inductor cannot build kernels here (``decide`` keeps auto off with it), or None. ``off`` looks nothing up."""
    if setting == "off":
        return None
    missing = inductor_compiler_missing(device)
    if setting == "on" and missing is not None:
        raise _on_refused(missing)
    return missing


def _on_refused(missing: str) -> MathtuneError:
    """The one-line error for ``--compile on`` where inductor cannot build kernels."""
    return MathtuneError(f"--compile on: {missing}; or use --compile off")


def decide(setting: str, *, device: str, precision: str, planned_steps: int, rows_per_step: int, world_size: int,
           max_time: float | None, compiler_missing: str | None) -> CompileDecision:
    """The --compile setting resolved for this run; ``compiler_missing`` is ``check_compiler``'s answer for
    this setting and device (the lookup is not repeated here). ``auto`` says which condition kept it off."""
    if setting == "off":
        return CompileDecision(False, "--compile off")
    if setting == "on":
        if compiler_missing is not None:  # check_compiler raised this already where it was called first
            raise _on_refused(compiler_missing)
        return CompileDecision(True, "--compile on")
    if setting != "auto":
        raise MathtuneError(f"--compile {setting!r} is not one of {', '.join(COMPILE_SETTINGS)}")
    kind = device.split(":")[0]
    if kind != "cpu" or precision != "bf16":
        # the saving was measured in bf16 on a CPU only; elsewhere auto has nothing to go on
        return CompileDecision(False, f"auto: its gain is measured for bf16 on a CPU only, this run is {precision} on "
                                      f"{kind}; --compile on to try it")
    if world_size > 1:
        return CompileDecision(False, f"auto: {world_size} processes (measured in one); --compile on to try it")
    if compiler_missing is not None:
        return CompileDecision(False, f"auto: {compiler_missing}")
    needed = auto_threshold_steps(rows_per_step)
    # with --max-time the steps the budget buys are known only after a few steps: decide on the step cap
    planned = f"{planned_steps:,} planned steps{' (the step cap; --max-time may stop sooner)' if max_time else ''}"
    payback = (f"to earn back ~{COMPILE_SECONDS:.0f} s of compiling at ~{SECONDS_SAVED_PER_ROW * rows_per_step:.2f} s "
               f"saved per step of {rows_per_step} rows")
    if max_time and max_time < AUTO_MIN_MAX_TIME:
        return CompileDecision(False, f"auto: --max-time {max_time:,.0f} s < {AUTO_MIN_MAX_TIME:,.0f} s, {AUTO_MARGIN}x the "
                                      f"~{COMPILE_SECONDS / SAVED_SHARE_OF_STEP:,.0f} s of training that earn back "
                                      f"~{COMPILE_SECONDS:.0f} s of compiling at ~{100 * SAVED_SHARE_OF_STEP:.0f}% "
                                      f"saved per step")
    if planned_steps >= needed:
        return CompileDecision(True, f"auto: {planned} ≥ {needed:,} {payback}")
    return CompileDecision(False, f"auto: {planned} < {needed:,} {payback}")


def decoder_layers(model) -> list[torch.nn.Module]:
    """The model's repeated decoder layers: transformers builds each family's from
    ``GradientCheckpointingLayer`` (Llama, Qwen2/3, Gemma 2, Mistral, Phi-3 alike)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def compile_decoder_layers(model) -> int:
    """Compile every decoder layer in place; returns how many. Compiling happens lazily, on the first
    training forward (inside ``trainer.train()``, so its seconds count as training time).

    ``dynamic=True``: batches differ in length, and a static first graph would be compiled again as a
    dynamic one at the second length (the measurement paid 9.5 s then 34 s); dynamic from the start
    compiles once."""
    layers = decoder_layers(model)
    if not layers:
        raise MathtuneError(f"--compile: {type(model).__name__} has no transformers decoder layers to compile; "
                            f"use --compile off")
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


@contextlib.contextmanager
def eager():
    """Run the block without compiled code (generation and checks outside the training step): no
    recompile for its new shapes and modes, and the compiled training graph is kept as it was."""
    with torch.compiler.set_stance("force_eager"):
        yield
