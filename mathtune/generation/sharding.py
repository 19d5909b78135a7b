"""Generation split across the processes of a launched run (torchrun / accelerate), merged in item order.

The rank module (``mathtune.distributed``) only knows processes; which prompts go where is
generation's business, since it must reproduce the Generator's own batches.
"""

from __future__ import annotations

from typing import Sequence

from mathtune import distributed
from mathtune.generation.settings import Generations


def shard_plan(lengths: Sequence[int], batch_size: int, ranks: int) -> list[list[int]]:
    """Item indices per rank: the single-process batches, dealt out whole and round-robin.

    ``Generator`` sorts prompts by token length (stable) and cuts the sorted list into batches of
    ``batch_size``; the plan makes exactly those batches and gives batch b to rank b % ranks. A
    rank's items, concatenated, are still sorted, so its own Generator call re-forms the same
    batches: every row is decoded in the same batch, with the same padding and the same numerics as
    in one process (bf16 outputs depend on the batch's shapes; contiguous slices would change them).
    Fewer batches than ranks leaves ranks idle: lower --batch-size to spread the work.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches = [order[b: b + batch_size] for b in range(0, len(order), batch_size)]
    return [[i for batch in batches[r::ranks] for i in batch] for r in range(ranks)]


def generate_sharded(generator, questions: Sequence[str]) -> Generations:
    """``generator(questions)``, split across the ranks and merged in item order (collective).

    Every rank returns the whole merged ``Generations``; ``seconds`` is the slowest rank's. Sampled
    generation (``temperature > 0`` or several samples) draws from one random stream in batch order,
    which no split reproduces, so it runs on rank 0 alone (the others wait).
    """
    questions = list(questions)
    if not distributed.is_collective():
        return generator(questions)
    world, me, settings = distributed.world_size(), distributed.rank(), generator.settings
    if settings.greedy and settings.num_samples == 1:
        lengths = [len(ids) for ids in generator.encode(questions)]
        plan = shard_plan(lengths, settings.batch_size, world)
    else:
        plan = [list(range(len(questions)))] + [[] for _ in range(world - 1)]
    mine = plan[me]
    out = generator([questions[i] for i in mine]) if mine else Generations([], [], 0.0)
    # every per-item field travels (texts, token counts, loop flags, calculator calls, stop reasons, ids)
    shards = distributed.gather_objects(out.to_dict())
    return Generations.merge([(indices, Generations.from_dict(shard)) for indices, shard in zip(plan, shards)],
                             len(questions))
