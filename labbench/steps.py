"""Every hardware action as a timed step (labgrid's `@step` idea): flash, deploy, connect, identify,
upload, inference batches, capture start and stop, recoveries.

A step is timed on the host monotonic clock (the clock every measurement is mapped onto), logged
through `logging` (logger ``labbench.steps``, with the board as `record.board`) and kept in a
process-wide list, so a front door can show the steps a test caused as its timeline (`since`).
`BoardLogFiles` writes each board's steps to its own log file, beside the drivers' traffic logs.
Steps nest (a flash holds its identify); `depth` says how deep.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import wraps
from pathlib import Path
from typing import ParamSpec, TextIO, TypeVar

log = logging.getLogger("labbench.steps")
log.addHandler(logging.NullHandler())  # a library: the front door decides where steps go

P = ParamSpec("P")
R = TypeVar("R")


@dataclass
class Step:
    board: str
    name: str
    detail: str
    depth: int
    start_s: float  # host monotonic
    end_s: float | None = None  # None while it runs
    error: str | None = None

    @property
    def status(self) -> str:
        return "running" if self.end_s is None else "error" if self.error else "ok"

    @property
    def duration_s(self) -> float | None:
        return None if self.end_s is None else self.end_s - self.start_s

    def __str__(self) -> str:
        what = f"{self.name} {self.detail}".strip()
        if self.end_s is None:
            return f"{self.board}: {what}"
        return f"{self.board}: {what}: {self.status} in {self.duration_s:.3f} s" + (
            f" ({self.error})" if self.error else ""
        )


KEEP = 100_000  # steps kept for `since`; older ones are dropped (they are in the log)
_steps: list[Step] = []
_dropped = 0  # steps dropped from the front of `_steps`
_lock = threading.Lock()
_depth = threading.local()


def count() -> int:
    """How many steps have started so far (a mark for `since`)."""
    with _lock:
        return _dropped + len(_steps)


def since(mark: int) -> list[Step]:
    """The steps started after `mark` (from `count()`) and still kept, in the order they started."""
    with _lock:
        return list(_steps[max(0, mark - _dropped) :])


def _keep(new: Step) -> None:
    global _dropped
    with _lock:
        _steps.append(new)
        excess = len(_steps) - KEEP
        if excess > 0:
            del _steps[:excess]
            _dropped += excess


@contextmanager
def step(board: str, name: str, detail: str = "") -> Iterator[Step]:
    """Time the body as one step of `board`; an exception marks it failed and propagates."""
    depth = getattr(_depth, "n", 0)
    current = Step(board, name, detail, depth, time.monotonic())
    _keep(current)
    log.info("%s", current, extra={"board": board})
    _depth.n = depth + 1
    try:
        yield current
    except BaseException as exc:
        current.error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        current.end_s = time.monotonic()
        _depth.n = depth
        log.log(logging.WARNING if current.error else logging.INFO, "%s", current, extra={"board": board})


def stepped(name: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """A method as a step of its object's `board` (the method's first argument is `self`)."""

    def decorate(method: Callable[P, R]) -> Callable[P, R]:
        @wraps(method)
        def timed(*args: P.args, **kwargs: P.kwargs) -> R:
            with step(str(getattr(args[0], "board", "?")), name):
                return method(*args, **kwargs)

        return timed

    return decorate


class BoardLogFiles(logging.Handler):
    """Each board's step records to `<directory>/<board>-steps.log` (host monotonic time first)."""

    def __init__(self, directory: Path):
        super().__init__(logging.INFO)
        self.directory = directory
        self._files: dict[str, TextIO] = {}

    def emit(self, record: logging.LogRecord) -> None:
        board = str(getattr(record, "board", "") or "lab")
        try:
            out = self._files.get(board)
            if out is None:
                self.directory.mkdir(parents=True, exist_ok=True)
                path = self.directory / f"{board}-steps.log"
                out = self._files[board] = open(path, "a", buffering=1)  # noqa: SIM115 (open until close())
            out.write(f"{time.monotonic():.6f} {record.levelname} {record.getMessage()}\n")
        except OSError:
            self.handleError(record)

    def close(self) -> None:
        for out in self._files.values():
            out.close()
        self._files.clear()
        super().close()
