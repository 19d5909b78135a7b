"""Which attention kernel a CPU training batch runs: plain matmul + softmax for short batches, torch's
SDPA for long ones.

Plain ("eager") attention materialises the batch x heads x T x T scores, and memory traffic grows with
T^2; torch's CPU SDPA kernel works in blocks and never holds them, but costs more per block. Forward +
backward of one SmolLM2-135M attention (9 query heads, 3 kv heads, batch 8, padding mask, 2-core
AVX512-BF16 CPU; BENCHMARKS.md, "Attention by batch length"):

    T        230     300     384     467     640    1024
    bf16   0.68x   0.72x   1.00x   1.31x   1.60x   2.29x    SDPA's speed over eager
    fp32   1.03x   1.04x   1.11x   1.85x   1.88x   2.16x

So eager below ``SDPA_FROM_TOKENS`` (GSM8K's batches: eager is 1.4x faster in bf16 at ~230 tokens) and
SDPA from there (at 1,024 tokens it saves ~15 s of a batch-8 step's 30 layers). The kernel is switched
per batch through the model's public ``set_attn_implementation``; length-grouped batches change sides
rarely, so the switch costs nothing measurable.
"""

from __future__ import annotations

SDPA_FROM_TOKENS = 384  # padded batch length (keys per query) from which SDPA beats eager, both precisions
SHORT, LONG = "eager", "sdpa"


def kernel_for(positions: int) -> str:
    """The attention implementation for a batch padded to ``positions`` tokens."""
    return LONG if positions >= SDPA_FROM_TOKENS else SHORT


class AttentionByLength:
    """Keeps ``model`` (a transformers model, or a PEFT model around one) on the kernel its batch length
    wants. ``switchable`` is False where the model cannot change kernels at run time (it does not follow
    transformers' AttentionInterface, or it has no SDPA): it then stays on eager throughout."""

    def __init__(self, model):
        self.base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.switchable = self._try_both()

    def _current(self) -> str | None:
        return getattr(getattr(self.base, "config", None), "_attn_implementation", None)

    def _try_both(self) -> bool:
        """Set SDPA and back to eager; True when both took (a model that cannot switch keeps eager)."""
        if not hasattr(self.base, "set_attn_implementation"):
            return False
        try:
            self.base.set_attn_implementation(LONG)
            took = self._current() == LONG
        except (ValueError, ImportError, KeyError):  # transformers refuses SDPA for this model
            took = False
        self.base.set_attn_implementation(SHORT)
        return took and self._current() == SHORT

    def use_for(self, positions: int) -> str:
        """Switch to the kernel for a batch of ``positions`` tokens (only when it differs); returns it."""
        if not self.switchable:
            return SHORT
        wanted = kernel_for(positions)
        if self._current() != wanted:
            self.base.set_attn_implementation(wanted)
        return wanted
