"""Device and precision policy: which device, which precision, and the one precision -> dtype map.

Also the check that ``Trainer`` really trains on the GPU ``--device`` names. A single-process
``Trainer`` ignores the device index: its TrainingArguments put the model on ``cuda:0`` (the first
*visible* GPU) and, when more GPUs are visible, wrap it in ``nn.DataParallel`` over all of them,
which multiplies the rows per step by the GPU count. So ``--device cuda:1`` would train on cuda:0,
and ``--device cuda`` on a 4-GPU box on all four with 4x the batch the start summary printed.
CUDA_VISIBLE_DEVICES is the library's way to choose, and it must be set before CUDA starts, i.e. by
the user: name it in the error.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from mathtune.errors import MathtuneError

def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def choose_device(requested: str = "auto") -> tuple[str, str]:
    """(device, reason). auto: cuda, then mps, then cpu. An unavailable explicit device is an error."""
    req = (requested or "auto").strip().lower()
    cuda = torch.cuda.is_available()
    if req == "auto":
        if cuda:
            return "cuda", f"auto: CUDA device available ({torch.cuda.get_device_name(0)})"
        if _mps_available():
            return "mps", "auto: Apple MPS available"
        return "cpu", "auto: no CUDA or MPS device found"
    if req == "cpu":
        return "cpu", "requested --device cpu"
    if req == "cuda" or req.startswith("cuda:"):
        if not cuda:
            built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA support"
            raise MathtuneError(
                f"--device {req}: no CUDA device available (torch {torch.__version__}, {built}): "
                f"use --device cpu or --device auto"
            )
        index = req.partition(":")[2]
        if index:
            if not index.isdigit() or int(index) >= torch.cuda.device_count():
                raise MathtuneError(
                    f"--device {req}: there are {torch.cuda.device_count()} CUDA devices: use --device cuda:N "
                    f"with N < {torch.cuda.device_count()}"
                )
        return req, f"requested --device {req} ({torch.cuda.get_device_name(int(index or 0))})"
    if req == "mps":
        if not _mps_available():
            raise MathtuneError("--device mps: Apple MPS is not available here: use --device cpu or --device auto")
        return "mps", "requested --device mps"
    raise MathtuneError(f"--device '{requested}' is unknown: use auto, cpu, cuda, cuda:N or mps")


def read_cpu_flags(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> frozenset[str]:
    """CPU feature flags from /proc/cpuinfo (Linux). Elsewhere (or unreadable): empty, which makes
    the precision policy pick fp32, the choice that is correct everywhere."""
    if not sys.platform.startswith("linux"):
        return frozenset()
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    flags: set[str] = set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return frozenset(flags)


PRECISIONS = ("fp32", "bf16", "fp16")


def dtype_of(precision: str) -> torch.dtype:
    """The torch dtype of a precision name: the one place the mapping is written."""
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes:
        raise MathtuneError(f"precision '{precision}' is unknown: use {', '.join(PRECISIONS)}")
    return dtypes[precision]


CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
_FP16_REFUSAL = "fp16 on {dev} is unsupported (no loss scaling, overflows): use --precision bf16 or fp32"


def choose_precision(requested: str, device: str) -> tuple[str, str]:
    """("fp32"|"bf16"|"fp16", reason) for ``device``.

    auto: CUDA -> bf16 on compute capability >= 8.0 (native bf16), else fp16 with gradient scaling
    (``torch.cuda.is_bf16_supported()`` is not used: it says True on older cards that emulate bf16);
    MPS -> fp32; CPU -> bf16 when it has AVX512-BF16 or AMX, else fp32.
    """
    req = (requested or "auto").strip().lower()
    if req not in ("auto", "fp32", "bf16", "fp16"):
        raise MathtuneError(f"--precision '{requested}' is unknown: use auto, fp32, bf16 or fp16")
    dev = device.split(":")[0].lower()
    if req == "fp32":
        return "fp32", "requested --precision fp32: full fp32"

    if dev == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        cc = f"compute capability {major}.{minor}"
        native_bf16 = (major, minor) >= (8, 0)
        if req == "fp16":
            return "fp16", f"requested fp16 on cuda ({cc}): fp16 autocast with gradient scaling"
        if req == "bf16":
            if not native_bf16:
                raise MathtuneError(
                    f"bf16 on cuda {cc} (< 8.0) is emulated and slow: use --precision fp16 or fp32"
                )
            return "bf16", f"requested bf16 on cuda ({cc}): bf16 autocast, fp32 master weights"
        if native_bf16:
            return "bf16", f"cuda {cc} >= 8.0: bf16 autocast, fp32 master weights"
        return "fp16", f"cuda {cc} < 8.0 has no native bf16: fp16 autocast with gradient scaling"

    if dev in ("cpu", "mps"):
        if req == "fp16":
            raise MathtuneError(_FP16_REFUSAL.format(dev=dev))
        if dev == "mps":
            if req == "bf16":
                return "bf16", "requested bf16 on mps (needs macOS 14+): bf16 autocast, fp32 master weights"
            return "fp32", "mps: fp32 (mixed precision training on MPS is not reliable)"
        have = sorted(set(CPU_BF16_FLAGS) & read_cpu_flags())
        if req == "bf16":
            if have:
                return "bf16", f"requested bf16; cpu has {', '.join(have)}: bf16 autocast, fp32 master weights"
            return "bf16", "requested bf16; cpu lacks avx512_bf16/amx_bf16, so bf16 is emulated (slower than fp32)"
        if have:
            return "bf16", f"cpu has {', '.join(have)}: bf16 autocast, fp32 master weights"
        return "fp32", "cpu lacks avx512_bf16/amx_bf16: fp32 (bf16 would be emulated and slower)"
    raise MathtuneError(f"device '{device}' is unknown: use --device auto, cpu, cuda or mps")



# Set by torchrun / accelerate launch: then each process already owns one GPU (distributed training).
_LAUNCHER_VARS = ("LOCAL_RANK", "WORLD_SIZE")


def check_training_device(device: str) -> None:
    """Raise a one-line error when ``Trainer`` would not train on exactly ``device``."""
    if not device.startswith("cuda") or any(v in os.environ for v in _LAUNCHER_VARS):
        return
    index = int(device.partition(":")[2] or 0)
    visible = torch.cuda.device_count()
    if index != 0:
        raise MathtuneError(
            f"--device {device}: training always runs on the first visible GPU: run "
            f"CUDA_VISIBLE_DEVICES={index} mathtune train --device cuda"
        )
    if visible > 1:
        raise MathtuneError(
            f"--device {device}: {visible} GPUs are visible and one training process would use them all through "
            f"DataParallel ({visible}x the rows per step): pick one with CUDA_VISIBLE_DEVICES=0, or launch one "
            f"process per GPU with torchrun / accelerate launch"
        )


@dataclass(frozen=True)
class Placement:
    """Where a model runs and in which precision, with the reasons printed at setup: chosen once per
    command (``Placement.choose``) and passed on to loading, training and generation."""

    device: str
    device_reason: str
    precision: str
    precision_reason: str

    @classmethod
    def choose(cls, device: str = "auto", precision: str = "auto") -> "Placement":
        """``--device`` / ``--precision`` as typed -> the concrete choice (``choose_device``, ``choose_precision``)."""
        chosen_device, device_reason = choose_device(device)
        chosen_precision, precision_reason = choose_precision(precision, chosen_device)
        return cls(chosen_device, device_reason, chosen_precision, precision_reason)

    @property
    def dtype(self) -> torch.dtype:
        return dtype_of(self.precision)

    def on(self, device: str) -> "Placement":
        """The same precision on another device of the same kind (a launched rank's own GPU)."""
        return dataclasses.replace(self, device=device)
