"""--compile auto|on|off: the auto rule and its messages, the errors, and (in the one test marked
``compile``, tens of seconds: torch really compiles) training with compiled decoder layers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mathtune import compilation
from mathtune.config import TrainConfig, build_config
from mathtune.errors import ConfigError, MathtuneError

from conftest import tiny_train_config

def decide(setting="auto", **overrides):
    # compiler_missing=None: check_compiler found one (the test is about the rule, not the machine)
    settings = dict(device="cpu", precision="bf16", planned_steps=1308, rows_per_step=8, world_size=1,
                    max_time=None, compiler_missing=None)
    settings.update(overrides)
    return compilation.decide(setting, **settings)


def test_auto_threshold_is_four_times_the_break_even_of_the_measurement():
    # 35 s of compiling / (0.63 s saved per 8-row step) = 55.6 steps to break even; x4 = 222.2 -> 223
    assert compilation.auto_threshold_steps(8) == 223
    # four times the rows per step save four times as much per step: a quarter of the steps
    assert compilation.auto_threshold_steps(32) == 56


def test_auto_turns_on_for_a_long_run_and_says_why():
    decision = decide(planned_steps=1308)
    assert decision.enabled
    assert decision.summary_line() == ("compile: on (auto: 1,308 planned steps ≥ 223 to earn back ~35 s of compiling "
                                       "at ~0.63 s saved per step of 8 rows)")


def test_auto_stays_off_below_the_threshold_and_at_its_edge():
    assert not decide(planned_steps=60).enabled
    assert "60 planned steps < 223" in decide(planned_steps=60).reason
    assert not decide(planned_steps=222).enabled
    assert decide(planned_steps=223).enabled
    # the same steps at 4x the rows per step earn it back
    assert decide(planned_steps=60, rows_per_step=32).enabled


def test_auto_with_max_time_decides_on_the_step_cap_and_says_so():
    decision = decide(planned_steps=1308, max_time=3300)
    assert decision.enabled
    assert "1,308 planned steps (the step cap; --max-time may stop sooner)" in decision.reason


def test_auto_stays_off_for_a_budget_too_short_to_earn_the_compile_back():
    # 35 s / 15.7% saved = 223 s of training to break even; auto asks 4x: 892 s
    assert compilation.AUTO_MIN_MAX_TIME == pytest.approx(891.1, abs=0.1)
    decision = decide(planned_steps=1308, max_time=360)
    assert not decision.enabled
    assert decision.reason.startswith("auto: --max-time 360 s < 891 s")
    assert not decide(planned_steps=1308, max_time=891).enabled
    assert decide(planned_steps=1308, max_time=892).enabled


@pytest.mark.parametrize("overrides, why", [
    (dict(precision="fp32"), "this run is fp32 on cpu"),
    (dict(device="cuda:0"), "this run is bf16 on cuda"),
    (dict(device="mps", precision="fp32"), "this run is fp32 on mps"),
    (dict(world_size=2), "2 processes"),
    (dict(compiler_missing="no C++ compiler 'g++'"), "no C++ compiler 'g++'"),
])
def test_auto_stays_off_where_the_gain_is_unmeasured_or_compiling_cannot_work(overrides, why):
    decision = decide(**overrides)
    assert not decision.enabled
    assert why in decision.summary_line()
    assert decision.summary_line().startswith("compile: off (auto: ")


def test_off_and_on_are_taken_as_asked():
    assert decide("off").summary_line() == "compile: off (--compile off)"
    on = decide("on", planned_steps=3, precision="fp32")
    assert on.enabled and on.summary_line() == "compile: on (--compile on)"


def test_on_without_a_cpu_compiler_is_a_one_line_error_naming_the_flag(monkeypatch):
    # the real lookup, pointed at a compiler that does not exist
    monkeypatch.setenv("CXX", "no-such-compiler-for-mathtune")
    assert "no-such-compiler-for-mathtune" in compilation.inductor_compiler_missing("cpu")
    with pytest.raises(MathtuneError) as err:
        compilation.check_compiler("on", "cpu")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("--compile on: no C++ compiler 'no-such-compiler-for-mathtune'")
    assert "set CXX" in message and "--compile off" in message
    # auto takes the same answer as a reason to stay off; off looks nothing up
    missing = compilation.check_compiler("auto", "cpu")
    assert not decide(compiler_missing=missing).enabled and "no-such-compiler-for-mathtune" in missing
    assert compilation.check_compiler("off", "cpu") is None


def test_on_for_mps_is_refused():
    with pytest.raises(MathtuneError, match="--compile on: .* does not train on mps"):
        compilation.check_compiler("on", "mps")


def test_train_setup_refuses_compile_on_without_compiler_before_loading_the_model(monkeypatch, tmp_path):
    from mathtune import training

    monkeypatch.setenv("CXX", "no-such-compiler-for-mathtune")
    # a model spec that cannot load: the error must come from --compile, checked first
    config = tiny_train_config(tmp_path / "no-model-here", tmp_path / "run", compile="on")
    with pytest.raises(MathtuneError, match="^--compile on: no C\\+\\+ compiler"):
        training.setup(config)


def test_config_takes_compile_from_yaml_and_flags_and_rejects_other_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("compile: on\n")  # YAML 1.1 reads a bare on as true: taken back as "on"
    assert build_config(TrainConfig, path).compile == "on"
    path.write_text("compile: off\n")
    assert build_config(TrainConfig, path).compile == "off"
    path.write_text("compile: 'on'\n")
    assert build_config(TrainConfig, path).compile == "on"
    assert build_config(TrainConfig, path, {"compile": "off"}).compile == "off"
    assert TrainConfig.from_flat().compile == "auto"
    with pytest.raises(ConfigError, match="--compile 'yes' is not one of auto, on, off"):
        build_config(TrainConfig, None, {"compile": "yes"})


def test_cli_parses_the_compile_flag():
    from mathtune import cli

    args = cli.build_parser().parse_args(["train", "--compile", "off"])
    assert args.compile == "off"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train", "--compile", "maybe"])


def test_start_summary_says_whether_and_why(tiny_model_dir, tmp_path, one_thread):
    from mathtune import training

    session = training.setup(tiny_train_config(tiny_model_dir, tmp_path / "run"))
    try:
        summary = training.start_summary(session)
    finally:
        session.files.unlock()
    assert not session.compile.enabled
    assert ("compile: off (auto: its gain is measured for bf16 on a CPU only, this run is fp32 on cpu; "
            "--compile on to try it)") in summary.splitlines()
    # nothing was compiled: the layers run as they were built
    assert all(getattr(layer, "_compiled_call_impl", None) is None
               for layer in compilation.decoder_layers(session.model))


def test_setup_looks_the_compiler_up_once_and_decides_on_that_answer(tiny_model_dir, tmp_path, one_thread,
                                                                     monkeypatch):
    from mathtune import training

    lookups = []

    def found(device):
        lookups.append(device)
        return None

    monkeypatch.setattr(compilation, "inductor_compiler_missing", found)
    session = training.setup(tiny_train_config(tiny_model_dir, tmp_path / "run", compile="on"))
    session.files.unlock()
    assert lookups == ["cpu"]  # before the model loaded, and not again when --compile was decided
    assert session.compile.summary_line() == "compile: on (--compile on)"


def test_compiled_layers_train_without_the_shared_prefix_pass(tiny_model_dir, tmp_path, one_thread, monkeypatch):
    # its KV cache makes dynamo recompile every layer on its cache slot: compiled runs skip the pass
    from mathtune import training

    monkeypatch.setattr(compilation, "inductor_compiler_missing", lambda device: None)
    sessions = {}
    for setting in ("off", "on"):
        sessions[setting] = training.setup(tiny_train_config(tiny_model_dir, tmp_path / setting, compile=setting))
        sessions[setting].files.unlock()
    assert sessions["off"].trainer.shared_prefix  # the tiny model takes the pass when eager
    assert not sessions["on"].trainer.shared_prefix


def _train(tiny_model_dir, out, setting: str):
    from mathtune import training
    from mathtune.guards import CollapseDetector

    config = tiny_train_config(tiny_model_dir, out, compile=setting, guards=True, sample_every=2, max_steps=4)
    session = training.setup(config)
    detector = next(cb for cb in session.callbacks.guards if isinstance(cb, CollapseDetector))
    graphs_during_checks = []
    check = detector.check

    def counted_check(model, step):
        # tests may look at dynamo's counters; mathtune itself never does
        from torch._dynamo.utils import counters

        before = counters["stats"]["unique_graphs"]
        try:
            return check(model, step)
        finally:
            graphs_during_checks.append(counters["stats"]["unique_graphs"] - before)

    detector.check = counted_check
    result = training.run(session)
    session.files.unlock()
    return session, result, graphs_during_checks


@pytest.mark.compile
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # PEFT's own reload
def test_compiled_training_matches_eager_with_no_recompile_at_the_collapse_check_and_same_adapter(
        tiny_model_dir, tmp_path, one_thread):
    """fp32, so compiled and eager arithmetic agree to rounding; one compiling run (tens of seconds)."""
    import torch._dynamo
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager_session, eager, _ = _train(tiny_model_dir, tmp_path / "eager", "off")
    assert counters["stats"]["unique_graphs"] == 0
    session, compiled, graphs_during_checks = _train(tiny_model_dir, tmp_path / "compiled", "on")
    assert session.compile.summary_line() == "compile: on (--compile on)"
    layers = compilation.decoder_layers(session.model)
    assert layers and all(layer._compiled_call_impl is not None for layer in layers)
    assert counters["stats"]["unique_graphs"] > 0  # the training steps really ran compiled layers

    # the collapse check ran at step 2 and at the end (step 4) without compiling anything
    samples = [json.loads(line) for line in (tmp_path / "compiled" / "samples.jsonl").read_text().splitlines()]
    assert sorted({s["step"] for s in samples}) == [2, 4]
    assert graphs_during_checks == [0, 0]

    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-5)
    assert compiled.steps == eager.steps == 4

    # saved adapters: the same tensor names (no _orig_mod. prefix), and a plain PEFT reload gives the
    # weights the compiled run trained
    saved = load_file(tmp_path / "compiled" / "adapter_model.safetensors")
    assert sorted(saved) == sorted(load_file(tmp_path / "eager" / "adapter_model.safetensors"))
    assert not any("_orig_mod" in name for name in saved)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "compiled")
    trained = {n: p for n, p in session.model.named_parameters() if p.requires_grad}
    reloaded_lora = {n: p for n, p in reloaded.named_parameters() if "lora_" in n}
    assert sorted(trained) == sorted(reloaded_lora)
    for name, weight in trained.items():
        torch.testing.assert_close(reloaded_lora[name], weight.detach(), rtol=0, atol=0)


def test_train_bench_takes_compile_on_and_off_as_settings():
    from bench.train_throughput import parse_settings

    assert parse_settings(["compile=on"]) == {"compile": "on"}
    assert parse_settings(["compile=off", "bf16_frozen_base=false"]) == {"compile": "off", "bf16_frozen_base": False}
