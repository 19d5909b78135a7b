"""The GRPO sampler: TRL's ``rollout_func`` on mathtune's CPU fast path, with per-token logprobs.

``RolloutSampler(tokenizer, settings)`` is passed to ``GRPOTrainer(rollout_func=...)``; TRL calls it
with the prompts of one generation batch, each question already repeated ``num_generations`` times
in a row, and expects one completion per prompt back (TRL 1.16 grpo_trainer.py:2200-2222).

  one prefill per group  the G rows of a question have the same prompt ids: ``GroupedDecoder`` runs
                         the shared system turn once, then each distinct prompt once (batch of the
                         distinct ones), and copies its keys/values into the G rows' slots; decoding
                         then runs every row of the batch together
  live policy            the trainer's own model object, in the trainer's precision (bf16 autocast
                         when it trains in bf16), put in eval mode for the duration (no dropout);
                         plain temperature sampling from softmax(logits / T), no top-k/top-p, which is
                         exactly the distribution TRL's loss scores (its fused LM head divides the
                         logits by the same temperature), so the samples are on-policy
  logprobs               log softmax(logits / T) of each chosen token, before any forcing: the
                         policy's own logprob (TRL uses them only for importance sampling; tests
                         check them against a forward pass of the policy)
  calculator             ``CalculatorForcing`` (mathtune.calculator) writes ``RESULT>>`` after
                         ``<<EXPR=`` as eval does; forced tokens get ``env_mask`` 0, so the loss never
                         trains the model on tokens it did not choose (grpo_trainer.py:2272, :2497)
  stop                   at the end-of-turn token (kept: the model chose it), or at a loop
                         (``LoopMonitor``): the end-of-turn token is then appended with ``env_mask``
                         0, so TRL does not count the sample as truncated (grpo_trainer.py:2292);
                         a sample cut at ``max_completion_length`` gets nothing appended

What this module calls inside mathtune's generation package (the lead's refactor re-points these):
``Generator`` (for its fast-path switch ``_fast_path``, ``_forward_kwargs``, ``_tables``, ``eot_id``,
``pad_id``), ``contiguous_head_input``, ``cpu.FastDecoder`` / ``FastPathUnsupported`` /
``PREFILL_GROUP_ROWS`` / ``ForwardState`` internals (``state.keys``/``values``, ``row_index``).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from mathtune.data import encode_prompt, format_prompt
from mathtune.generation.cpu import PREFILL_GROUP_ROWS, FastDecoder, FastPathUnsupported

# Decode steps between two cuts of finished rows from the KV buffers (as the engine's CHUNK_TOKENS).
CHUNK_TOKENS = 32
STOP_REASONS = ("end_of_turn", "loop", "max_completion_length")


@dataclass
class RolloutSettings:
    max_completion_length: int = 256
    temperature: float = 1.0
    calculator: bool = False
    loop_stop: bool = True
    seed: int = 0


@dataclass
class Rollout:
    """One call's samples, one entry per prompt row, in the order TRL gave the prompts."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    logprobs: list[list[float]]
    env_mask: list[list[int]]  # 1: the model chose the token; 0: forced (calculator) or appended (loop stop)
    stop_reasons: list[str]
    seconds: float = 0.0
    calculator_calls: list[list[dict]] = field(default_factory=list)

    @property
    def truncated(self) -> list[bool]:
        return [reason == "max_completion_length" for reason in self.stop_reasons]

    def for_trl(self) -> dict:
        """The dict ``rollout_func`` returns: TRL's three keys, ``env_mask``, and extra keys that reach the
        reward functions as keyword arguments (grpo_trainer.py:2741-2747)."""
        return {"prompt_ids": self.prompt_ids, "completion_ids": self.completion_ids, "logprobs": self.logprobs,
                "env_mask": self.env_mask, "stop_reason": self.stop_reasons}


class GroupedDecoder(FastDecoder):
    """``FastDecoder`` whose prefill runs each distinct prompt once and copies its keys/values into every
    row with the same prompt: G samples of a question cost one prompt prefill, not G."""

    def prefill(self) -> None:
        p, w, device = self.prefix, self.width, self.device
        if p > 0:
            causal = torch.ones(p, p, dtype=torch.bool, device=device).tril()
            self._forward(self.sequences[:1, :p], torch.arange(p, device=device)[None], None, 0, causal[None, None])
        firsts: dict[tuple[int, ...], int] = {}
        owner = [firsts.setdefault(tuple(rest), row) for row, rest in enumerate(self.rests)]
        distinct = sorted(set(owner))
        slots = torch.arange(p + w, device=device)
        logits: dict[int, torch.Tensor] = {}
        for g in range(0, len(distinct), PREFILL_GROUP_ROWS):
            group = distinct[g:g + PREFILL_GROUP_ROWS]
            gw = max(len(self.rests[r]) for r in group)
            index = torch.tensor(group, device=device)
            query_slots = slots[p + w - gw:]
            causal = slots[None, :] <= query_slots[:, None]
            diagonal = slots[None, :] == query_slots[:, None]
            mask = causal[None] & (self.valid[index, None, : p + w] | diagonal[None])
            ids = self.sequences[index, p + w - gw:]
            real = self.valid[index, p + w - gw: p + w].long()
            positions = (p + real.cumsum(-1) - 1).clamp(min=p)
            out = self._forward(ids, positions, index, p + w - gw, mask[:, None])
            logits.update(zip(group, out))
        # every other row of a group: the owner's prompt slots (same ids, same layout) and next-token logits
        copies = [(row, own) for row, own in enumerate(owner) if row != own]
        if copies:
            rows = torch.tensor([row for row, _ in copies], device=device)
            owners = torch.tensor([own for _, own in copies], device=device)
            for layer in self.state.keys:
                self.state.keys[layer][rows, ..., p:p + w] = self.state.keys[layer][owners, ..., p:p + w]
                self.state.values[layer][rows, :, p:p + w] = self.state.values[layer][owners, :, p:p + w]
        self.filled = p + w
        self.pending = torch.stack([logits[own] for own in owner])


class RolloutSampler:
    """``rollout_func(prompts, trainer) -> dict`` for TRL's GRPOTrainer, sampling on mathtune's fast path.

    ``prompts`` are question texts (the dataset's ``prompt`` column); each is formatted and encoded
    exactly as training and eval do (``data.format_prompt`` + ``data.encode_prompt``). ``last`` keeps
    the latest ``Rollout`` (the trainer's step statistics read it).
    """

    def __init__(self, tokenizer, settings: RolloutSettings, *, autocast_dtype: torch.dtype | None = None,
                 logits_processors: Sequence = ()):
        self.tokenizer = tokenizer
        # run on the tempered scores before the calculator; tests use them to script what a model writes
        self.logits_processors = list(logits_processors)
        self.settings = settings
        self.autocast_dtype = autocast_dtype  # the trainer's mixed precision (None: fp32)
        self.generator = None  # mathtune's Generator for the model sampled last: owns the fast-path switch
        self._encoded: dict[str, list[int]] = {}
        self.last: Rollout | None = None
        self.calls = 0

    # ------------------------------------------------------------------ TRL's seam

    def __call__(self, prompts: Sequence, trainer) -> dict:
        model = trainer.accelerator.unwrap_model(trainer.model)
        prompt_ids = [self.encode(p) for p in prompts]
        # seeded by the step, not by a call count: a run resumed from checkpoint-N draws what the
        # uninterrupted run drew at step N+1
        self.last = self.sample(model, prompt_ids, step=trainer.state.global_step)
        return self.last.for_trl()

    def encode(self, prompt) -> list[int]:
        if not isinstance(prompt, str):
            raise TypeError(f"mathtune's sampler takes question texts, got {type(prompt).__name__}: build the "
                            f"dataset's 'prompt' column from the task's questions")
        if prompt not in self._encoded:
            self._encoded[prompt] = encode_prompt(self.tokenizer, format_prompt(self.tokenizer, prompt))
        return self._encoded[prompt]

    # ------------------------------------------------------------------ sampling

    def fast_path_serves(self, model) -> str | None:
        """None when the fast path serves ``model``; else why not (a one-token probe through the real path)."""
        ids = self.encode("1+1?")
        try:
            with self._session(model) as fast:
                if not fast:
                    return self.generator._fast_unsupported or "the fast path is off for this model"
                decoder = GroupedDecoder(model, [ids, ids], 1, self.generator.pad_id,
                                         self.generator._forward_kwargs(), _device(model))
                decoder.prefill()
        except FastPathUnsupported as exc:
            return str(exc)
        return None

    def sample(self, model, prompt_ids: list[list[int]], step: int | None = None) -> Rollout:
        started = time.perf_counter()
        self.calls += 1
        draw = self.calls if step is None else step
        with self._session(model) as fast:
            if not fast:
                raise FastPathUnsupported(self.generator._fast_unsupported or "the fast path is off for this model")
            # the seed moves with each call, so two steps never draw the same samples
            torch.manual_seed(self.settings.seed * 1_000_003 + draw)
            rollout = self._decode(model, prompt_ids)
        rollout.seconds = time.perf_counter() - started
        return rollout

    @contextlib.contextmanager
    def _session(self, model):
        """Eval mode, no autograd, the trainer's autocast, the fast-path attention switched in; the caller's
        random streams and training mode restored afterwards."""
        from mathtune.generation.engine import Generator, contiguous_head_input

        if self.generator is None or self.generator.model is not model:
            self.generator = Generator(model, self.tokenizer, progress=False)
        device = _device(model)
        autocast = (torch.autocast(device.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
                    else contextlib.nullcontext())
        was_training = model.training
        model.eval()
        rng_devices = [device.index or 0] if device.type == "cuda" else []
        try:
            with (torch.no_grad(), torch.random.fork_rng(devices=rng_devices), autocast,
                  self.generator._fast_path() as fast, contiguous_head_input(model)):
                yield fast
        finally:
            model.train(was_training)

    def _decode(self, model, prompt_ids: list[list[int]]) -> Rollout:
        from mathtune.loops import LoopMonitor

        gen, s = self.generator, self.settings
        n, device = len(prompt_ids), _device(model)
        decoder = GroupedDecoder(model, prompt_ids, s.max_completion_length, gen.pad_id, gen._forward_kwargs(), device)
        decoder.prefill()
        triggers, text_checks = gen._tables()
        width = decoder.sequences.shape[1]
        monitor = LoopMonitor(self.tokenizer, n, width, s.max_completion_length, text_checks)
        calculator = None
        if s.calculator:
            from mathtune.calculator import CalculatorForcing

            calculator = CalculatorForcing(self.tokenizer, n, width, triggers)
        tokens: list[list[int]] = [[] for _ in range(n)]
        logprobs: list[list[float]] = [[] for _ in range(n)]
        mask: list[list[int]] = [[] for _ in range(n)]
        reasons = ["max_completion_length"] * n
        live = list(range(n))  # prompt row of each decoder row
        remaining = s.max_completion_length
        while live and remaining > 0:
            steps = min(CHUNK_TOKENS, remaining)
            decoder.reserve(steps)
            ended = [False] * len(live)
            for _ in range(steps):
                logits, decoder.pending = decoder.pending, None
                if logits is None:
                    logits = decoder.step(decoder.sequences[:, -1])
                scores = logits.float() / s.temperature
                if not bool(torch.isfinite(scores).all()):
                    from mathtune.errors import TrainingHalted

                    raise TrainingHalted("nonfinite_logits", "the policy's logits hold NaN/inf while sampling: "
                                         "the weights or the precision diverged: lower --learning-rate, use "
                                         "--precision fp32, resume from the last good checkpoint")
                policy = torch.log_softmax(scores, dim=-1)
                for processor in self.logits_processors:
                    scores = processor(decoder.sequences, scores)
                forced = torch.zeros(len(live), dtype=torch.bool)
                if calculator is not None:
                    # CalculatorForcing writes -inf over every token but the forced one, in the rows it forces
                    scores = calculator(decoder.sequences, scores.clone())
                    forced = torch.isneginf(scores).any(dim=-1).cpu()
                chosen = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
                # rows that ended earlier in this chunk decode on until the chunk's cut: feed them padding
                chosen = torch.where(torch.tensor(ended, device=chosen.device), gen.pad_id, chosen)
                chosen_logp = policy.gather(1, chosen[:, None]).squeeze(1).tolist()
                decoder.sequences = torch.cat([decoder.sequences, chosen[:, None]], dim=1)
                looped = monitor.step(decoder.sequences).cpu().tolist()
                chosen_list, forced_list = chosen.tolist(), forced.tolist()
                for j, row in enumerate(live):
                    if ended[j]:
                        continue
                    tokens[row].append(chosen_list[j])
                    logprobs[row].append(chosen_logp[j])
                    mask[row].append(0 if forced_list[j] else 1)
                    if chosen_list[j] == gen.eot_id:
                        ended[j], reasons[row] = True, "end_of_turn"
                    elif looped[j] and s.loop_stop:
                        ended[j], reasons[row] = True, "loop"
                        if len(tokens[row]) < s.max_completion_length:
                            # closes the sample so TRL does not count it as truncated; not the model's choice
                            tokens[row].append(gen.eot_id)
                            logprobs[row].append(0.0)
                            mask[row].append(0)
                remaining -= 1
                if all(ended):
                    break
            keep = [j for j, done in enumerate(ended) if not done]
            if not keep or remaining <= 0:
                break
            if len(keep) < len(live):
                decoder.select(keep)
                monitor.select(keep)
                if calculator is not None:
                    calculator.select(keep)
                live = [live[j] for j in keep]
        calls = calculator.calls if calculator is not None else [[] for _ in range(n)]
        return Rollout([list(ids) for ids in prompt_ids], tokens, logprobs, mask, reasons, calculator_calls=calls)


def _device(model) -> torch.device:
    return next(model.parameters()).device
