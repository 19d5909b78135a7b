"""What to decode (``GenerationSettings``) and what came out (``Generations``).

``Generations`` is the one record of a generation run: every per-item field lives here, so sharding
(``distributed.generate_sharded``), the eval cache (``evaluation``) and sampling carry all of them
through ``select`` / ``merge`` / ``to_dict`` instead of each rebuilding a subset by hand.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from mathtune.config import EVAL_BATCH_SIZE
from mathtune.errors import MathtuneError

# Why a completion ended (``Generations.stop_reasons``).
STOP_REASONS = ("end_of_turn", "stop_string", "loop", "max_new_tokens")


@dataclass
class GenerationSettings:
    """How to decode; saved in every eval summary and part of the eval cache key."""

    max_new_tokens: int = 256  # longest completion, in tokens (the end-of-turn token counts)
    temperature: float = 0.0  # 0: greedy; > 0: sample
    top_p: float = 1.0  # nucleus sampling threshold (sampling only)
    num_samples: int = 1  # completions per prompt (> 1 needs temperature > 0)
    stop: list[str] = field(default_factory=list)  # extra stop strings; the output is cut before them
    batch_size: int = EVAL_BATCH_SIZE  # rows (prompt x sample) decoded together
    seed: int = 0  # sampling seed
    calculator: bool = False  # force computed results after "<<EXPR=" (mathtune.calculator)
    loop_stop: bool = True  # stop a row repeating a line / 8+ token span / <<calculation>> 3 times (mathtune.loops)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self) -> "GenerationSettings":
        problems = []
        for name in ("max_new_tokens", "num_samples", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                problems.append(f"--{name.replace('_', '-')} must be a positive integer (got {value!r})")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            problems.append(f"--temperature must be >= 0 (got {self.temperature!r})")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            problems.append(f"--top-p must be in (0, 1] (got {self.top_p!r})")
        if self.greedy and isinstance(self.num_samples, int) and self.num_samples > 1:
            problems.append("--num-samples > 1 needs --temperature > 0 (greedy samples are all identical)")
        for name in ("calculator", "loop_stop"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"--{name.replace('_', '-')} takes true/false (got {getattr(self, name)!r})")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            problems.append(f"--stop takes a list of non-empty strings (got {self.stop!r})")
        if problems:
            raise MathtuneError("; ".join(problems))
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "GenerationSettings":
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            names = ", ".join(f.name for f in dataclasses.fields(self))
            raise MathtuneError(f"unknown generation setting(s) {', '.join(unknown)}: use {names}")
        return dataclasses.replace(self, **changes).validate()

    @classmethod
    def from_config(cls, config) -> "GenerationSettings":
        """From an ``EvalConfig`` (or anything with the same field names). ``calculator`` None (the
        default) means on for tasks whose ``Task.calculator_by_default`` says so (GSM8K's annotations), off elsewhere."""
        calculator = getattr(config, "calculator", None)
        return cls(
            max_new_tokens=config.max_new_tokens,
            temperature=float(config.temperature),
            top_p=float(config.top_p),
            num_samples=config.num_samples,
            stop=list(config.stop or []),
            batch_size=config.batch_size,
            seed=config.seed,
            calculator=resolve_calculator(calculator, getattr(config, "task", None)),
            loop_stop=bool(getattr(config, "loop_stop", True)),
        ).validate()


def resolve_calculator(setting: bool | None, task: str | None) -> bool:
    """``--calculator`` / ``--no-calculator`` as given; unset: on for tasks whose targets carry
    calculator annotations (gsm8k, unit-conversion), off otherwise."""
    from mathtune.tasks import TASK_NAMES, task_class

    if setting is not None:
        return bool(setting)
    return task in TASK_NAMES and task_class(task).calculator_by_default


# The per-item fields of Generations: one entry per prompt, each a list with one entry per sample.
_ITEM_FIELDS = ("texts", "token_counts", "loops", "calculator_calls", "stop_reasons")


@dataclass
class Generations:
    """Per prompt, its ``num_samples`` completions and what each one did; reads as ``list[list[str]]``.

    ``texts[i][j]``: completion j of prompt i (cut before a stop string, end-of-turn token removed).
    ``token_counts[i][j]``: tokens generated, up to and including the one that stopped it.
    ``loops[i][j]``: flagged as a loop (and stopped there when ``loop_stop``).
    ``calculator_calls[i][j]``: its calculator calls, ``{"expr", "value"}`` each (value None: refused).
    ``stop_reasons[i][j]``: one of ``STOP_REASONS``.
    ``seconds``: wall time of the run (merged shards: the slowest one's).
    """

    texts: list[list[str]]
    token_counts: list[list[int]]
    seconds: float = 0.0
    loops: list[list[bool]] | None = None
    calculator_calls: list[list[list[dict]]] | None = None
    stop_reasons: list[list[str]] | None = None

    def __post_init__(self):
        # a generator that does not track a field reports its neutral value, never a missing one
        if self.loops is None:
            self.loops = [[False] * len(t) for t in self.texts]
        if self.calculator_calls is None:
            self.calculator_calls = [[[] for _ in t] for t in self.texts]
        if self.stop_reasons is None:
            self.stop_reasons = [["max_new_tokens"] * len(t) for t in self.texts]
        lengths = {name: len(getattr(self, name)) for name in _ITEM_FIELDS}
        if len(set(lengths.values())) != 1:
            raise MathtuneError(f"Generations fields disagree on the number of items: {lengths}")

    # list[list[str]] behaviour: evaluation and the API index and iterate over the texts
    def __len__(self) -> int:
        return len(self.texts)

    def __iter__(self) -> Iterator[list[str]]:
        return iter(self.texts)

    def __getitem__(self, index):
        return self.texts[index]

    @property
    def tokens_generated(self) -> int:
        return sum(sum(counts) for counts in self.token_counts)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_generated / self.seconds if self.seconds > 0 else 0.0

    def select(self, indices: Sequence[int]) -> "Generations":
        """The items at ``indices``, every field, in that order (``seconds`` kept)."""
        return Generations(seconds=self.seconds,
                           **{name: [getattr(self, name)[i] for i in indices] for name in _ITEM_FIELDS})

    @classmethod
    def merge(cls, parts: Sequence[tuple[Sequence[int], "Generations"]], n: int) -> "Generations":
        """Scatter ``(item indices, generations of those items)`` parts back into one run of ``n`` items,
        every field; ``seconds`` is the slowest part's (they ran side by side). Every item must come
        from exactly one part."""
        merged: dict[str, list] = {name: [None] * n for name in _ITEM_FIELDS}
        seen = [0] * n
        for indices, part in parts:
            if len(indices) != len(part):
                raise MathtuneError(f"a shard returned {len(part)} generations for {len(indices)} items")
            for position, i in enumerate(indices):
                seen[i] += 1
                for name in _ITEM_FIELDS:
                    merged[name][i] = getattr(part, name)[position]
        missing = [i for i, count in enumerate(seen) if count != 1]
        if missing:
            raise MathtuneError(f"merging generations: item {missing[0]} came from {seen[missing[0]]} shards "
                                f"({len(missing)} items not exactly once)")
        return cls(seconds=max((part.seconds for _, part in parts), default=0.0), **merged)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (cache files, gathering across processes)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Generations":
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(names - set(data))
        if missing:
            raise KeyError(missing[0])
        return cls(**{name: data[name] for name in names})
