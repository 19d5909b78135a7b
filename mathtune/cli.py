"""The ``mathtune`` command: a thin dispatcher over ``mathtune/commands/<name>.py``.

Each command module exposes ``add_arguments(parser)`` and ``run(args) -> int``; keeping them in
separate modules keeps this file small and lets a command's flags live next to the code using them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from mathtune.errors import MathtuneError
from mathtune.run_dir import RunDir

# name -> (module, one-line help)
COMMANDS = {
    "train": ("mathtune.commands.train", "fine-tune a model (LoRA by default) with guards"),
    "eval": ("mathtune.commands.eval", "measure accuracy of one model on a task"),
    "compare": ("mathtune.commands.compare", "base vs trained on the same items, with paired statistics"),
    "data": ("mathtune.commands.data", "inspect how a task's rows are formatted, tokenized and masked"),
    "doctor": ("mathtune.commands.doctor", "quick health check: preflight, a few steps, collapse check"),
    "report": ("mathtune.commands.report", f"write {RunDir.REPORT} and plots for a run directory"),
    "rft": ("mathtune.commands.rft", "rejection-sampling fine-tuning data: a model's distinct correct solutions"),
    "export": ("mathtune.commands.export", "merged Hugging Face model dir with a model card; --gguf for llama.cpp/Ollama"),
    "ask": ("mathtune.commands.ask", "answer questions from the command line, generated exactly as eval does"),
}


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
    parser = argparse.ArgumentParser(
        prog="mathtune",
        description="Fine-tune small language models on math word problems; no silent failures.",
    )
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
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Quiet the libraries' own chatter; mathtune prints what matters.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from mathtune import distributed

    distributed.quiet_replicas()  # under a launcher, rank 0 alone prints
    parser = build_parser(only=requested_command(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except MathtuneError as exc:
        if getattr(exc, "echo", True):  # False: another rank's failure, which rank 0 prints
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
