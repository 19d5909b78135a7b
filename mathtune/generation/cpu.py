"""The CPU fast path: a prefill/decode loop mathtune owns, over KV buffers it owns, on public API only.

transformers' ``generate()`` keeps its KV cache in a ``DynamicCache`` that appends with ``torch.cat``
(copying the whole cache every step) and runs SDPA, whose CPU kernel is slow for one query token.
Its cache classes are not meant to be subclassed (their layer protocol changes between minor
releases), so mathtune does not plug into them. Instead it calls the model's forward itself with
``use_cache=False`` and explicit ``position_ids``, and registers one attention function through the
public ``AttentionInterface.register``: with no cache passed, each attention call receives exactly
the keys/values of the tokens being fed, and that function writes them into mathtune's own
preallocated buffers (``ForwardState``) and attends over the filled slots. Nothing else of the model
is touched. Where a model needs what this attention does not implement (logit soft-capping, a
sliding window shorter than the batch, attention sinks, position biases), the first forward raises
``FastPathUnsupported`` and the engine decodes with plain ``model.generate`` instead, saying so once.

Per batch (rows are sorted by prompt length, so neighbours have similar lengths):

  shared prefix  every chat prompt starts with the same system turn (~24 of ~93 tokens for SmolLM2).
                 It is run once (batch 1) and its keys/values written into every row's slots.
  prefill        the rest of each prompt in groups of ``PREFILL_GROUP_ROWS`` rows, each group padded
                 to its own longest rest. A row's slots are [prefix][padding][rest][generated]; every
                 rest ends at the same slot, so one decode step writes one slot column for all rows.
                 Padding slots are masked; positions count real tokens only, as ``generate()`` does.
  decode         one token per row per step; keys are stored transposed ([dim, slots]) so the query x
                 keys bmm reads each row's keys as one plain matrix. Before each chunk of steps the
                 buffers are laid out anew with exactly the filled slots plus the chunk's steps
                 (``reserve``), so both bmm's read whole contiguous buffers, unwritten slots masked
                 (the timings behind each choice are in BENCHMARKS.md).
  finished rows  leave the buffers every ``chunk_tokens`` steps (the engine calls ``select``; the
                 rows are cut at the next ``reserve``, in the same copy).
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from typing import Sequence

import torch

ATTENTION_NAME = "mathtune_cpu"
# Rows prefilled together (after the shared prefix): similar lengths, since rows are sorted, so a
# group pads little, and 16 rows x ~60 tokens is still a large, efficient matmul.
PREFILL_GROUP_ROWS = 16

# The decode state of the forward in progress on this thread/context; None outside mathtune's loop,
# where the registered attention is plain SDPA (registration is global and transformers has no
# public way to remove a name, so the function must be harmless when it lingers).
_ACTIVE: contextvars.ContextVar["ForwardState | None"] = contextvars.ContextVar("mathtune_forward", default=None)
_REGISTER_LOCK = threading.Lock()
_registered = False


class FastPathUnsupported(Exception):
    """The model asks the attention for something the fast path does not implement."""


def _sdpa(*args, **kwargs):
    from transformers import AttentionInterface

    return AttentionInterface()["sdpa"](*args, **kwargs)


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The registered attention: mathtune's buffers inside its decode loop, plain SDPA anywhere else."""
    state = _ACTIVE.get()
    if state is None:
        return _sdpa(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    return state.attend(module, query, key, value, scaling, dropout, kwargs)


def register_attention() -> str:
    """Register ``_attention`` under ``ATTENTION_NAME`` (once per process) and return the name."""
    global _registered
    from transformers import AttentionInterface

    with _REGISTER_LOCK:
        if not _registered:
            AttentionInterface.register(ATTENTION_NAME, _attention)
            _registered = True
    return ATTENTION_NAME


def decoding_active() -> bool:
    """Is a mathtune fast-path forward running in this context right now?"""
    return _ACTIVE.get() is not None


class ForwardState:
    """The KV buffers of one batch and where the forward in progress reads and writes.

    Per layer: keys ``[rows, kv_heads, dim, capacity]`` (transposed) and values ``[rows, kv_heads,
    capacity, dim]``, zero-filled: a padding slot may never be written, and a masked slot's
    probability 0 times NaN garbage would still be NaN.

    ``capacity`` is what the buffers hold now: the prompt's slots for the prefill, then the filled
    slots plus the next chunk's steps (``relayout``), so a decode step reads whole contiguous buffers.
    ``total_slots`` is what the batch may use in all (prompt + max_new_tokens).
    """

    def __init__(self, rows: int, capacity: int, total_slots: int):
        self.rows = rows
        self.capacity = capacity
        self.total_slots = total_slots
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        # set per forward by FastDecoder
        self.row_index: torch.Tensor | None = None  # rows this forward covers (None: all)
        self.start = 0  # slot of the forward's first token
        self.mask: torch.Tensor | None = None  # bool [rows, 1, q, slots read]; None: attend to all

    def _buffers(self, layer: int, key: torch.Tensor, value: torch.Tensor):
        if layer not in self.keys:
            kv_heads, dim = key.shape[1], key.shape[-1]
            self.keys[layer] = key.new_zeros((self.rows, kv_heads, dim, self.capacity))
            self.values[layer] = value.new_zeros((self.rows, kv_heads, self.capacity, value.shape[-1]))
        return self.keys[layer], self.values[layer]

    def relayout(self, keep: torch.Tensor | None, filled: int, capacity: int) -> None:
        """New zero-filled buffers of ``capacity`` slots holding the first ``filled`` slots of the
        rows ``keep`` (None: all rows) of the old ones: one copy per chunk, not one per step."""
        for layer in self.keys:
            # the filled slots only: the old buffers' unwritten room is not gathered
            old_keys, old_values = self.keys[layer][..., :filled], self.values[layer][:, :, :filled]
            if keep is not None:
                old_keys, old_values = old_keys[keep], old_values[keep]
            rows, kv_heads, dim = old_keys.shape[:3]
            keys = old_keys.new_zeros((rows, kv_heads, dim, capacity))
            values = old_values.new_zeros((rows, kv_heads, capacity, old_values.shape[-1]))
            keys[..., :filled] = old_keys
            values[:, :, :filled] = old_values
            self.keys[layer], self.values[layer] = keys, values
        if keep is not None:
            self.rows = len(keep)
        self.capacity = capacity

    def attend(self, module, query, key, value, scaling, dropout, kwargs):
        layer = getattr(module, "layer_idx", None)
        if layer is None:
            raise FastPathUnsupported(f"{type(module).__name__} has no layer_idx")
        if kwargs.get("softcap") is not None:
            raise FastPathUnsupported("attention logit soft-capping")
        window = kwargs.get("sliding_window")
        if window is not None and window < self.total_slots:
            raise FastPathUnsupported(f"a sliding window ({window}) shorter than the batch ({self.total_slots} tokens)")
        for name in ("s_aux", "sinks", "position_bias"):
            if kwargs.get(name) is not None:
                raise FastPathUnsupported(f"attention argument {name}")
        if dropout and module.training:
            raise FastPathUnsupported("attention dropout in training mode")
        keys, values = self._buffers(layer, key, value)
        q_len = query.shape[2]
        end = self.start + q_len
        # key/value of a prefix forward have batch 1: the assignment broadcasts them into every row
        rows = slice(None) if self.row_index is None else self.row_index
        keys[rows, :, :, self.start:end] = key.transpose(2, 3)
        values[rows, :, self.start:end] = value
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        if q_len == 1 and self.row_index is None and key.shape[0] == self.rows:
            # the whole buffers, unfilled slots masked: a slice [..., :end] would not be contiguous,
            # and a bf16 bmm (oneDNN) copies such an operand first: 2 copies of a layer's cache per step
            return _buffer_attention(query, keys, values, self.mask, scale)
        # prompt tokens: over the rows' filled slots (a gather copy; prefill runs once per row)
        read = slice(0, key.shape[0]) if self.row_index is None else self.row_index
        return _buffer_attention(query, keys[read, :, :, :end], values[read, :, :end], self.mask, scale)


def _buffer_attention(query, keys_t, values, mask, scale):
    """Attention of ``query`` ``[rows, heads, q, dim]`` over ``[rows, kv_heads, dim, slots]`` keys /
    ``[rows, kv_heads, slots, dim]`` values, ``mask`` bool ``[rows, 1, q, slots]`` (True: may attend)
    or None: two bmm's, each kv head's query heads and tokens packed into one matrix, so no
    ``repeat_kv`` copy. Returns ``[rows, q, heads, dim]``.

    Decode (q = 1): pass whole contiguous buffers: merging rows and kv heads is then a view, and bmm
    reads them in place (a slot-sliced view is one for fp32's BLAS too, but a bf16 bmm goes to oneDNN,
    which copies any operand that is not contiguous: measured, 2 copies of the layer's cache per step).
    Prefill (q > 1): SDPA's CPU kernel with a boolean mask and grouped heads took the math path
    (repeat_kv copies, per-row all-masked checks); these two bmm's do the same arithmetic."""
    batch, heads, q_len, dim = query.shape
    kv_heads, slots = keys_t.shape[1], keys_t.shape[-1]
    rep = heads // kv_heads  # query heads per key/value head (grouped-query attention)
    packed = query.reshape(batch * kv_heads, rep * q_len, dim)
    scores = torch.bmm(packed, keys_t.reshape(batch * kv_heads, dim, slots))
    scores = scores.view(batch, kv_heads, rep, q_len, slots) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
    out = torch.bmm(probs.view(batch * kv_heads, rep * q_len, slots), values.reshape(batch * kv_heads, slots, dim))
    return out.view(batch, heads, q_len, dim).transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def _forward_state(state: ForwardState):
    token = _ACTIVE.set(state)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def common_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    first = rows[0]
    n = min(len(r) for r in rows) - 1  # every row keeps >= 1 token of its own (its last feeds decoding)
    for i in range(n):
        token = first[i]
        if any(r[i] != token for r in rows):
            return i
    return n


class FastDecoder:
    """One batch: ``prefill()`` -> logits of each row's next token; ``step(tokens)`` -> the next logits;
    ``select(keep)`` drops finished rows. ``sequences`` is ``[rows, width]``: the prompt laid out as
    in the buffers ([prefix][padding][rest]) followed by every token fed so far."""

    def __init__(self, model, batch_ids: Sequence[Sequence[int]], max_new_tokens: int, pad_id: int,
                 forward_kwargs: dict, device):
        self.model = model
        self.forward_kwargs = forward_kwargs
        self.device = device
        self.prefix = common_prefix_length(batch_ids)
        p = self.prefix
        self.rests = [list(ids[p:]) for ids in batch_ids]  # each >= 1 token
        self.width = max(len(r) for r in self.rests)  # every rest ends at slot p + width
        rows = len(batch_ids)
        # the prefill fills p + width slots; decode_chunk makes room for each chunk's steps (reserve)
        self.state = ForwardState(rows, p + self.width, p + self.width + max_new_tokens)
        self.sequences = torch.tensor(
            [list(ids[:p]) + [pad_id] * (self.width - len(r)) + r for ids, r in zip(batch_ids, self.rests)],
            device=device)
        # slots a row may attend to: all but its padding (generated slots are read only once written)
        slots = self.slots = torch.arange(self.state.total_slots, device=device)
        starts = torch.tensor([p + self.width - len(r) for r in self.rests], device=device)
        self.valid = (slots[None, :] < p) | (slots[None, :] >= starts[:, None])
        self.next_position = torch.tensor([p + len(r) for r in self.rests], device=device)
        self.filled = 0
        self.pending: torch.Tensor | None = None  # next-token logits not yet used (after prefill)
        self.keep: torch.Tensor | None = None  # rows selected since the last reserve (buffers not yet cut)

    def _forward(self, input_ids, position_ids, row_index, start: int, mask):
        self.state.row_index, self.state.start, self.state.mask = row_index, start, mask
        with _forward_state(self.state):
            out = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False, **self.forward_kwargs)
        return out.logits[:, -1, :]

    def prefill(self) -> None:
        """Run every prompt token; the logits of each row's first new token wait in ``pending``."""
        self.pending = torch.cat(self.prefill_rows(list(range(len(self.rests)))))

    def prefill_rows(self, rows: list[int]) -> list[torch.Tensor]:
        """The shared prefix once, then ``rows``' own prompt tokens in groups of ``PREFILL_GROUP_ROWS``:
        their keys/values land in the buffers; returns each group's next-token logits, in ``rows`` order."""
        p, w, device = self.prefix, self.width, self.device
        if p > 0:
            causal = torch.ones(p, p, dtype=torch.bool, device=device).tril()
            self._forward(self.sequences[:1, :p], torch.arange(p, device=device)[None], None, 0,
                          causal[None, None])
        logits = []
        slots = torch.arange(p + w, device=device)
        for g in range(0, len(rows), PREFILL_GROUP_ROWS):
            group = rows[g:g + PREFILL_GROUP_ROWS]
            gw = max(len(self.rests[r]) for r in group)  # this group's width
            index = torch.tensor(group, device=device)
            query_slots = slots[p + w - gw:]
            # a query sees the prefix and its row's real tokens up to itself; a padding query sees
            # itself too, so its (unused) output stays finite
            causal = slots[None, :] <= query_slots[:, None]
            diagonal = slots[None, :] == query_slots[:, None]
            mask = causal[None] & (self.valid[index, None, : p + w] | diagonal[None])
            ids = self.sequences[index, p + w - gw:]
            real = self.valid[index, p + w - gw: p + w].long()
            positions = (p + real.cumsum(-1) - 1).clamp(min=p)
            logits.append(self._forward(ids, positions, index, p + w - gw, mask[:, None]))
        self.filled = p + w
        return logits

    def reserve(self, steps: int) -> None:
        """Buffers of exactly the filled slots plus ``steps`` more (and only the rows kept by
        ``select``), so the next ``steps`` decode steps read whole buffers: a bf16 decode attention
        over a tight buffer takes half the time of one over a slice of a larger buffer (BENCHMARKS.md)."""
        self.state.relayout(self.keep, self.filled, min(self.filled + steps, self.state.total_slots))
        self.keep = None

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (at slot ``filled``) and return the logits after it."""
        if self.keep is not None or self.filled >= self.state.capacity:
            self.reserve(1)  # a caller that did not reserve: correct, one copy per step
        # the slots this row may read: its own (not padding) and only those written so far
        capacity = self.state.capacity
        mask = (self.valid[:, :capacity] & (self.slots[:capacity] <= self.filled))[:, None, None]
        logits = self._forward(tokens[:, None], self.next_position[:, None], None, self.filled, mask)
        self.filled += 1
        self.next_position = self.next_position + 1
        return logits

    def select(self, keep: list[int]) -> None:
        index = torch.tensor(keep, device=self.device)
        self.keep = index if self.keep is None else self.keep[index]
        self.sequences = self.sequences[index]
        self.valid = self.valid[index]
        self.next_position = self.next_position[index]
        if self.pending is not None:
            self.pending = self.pending[index]


def logits_warpers(temperature: float, top_p: float):
    """transformers' own temperature and nucleus warpers, as ``generate()`` applies them when sampling."""
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    warpers = [TemperatureLogitsWarper(float(temperature))]
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(float(top_p)))
    return warpers


def greedy_tokens(scores: torch.Tensor) -> torch.Tensor:
    """``scores.argmax(dim=-1)`` of a ``[rows, vocab]`` tensor, the same indices (ties and NaN: the
    first), in a fifth of the time on CPU.

    torch's CPU argmax walks each row one element at a time to track the index (11.7 ms for 128 x
    49152 fp32 scores, one thread: ~7% of a bf16 decode step at batch 128), while a max without
    indices is vectorised. So: the max of each block of ``block`` columns (vectorised), the first
    block holding the row's max (an argmax over vocab / block values), then the argmax inside that
    block alone: 1.9 ms for the same scores. The first block whose max is the row's max holds the
    row's first maximum, so the index is argmax's (with NaN, max and argmax both propagate it).
    """
    rows, vocab = scores.shape
    block = next((b for b in (1024, 512, 256, 128) if vocab % b == 0 and vocab > b), None)
    if block is None or not scores.is_contiguous():
        return scores.argmax(dim=-1)
    blocks = scores.view(rows, vocab // block, block)
    best = blocks.amax(dim=-1).argmax(dim=-1)
    inside = blocks[torch.arange(rows, device=scores.device), best].argmax(dim=-1)
    return best * block + inside


def sampled_tokens(scores: torch.Tensor) -> torch.Tensor:
    """One token per row of ``[rows, vocab]`` scores, drawn from ``softmax(scores)``: the distribution
    ``torch.multinomial(torch.softmax(scores, -1), 1)`` draws from, by inverse-CDF sampling with one
    uniform number per row.

    torch's CPU multinomial (one sample, no replacement) draws an exponential variate for every
    vocabulary entry and takes argmax(p / q): 32 x 49152 random numbers per step, 49 ms for 32 rows
    on two fp32 cores (``bench/sampling_kernel.py``), 14% of a GRPO rollout (cProfile, 4 GSM8K
    questions x 8 samples x 128 tokens).
    Here: the row's probabilities as multinomial gets them (softmax in the scores' precision), their
    running sum in float64 (an fp32 sum over 49k entries drifts by ~1e-5, the size of a rare token's
    probability), one uniform u in [0, total) per row, and the first index whose running sum exceeds u
    (``searchsorted(right=True)``): 3.5 ms for the same rows (13.9x). A token of probability 0 (-inf score:
    top-p cut, calculator forcing) never exceeds the sum before it, so it is never drawn, and a
    one-hot row returns its token.
    """
    # MPS has no float64: there the sum stays in float32 (the fast path runs on MPS only when forced)
    wide = torch.float32 if scores.device.type == "mps" else torch.float64
    cumulative = torch.softmax(scores, dim=-1).to(wide).cumsum_(dim=-1)
    uniform = torch.rand(scores.shape[0], 1, dtype=wide, device=scores.device) * cumulative[:, -1:]
    return torch.searchsorted(cumulative, uniform, right=True).squeeze(1).clamp_(max=scores.shape[1] - 1)


def decode_chunk(decoder: FastDecoder, steps: int, *, greedy: bool, warpers, processors, stopping,
                 pad_id: int) -> torch.Tensor:
    """Up to ``steps`` tokens per row, as one ``generate()`` call would choose them: processors
    (calculator), then greedy argmax or warped sampling (``sampled_tokens``); rows that ``stopping`` ends get
    ``pad_id`` afterwards; stops early when every row has ended. Returns the new tokens ``[rows, n]``;
    the last one is fed at the start of the next chunk (after finished rows have left)."""
    start = decoder.sequences.shape[1]
    decoder.reserve(steps)
    unfinished = torch.ones(decoder.sequences.shape[0], dtype=torch.bool, device=decoder.device)
    for _ in range(steps):
        logits, decoder.pending = decoder.pending, None
        if logits is None:
            logits = decoder.step(decoder.sequences[:, -1])
        if greedy and not processors:
            # Nothing but the argmax uses the scores (the stopping criteria read the tokens): take it
            # on the model's own logits.
            # generate() argmaxes a float32 copy, but widening bf16/fp16 to fp32 is exact and keeps the
            # order, so the index is the same, ties and NaN included; the copy (128 x 49152 fp32 =
            # 25 MB, a fresh page-faulted allocation every step) took ~32 ms of a ~236 ms bf16 step.
            scores = logits
        else:
            # float32 copy, as generate() takes it, so processors never write into the model's output
            scores = logits.to(copy=True, dtype=torch.float32)
            for processor in processors:
                scores = processor(decoder.sequences, scores)
        if greedy:
            tokens = greedy_tokens(scores)
        else:
            for warper in warpers:
                scores = warper(decoder.sequences, scores)
            tokens = sampled_tokens(scores)
        tokens = torch.where(unfinished, tokens, torch.full_like(tokens, pad_id))
        decoder.sequences = torch.cat([decoder.sequences, tokens[:, None]], dim=1)
        unfinished &= ~stopping(decoder.sequences, scores).to(unfinished.device)
        if not unfinished.any():
            break
    return decoder.sequences[:, start:]
