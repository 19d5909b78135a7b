"""Progress of long jobs (generation, rft, export, the one-time GGUF conversion), on a terminal and in logs.

    with progress_reporter(total=400, description="generating", unit="seq") as report:
        report.update(items=3, tokens=180)      # after every chunk of work; either count may be 0

    with phase("export: writing safetensors (fp32)"):   # work without an item count
        model.save_pretrained(path)

On a terminal ``progress_reporter`` is the usual tqdm bar. When stderr is a file or a pipe (nohup, CI,
``2> log``) a redrawn bar is useless (tqdm writes ``\\r``-separated redraws onto one line) and tqdm's
own choice there, ``disable=None``, is silence, which leaves an hour-long eval with no sign of life. So
off a terminal it prints one plain line whenever ``interval_s`` (30 s) have passed or ``fraction``
(10%) of the items have finished since the last line, whichever comes first, then a final line:

    generating: 120/400 seq (30%), 850 tok/s, 01:02 elapsed, ETA 02:25
    generating: 400/400 seq (100%), 850 tok/s, done in 03:27

Why not a tqdm option: tqdm prints when ``miniters`` items AND ``mininterval`` seconds have passed
(``tqdm.update``), never on "either", and redraws in place; the lines here are written by hand, with
tqdm's own ``format_interval`` for the times. ``phase`` prints a start line, a "still running" line
every ``interval_s`` from a daemon thread (the work inside blocks in library code that reports
nothing), and an end line with the time taken. Clocks are injectable, so tests need no sleeping.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import Callable, Iterator, TextIO

INTERVAL_S = 30.0  # a log line at least this often...
FRACTION = 0.1  # ...or every time this share of the items has finished, whichever comes first


def _interval(seconds: float) -> str:
    from tqdm import tqdm

    return tqdm.format_interval(max(0.0, seconds))


class _Closes:
    """``with reporter: ...`` closes it (the final line) on the way out, errors included."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Silent(_Closes):
    """``enabled=False``: the API and ``mathtune ask`` draw nothing into the caller's output."""

    def update(self, items: int = 0, tokens: int = 0) -> None:
        pass

    def close(self) -> None:
        pass


class _TerminalBar(_Closes):
    """tqdm's bar, with the caller's tokens shown as a tok/s postfix."""

    def __init__(self, total: int | None, description: str, unit: str, file: TextIO, clock: Callable[[], float]):
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, desc=description, unit=unit, file=file, leave=False, dynamic_ncols=True)
        self._clock = clock
        self._start = clock()
        self._tokens = 0

    def update(self, items: int = 0, tokens: int = 0) -> None:
        self._tokens += tokens
        if tokens:
            elapsed = self._clock() - self._start
            self._bar.set_postfix_str(f"{self._tokens / elapsed:.0f} tok/s" if elapsed > 0 else "", refresh=False)
        self._bar.update(items)

    def close(self) -> None:
        self._bar.close()


class LogLines(_Closes):
    """Off a terminal: a plain line every ``interval_s`` or every ``fraction`` of ``total`` items."""

    def __init__(self, total: int | None, description: str, unit: str = "it", *, file: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic, interval_s: float = INTERVAL_S,
                 fraction: float = FRACTION):
        self.total, self.description, self.unit = total, description, unit
        self._file = file
        self._clock = clock
        self._interval_s = interval_s
        # e.g. 1,319 GSM8K items x 10% = a line at least every 131.9 items
        self._every_items = fraction * total if total else None
        self._start = self._last_time = clock()
        self.items = self._last_items = 0
        self.tokens = 0
        self._closed = False

    def update(self, items: int = 0, tokens: int = 0) -> None:
        self.items += items
        self.tokens += tokens
        now = self._clock()
        due_by_time = now - self._last_time >= self._interval_s
        due_by_items = self._every_items is not None and self.items - self._last_items >= self._every_items
        if (due_by_time or due_by_items) and self.items < (self.total or float("inf")):
            self._write(self._line(now, final=False))
            self._last_time, self._last_items = now, self.items

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._write(self._line(self._clock(), final=True))

    def _line(self, now: float, final: bool) -> str:
        elapsed = now - self._start
        parts = [f"{self.items}/{self.total} {self.unit} ({100 * self.items / self.total:.0f}%)" if self.total
                 else f"{self.items} {self.unit}"]
        if self.tokens and elapsed > 0:
            parts.append(f"{self.tokens / elapsed:.0f} tok/s")
        if final:
            finished = self.total is None or self.items >= self.total
            parts.append(f"{'done in' if finished else 'stopped after'} {_interval(elapsed)}")
        else:
            parts.append(f"{_interval(elapsed)} elapsed")
            if self.total and self.items:
                # the average so far: items finish in bursts (a batch at a time), so a recent rate swings
                parts.append(f"ETA {_interval(elapsed / self.items * (self.total - self.items))}")
        return f"{self.description}: " + ", ".join(parts)

    def _write(self, line: str) -> None:
        file = self._file or sys.stderr  # looked up now: pytest and callers swap sys.stderr
        print(line, file=file, flush=True)


def is_terminal(file: TextIO) -> bool:
    isatty = getattr(file, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def progress_reporter(total: int | None, description: str, unit: str = "it", *, enabled: bool | None = None,
                      file: TextIO | None = None, clock: Callable[[], float] = time.monotonic,
                      interval_s: float = INTERVAL_S, fraction: float = FRACTION) -> "LogLines | _TerminalBar | _Silent":
    """A tqdm bar on a terminal, ``LogLines`` elsewhere, nothing with ``enabled=False``.

    ``enabled=None`` and ``True`` mean the same (kept for callers that pass a tri-state flag).
    """
    if enabled is False:
        return _Silent()
    stream = file or sys.stderr
    if is_terminal(stream):
        return _TerminalBar(total, description, unit, stream, clock)
    return LogLines(total, description, unit, file=file, clock=clock, interval_s=interval_s, fraction=fraction)


def _print_to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@contextlib.contextmanager
def phase(description: str, *, write: Callable[[str], None] | None = None,
          clock: Callable[[], float] = time.monotonic, interval_s: float = INTERVAL_S,
          wait: Callable[[float], bool] | None = None) -> Iterator[None]:
    """Lines for one step without an item count: start, "still running" every ``interval_s``, end.

    ``write`` receives each line (default: stderr). ``wait(seconds) -> stop?`` paces the heartbeat;
    the default waits on an event that the end of the step sets (tests pass a fake one).
    """
    write = write or _print_to_stderr
    stop = threading.Event()
    wait = wait or stop.wait
    start = clock()

    def heartbeat() -> None:
        while not wait(interval_s) and not stop.is_set():
            write(f"{description}: still running, {_interval(clock() - start)} elapsed")

    write(f"{description} ...")
    thread = threading.Thread(target=heartbeat, name="mathtune-progress", daemon=True)
    thread.start()
    try:
        yield
    except BaseException:
        stop.set()
        thread.join()
        write(f"{description}: stopped after {_interval(clock() - start)}")
        raise
    stop.set()
    thread.join()
    write(f"{description}: done in {_interval(clock() - start)}")
