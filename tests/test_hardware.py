"""mathtune.hardware: device and precision policy, with the hardware faked (no GPU needed)."""

from __future__ import annotations

import pytest
import torch

from mathtune import hardware
from mathtune.config import TrainConfig, build_config
from mathtune.errors import ConfigError, MathtuneError
from mathtune.hardware import check_training_device, choose_device, choose_precision, read_cpu_flags


def assert_one_line_error(excinfo, *needles):
    message = str(excinfo.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def test_read_cpu_flags_from_injected_file(tmp_path, monkeypatch):
    monkeypatch.setattr(hardware.sys, "platform", "linux")
    x86 = tmp_path / "cpuinfo"
    x86.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 amx_bf16\n\nprocessor\t: 1\nflags\t: fpu\n")
    assert {"avx512_bf16", "amx_bf16", "fpu"} <= read_cpu_flags(x86)
    arm = tmp_path / "cpuinfo-arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert "asimd" in read_cpu_flags(arm)
    assert read_cpu_flags(tmp_path / "absent") == frozenset()
    monkeypatch.setattr(hardware.sys, "platform", "darwin")
    assert read_cpu_flags(x86) == frozenset()


@pytest.mark.parametrize(
    "flags, requested, expected, reason_part",
    [
        ({"avx512_bf16"}, "auto", "bf16", "cpu has avx512_bf16: bf16 autocast, fp32 master weights"),
        ({"amx_bf16", "avx512_bf16"}, "auto", "bf16", "amx_bf16, avx512_bf16"),
        ({"avx2"}, "auto", "fp32", "lacks"),
        (set(), "fp32", "fp32", "requested"),
        ({"avx512_bf16"}, "fp32", "fp32", "requested"),
        (set(), "bf16", "bf16", "emulated"),
    ],
)
def test_choose_precision_cpu(monkeypatch, flags, requested, expected, reason_part):
    monkeypatch.setattr(hardware, "read_cpu_flags", lambda *a: frozenset(flags))
    precision, reason = choose_precision(requested, "cpu")
    assert precision == expected
    assert reason_part in reason


@pytest.mark.parametrize("device", ["cpu", "mps"])
def test_fp16_refused_on_cpu_and_mps(device):
    with pytest.raises(MathtuneError) as excinfo:
        choose_precision("fp16", device)
    assert str(excinfo.value) == (
        f"fp16 on {device} is unsupported (no loss scaling, overflows): use --precision bf16 or fp32"
    )


def test_mps_auto_is_fp32():
    assert choose_precision("auto", "mps")[0] == "fp32"


@pytest.mark.parametrize(
    "capability, requested, expected",
    [
        ((8, 0), "auto", "bf16"),
        ((9, 0), "auto", "bf16"),
        ((8, 6), "bf16", "bf16"),
        ((7, 5), "auto", "fp16"),
        ((7, 0), "auto", "fp16"),
        ((6, 1), "fp16", "fp16"),
        ((7, 5), "fp32", "fp32"),
    ],
)
def test_choose_precision_cuda_uses_compute_capability(monkeypatch, capability, requested, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    # True on older cards through emulation: must not sway the decision
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    precision, reason = choose_precision(requested, "cuda")
    assert precision == expected
    if requested == "auto":
        assert f"{capability[0]}.{capability[1]}" in reason
    if expected == "fp16":
        assert "gradient scaling" in reason


def test_bf16_on_old_cuda_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    with pytest.raises(MathtuneError) as excinfo:
        choose_precision("bf16", "cuda:0")
    assert_one_line_error(excinfo, "7.5", "--precision fp16 or fp32")


def test_unknown_precision():
    with pytest.raises(MathtuneError) as excinfo:
        choose_precision("int8", "cpu")
    assert_one_line_error(excinfo, "--precision 'int8'", "auto, fp32, bf16 or fp16")


def test_choose_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(hardware, "_mps_available", lambda: False)
    assert choose_device("auto")[0] == "cpu"
    assert choose_device("cpu")[0] == "cpu"
    for name in ("cuda", "mps"):
        with pytest.raises(MathtuneError) as excinfo:
            choose_device(name)
        assert_one_line_error(excinfo, f"--device {name}", "--device cpu")
    with pytest.raises(MathtuneError) as excinfo:
        choose_device("tpu")
    assert_one_line_error(excinfo, "--device 'tpu'")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    device, reason = choose_device("auto")
    assert device == "cuda" and "Fake GPU" in reason
    assert choose_device("cuda:0")[0] == "cuda:0"
    with pytest.raises(MathtuneError):
        choose_device("cuda:3")


def test_dtype_of_is_the_one_precision_map():
    assert hardware.dtype_of("fp32") is torch.float32
    assert hardware.dtype_of("bf16") is torch.bfloat16
    assert hardware.dtype_of("fp16") is torch.float16
    with pytest.raises(MathtuneError) as excinfo:
        hardware.dtype_of("auto")  # a choice, not a dtype: choose_precision decides it first
    assert_one_line_error(excinfo, "precision 'auto'", "fp32, bf16, fp16")


def test_device_cuda_1_is_not_silently_trained_on_cuda_0(monkeypatch):
    assert build_config(TrainConfig, None, {"device": "cuda:1"}).device == "cuda:1"  # a valid flag value now
    with pytest.raises(ConfigError, match="--device 'gpu0' is unknown"):
        build_config(TrainConfig, None, {"device": "gpu0"})
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(MathtuneError, match="CUDA_VISIBLE_DEVICES=1 mathtune train --device cuda"):
        check_training_device("cuda:1")
    # two visible GPUs and one process: Trainer would wrap the model in DataParallel over both
    with pytest.raises(MathtuneError, match="2 GPUs are visible .* DataParallel"):
        check_training_device("cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    check_training_device("cuda")
    check_training_device("cuda:0")
    monkeypatch.setenv("LOCAL_RANK", "1")  # torchrun: each process owns its GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_training_device("cuda")
