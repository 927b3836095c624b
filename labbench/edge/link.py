"""The link emulator: a userspace TCP proxy on loopback that shapes what passes through it like a
network link would, each direction on its own: one-way latency, bandwidth and loss.

`Link(upstream, "wifi")` listens on 127.0.0.1 (`link.address`) and relays every connection it accepts
to `upstream`, the edge server. `up` is the direction client -> upstream (the board sending), `down`
the reply. Each direction of a connection reads what arrives in TCP segments of at most MSS_BYTES and
schedules each segment as a link would carry it:

- serialisation: the direction is busy for `bytes * 8 / bandwidth_bps` seconds per segment, one
  segment after the other (a segment that arrives while the link is busy waits for it);
- latency: the segment is delivered `latency_s` after its serialisation ends;
- loss: a TCP stream cannot lose bytes, so loss shows as delay. Each transmission of a segment is lost
  with probability `loss`; a loss stalls the direction for the retransmission timeout `rto_s`, doubled
  for each further loss of the same segment (RFC 6298 §5.5), and the retransmission is serialised
  again. Short request/reply exchanges have too few segments in flight for fast retransmit (three
  duplicate ACKs), so the timeout is what they see. Delivery stays in order: nothing overtakes a
  segment that is held back.

Shapes can change while connections are open (`set`); a change applies to segments read after it.
Per connection the link records the bytes delivered each way and the time each direction was busy
serialising (retransmissions included), from which a simulated board draws radio power.
Connection setup is not shaped: clients are expected to keep their connection open, as the bench's
offload does. The link takes in whatever the sender writes at once (it exerts no backpressure), so a
sender's send returns before the link has carried the data: time an offload by its reply, as the
paper does.

Written here rather than taken from a library: tc-netem shapes packets, not a proxy, and needs
CAP_NET_ADMIN; Toxiproxy is a separate Go server whose latency is in whole milliseconds and whose
bandwidth is in whole KB/s (Wi-Fi's 1.15 ms below cannot be said), which models no loss-as-delay and
reports no per-direction busy time. Delivery times are absolute (scheduled on the host monotonic
clock), so the sleeps' overshoot does not accumulate, and aimed early by the overshoot past ones showed
(`labbench.edge.timing.Waker`), so the delays are the model's on average.

Presets (`preset(name)`) are the Raspberry Pi 4B's links in the catalog (devices/rpi4b.yaml `links:`,
each figure with its source), the seed paper's reference device (Behera et al., "Exploring the
Boundaries of On-Device Inference", shared/seeds/004); every family lists its own (`LinkProfile.of`).
How the Pi's figures follow from the paper:

- `wifi`: 1.15 ms one way, 56.4 Mbit/s. Table 3 gives the Pi's whole offload (send the image, wait
  for the class) as 9.68 ms for a CIFAR-10 image (32x32x3 = 3072 bytes) and 28.74 ms for an
  ImageNet-1K one (224x224x3 = 150528 bytes); §4.1 gives the server's time per request (A100, all
  included) as 6.95 ms and 5.08 ms. The network's share is then 2.73 ms and 23.66 ms (§4.2.1 measured
  2.65 ms for the CIFAR-10 image on its own, 3 % from 2.73). A link of one-way latency L and
  bandwidth B takes 2 L + (request + reply bytes) / B, the reply being 2 bytes (§4.2.1): the two
  sizes give B = 147456 bytes / 20.93 ms = 56.4 Mbit/s, then 2 L = 2.73 ms - 3074 bytes / B = 2.29
  ms. Check: 2.30 + 0.44 + 6.95 = 9.69 ms and 2.30 + 21.35 + 5.08 = 28.73 ms.
- `ble`: 30 ms one way, 210 kbit/s. §4.2.1: sending the CIFAR-10 image and receiving the 2-byte
  reply over BLE took 177.13 ms (the measurement in which Wi-Fi took 2.65 ms, so the network alone).
  One size gives one equation, so the latency is taken from the Pi's Bluetooth stack: Linux connects
  at a 30-50 ms connection interval (net/bluetooth/hci_core.c, le_conn_min_interval = 0x0018 units
  of 1.25 ms) and data waits for a connection event, so L = 30 ms; then B = 3074 bytes / (177.13 -
  60) ms = 210 kbit/s. Check: the Arduino Nano's BLE offload in Table 7, 190.35 ms, less the server's
  6.95 ms, is 183.4 ms, within 4 % of this link's 177.1 ms.
- `ethernet`: 0.1 ms one way, 941 Mbit/s. The paper measured no Ethernet offload; Table 2 gives the
  Pi's Gigabit Ethernet, whose TCP goodput with 1500-byte frames is 1448 / 1538 of 1 Gbit/s (payload
  per frame with TCP timestamps, over frame plus preamble and gap), and 0.1 ms is a switched LAN's
  one-way latency (an assumption, not a measurement).

The labbench protocol adds a 16-byte request header and a 27-byte reply to the paper's raw bytes:
6 µs more on `wifi`, 1.6 ms (0.9 %) more on `ble`. All presets are lossless (the paper's setup was a
static one with stable Wi-Fi, §6); `rto_s` is Linux's minimum retransmission timeout (TCP_RTO_MIN).
"""

from __future__ import annotations

import collections
import itertools
import math
import queue
import random
import socket
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field

from labbench import catalog
from labbench.catalog import LinkFigures
from labbench.edge.timing import Waker
from labbench.errors import UsageError

MSS_BYTES = 1448  # TCP payload per segment on Ethernet and Wi-Fi (1500-byte MTU, TCP timestamps)
READ_BYTES = 65536  # what one read takes from a socket, then cut into segments
Direction = Literal["up", "down"]


class Shape(BaseModel):
    """How one direction of the link carries data. `bandwidth_bps` is in bits per second; None is
    unlimited."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    latency_s: float = Field(0.0, ge=0)
    bandwidth_bps: float | None = Field(None, gt=0)
    loss: float = Field(0.0, ge=0, lt=1)
    rto_s: float = Field(0.2, gt=0)

    def serialisation_s(self, size_bytes: int) -> float:
        return 0.0 if self.bandwidth_bps is None else size_bytes * 8 / self.bandwidth_bps


class LinkProfile(BaseModel):
    """A link: a shape per direction, and where its figures come from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    up: Shape = Shape()
    down: Shape = Shape()
    source: str = ""

    @classmethod
    def of(cls, figures: LinkFigures, source: str) -> LinkProfile:
        """A symmetric link with a catalog family's figures (devices/<family>.yaml `links:`)."""
        shape = Shape(
            latency_s=figures.latency_ms / 1e3, bandwidth_bps=figures.bandwidth_mbps * 1e6, loss=figures.loss
        )
        return cls(up=shape, down=shape, source=source)


UNSHAPED = LinkProfile(source="no shaping")


PRESET_FAMILY = "rpi4b"  # the presets are the Raspberry Pi 4B's links, the paper's reference device


def preset(name: str) -> LinkProfile:
    """The Raspberry Pi 4B's link `name` (wifi, ble, ethernet) from the catalog."""
    family = catalog.load_family(PRESET_FAMILY)
    if name not in family.links:
        raise UsageError(f"unknown link preset {name!r} (known: {', '.join(family.links)})")
    return LinkProfile.of(family.link(name), f"devices/{PRESET_FAMILY}.yaml links.{name}")


@dataclass(frozen=True)
class DirectionStats:
    delivered_bytes: int
    busy_s: float  # serialising, retransmissions included
    retransmissions: int


@dataclass(frozen=True)
class ConnectionStats:
    """One connection through the link. `client` is the connecting socket's address (its getsockname()),
    `opened_s` when the link accepted it (host monotonic clock)."""

    client: tuple[str, int]
    opened_s: float
    up: DirectionStats
    down: DirectionStats
    open: bool


class InFlight:
    """When the link carries an exchange: from a request's first byte read from the board until the
    reply's last byte is delivered to it, on any connection (the radio is on while one is in flight).
    A simulated board draws its link's power over these spans. Spans older than `RETAIN_S` are
    dropped."""

    RETAIN_S = 900.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._busy: set[int] = set()
        self._spans: collections.deque[list[float]] = collections.deque()  # [start, end], end inf if open

    def begin(self, connection: int, t: float) -> None:
        with self._lock:
            if not self._busy:
                self._spans.append([t, math.inf])
            self._busy.add(connection)

    def end(self, connection: int, t: float) -> None:
        with self._lock:
            if connection not in self._busy:
                return
            self._busy.discard(connection)
            if not self._busy:
                self._spans[-1][1] = t
            while self._spans and self._spans[0][1] < t - self.RETAIN_S:
                self._spans.popleft()

    def seconds(self, t0: float, t1: float) -> float:
        """Seconds within [t0, t1] with an exchange in flight."""
        with self._lock:
            return sum(max(0.0, min(b, t1) - max(a, t0)) for a, b in self._spans)


class _Pipe:
    """One direction of one connection: a reader thread schedules each segment, a writer thread delivers
    it when due."""

    def __init__(
        self,
        link: Link,
        direction: Direction,
        src: socket.socket,
        dst: socket.socket,
        rng: random.Random,
        on_done: Callable[[], None],
        number: int,
    ):
        self._link, self.direction, self._src, self._dst = link, direction, src, dst
        self._number = number
        self._rng, self._on_done = rng, on_done
        self._due: queue.SimpleQueue[tuple[float, bytes] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._busy_until = self._last_due = 0.0
        self._waker = Waker()
        self.delivered_bytes = self.retransmissions = 0
        self.busy_s = 0.0

    def start(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._write, daemon=True).start()

    def stats(self) -> DirectionStats:
        with self._lock:
            return DirectionStats(self.delivered_bytes, self.busy_s, self.retransmissions)

    def _schedule(self, size: int) -> float:
        """When a segment of `size` bytes read now is delivered; books the link's time for it."""
        shape = self._link.shape(self.direction)
        serialisation = shape.serialisation_s(size)
        end = max(time.monotonic(), self._busy_until) + serialisation
        lost = 0
        while self._rng.random() < shape.loss:
            end += shape.rto_s * 2**lost + serialisation
            lost += 1
        self._busy_until = end
        self._last_due = max(self._last_due, end + shape.latency_s)
        with self._lock:
            self.busy_s += serialisation * (lost + 1)
            self.retransmissions += lost
        return self._last_due

    def _read(self) -> None:
        with suppress(OSError):
            while data := self._src.recv(READ_BYTES):
                if self.direction == "up":
                    self._link.in_flight.begin(self._number, time.monotonic())
                for i in range(0, len(data), MSS_BYTES):
                    segment = data[i : i + MSS_BYTES]
                    self._due.put((self._schedule(len(segment)), segment))
        self._due.put(None)

    def _write(self) -> None:
        failed = False
        while (item := self._due.get()) is not None:
            due, data = item
            if failed:
                continue  # drain until the reader ends
            self._waker.until(due)
            with self._lock:  # counted before the receiver can see them
                self.delivered_bytes += len(data)
            if self.direction == "down" and self._due.empty():  # before: the board may send at once
                self._link.in_flight.end(self._number, time.monotonic())
            try:
                self._dst.sendall(data)
            except OSError:
                with self._lock:
                    self.delivered_bytes -= len(data)
                failed = True
                _shutdown(self._src, self._dst)
        with suppress(OSError):
            self._dst.shutdown(socket.SHUT_WR)  # pass the end of the stream on
        self._on_done()


class _Connection:
    def __init__(
        self, link: Link, client: socket.socket, upstream: socket.socket, number: int, seed: int | None
    ):
        self.client_address: tuple[str, int] = client.getpeername()[:2]
        self.opened_s = time.monotonic()
        self._sockets = (client, upstream)
        self._open = 2
        self._lock = threading.Lock()
        self.up = _Pipe(link, "up", client, upstream, _rng(seed, number, "up"), self._pipe_done, number)
        self.down = _Pipe(link, "down", upstream, client, _rng(seed, number, "down"), self._pipe_done, number)
        self._link, self._number = link, number

    def start(self) -> None:
        self.up.start()
        self.down.start()

    def shutdown(self) -> None:
        _shutdown(*self._sockets)

    def stats(self) -> ConnectionStats:
        with self._lock:
            still_open = self._open > 0
        return ConnectionStats(
            self.client_address, self.opened_s, self.up.stats(), self.down.stats(), still_open
        )

    def _pipe_done(self) -> None:
        self._link.in_flight.end(self._number, time.monotonic())  # nothing is in flight on a closed one
        with self._lock:
            self._open -= 1
            if self._open:
                return
        for sock in self._sockets:
            sock.close()


class Link:
    """A shaping TCP proxy on host:port (0 picks a free port) to `upstream`; `close()` or a `with` block
    ends it. `seed` makes the losses reproducible."""

    def __init__(
        self,
        upstream: tuple[str, int],
        profile: LinkProfile | str = UNSHAPED,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        seed: int | None = None,
    ):
        self.upstream, self.seed = upstream, seed
        self.profile = preset(profile) if isinstance(profile, str) else profile
        self._listener = socket.create_server((host, port))
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._connections: list[_Connection] = []
        self._lock = threading.Lock()
        self.in_flight = InFlight()
        threading.Thread(target=self._accept, name=f"link:{self.address[1]}", daemon=True).start()

    @property
    def port(self) -> int:
        return self.address[1]

    def shape(self, direction: Direction) -> Shape:
        profile = self.profile
        return profile.up if direction == "up" else profile.down

    def set(self, direction: Direction | Literal["both"] = "both", **changes: float | None) -> None:
        """Change the shape of one direction or both, e.g. `set(latency_s=0.05, loss=0.01)`."""
        profile = self.profile
        up, down = (
            Shape.model_validate({**shape.model_dump(), **changes}) if direction in (name, "both") else shape
            for name, shape in (("up", profile.up), ("down", profile.down))
        )
        self.profile = profile.model_copy(update={"up": up, "down": down, "source": "set at run time"})

    def connections(self) -> list[ConnectionStats]:
        """Every connection accepted so far, oldest first."""
        with self._lock:
            connections = list(self._connections)
        return [c.stats() for c in connections]

    def close(self) -> None:
        """Stop accepting and cut every connection."""
        self._listener.close()
        with self._lock:
            for connection in self._connections:
                connection.shutdown()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        for number in itertools.count():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream)
            except OSError:
                client.close()  # the upstream is down: so is the link, for this client
                continue
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection = _Connection(self, client, upstream, number, self.seed)
            with self._lock:
                self._connections.append(connection)
            connection.start()


def _rng(seed: int | None, connection: int, direction: Direction) -> random.Random:
    return random.Random(None if seed is None else f"{seed}:{connection}:{direction}")


def _shutdown(*sockets: socket.socket) -> None:
    for sock in sockets:
        with suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
