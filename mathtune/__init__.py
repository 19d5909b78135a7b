"""mathtune: fine-tune small language models on math word problems and measure them honestly.

Public API (imported lazily, so ``import mathtune`` stays fast and never loads torch):

    mathtune.load(spec)                     -> MathModel with generate / batched_generate / answer
    mathtune.train(config)                  -> TrainResult            (mathtune.training.train)
    mathtune.evaluate(spec, config, out)    -> (summary, items)       (mathtune.evaluation.evaluate_model)
    mathtune.compare(base, trained, config) -> comparison dict        (mathtune.comparison.run_compare)
    mathtune.export_model(spec, output)     -> ExportResult           (mathtune.export.export_model)
    mathtune.ask(spec, questions)           -> [Answer(text, value)]  (mathtune.commands.ask.ask)

(``export_model``, not ``export``: ``mathtune.export`` is the module, and importing it rebinds that
attribute, so a function of the same name would be shadowed as soon as anything imported the module.)
"""

from __future__ import annotations

import importlib
from importlib import metadata

try:
    __version__ = metadata.version("mathtune")
except metadata.PackageNotFoundError:  # running from a source tree that was never pip-installed
    __version__ = "0+unknown"

# public name -> (module, attribute); resolved on first access (PEP 562)
_EXPORTS = {
    "load": ("mathtune.api", "load"),
    "MathModel": ("mathtune.api", "MathModel"),
    "train": ("mathtune.training", "train"),
    "evaluate": ("mathtune.evaluation", "evaluate_model"),
    "compare": ("mathtune.comparison", "run_compare"),
    "export_model": ("mathtune.export", "export_model"),
    "ask": ("mathtune.commands.ask", "ask"),
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mathtune' has no attribute {name!r}")
    module_name, attribute = _EXPORTS[name]
    value = getattr(importlib.import_module(module_name), attribute)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
