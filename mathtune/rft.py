"""Rejection-sampling fine-tuning data (RFT, Yuan et al. 2023): a model's own distinct correct solutions.

    mathtune rft --model runs/sft --task gsm8k --train-file train.jsonl --output rft.jsonl
    mathtune train --task gsm8k --train-file rft.jsonl ...            # then train on it as usual

Phases: sample ``num_samples`` completions per training question (temperature 0.7 by default, the
same batched Generator as eval, calculator and loop stop included) -> judge each with the task's
rule (flexible extraction, as ``accuracy`` scores) -> turn each correct one into a training target
in the task's format (``--target-format``/``--strip-calculator`` applied exactly as to the gold rows:
the task's ``training_target``) -> keep the distinct ones -> append each question's gold row and kept ones to
``--output`` as soon as its group of questions is sampled (JSONL, ``{"question", "answer"}``,
readable by the gsm8k and file tasks; flushed to disk, so an interrupted run keeps what it sampled
and ``--resume`` samples only the rest, drawing exactly what an uninterrupted run would) -> print
how many questions gained how many solutions.

A target ends in ``#### N``: a sample that states its answer some other way ("The answer is 5")
gets ``#### <gold>`` appended; text after a ``#### N`` line is cut. Looping samples are never kept.
"Distinct" compares whitespace-normalised targets (after the format), and a sample equal to the gold
solution adds nothing: with ``--target-format equations`` two worded solutions with one equation chain
are one target.

The target format is the run's: sampling a model trained on equation chains (its mathtune_config.yaml
says ``target_format: equations``) into ``--target-format full`` would write its chains beside full
gold solutions, so that is an error; the other way round (a full-format model's samples converted to
chains, like the gold rows) is allowed, with a note.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from mathtune.config import GenerationArgs, ModelSettings, nested, setting
from mathtune.atomic import append_whole
from mathtune.errors import ConfigError, MathtuneError, Terminated
from mathtune.tasks import Task


def _rft_generation():
    # k = 4 samples at temperature 0.7, 32 rows (8 questions x 4 samples) decoded together
    return GenerationArgs(num_samples=4, temperature=0.7, batch_size=32)


@dataclass
class RFTConfig(ModelSettings):
    """Everything ``mathtune rft`` needs (model/task settings are shared with train and eval)."""

    output: str | None = setting(None, "where to write the training file (.jsonl): gold rows + kept samples")
    generation: GenerationArgs = nested(_rft_generation, "how the samples are drawn (never-kept loops stopped)",
                                        flags=("num_samples", "temperature", "top_p", "max_new_tokens", "batch_size",
                                               "calculator", "loop_stop"))
    max_samples: int = setting(-1, "training questions to sample for, from the start of the train split (-1: all)")
    resume: bool = setting(False, "continue an interrupted run: keep the questions --output holds, sample the rest")

    def validate(self) -> "RFTConfig":
        problems = self._common_problems() + self._generation_problems(require_sampling=True)
        from mathtune.tasks import TASK_NAMES, task_class

        rft_tasks = [name for name in TASK_NAMES if task_class(name).supports_rft]
        if self.task not in rft_tasks:
            problems.append(f"--task {self.task}: rft works for {', '.join(rft_tasks)}")
        if self.output is None:
            problems.append("--output is required: the .jsonl training file to write")
        elif Path(self.output).suffix.lower() != ".jsonl":
            problems.append(f"--output {self.output}: write a .jsonl file (one {{question, answer}} object per line)")
        problems += self._max_samples_problems()
        if problems:
            raise ConfigError(problems)
        return self


def _normalised(text: str) -> str:
    return " ".join(text.split())


def as_target(text: str, gold: float | str) -> str | None:
    """A correct sample as a training target ending in ``#### X``; None when it cannot be one."""
    from mathtune.answers import extract_strict, extract_symbolic, format_number, is_symbolic, judge
    from mathtune.tasks.gsm8k import check_row

    symbolic = is_symbolic(gold)  # a symbolic gold is stated as its LaTeX after "#### "
    text = text.strip()
    stated = extract_symbolic(text, strict=True)[0] if symbolic else extract_strict(text)
    if symbolic and stated is not None and not judge(stated, gold, "exact"):
        return None  # judged right by its last \boxed{}, but its "#### " line, which a target ends on, is wrong
    if stated is not None:
        start = text.find("####")
        end = text.find("\n", start)
        text = text if end < 0 else text[:end].rstrip()  # what follows the answer line is noise
    else:
        final = gold if symbolic else format_number(gold)
        text = f"{text}\n#### {final}" if text else f"#### {final}"
    try:
        _question, answer, _gold = check_row({"question": "q", "answer": text}, symbolic_ok=symbolic)
    except ValueError:
        return None  # e.g. two "####" in one sample
    return answer


@dataclass
class Selection:
    """Per question: the kept targets; overall counts of why samples were not kept."""

    kept: list[list[str]]
    rejected: Counter


def select_solutions(examples: Sequence, samples: Sequence[Sequence[str]], loops: Sequence[Sequence[bool]] | None,
                     is_correct: Callable[[str, object], bool], task: Task) -> Selection:
    """The distinct correct samples of each example, as targets in the task's format (``task.training_target``,
    see the module docstring); ``examples`` hold their gold targets in that format already (the task made them)."""
    kept: list[list[str]] = []
    rejected: Counter = Counter()
    for i, (example, texts) in enumerate(zip(examples, samples)):
        seen = {_normalised(example.answer_text)}
        mine = []
        for j, text in enumerate(texts):
            if loops is not None and loops[i][j]:
                rejected["loop"] += 1
                continue
            if not is_correct(text, example):
                rejected["wrong"] += 1
                continue
            target = as_target(text, example.gold)
            if target is None:
                rejected["not a valid target"] += 1
                continue
            target = task.training_target(target)
            if target is None:
                rejected["no <<calculation>> (equations-drop)"] += 1
                continue
            key = _normalised(target)
            if key in seen:
                rejected["duplicate"] += 1
                continue
            seen.add(key)
            mine.append(target)
        kept.append(mine)
    return Selection(kept, rejected)


def task_judge(judge_rule: str) -> Callable[[str, object], bool]:
    """The task's judging rule on flexible extraction: what ``accuracy`` counts as right."""
    from mathtune.answers import judge_answer

    def is_correct(text: str, example) -> bool:
        return judge_answer(text, example.gold, judge_rule).correct

    return is_correct


# The output file is the training file and the run's journal at once. Per question, in train-split
# order: its gold row, then its kept samples, each row tagged with where it came from, e.g.
#   {"question": "...", "answer": "...", "rft": {"question": 7, "new_solutions": 2, "rejected": {"wrong": 2}}}
#   {"question": "...", "answer": "...", "rft": {"question": 7}}            (x 2)
# The task readers ignore the "rft" key. The gold row says how many rows follow, so a question whose
# rows were cut short by a crash is recognised and sampled again; the first gold row also records
# the sampling settings (SAMPLING_SETTINGS), which --resume must match.
# The target format is among them: the file's first row says which format its targets are in.
SAMPLING_SETTINGS = ("model", "seed", "num_samples", "temperature", "top_p", "max_new_tokens", "batch_size",
                     "calculator", "loop_stop", "target_format", "strip_calculator")


def questions_per_group(config: RFTConfig) -> int:
    """Questions sampled together: as many as fill one batch (32 rows / k=4 -> 8 questions), at least 1."""
    return max(1, config.generation.batch_size // config.generation.num_samples)


def group_seed(seed: int, group: int) -> int:
    """The sampling seed of question group ``group``: fixed by (seed, group) alone, so that a resumed run
    draws exactly the samples an uninterrupted one would (one seed for the whole run would make a
    group's samples depend on every draw before it)."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"mathtune-rft:{seed}:{group}".encode()).digest()[:8], "big")


def _sampling_settings(config: RFTConfig, calculator: bool) -> dict:
    from mathtune.config import exposed_fields, get_path

    flat = exposed_fields(type(config))
    values = {name: get_path(config, flat[name].path) for name in SAMPLING_SETTINGS}
    values["calculator"] = calculator
    return values


def _question_rows(index: int, example, kept: list[str], rejected: Counter, settings: dict | None) -> list[dict]:
    meta = {"question": index, "new_solutions": len(kept), "rejected": dict(sorted(rejected.items()))}
    if settings is not None:
        meta["settings"] = settings
    rows = [{"question": example.question, "answer": example.answer_text, "rft": meta}]
    rows += [{"question": example.question, "answer": target, "rft": {"question": index}} for target in kept]
    return rows


def _jsonl(rows: Sequence[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def read_finished_questions(output: Path, examples: Sequence, settings: dict) -> list[list[dict]]:
    """The rows of each question ``output`` holds completely (``--resume``), checked against this run.

    A torn last line (``read_jsonl_repairing``) or a question with fewer rows than its gold row
    announces is dropped, and the file rewritten to the complete questions, which are sampled again.
    """
    from mathtune.atomic import write_text_atomically
    from mathtune.run_dir import read_jsonl_repairing

    records = read_jsonl_repairing(output)
    finished: list[list[dict]] = []
    line = 0
    while line < len(records):
        gold, meta = records[line], records[line].get("rft")
        where = f"{output}:{line + 1}"
        if not isinstance(meta, dict) or not isinstance(meta.get("new_solutions"), int):
            raise MathtuneError(f"--resume: {where} is not a question's first row as mathtune rft writes it "
                                f"(the file was edited, or is not an rft output): pick another --output")
        index = len(finished)
        if meta.get("question") != index:
            raise MathtuneError(f"--resume: {where} holds question {meta.get('question')}, expected {index}: the "
                                f"file was edited; pick another --output")
        if index == 0:
            differing = [f"--{name.replace('_', '-')} {settings[name]} (the file: {meta.get('settings', {}).get(name)})"
                         for name in SAMPLING_SETTINGS if meta.get("settings", {}).get(name) != settings[name]]
            if differing:
                raise MathtuneError(f"--resume: {output} was sampled with other settings: {'; '.join(differing)}; "
                                    f"resume with the file's settings or pick another --output")
        if index >= len(examples) or (gold.get("question"), gold.get("answer")) != (
                examples[index].question, examples[index].answer_text):
            raise MathtuneError(f"--resume: {where}: question {index} is not question {index} of this train split; "
                                f"resume with the same --task/--train-file/--max-samples or pick another --output")
        rows = records[line : line + 1 + meta["new_solutions"]]
        if len(rows) < 1 + meta["new_solutions"]:
            break  # cut short by an interrupted write: sampled again
        finished.append(rows)
        line += len(rows)
    if line < len(records):
        print(f"rft: {output}: question {len(finished)} was cut short by the interruption; it is sampled again",
              file=sys.stderr)
    complete = _jsonl([r for rows in finished for r in rows])
    if output.read_text(encoding="utf-8") != complete:  # cut short, or re-encoded by the torn-line repair
        write_text_atomically(output, complete)
    return finished


def check_run_target_format(config: RFTConfig, *, verbose: bool = True) -> None:
    """A model trained by ``mathtune train`` samples in the target format it was trained on (its run's
    mathtune_config.yaml records it); the harvested targets must come out in ``config.target_format``."""
    from mathtune.config import load_yaml
    from mathtune.run_dir import RunDir

    run = RunDir.of_model(config.model)
    trained = load_yaml(run.config).get("target_format", "full") if run is not None else None
    if trained is None or trained == config.target_format:
        return
    if config.target_format == "full" and trained != "full":
        # nothing converts a chain back into a worded solution: the file would mix the two formats
        raise MathtuneError(f"--model {config.model} was trained with --target-format {trained} ({run.config}): "
                            f"its samples are equation chains; pass --target-format {trained} so that the gold "
                            f"rows are chains too")
    if verbose:
        print(f"rft: --model {config.model} was trained with --target-format {trained} ({run.config}); its correct "
              f"samples are turned into --target-format {config.target_format} targets like the gold rows",
              file=sys.stderr, flush=True)


def run_rft(config: RFTConfig, *, is_correct: Callable[[str, object], bool] | None = None,
            generator=None, verbose: bool = True) -> dict:
    """Sample, judge, select, append to ``config.output`` question by question; returns the counts it prints.

    ``is_correct(text, example)`` defaults to the task's judge; ``generator(questions, seed) ->
    Generations`` defaults to the batched Generator on ``config.model`` (tests pass their own).
    With ``config.resume`` the questions ``config.output`` already holds are kept and not sampled again.
    """
    from mathtune.data import take
    from mathtune.progress import progress_reporter
    from mathtune.tasks import task_from_config

    config.validate()
    check_run_target_format(config, verbose=verbose)
    task = task_from_config(config)
    examples = take(task.examples("train"), config.max_samples, "train")
    if not examples:
        raise MathtuneError("no training questions: the train split is empty (check --train-file / --max-samples)")
    settings = config.generation.resolved(config.task)
    recorded = _sampling_settings(config, settings.calculator)
    output = Path(config.output)
    finished: list[list[dict]] = []
    if output.exists() and not config.resume:
        raise MathtuneError(f"--output {output} exists: add --resume to continue that run, or delete it / pick "
                            f"another --output")
    if config.resume and output.is_file():
        finished = read_finished_questions(output, examples, recorded)
    done = len(finished)
    judge_fn = is_correct or task_judge(task.judge_rule)
    per_group = questions_per_group(config)
    if verbose:
        calc = "on" if settings.calculator else "off"
        resumed = f" ({done} already in {output}: resuming)" if config.resume and done else ""
        print(f"rft: sampling {settings.num_samples} completions for each of {len(examples)} {config.task} training "
              f"questions from {config.model} (temperature {settings.temperature:g}, calculator {calc}){resumed}",
              file=sys.stderr, flush=True)
    if done < len(examples) and generator is None:
        generator = _model_generator(config, settings)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        sink = open(output, "a", encoding="utf-8")
    except OSError as exc:
        raise MathtuneError(f"--output {output}: cannot write ({exc.strerror}); pick a writable path") from exc
    report = progress_reporter(len(examples) - done, "rft", "questions", enabled=verbose)
    try:
        with sink:
            # the group holding question `done` is sampled whole, even where some of its questions are
            # written already (an earlier run with a smaller --max-samples): the same batch and seed as
            # an uninterrupted run give the same samples; only the questions not yet written are kept
            groups = range(done // per_group, -(-len(examples) // per_group)) if done < len(examples) else ()
            for group in groups:
                first = group * per_group
                members = examples[first : first + per_group]
                outputs = generator([e.question for e in members], group_seed(config.seed, group))
                if len(outputs) != len(members):
                    raise MathtuneError(f"the generator returned {len(outputs)} results for {len(members)} questions")
                loops = getattr(outputs, "loops", None)
                rows = []
                for offset, example in enumerate(members):
                    index = first + offset
                    if index < done:
                        continue
                    selection = select_solutions([example], [outputs[offset]],
                                                 None if loops is None else [loops[offset]], judge_fn, task)
                    mine = _question_rows(index, example, selection.kept[0], selection.rejected,
                                          recorded if index == 0 else None)
                    finished.append(mine)
                    rows += mine
                # one write per group, on disk whole before a stop signal is let in: an interruption
                # loses at most the group in flight, and leaves a file the task readers take as it is
                append_whole(sink, _jsonl(rows), hint="free space (or pick another --output), then run the same "
                                                      "command with --resume: the questions written are kept")
                report.update(items=len(members) - max(0, done - first),
                              tokens=getattr(outputs, "tokens_generated", 0))
    except OSError as exc:
        raise MathtuneError(f"--output {output}: cannot write ({exc.strerror}); pick a writable path") from exc
    except (KeyboardInterrupt, Terminated):  # Ctrl-C, or SIGTERM (`timeout`, a scheduler)
        report.close()
        print(f"rft: stopped with {len(finished)} of {len(examples)} questions in {output}; run the same command "
              f"with --resume to sample the rest", file=sys.stderr, flush=True)
        raise
    report.close()
    result = summarise(finished, settings.num_samples, output)
    if verbose:
        print(format_result(result, config))
    return result


def summarise(finished: Sequence[Sequence[dict]], num_samples: int, output: Path) -> dict:
    """The counts ``mathtune rft`` prints, from the rows of every question (this run's and resumed ones)."""
    gained: Counter = Counter()
    rejected: Counter = Counter()
    for rows in finished:
        meta = rows[0]["rft"]
        gained[meta["new_solutions"]] += 1
        rejected.update(meta["rejected"])
    return {
        "questions": len(finished),
        "samples": len(finished) * num_samples,
        "gold_rows": len(finished),
        "new_rows": sum(gained_n * count for gained_n, count in gained.items()),
        "questions_gained": {n: gained[n] for n in sorted(gained)},
        "rejected": dict(rejected),
        "output": str(output),
    }


def format_result(result: dict, config: RFTConfig) -> str:
    with_new = sum(count for n, count in result["questions_gained"].items() if n > 0)
    lines = [
        f"questions: {result['questions']}, samples: {result['samples']}; "
        f"{with_new} questions gained at least one new solution",
        "solutions gained per question: " + ", ".join(
            f"{n}: {count} questions" for n, count in result["questions_gained"].items()),
        "samples not kept: " + (", ".join(f"{why} {n}" for why, n in sorted(result["rejected"].items())) or "none"),
        f"wrote {result['output']}: {result['gold_rows']} gold rows + {result['new_rows']} sampled solutions",
    ]
    from mathtune.tasks import task_class

    # a generated task reads no files: its rft file trains under --task file
    task = "file" if task_class(config.task).generated else config.task
    # the file's targets are in this format already; training in the same one leaves them as they are
    same_format = f" --target-format {config.target_format}" if config.target_format != "full" else ""
    same_format += " --strip-calculator" if config.strip_calculator else ""
    lines.append(f"next: mathtune train --task {task} --train-file {result['output']}{same_format} ...")
    return "\n".join(lines)


def _model_generator(config: RFTConfig, settings):
    from mathtune.generation.engine import Generator
    from mathtune.hardware import Placement
    from mathtune.models.load import load_for_inference

    placement = Placement.choose(config.device, config.precision)
    loaded = load_for_inference(config.model, device=placement.device, precision=placement.precision,
                                trust_remote_code=config.trust_remote_code, allow_pickle=config.allow_pickle)
    # progress=False: run_rft reports per question; the Generator's per-group bar would restart every group
    generator = Generator(loaded.model, loaded.tokenizer, settings, progress=False)
    return lambda questions, seed: generator(questions, seed=seed)
