"""Fault injection for the simulated lab: what a bad cable, a hung instrument or a flaky network does.

A fault is a mapping with a `kind` and the keys that kind takes. It comes from lab.yaml (a list under
a board's or an instrument's `sim: {faults: [...]}`, armed when the lab starts) or from the sim's
control socket at run time (`SimControl.fault_set(target, spec)`, armed at once). Which kinds apply
depends on the link the target is reached by:

Serial boards (the RFC 2217 port; `direction` is `to_host`, the default, or `to_device`):
- `drop`: bytes never arrive. `rate: 0.001` drops each byte with that probability (seeded by `seed`,
  default 0, so a run is reproducible); `pattern: "m-lap-us-", nth: 3, offset: 9, length: 1` drops
  `length` bytes from `offset` bytes after the start of the n-th occurrence of `pattern`.
- `corrupt`: as `drop`, but the bytes arrive XORed with `xor` (default: one random bit per byte).
- `garbage`: a garbage line (`text`, default 12 random bytes 0x80-0xFF, then CR LF) reaches the host
  after the line that holds the n-th `pattern`, or after each line end with probability `rate`.
- `silence`: nothing passes in `direction`, from when it is armed or from the end of the n-th
  `pattern`, for `duration_s` (default: until cleared).
- `reset`: the DUT is reset `delay_s` after the last byte of the n-th `pattern` (a command sent to
  the device by default; `direction: to_host` matches what the DUT prints) reached its receiver.

Instruments (SCPI lines; `pattern` is a case-insensitive substring of a command line):
- `silence`: commands get no reply and are not executed; the connection stays open. From when it is
  armed or from the n-th command matching `pattern`, for `duration_s` (default: until cleared).
- `disconnect`: the TCP connection is closed: all of them when armed, or the one that sends the n-th
  command matching `pattern` (which then gets no reply). New connections are accepted.

SSH boards (a loopback proxy in front of sshd; `direction` is `to_host` (board -> bench),
`to_device` or `both`, the default):
- `disconnect`: every proxied connection is closed: when armed, `after_s` later, or when byte
  `after_bytes + 1` (counted in `direction` from when it was armed) would pass.
- `throttle`: `direction` carries at most `bytes_per_s`.
- `stall`: nothing passes in `direction` (nothing is lost either) once `after_bytes` (default 0) have
  passed, for `duration_s` (default: until cleared).

Pattern faults act once (then they are spent); rate faults act until cleared. Byte positions count
the bytes of a direction since the lab started (to_host: only while a client is connected). Every
injection is logged with its time (host monotonic s) and where it hit, e.g. for `corrupt`
`{"t": ..., "fault": 2, "kind": "corrupt", "direction": "to_host", "at": 1093, "was": "7", "now": "6"}`;
`Injector.report()` (the control socket's `faults` op) returns the armed faults and that log.
"""

from __future__ import annotations

import math
import random
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from itertools import count
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from labbench.errors import LabConfigError, UsageError
from labbench.yamlsource import KeyPath, describe

Link = Literal["serial", "instrument", "ssh"]
LOG_LIMIT = 10_000
PATTERN_MAX = 64
THROTTLE_SLICE_S = 0.05  # a throttled direction sends at most this long's worth of bytes at once
_POLL_S = 0.2


class FaultSpecError(LabConfigError):
    """A fault specification is malformed or does not apply to its target."""


class Fault(BaseModel):
    """One fault as written in lab.yaml or sent to the control socket (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["drop", "corrupt", "garbage", "silence", "reset", "disconnect", "throttle", "stall"]
    direction: Literal["to_host", "to_device", "both"] | None = None
    rate: float | None = Field(None, gt=0, le=1)
    pattern: str | None = Field(None, min_length=1, max_length=PATTERN_MAX)
    nth: int = Field(1, ge=1)
    offset: int = Field(0, ge=0)
    length: int = Field(1, ge=1)
    xor: int | None = Field(None, ge=1, le=255)
    text: str | None = None
    seed: int = 0
    delay_s: float = Field(0.0, ge=0)
    duration_s: float | None = Field(None, gt=0)
    after_bytes: int | None = Field(None, ge=0)
    after_s: float | None = Field(None, ge=0)
    bytes_per_s: float | None = Field(None, gt=0)

    def spec(self) -> dict[str, Any]:
        """The keys as given (JSON-friendly)."""
        return {"kind": self.kind} | self.model_dump(exclude_unset=True)


_PATTERN_KEYS = {"pattern", "nth"}
_BYTE_KEYS = {"direction", "rate", "seed", "offset", "length"} | _PATTERN_KEYS
#: link -> kind -> the keys (besides kind) that kind takes there
KINDS: dict[str, dict[str, set[str]]] = {
    "serial": {
        "drop": _BYTE_KEYS,
        "corrupt": _BYTE_KEYS | {"xor"},
        "garbage": {"rate", "seed", "text"} | _PATTERN_KEYS,
        "silence": {"direction", "duration_s"} | _PATTERN_KEYS,
        "reset": {"direction", "delay_s"} | _PATTERN_KEYS,
    },
    "instrument": {
        "silence": {"duration_s"} | _PATTERN_KEYS,
        "disconnect": _PATTERN_KEYS,
    },
    "ssh": {
        "disconnect": {"direction", "after_bytes", "after_s"},
        "throttle": {"direction", "bytes_per_s"},
        "stall": {"direction", "after_bytes", "duration_s"},
    },
}
_LINK_NAMES = {"serial": "a serial board", "instrument": "an instrument", "ssh": "an SSH board"}


def check(fault: Fault, link: Link) -> list[tuple[tuple[str, ...], str]]:
    """What is wrong with `fault` on a target reached by `link`: (key path in the fault, message) pairs."""
    kinds = KINDS[link]
    if fault.kind not in kinds:
        return [
            (("kind",), f'{_LINK_NAMES[link]} has no "{fault.kind}" fault (its faults: {", ".join(kinds)})')
        ]
    allowed = kinds[fault.kind]
    given = fault.model_fields_set - {"kind"}
    takes = f"does not apply to a {fault.kind} fault of {_LINK_NAMES[link]} (it takes: {', '.join(sorted(allowed))})"
    problems: list[tuple[tuple[str, ...], str]] = [((key,), takes) for key in sorted(given - allowed)]
    if problems:
        return problems
    if link == "serial" and fault.direction == "both":
        problems.append((("direction",), "a serial fault acts on one direction: to_host or to_device"))
    if fault.pattern is None:
        problems += [
            ((key,), "applies only with pattern:") for key in sorted(given & {"nth", "offset", "length"})
        ]
        if fault.kind == "reset":
            problems.append((("pattern",), "required key is missing"))
    if "rate" in allowed and "pattern" in allowed:
        if fault.rate is None and fault.pattern is None:
            problems.append(((), f"a {fault.kind} fault needs rate: or pattern:"))
        elif fault.rate is not None and fault.pattern is not None:
            problems.append((("rate",), "give rate: or pattern:, not both"))
    for key in ("pattern", "text"):
        value = getattr(fault, key)
        if value is not None and not _is_latin1(value):
            problems.append(((key,), "must be characters 0-255 (it is matched or sent as bytes)"))
    if fault.kind == "throttle" and fault.bytes_per_s is None:
        problems.append((("bytes_per_s",), "required key is missing"))
    if fault.after_bytes is not None and fault.after_s is not None:
        problems.append((("after_s",), "give after_bytes: or after_s:, not both"))
    return problems


def _is_latin1(text: str) -> bool:
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


def parse(spec: Any, link: Link, target: str) -> Fault:
    """A fault from a control-socket request; FaultSpecError naming the target and each bad key."""
    problems: Sequence[tuple[KeyPath, str]]
    try:
        fault = Fault.model_validate(spec)
    except ValidationError as exc:
        problems = [describe(err, Fault) for err in exc.errors()]
    else:
        problems = check(fault, link)
    if problems:
        raise FaultSpecError(f"{target}: " + "; ".join(_message(key, message) for key, message in problems))
    return fault


def _message(loc: tuple, message: str) -> str:
    return f"{'.'.join(str(p) for p in loc)}: {message}" if loc else message


class _Armed:
    """A fault in force and what it has done so far."""

    def __init__(self, fault_id: int, fault: Fault, direction: str | None):
        self.id, self.fault, self.direction = fault_id, fault, direction
        self.armed_t = time.monotonic()
        self.rng = random.Random(fault.seed)
        self.injected = 0
        self.done = False
        self.seen = 0  # occurrences of the pattern so far
        self.hit: tuple[int, int] | None = None  # stream span of the n-th occurrence
        self.position: int | None = None  # the direction's byte count when armed (serial, ssh)
        self.next_at = 0  # the next byte a rate fault hits
        self.since: float | None = None  # where (serial: position) or when a silence/stall began
        self.until = math.inf  # when a silence/stall ends
        self.timers: list[threading.Timer] = []

    @property
    def way(self) -> str:
        """`direction` of a fault on a serial line or an SSH proxy, which always has one."""
        assert self.direction is not None, f"fault {self.id} has no direction"
        return self.direction

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "spec": self.fault.spec(),
            "direction": self.direction,
            "armed": self.armed_t,
            "position": self.position,
            "injected": self.injected,
            "spent": self.done,
        }


class Injector:
    """The faults armed on one target and the log of what they did; subclasses inject them."""

    link: ClassVar[Link]

    def __init__(self, name: str):
        self.name = name
        self._lock = threading.RLock()
        self._armed: list[_Armed] = []
        self._log: deque[dict[str, Any]] = deque(maxlen=LOG_LIMIT)
        self._ids = count(1)

    def add(self, fault: Fault) -> int:
        """Arm `fault` now; returns its id (for `clear` and the log)."""
        problems = check(fault, self.link)
        if problems:
            raise FaultSpecError(f"{self.name}: " + "; ".join(_message(k, m) for k, m in problems))
        with self._lock:
            armed = _Armed(next(self._ids), fault, self._direction(fault))
            self._arm(armed)
            self._armed.append(armed)
        self._armed_hook(armed)
        return armed.id

    def clear(self, fault_id: int | None = None) -> int:
        """Disarm one fault (or all); returns how many were disarmed. The log is kept."""
        with self._lock:
            gone = [a for a in self._armed if fault_id is None or a.id == fault_id]
            if fault_id is not None and not gone:
                raise UsageError(f"{self.name}: no fault {fault_id} (armed: {[a.id for a in self._armed]})")
            for a in gone:
                a.done = True
                for timer in a.timers:
                    timer.cancel()
                self._armed.remove(a)
            self._cleared()
        return len(gone)

    def report(self) -> dict[str, Any]:
        """The armed faults and the log of injections (oldest first)."""
        with self._lock:
            return {
                "target": self.name,
                "link": self.link,
                "faults": [a.describe() for a in self._armed],
                "log": list(self._log),
            }

    def _active(self) -> list[_Armed]:
        return [a for a in self._armed if not a.done]

    def _record(self, armed: _Armed, **detail: Any) -> None:
        armed.injected += 1
        entry: dict[str, Any] = {"t": time.monotonic(), "fault": armed.id, "kind": armed.fault.kind}
        if armed.direction:
            entry["direction"] = armed.direction
        self._log.append(entry | detail)

    def _after(self, armed: _Armed, delay_s: float, action: Callable[[], None]) -> None:
        """Run `action` in `delay_s` unless the fault is cleared first."""

        def fire() -> None:
            with self._lock:
                if armed not in self._armed:
                    return
            action()

        timer = threading.Timer(max(0.0, delay_s), fire)
        timer.daemon = True
        armed.timers.append(timer)
        timer.start()

    # hooks
    def _direction(self, fault: Fault) -> str | None:
        return None

    def _arm(self, armed: _Armed) -> None:
        """Set up a fault's state (called holding the lock)."""

    def _armed_hook(self, armed: _Armed) -> None:
        """Act on a fault that takes effect as it is armed (called without the lock)."""

    def _cleared(self) -> None:
        """Called holding the lock after faults were disarmed."""


# ---------------------------------------------------------------------------------------------
# Serial lines


class _Edits:
    """What the faults do to one chunk, by stream position."""

    def __init__(self) -> None:
        self.drops: dict[int, _Armed] = {}
        self.xors: dict[int, tuple[_Armed, int]] = {}
        self.inserts: dict[int, list[tuple[_Armed, bytes]]] = {}
        self.resets: dict[int, list[_Armed]] = {}
        self.silence: tuple[float, _Armed] | None = None

    def __bool__(self) -> bool:
        return bool(self.drops or self.xors or self.inserts or self.resets or self.silence)

    def silence_from(self, q: float, armed: _Armed) -> None:
        if self.silence is None or q < self.silence[0]:
            self.silence = (q, armed)


class SerialFaults(Injector):
    """Faults on a serial line. The UART passes each chunk of each direction through `process`;
    `reset` (set by whoever wires the board) resets the DUT."""

    link = "serial"
    TAIL = PATTERN_MAX - 1  # bytes kept from earlier chunks, so a pattern split across two is found

    def __init__(self, name: str):
        super().__init__(name)
        self.reset: Callable[[], None] | None = None
        self._pos = {"to_host": 0, "to_device": 0}
        self._tail = {"to_host": b"", "to_device": b""}

    def add(self, fault: Fault) -> int:
        if fault.kind == "reset" and self.reset is None:
            raise FaultSpecError(f"{self.name}: no reset line is wired to this port")
        return super().add(fault)

    def _direction(self, fault: Fault) -> str:
        return fault.direction or ("to_device" if fault.kind == "reset" else "to_host")

    def _arm(self, a: _Armed) -> None:
        a.position = self._pos[a.way]
        if a.fault.rate is not None and a.fault.kind in ("drop", "corrupt"):
            a.next_at = a.position + self._gap(a, a.fault.rate)
        if a.fault.kind == "silence" and a.fault.pattern is None:
            self._begin_silence(a, a.position)

    def process(self, direction: str, data: bytes, arrival: Callable[[int], float]) -> bytes:
        """`data` as it reaches the other end; `arrival(i)`: when output byte i gets there (host s)."""
        with self._lock:
            pos, tail = self._pos[direction], self._tail[direction]
            self._pos[direction] = pos + len(data)
            self._tail[direction] = (tail + data)[-self.TAIL :]
            active = [a for a in self._active() if a.direction == direction]
            if not active:
                return data
            edits = _Edits()
            for a in active:
                self._plan(a, pos, tail, data, edits)
            return self._apply(pos, data, edits, arrival) if edits else data

    def _gap(self, a: _Armed, rate: float) -> int:
        """Bytes skipped before the next one a rate fault hits (geometric: one draw per hit)."""
        return 0 if rate >= 1 else int(math.log(1.0 - a.rng.random()) / math.log(1.0 - rate))

    def _occurrence(self, a: _Armed, text: str, pos: int, tail: bytes, data: bytes) -> None:
        """Count the occurrences of the pattern `text` that end in this chunk; note the span of the n-th."""
        pattern = text.encode("latin-1")
        buf, base = tail + data, pos - len(tail)
        i = buf.find(pattern)
        while i >= 0 and a.hit is None:
            if base + i + len(pattern) > pos:
                a.seen += 1
                if a.seen == a.fault.nth:
                    a.hit = (base + i, base + i + len(pattern))
            i = buf.find(pattern, i + 1)

    def _begin_silence(self, a: _Armed, position: float) -> None:
        a.since = position
        a.until = time.monotonic() + (a.fault.duration_s or math.inf)

    def _plan(self, a: _Armed, pos: int, tail: bytes, data: bytes, edits: _Edits) -> None:
        f, end = a.fault, pos + len(data)
        if f.pattern is not None and a.hit is None:
            self._occurrence(a, f.pattern, pos, tail, data)
            if a.hit is None:
                return
        # Past here a fault with a pattern: has found its occurrence (check() gives every fault
        # without rate: a pattern:, except a silence, which then began when it was armed).
        hits: Iterable[int]
        if f.kind in ("drop", "corrupt"):
            if f.rate is not None:
                hits = []
                while a.next_at < end:
                    hits.append(a.next_at)
                    a.next_at += 1 + self._gap(a, f.rate)
            else:
                assert a.hit is not None
                first = a.hit[0] + f.offset
                hits = range(max(first, pos), min(first + f.length, end))
                a.done = first + f.length <= end
            for q in hits:
                if f.kind == "drop":
                    edits.drops.setdefault(q, a)
                else:
                    edits.xors.setdefault(q, (a, f.xor or 1 << a.rng.randrange(8)))
        elif f.kind == "garbage":
            if f.rate is not None:
                ends = [pos + i for i, b in enumerate(data) if b == 0x0A and a.rng.random() < f.rate]
            else:
                assert a.hit is not None
                i = data.find(b"\n", max(a.hit[1] - 1 - pos, 0))
                ends = [pos + i] if i >= 0 else []
                a.done = bool(ends)
            for q in ends:
                edits.inserts.setdefault(q, []).append((a, self._garbage(a)))
        elif f.kind == "silence":
            since = a.since
            if since is None:
                assert a.hit is not None
                since = a.hit[1]
                self._begin_silence(a, since)
            if time.monotonic() >= a.until:
                a.done = True
            elif since < end:
                edits.silence_from(max(since, pos), a)
        elif f.kind == "reset":
            assert a.hit is not None
            edits.resets.setdefault(max(a.hit[1] - 1, pos), []).append(a)
            a.done = True

    def _garbage(self, a: _Armed) -> bytes:
        if a.fault.text is not None:
            return a.fault.text.encode("latin-1") + b"\r\n"
        return bytes(a.rng.randrange(0x80, 0x100) for _ in range(12)) + b"\r\n"

    def _apply(self, pos: int, data: bytes, edits: _Edits, arrival: Callable[[int], float]) -> bytes:
        out = bytearray()
        silent_from, silencer = edits.silence or (math.inf, None)
        for i, b in enumerate(data):
            q = pos + i
            for a in edits.resets.get(q, ()):
                at = arrival(len(out)) + a.fault.delay_s
                self._record(a, at=q, reset_at=at)
                assert self.reset is not None  # add() arms a reset fault only with a reset line wired
                self._after(a, at - time.monotonic(), self.reset)
            if q >= silent_from:
                continue
            if q in edits.drops:
                self._record(edits.drops[q], at=q, byte=chr(b))
                continue
            if q in edits.xors:
                a, mask = edits.xors[q]
                self._record(a, at=q, was=chr(b), now=chr(b ^ mask))
                b ^= mask
            out.append(b)
            for a, text in edits.inserts.get(q, ()):
                self._record(a, at=q, text=text.decode("latin-1"))
                out += text
        if silencer is not None:
            self._record(silencer, at=silent_from, bytes=pos + len(data) - silent_from)
        return bytes(out)


# ---------------------------------------------------------------------------------------------
# Instruments


class InstrumentFaults(Injector):
    """Faults on an instrument's command lines. The server asks `command` about each line;
    `drop_clients()` closes its TCP connections and returns how many there were."""

    link = "instrument"

    def __init__(self, name: str, drop_clients: Callable[[], int]):
        super().__init__(name)
        self.drop_clients = drop_clients

    def _arm(self, a: _Armed) -> None:
        if a.fault.kind == "silence" and a.fault.pattern is None:
            a.since, a.until = time.monotonic(), time.monotonic() + (a.fault.duration_s or math.inf)

    def _armed_hook(self, a: _Armed) -> None:
        if a.fault.kind == "disconnect" and a.fault.pattern is None:
            dropped = self.drop_clients()
            with self._lock:
                self._record(a, connections=dropped)
                a.done = True

    def command(self, line: str, transport: str) -> Literal["reply", "silent", "disconnect"]:
        """What becomes of one command line arriving over `transport` ("tcp" or "serial")."""
        verdict: Literal["reply", "silent", "disconnect"] = "reply"
        with self._lock:
            for a in self._active():
                f = a.fault
                if f.kind == "disconnect" and transport != "tcp":
                    continue
                if a.since is None:
                    if f.pattern is None or f.pattern.upper() not in line.upper():
                        continue
                    a.seen += 1
                    if a.seen < f.nth:
                        continue
                    a.since, a.until = time.monotonic(), time.monotonic() + (f.duration_s or math.inf)
                if f.kind == "disconnect":
                    self._record(a, command=line)
                    a.done, verdict = True, "disconnect"
                elif time.monotonic() >= a.until:
                    a.done = True
                else:
                    self._record(a, command=line, transport=transport)
                    verdict = "silent" if verdict == "reply" else verdict
        return verdict


# ---------------------------------------------------------------------------------------------
# SSH: a TCP proxy


class _Pair:
    """One proxied connection: the client's socket and the one to the server."""

    def __init__(self, client: socket.socket, server: socket.socket):
        self.socks = (client, server)
        self.closed = False
        self.running = 2  # pump threads still going

    def close(self) -> None:
        self.closed = True
        for sock in self.socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class FaultProxy(Injector):
    """A TCP proxy on host:port (port 0: any free port) to `upstream`, injecting SSH-link faults."""

    link = "ssh"

    def __init__(self, name: str, host: str, port: int, upstream: tuple[str, int]):
        super().__init__(name)
        self.host, self.port, self.upstream = host, port, upstream
        self._cv = threading.Condition(self._lock)
        self._passed = {"to_host": 0, "to_device": 0}
        self._pairs: set[_Pair] = set()
        self._listener: socket.socket | None = None
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    def __repr__(self) -> str:
        return f"FaultProxy({self.name!r}, {self.host}:{self.port} -> {self.upstream})"

    # -- faults -----------------------------------------------------------------------------------

    def _direction(self, fault: Fault) -> str:
        return fault.direction or "both"

    def _count(self, direction: str) -> int:
        return sum(n for d, n in self._passed.items() if direction in (d, "both"))

    def _arm(self, a: _Armed) -> None:
        a.position = self._count(a.way)
        if a.fault.kind == "stall" and not a.fault.after_bytes:
            self._begin_stall(a)

    def _armed_hook(self, a: _Armed) -> None:
        f = a.fault
        if f.kind == "disconnect" and f.after_bytes is None:
            self._after(a, f.after_s or 0.0, lambda: self._disconnect(a))

    def _cleared(self) -> None:
        self._cv.notify_all()

    def _begin_stall(self, a: _Armed) -> None:
        a.since = time.monotonic()
        a.until = a.since + (a.fault.duration_s or math.inf)
        self._record(a, at=self._count(a.way), until=None if a.until == math.inf else a.until)

    def _disconnect(self, a: _Armed) -> None:
        with self._lock:
            if a.done:
                return
            a.done = True
            self._record(a, at=self._count(a.way), connections=len(self._pairs))
            for pair in list(self._pairs):
                pair.close()
            self._cv.notify_all()

    def _admit(self, pair: _Pair, direction: str, wanted: int) -> tuple[int, float] | None:
        """How many of `wanted` bytes may pass now and how long to pause after them (throttle);
        waits while stalled; None when the connection is gone."""
        with self._cv:
            while True:
                if pair.closed or self._stopping.is_set():
                    return None
                n, rate, wait_s = wanted, math.inf, None
                for a in self._active():
                    if a.direction not in (direction, "both"):
                        continue
                    assert a.position is not None  # set by _arm()
                    f, passed = a.fault, self._count(a.way) - a.position
                    if f.kind == "disconnect" and f.after_bytes is not None:
                        if passed >= f.after_bytes:
                            self._disconnect(a)
                            return None
                        n = min(n, f.after_bytes - passed)
                    elif f.kind == "stall":
                        if a.since is None and passed >= (f.after_bytes or 0):
                            self._begin_stall(a)
                        if a.since is None:
                            n = min(n, (f.after_bytes or 0) - passed)
                        elif time.monotonic() < a.until:
                            wait_s = min(_POLL_S, a.until - time.monotonic())
                        else:
                            a.done = True
                    elif f.kind == "throttle":
                        if not a.injected:
                            self._record(a, at=self._count(a.way))
                        bytes_per_s = f.bytes_per_s
                        assert bytes_per_s is not None  # check() requires it of a throttle
                        rate = min(rate, bytes_per_s)
                        n = min(n, max(1, int(bytes_per_s * THROTTLE_SLICE_S)))
                if wait_s is None:
                    self._passed[direction] += n
                    return n, n / rate
                self._cv.wait(wait_s)

    # -- the proxy --------------------------------------------------------------------------------

    def start(self) -> None:
        self._stopping.clear()
        self._listener = socket.create_server((self.host, self.port))
        self._listener.settimeout(_POLL_S)
        self.port = self._listener.getsockname()[1]
        self._spawn(self._accept_loop, "accept")

    def stop(self) -> None:
        self._stopping.set()
        if self._listener is not None:
            self._listener.close()
        with self._cv:
            for pair in list(self._pairs):
                pair.close()
            self._cv.notify_all()
        for thread in self._threads:
            thread.join(5)
        self._threads.clear()

    def _spawn(self, target: Callable, what: str, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=f"{self.name}-proxy-{what}", daemon=True)
        thread.start()
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            listener = self._listener
            assert listener is not None  # start() opens it before it starts this loop
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                client.close()  # the server is down: the client sees the connection closed
                continue
            for sock in (client, server):
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = _Pair(client, server)
            with self._lock:
                self._pairs.add(pair)
            self._spawn(self._pump, "up", pair, client, server, "to_device")
            self._spawn(self._pump, "down", pair, server, client, "to_host")

    def _pump(self, pair: _Pair, src: socket.socket, dst: socket.socket, direction: str) -> None:
        try:
            while data := src.recv(65536):
                while data:
                    admitted = self._admit(pair, direction, len(data))
                    if admitted is None:
                        return
                    n, pause_s = admitted
                    dst.sendall(data[:n])
                    data = data[n:]
                    if pause_s:
                        time.sleep(pause_s)
            dst.shutdown(socket.SHUT_WR)  # pass the end of stream on
        except OSError:
            pair.close()
        finally:
            with self._lock:
                pair.running -= 1
                if pair.running == 0:
                    self._pairs.discard(pair)
                    for sock in pair.socks:
                        sock.close()
