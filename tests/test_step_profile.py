"""bench/step_profile.py sorts profiled ops into the categories its bound is computed from."""

import torch
from torch.profiler import ProfilerActivity, profile

from bench.step_profile import CATEGORIES, matmul_dims, sort_ops


def test_matmul_dims_reads_mm_and_addmm_shapes():
    assert matmul_dims("aten::mm", [[10, 8], [8, 6]]) == (10, 8, 6)
    assert matmul_dims("aten::addmm", [[6], [10, 8], [8, 6]]) == (10, 8, 6)
    assert matmul_dims("aten::mm", [[10, 8]]) is None


def test_ops_are_sorted_by_the_dimension_they_multiply_by():
    x = torch.randn(10, 8)
    vocab_head, lora_a, weight = torch.randn(8, 50), torch.randn(8, 4), torch.randn(8, 6)
    param = torch.nn.Parameter(torch.randn(6, 8))
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        x @ vocab_head
        x @ lora_a
        x @ weight
        x @ weight
        torch.bmm(torch.randn(3, 5, 8), torch.randn(3, 8, 5))
        (x * 2).relu()
        x.to(torch.bfloat16)  # a cast, as autocast makes of every fp32 weight
        (x @ param.t()).sum().backward()  # autograd's node wrappers
    optimizer = torch.optim.AdamW([param])
    with profile(activities=[ProfilerActivity.CPU]) as optimizer_prof:
        optimizer.step()
    seconds, flops, total = sort_ops(prof.key_averages(group_by_input_shape=True), vocab=50, lora_rank=4,
                                     optimizer_events=optimizer_prof.key_averages())
    assert flops["LM head"] == 2 * 10 * 8 * 50
    assert flops["LoRA matmuls"] == 2 * 10 * 8 * 4
    assert all(seconds[c] > 0 for c in CATEGORIES)  # every category met at least once above
    assert abs(sum(seconds[c] for c in CATEGORIES) - total) < 1e-9
    # without a LoRA rank (decoding) the rank-4 matmul is a weight matmul
    _, plain, _ = sort_ops(prof.key_averages(group_by_input_shape=True), vocab=50, lora_rank=None)
    assert plain["LoRA matmuls"] == 0
    assert plain["weight matmuls"] == flops["weight matmuls"] + 2 * 10 * 8 * 4
    assert plain["weight matmuls"] >= 2 * (2 * 10 * 8 * 6) + 2 * 10 * 8 * 4  # counted per call
