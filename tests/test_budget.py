"""The learning-rate schedule laid over --max-time: pure arithmetic, then the real Trainer on the
tiny model driven by a fake clock (each optimizer step 'takes' exactly one second)."""

from __future__ import annotations

import json
import math

import pytest
from transformers import TrainerCallback

from mathtune import training
from mathtune.budget import TimeBudget, schedule_multiplier
from mathtune.config import TrainConfig, build_config
from mathtune.errors import ConfigError

from conftest import tiny_train_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_schedule_shapes():
    assert schedule_multiplier("cosine", 0.0, 0.1) == 0.0
    assert schedule_multiplier("cosine", 0.05, 0.1) == pytest.approx(0.5)
    assert schedule_multiplier("cosine", 0.1, 0.1) == pytest.approx(1.0)
    assert schedule_multiplier("cosine", 0.55, 0.1) == pytest.approx(0.5)
    assert schedule_multiplier("cosine", 1.0, 0.1) == pytest.approx(0.0)
    assert schedule_multiplier("linear", 0.55, 0.1) == pytest.approx(0.5)
    assert schedule_multiplier("constant", 0.0, 0.1) == 1.0
    assert schedule_multiplier("constant_with_warmup", 0.05, 0.1) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        schedule_multiplier("polynomial", 0.5, 0.0)


def test_budget_is_step_based_until_timed_then_follows_the_clock():
    budget = TimeBudget(planned_steps=100, max_time=50.0, schedule="cosine", warmup_ratio=0.0)
    budget.start(0, 0.0)
    assert budget.progress(10) == pytest.approx(0.10)  # no timing yet: steps alone
    for step in range(1, 6):  # 2 s per step: the budget buys 25 steps of the planned 100
        budget.step_ended(step, 2.0 * step)
    assert budget.seconds_per_step == pytest.approx(2.0)
    assert budget.expected_steps() == 25
    # the update after step 5 (called before step 5's end is recorded or after: the same answer)
    assert budget.progress(5) == pytest.approx((10.0 + 2.0) / 50.0)
    assert not budget.should_stop()
    budget.step_ended(24, 48.0)
    assert budget.should_stop()  # step 25 would end at 50 s: the budget's last second, then stop
    assert budget.multiplier(25) < 1e-3


def test_first_step_is_left_out_of_the_step_time():
    budget = TimeBudget(planned_steps=100, max_time=100.0)
    budget.start(0, 0.0)
    budget.step_ended(1, 9.0)  # one-off warm-up
    budget.step_ended(2, 10.0)
    budget.step_ended(3, 11.0)
    assert budget.seconds_per_step == pytest.approx(1.0)


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Tick(TrainerCallback):
    """Advances the fake clock by one 'second' per optimizer step, before anyone reads it."""

    def __init__(self, clock: FakeClock):
        self.clock = clock

    def on_step_end(self, args, state, control, **kwargs):
        self.clock.now += 1.0


def make_config(model_dir, out, **overrides) -> TrainConfig:
    settings = dict(max_samples=32, max_steps=100, lr_scheduler="cosine", warmup_ratio=0.1)
    return tiny_train_config(model_dir, out, **{**settings, **overrides})


def test_time_budget_completes_its_schedule_on_a_fake_clock(tiny_model_dir, tmp_path, capsys):
    session = training.setup(make_config(tiny_model_dir, tmp_path / "run", max_time=20.0))
    clock = FakeClock()
    step_cb = session.callbacks.step
    step_cb.clock = clock
    session.trainer.callback_handler.callbacks.insert(0, Tick(clock))
    summary = training.start_summary(session)
    assert "whichever ends first, 100 steps or 20 s" in summary

    result = training.run(session)

    # 1 s per step and 20 s: step 20 ends at 20 s, where a 21st would overrun
    assert result.stopped_reason == "max_time" and result.steps == 20
    lines = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, 21))
    lrs = [line["learning_rate"] for line in lines]
    peak = max(lrs)
    assert peak == pytest.approx(1e-3, rel=0.05)  # warmup reached the peak...
    assert lrs[-1] < 0.01 * peak  # ...and the cosine reached its floor at the budget's end
    # a step-based cosine over 100 steps would still be at ~0.96 x peak at step 20
    step_based = 0.5 * (1 + math.cos(math.pi * (20 - 10) / 90))
    assert step_based > 0.9
    err = capsys.readouterr().err
    assert "~20 of 100 planned steps" in err and "fit in --max-time 20 s" in err


def test_ample_budget_keeps_the_step_schedule(tiny_model_dir, tmp_path):
    session = training.setup(make_config(tiny_model_dir, tmp_path / "run", max_steps=8, max_time=1000.0))
    clock = FakeClock()
    session.callbacks.step.clock = clock
    session.trainer.callback_handler.callbacks.insert(0, Tick(clock))
    result = training.run(session)
    assert result.stopped_reason == "completed" and result.steps == 8
    lines = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    # progress = steps / 8: the last update runs at the cosine's floor
    assert lines[-1]["learning_rate"] < 0.05 * 1e-3


def test_budget_refuses_a_schedule_it_cannot_stretch(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="--lr-scheduler polynomial cannot be laid over --max-time"):
        make_config(tiny_model_dir, tmp_path / "run", max_time=10.0, lr_scheduler="polynomial")
