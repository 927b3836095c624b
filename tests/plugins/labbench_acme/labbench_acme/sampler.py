"""The ACME PS1K power sampler, over a VISA resource (pyvisa: a TCP socket, or its serial port): labbench's
PowerMeter, the high-rate kind.

The PS1K samples one DC rail `rate_hz` times a second (1 kHz) and keeps the samples until the host
fetches them. Its commands, each answered with a sealed line (labbench_acme.wire):

    *IDN?   -> ACME,PS1K,<serial number>,<firmware>
    RATE?   -> RATE <Hz>
    START   -> STARTED <Hz>                      sampling (re)starts at index 0
    FETCH?  -> DATA <first> <n> <volts> <w>,<min>,<max>;...
               every sample completed since the last fetch: the mean, lowest and highest power (W)
               over its period
    STOP    -> STOPPED <samples taken>

A capture starts the sampler and fetches every `poll_interval_s` in a background thread. Each sample
becomes a PowerUpdate numbered by its index (`tick`), refreshed after the previous fetch was sent and
before this one's reply arrived; labbench.powertrace fits one clock to the numbered samples, which
places each on the host clock to a fraction of a sample. Each sample carries the datasheet's accuracy,
`accuracy_pct` of reading + `accuracy_floor_w`, and half its last printed digit. Replies are checked
before they become numbers: the seal, the first index (a skipped one means the sampler's buffer
overran), the count, finite values with min <= mean <= max, a positive voltage. A capture that fails
(a check, a silent instrument) stops, and leaving it raises the InstrumentError with what came before
it as `partial`.
"""

from __future__ import annotations

import bisect
import math
import re
import threading
import time
from collections.abc import Callable
from decimal import Decimal
from types import TracebackType
from typing import Any, Self

import pyvisa

from labbench.errors import InstrumentError
from labbench.powertrace import Mark, PowerTrace, PowerUpdate
from labbench.steps import step
from labbench_acme.wire import opened

_DATA = re.compile(r"DATA (\d+) (\d+) (\S+)(?: (\S+))?")


class Ps1k:
    """One PS1K (a single input, channel 1); see the module docstring."""

    def __init__(
        self,
        resource: str,
        *,
        name: str = "ps1k",
        rate_hz: float = 1000.0,
        timeout_s: float = 2.0,
        poll_interval_s: float = 0.02,
        accuracy_pct: float = 0.2,
        accuracy_floor_w: float = 20e-6,
    ):
        self.resource, self.name, self.rate_hz, self.timeout_s = resource, name, rate_hz, timeout_s
        self.update_period_s = 1.0 / rate_hz
        self.poll_interval_s = poll_interval_s
        self.accuracy_pct, self.accuracy_floor_w = accuracy_pct, accuracy_floor_w
        self._res: Any = None
        self._idn = ""
        self._io = threading.Lock()

    @classmethod
    def from_lab(cls, entry: Any, family: Any = None) -> Ps1k:
        return cls(entry.resource, name=entry.name, **entry.settings)

    def __repr__(self) -> str:
        return f"Ps1k({self.name!r}, {self.resource!r})"

    def open(self) -> Self:
        """Connect, and check the instrument is a PS1K sampling at `rate_hz`."""
        if self._res is not None:
            return self
        try:
            self._res = pyvisa.ResourceManager("@py").open_resource(
                self.resource,
                read_termination="\n",
                write_termination="\n",
                timeout=round(self.timeout_s * 1000),
            )
        except (pyvisa.Error, ValueError, OSError) as exc:
            raise InstrumentError(self.name, f"open {self.resource}", str(exc)) from None
        try:
            self._idn = self.query("*IDN?", re.compile(r"ACME,PS1K,[^,]+,[^,]+")).group(0)
            rate = float(self.query("RATE?", re.compile(r"RATE (\S+)")).group(1))
        except InstrumentError:
            self.close()
            raise
        if rate != self.rate_hz:
            self.close()
            raise InstrumentError(
                self.name, "RATE?", f"samples at {rate:g} Hz, lab.yaml says {self.rate_hz:g} Hz"
            )
        return self

    def close(self) -> None:
        res, self._res = self._res, None
        if res is not None:
            try:
                res.close()
            except (pyvisa.Error, OSError):
                pass  # the instrument already dropped the connection

    def identity(self) -> str:
        return self.open()._idn

    def capture(self, channel: int | str = 1) -> Ps1kCapture:
        if str(channel) != "1":
            raise InstrumentError(
                self.name, "capture", f"the PS1K has one input (channel 1), not {channel!r}"
            )
        return Ps1kCapture(self.open())

    def query(self, command: str, pattern: re.Pattern[str]) -> re.Match[str]:
        """`command`'s sealed reply, matching `pattern` as a whole."""
        with self._io:
            if self._res is None:
                raise InstrumentError(self.name, command, "not open")
            try:
                line = self._res.query(command)
            except (pyvisa.Error, OSError) as exc:
                raise InstrumentError(
                    self.name, command, f"no reply within {self.timeout_s:g} s: {exc}"
                ) from None
        text = opened(line)
        match = pattern.fullmatch(text) if text is not None else None
        if match is None:
            raise InstrumentError(self.name, command, f"unexpected reply {line[:120]!r}")
        return match

    def accuracy_w(self, power_w: float) -> float:
        return abs(power_w) * self.accuracy_pct / 100 + self.accuracy_floor_w


class Ps1kCapture:
    """A capture of the PS1K's samples (labbench.capabilities.PowerCapture)."""

    def __init__(self, meter: Ps1k):
        self.meter = meter
        self.instrument = meter.identity()
        self.failed = threading.Event()
        self.error: InstrumentError | None = None
        self._updates: list[PowerUpdate] = []
        self._next = 0  # the index of the next sample due
        self._after: list[float] = []  # each update's seen_after_s, ascending (for the waits)
        self._marks: list[Mark] = []
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        with step(self.meter.name, "capture start"):
            sent = time.monotonic()
            self.meter.query("START", re.compile(re.escape(f"STARTED {self.meter.rate_hz:g}")))
            self._thread = threading.Thread(
                target=self._poll, args=(sent,), name=f"{self.meter.name}-capture", daemon=True
            )
            self._thread.start()
            self._wait_for(lambda: bool(self._updates))
        if self.error is not None:
            self._finish()
            raise self.error
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        failed_before = self.failed.is_set()
        with step(self.meter.name, "capture stop", f"{len(self._updates)} samples"):
            if exc_type is None:
                self.wait_for_updates_after(max([time.monotonic()] + [m.t_s for m in self._marks]), 2)
            self._finish()
        if self.error is not None and (exc_type is None or (failed_before and isinstance(exc, Exception))):
            raise self.error
        return False

    def mark(self, label: str, t_s: float | None = None) -> float:
        t_s = time.monotonic() if t_s is None else t_s
        with self._lock:
            self._marks.append(Mark(label, t_s))
        return t_s

    def wait_for_updates_after(self, t_s: float, count: int = 1) -> None:
        self._wait_for(lambda: len(self._after) - bisect.bisect_right(self._after, t_s) >= count)

    @property
    def trace(self) -> PowerTrace:
        with self._lock:
            return PowerTrace(
                period_s=self.meter.update_period_s,
                updates=tuple(self._updates),
                marks=tuple(self._marks),
                instrument=self.instrument,
                fault=str(self.error) if self.error else None,
            )

    def _wait_for(self, condition: Callable[[], bool]) -> None:
        with self._lock:
            self._lock.wait_for(lambda: condition() or self.error is not None)

    def _poll(self, after_s: float) -> None:
        """Fetch until stopped: the samples of each reply were completed after the previous fetch was
        sent (`after_s`; START's for the first) and before the reply arrived."""
        try:
            while not self._stop.is_set():
                sent = time.monotonic()
                data = self.meter.query("FETCH?", _DATA)
                self._record(self._samples(data, after_s, time.monotonic()))
                after_s = sent
                self._stop.wait(self.meter.poll_interval_s)
        except InstrumentError as exc:
            self._fail(exc)
        except (ValueError, ArithmeticError) as exc:  # a number that does not parse
            self._fail(InstrumentError(self.meter.name, "FETCH?", f"unreadable reply: {exc}"))

    def _samples(self, data: re.Match[str], after_s: float, by_s: float) -> list[PowerUpdate]:
        first, n, volts, values = int(data.group(1)), int(data.group(2)), data.group(3), data.group(4) or ""
        if first != self._next:
            raise InstrumentError(
                self.meter.name,
                "FETCH?",
                f"sample {first} follows sample {self._next - 1}: "
                "samples lost (the sampler's buffer overran)",
            )
        triples = [s.split(",") for s in values.split(";") if s]
        v = float(volts)
        if len(triples) != n or any(len(t) != 3 for t in triples) or not (math.isfinite(v) and v > 0):
            raise InstrumentError(
                self.meter.name,
                "FETCH?",
                f"{n} samples announced at {volts} V, {len(triples)} given: {data.group(0)[:120]!r}",
            )
        return [self._update(first + i, t, v, after_s, by_s) for i, t in enumerate(triples)]

    def _update(self, tick: int, tokens: list[str], volts: float, after_s: float, by_s: float) -> PowerUpdate:
        mean, low, high = map(float, tokens)
        rounding = max(_half_digit(t) for t in tokens)
        if not all(map(math.isfinite, (mean, low, high))) or not low - rounding <= mean <= high + rounding:
            raise InstrumentError(
                self.meter.name, "FETCH?", f"sample {tick}: mean {mean} W outside {low}..{high} W"
            )
        accuracy = self.meter.accuracy_w(high)
        return PowerUpdate(
            seen_after_s=after_s,
            seen_by_s=by_s,
            voltage_v=volts,
            current_a=mean / volts,
            power_w=mean,
            power_accuracy_w=self.meter.accuracy_w(mean),
            power_rounding_w=rounding,
            power_min_w=low,
            power_max_w=high,
            extremes_accuracy_w=accuracy,
            tick=tick,
        )

    def _record(self, updates: list[PowerUpdate]) -> None:
        with self._lock:
            if self.error is None:
                self._updates += updates
                self._next += len(updates)
                self._after += [u.seen_after_s for u in updates]
                self._lock.notify_all()

    def _fail(self, error: InstrumentError) -> None:
        with self._lock:
            if self.error is None:
                self.error = error
            self._lock.notify_all()
        self.failed.set()

    def _finish(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.meter.timeout_s + 1.0)
        if self.error is None:
            try:
                self.meter.query("STOP", re.compile(r"STOPPED \d+"))
            except InstrumentError as exc:
                self._fail(exc)
        if self.error is not None:
            self.error.partial = self.trace


def _half_digit(token: str) -> float:
    """Half the last digit `token` was printed with (`1.234560e-01` -> 5e-8)."""
    exponent = Decimal(token).as_tuple().exponent
    return 0.5 * 10.0**exponent if isinstance(exponent, int) else 0.0
