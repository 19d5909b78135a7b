"""GGUF file -> plain fp32 safetensors checkpoint, converted once and cached.

``from_pretrained(..., gguf_file=...)`` de-quantizes the weights, but the model it returns stays
flagged as quantized (``config.quantization_config`` / ``model.hf_quantizer``), so ``Trainer`` refuses
to train it and ``save_pretrained`` refuses to save it. It also takes ~20 s (model + tokenizer
conversion). So a GGUF is converted once: the architecture is rebuilt from a config without
``quantization_config``, the de-quantized state dict is loaded into it, and model + tokenizer are
saved as a plain fp32 safetensors checkpoint in ``cache_dir()``. Later loads read that (~0.2 s).
The cache dir is written to a temporary sibling and renamed into place (``build_dir_atomically``,
also used by ``mathtune export``), so a crash or a second process converting at the same time never
leaves half a model behind.

The conversion record holds each file's size and SHA-256, taken once the files are on disk; every
load checks them (once per process: ``_verified``) and a damaged entry (a file cut short, a bit
gone bad) is rebuilt from its GGUF with one line. A full disk during the build is one ``DiskFull``
line naming the cache dir, the bytes written and the space left.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

from mathtune.atomic import DEFAULT_HINT, finish_tree, fsync_dir, make_durable, reporting_write_failures
from mathtune.errors import MathtuneError, WriteFailed, first_line
from mathtune.integrity import files_problem, record_files, safetensors_problem
from mathtune.models.spec import bundled_gguf

# Written last into a converted cache dir; its presence (with the weights) means "complete".
CONVERSION_MARKER = "mathtune_conversion.json"
_STALE_TMP_SECONDS = 24 * 3600  # temp dirs older than this belong to a crashed conversion

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


def build_dir_atomically(target: Path, build: Callable[[Path], None], *, replace: bool = False,
                         what: str = "the directory", hint: str = DEFAULT_HINT) -> bool:
    """Run ``build(tmp)`` on a fresh temp dir next to ``target``, then rename it to ``target``: the
    one atomic dir build of the GGUF cache and ``mathtune export``.

    A rename within one directory is atomic, so ``target`` either does not exist or is complete.
    If ``build`` raises, the temp dir is removed and ``target`` is untouched. An empty ``target``
    dir is replaced. A non-empty one that exists by the time ours is ready (another process won
    the race) is kept and ours discarded, returning False, unless ``replace`` (export
    ``--overwrite``): then the old one is moved aside, ours renamed in, the old one deleted.
    Returns True when this call put ``target`` in place.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale_temps(target.parent, target.name)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    # Not tempfile.mkdtemp: its 0700 mode would make a shared cache unreadable to others.
    tmp = target.parent / f".{target.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        with reporting_write_failures(target, what=what, hint=hint, partial=tmp):
            build(tmp)
            finish_tree(tmp)  # umask modes (safetensors leaves 0600) and every file on disk before the rename
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()  # POSIX rename replaces an empty dir, Windows' does not
        if replace and target.exists():
            old = target.parent / f".{target.name}.old-{tag}"
            os.rename(target, old)
            os.rename(tmp, target)
            fsync_dir(target.parent)
            shutil.rmtree(old, ignore_errors=True)  # our own moved-aside copy; the new one is in place
            return True
        try:
            # fails on a non-empty dir (ENOTEMPTY/EEXIST on POSIX, FileExistsError on Windows):
            # exactly "keep the first complete copy"
            os.rename(tmp, target)
        except OSError:
            if target.exists():
                return False
            raise
        fsync_dir(target.parent)  # the rename itself on disk
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
        raise MathtuneError(f"could not convert GGUF file {gguf}: {first_line(exc)}") from exc

    # A GGUF-loaded model may carry the quantizer flag; rebuild the same architecture from a clean
    # config so nothing marks it as quantized, then move the de-quantized weights in.
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):  # an instance attribute (PretrainedConfig has no default)
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    try:
        plain.load_state_dict(quantized.state_dict(), strict=True)
    except RuntimeError as exc:  # packed blocks have other shapes: a strict load catches them
        raise MathtuneError(f"could not de-quantize GGUF file {gguf}: {first_line(exc)}") from exc
    plain.generation_config = copy.deepcopy(quantized.generation_config)
    plain.save_pretrained(out)
    # Saved too: converting the GGUF vocabulary again would cost seconds on every load.
    tokenizer.save_pretrained(out)
    stat = gguf.stat()
    import transformers

    make_durable(out)  # the files on disk first: the record vouches for what a power cut leaves
    (out / CONVERSION_MARKER).write_text(
        json.dumps(
            {
                "source": str(gguf),
                "size": stat.st_size,
                "mtime_ns": stat.st_mtime_ns,
                "transformers": transformers.__version__,
                # each file's size and SHA-256: a load checks them (_cache_damage)
                "files": record_files(out, exclude=(CONVERSION_MARKER,)),
            },
            indent=2,
        )
    )


# (target, weights hashed?) -> the files' (name, size, mtime, inode) when this process last verified them
_verified: dict[tuple[str, bool], tuple] = {}


def _file_stats(target: Path, names) -> tuple:
    stats = []
    for name in names:
        try:
            st = (target / name).stat()
            stats.append((name, st.st_size, st.st_mtime_ns, st.st_ino))
        except OSError:
            stats.append((name, None))
    return tuple(stats)


def _cache_damage(target: Path, *, weights: bool = True) -> str | None:
    """None when the files of a complete cache entry match its record; else what differs. ``weights``
    False (a tokenizer-only load): the weights get the size check, not the hash. A record an older
    mathtune wrote (no ``files``) gets the safetensors structure check (header + size)."""
    try:
        record = json.loads((target / CONVERSION_MARKER).read_text())
    except (OSError, ValueError) as exc:
        return f"its {CONVERSION_MARKER} is unreadable ({type(exc).__name__})"
    files = record.get("files") if isinstance(record, dict) else None
    if files is None:
        return next(filter(None, (safetensors_problem(p) for p in sorted(target.glob("*.safetensors")))), None)
    if not isinstance(files, dict):
        return f"its {CONVERSION_MARKER} lists no readable files"
    key = (str(target), weights)
    stats = _file_stats(target, [CONVERSION_MARKER, *files])
    if _verified.get(key) == stats or _verified.get((str(target), True)) == stats:
        return None  # checked by this process already, and unchanged since
    problem = files_problem(target, files, hash_skip=() if weights else tuple(
        name for name in files if name.endswith(".safetensors")))
    if problem is None:
        _verified[key] = stats
    return problem


def ensure_converted(kind: str, spec: str, target: Path, *, weights: bool = True) -> Path:
    """The plain checkpoint for a GGUF spec, converting it on first use and rebuilding it when damaged.
    ``weights`` False: the caller loads the tokenizer alone (the weights' hash is not read)."""
    gguf = bundled_gguf(spec.strip().lower()) if kind == "alias-gguf" else Path(spec.strip()).expanduser().resolve()
    problem = _cache_problem(target)
    if problem is None:
        if kind == "alias-gguf":
            recorded = json.loads((target / CONVERSION_MARKER).read_text())
            if recorded.get("size") != gguf.stat().st_size:
                raise MathtuneError(
                    f"cached conversion {target} was made from a different {gguf.name} (the package was "
                    f"upgraded?): delete {target} and it is converted again"
                )
        damage = _cache_damage(target, weights=weights)
        if damage is None:
            return target
        problem = f"damaged ({damage})"
    if problem != "missing":
        # the GGUF it came from is the source of truth: convert again, replacing the damaged entry
        print(f"mathtune: model cache {target} is {problem}: rebuilding it from {gguf}", file=sys.stderr, flush=True)
    from mathtune.progress import phase  # start, "still running" every 30 s, end (stderr)

    try:
        with phase(f"mathtune: one-time conversion of {gguf.name} into a plain fp32 checkpoint at {target} "
                   f"(~20 s; later loads reuse it)"):
            build_dir_atomically(target, lambda tmp: _dequantized_checkpoint(gguf, tmp), replace=problem != "missing",
                                 what=f"the fp32 conversion of {gguf.name}",
                                 hint="free space there, or set MATHTUNE_CACHE to a directory with room for "
                                      "the converted model, and run the command again")
    except WriteFailed:
        raise
    except OSError as exc:  # unwritable or full cache dir: the fix is another MATHTUNE_CACHE
        raise MathtuneError(f"model cache {target.parent}: cannot write the conversion there ({exc.strerror or exc}): "
                            f"set MATHTUNE_CACHE to a writable directory with room for the converted model") from None
    problem = _cache_problem(target)  # another process's dir won the race: it must be complete too
    if problem is not None:
        raise MathtuneError(f"model cache {target} is {problem}: delete it and it is converted again")
    return target

