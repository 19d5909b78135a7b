"""``mathtune env``: what to paste into a bug report (like ``trl env`` / ``transformers env``).

Versions, the CPU and its bf16 support, the device and precision ``mathtune train`` would choose
with these flags and why (the same policy functions training calls), and the model cache.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

from mathtune.config import ModelSettings, add_config_arguments

PACKAGES = ("mathtune", "torch", "transformers", "peft", "accelerate", "datasets", "gguf")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, ModelSettings, only=("device", "precision"))


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        if name == "mathtune":  # a source tree that was never pip-installed
            from mathtune import __version__

            return __version__
        return "not installed"


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's marketing name ("model name" on Linux); platform's guess elsewhere."""
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() == "model name":
                return value.strip()
    except OSError:
        pass  # not Linux: platform.processor() below is the best there is
    return platform.processor() or platform.machine() or "unknown"


def directory_size(path: Path) -> int:
    """Bytes under ``path`` (files only; links are not followed)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            file = Path(root, name)
            if not file.is_symlink():
                total += file.stat().st_size
    return total


def report_lines(device_flag: str = "auto", precision_flag: str = "auto") -> list[str]:
    # imported here: torch must not load while the CLI parser is built (tests/test_cli_imports.py)
    from mathtune.errors import MathtuneError
    from mathtune.hardware import CPU_BF16_FLAGS, choose_device, choose_precision, read_cpu_flags
    from mathtune.models.spec import cache_dir

    lines = [f"{name}: {package_version(name)}" for name in PACKAGES]
    lines.insert(0, f"python: {platform.python_version()} ({sys.executable})")
    lines.append(f"platform: {platform.platform()}")
    bf16 = sorted(set(CPU_BF16_FLAGS) & read_cpu_flags())
    lines.append(f"cpu: {cpu_model()}, {os.cpu_count()} logical cores; bf16 flags: {', '.join(bf16) or 'neither'}")
    import torch

    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(index)
            lines.append(f"cuda:{index}: {torch.cuda.get_device_name(index)}, compute capability {major}.{minor}")
    else:
        lines.append(f"cuda: not available (torch built with {'CUDA ' + torch.version.cuda if torch.version.cuda else 'no CUDA'})")
    try:
        device, device_reason = choose_device(device_flag)
        precision, precision_reason = choose_precision(precision_flag, device)
        lines.append(f"device: {device} ({device_reason})")
        lines.append(f"precision: {precision} ({precision_reason})")
    except MathtuneError as exc:  # e.g. --device cuda here: the report still prints, with the reason
        lines.append(f"device/precision: {exc}")
    cache = cache_dir()
    if cache.is_dir():
        lines.append(f"cache: {cache} ({directory_size(cache) / 2**20:.1f} MiB; set MATHTUNE_CACHE to move it)")
    else:
        lines.append(f"cache: {cache} (not created yet; set MATHTUNE_CACHE to move it)")
    return lines


def run(args: argparse.Namespace) -> int:
    for line in report_lines(args.device or "auto", args.precision or "auto"):
        print(line)
    return 0
