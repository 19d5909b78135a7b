"""``mathtune.progress``: plain lines off a terminal (30 s or 10%, whichever first), tqdm on one."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading

import pytest

from conftest import REPO_ROOT
from mathtune.progress import LogLines, phase, progress_reporter


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_off_a_terminal_a_line_every_tenth_of_the_items_then_a_final_line():
    clock, log = FakeClock(), io.StringIO()
    with progress_reporter(100, "generating", "seq", file=log, clock=clock) as report:
        assert isinstance(report, LogLines)
        for _ in range(100):
            clock.now += 0.125  # 12.5 s in all: the time rule never fires
            report.update(items=1, tokens=50)
    out = lines(log)
    assert len(out) == 9 + 1  # at 10, 20, ..., 90 items, then the final line (100 is the final one)
    assert out[0] == "generating: 10/100 seq (10%), 400 tok/s, 00:01 elapsed, ETA 00:11"
    assert out[4].startswith("generating: 50/100 seq (50%)") and out[4].endswith("ETA 00:06")
    assert out[-1] == "generating: 100/100 seq (100%), 400 tok/s, done in 00:12"


def test_off_a_terminal_a_line_every_30_seconds_when_items_come_slowly():
    """One big batch: no item finishes for minutes, but the caller reports tokens after every chunk."""
    clock, log = FakeClock(), io.StringIO()
    report = progress_reporter(1000, "generating", "seq", file=log, clock=clock)
    for _ in range(25):  # 25 chunks x 5 s = 125 s, no item done
        clock.now += 5
        report.update(tokens=64)
    assert len(lines(log)) == 4  # at 30, 60, 90, 120 s
    # 6 chunks x 64 tokens / 30 s = 13 tok/s; no ETA before the first item is done
    assert lines(log)[0] == "generating: 0/1000 seq (0%), 13 tok/s, 00:30 elapsed"
    clock.now += 5
    report.update(items=1)  # 0.1% of the items: not due, and only 10 s since the last line
    assert len(lines(log)) == 4
    clock.now += 30
    report.update()
    # ETA: 160 s per item so far x 999 items to go = 44:24:00
    assert lines(log)[-1].startswith("generating: 1/1000 seq (0%)") and "ETA 44:24:00" in lines(log)[-1]


def test_a_stopped_job_says_so_and_close_prints_once():
    clock, log = FakeClock(), io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        with progress_reporter(10, "rft", "questions", file=log, clock=clock) as report:
            clock.now += 3
            report.update(items=4)  # 40%: a line
            raise KeyboardInterrupt
    report.close()
    assert lines(log) == ["rft: 4/10 questions (40%), 00:03 elapsed, ETA 00:04",
                          "rft: 4/10 questions (40%), stopped after 00:03"]


def test_on_a_terminal_it_is_tqdm_and_disabled_it_is_silent():
    from tqdm import tqdm

    tty = Terminal()
    report = progress_reporter(4, "generating", "seq", file=tty)
    assert isinstance(report._bar, tqdm)
    report.update(items=2, tokens=10)
    assert report._bar.n == 2
    report.close()
    assert "\r" in tty.getvalue() and "generating" in tty.getvalue()  # a redrawn bar, not log lines
    log = io.StringIO()
    quiet = progress_reporter(4, "generating", file=log, enabled=False)
    quiet.update(items=4)
    quiet.close()
    assert log.getvalue() == ""


def test_phase_prints_start_heartbeats_and_end():
    clock, written = FakeClock(), []
    beats = iter([False, False, True])  # two heartbeats, then the fake wait says stop
    done = threading.Event()

    def fake_wait(seconds: float) -> bool:
        assert seconds == 30
        clock.now += seconds
        stop = next(beats)
        if stop:
            done.set()
        return stop

    with phase("export: writing safetensors", write=written.append, clock=clock, wait=fake_wait):
        assert done.wait(10)  # the heartbeat thread has run its course (an event, not a sleep)
    assert written == ["export: writing safetensors ...",
                       "export: writing safetensors: still running, 00:30 elapsed",
                       "export: writing safetensors: still running, 01:00 elapsed",
                       "export: writing safetensors: done in 01:30"]


def test_phase_that_fails_says_stopped_and_reraises():
    written = []
    with pytest.raises(ValueError):
        with phase("converting", write=written.append, wait=lambda s: True):
            raise ValueError("bad")
    assert written[0] == "converting ..." and written[-1].startswith("converting: stopped after")


def test_cli_eval_with_stderr_in_a_file_prints_progress_lines(tiny_model_dir, tmp_path):
    """`mathtune eval` under nohup/CI: stderr is a file, and the generation still reports as it goes."""
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"question": f"What is {a} plus {a}?", "answer": f"#### {2 * a}"}) + "\n"
                             for a in range(12)))
    log = tmp_path / "stderr.log"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    with open(log, "w") as stderr:
        proc = subprocess.run([sys.executable, "-m", "mathtune.cli", "eval", "--model", str(tiny_model_dir),
                               "--task", "file", "--eval-file", str(items), "--all", "--max-new-tokens", "8",
                               "--batch-size", "4", "--device", "cpu", "--no-cache", "--output", str(tmp_path / "eval")],
                              stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=300, cwd=tmp_path, env=env)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    progress = [line for line in text.splitlines() if line.startswith("generating: ")]
    # 12 items in batches of 4: a line each time >= 10% more are done, then the final line
    assert progress[:-1] and all(re.fullmatch(r"generating: \d+/12 seq \(\d+%\), \d+ tok/s, [\d:]+ elapsed, "
                                              r"ETA [\d:]+", line) for line in progress[:-1]), progress
    assert re.fullmatch(r"generating: 12/12 seq \(100%\), \d+ tok/s, done in [\d:]+", progress[-1])
    assert "\r" not in text.split("evaluating", 1)[1]  # plain lines from the evaluation on, no redrawn bar
