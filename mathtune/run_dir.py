"""The run directory's integrity: one run at a time, never another run's weights, crash-tolerant logs.

- ``lock_output_dir``: an exclusive ``flock`` on ``<output-dir>/.mathtune.lock`` held until the
  process ends. Two ``mathtune train`` into one dir would interleave metrics.jsonl lines and rotate
  each other's checkpoints. The kernel drops a flock when its process dies, kill -9 included, so a
  crashed run never leaves a stale lock to clean up by hand (a pid file would).
- ``move_aside_earlier_weights``: a fresh run into a dir that holds an earlier run's final model
  moves those files into ``previous-<time>/`` and says so. Left in place, a LoRA run's
  adapter_config.json outlives a later ``--full`` run (the loader prefers the adapter: the
  comparison would evaluate the OLD model), and a run a guard halts would leave the earlier final
  model looking like its own.
- ``read_jsonl_repairing``: metrics.jsonl and samples.jsonl are appended line by line, so kill -9
  mid-write leaves a torn last line. It is dropped with a one-line notice; a bad line elsewhere is
  not a crash artefact and is an error naming the file and line.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from mathtune.atomic import write_text_atomically
from mathtune.errors import MathtuneError

LOCK_FILE = ".mathtune.lock"
# Files a training run writes as its final model (LoRA or full), plus its trainer state.
WEIGHT_PATTERNS = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "config.json",
                   "generation_config.json", "model.safetensors", "model-*.safetensors", "model.safetensors.index.json",
                   "pytorch_model*.bin", "trainer_state.json")

_held: dict[Path, int] = {}  # resolved run dir -> fd of its lock file, held by this process


def lock_output_dir(run_dir: str | Path) -> Path:
    """Create ``run_dir`` and lock it for this process; a dir locked by another process is an error."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        key = run_dir.resolve()
        if key in _held:
            return run_dir  # this process holds it already (the API training twice into one dir)
        fd = os.open(key / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise MathtuneError(f"--output-dir {run_dir}: cannot write there ({exc.strerror}): choose a writable "
                            f"directory") from None
    try:
        import fcntl
    except ImportError:  # Windows: no flock; the run dir is then unguarded, as before
        _held[key] = fd
        return run_dir
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise MathtuneError(f"--output-dir {run_dir} is in use by another mathtune train (pid {owner}): wait for it "
                            f"to finish or use another --output-dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[key] = fd
    return run_dir


def check_writable(path: str | Path, flag: str = "--output-dir", *, is_file: bool = False) -> None:
    """Fail now (not after loading a model or hours of work) when the directory ``path`` (or, with
    ``is_file``, the file ``path``) cannot be created or written."""
    target = Path(path).absolute()
    if is_file:
        if target.is_dir():
            raise MathtuneError(f"{flag} {path}: is a directory; give a file name (e.g. {target / 'out.json'})")
        target = target.parent
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        why = "not a directory" if not existing.is_dir() else "permission denied"
        raise MathtuneError(f"{flag} {path}: cannot write there ({why}: {existing}): choose a writable "
                            f"{'location' if is_file else 'directory'}")


def unlock_output_dir(run_dir: str | Path) -> None:
    """Release this process's lock on ``run_dir`` (process exit releases it too)."""
    fd = _held.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the last descriptor drops the flock


def earlier_weights(run_dir: Path) -> list[Path]:
    found = set()
    for pattern in WEIGHT_PATTERNS:
        found.update(p for p in run_dir.glob(pattern) if p.is_file())
    return sorted(found)


def move_aside_earlier_weights(run_dir: str | Path) -> Path | None:
    """Move an earlier run's final model out of the way (into ``previous-<UTC time>/``); say so."""
    run_dir = Path(run_dir)
    files = earlier_weights(run_dir) if run_dir.is_dir() else []
    if not files:
        return None
    aside = run_dir / time.strftime("previous-%Y%m%d-%H%M%S", time.gmtime())
    n = 1
    while aside.exists():
        n += 1
        aside = aside.with_name(f"{aside.name.split('.')[0]}.{n}")
    aside.mkdir()
    for path in files:
        shutil.move(str(path), str(aside / path.name))
    print(f"{run_dir} held an earlier run's model ({', '.join(p.name for p in files[:3])}"
          f"{', ...' if len(files) > 3 else ''}): moved to {aside} so it is never mistaken for this run's")
    return aside


def remove_unmarked_checkpoints(run_dir: str | Path, resume_from: str | Path, marker: str) -> list[Path]:
    """Delete checkpoint dirs newer than ``resume_from`` without a completion marker: a save that a crash cut
    short. Trainer would write the same step into them again, next to files of the torn save."""
    resumed = int(Path(resume_from).name.partition("-")[2] or 0)
    removed = []
    for path in Path(run_dir).glob("checkpoint-*"):
        step = path.name.partition("-")[2]
        if path.is_dir() and step.isdigit() and int(step) > resumed and not (path / marker).is_file():
            shutil.rmtree(path)
            removed.append(path)
    if removed:
        print(f"removed {len(removed)} incomplete checkpoint(s) left by an interrupted save: "
              f"{', '.join(p.name for p in sorted(removed))}")
    return removed


def read_jsonl_repairing(path: str | Path) -> list[dict]:
    """Objects of a JSONL log this package appends to; a torn last line is dropped (with a notice) and
    the file rewritten without it. Any other unreadable line is an error naming ``path:line``."""
    path = Path(path)
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    records, bad = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except ValueError:
            bad.append(number)
            continue
        records.append(record)
    last = max((n for n, line in enumerate(lines, start=1) if line.strip()), default=0)
    if bad and bad != [last]:
        raise MathtuneError(f"{path}:{bad[0]}: not a JSON object (the file was edited or damaged): delete the "
                            f"line or the file, then resume")
    if bad:
        print(f"{path}: dropped a torn last line ({len(lines[last - 1])} bytes) left by an interrupted write",
              file=sys.stderr)
        write_text_atomically(path, "".join(json.dumps(r) + "\n" for r in records))
    return records


def keep_steps_up_to(path: str | Path, step: int) -> list[dict]:
    """Rewrite a step-keyed JSONL log keeping lines with ``step <= step`` (later ones will be redone)."""
    path = Path(path)
    if not path.is_file():
        return []
    kept = [r for r in read_jsonl_repairing(path) if isinstance(r.get("step"), int) and r["step"] <= step]
    write_text_atomically(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept
