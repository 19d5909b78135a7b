"""Whole-or-nothing, durable writes with the permissions of any file the user writes.

A rename is atomic but not durable by itself: after a power cut the directory entry may point at a
file whose data never reached the disk (ext4/xfs delayed allocation). So the data is fsynced before
the rename and the directory after it. And files come out as the umask says (0644 under umask
022): libraries that write through a private temp file (safetensors does) leave 0600 files behind,
unreadable to the other users of a shared run or cache dir.

A write that runs out of space (ENOSPC, or EDQUOT: the user's quota) becomes one ``DiskFull`` line
here, for every caller: the path, the bytes needed or written, the free space left, what to do; the
partial output removed first (a temp file never renamed into place, a torn append cut back), so what
was there before stays whole (``write_failure``, ``reporting_write_failures``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import sys
import threading
import uuid
from pathlib import Path

from mathtune.errors import DiskFull, MathtuneError, WriteFailed, first_line

# What to do when a write ran out of room, where the caller names nothing better.
DEFAULT_HINT = "free space on that filesystem (or write elsewhere) and run the command again"
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# C++ and Rust writers that drop the errno: torch.save's zip writer (an ofstream: "basic_ios::clear:
# iostream error", then "unexpected pos" from its close) and safetensors ("Error while serializing: IoError").
_WRITER_FAILURE_TEXTS = ("iostream error", "unexpected pos", "PytorchStreamWriter failed", "file write failed",
                         "Error while serializing")
_NO_SPACE_TEXTS = ("No space left on device", "Disk quota exceeded", "StorageFull", "QuotaExceeded")
# A writer that failed without an errno while less than this was free had run out of space: a write
# that fills a disk leaves less than one block (or the filesystem's reserve) behind.
NEARLY_FULL = 1 << 20


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore at once (single-threaded at this point)
    os.umask(mask)
    return mask


def honour_umask(path: str | os.PathLike) -> None:
    """Give ``path`` (a file, or every file and dir under a dir) the mode a plain ``open`` or
    ``mkdir`` would: 0o666 / 0o777 minus the umask."""
    mask = current_umask()
    path = Path(path)
    if path.is_file():
        os.chmod(path, 0o666 & ~mask)
        return
    os.chmod(path, 0o777 & ~mask)
    for root, dirs, files in os.walk(path):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a directory's entries (a rename into it) durable. No-op where dirs cannot be opened."""
    if sys.platform.startswith("win"):
        return  # Windows cannot open a directory for fsync; NTFS journals the rename itself
    fsync_file(path)  # on POSIX a directory opens read-only and fsyncs like a file


def make_durable(path: str | os.PathLike) -> None:
    """fsync ``path``'s data: a file, or every file and dir under a dir (before renaming it into place)."""
    path = Path(path)
    if path.is_file():
        fsync_file(path)
        return
    for root, _dirs, files in os.walk(path, topdown=False):
        for name in files:
            fsync_file(os.path.join(root, name))
        fsync_dir(root)


def finish_tree(path: str | os.PathLike) -> None:
    """What every file mathtune writes gets before it is published: umask modes, data on disk."""
    honour_umask(path)
    make_durable(path)


# --------------------------------------------------------------------------- failed writes


def _chain(exc: BaseException | None):
    """``exc`` and what it was raised from or while handling (torch.save's two chained errors)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_disk_full(exc: BaseException) -> bool:
    """True when ``exc`` (or an error it chains) says the filesystem or the quota had no room."""
    return any((isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS) or any(t in str(e) for t in _NO_SPACE_TEXTS)
               for e in _chain(exc))


def write_failure_kind(exc: BaseException, free_at_failure: int | None) -> str | None:
    """"full" (no room), "failed" (another I/O error of a write) or None (not a failed write)."""
    if is_disk_full(exc):
        return "full"
    if isinstance(exc, MathtuneError):
        return None  # a one-line error already (a GGUF that will not convert): it says what went wrong
    for e in _chain(exc):
        if isinstance(e, OSError) or any(t in str(e) for t in _WRITER_FAILURE_TEXTS):
            # the writer lost the errno: a disk left (nearly) without room is what stopped it
            return "full" if free_at_failure is not None and free_at_failure < NEARLY_FULL else "failed"
    return None


def free_space(path: str | os.PathLike) -> int | None:
    """Bytes free to this user on the filesystem that holds ``path`` (or its nearest existing parent)."""
    path = Path(path).absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def tree_size(path: str | os.PathLike) -> int:
    """Bytes in a file, or in every file under a dir (0 for a missing path)."""
    path = Path(path)
    try:
        if not path.is_dir():
            return path.stat().st_size if path.exists() else 0
    except OSError:
        return 0
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue  # removed meanwhile
    return total


def describe_bytes(n: int | None) -> str:
    """``12.3 MB``-style size (decimal units, as df -H prints them)."""
    if n is None:
        return "an unknown amount"
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def remove_path(path: str | os.PathLike) -> None:
    """Remove a partial output, file or dir; one already gone is fine."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_failure(exc: BaseException, path: str | os.PathLike, *, what: str, hint: str = DEFAULT_HINT,
                  needed: int | None = None, partial: str | os.PathLike | None = None) -> WriteFailed | None:
    """The one-line error for ``exc`` raised while writing ``what`` to ``path``, or None when ``exc`` is
    not a failed write (a bug or a bad input: the caller re-raises it). ``partial`` (a temp file or dir, a
    half-written checkpoint) is measured and removed first, so the free space named is what is left."""
    if isinstance(exc, WriteFailed):
        return exc  # reported where it happened, with that writer's numbers
    kind = write_failure_kind(exc, free_space(partial if partial is not None else path))
    if kind is None:
        return None
    written = None
    if partial is not None and Path(partial).exists():
        written = tree_size(partial)
        remove_path(partial)
    return build_write_error(kind, path, what=what, hint=hint, needed=needed, written=written,
                             free=free_space(path), reason=first_line(exc))


def build_write_error(kind: str, path, *, what: str, hint: str, needed: int | None = None,
                      written: int | None = None, free: int | None = None, reason: str = "") -> WriteFailed:
    amounts = []
    if needed is not None:
        amounts.append(f"needs ~{describe_bytes(needed)}")
    if written is not None:
        amounts.append(f"{describe_bytes(written)} written before it failed, removed")
    amounts.append(f"{describe_bytes(free)} free there")
    if kind == "full":
        return DiskFull(f"{path}: out of disk space writing {what} ({'; '.join(amounts)}): {hint}",
                        path=path, needed=needed, written=written, free=free)
    return WriteFailed(f"{path}: could not write {what} ({reason}; {'; '.join(amounts)}): {hint}",
                       path=path, needed=needed, written=written, free=free)


@contextlib.contextmanager
def reporting_write_failures(path: str | os.PathLike, *, what: str, hint: str = DEFAULT_HINT,
                             needed: int | None = None, partial: str | os.PathLike | None = None):
    """Run a block of writes; a failed write in it (full disk, I/O error, a C++/Rust writer's lost errno)
    becomes one ``WriteFailed``/``DiskFull`` line with ``partial`` removed. Anything else passes unchanged."""
    try:
        yield
    except Exception as exc:
        error = write_failure(exc, path, what=what, hint=hint, needed=needed, partial=partial)
        if error is None:
            raise
        if error is exc:
            raise
        raise error from exc


def _temp_beside(path: Path) -> Path:
    # unique per process and call: two writers of one file never share a temp file
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, *, what: str | None = None, hint: str = DEFAULT_HINT):
    """Yield a temp path beside ``path`` for a writer that takes a file name (matplotlib's savefig); once
    the block ends it is given the umask's mode, fsynced and renamed over ``path``. A failed block leaves
    ``path`` as it was and no temp file; a full disk is one ``DiskFull`` line."""
    path = Path(path)
    tmp = _temp_beside(path)
    try:
        with reporting_write_failures(path, what=what or path.name, hint=hint, partial=tmp):
            yield tmp
            honour_umask(tmp)
            fsync_file(tmp)
            os.replace(tmp, path)
            fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomically(path: str | os.PathLike, text: str, *, hint: str = DEFAULT_HINT) -> None:
    """Write ``text`` (UTF-8) to a temp file beside ``path``, then rename it over ``path``; durable
    (file fsynced before the rename, its directory after) and with the umask's mode. Out of space:
    one ``DiskFull`` line (``hint``: what the caller's user should do), ``path`` untouched."""
    path = Path(path)
    tmp = _temp_beside(path)
    try:
        with open(tmp, "w", encoding="utf-8") as handle:  # open() applies the umask: 0644 under 022
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        if not is_disk_full(exc):
            raise  # the callers name their own fix for an unwritable place
        written = tree_size(tmp)
        remove_path(tmp)
        raise build_write_error("full", path, what=path.name, hint=hint, needed=len(text.encode("utf-8")),
                                written=written, free=free_space(path)) from exc
    finally:
        if tmp.exists():
            tmp.unlink()


def write_files_atomically(texts: dict, *, hint: str = DEFAULT_HINT) -> None:
    """Write several files that belong together (an eval's per-item log and its summary): every temp file
    is written first, then all are renamed into place. Out of space, no file is replaced: an earlier
    complete pair stays a pair, never a new log beside an old summary."""
    temps: list[tuple[Path, Path]] = []
    try:
        for path, text in texts.items():
            path = Path(path)
            tmp = _temp_beside(path)
            temps.append((tmp, path))
            try:
                with open(tmp, "w", encoding="utf-8") as handle:
                    handle.write(text)
                    handle.flush()
                    os.fsync(handle.fileno())
            except OSError as exc:
                if not is_disk_full(exc):
                    raise
                written = sum(tree_size(t) for t, _ in temps)
                for t, _ in temps:
                    remove_path(t)
                needed = sum(len(str(t).encode("utf-8")) for t in texts.values())
                raise build_write_error("full", path, what=path.name, hint=hint, needed=needed,
                                        written=written, free=free_space(path)) from exc
        for tmp, path in temps:
            os.replace(tmp, path)
        for parent in dict.fromkeys(path.parent for _, path in temps):
            fsync_dir(parent)
    finally:
        for tmp, _ in temps:
            if tmp.exists():
                tmp.unlink()


# The signals mathtune turns into a clean stop (Ctrl-C, and SIGTERM from a scheduler or `timeout`).
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def append_whole(sink, text: str, *, hint: str = DEFAULT_HINT) -> None:
    """Append ``text`` (whole lines) to the open file ``sink``, flushed and fsynced, with SIGINT and SIGTERM
    held until it is on disk: Python runs a signal handler inside a write that the signal interrupts
    (the raw write returns EINTR), so a handler that raises would leave a torn last line, a file no JSON
    Lines reader takes. Held, the signal's handler runs once the lines are whole.

    Written to the file descriptor (after flushing what ``sink`` buffered), so that a write the disk
    cannot take is cut back to the file's earlier end: the lines before stay whole, and no buffered
    remainder is flushed later at a wrong place. Out of space: one ``DiskFull`` line with ``hint``."""
    data = text.encode(getattr(sink, "encoding", None) or "utf-8") if isinstance(text, str) else text
    with stop_signals_held():
        sink.flush()
        fd = sink.fileno()
        start = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]  # a short write (the disk filling) continues, then fails
            os.fsync(fd)
        except OSError as exc:
            written = os.fstat(fd).st_size - start
            os.ftruncate(fd, start)  # the partial lines go: the file ends with the last whole write
            if not is_disk_full(exc):
                raise
            path = getattr(sink, "name", "the output file")
            raise build_write_error("full", path, what=f"{len(data)} bytes of lines", hint=hint, needed=len(data),
                                    written=written, free=free_space(path)) from exc


@contextlib.contextmanager
def stop_signals_held():
    """Run the block with SIGINT/SIGTERM's Python handlers deferred to its end.

    Why not ``pthread_sigmask``: the mask is per thread, and a signal sent to the process (``kill``,
    ``timeout``, a scheduler) goes to any thread that does not block it -- torch's intra-op threads, a
    tokenizer's -- whose C-level handler flags it for the main thread, which then runs the Python handler
    mid-write anyway. Swapping the Python handler holds the signal whichever thread the kernel picked.
    Python handlers run in the main thread only, so elsewhere no handler can interrupt the block."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {}
    for signum in STOP_SIGNALS:
        handler = signal.getsignal(signum)
        if handler is None or handler is signal.SIG_IGN:  # set from C (cannot be put back) or ignored anyway
            continue
        previous[signum] = signal.signal(signum, lambda received, frame: caught.append(received))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(caught):  # each once, in arrival order, to the handler it was meant for
            signal.raise_signal(signum)
