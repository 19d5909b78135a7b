"""The run directory: its layout (``RunDir``), one run at a time, never another run's weights, crash-tolerant logs.

- ``RunDir``: every file and folder name of a run dir, and its checkpoint/resume rules.

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
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from mathtune.atomic import write_text_atomically
from mathtune.errors import MathtuneError
from mathtune.integrity import files_problem, safetensors_problem

LOCK_FILE = ".mathtune.lock"


@dataclass(frozen=True)
class RunDir:
    """A training run directory: the one place that names its files and folders.

    Every module asks a ``RunDir`` for a path instead of spelling a file name, so the layout can be
    read (and changed) here alone. The methods below are the run dir's own rules: which checkpoints
    are complete, what ``--resume`` resolves to, what a fresh or resumed run clears first.
    """

    root: Path

    CONFIG: ClassVar[str] = "mathtune_config.yaml"  # the resolved config, without secrets
    METRICS: ClassVar[str] = "metrics.jsonl"  # one line per logged step
    SAMPLES: ClassVar[str] = "samples.jsonl"  # the collapse detector's generations
    TRAINER_STATE: ClassVar[str] = "trainer_state.json"  # transformers' TRAINER_STATE_NAME
    CHECKPOINT_PREFIX: ClassVar[str] = "checkpoint-"  # Trainer's checkpoint-<global step> dirs
    # written into checkpoint-N by training's CheckpointMarker once Trainer has finished writing it
    CHECKPOINT_MARKER: ClassVar[str] = "mathtune_checkpoint.json"
    EVAL: ClassVar[str] = "eval"  # per-item eval logs of --eval-samples
    PLOTS: ClassVar[str] = "plots"
    REPORT: ClassVar[str] = "report.md"
    COMPARISON: ClassVar[str] = "model_comparison.json"
    LOCK: ClassVar[str] = LOCK_FILE
    PREVIOUS_PREFIX: ClassVar[str] = "previous-"  # an earlier run's final model, moved aside
    # a checkpoint that failed its check, moved out of Trainer's way when a resume redoes its steps
    # (not "checkpoint-*": Trainer's rotation and --resume auto never see it)
    DAMAGED_PREFIX: ClassVar[str] = "damaged-"
    # Files a training run writes as its final model (LoRA or full), plus its trainer state.
    WEIGHT_PATTERNS: ClassVar[tuple[str, ...]] = (
        "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "config.json",
        "generation_config.json", "model.safetensors", "model-*.safetensors", "model.safetensors.index.json",
        "pytorch_model*.bin", TRAINER_STATE)
    # Outputs derived from a trained model: stale ones from an earlier run in the same dir would be
    # reused or reported as this run's (an eval cache keyed by the run dir's name, not its weights).
    DERIVED: ClassVar[tuple[str, ...]] = (EVAL, COMPARISON, REPORT, PLOTS)

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    # ------------------------------------------------------------------ paths

    @property
    def config(self) -> Path:
        return self.root / self.CONFIG

    @property
    def metrics(self) -> Path:
        return self.root / self.METRICS

    @property
    def samples(self) -> Path:
        return self.root / self.SAMPLES

    @property
    def trainer_state(self) -> Path:
        return self.root / self.TRAINER_STATE

    @property
    def eval_dir(self) -> Path:
        return self.root / self.EVAL

    @property
    def plots_dir(self) -> Path:
        return self.root / self.PLOTS

    @property
    def report(self) -> Path:
        return self.root / self.REPORT

    @property
    def comparison(self) -> Path:
        return self.root / self.COMPARISON

    def checkpoint(self, step: int) -> Path:
        return self.root / f"{self.CHECKPOINT_PREFIX}{step}"

    @classmethod
    def checkpoint_step(cls, path: str | Path) -> int | None:
        """N for a ``checkpoint-N`` dir name, else None."""
        prefix, _, step = Path(path).name.partition("-")
        return int(step) if f"{prefix}-" == cls.CHECKPOINT_PREFIX and step.isdigit() else None

    @classmethod
    def marker(cls, checkpoint: str | Path) -> Path:
        return Path(checkpoint) / cls.CHECKPOINT_MARKER

    @classmethod
    def of_model(cls, path: str | Path) -> RunDir | None:
        """The training run a model dir comes from (the dir holding the run's config): the dir
        itself, or for ``checkpoint-N`` its parent; None for a model dir no run wrote."""
        path = Path(path)
        for candidate in (path, path.parent if cls.checkpoint_step(path) is not None else None):
            if candidate is not None and (candidate / cls.CONFIG).is_file():
                return cls(candidate)
        return None

    # ------------------------------------------------------------------ checkpoints and resume

    def checkpoints(self) -> list[Path]:
        """Every checkpoint-N dir, complete or not, oldest step first."""
        found = []
        for path in self.root.glob(f"{self.CHECKPOINT_PREFIX}*") if self.root.is_dir() else []:
            step = self.checkpoint_step(path)
            if path.is_dir() and step is not None:
                found.append((step, path))
        return [path for _, path in sorted(found)]

    def complete_checkpoints(self) -> list[Path]:
        """checkpoint-N dirs that carry the completion marker, oldest step first."""
        return [path for path in self.checkpoints() if self.marker(path).is_file()]

    @classmethod
    def checkpoint_problem(cls, checkpoint: str | Path) -> str | None:
        """None when a marked checkpoint's files are whole: each one's size and SHA-256 as its marker
        recorded them once they were on disk (training's CheckpointMarker). A marker an older mathtune
        wrote (no file record) gets the safetensors structure check. Else what failed, in words."""
        checkpoint = Path(checkpoint)
        marker = cls.marker(checkpoint)
        if not marker.is_file():
            return "no completion marker (its save was interrupted)"
        try:
            record = json.loads(marker.read_text())
        except (OSError, ValueError) as exc:
            return f"its {cls.CHECKPOINT_MARKER} is unreadable ({type(exc).__name__})"
        files = record.get("files") if isinstance(record, dict) else None
        if files is None:
            return next(filter(None, (safetensors_problem(p) for p in sorted(checkpoint.glob("*.safetensors")))), None)
        return files_problem(checkpoint, files)

    def resolve_resume(self, resume: str | None) -> str | None:
        """--resume auto -> the newest complete checkpoint here whose files pass their check (a damaged
        newer one is skipped, with a line saying what failed); --resume PATH -> PATH, checked."""
        if resume is None:
            return None
        if resume == "auto":
            found = self.complete_checkpoints()
            if not found:
                raise MathtuneError(
                    f"--resume auto: no complete checkpoint in --output-dir {self.root} (write them with "
                    f"--save-steps N, point --output-dir at the run to continue, or drop --resume)"
                )
            damaged = []
            for path in reversed(found):
                problem = self.checkpoint_problem(path)
                if problem is None:
                    for bad, why in damaged:
                        print(f"--resume auto: skipping the damaged {bad.name} (each file's size and SHA-256 checked "
                              f"against its marker: {why}); resuming from {path.name}", file=sys.stderr)
                    return str(path)
                damaged.append((path, problem))
            listing = "; ".join(f"{path.name}: {why}" for path, why in damaged)
            raise MathtuneError(
                f"--resume auto: no whole checkpoint in --output-dir {self.root} ({listing}): start over with a new "
                f"--output-dir, or delete the damaged checkpoint-N dirs there and run without --resume"
            )
        path = Path(resume)
        if not (path / self.TRAINER_STATE).is_file():
            raise MathtuneError(f"--resume {resume}: no {self.TRAINER_STATE} there; pass a checkpoint-N dir or "
                                f"--resume auto")
        if not self.marker(path).is_file():
            raise MathtuneError(
                f"--resume {resume}: checkpoint not marked complete (its save was interrupted); "
                f"use an earlier checkpoint or --resume auto"
            )
        problem = self.checkpoint_problem(path)
        if problem is not None:
            raise MathtuneError(f"--resume {resume}: damaged checkpoint ({problem}): use --resume auto (the newest "
                                f"whole checkpoint) or an earlier checkpoint-N")
        return str(path)

    def refuse_earlier_checkpoints(self, resume_from: str | None) -> None:
        """A fresh run into a dir with checkpoints is refused: Trainer would rotate them with ours, and
        a later --resume auto could pick up a checkpoint of a different run. The user chooses."""
        if resume_from is not None:
            return
        stale = [p.name for p in self.checkpoints()]
        if stale:
            raise MathtuneError(
                f"--output-dir {self.root} holds checkpoints of an earlier run ({', '.join(stale[:3])}): "
                f"continue it with --resume auto, or use a new --output-dir"
            )

    def prepare(self, resume_from: str | None) -> float:
        """Lock the dir (creating it) and clear what an earlier run left that this one would mistake for
        its own. Returns the training seconds already spent by the run resumed (0 for a fresh run)."""
        self.lock()
        if resume_from is None:
            self.move_aside_earlier_weights()
        else:
            self.remove_unmarked_checkpoints(resume_from)
            self.set_aside_damaged_checkpoints(resume_from)
        for name in self.DERIVED:
            target = self.root / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        if resume_from is None:
            self.metrics.unlink(missing_ok=True)
            return 0.0
        if not self.metrics.is_file():
            return 0.0
        # keep the lines up to the resumed step: later ones belong to steps that will be redone
        # (a torn last line from a killed run is dropped with a notice)
        step = json.loads((Path(resume_from) / self.TRAINER_STATE).read_text())["global_step"]
        kept = keep_steps_up_to(self.metrics, step)
        return float(kept[-1].get("seconds") or 0.0) if kept else 0.0

    # ------------------------------------------------------------------ lock and earlier runs

    def lock(self) -> Path:
        return lock_output_dir(self.root)

    def unlock(self) -> None:
        unlock_output_dir(self.root)

    def earlier_weights(self) -> list[Path]:
        found = set()
        for pattern in self.WEIGHT_PATTERNS:
            found.update(p for p in self.root.glob(pattern) if p.is_file())
        return sorted(found)

    def move_aside_earlier_weights(self) -> Path | None:
        """Move an earlier run's final model out of the way (into ``previous-<UTC time>/``); say so."""
        files = self.earlier_weights() if self.root.is_dir() else []
        if not files:
            return None
        aside = self.root / time.strftime(f"{self.PREVIOUS_PREFIX}%Y%m%d-%H%M%S", time.gmtime())
        n = 1
        while aside.exists():
            n += 1
            aside = aside.with_name(f"{aside.name.split('.')[0]}.{n}")
        aside.mkdir()
        for path in files:
            shutil.move(str(path), str(aside / path.name))
        print(f"{self.root} held an earlier run's model ({', '.join(p.name for p in files[:3])}"
              f"{', ...' if len(files) > 3 else ''}): moved to {aside} so it is never mistaken for this run's")
        return aside

    def remove_unmarked_checkpoints(self, resume_from: str | Path) -> list[Path]:
        """Delete checkpoint dirs newer than ``resume_from`` without a completion marker: a save that a crash
        cut short. Trainer would write the same step into them again, next to files of the torn save."""
        resumed = self.checkpoint_step(resume_from) or 0
        removed = [path for path in self.checkpoints()
                   if self.checkpoint_step(path) > resumed and not self.marker(path).is_file()]
        for path in removed:
            shutil.rmtree(path)
        if removed:
            print(f"removed {len(removed)} incomplete checkpoint(s) left by an interrupted save: "
                  f"{', '.join(p.name for p in removed)}")
        return removed

    def set_aside_damaged_checkpoints(self, resume_from: str | Path) -> list[Path]:
        """Move marked checkpoints newer than ``resume_from`` whose files fail their check (the ones
        --resume auto skipped) to ``damaged-checkpoint-N``: Trainer saves that step again, and would
        write into the damaged dir. Moved, not deleted: a copy cut short can still be copied again."""
        resumed = self.checkpoint_step(resume_from) or 0
        moved = []
        for path in self.checkpoints():
            if self.checkpoint_step(path) <= resumed or not self.marker(path).is_file():
                continue
            problem = self.checkpoint_problem(path)
            if problem is None:
                continue
            aside = self.root / f"{self.DAMAGED_PREFIX}{path.name}"
            n = 1
            while aside.exists():
                n += 1
                aside = self.root / f"{self.DAMAGED_PREFIX}{path.name}.{n}"
            os.rename(path, aside)
            moved.append(aside)
            print(f"moved the damaged {path.name} ({problem}) to {aside.name}: training redoes its steps; delete "
                  f"it once you no longer need it", file=sys.stderr)
        return moved


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
