"""What came out of a generation run (``Generations``); what to decode is ``config.GenerationArgs``.

``Generations`` is the one record of a generation run: every per-item field lives here, so sharding
(``generation.sharding``), the eval cache (``evaluation``) and sampling carry all of them
through ``select`` / ``merge`` / ``to_dict`` instead of each rebuilding a subset by hand.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from mathtune.config import GenerationArgs
from mathtune.errors import MathtuneError

# Why a completion ended (``Generations.stop_reasons``).
STOP_REASONS = ("end_of_turn", "stop_string", "loop", "max_new_tokens")


# The settings themselves are declared once, in ``config.GenerationArgs`` (flags, YAML, rules); the
# old name stays importable for the Python API.
GenerationSettings = GenerationArgs


# The per-item fields of Generations: one entry per prompt, each a list with one entry per sample.
_ITEM_FIELDS = ("texts", "token_counts", "loops", "calculator_calls", "stop_reasons", "token_ids")


@dataclass
class Generations:
    """Per prompt, its ``num_samples`` completions and what each one did; reads as ``list[list[str]]``.

    ``texts[i][j]``: completion j of prompt i (cut before a stop string, end-of-turn token removed).
    ``token_counts[i][j]``: tokens generated, up to and including the one that stopped it.
    ``loops[i][j]``: flagged as a loop (and stopped there when ``loop_stop``).
    ``calculator_calls[i][j]``: its calculator calls, ``{"expr", "value"}`` each (value None: refused).
    ``stop_reasons[i][j]``: one of ``STOP_REASONS``.
    ``token_ids[i][j]``: the generated token ids, the stopping token included (what a policy-gradient
    step and the collapse check read; empty lists where a generator does not keep them).
    ``seconds``: wall time of the run (merged shards: the slowest one's).
    """

    texts: list[list[str]]
    token_counts: list[list[int]]
    seconds: float = 0.0
    loops: list[list[bool]] | None = None
    calculator_calls: list[list[list[dict]]] | None = None
    stop_reasons: list[list[str]] | None = None
    token_ids: list[list[list[int]]] | None = None

    def __post_init__(self):
        # a generator that does not track a field reports its neutral value, never a missing one
        if self.loops is None:
            self.loops = [[False] * len(t) for t in self.texts]
        if self.calculator_calls is None:
            self.calculator_calls = [[[] for _ in t] for t in self.texts]
        if self.stop_reasons is None:
            self.stop_reasons = [["max_new_tokens"] * len(t) for t in self.texts]
        if self.token_ids is None:
            self.token_ids = [[[] for _ in t] for t in self.texts]
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
