"""Whole-or-nothing file writes: a reader never sees half a file, a crash leaves the old one."""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to a temp file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    # unique per process and call: two writers of one file never share a temp file
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
