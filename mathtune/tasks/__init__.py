"""Task registry: a task name -> rows ``Example(id, question, answer_text, gold)`` per split.

Each task module defines one ``Task`` subclass; they are imported on demand so that asking for
the generated unit-conversion task never imports ``datasets``.
"""

from __future__ import annotations

from dataclasses import dataclass

from mathtune.errors import MathtuneError

TASK_NAMES: list[str] = ["gsm8k", "unit-conversion", "file", "math"]
SPLITS = ("train", "eval")


@dataclass(frozen=True)
class Example:
    id: str  # stable, e.g. "gsm8k-train-00012" or "file.jsonl:13"
    question: str
    answer_text: str  # worked solution ending in "#### X" (the training target)
    gold: float | str  # one number (the numeric rule), or an answer's LaTeX text (math-verify judges it)


class Task:
    """A named source of examples plus the rule that judges answers to them."""

    name: str = ""
    judge_rule: str = "exact"  # "exact" | "rel_tol=0.05" for number golds (see mathtune.answers.judge)
    # The task's policy, read without building the task (``task_class(name).<attribute>``):
    calculator_by_default = False  # targets carry <<a*b=c>> annotations: calculator-assisted decoding on
    hub_dataset: str | None = None  # the Hugging Face dataset id its rows come from (a model card names it)
    supports_rft = True  # rejection-sampling fine-tuning (mathtune rft) can sample answers to its questions
    target_formats: tuple[str, ...] = ("full",)  # --target-format values it can make ("full": solutions as written)
    generated = False  # its rows are made in code: it reads no --train-file/--eval-file
    reads_dataset = False  # reads --dataset / --question-field / --answer-field (a hub or local table)
    lm_eval_shots_from_train_file = False  # --protocol lm-eval takes its 5 shots from --train-file

    def __init__(self) -> None:
        self._cache: dict[str, list[Example]] = {}

    def training_target(self, answer_text: str) -> str | None:
        """A checked solution (ending in ``#### N``) as this task's training target, made the way its
        gold rows' targets are: ``mathtune rft`` turns each correct sample into one with it, so the
        file it writes holds gold rows and samples in one format. None: the task's format drops it.
        A generated task writes its targets itself and has no target settings: the text unchanged."""
        return answer_text

    def examples(self, split: str) -> list[Example]:
        """The full split in a deterministic order; loaded once, then served from memory."""
        if split not in SPLITS:
            raise MathtuneError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
        if split not in self._cache:
            self._cache[split] = self._load(split)
        return list(self._cache[split])  # a copy: callers may shuffle or slice theirs

    def _load(self, split: str) -> list[Example]:
        raise NotImplementedError


class FileBackedTask(Task):
    """A task read from the user's files (``--train-file`` / ``--eval-file``), per split."""

    def __init__(self, *, train_file=None, eval_file=None, strip_calculator: bool = False,
                 target_format: str = "full"):
        super().__init__()
        self.files = {"train": train_file, "eval": eval_file}
        self.strip_calculator = strip_calculator  # drop GSM8K's <<48/2=24>> annotations from answers
        self.target_format = target_format  # full | equations | equations-drop (tasks.gsm8k.TARGET_FORMATS)

    def training_target(self, answer_text: str) -> str | None:
        """``--target-format`` then ``--strip-calculator``, as the task's reader applies them to every gold
        row (both file-backed tasks build their rows with ``tasks.gsm8k.make_example``)."""
        check_target_format(self.name, self.target_formats, self.target_format)
        from mathtune.tasks.gsm8k import format_target

        return format_target(answer_text, strip_calc=self.strip_calculator, target_format=self.target_format)


def check_target_format(task_name: str, formats: tuple[str, ...], target_format: str) -> None:
    """Refuse a ``--target-format`` the task cannot make: only GSM8K solutions carry the <<expr=result>>
    chains an equations target is made of (checked when the task is built and again when ``rft`` asks a
    task, whose format may have been set after, for a sample's target)."""
    if target_format not in formats:
        raise MathtuneError(f"--target-format {target_format} applies to --task gsm8k (GSM8K-format files); "
                            f"task {task_name!r} takes --target-format full")


def task_from_config(config, *, train_file: bool = True) -> Task:
    """The task a config's settings name (ModelSettings fields): files or --dataset, column mapping.
    ``train_file=False``: eval reads only held-out data, so a --train-file there is not opened."""
    from mathtune.tasks.rows import Fields

    return get_task(config.task, train_file=config.train_file if train_file else None, eval_file=config.eval_file,
                    strip_calculator=config.strip_calculator, seed=config.seed, dataset=config.dataset,
                    fields=Fields(config.question_field, config.answer_field),
                    splits={"train": config.train_split, "eval": config.eval_split},
                    target_format=config.target_format)


def calculator_default(task: str | None) -> bool:
    """Calculator-assisted decoding when ``--calculator`` is unset: on for tasks whose targets carry
    calculator annotations (``Task.calculator_by_default``), off for anything else."""
    return task in TASK_NAMES and task_class(task).calculator_by_default


def source_problems(config) -> list[str]:
    """What a config's task cannot read (ModelSettings fields): the task's policy, checked with the rest
    of the config so that every problem is reported at once."""
    if config.task not in TASK_NAMES:
        return []  # the choices check names it
    cls = task_class(config.task)
    problems = []
    if config.dataset is not None and not cls.reads_dataset:
        readers = [n for n in TASK_NAMES if task_class(n).reads_dataset]
        problems.append(f"--dataset is read by --task {' or '.join(readers)} (got --task {config.task}): "
                        f"add --task {readers[0]}")
    if cls.reads_dataset and config.train_file is None and config.eval_file is None and config.dataset is None:
        problems.append(f"--task {config.task} needs --train-file and/or --eval-file, or --dataset")
    return problems


def lm_eval_problems(config) -> list[str]:
    """``--protocol lm-eval``'s data needs for the config's task."""
    if config.task in TASK_NAMES and task_class(config.task).lm_eval_shots_from_train_file \
            and config.eval_file is not None and config.train_file is None:
        return ["--protocol lm-eval takes its 5 shots from the train split: pass --train-file "
                f"({config.task} train JSONL) with --eval-file"]
    return []


def task_class(name: str) -> type[Task]:
    """The ``Task`` subclass registered as ``name`` (its policy attributes need no files or rows)."""
    if name == "gsm8k":
        from mathtune.tasks.gsm8k import GSM8KTask

        return GSM8KTask
    if name == "unit-conversion":
        from mathtune.tasks.unit_conversion import UnitConversionTask

        return UnitConversionTask
    if name == "file":
        from mathtune.tasks.files import FileTask

        return FileTask
    if name == "math":
        from mathtune.tasks.competition import MathTask

        return MathTask
    raise MathtuneError(f"unknown task {name!r}: choose one of {', '.join(TASK_NAMES)}")


def get_task(
    name: str, *, train_file=None, eval_file=None, strip_calculator: bool = False, seed: int = 0,
    target_format: str = "full", dataset: str | None = None, fields=None, splits: dict | None = None,
) -> Task:
    """Build the task ``name``; file paths are checked when a split is first read. ``dataset``,
    ``fields`` and ``splits`` (a hub dataset, its columns and splits) are read by task 'file' only."""
    if name not in ("file", "math") and dataset is not None:
        raise MathtuneError(f"--dataset is read by --task file or math (got --task {name}): add --task file")
    mapped = fields is not None and (fields.question, fields.answer) != ("question", "answer")
    if name not in ("file", "math") and mapped:
        # silently ignoring the mapping would read the wrong columns or fail on a missing one
        raise MathtuneError(f"--question-field/--answer-field are read by --task file or math (got --task {name}): "
                            "add --task file")
    if name == "gsm8k":
        from mathtune.tasks.gsm8k import GSM8KTask

        return GSM8KTask(train_file=train_file, eval_file=eval_file, strip_calculator=strip_calculator,
                         target_format=target_format)
    check_target_format(name, task_class(name).target_formats, target_format)
    if name == "unit-conversion":
        if train_file is not None or eval_file is not None:
            # silently ignoring the files would train on data the user did not ask for
            raise MathtuneError(
                "task 'unit-conversion' is generated and reads no files: drop --train-file/--eval-file,"
                " or use --task file to train on your own file"
            )
        from mathtune.tasks.unit_conversion import UnitConversionTask

        return UnitConversionTask(seed=seed)
    if name in ("file", "math"):
        if train_file is None and eval_file is None and dataset is None:
            raise MathtuneError(f"task '{name}' needs --train-file and/or --eval-file (JSONL, JSON, CSV, Parquet or "
                                "a datasets.save_to_disk dir), or --dataset ORG/NAME")
        from mathtune.tasks.rows import Fields

        return task_class(name)(train_file=train_file, eval_file=eval_file, strip_calculator=strip_calculator,
                                fields=fields or Fields(), dataset=dataset, splits=splits)
    raise MathtuneError(f"unknown task {name!r}: choose one of {', '.join(TASK_NAMES)}")
