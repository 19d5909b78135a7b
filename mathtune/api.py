"""The Python API: ``mathtune.load(spec)`` -> a ``MathModel`` that answers math questions.

    import mathtune
    model = mathtune.load("runs/lora-uc")            # alias, hub id, model/run dir, adapter dir, .gguf
    model.generate("How many meters are in 3.5 km?")  # the completion text
    model.answer("What is 12 * 7?", "Convert 2 kg to g.")   # [84.0, 2000.0] (nan where no number)

Questions are formatted with the model's chat template (or the base-model prompt) exactly as in
training, and decoded by the same batched ``Generator`` that ``mathtune eval`` uses.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from mathtune.config import GenerationArgs
from mathtune.errors import MathtuneError
from mathtune.generation.engine import Generator
from mathtune.generation.settings import Generations
from mathtune.hardware import Placement


class MathModel:
    """A loaded model plus its tokenizer and default generation settings (greedy)."""

    def __init__(self, loaded, *, device: str, precision: str, settings: GenerationArgs | None = None, seed: int = 0):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.spec = loaded.spec
        self.device = device
        self.precision = precision
        self.settings = (settings or GenerationArgs()).resolved(None).validate()
        # progress=False: an API call should not draw bars into the caller's output
        self._generator = Generator(self.model, self.tokenizer, self.settings, seed=seed, progress=False)

    def __repr__(self) -> str:
        return f"MathModel({self.spec!r}, device={self.device!r}, precision={self.precision!r})"

    def _run(self, questions: Sequence[str], settings: dict[str, Any]) -> Generations:
        for i, q in enumerate(questions):
            if not isinstance(q, str) or not q.strip():
                raise MathtuneError(f"question {i} is {q!r}: pass non-empty strings")
        settings = dict(settings)
        seed = settings.pop("seed", None)  # the sampling seed is the Generator's, beside the settings
        return self._generator(list(questions), seed=seed, **settings)

    def batched_generate(self, prompts: Sequence[str], **settings) -> list[str]:
        """One completion per question; ``settings`` override ``GenerationArgs`` fields (and the seed)
        (max_new_tokens, temperature, top_p, stop, batch_size, seed, calculator, loop_stop).
        ``calculator=True`` computes GSM8K ``<<EXPR=`` annotations while generating (off by default
        here: the API does not know the task; ``mathtune eval`` turns it on for gsm8k)."""
        if isinstance(prompts, str):
            raise MathtuneError("batched_generate takes a list of questions: use generate() for one string")
        if settings.get("num_samples", 1) != 1:
            raise MathtuneError("batched_generate returns one completion per question: use num_samples=1 "
                                "(mathtune.generation.engine.Generator returns several)")
        return [samples[0] for samples in self._run(prompts, settings)]

    def generate(self, prompt: str, **settings) -> str:
        """The completion for one question (see ``batched_generate`` for ``settings``)."""
        if not isinstance(prompt, str):
            raise MathtuneError(f"generate takes one question string, got {type(prompt).__name__}: use batched_generate for lists")
        return self.batched_generate([prompt], **settings)[0]

    def answer(self, *questions, **settings) -> list[float]:
        """The final number of each answer (flexible extraction, as ``accuracy`` scores it);
        ``nan`` where the output holds no number. ``answer(q1, q2)`` or ``answer([q1, q2])``."""
        from mathtune.answers import extract

        if len(questions) == 1 and isinstance(questions[0], (list, tuple)):
            questions = tuple(questions[0])
        if not questions:
            raise MathtuneError("answer() needs at least one question")
        values = []
        for text in self.batched_generate(list(questions), **settings):
            value, _method = extract(text)
            values.append(value if value is not None else math.nan)
        return values


def load(spec_or_run_dir: str = "smollm2-135m", device: str = "auto", precision: str = "auto", *,
         trust_remote_code: bool = False, allow_pickle: bool = False, **settings) -> MathModel:
    """Load a model for inference. ``device``/``precision`` follow the CLI policy (``auto``: best
    available); extra keyword arguments set default ``GenerationArgs`` (e.g. max_new_tokens=128) and
    the sampling ``seed``."""
    from mathtune.models.load import load_for_inference

    placement = Placement.choose(device, precision)
    seed = settings.pop("seed", 0)
    # the loading policy of `mathtune eval` (adapter merged): the same spec answers the same here
    loaded = load_for_inference(str(spec_or_run_dir), device=placement.device, precision=placement.precision,
                                trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    return MathModel(loaded, device=placement.device, precision=placement.precision,
                     settings=GenerationArgs().replace(**settings), seed=seed)
