"""math-verify (Hugging Face's answer verifier: LaTeX -> sympy -> equivalence) run in a worker process
with a deadline, so that a pathological answer can never hang the caller.

math-verify bounds its own work with ``signal.alarm``, which only works in a process's main thread: a
sharded eval, a reward function called from a trainer's worker thread or any thread pool would get a
ValueError, and with its timeouts switched off, ``10^{10^{10}} - 10^{10^{10}} + 1`` compared with 1
runs sympy into Python big-integer arithmetic that no signal interrupts. So math-verify runs here in
a child process (``python -m mathtune.symbolic``, its own timeouts off), one JSON request and answer
per line; the caller waits at most ``timeout`` seconds for the answer, and past that the child is
killed (the next call starts a new one) and the pair is judged wrong with a note. Any thread may
call; calls are serialised by one lock (a judgement takes milliseconds; sampling dominates).

The child also caps its address space (``MEMORY_LIMIT``): an answer that would build a gigabyte
integer gets a MemoryError, which math-verify turns into "not equal", instead of swapping the machine.

Only strings cross the pipe: the gold and the answer as LaTeX in, the verdict and the parsed forms
(sympy's ``str``) out. ``math_verify`` is imported in the child only, so importing mathtune (and
``mathtune --help``) never loads sympy.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import selectors
import subprocess
import sys
import threading
from dataclasses import dataclass

from mathtune.errors import MathtuneError

TIMEOUT_S = 5.0  # per parse or verify; math-verify's own default per operation
STARTUP_TIMEOUT_S = 120.0  # importing sympy + math-verify: ~1 s idle, far longer on a loaded machine
MEMORY_LIMIT = 2 << 30  # bytes of address space for the child (it needs ~70 MB)


@dataclass(frozen=True)
class Verdict:
    """math-verify's answer for one gold/prediction pair, or why there is none."""

    correct: bool
    gold_parsed: str | None  # str() of math-verify's first parse of the gold; None: nothing parsed
    parsed: str | None  # the same for the prediction
    note: str | None = None  # set when the verdict is not math-verify's own: timed out, worker died


class SymbolicError(MathtuneError):
    """The worker could not be started (math-verify missing or broken)."""


def boxed(answer: str) -> str:
    """The answer wrapped as ``\\boxed{...}``: math-verify's extraction reads LaTeX only inside math
    delimiters or a box, and a box holds any balanced content (``$`` around it is presentation)."""
    return "\\boxed{" + answer.strip().strip("$").strip() + "}"


class _Worker:
    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._pid = os.getpid()
        atexit.register(self.close)  # reaped, not left to end when its stdin closes

    def _forked(self) -> None:
        """A forked child (a DataLoader worker, a launcher) shares its parent's pipes: it starts its own."""
        if self._pid != os.getpid():
            self._proc, self._lock, self._pid = None, threading.Lock(), os.getpid()

    def _start(self) -> subprocess.Popen:
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        proc = subprocess.Popen([sys.executable, "-m", "mathtune.symbolic"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True, bufsize=1)
        line = self._read_line(proc, STARTUP_TIMEOUT_S)
        if line is None or json.loads(line).get("ready") is not True:
            self._kill(proc)
            raise SymbolicError("the math-verify worker did not start: install it with pip install "
                                "'math-verify>=0.9,<1' (python -c 'import math_verify' shows the cause)")
        return proc

    @staticmethod
    def _read_line(proc: subprocess.Popen, timeout: float) -> str | None:
        """One line from the child within ``timeout`` seconds; None when it is late or gone."""
        selector = selectors.DefaultSelector()
        selector.register(proc.stdout, selectors.EVENT_READ)
        try:
            if not selector.select(timeout):
                return None
            line = proc.stdout.readline()  # the child writes whole lines, flushed: this does not block
            return line or None
        finally:
            selector.close()

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            stream.close()

    def ask(self, request: dict, timeout: float) -> dict | None:
        """The child's answer to ``request``; None when it took longer than ``timeout`` seconds or died
        (the child is then killed and replaced on the next call)."""
        self._forked()
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = self._start()
            proc = self._proc
            try:
                proc.stdin.write(json.dumps(request) + "\n")
                proc.stdin.flush()
                line = self._read_line(proc, timeout)
            except (BrokenPipeError, OSError):
                line = None
            try:
                return json.loads(line) if line is not None else None
            except json.JSONDecodeError:
                line = None  # not our protocol: something in the child printed to stdout
            finally:
                if line is None:
                    self._kill(proc)
                    self._proc = None

    def close(self) -> None:
        if self._pid != os.getpid():
            return  # the parent's worker: not this process's to stop
        with self._lock:
            if self._proc is not None:
                self._kill(self._proc)
                self._proc = None


_WORKER = _Worker()


# Cached (the timeout is part of the key): eval judges one pair more than once (the answer, then the
# majority vote, maj@j), and a pair that timed out would otherwise cost its full timeout each time.
@functools.lru_cache(maxsize=1 << 16)
def verify(gold: str, prediction: str, timeout: float | None = None) -> Verdict:
    """``math_verify.verify(parse(gold), parse(prediction))`` with default settings, both texts as given
    (wrap a bare answer with ``boxed``), cut off after ``timeout`` seconds (default ``TIMEOUT_S``, read
    at the call) and then judged wrong, with a note."""
    timeout = TIMEOUT_S if timeout is None else timeout
    reply = _WORKER.ask({"gold": gold, "prediction": prediction}, timeout)
    if reply is None:
        return Verdict(False, None, None, f"math-verify gave no verdict within {timeout:g} s: judged wrong")
    if "error" in reply:
        return Verdict(False, None, None, f"math-verify failed ({reply['error']}): judged wrong")
    return Verdict(bool(reply["correct"]), reply["gold_parsed"], reply["parsed"])


@functools.lru_cache(maxsize=1 << 16)
def parse(text: str, timeout: float | None = None) -> str | None:
    """``str`` of math-verify's parse of ``text`` (its first, sympy, form); None when it yields no
    sympy expression (only its string fallback, or nothing) or takes longer than ``timeout``."""
    reply = _WORKER.ask({"parse": text}, TIMEOUT_S if timeout is None else timeout)
    return None if reply is None else reply.get("parsed")


def shutdown() -> None:
    """Stop the worker (tests; it also ends with this process, its stdin closing)."""
    _WORKER.close()


# --------------------------------------------------------------------------- the child
def _first_form(parsed: list) -> str | None:
    """str() of the first sympy object math-verify parsed; its string fallback does not count."""
    for item in parsed:
        if not isinstance(item, str):
            return str(item)
    return None


def _serve() -> None:
    import logging
    import resource

    try:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    except (ValueError, OSError):  # a lower hard limit already set: keep it
        pass
    from math_verify import parse as mv_parse, verify as mv_verify

    # timeouts off in here (the parent's deadline bounds each request), so its "timeout disabled"
    # warning is expected; errors inside math-verify already become "not equal"
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    print(json.dumps({"ready": True}), flush=True)
    golds: dict[str, list] = {}  # a gold is compared with k samples: parse it once
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if "parse" in request:
                reply = {"parsed": _first_form(mv_parse(request["parse"], parsing_timeout=None))}
            else:
                gold = golds.get(request["gold"])
                if gold is None:
                    gold = golds[request["gold"]] = mv_parse(request["gold"], parsing_timeout=None)
                    if len(golds) > 4096:
                        golds.pop(next(iter(golds)))
                prediction = mv_parse(request["prediction"], parsing_timeout=None)
                reply = {"correct": bool(mv_verify(gold, prediction, timeout_seconds=None)),
                         "gold_parsed": _first_form(gold), "parsed": _first_form(prediction)}
        except Exception as err:  # noqa: BLE001 -- e.g. sympy failing in str(): the caller gets the cause
            reply = {"error": f"{type(err).__name__}: {str(err)[:200]}"}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    _serve()
