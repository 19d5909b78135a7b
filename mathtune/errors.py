"""Errors that reach the user as one line, never as a traceback.

Every input that can be wrong (a flag, a file line, a model spec) raises a ``MathtuneError`` whose
message names the culprit and the fix; ``mathtune.cli`` prints it as ``error: <message>`` and exits 1
(2 is argparse's usage-error code).
"""


class MathtuneError(Exception):
    """A user-facing failure: the message is the whole story (what was wrong and how to fix it)."""


class InputError(MathtuneError):
    """A problem in an input file, located as ``path:line``."""

    def __init__(self, path, line: int | None, reason: str):
        self.path = str(path)
        self.line = line
        if len(reason) > 300:  # a reason quoting the input (a 10 MB header) must stay one readable line
            reason = reason[:300] + "..."
        self.reason = reason
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {reason}")


class ConfigError(MathtuneError):
    """One or more invalid settings; the message lists every problem at once."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        if len(self.problems) == 1:
            super().__init__(self.problems[0])
        else:
            super().__init__(f"{len(self.problems)} problems: " + "; ".join(self.problems))


class WriteFailed(MathtuneError):
    """A write that failed (full disk, quota, I/O error) after its partial output was removed: the message
    names the path, the bytes needed or written, the free space left there, and what to do.
    ``mathtune.atomic`` builds these (``write_failure``); ``DiskFull`` when the space ran out."""

    def __init__(self, message: str, *, path, needed: int | None = None, written: int | None = None,
                 free: int | None = None):
        self.path = str(path)
        self.needed = needed
        self.written = written
        self.free = free
        super().__init__(message)


class DiskFull(WriteFailed):
    """The filesystem (or the user's quota) had no room for the write: ENOSPC / EDQUOT."""


class Terminated(BaseException):
    """SIGTERM outside training (which saves a checkpoint first, mathtune.interrupt): stop, exit 143.
    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` swallows it; raised by the
    handler ``mathtune.cli`` installs, caught by a command that reports what it kept (``mathtune rft``)."""


class TrainingHalted(MathtuneError):
    """A guard stopped training; the message names the likely cause and the fix."""

    def __init__(self, check: str, message: str, step: int | None = None, rank: int | None = None):
        self.check = check
        self.step = step
        self.rank = rank  # the process that saw it, in a multi-process run (mathtune.distributed)
        self.reason = message
        where = f" at step {step}" if step is not None else ""
        where += f" on rank {rank}" if rank is not None else ""
        super().__init__(f"{check}{where}: {message}")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (library errors often run to many lines), or its
    type name when the message is empty."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
