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
  LoRA merged            a LoRA policy decodes with its adapter folded into the float32 base weights
                         and taken out after (``models.load.lora_merged``: PEFT's merge_adapter /
                         unmerge_adapter): one matmul a projection instead of five ops, the same
                         distribution to float32 rounding (tests/test_grpo.py)
  logprobs, entropies    log softmax(logits / T) of each chosen token, before any forcing: the
                         policy's own logprob (TRL uses them only for importance sampling; tests
                         check them against a forward pass of the policy), and the entropy of that
                         distribution; the trainer takes both for groups without a learning signal
                         instead of running them again (training/grpo.py ``_recorded_scores``)
  draw                   ``cpu.sampled_tokens``: inverse-CDF sampling, multinomial's distribution at
                         a fourteenth of its cost (bench/sampling_kernel.py)
  calculator             ``CalculatorForcing`` (mathtune.calculator) writes ``RESULT>>`` after
                         ``<<EXPR=`` as eval does; forced tokens get ``env_mask`` 0, so the loss never
                         trains the model on tokens it did not choose (grpo_trainer.py:2272, :2497)
  stop                   at the end-of-turn token (kept: the model chose it), or at a loop
                         (``LoopMonitor``): the end-of-turn token is then appended with ``env_mask``
                         0, so TRL does not count the sample as truncated (grpo_trainer.py:2292);
                         a sample cut at ``max_completion_length`` gets nothing appended

The settings are ``config.GenerationArgs`` (``max_new_tokens`` is GRPO's ``max_completion_length``,
``num_samples`` its ``num_generations``); the fast-path switch, the vocabulary tables and the
fallback notice are the ``Generator``'s, so the sampler decides fast path or not exactly as eval does.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from mathtune.config import GenerationArgs
from mathtune.data import encode_prompt, format_prompt
from mathtune.generation.cpu import PREFILL_GROUP_ROWS, FastDecoder, FastPathUnsupported, sampled_tokens

# Decode steps between two cuts of finished rows from the KV buffers (as the engine's CHUNK_TOKENS).
CHUNK_TOKENS = 32
STOP_REASONS = ("end_of_turn", "loop", "max_completion_length")


@dataclass
class Rollout:
    """One call's samples, one entry per prompt row, in the order TRL gave the prompts."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    logprobs: list[list[float]]
    entropies: list[list[float]]  # entropy of softmax(logits / T) at each position, before any forcing
    env_mask: list[list[int]]  # 1: the model chose the token; 0: forced (calculator) or appended (loop stop)
    stop_reasons: list[str]
    seconds: float = 0.0
    calculator_calls: list[list[dict]] = field(default_factory=list)
    _by_tokens: dict | None = field(default=None, repr=False, compare=False)

    @property
    def truncated(self) -> list[bool]:
        return [reason == "max_completion_length" for reason in self.stop_reasons]

    def scores_of(self, prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> tuple[list[float], list[float]] | None:
        """(logprobs, entropies) of the sample with exactly these prompt and completion ids, or None. The
        trainer looks rows up by their tokens because TRL shuffles and pads the rows it was given."""
        if self._by_tokens is None:
            self._by_tokens = {(tuple(p), tuple(c)): (lp, ent) for p, c, lp, ent
                               in zip(self.prompt_ids, self.completion_ids, self.logprobs, self.entropies)}
        return self._by_tokens.get((tuple(prompt_ids), tuple(completion_ids)))

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
        firsts: dict[tuple[int, ...], int] = {}
        owner = [firsts.setdefault(tuple(rest), row) for row, rest in enumerate(self.rests)]
        distinct = sorted(set(owner))
        logits = dict(zip(distinct, torch.cat(self.prefill_rows(distinct))))
        # every other row of a group: the owner's prompt slots (same ids, same layout) and next-token logits
        copies = [(row, own) for row, own in enumerate(owner) if row != own]
        if copies:
            rows = torch.tensor([row for row, _ in copies], device=device)
            owners = torch.tensor([own for _, own in copies], device=device)
            for layer in self.state.keys:
                self.state.keys[layer][rows, ..., p:p + w] = self.state.keys[layer][owners, ..., p:p + w]
                self.state.values[layer][rows, :, p:p + w] = self.state.values[layer][owners, :, p:p + w]
        self.pending = torch.stack([logits[own] for own in owner])


class RolloutSampler:
    """``rollout_func(prompts, trainer) -> dict`` for TRL's GRPOTrainer, sampling on mathtune's fast path.

    ``prompts`` are question texts (the dataset's ``prompt`` column); each is formatted and encoded
    exactly as training and eval do (``data.format_prompt`` + ``data.encode_prompt``). ``last`` keeps
    the latest ``Rollout`` (the trainer's step statistics read it).
    """

    def __init__(self, tokenizer, settings: GenerationArgs, *, seed: int = 0, autocast_dtype: torch.dtype | None = None,
                 logits_processors: Sequence = (), merge_lora: bool = True):
        self.tokenizer = tokenizer
        # run on the tempered scores before the calculator; tests use them to script what a model writes
        self.logits_processors = list(logits_processors)
        self.settings = settings.resolved(None).validate()  # calculator: as the command decided it
        self.seed = seed
        self.autocast_dtype = autocast_dtype  # the trainer's mixed precision (None: fp32)
        # a LoRA policy samples with its adapter merged into the base weights (models.load.lora_merged)
        self.merge_lora = merge_lora
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
                    return self.generator.fast_unsupported or "the fast path is off for this model"
                decoder = GroupedDecoder(model, [ids, ids], 1, self.generator.pad_id,
                                         self.generator.forward_kwargs(), _device(model))
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
                raise FastPathUnsupported(self.generator.fast_unsupported or "the fast path is off for this model")
            # the seed moves with each call, so two steps never draw the same samples
            torch.manual_seed(self.seed * 1_000_003 + draw)
            rollout = self._decode(model, prompt_ids)
        rollout.seconds = time.perf_counter() - started
        return rollout

    @contextlib.contextmanager
    def _session(self, model):
        """Eval mode, no autograd, the trainer's autocast, the fast-path attention switched in; the caller's
        random streams and training mode restored afterwards."""
        from mathtune.generation.engine import Generator, contiguous_head_input
        from mathtune.models.load import lora_merged

        if self.generator is None or self.generator.model is not model:
            self.generator = Generator(model, self.tokenizer, progress=False)
        device = _device(model)
        autocast = (torch.autocast(device.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
                    else contextlib.nullcontext())
        was_training = model.training
        model.eval()
        rng_devices = [device.index or 0] if device.type == "cuda" else []
        merged = lora_merged(model) if self.merge_lora else contextlib.nullcontext()
        try:
            with (torch.no_grad(), torch.random.fork_rng(devices=rng_devices), autocast,
                  self.generator.fast_path() as fast, contiguous_head_input(model), merged):
                yield fast
        finally:
            model.train(was_training)

    def _decode(self, model, prompt_ids: list[list[int]]) -> Rollout:
        """Chunks of ``CHUNK_TOKENS`` steps over every live row; finished rows leave between chunks."""
        state = self._start(model, prompt_ids)
        remaining = self.settings.max_new_tokens
        while state.live and remaining > 0:
            steps = min(CHUNK_TOKENS, remaining)
            state.decoder.reserve(steps)
            ended = [False] * len(state.live)
            for _ in range(steps):
                self._sample_step(state, ended)
                remaining -= 1
                if all(ended):
                    break
            keep = [j for j, done in enumerate(ended) if not done]
            if not keep or remaining <= 0:
                break
            state.select(keep)
        return state.rollout(prompt_ids)

    def _start(self, model, prompt_ids: list[list[int]]) -> "_SampleState":
        from mathtune.loops import LoopMonitor

        gen, n = self.generator, len(prompt_ids)
        decoder = GroupedDecoder(model, prompt_ids, self.settings.max_new_tokens, gen.pad_id, gen.forward_kwargs(),
                                 _device(model))
        decoder.prefill()
        triggers, text_checks = gen.tables()
        width = decoder.sequences.shape[1]
        calculator = None
        if self.settings.calculator:
            from mathtune.calculator import CalculatorForcing

            calculator = CalculatorForcing(self.tokenizer, n, width, triggers)
        monitor = LoopMonitor(self.tokenizer, n, width, self.settings.max_new_tokens, text_checks)
        return _SampleState(decoder, monitor, calculator, n)

    def _sample_step(self, state: "_SampleState", ended: list[bool]) -> None:
        """One token for every live row: sampled from softmax(logits / T), its policy logprob before any
        forcing, forced tokens (calculator) marked for ``env_mask`` 0."""
        decoder, gen = state.decoder, self.generator
        logits, decoder.pending = decoder.pending, None
        if logits is None:
            logits = decoder.step(decoder.sequences[:, -1])
        scores = logits.float() / self.settings.temperature
        policy = torch.log_softmax(scores, dim=-1)
        # the entropy TRL's scoring reports, kept so the trainer need not rerun groups without signal
        # (training.grpo._recorded_scores); one exp and one sum over the log-softmax just computed
        entropy = (policy.exp() * policy).sum(dim=-1).neg_().tolist()
        for processor in self.logits_processors:
            scores = processor(decoder.sequences, scores)
        forced = torch.zeros(len(state.live), dtype=torch.bool)
        if state.calculator is not None:
            # CalculatorForcing writes -inf over every token but the forced one, in the rows it forces
            # (in place: ``policy`` above is its own tensor), and names those rows
            scores = state.calculator(decoder.sequences, scores)
            forced[state.calculator.forced_rows] = True
        chosen = sampled_tokens(scores)
        # rows that ended earlier in this chunk decode on until the chunk's cut: feed them padding
        chosen = torch.where(torch.tensor(ended, device=chosen.device), gen.pad_id, chosen)
        logp = policy.gather(1, chosen[:, None]).squeeze(1).tolist()
        if not all(map(math.isfinite, logp)):
            # a NaN or +inf logit makes its row's whole log-softmax NaN/-inf, so checking the chosen
            # token's logprob finds it without another pass over every logit (torch.isfinite(...).all()
            # on 32 x 49152 fp32 scores: 4.5 ms a step on two cores)
            from mathtune.errors import TrainingHalted

            raise TrainingHalted("nonfinite_logits", "the policy's logits hold NaN/inf while sampling: the weights "
                                 "or the precision diverged: lower --learning-rate, use --precision fp32, resume "
                                 "from the last good checkpoint")
        decoder.sequences = torch.cat([decoder.sequences, chosen[:, None]], dim=1)
        looped = state.monitor.step(decoder.sequences).cpu().tolist()
        state.record(chosen.tolist(), logp, entropy, forced.tolist(), looped, ended, gen.eot_id, self.settings)


@dataclass
class _SampleState:
    """A rollout batch in progress: the decoder, its row monitors, and each prompt row's tokens so far."""

    decoder: GroupedDecoder
    monitor: object  # loops.LoopMonitor
    calculator: object | None  # calculator.CalculatorForcing
    n: int
    tokens: list[list[int]] = field(default_factory=list)
    logprobs: list[list[float]] = field(default_factory=list)
    entropies: list[list[float]] = field(default_factory=list)
    mask: list[list[int]] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    live: list[int] = field(default_factory=list)  # prompt row of each decoder row

    def __post_init__(self):
        self.tokens, self.logprobs, self.entropies, self.mask = ([[] for _ in range(self.n)] for _ in range(4))
        self.reasons, self.live = ["max_completion_length"] * self.n, list(range(self.n))

    def record(self, chosen, logp, entropy, forced, looped, ended: list[bool], eot_id: int,
               settings: GenerationArgs) -> None:
        for j, row in enumerate(self.live):
            if ended[j]:
                continue
            self.tokens[row].append(chosen[j])
            self.logprobs[row].append(logp[j])
            self.entropies[row].append(entropy[j])
            self.mask[row].append(0 if forced[j] else 1)
            if chosen[j] == eot_id:
                ended[j], self.reasons[row] = True, "end_of_turn"
            elif looped[j] and settings.loop_stop:
                ended[j], self.reasons[row] = True, "loop"
                if len(self.tokens[row]) < settings.max_new_tokens:
                    # closes the sample so TRL does not count it as truncated; not the model's choice
                    self.tokens[row].append(eot_id)
                    self.logprobs[row].append(0.0)
                    self.entropies[row].append(0.0)
                    self.mask[row].append(0)

    def select(self, keep: list[int]) -> None:
        """Drop finished rows from the decoder and the row monitors."""
        self.decoder.select(keep)
        self.monitor.select(keep)
        if self.calculator is not None:
            self.calculator.select(keep)
        self.live = [self.live[j] for j in keep]

    def rollout(self, prompt_ids) -> Rollout:
        calls = self.calculator.calls if self.calculator is not None else [[] for _ in range(self.n)]
        return Rollout([list(ids) for ids in prompt_ids], self.tokens, self.logprobs, self.entropies, self.mask,
                       self.reasons, calculator_calls=calls)


def _device(model) -> torch.device:
    return next(model.parameters()).device
