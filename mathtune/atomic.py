"""Whole-or-nothing, durable writes with the permissions of any file the user writes.

A rename is atomic but not durable by itself: after a power cut the directory entry may point at a
file whose data never reached the disk (ext4/xfs delayed allocation). So the data is fsynced before
the rename and the directory after it. And files come out as the umask says (0644 under umask
022): libraries that write through a private temp file (safetensors does) leave 0600 files behind,
unreadable to the other users of a shared run or cache dir.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import uuid
from pathlib import Path


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


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to a temp file beside ``path``, then rename it over ``path``; durable
    (file fsynced before the rename, its directory after) and with the umask's mode."""
    path = Path(path)
    # unique per process and call: two writers of one file never share a temp file
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:  # open() applies the umask: 0644 under 022
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


# The signals mathtune turns into a clean stop (Ctrl-C, and SIGTERM from a scheduler or `timeout`).
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def append_whole(sink, text: str) -> None:
    """Append ``text`` (whole lines) to the open file ``sink``, flushed and fsynced, with SIGINT and SIGTERM
    held until it is on disk: Python runs a signal handler inside a write that the signal interrupts
    (the raw write returns EINTR), so a handler that raises would leave a torn last line, a file no JSON
    Lines reader takes. Held, the signal's handler runs once the lines are whole."""
    with stop_signals_held():
        sink.write(text)
        sink.flush()
        os.fsync(sink.fileno())


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
