"""Which attention kernel a CPU training batch runs: plain matmul + softmax for short batches, torch's
SDPA for long ones.

Plain ("eager") attention materialises the batch x heads x T x T scores, and its cost grows faster
than T^2 once they outgrow the caches; torch's CPU SDPA kernel works in blocks and never holds them,
but costs more per block. In mathtune's own training step the two cross near 300 tokens (two runs
disagree on which wins there), in bf16 and fp32; from 384 tokens SDPA is 1.3-2.0x faster, and eager
at 800 (fp32) or 934 (bf16) tokens, batch 8, needs more than 24 GiB; below, eager wins (GSM8K's
usual ~230-token batches: 1.2x). Figures and commands: BENCHMARKS.md, "Attention by batch length"
(``bench/attention_kernels.py``).

So eager below ``SDPA_FROM_TOKENS`` and SDPA from there. The kernel is switched per batch through
transformers' public attention setter (``compat.switch_attention``); length-grouped batches change sides rarely. The price,
for long batches only: SDPA's blockwise softmax rounds per padded length, so such a batch split over
processes matches one process to ~1e-5 rather than closer (training/recipe.py's reason for eager).
"""

from __future__ import annotations

from mathtune.compat import attention_implementation, can_switch_attention, switch_attention

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
        return attention_implementation(self.base)  # transformers has a public setter, no getter

    def _try_both(self) -> bool:
        """Set SDPA and back to eager; True when both took (a model that cannot switch keeps eager)."""
        if not can_switch_attention(self.base):
            return False
        try:
            switch_attention(self.base, LONG)
            took = self._current() == LONG
        except (ValueError, ImportError, KeyError):  # transformers refuses SDPA for this model
            took = False
        switch_attention(self.base, SHORT)
        return took and self._current() == SHORT

    def use_for(self, positions: int) -> str:
        """Switch to the kernel for a batch of ``positions`` tokens (only when it differs); returns it."""
        if not self.switchable:
            return SHORT
        wanted = kernel_for(positions)
        if self._current() != wanted:
            switch_attention(self.base, wanted)
        return wanted
