"""The names users paste: underscore spellings, Trainer/TRL flag and YAML names, exit codes, --version."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mathtune import cli
from mathtune.config import FIELD_ALIASES, TrainConfig, build_config, config_from_args, exposed_fields
from mathtune.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse_train(argv: list[str]) -> TrainConfig:
    args = cli.build_parser(only="train").parse_args(["train", *argv])
    return config_from_args(TrainConfig, args)


@pytest.mark.parametrize("argv, field, value", [
    (["--max_length", "64"], "max_length", 64),
    (["--learning_rate=1e-4"], "learning_rate", 1e-4),
    (["--gradient_accumulation_steps", "4"], "gradient_accumulation_steps", 4),
    (["--warmup_ratio", "0.1"], "warmup_ratio", 0.1),
    (["--output_dir", "runs/x"], "output_dir", "runs/x"),
    (["--save_steps", "5"], "save_steps", 5),
    (["--logging_steps", "3"], "logging_steps", 3),
    (["--num_train_epochs", "2.5"], "num_epochs", 2.5),
    (["--per_device_train_batch_size", "4"], "batch_size", 4),
    (["--lr_scheduler_type", "linear"], "lr_scheduler", "linear"),
    (["--model_name_or_path", "some/model"], "model", "some/model"),
    (["--max_seq_length", "128"], "max_length", 128),
    (["--report_to", "none"], "report_to", ["none"]),
    (["--no_group_by_length"], "group_by_length", False),
])
def test_trainer_and_underscore_names_set_the_mathtune_field(argv, field, value):
    default = getattr(TrainConfig.from_flat(), field)
    assert default != value  # else the test would pass without the flag being read
    assert getattr(parse_train(argv), field) == value


def test_underscores_are_rewritten_in_flag_names_only():
    argv = ["train", "--output_dir", "my_runs/a_b", "--stop=a_b", "--", "--not_a_flag"]
    assert cli.hyphenate_flags(argv) == ["train", "--output-dir", "my_runs/a_b", "--stop=a_b", "--", "--not_a_flag"]


def test_yaml_accepts_trainer_keys_and_refuses_both_spellings(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("num_train_epochs: 3\nper_device_train_batch_size: 2\nlr_scheduler_type: linear\n"
                      "max_seq_length: 96\nreport_to: none\n")
    config = build_config(TrainConfig, recipe)
    assert (config.num_epochs, config.batch_size, config.lr_scheduler, config.max_length) == (3, 2, "linear", 96)
    assert config.report_to == ["none"]
    both = tmp_path / "both.yaml"
    both.write_text("num_epochs: 1\nnum_train_epochs: 2\n")
    with pytest.raises(ConfigError, match="'num_train_epochs' and 'num_epochs' are the same setting"):
        build_config(TrainConfig, both)
    assert set(FIELD_ALIASES.values()) <= set(exposed_fields(TrainConfig))


def test_report_to_selects_trainer_integrations():
    pytest.importorskip("transformers")
    from transformers.integrations import is_tensorboard_available

    from mathtune.training.recipe import setup_report_to as _report_to

    assert _report_to(parse_train(["--report_to", "none"])) == []
    assert parse_train(["--report_to", "wandb"]).wandb is True  # one code path for W&B keys
    default = _report_to(parse_train([]))
    assert default == (["tensorboard"] if is_tensorboard_available() else [])
    with pytest.raises(ConfigError, match="--report-to nonsense"):
        parse_train(["--report_to", "nonsense"])


def _mathtune(*args, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "mathtune", *map(str, args)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300, **kwargs)


def test_version_and_exit_codes(tmp_path):
    from mathtune import __version__

    version = _mathtune("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"mathtune {__version__}"
    usage = _mathtune("train", "--learnig_rate", "1")  # a typo: argparse's usage error
    assert usage.returncode == 2 and "unrecognized arguments" in usage.stderr
    bad_value = _mathtune("train", "--max_steps", "0", "--output_dir", tmp_path / "run")
    assert bad_value.returncode == 2 and bad_value.stderr.startswith("error: --max-steps must be > 0")
    failed = _mathtune("report", tmp_path)  # an empty dir is no run dir: the run fails
    assert failed.returncode == 1 and failed.stderr.startswith("error: ") and "Traceback" not in failed.stderr
    help_text = _mathtune("train", "--help").stdout
    assert "exit status: 0 success, 1" in help_text and "143" in help_text


def _catches(pid: int, signum: int) -> bool:
    """Has the process installed a handler for ``signum``? Linux /proc/PID/status, SigCgt bit signum - 1."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


def _default_sigint():
    # A shell that starts the suite in the background (`make test &` in a script) hands it SIGINT
    # ignored, an ignored signal stays ignored across exec, and Python then installs no Ctrl-C
    # handler: the child would sit out the SIGINT and fail on the empty stdin (exit 1). A terminal's
    # Ctrl-C reaches a process whose SIGINT is at its default, so give the child that.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="waits on /proc/PID/status")
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signals_exit_128_plus_the_signal(signum, code):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1")
    # `ask` with no questions reads stdin: it blocks there, inside main, until the signal
    proc = subprocess.Popen([sys.executable, "-m", "mathtune", "ask", "no-such-model"], cwd=REPO_ROOT, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)
    try:
        # Ready: main has installed its SIGTERM handler (inside its try, so even a signal that lands
        # at once is answered with 128 + N), and the signal about to be sent is caught, not ignored.
        deadline = time.monotonic() + 60
        while not (_catches(proc.pid, signal.SIGTERM) and _catches(proc.pid, signum)):
            assert proc.poll() is None and time.monotonic() < deadline, "mathtune never reached main()"
            time.sleep(0.05)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code and "Traceback" not in err


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signal handlers: main thread")
def test_a_signal_landing_as_main_installs_its_handler_still_exits_143(tmp_path, monkeypatch):
    """The SIGTERM the test above sends may arrive the instant main's handler is in place: Python runs
    the handler right after signal.signal returns, and that must be inside main's try (143, no traceback)."""
    install = signal.signal

    def install_then_signal(signum, handler):
        previous = install(signum, handler)
        if signum == signal.SIGTERM and handler is cli._raise_terminated:
            os.kill(os.getpid(), signal.SIGTERM)  # the real signal, delivered to this process
        return previous

    monkeypatch.setattr(signal, "signal", install_then_signal)
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(["report", str(tmp_path)]) == cli.EXIT_SIGTERM  # never reaches report: 1 if it did
    assert signal.getsignal(signal.SIGTERM) == before  # main put the previous handler back


@pytest.mark.parametrize("command", ["train", "grpo"])
def test_lora_and_full_are_short_for_method_and_exclude_each_other(command, capsys):
    from mathtune.grpo_config import GRPOSettings

    settings = {"train": TrainConfig, "grpo": GRPOSettings}[command]
    parser = cli.build_parser(only=command)

    def method(argv):
        return config_from_args(settings, parser.parse_args([command, *argv])).method

    assert (method([]), method(["--full"]), method(["--lora"]), method(["--method", "full"])) == (
        "lora", "full", "lora", "full")
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args([command, "--lora", "--full"])
    assert exit_info.value.code == 2
    assert "not allowed with argument --lora" in capsys.readouterr().err
