"""Batched generation for evaluation, the Python API and anything else that needs completions.

Prompts go through exactly the code training used (``data.format_prompt`` + ``data.encode_prompt``),
so the model sees the same token ids at eval time that it was trained on. Then, per batch:

  sort      prompts by token length, so a batch pads little (the original order is restored)
  pad       LEFT, so every row's next token comes right after its own prompt
  generate  ``model.generate`` in chunks of ``CHUNK_TOKENS`` new tokens, reusing the KV cache; between
            chunks the rows that finished (end-of-turn token or a stop string) leave the batch and the
            cache, so later steps spend nothing on them (plain ``generate`` keeps computing finished
            rows, padding them, until the longest row ends)
  decode    tokens up to the stopping token; the text is cut at the first stop string

Greedy unless ``temperature > 0``; sampling draws ``num_samples`` completions per prompt from a
generator seeded with ``seed`` (same inputs and settings -> same samples).

CPU fast path (what ``bench/eval_throughput.py`` measures; each piece was profiled on a 2-core CPU
with SmolLM2-135M in bf16, 64 GSM8K prompts, before it was added; all together: 170 -> 242 generated
tokens per CPU-second over plain batched generate()):

  shared prefix  every chat prompt starts with the same system turn (~24 of ~93 tokens for SmolLM2).
                 Its KV cache is computed once per batch and copied into every row; the rest of each
                 prompt is prefilled in groups of ``PREFILL_GROUP_ROWS`` similar-length rows, so a
                 group pads to its own longest prompt, not the batch's. Rows are laid out as
                 [prefix][padding][rest of prompt]; padding in the middle is masked, and generate()
                 derives position ids from the attention mask, so positions stay 0..n-1.
                 Prefill: 13.8 -> 7.4 CPU-seconds.
  in-place cache the default DynamicCache appends with ``torch.cat``, copying the whole cache every
                 step (38% of a decode step in one profile at ~215 tokens). Ours preallocates
                 ``prompt + max_new_tokens`` slots and writes each new token in place.
  attention      one query token per row: SDPA's CPU kernel took 2.3 ms per layer where two small
                 bf16 bmm's take 0.7 ms, so decode steps use ``_cpu_attention`` (grouped-query heads
                 packed, no ``repeat_kv`` copy, reading only the filled slots of the preallocated
                 buffers, in place). Decode step with both: 263 -> 199 ms CPU. Prompts (more than
                 one query token) still go through SDPA.

Other devices take the plain path (left-padded batch, transformers' own cache and attention).
Precision is the caller's choice: load the model in bf16 on CPUs with AVX512-BF16 / AMX
(``hardware.choose_precision``), where generation runs ~2.2x faster than fp32. Measured trade-off
(SmolLM2-135M, 1 thread): in fp32 greedy outputs did not depend on the batch size (32/32 identical,
batch 16 vs 32); in bf16 rounding depends on the batch's shapes, so 24/64 outputs changed between
batch 32 and 64, and 70/128 differed from fp32 -- yet correctness agreed with fp32 on 123/128
unit-conversion items (accuracy 4.7% vs 3.9%). Eval summaries and cache keys record precision and
batch size; use fp32 when per-item outputs must be reproducible across batch sizes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from mathtune.config import EVAL_BATCH_SIZE
from mathtune.data import encode_prompt, end_of_turn_token_id, format_prompt
from mathtune.errors import MathtuneError

# New tokens per ``generate`` call. Between calls finished rows leave the batch; a smaller chunk drops
# them sooner but pays generate()'s setup (~ms) and a copy of the KV cache more often.
CHUNK_TOKENS = 32
# Rows prefilled together (after the shared prefix): similar lengths, since rows are sorted, so a
# group pads little, and 16 rows x ~60 tokens is still a large, efficient matmul.
PREFILL_GROUP_ROWS = 16
_ATTENTION_NAME = "mathtune_cpu"
# Tasks whose targets carry GSM8K calculator annotations: calculator-assisted decoding is on by
# default for these (``--calculator`` unset), off for every other task.


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
    loop_stop: bool = True  # stop a row that repeats a line / an 8+ token span 3 times (mathtune.loops)

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


class Generations(list):
    """``list[list[str]]``: per prompt, its ``num_samples`` completions; plus what they cost.

    ``token_counts[i][j]`` is the number of tokens generated for completion j of prompt i, up to and
    including the token that stopped it (end-of-turn, or the one completing a stop string).
    ``loops[i][j]``: completion j was flagged as a loop (and stopped there when ``loop_stop``);
    ``calculator_calls[i][j]``: its calculator calls, ``{"expr", "value"}`` each (value None: refused).
    """

    def __init__(self, texts: list[list[str]], token_counts: list[list[int]], seconds: float,
                 loops: list[list[bool]] | None = None, calculator_calls: list[list[list[dict]]] | None = None):
        super().__init__(texts)
        self.token_counts = token_counts
        self.seconds = seconds
        self.loops = loops if loops is not None else [[False] * len(t) for t in texts]
        self.calculator_calls = calculator_calls if calculator_calls is not None else [[[] for _ in t] for t in texts]

    @property
    def tokens_generated(self) -> int:
        return sum(sum(counts) for counts in self.token_counts)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_generated / self.seconds if self.seconds > 0 else 0.0


# --------------------------------------------------------------------------- CPU fast path pieces


def _cpu_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention for the in-place cache: prompts via SDPA, single decode tokens via two bmm's.

    ``key``/``value`` are the filled slots only: ``[batch, heads, filled, dim]`` views of the cache's
    preallocated buffers (keys are stored transposed, see ``InPlaceLayer``), so the fill length is
    the tensor's own shape and cannot be lost (a copy made by a library keeps it). The bmm's read those views in place: merging batch and heads of such a
    view is still a view (its batch stride is heads x the head stride), and bmm takes strided
    batches without a copy. So a step reads only the filled slots: on a 2-core fp32 CPU, 128 rows x
    3 KV heads, 150 of 300 slots filled: 2.6 ms per bmm against 5.5 ms over the whole buffer.
    Padding is masked by ``attention_mask`` (None when no row is padded).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, q_len, dim = query.shape
    if q_len != 1 or kwargs.get("position_bias") is not None or (dropout and module.training):
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    kv_heads, filled = key.shape[1], key.shape[2]
    rep = heads // kv_heads  # query heads per key/value head (grouped-query attention)
    scale = scaling if scaling is not None else dim**-0.5
    # [batch*kv_heads, rep, dim] x [batch*kv_heads, dim, filled]: each kv head serves its rep query heads
    scores = torch.bmm(query.reshape(batch * kv_heads, rep, dim), key.reshape(batch * kv_heads, filled, dim).transpose(1, 2))
    scores = scores.view(batch, kv_heads, rep, filled) * scale
    if attention_mask is not None:
        if attention_mask.dtype != torch.bool or attention_mask.shape[-1] != filled:
            raise RuntimeError(f"decode attention expects a boolean mask over {filled} slots, got "
                               f"{attention_mask.dtype} {tuple(attention_mask.shape)}")
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    out = torch.bmm(probs.view(batch * kv_heads, rep, filled), value.reshape(batch * kv_heads, filled, dim))
    return out.view(batch, 1, heads, dim), None


# How many Generators currently use the registered attention (registration is global in transformers,
# so it is added on first use and removed when the last user leaves: nothing lingers after generation).
_ATTENTION_USERS = 0
_ATTENTION_LOCK = threading.Lock()


@contextlib.contextmanager
def _attention_registered():
    """``_cpu_attention`` registered under ``_ATTENTION_NAME`` for the duration, then removed.

    transformers looks attention and mask functions up in class-wide mappings (``AttentionInterface``,
    ``AttentionMaskInterface``), so a registration is visible to every model; keeping it scoped to
    the generation calls that need it means no other code ever resolves our name.
    """
    global _ATTENTION_USERS
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    with _ATTENTION_LOCK:
        if _ATTENTION_USERS == 0:
            AttentionInterface.register(_ATTENTION_NAME, _cpu_attention)
            # the masks SDPA gets (boolean); without a registered mask function transformers passes none
            AttentionMaskInterface.register(_ATTENTION_NAME, sdpa_mask)
        _ATTENTION_USERS += 1
    try:
        yield _ATTENTION_NAME
    finally:
        with _ATTENTION_LOCK:
            _ATTENTION_USERS -= 1
            if _ATTENTION_USERS == 0:
                AttentionInterface._global_mapping.pop(_ATTENTION_NAME, None)
                AttentionMaskInterface._global_mapping.pop(_ATTENTION_NAME, None)


def attention_registered() -> bool:
    """Is mathtune's decode attention registered in transformers right now (only while generating)?"""
    from transformers import AttentionInterface

    return _ATTENTION_NAME in AttentionInterface._global_mapping


def _in_place_cache(capacity: int):
    """A DynamicCache whose layers write new tokens into preallocated buffers of ``capacity`` slots."""
    return _in_place_cache_type()(capacity)


@functools.lru_cache(maxsize=1)
def _in_place_cache_type():
    """The cache classes, built on first use (importing transformers at module import is slow)."""
    from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

    class InPlaceLayer(DynamicLayer):
        def __init__(self, capacity: int):
            super().__init__()
            self.capacity = capacity
            self.length = 0

        def lazy_initialization(self, key_states, value_states):
            self.dtype, self.device = key_states.dtype, key_states.device
            # zeros, not empty: padding slots inside the filled part may never be written, and a masked
            # slot's probability 0 times NaN garbage would still be NaN.
            # Keys are stored transposed, [batch, heads, dim, capacity]: the decode step's query x keys
            # bmm then reads each row's keys as a plain (dim x filled) matrix. 128 rows x 3 KV heads,
            # fp32, 165 / 250 slots filled: 1.7 / 2.4 ms per bmm against 2.6 / 3.5 ms from the
            # [capacity, dim] layout (values stay [capacity, dim]: that bmm is fastest as it is).
            self._kt = key_states.new_zeros(key_states.shape[:2] + (key_states.shape[-1], self.capacity))
            self._v = value_states.new_zeros(value_states.shape[:2] + (self.capacity, value_states.shape[-1]))
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n = key_states.shape[-2]
            end = self.length + n
            if end > self.capacity:
                raise RuntimeError(f"KV cache capacity {self.capacity} exceeded ({end} tokens)")
            self._kt[:, :, :, self.length : end] = key_states.transpose(2, 3)
            self._v[:, :, self.length : end] = value_states
            self.length = end
            self._set_views()
            return self.keys, self.values

        def _set_views(self):
            # [batch, heads, filled, dim] views of the filled slots: their shape is the fill length,
            # and _cpu_attention reads them in place
            self.keys = self._kt[:, :, :, : self.length].transpose(2, 3)
            self.values = self._v[:, :, : self.length]

        def write(self, rows, start: int, key_states, value_states):
            """Place prefilled states for batch ``rows`` at slots ``start..`` (prefill assembly)."""
            if not self.is_initialized:
                raise RuntimeError("write() before the layer's buffers exist")
            end = start + key_states.shape[-2]
            self._kt[rows, :, :, start:end] = key_states.transpose(2, 3)
            self._v[rows, :, start:end] = value_states

        def get_seq_length(self) -> int:
            return self.length

        def batch_select_indices(self, indices):
            if self.is_initialized:
                self._kt, self._v = self._kt[indices], self._v[indices]
                self._set_views()

        def _unsupported(self, *args, **kwargs):
            raise NotImplementedError("the in-place generation cache supports greedy/sampled decoding only")

        crop = reorder_cache = batch_repeat_interleave = _unsupported

    class InPlaceCache(DynamicCache):
        def __init__(self, capacity: int):
            # not DynamicCache.__init__: that one fixes the layer class to DynamicLayer
            Cache.__init__(self, layer_class_to_replicate=functools.partial(InPlaceLayer, capacity))

    return InPlaceCache


class _StopRecorder:
    """A StoppingCriteria that stops a row at the end-of-turn token or a stop string and records at
    which new-token count each row stopped (generate() itself only returns padded sequences).

    With a ``LoopMonitor`` it also flags rows that loop (``looped``), and stops them there when
    ``stop_loops``; without ``stop_loops`` a looping row is only flagged and decodes on.
    """

    def __init__(self, eot_id: int, stop_strings, rows: int, start_len: int, monitor=None, stop_loops: bool = False):
        self.eot_id = eot_id
        self.stop_strings = stop_strings  # a StopStringCriteria or None
        self.start_len = start_len
        self.finished_at = torch.full((rows,), -1, dtype=torch.long)
        self.monitor = monitor
        self.stop_loops = stop_loops
        self.looped = torch.zeros(rows, dtype=torch.bool)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.BoolTensor:
        done = input_ids[:, -1] == self.eot_id
        if self.stop_strings is not None:
            done = done | self.stop_strings(input_ids, scores).to(done.device)
        done = done.cpu()
        if self.monitor is not None:
            # rows that finished earlier in this chunk only get padding appended: not a loop
            loop = self.monitor.step(input_ids) & (self.finished_at < 0) & ~done
            self.looped |= loop
            if self.stop_loops:
                done = done | loop
        newly = done & (self.finished_at < 0)
        self.finished_at[newly] = input_ids.shape[1] - self.start_len
        return done.to(input_ids.device)


@contextlib.contextmanager
def neutral_generation_config(model):
    """Replace the model's own ``generation_config`` by a default one for the duration.

    ``generate()`` fills every setting our GenerationConfig leaves unset (None) from
    ``model.generation_config`` (``_prepare_generation_config``: "defaults_only"), so a checkpoint's
    generation_config.json with e.g. ``no_repeat_ngram_size``, ``min_p``, ``typical_p`` or
    ``repetition_penalty`` would silently change what eval measures. With a default config there,
    only mathtune's settings and transformers' documented global defaults apply. A PeftModel copies
    its own config onto the base model in generate(), so both are swapped (and restored).
    """
    from transformers import GenerationConfig

    holders = [model]
    base = model.get_base_model() if hasattr(model, "get_base_model") else None
    if base is not None and base is not model:
        holders.append(base)
    saved = [(holder, holder.generation_config) for holder in holders if hasattr(holder, "generation_config")]
    try:
        for holder, _ in saved:
            holder.generation_config = GenerationConfig()
        yield
    finally:
        for holder, config in saved:
            holder.generation_config = config


@contextlib.contextmanager
def contiguous_head_input(model):
    """Make the LM head's input contiguous for the duration.

    generate() feeds the head ``hidden[:, -1:, :]``, a strided view. For a weight with
    ``requires_grad=False`` (every frozen, merged or PEFT-loaded model) torch's linear then takes a
    batched-matmul path that copies the whole 49152 x 576 head once per row: 0.83 s instead of 7 ms
    for 16 rows in one measurement, which made prefill of a trained model 4x slower than its base.
    The copy of the (rows x hidden) input costs microseconds.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        yield
        return
    handle = head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _progress_bar(total: int, enabled: bool | None):
    from mathtune.progress import progress_reporter  # a bar on a terminal, a line per 30 s / 10% in a log

    return progress_reporter(total, "generating", "seq", enabled=enabled)


def _common_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    first = rows[0]
    n = min(len(r) for r in rows) - 1  # every row keeps >= 1 token of its own: generate() feeds it
    for i in range(n):
        token = first[i]
        if any(r[i] != token for r in rows):
            return i
    return n


class Generator:
    """``Generator(model, tokenizer, settings)(questions) -> Generations``.

    ``questions`` are raw question texts; each is formatted with the model's chat template (or the
    plain base-model prompt) exactly as in training. ``fast`` (default: on CPU) enables the CPU
    fast path described in the module docstring; ``fast=False`` is plain batched ``generate()``.
    """

    def __init__(self, model, tokenizer, settings: GenerationSettings | None = None, *,
                 progress: bool | None = None, chunk_tokens: int = CHUNK_TOKENS, fast: bool | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.settings = (settings or GenerationSettings()).validate()
        self.progress = progress
        if chunk_tokens <= 0:
            raise MathtuneError(f"chunk_tokens must be > 0 (got {chunk_tokens})")
        self.chunk_tokens = chunk_tokens
        self.fast = fast
        self.eot_id = end_of_turn_token_id(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eot_id
        self._token_tables = None

    # ------------------------------------------------------------------ public

    def __call__(self, questions: Sequence[str], **overrides) -> Generations:
        settings = self.settings.replace(**overrides) if overrides else self.settings
        if isinstance(questions, str):
            raise MathtuneError("Generator takes a list of questions, got one string: wrap it in a list")
        prompt_ids = [encode_prompt(self.tokenizer, format_prompt(self.tokenizer, q)) for q in questions]
        return self.generate_ids(prompt_ids, settings)

    def generate_ids(self, prompt_ids: Sequence[Sequence[int]], settings: GenerationSettings | None = None) -> Generations:
        """Generate from already-encoded prompts (one list of token ids per prompt)."""
        settings = settings or self.settings
        start = time.perf_counter()
        n = len(prompt_ids)
        if n == 0:
            return Generations([], [], 0.0)
        for i, ids in enumerate(prompt_ids):
            if len(ids) == 0:
                raise MathtuneError(f"prompt {i} encodes to zero tokens: every prompt needs some text")
        k = settings.num_samples
        # Rows are (prompt, sample) pairs sorted by prompt length, so each batch pads little. The sort
        # is stable, so the samples of one prompt stay adjacent (and batches deterministic).
        rows = sorted(((i, j) for i in range(n) for j in range(k)), key=lambda r: len(prompt_ids[r[0]]))
        tokens: dict[tuple[int, int], tuple[list[int], bool, list[dict]]] = {}
        bar = _progress_bar(len(rows), self.progress)
        stop_criteria = self._stop_string_criteria(settings.stop)

        def progress(new_tokens: int, finished_rows: int) -> None:
            # called after every chunk, so a single large batch still shows its rate as it goes
            bar.update(finished_rows, tokens=new_tokens)

        try:
            device = _model_device(self.model)
            # sampling must not disturb the caller's random streams (CPU, and the model's GPU if any)
            rng_devices = [device.index or 0] if device.type == "cuda" else []
            with (torch.inference_mode(), torch.random.fork_rng(devices=rng_devices), self._fast_path() as fast,
                  contiguous_head_input(self.model), neutral_generation_config(self.model)):
                torch.manual_seed(settings.seed)
                for b in range(0, len(rows), settings.batch_size):
                    batch = rows[b : b + settings.batch_size]
                    outs = self._generate_batch([prompt_ids[i] for i, _ in batch], settings, stop_criteria, fast, progress)
                    tokens.update(zip(batch, outs))
        finally:
            bar.close()
        texts = [[self._decode(tokens[(i, j)][0], settings.stop) for j in range(k)] for i in range(n)]
        counts = [[len(tokens[(i, j)][0]) for j in range(k)] for i in range(n)]
        loops = [[tokens[(i, j)][1] for j in range(k)] for i in range(n)]
        calls = [[tokens[(i, j)][2] for j in range(k)] for i in range(n)]
        return Generations(texts, counts, time.perf_counter() - start, loops, calls)

    # ------------------------------------------------------------------ internals

    @contextlib.contextmanager
    def _fast_path(self):
        """Switch the model to ``_cpu_attention`` for the duration (and back), when it applies."""
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        wanted = self.fast if self.fast is not None else _model_device(self.model).type == "cpu"
        original = getattr(getattr(base, "config", None), "_attn_implementation", None)
        # only models on the standard attention interface with SDPA or eager attention qualify
        if not wanted or original not in ("sdpa", "eager") or not hasattr(base, "set_attn_implementation"):
            yield False
            return
        with _attention_registered() as name:
            base.set_attn_implementation(name)
            try:
                yield base.config._attn_implementation == _ATTENTION_NAME
            finally:
                base.set_attn_implementation(original)

    def _stop_string_criteria(self, stop: list[str]):
        if not stop:
            return None
        from transformers import StopStringCriteria

        # built once per call: it precomputes a table over the vocabulary (cached by transformers)
        return StopStringCriteria(tokenizer=self.tokenizer, stop_strings=list(stop))

    def _generation_config(self, settings: GenerationSettings, new_tokens: int):
        from transformers import GenerationConfig

        # Every decoding knob set explicitly: the model's own generation_config.json (e.g. a
        # recommended top_k or repetition penalty) must not silently change what we measure.
        common = dict(
            max_new_tokens=new_tokens,
            num_beams=1,
            num_return_sequences=1,
            repetition_penalty=1.0,
            eos_token_id=self.eot_id,
            pad_token_id=self.pad_id,
            return_dict_in_generate=True,
            use_cache=True,
        )
        if settings.greedy:
            return GenerationConfig(do_sample=False, **common)
        return GenerationConfig(do_sample=True, temperature=float(settings.temperature),
                                top_p=float(settings.top_p), top_k=0, **common)

    def _plain_inputs(self, batch_ids, device):
        width = max(len(ids) for ids in batch_ids)
        input_ids = torch.tensor([[self.pad_id] * (width - len(ids)) + list(ids) for ids in batch_ids], device=device)
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch_ids], device=device)
        return input_ids, attention

    def _forward_kwargs(self) -> dict:
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        # logits for the last position only: the prefill's full logits would be rows x tokens x vocab
        return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}

    def _prefilled_inputs(self, batch_ids, max_new_tokens: int, device):
        """Fast-path prefill: ``(input_ids, attention_mask, cache)`` where the cache holds every prompt
        token but the last, laid out [shared prefix][padding][rest]; generate() feeds the last one."""
        from transformers.cache_utils import DynamicCache

        p = _common_prefix_length(batch_ids)
        rests = [list(ids[p:]) for ids in batch_ids]  # each >= 1 token
        width = max(len(r) for r in rests) - 1  # cached part of the longest rest
        input_ids = torch.tensor([ids[:p] + [self.pad_id] * (width + 1 - len(r)) + r for ids, r in zip(batch_ids, rests)], device=device)
        attention = torch.tensor([[1] * p + [0] * (width + 1 - len(r)) + [1] * len(r) for r in rests], device=device)
        cache = _in_place_cache(p + width + max_new_tokens + 1)
        extra = self._forward_kwargs()

        def layer_states(c):
            return [(layer.keys, layer.values) for layer in c.layers]

        prefix_states = None
        if p > 0:
            prefix_cache = DynamicCache()
            self.model(input_ids=input_ids[:1, :p], attention_mask=attention[:1, :p], cache=prefix_cache,
                       use_cache=True, **extra)
            prefix_states = layer_states(prefix_cache)
        # the shape of every layer's buffers comes from a first update; write the prefix into all rows
        for g in range(0, len(rests), PREFILL_GROUP_ROWS):
            group = list(range(g, min(g + PREFILL_GROUP_ROWS, len(rests))))
            gw = max(len(rests[r]) for r in group) - 1  # this group's cached width
            if gw == 0:
                continue
            ids = torch.tensor([[self.pad_id] * (gw - len(rests[r]) + 1) + rests[r][:-1] for r in group], device=device)
            mask = torch.tensor([[0] * (gw - len(rests[r]) + 1) + [1] * (len(rests[r]) - 1) for r in group], device=device)
            group_cache = DynamicCache()
            if prefix_states is not None:
                for layer, (k, v) in enumerate(prefix_states):
                    group_cache.update(k.expand(len(group), -1, -1, -1).contiguous(),
                                       v.expand(len(group), -1, -1, -1).contiguous(), layer)
            full_mask = torch.cat([mask.new_ones((len(group), p)), mask], dim=1)
            # positions continue after the prefix and skip the padding, as generate() will count them
            positions = (p + mask.cumsum(-1) - 1).clamp(min=p)
            self.model(input_ids=ids, attention_mask=full_mask, position_ids=positions, cache=group_cache,
                       use_cache=True, **extra)
            self._place(cache, group_cache, group, p + width - gw, p, len(rests))
        if prefix_states is not None:
            self._ensure_layers(cache, prefix_states, len(rests))
            for layer, (k, v) in zip(cache.layers, prefix_states):
                layer.write(slice(None), 0, k, v)
        self._ensure_layers(cache, None, len(rests))
        for layer in cache.layers:
            layer.length = p + width
        return input_ids, attention, cache

    @staticmethod
    def _ensure_layers(cache, like, rows: int) -> None:
        """Create the cache's layers (buffers sized for ``rows``) from example states, once. Without
        states (no prompt token to cache) the layers are created by generate()'s first update."""
        if cache.layers or like is None:
            return
        for index, (k, v) in enumerate(like):
            cache.update(k[:1].expand(rows, -1, -1, -1)[:, :, :0], v[:1].expand(rows, -1, -1, -1)[:, :, :0], index)

    def _place(self, cache, group_cache, group, start: int, p: int, rows: int) -> None:
        states = [(layer.keys[:, :, p:], layer.values[:, :, p:]) for layer in group_cache.layers]
        self._ensure_layers(cache, states, rows)
        index = torch.tensor(group)
        for layer, (k, v) in zip(cache.layers, states):
            layer.write(index, start, k, v)

    def _generate_batch(self, batch_ids: list[Sequence[int]], settings: GenerationSettings, stop_criteria,
                        fast: bool, progress) -> list[tuple[list[int], bool, list[dict]]]:
        """Per row: (new tokens up to and including the stopping token, looped, calculator calls);
        ``progress(new tokens, finished rows)`` after every chunk."""
        from transformers import LogitsProcessorList, StoppingCriteriaList

        from mathtune.loops import LoopMonitor

        device = _model_device(self.model)
        if fast:
            input_ids, attention, cache = self._prefilled_inputs(batch_ids, settings.max_new_tokens, device)
        else:
            (input_ids, attention), cache = self._plain_inputs(batch_ids, device), None
        rows = len(batch_ids)
        results: list[list[int]] = [[] for _ in batch_ids]
        looped = [False] * rows
        live = list(range(rows))  # batch rows still generating, in tensor row order
        # one monitor and one calculator per batch, carried across chunks (their rows follow `live`)
        monitor = LoopMonitor(self.tokenizer, rows, input_ids.shape[1], settings.max_new_tokens, self._tables()[1])
        calculator = None
        if settings.calculator:
            from mathtune.calculator import CalculatorForcing

            calculator = CalculatorForcing(self.tokenizer, rows, input_ids.shape[1], self._tables()[0])
        remaining = settings.max_new_tokens
        while live and remaining > 0:
            chunk = min(self.chunk_tokens, remaining)
            recorder = _StopRecorder(self.eot_id, stop_criteria, len(live), input_ids.shape[1], monitor, settings.loop_stop)
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention,
                cache=cache,
                generation_config=self._generation_config(settings, chunk),
                stopping_criteria=StoppingCriteriaList([recorder]),
                logits_processor=LogitsProcessorList([calculator] if calculator is not None else []),
            )
            new = out.sequences[:, input_ids.shape[1] :]
            remaining -= new.shape[1]
            finished = recorder.finished_at.tolist()
            chunk_loops = recorder.looped.tolist()
            new_rows = new.tolist()
            keep, added = [], 0
            for j, row in enumerate(live):
                stop_at = finished[j]
                kept = new_rows[j][:stop_at] if stop_at > 0 else new_rows[j]
                results[row].extend(kept)
                looped[row] = looped[row] or chunk_loops[j]
                added += len(kept)
                if stop_at < 0:
                    keep.append(j)
            done = not keep or remaining <= 0
            progress(added, len(live) if done else len(live) - len(keep))
            if done:
                break
            cache = out.cache
            attention = torch.cat([attention, attention.new_ones((attention.shape[0], new.shape[1]))], dim=1)
            input_ids = out.sequences
            if len(keep) < len(live):
                # drop finished rows from the inputs, every layer of the KV cache and the row monitors
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                input_ids, attention = input_ids[index], attention[index]
                live = [live[j] for j in keep]
                monitor.select(keep)
                if calculator is not None:
                    calculator.select(keep)
        calls = calculator.calls if calculator is not None else [[] for _ in range(rows)]
        return list(zip(results, looped, calls))

    def _tables(self):
        """(calculator trigger tokens, newline tokens): vocabulary tables, built once per Generator."""
        if self._token_tables is None:
            from mathtune.calculator import trigger_table
            from mathtune.loops import newline_table

            self._token_tables = (trigger_table(self.tokenizer), newline_table(self.tokenizer))
        return self._token_tables

    def _decode(self, ids: list[int], stop: list[str]) -> str:
        if ids and ids[-1] == self.eot_id:
            ids = ids[:-1]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cut = min((pos for pos in (text.find(s) for s in stop) if pos >= 0), default=-1)
        return text[:cut] if cut >= 0 else text


def generate(model, tokenizer, questions: Sequence[str], settings: GenerationSettings | None = None,
             progress: bool | None = None) -> Generations:
    """One-shot helper: ``Generator(model, tokenizer, settings)(questions)``."""
    return Generator(model, tokenizer, settings, progress=progress)(questions)
