"""A simulated ACME PS1K sampling a power bus channel (labbench_acme.sampler has its protocol), served
through labbench's LineServer: each sample is the exact mean, lowest and highest power over its period.
"""

from __future__ import annotations

import math
import threading
import time

from labbench.sim.faults import InstrumentFaults
from labbench.sim.lineserver import LineServer
from labbench.sim.powerbus import PowerChannel
from labbench_acme.wire import sealed

FIRMWARE = "1.0"


class Ps1kSim:
    """A simulated PS1K at host:port sampling `channel` (see labbench_acme.sampler for the protocol)."""

    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        channel: PowerChannel,
        *,
        rate_hz: float = 1000.0,
        buffer_s: float = 60.0,
    ):
        self.name, self.channel, self.rate_hz = name, channel, rate_hz
        self.buffer = math.ceil(buffer_s * rate_hz)
        self.server = LineServer(name, self._handle, host=host, port=port, use_pty=False, ack_tcp=False)
        self._lock = threading.Lock()
        self._started_s: float | None = None
        self._next = 0  # the next sample the host has not fetched

    def __repr__(self) -> str:
        return f"Ps1kSim({self.name!r} at {self.server.host}:{self.server.port})"

    @property
    def faults(self) -> InstrumentFaults:
        return self.server.faults

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    def _handle(self, line: str) -> str:
        command = line.strip().upper()
        with self._lock:
            if command == "*IDN?":
                return sealed(f"ACME,PS1K,SIM-{self.name},{FIRMWARE}")
            if command == "RATE?":
                return sealed(f"RATE {self.rate_hz:g}")
            if command == "START":
                self._started_s, self._next = time.monotonic(), 0
                return sealed(f"STARTED {self.rate_hz:g}")
            if command == "FETCH?" and self._started_s is not None:
                return sealed(self._fetch(time.monotonic()))
            if command == "STOP" and self._started_s is not None:
                self._started_s = None
                return sealed(f"STOPPED {self._next}")
            return sealed(f"ERR {command} not accepted now")

    def _fetch(self, now: float) -> str:
        """Every sample completed by `now` and not fetched yet (the newest `buffer` of them)."""
        period, t0 = 1.0 / self.rate_hz, self._started_s
        done = math.floor((now - t0) * self.rate_hz)
        first = max(self._next, done - self.buffer)
        samples = [self.channel.stats(t0 + k * period, t0 + (k + 1) * period) for k in range(first, done)]
        self._next = done
        values = ";".join(f"{s.mean_power_w:.6e},{s.min_power_w:.6e},{s.peak_power_w:.6e}" for s in samples)
        return f"DATA {first} {len(samples)} {self.channel.voltage_v:.6e}" + (f" {values}" if values else "")
