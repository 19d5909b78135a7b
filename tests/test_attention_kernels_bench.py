"""bench/attention_kernels.py compares the two kernels on the attention transformers' Llama runs."""

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaAttention, eager_attention_forward

from bench.attention_kernels import DIM, HEADS, KV_HEADS, eager, main, padded_causal_mask, sdpa


def test_the_bench_kernels_compute_transformers_eager_attention():
    """Its eager kernel is transformers' own (so its timings are the ones a run pays), and SDPA agrees."""
    config = LlamaConfig(hidden_size=HEADS * DIM, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS)
    module = LlamaAttention(config, layer_idx=0).eval()
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, heads, 12, DIM, generator=generator) for heads in (HEADS, KV_HEADS, KV_HEADS))
    mask = padded_causal_mask(2, 12, torch.float32)
    reference, _ = eager_attention_forward(module, query, key, value, mask, scaling=DIM ** -0.5)
    torch.testing.assert_close(eager(query, key, value, mask), reference)
    torch.testing.assert_close(sdpa(query, key, value, mask), reference, atol=1e-5, rtol=1e-5)


def test_the_bench_prints_one_line_per_length_and_precision(capsys):
    assert main(["--lengths", "16", "24", "--precisions", "fp32", "--rows", "2", "--threads", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("machine ")
    assert [line.split(":")[0] for line in lines[1:]] == ["fp32  T    16", "fp32  T    24"]
    assert all("sdpa" in line and "outputs differ by" in line for line in lines[1:])
