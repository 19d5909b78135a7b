"""The ``mathtune`` command: a thin dispatcher over ``mathtune/commands/<name>.py``.

Each command module exposes ``add_arguments(parser)`` and ``run(args) -> int``; keeping them in
separate modules keeps this file small and lets a command's flags live next to the code using them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading

from mathtune.errors import ConfigError, MathtuneError, Terminated
from mathtune.run_dir import RunDir

# Exit codes a script can act on: argparse already exits 2 on a usage error (unknown flag, bad
# choice), and so does a setting validate() refuses (ConfigError); a run that failed exits 1, and a signal exits 128 + its number, the
# shell's convention (SIGINT 2 -> 130, SIGTERM 15 -> 143).
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
EXIT_SIGINT, EXIT_SIGTERM = 128 + signal.SIGINT, 128 + signal.SIGTERM

EPILOG = """\
exit status: 0 success, 1 the run failed (the 'error:' line says why and how to fix it),
2 usage error (unknown flag, bad flag value or YAML setting), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
Flags also take underscores (--max_length) and the Hugging Face Trainer/TRL names
(--num_train_epochs, --per_device_train_batch_size, --lr_scheduler_type, --model_name_or_path,
--max_seq_length, --dataset_name)."""

# name -> (module, one-line help)
COMMANDS = {
    "train": ("mathtune.commands.train", "fine-tune a model (LoRA by default) with guards"),
    "eval": ("mathtune.commands.eval", "measure accuracy of one model on a task"),
    "compare": ("mathtune.commands.compare", "base vs trained on the same items, with paired statistics"),
    "data": ("mathtune.commands.data", "inspect how a task's rows are formatted, tokenized and masked"),
    "doctor": ("mathtune.commands.doctor", "quick health check: preflight, a few steps, collapse check"),
    "report": ("mathtune.commands.report", f"write {RunDir.REPORT} and plots for a run directory"),
    "grpo": ("mathtune.commands.grpo", "reinforcement learning (GRPO, TRL) on the task's own answer judge"),
    "rft": ("mathtune.commands.rft", "rejection-sampling fine-tuning data: a model's distinct correct solutions"),
    "export": ("mathtune.commands.export", "merged Hugging Face model dir with a model card; --gguf for llama.cpp/Ollama"),
    "ask": ("mathtune.commands.ask", "answer questions from the command line, generated exactly as eval does"),
    "env": ("mathtune.commands.env", "versions, CPU/GPU, the device and precision mathtune would choose, the cache"),
}


def hyphenate_flags(argv: list[str]) -> list[str]:
    """``--max_length 64`` -> ``--max-length 64``, ``--learning_rate=1e-4`` -> ``--learning-rate=1e-4``:
    the names a Trainer/TRL script uses, so a pasted command works. Values (after "=", or separate
    words) are untouched, and so is everything after a bare "--"."""
    out = []
    for index, arg in enumerate(argv):
        if arg == "--":
            return out + argv[index:]
        if arg.startswith("--"):
            name, sep, value = arg.partition("=")
            arg = name.replace("_", "-") + sep + value
        out.append(arg)
    return out


class MathtuneParser(argparse.ArgumentParser):
    """argparse with underscores read as hyphens in flag names (subcommand parsers inherit the class)."""

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(hyphenate_flags(args), namespace)


def _raise_terminated(signum, frame):
    raise Terminated()


def requested_command(argv: list[str] | None) -> str | None:
    """The subcommand named on the command line (the first word not starting with '-'), if known."""
    for arg in sys.argv[1:] if argv is None else argv:
        if not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``mathtune`` parser. Every command is listed; its flags are added (its module imported)
    for all commands, or for ``only`` when given: ``main`` passes the one being run, so
    ``mathtune CMD ...`` imports CMD's module alone. Command modules import torch, transformers
    and PEFT only inside ``run``, so even the full parser answers in well under a second
    (tests/test_cli_imports.py checks the import set)."""
    parser = MathtuneParser(
        prog="mathtune",
        description="Fine-tune small language models on math word problems; no silent failures.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from mathtune import __version__

    parser.add_argument("--version", action="version", version=f"mathtune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=help_text, description=help_text)
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # command not built yet in this checkout
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Quiet the libraries' own chatter; mathtune prints what matters.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from mathtune import distributed

    distributed.quiet_replicas()  # under a launcher, rank 0 alone prints
    parser = build_parser(only=requested_command(argv))
    args = parser.parse_args(argv)  # a usage error exits 2 here (argparse)
    if not getattr(args, "_run", None):
        parser.print_help()
        return EXIT_USAGE
    # signal.signal works in the main thread only (an embedding program may call main elsewhere)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if in_main_thread else None
    try:
        # Installed inside the try: a signal can land the instant the handler is in place (Python
        # raises it right after the signal.signal call returns), and it must exit 130/143 like one
        # that lands later, not escape main as a traceback.
        if in_main_thread:
            signal.signal(signal.SIGTERM, _raise_terminated)
        return int(args._run(args) or 0)
    except MathtuneError as exc:
        if getattr(exc, "echo", True):  # False: another rank's failure, which rank 0 prints
            print(f"error: {exc}", file=sys.stderr)
        # a bad setting (flag value, YAML key) is a usage error like argparse's own: fix the command
        return EXIT_USAGE if isinstance(exc, ConfigError) else EXIT_FAILURE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_SIGINT
    except Terminated:
        print("terminated", file=sys.stderr)
        return EXIT_SIGTERM
    finally:
        if in_main_thread:  # getsignal gives None for a handler not set from Python: the default then
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
