"""Verify before use: each file's size and SHA-256, recorded once its data is on disk, checked before a
checkpoint is resumed or a cached conversion is loaded; and the structure check of a safetensors file
that no record covers (a run's final adapter).

Why SHA-256: over a 540 MB file (a 135M-parameter fp32 checkpoint's weights) it took 0.46 s on a
2-core AMD EPYC with SHA extensions, BLAKE2b 0.94 s, MD5 ~0.9 s, a plain read 0.08 s (hashlib, one
core, min of 3; README "Training runs"). It runs once per save and once per load, never per step.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

HASH = "sha256"
_CHUNK = 1 << 22


def file_digest(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, hex."""
    with open(path, "rb") as handle:
        if hasattr(hashlib, "file_digest"):  # Python 3.11+: reads in C, no per-chunk Python overhead
            return hashlib.file_digest(handle, HASH).hexdigest()
        digest = hashlib.new(HASH)
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
        return digest.hexdigest()


def record_files(root: str | os.PathLike, *, exclude: tuple[str, ...] = ()) -> dict[str, dict]:
    """``{relative path: {"size": bytes, "sha256": hex}}`` for every file under ``root`` (names in
    ``exclude`` left out: the record itself)."""
    root = Path(root)
    record = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        name = path.relative_to(root).as_posix()
        if name in exclude:
            continue
        record[name] = {"size": path.stat().st_size, HASH: file_digest(path)}
    return record


def files_problem(root: str | os.PathLike, record: dict, *, hash_skip: tuple[str, ...] = ()) -> str | None:
    """None when every file ``record`` lists is under ``root`` with its size and hash; else what is wrong
    with the first one that differs. Sizes are checked for all files before any is hashed (a file cut
    short is found without reading the others); files in ``hash_skip`` get the size check only."""
    root = Path(root)
    if not isinstance(record, dict):
        return "its record of file sizes and hashes is unreadable"
    for name, entry in record.items():
        path = root / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != entry.get("size"):
            return f"{name} is {size} bytes, its record says {entry.get('size')} (cut short or damaged)"
    for name, entry in record.items():
        if name in hash_skip or HASH not in entry:
            continue
        if file_digest(root / name) != entry[HASH]:
            return f"{name} does not match its recorded SHA-256 (damaged)"
    return None


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """None when ``path`` is a whole safetensors file (its header parses and the file holds exactly the
    bytes the header's tensors span); else what is wrong. Reads the header only."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                return f"{path.name} is {size} bytes, too short for a safetensors header (cut short)"
            (length,) = struct.unpack("<Q", head)
            if length > size - 8:
                return f"{path.name} is {size} bytes, its header alone claims {length} (cut short)"
            header = json.loads(handle.read(length))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return f"{path.name} has an unreadable safetensors header ({type(exc).__name__})"
    if not isinstance(header, dict):
        return f"{path.name} has an unreadable safetensors header"
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError):
            return f"{path.name}: tensor {name} has no data offsets in its header (damaged)"
    expected = 8 + length + end
    if size != expected:
        return f"{path.name} is {size} bytes, its header says {expected} (cut short or damaged)"
    return None
