"""``mathtune env``: versions, CPU bf16 flags, the device/precision policy's choice and the cache."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_env_reports_versions_device_precision_and_cache(tmp_path):
    torch = __import__("pytest").importorskip("torch")
    from mathtune.hardware import CPU_BF16_FLAGS, choose_device, choose_precision, read_cpu_flags

    cache = tmp_path / "cache"
    (cache / "m").mkdir(parents=True)
    (cache / "m" / "w.bin").write_bytes(b"x" * 3 * 2**20)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), MATHTUNE_CACHE=str(cache), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "mathtune", "env"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines())
    for name in ("torch", "transformers", "peft", "accelerate", "datasets", "gguf"):
        assert lines[name] == metadata.version(name)
    assert lines["python"].startswith(".".join(map(str, sys.version_info[:3])))
    have = sorted(set(CPU_BF16_FLAGS) & read_cpu_flags())
    assert lines["cpu"].endswith(f"bf16 flags: {', '.join(have) or 'neither'}")
    device, why = choose_device("cpu")
    precision, reason = choose_precision("auto", "cpu")
    assert lines["device"].startswith("cpu (") and lines["precision"] == f"{precision} ({reason})"
    assert lines["cache"].startswith(f"{cache} (3.0 MiB")
    assert torch.__version__ == lines["torch"] or lines["torch"].startswith(torch.__version__.split("+")[0])


def test_env_explains_an_unavailable_device_instead_of_failing(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), MATHTUNE_CACHE=str(tmp_path / "none"), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "mathtune", "env", "--device", "cuda"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "device/precision: --device cuda: no CUDA device available" in proc.stdout
    assert "not created yet" in proc.stdout
