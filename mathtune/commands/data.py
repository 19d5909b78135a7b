"""``mathtune data``: show exactly what training will see, before spending time on it."""

from __future__ import annotations

import argparse

from mathtune.config import TrainConfig, add_config_arguments, config_from_args

FLAGS = ("model", "task", "train_file", "dataset", "train_split", "question_field", "answer_field",
         "strip_calculator", "target_format", "seed", "max_length", "max_samples", "trust_remote_code")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with settings (flags win)")
    add_config_arguments(parser, TrainConfig, only=FLAGS)
    parser.add_argument("--show", type=int, default=1, help="rendered examples to print (default: 1)")


def run(args: argparse.Namespace) -> int:
    # imported here: mathtune.data/models import torch, which building the CLI parser must not
    from mathtune import symbolic
    from mathtune.answers import format_number, is_symbolic
    from mathtune.data import is_chat_model, prepare_examples, render_supervised, take
    from mathtune.models.load import load_tokenizer
    from mathtune.models.spec import resolve_model_source
    from mathtune.tasks import task_from_config

    config = config_from_args(TrainConfig, args)
    resolve_model_source(config.model)  # a wrong --model fails now, before any data is read
    task = task_from_config(config)
    examples = take(task.examples("train"), config.max_samples, "train")
    source = config.dataset or config.train_file or f"task {config.task}"
    fields = getattr(task, "fields", None)  # the columns the task reads (task math: problem/solution by default)
    question, answer = (fields.question, fields.answer) if fields else (config.question_field, config.answer_field)
    print(f"columns: question <- '{question}', answer <- '{answer}' ({source})")
    for example in examples[: max(args.show, 3)]:
        # the gold the judge compares against, and the last line of the target that states it; a symbolic
        # gold with math-verify's reading of it (sympy's form), as eval's per-item log shows it
        stated = example.answer_text.splitlines()[-1][:60]
        if is_symbolic(example.gold):
            parsed = symbolic.parse(symbolic.boxed(example.gold))
            print(f"  {example.id}: gold {example.gold} (symbolic: math-verify reads {parsed})  <- {stated!r}")
        else:
            print(f"  {example.id}: gold {format_number(example.gold)}  <- {stated!r}")
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    rows, stats = prepare_examples(examples, tokenizer, config.max_length)
    style = "chat template" if is_chat_model(tokenizer) else "plain 'Question: ... Answer:' prompt"
    print(f"task {config.task} (train split), model {config.model} ({style}), --max-length {config.max_length}")
    print(f"rows: read {stats.read}, kept {stats.kept}, dropped {stats.dropped_total}")
    for reason, count in stats.dropped.items():
        ids = ", ".join(stats.dropped_ids[reason][:5])
        print(f"  dropped {count}: {reason} (e.g. {ids})")
    for which in ("prompt", "completion"):
        pct = stats.percentiles(which)
        print(f"{which + ' tokens:':<19}" + "  ".join(f"{k} {v}" for k, v in pct.items()))
    per_row = [row.supervised_tokens for row in rows]
    print(f"supervised tokens per row: mean {sum(per_row) / len(per_row):.1f}, min {min(per_row)}, "
          f"max {max(per_row)}; total {sum(per_row)}")
    for row in rows[: max(args.show, 0)]:
        print(f"\nrow {row.id}: non-masked labels: {row.supervised_tokens} of {len(row.input_ids)} tokens")
        print("rendered, supervised span between \u27e6 \u27e7:")
        print(render_supervised(tokenizer, row))
    return 0
