"""``mathtune export RUN_OR_MODEL --output DIR``: a standard Hugging Face model dir (LoRA merged,
model card) and, with ``--gguf``, a GGUF file plus an Ollama Modelfile.

    mathtune export runs/lora-uc --output runs/export --gguf --gguf-type f16

The flags are ``mathtune.export.ExportConfig``'s fields; the work is ``mathtune.export.export_model``.
"""

from __future__ import annotations

import argparse
import sys

from mathtune.config import add_config_arguments, config_from_args
from mathtune.errors import ConfigError
from mathtune.export import ExportConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="RUN_OR_MODEL",
                        help="run dir, LoRA adapter dir, model dir, alias (smollm2-135m), .gguf file or hub id")
    add_config_arguments(parser, ExportConfig, skip=("model",))


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def run(args: argparse.Namespace) -> int:
    from mathtune.export import export_model

    config = config_from_args(ExportConfig, args)
    if args.gguf_type is not None and not config.gguf:
        raise ConfigError([f"--gguf-type {args.gguf_type} needs --gguf (the GGUF file is only written with it)"])
    result = export_model(config.model, config.output, dtype=config.dtype, gguf=config.gguf,
                          gguf_type=config.gguf_type, overwrite=config.overwrite,
                          trust_remote_code=config.trust_remote_code, allow_pickle=config.allow_pickle,
                          log=lambda message: print(f"mathtune: {message}", file=sys.stderr, flush=True))
    what = "LoRA merged into its base" if result.merged_lora else "weights as they are"
    print(f"exported {config.model} ({what}) to {result.output}:")
    width = max(len(name) for name in result.files)
    for name, size in result.files.items():
        print(f"  {name:<{width}}  {_size(size):>9}")
    print(f"load it: AutoModelForCausalLM.from_pretrained({str(result.output)!r})")
    if result.gguf is not None:
        print(f"run it:  llama-cli -m {result.gguf} --temp 0 -cnv   or   "
              f"cd {result.output} && ollama create {result.name} -f Modelfile")
    return 0
