"""Meeting deadlines from Python threads: `Waker` sleeps until a deadline, aiming early by the lateness
its past sleeps showed, so that a run of deadlines is met on average instead of late by the
scheduler's wake-up delay and the interpreter's hand-over (0.1-0.5 ms on a loaded host, which would
otherwise add to every emulated link delay and server time)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

GAIN = 0.2  # weight of the newest lateness in the running estimate
MAX_EARLY_S = 0.002  # never aim earlier than this: a stall is not something to learn


class Waker:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self.early_s = 0.0  # how early it aims

    def until(self, deadline: float) -> None:
        """Return at `deadline` (on average over many calls); at once if it has passed."""
        with self._lock:
            early = self.early_s
        wait = deadline - self._clock() - early
        if wait <= 0:
            return
        time.sleep(wait)
        late = self._clock() - deadline
        with self._lock:
            self.early_s = min(MAX_EARLY_S, max(0.0, self.early_s + GAIN * late))
