"""Batched generation for evaluation, the Python API and anything else that needs completions.

Prompts go through exactly the code training used (``data.format_prompt`` + ``data.encode_prompt``),
so the model sees the same token ids at eval time that it was trained on. Then:

  order     rows (prompt x sample) sorted by prompt token length, so a batch pads little (the
            original order is restored)
  batch     ``batch_size`` rows at a time
  decode    on CPU, mathtune's own prefill/decode loop (``generation.cpu``); elsewhere, or where a
            model needs what that loop does not implement, ``model.generate`` on a LEFT-padded batch.
            Either way in chunks of ``CHUNK_TOKENS`` new tokens: between chunks the rows that finished
            (end-of-turn token, a stop string, a loop) leave the batch and its KV cache, so later
            steps spend nothing on them (plain ``generate`` keeps computing finished rows until the
            longest row ends)
  text      tokens up to the stopping token, decoded; the text is cut at the first stop string

Greedy unless ``temperature > 0``; sampling draws ``num_samples`` completions per prompt from a
generator seeded with ``seed`` (same inputs and settings -> same samples).

Precision is the caller's choice: load the model in bf16 on CPUs with AVX512-BF16 / AMX
(``hardware.choose_precision``), where generation runs ~2.2x faster than fp32. In bf16, rounding
depends on the batch's shapes, so per-item outputs change with the batch size; in fp32 they do not
(BENCHMARKS.md has the measurements). Eval summaries and cache keys record precision and batch size.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import time
from typing import Sequence

import torch

from mathtune.data import encode_prompt, end_of_turn_token_id, format_prompt
from mathtune.errors import MathtuneError
from mathtune.config import GenerationArgs
from mathtune.generation.settings import Generations

# New tokens per chunk. Between chunks finished rows leave the batch; a smaller chunk drops them
# sooner but pays a copy of the KV cache (and, on the plain path, generate()'s setup) more often.
CHUNK_TOKENS = 32
_STOP_REASON_CODES = ("end_of_turn", "stop_string", "loop")  # _StopRecorder.reason values 0, 1, 2


class _StopRecorder:
    """A StoppingCriteria that stops a row at the end-of-turn token or a stop string and records at
    which new-token count each row stopped (generate() itself only returns padded sequences).

    With a ``LoopMonitor`` it also flags rows that loop (``looped``), and stops them there when
    ``stop_loops``; without ``stop_loops`` a looping row is only flagged and decodes on.
    """

    def __init__(self, stop_ids: Sequence[int], stop_strings, rows: int, start_len: int, monitor=None,
                 stop_loops: bool = False):
        self.stop_ids = torch.tensor(list(stop_ids))
        self.stop_strings = stop_strings  # a StopStringCriteria or None
        self.start_len = start_len
        self.finished_at = torch.full((rows,), -1, dtype=torch.long)
        self.monitor = monitor
        self.stop_loops = stop_loops
        self.looped = torch.zeros(rows, dtype=torch.bool)
        self.reason = torch.full((rows,), -1, dtype=torch.long)  # index into _STOP_REASON_CODES

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.BoolTensor:
        end_of_turn = torch.isin(input_ids[:, -1].cpu(), self.stop_ids)
        done = end_of_turn
        stop_string = torch.zeros_like(done)
        if self.stop_strings is not None:
            stop_string = self.stop_strings(input_ids, scores).cpu() & ~end_of_turn
            done = done | stop_string
        loop = torch.zeros_like(done)
        if self.monitor is not None:
            # rows that finished earlier in this chunk only get padding appended: not a loop
            loop = self.monitor.step(input_ids) & (self.finished_at < 0) & ~done
            self.looped |= loop
            if self.stop_loops:
                done = done | loop
        newly = done & (self.finished_at < 0)
        self.finished_at[newly] = input_ids.shape[1] - self.start_len
        # first reason that applies: end-of-turn, then a stop string, then a loop
        self.reason[newly] = torch.where(end_of_turn, 0, torch.where(stop_string, 1, 2))[newly]
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


class _PlainBatch:
    """One batch on ``model.generate``: LEFT-padded, chunk by chunk with its cache carried over."""

    def __init__(self, generator: "Generator", batch_ids, args: GenerationArgs, device):
        self.generator, self.args = generator, args
        width = max(len(ids) for ids in batch_ids)
        pad = generator.pad_id
        self.sequences = torch.tensor([[pad] * (width - len(ids)) + list(ids) for ids in batch_ids], device=device)
        self.attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch_ids], device=device)
        self.cache = None

    def decode(self, steps: int, recorder, processors) -> torch.Tensor:
        from transformers import LogitsProcessorList, StoppingCriteriaList

        width = self.sequences.shape[1]
        out = self.generator.model.generate(
            input_ids=self.sequences, attention_mask=self.attention, cache=self.cache,
            generation_config=self.generator.generation_config(self.args, steps),
            stopping_criteria=StoppingCriteriaList([recorder]), logits_processor=LogitsProcessorList(processors))
        new = out.sequences[:, width:]
        self.cache, self.sequences = out.cache, out.sequences
        self.attention = torch.cat([self.attention, self.attention.new_ones((self.attention.shape[0], new.shape[1]))], 1)
        return new

    def select(self, keep: list[int]) -> None:
        """Drop finished rows from the inputs and every layer of the KV cache."""
        index = torch.tensor(keep, device=self.sequences.device)
        self.cache.batch_select_indices(index)
        self.sequences, self.attention = self.sequences[index], self.attention[index]


class _FastBatch:
    """One batch on mathtune's CPU prefill/decode loop (``generation.cpu``): the same tokens
    ``generate()`` would choose, without its per-step overheads (BENCHMARKS.md)."""

    def __init__(self, generator: "Generator", batch_ids, args: GenerationArgs, device):
        from mathtune.generation.cpu import FastDecoder, logits_warpers

        self.generator, self.args = generator, args
        self.decoder = FastDecoder(generator.model, batch_ids, args.max_new_tokens, generator.pad_id,
                                   generator.forward_kwargs(), device)
        self.decoder.prefill()  # raises FastPathUnsupported before any token is chosen
        self.warpers = [] if args.greedy else logits_warpers(args.temperature, args.top_p)

    @property
    def sequences(self) -> torch.Tensor:
        return self.decoder.sequences

    def decode(self, steps: int, recorder, processors) -> torch.Tensor:
        from mathtune.generation.cpu import decode_chunk

        return decode_chunk(self.decoder, steps, greedy=self.args.greedy, warpers=self.warpers,
                            processors=processors, stopping=recorder, pad_id=self.generator.pad_id)

    def select(self, keep: list[int]) -> None:
        self.decoder.select(keep)


class _Rows:
    """Per-row results of one batch as its chunks come in: tokens, loop flag, stop reason."""

    def __init__(self, rows: int):
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.looped = [False] * rows
        self.reasons = ["max_new_tokens"] * rows
        self.live = list(range(rows))  # batch rows still generating, in tensor row order

    def take_chunk(self, new: torch.Tensor, recorder: _StopRecorder) -> tuple[list[int], int]:
        """Record a chunk's tokens (up to each row's stop); -> (positions in ``live`` still going, tokens kept)."""
        finished, loops, reasons = recorder.finished_at.tolist(), recorder.looped.tolist(), recorder.reason.tolist()
        keep, added = [], 0
        for j, (row, new_row) in enumerate(zip(self.live, new.tolist())):
            kept = new_row[:finished[j]] if finished[j] > 0 else new_row
            self.tokens[row].extend(kept)
            self.looped[row] = self.looped[row] or loops[j]
            added += len(kept)
            if finished[j] < 0:
                keep.append(j)
            else:
                self.reasons[row] = _STOP_REASON_CODES[reasons[j]]
        return keep, added


class Generator:
    """``Generator(model, tokenizer, args)(questions) -> Generations``: the one way mathtune generates.

    ``questions`` are raw question texts; each is formatted with the model's chat template (or the
    plain base-model prompt) exactly as in training (``generate_ids`` takes encoded prompts). The
    decoding loop is chosen once per Generator: mathtune's CPU fast path (``fast``, default: on CPU)
    or plain batched ``generate()``; a model the fast path cannot serve falls back with one notice.
    ``seed`` seeds sampling; ``stop_token_ids`` end a row besides the end-of-turn token (the collapse
    check stops at the tokenizer's EOS too). ``generate_sharded`` splits the work across processes.
    """

    def __init__(self, model, tokenizer, args: GenerationArgs | None = None, *, seed: int = 0,
                 progress: bool | None = None, chunk_tokens: int = CHUNK_TOKENS, fast: bool | None = None,
                 logits_processors: Sequence = (), stop_token_ids: Sequence[int] = ()):
        self.model = model
        self.tokenizer = tokenizer
        # calculator unset: off (a command resolves it for its task first: ``GenerationArgs.resolved``)
        self.settings = (args or GenerationArgs()).resolved(None).validate()
        self.seed = seed
        self.progress = progress
        if chunk_tokens <= 0:
            raise MathtuneError(f"chunk_tokens must be > 0 (got {chunk_tokens})")
        self.chunk_tokens = chunk_tokens
        self.fast = fast
        # extra LogitsProcessors, run before mathtune's own (the calculator) on either path; tests use
        # them to script what a model writes
        self.logits_processors = list(logits_processors)
        self.eot_id = end_of_turn_token_id(tokenizer)
        self.stop_ids = sorted({self.eot_id, *stop_token_ids})
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eot_id
        self._token_tables = None
        self._fast_unsupported: str | None = None  # why the fast path was given up, once it was
        self._restore_attention = None  # while the fast path holds the model: gives it its attention back

    # ------------------------------------------------------------------ public

    def __call__(self, questions: Sequence[str], *, seed: int | None = None, **overrides) -> Generations:
        settings = self.settings.replace(**overrides) if overrides else self.settings
        return self.generate_ids(self.encode(questions), settings, seed=seed)

    def encode(self, questions: Sequence[str]) -> list[list[int]]:
        """The prompt ids of each question: exactly the ids training put in front of its answer."""
        if isinstance(questions, str):
            raise MathtuneError("Generator takes a list of questions, got one string: wrap it in a list")
        return [encode_prompt(self.tokenizer, format_prompt(self.tokenizer, q)) for q in questions]

    def generate_ids(self, prompt_ids: Sequence[Sequence[int]], settings: GenerationArgs | None = None, *,
                     seed: int | None = None) -> Generations:
        """Generate from already-encoded prompts (one list of token ids per prompt)."""
        settings = settings or self.settings
        start = time.perf_counter()
        n, k = len(prompt_ids), settings.num_samples
        for i, ids in enumerate(prompt_ids):
            if len(ids) == 0:
                raise MathtuneError(f"prompt {i} encodes to zero tokens: every prompt needs some text")
        # Rows are (prompt, sample) pairs sorted by prompt length, so each batch pads little. The sort
        # is stable, so the samples of one prompt stay adjacent (and batches deterministic).
        rows = sorted(((i, j) for i in range(n) for j in range(k)), key=lambda r: len(prompt_ids[r[0]]))
        tokens: dict[tuple[int, int], tuple] = {}
        bar = _progress_bar(len(rows), self.progress)
        stop_criteria = self._stop_string_criteria(settings.stop)
        device = _model_device(self.model)
        # sampling must not disturb the caller's random streams (CPU, and the model's GPU if any)
        rng_devices = [device.index or 0] if device.type == "cuda" else []
        try:
            with (torch.inference_mode(), torch.random.fork_rng(devices=rng_devices), self.fast_path() as fast,
                  contiguous_head_input(self.model), neutral_generation_config(self.model)):
                torch.manual_seed(self.seed if seed is None else seed)
                for b in range(0, len(rows), settings.batch_size):
                    batch = rows[b : b + settings.batch_size]
                    outs = self._generate_batch([prompt_ids[i] for i, _ in batch], settings, stop_criteria, fast,
                                                lambda new, done: bar.update(done, tokens=new))
                    tokens.update(zip(batch, outs))
        finally:
            bar.close()
        fields = [[[tokens[(i, j)][f] for j in range(k)] for i in range(n)] for f in range(4)]
        texts = [[self._decode(ids, settings.stop) for ids in row] for row in fields[0]]
        counts = [[len(ids) for ids in row] for row in fields[0]]
        return Generations(texts, counts, time.perf_counter() - start, fields[1], fields[2], fields[3], fields[0])

    def generate_sharded(self, questions: Sequence[str]) -> Generations:
        """``self(questions)``, split across the ranks of a launched run and merged in item order
        (collective: every rank calls it and gets the whole merged ``Generations``)."""
        from mathtune.generation.sharding import generate_sharded

        return generate_sharded(self, questions)

    # ------------------------------------------------------------------ internals

    @contextlib.contextmanager
    def fast_path(self):
        """Switch the model to mathtune's registered attention for the duration (and back), when the
        fast path applies: wanted (default: on CPU), not already given up on for this Generator, and
        the model on SDPA or eager attention that transformers' public setter can switch."""
        from mathtune.compat import attention_implementation, can_switch_attention, switch_attention
        from mathtune.generation.cpu import register_attention

        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        wanted = self.fast if self.fast is not None else _model_device(self.model).type == "cpu"
        original = attention_implementation(base)
        if not wanted or self._fast_unsupported:
            yield False
            return
        if original not in ("sdpa", "eager") or not can_switch_attention(base):
            self._fall_back(f"the model uses {original!r} attention")
            yield False
            return
        try:
            switch_attention(base, register_attention())
        except (ValueError, KeyError, TypeError) as exc:  # a transformers version or model that refuses it
            self._fall_back(f"the attention setter refused it ({exc})")
            yield False
            return
        restored = []

        def restore() -> None:  # once: at the end, or as soon as a batch falls back to plain generate
            if not restored:
                restored.append(True)
                switch_attention(base, original)

        self._restore_attention = restore
        try:
            yield True
        finally:
            restore()
            self._restore_attention = None

    @property
    def fast_unsupported(self) -> str | None:
        """Why the fast path was given up for this Generator (None: it was not)."""
        return self._fast_unsupported

    def _fall_back(self, reason: str) -> None:
        """Plain ``model.generate`` from here on, said once per Generator (never a crash)."""
        if not self._fast_unsupported:
            name = type(self.model).__name__
            print(f"mathtune: CPU fast generation path off for {name}: {reason}; using plain model.generate "
                  f"(same outputs, slower)", file=sys.stderr, flush=True)
        self._fast_unsupported = reason

    def _stop_string_criteria(self, stop: list[str]):
        if not stop:
            return None
        from transformers import StopStringCriteria

        # built once per call: it precomputes a table over the vocabulary (cached by transformers)
        return StopStringCriteria(tokenizer=self.tokenizer, stop_strings=list(stop))

    def generation_config(self, settings: GenerationArgs, new_tokens: int):
        """The ``GenerationConfig`` of the plain path: the only one mathtune builds."""
        from transformers import GenerationConfig

        # Every decoding knob set explicitly: the model's own generation_config.json (e.g. a
        # recommended top_k, a repetition penalty or no_repeat_ngram_size, which would also break up
        # exactly the one-token loops the collapse check looks for) must not change what we measure.
        common = dict(max_new_tokens=new_tokens, min_new_tokens=0, num_beams=1, num_return_sequences=1,
                      repetition_penalty=1.0, no_repeat_ngram_size=0, eos_token_id=list(self.stop_ids),
                      pad_token_id=self.pad_id, return_dict_in_generate=True, use_cache=True)
        if settings.greedy:
            return GenerationConfig(do_sample=False, **common)
        return GenerationConfig(do_sample=True, temperature=float(settings.temperature),
                                top_p=float(settings.top_p), top_k=0, **common)

    def forward_kwargs(self) -> dict:
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        # logits for the last position only: the prefill's full logits would be rows x tokens x vocab
        return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}

    def _start_batch(self, batch_ids, settings: GenerationArgs, fast: bool):
        """The batch on the fast path when it holds the model, else on plain ``generate()``."""
        device = _model_device(self.model)
        if fast and not self._fast_unsupported:
            from mathtune.generation.cpu import FastPathUnsupported

            try:
                return _FastBatch(self, batch_ids, settings, device)
            except FastPathUnsupported as exc:
                # raised by the first attention call, before any token is chosen: redo this batch plainly
                self._fall_back(str(exc))
                self._restore_attention()
        return _PlainBatch(self, batch_ids, settings, device)

    def _generate_batch(self, batch_ids: list[Sequence[int]], settings: GenerationArgs, stop_criteria,
                        fast: bool, progress) -> list[tuple[list[int], bool, list[dict], str]]:
        """Per row: (new tokens up to and including the stopping token, looped, calculator calls, stop
        reason); ``progress(new tokens, finished rows)`` after every chunk."""
        from mathtune.loops import LoopMonitor

        batch = self._start_batch(batch_ids, settings, fast)
        rows = _Rows(len(batch_ids))
        # one monitor and one calculator per batch, carried across chunks (their rows follow `live`)
        prompt_width = batch.sequences.shape[1]
        monitor = LoopMonitor(self.tokenizer, len(batch_ids), prompt_width, settings.max_new_tokens, self.tables()[1])
        calculator = None
        if settings.calculator:
            from mathtune.calculator import CalculatorForcing

            calculator = CalculatorForcing(self.tokenizer, len(batch_ids), prompt_width, self.tables()[0])
        processors = [*self.logits_processors, *([calculator] if calculator is not None else [])]
        remaining = settings.max_new_tokens
        while rows.live and remaining > 0:
            recorder = _StopRecorder(self.stop_ids, stop_criteria, len(rows.live), batch.sequences.shape[1], monitor,
                                     settings.loop_stop)
            new = batch.decode(min(self.chunk_tokens, remaining), recorder, processors)
            remaining -= new.shape[1]
            live = len(rows.live)
            keep, added = rows.take_chunk(new, recorder)
            done = not keep or remaining <= 0
            progress(added, live if done else live - len(keep))
            if done:
                break
            if len(keep) < live:
                # drop finished rows from the batch (inputs, KV cache) and the row monitors
                batch.select(keep)
                rows.live = [rows.live[j] for j in keep]
                monitor.select(keep)
                if calculator is not None:
                    calculator.select(keep)
        calls = calculator.calls if calculator is not None else [[] for _ in batch_ids]
        return list(zip(rows.tokens, rows.looped, calls, rows.reasons))

    def tables(self):
        """(calculator trigger tokens, loop text-check tokens): vocabulary tables, built once per Generator."""
        if self._token_tables is None:
            from mathtune.calculator import trigger_table
            from mathtune.loops import text_check_table

            self._token_tables = (trigger_table(self.tokenizer), text_check_table(self.tokenizer))
        return self._token_tables

    def _decode(self, ids: list[int], stop: list[str]) -> str:
        if ids and ids[-1] in self.stop_ids:
            ids = ids[:-1]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cut = min((pos for pos in (text.find(s) for s in stop) if pos >= 0), default=-1)
        return text[:cut] if cut >= 0 else text


def generate(model, tokenizer, questions: Sequence[str], settings: GenerationArgs | None = None,
             progress: bool | None = None) -> Generations:
    """One-shot helper: ``Generator(model, tokenizer, settings)(questions)``."""
    return Generator(model, tokenizer, settings, progress=progress)(questions)
