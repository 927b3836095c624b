"""A simulated board's UART, served as an RFC 2217 port, with the timing of a real wire.

pyserial's `rfc2217.PortManager` speaks Telnet/RFC 2217 to the client. This module is the serial
port that PortManager drives and the cable behind it; no library models those, hence hand-written:

- Host to device: bytes leave the client's transmitter one character time apart (start, data,
  parity and stop bits at the baud the client set over RFC 2217) and land in the device's receive
  FIFO of `rx_fifo_bytes`. Firmware busy with a command does not drain the FIFO; what arrives while
  it is full is lost (`rx_dropped_bytes`), as on a real UART.
- Device to host: `write` queues bytes on the device's transmitter, which sends them at the
  device's own baud; the firmware blocks only while more than `tx_buffer_bytes` wait (a buffered
  UART driver). A piece reaches the client when its last byte would have left the wire.
- A client whose baud differs from the device's by more than 3 %, or whose framing is not 8N1,
  sees garbage, and the device receives garbage.
- DTR/RTS changes go to `on_lines(dtr, rts)`: what they mean (a reset circuit) is the board's.
- Faults (`faults`, a `labbench.sim.faults.SerialFaults`) act on the bytes of each direction as they
  go on the wire, before a baud mismatch garbles them; device-to-host bytes only while a client is
  connected. Its `reset` is left for the board's wiring to set.

The device side runs in one thread (the board's CPU), and all its waits go through a `ResetLine`,
so asserting reset (or stopping the board) ends any of them with `ChipReset`.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable

import serial
from serial.rfc2217 import PortManager

from labbench.sim.faults import SerialFaults

BAUD_TOLERANCE = 0.03  # a UART samples mid-bit: a few percent of baud mismatch still decodes
SPIN_S = 0.0003  # the last stretch before a deadline is spun (yielding the GIL) for µs accuracy
PIECE_BYTES = 64  # the longest piece sent to the client at once (pieces also end at each "\n")


class ChipReset(Exception):
    """Raised in the device thread when the chip is put in reset, or the board stops, as it waits."""


class ResetLine:
    """The chip's reset as its thread sees it: every wait of the device ends when reset is asserted."""

    def __init__(self) -> None:
        self.cv = threading.Condition()
        self.asserted = False

    def assert_reset(self) -> None:
        with self.cv:
            self.asserted = True
            self.cv.notify_all()

    def release(self) -> None:
        with self.cv:
            self.asserted = False

    def check(self) -> None:
        if self.asserted:
            raise ChipReset()

    def wait(self, deadline: float | None) -> None:
        """Wait (holding `cv`) for a notification or `deadline` (host monotonic s; None: forever)."""
        self.check()
        self.cv.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        self.check()

    def sleep_until(self, t: float) -> None:
        """Return at host monotonic time `t`, within microseconds: a coarse wait, then a short spin."""
        with self.cv:
            while t - time.monotonic() > SPIN_S:
                self.wait(t - SPIN_S)
        while time.monotonic() < t:
            self.check()
            time.sleep(0)


class _Connection:
    """The client's socket; PortManager (negotiation) and the transmitter both write to it."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self._lock:
            try:
                self.sock.sendall(data)
            except OSError:
                pass  # the client went away; the reader notices and ends the session


class _LinePort:
    """The serial port PortManager configures: the client's line settings and its DTR/RTS."""

    cts = dsr = True
    ri = cd = False

    def __init__(self, uart: SimUart):
        self._uart = uart
        self.baudrate = uart.device_baud
        self.bytesize, self.parity, self.stopbits = 8, serial.PARITY_NONE, serial.STOPBITS_ONE
        self.xonxoff = self.rtscts = self.break_condition = False
        self._dtr = self._rts = False

    @property
    def dtr(self) -> bool:
        return self._dtr

    @dtr.setter
    def dtr(self, value: bool) -> None:
        self._dtr = bool(value)
        self._uart.on_lines(self._dtr, self._rts)

    @property
    def rts(self) -> bool:
        return self._rts

    @rts.setter
    def rts(self, value: bool) -> None:
        self._rts = bool(value)
        self._uart.on_lines(self._dtr, self._rts)

    def reset_input_buffer(self) -> None:  # RFC 2217 purge of what the port received from the device
        self._uart.purge_to_host()

    def reset_output_buffer(self) -> None:  # purge of what the client sent that is still on the wire
        self._uart.purge_to_device()

    def char_time_s(self) -> float:
        bits = 1 + self.bytesize + (self.parity != serial.PARITY_NONE) + self.stopbits
        return bits / self.baudrate

    def matches(self, device_baud: int) -> bool:
        return (
            abs(self.baudrate - device_baud) <= BAUD_TOLERANCE * device_baud
            and self.bytesize == 8
            and self.parity == serial.PARITY_NONE
            and self.stopbits == serial.STOPBITS_ONE
        )


def _garble(data: bytes) -> bytes:
    """What a receiver at the wrong baud decodes: other bytes (deterministic, line ends included)."""
    return bytes(b ^ 0x5A for b in data)


class SimUart:
    """The board's UART: an RFC 2217 server on host:port (port 0: any free port), one client at a time.

    Device side (the board's CPU thread): `read`, `read_until`, `write`, `reboot`, `device_baud`.
    """

    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        *,
        device_baud: int,
        reset: ResetLine,
        on_lines: Callable[[bool, bool], None],
        rx_fifo_bytes: int = 256,
        tx_buffer_bytes: int = 256,
    ):
        self.name, self.host, self.port = name, host, port
        self.device_baud = self._boot_baud = device_baud
        self.rx_fifo_bytes, self.tx_buffer_bytes = rx_fifo_bytes, tx_buffer_bytes
        self.on_lines = on_lines
        self.faults = SerialFaults(name)
        self._reset = reset
        self._log = logging.getLogger(f"labbench.sim.uart.{name}")
        # host -> device, guarded by reset.cv: chunks of (arrival of the first byte, char time, bytes)
        self._pending: deque[tuple[float, float, bytes]] = deque()
        self._fifo = bytearray()
        self._wire_free = 0.0  # when the client's transmitter is idle again
        self.rx_dropped_bytes = 0
        self.waiting = False  # the device thread is blocked reading, waiting for the host
        # device -> host, guarded by _tx_cv: (due time, piece)
        self._tx_cv = threading.Condition()
        self._txq: deque[tuple[float, bytes]] = deque()
        self._tx_free = 0.0
        self._line: _LinePort | None = None
        self._conn: _Connection | None = None
        self._manager: PortManager | None = None
        self._listener: socket.socket | None = None
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- life cycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self._listener = socket.create_server((self.host, self.port))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        for target, what in ((self._accept_loop, "rfc2217"), (self._transmit_loop, "tx")):
            thread = threading.Thread(target=target, name=f"{self.name}-{what}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stopping.set()
        with self._tx_cv:
            self._tx_cv.notify_all()
        if self._listener is not None:
            self._listener.close()
        conn = self._conn
        if conn is not None:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            thread.join(5)
        self._threads.clear()

    # -- network side -----------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            listener = self._listener
            assert listener is not None  # start() opens it before it starts this loop
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._serve(sock)  # one client at a time; the next waits in the backlog, as on a real port

    def _serve(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(0.2)
        line, conn = _LinePort(self), _Connection(sock)
        # sends the server's side of the negotiation; types-pyserial says both are Serial, but
        # PortManager only uses the port's settings and lines, and the connection's write()
        manager = PortManager(line, conn)  # type: ignore[arg-type]
        with self._tx_cv:
            self._line, self._conn, self._manager = line, conn, manager
        try:
            while not self._stopping.is_set():
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if not data:
                    break
                payload = b"".join(manager.filter(data))
                if payload:
                    self._feed(payload, time.monotonic(), line)
        finally:
            with self._tx_cv:
                self._line = self._conn = self._manager = None
            # Closing the port drops DTR and RTS together: no reset edge (as a USB-serial close).
            self.on_lines(False, False)
            sock.close()

    def _feed(self, data: bytes, t: float, line: _LinePort) -> None:
        ct = line.char_time_s()
        with self._reset.cv:
            start = max(t, self._wire_free)
            data = self.faults.process("to_device", data, lambda i: start + (i + 1) * ct)
            if not data:
                return
            if not line.matches(self.device_baud):
                data = _garble(data)
            self._pending.append((start + ct, ct, data))
            self._wire_free = start + len(data) * ct
            self._reset.cv.notify_all()

    def purge_to_device(self) -> None:
        with self._reset.cv:
            self._pending.clear()
            self._wire_free = 0.0

    def purge_to_host(self) -> None:
        with self._tx_cv:
            self._txq.clear()
            self._tx_free = 0.0

    # -- host -> device ---------------------------------------------------------------------------

    def _arrived(self, now: float) -> int:
        """How many pending bytes have reached the device by `now`."""
        n = 0
        for t0, ct, data in self._pending:
            if t0 > now:
                break
            k = min(len(data), int((now - t0) / ct) + 1)
            n += k
            if k < len(data):
                break
        return n

    def _pop(self, n: int) -> bytes:
        out = bytearray()
        while n > 0 and self._pending:
            t0, ct, data = self._pending[0]
            k = min(n, len(data))
            out += data[:k]
            n -= k
            if k == len(data):
                self._pending.popleft()
            else:
                self._pending[0] = (t0 + k * ct, ct, data[k:])
        return bytes(out)

    def _arrival(self, index: int) -> float | None:
        """When pending byte number `index` reaches the device (None: not sent yet)."""
        for t0, ct, data in self._pending:
            if index < len(data):
                return t0 + index * ct
            index -= len(data)
        return None

    def _find(self, byte: int) -> int | None:
        base = 0
        for _, _, data in self._pending:
            i = data.find(byte)
            if i >= 0:
                return base + i
            base += len(data)
        return None

    def _admit(self, now: float) -> None:
        """Move what arrived while the firmware was busy into the FIFO; what does not fit is lost."""
        n = self._arrived(now)
        take = min(n, self.rx_fifo_bytes - len(self._fifo))
        self._fifo += self._pop(take)
        if n > take:
            self.rx_dropped_bytes += len(self._pop(n - take))
            self._log.warning("receive FIFO overflow: %d bytes lost", n - take)

    def read_until(self, terminator: bytes, timeout_s: float | None = None) -> bytes:
        """Bytes up to and including `terminator` (one byte); fewer, without it, on timeout."""
        return self._read(terminator[0], None, timeout_s)

    def read(self, size: int, timeout_s: float | None = None) -> bytes:
        """`size` bytes, or fewer on timeout."""
        return self._read(None, size, timeout_s)

    def _read(self, terminator: int | None, size: int | None, timeout_s: float | None) -> bytes:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        out = bytearray()
        with self._reset.cv:
            self._reset.check()
            self._admit(time.monotonic())
            # First what waited in the FIFO while the firmware was busy ...
            if terminator is not None and (i := self._fifo.find(terminator)) >= 0:
                out += self._fifo[: i + 1]
                del self._fifo[: i + 1]
                return bytes(out)
            take = len(self._fifo) if size is None else min(size, len(self._fifo))
            out += self._fifo[:take]
            del self._fifo[:take]
            # ... then, the firmware idle in its read loop, each byte as it arrives (no FIFO limit).
            while size is None or len(out) < size:
                arrived = self._arrived(time.monotonic())
                if terminator is not None:
                    j = self._find(terminator)
                    if j is not None and j < arrived:
                        out += self._pop(j + 1)
                        break
                    out += self._pop(arrived)
                    wake = None if j is None else self._arrival(j - arrived)
                else:
                    assert size is not None  # read() gives a size when there is no terminator
                    out += self._pop(min(arrived, size - len(out)))
                    wake = self._arrival(size - len(out) - 1) if len(out) < size else None
                if size is not None and len(out) >= size:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    break
                times = [t for t in (wake, deadline) if t is not None]
                self.waiting = True
                try:
                    self._reset.wait(min(times) if times else None)
                finally:
                    self.waiting = False
        return bytes(out)

    def reboot(self) -> None:
        """The UART after a chip reset: FIFO and transmitter empty, the boot baud, arrivals so far lost."""
        with self._reset.cv:
            self._fifo.clear()
            self._pop(self._arrived(time.monotonic()))
        self.device_baud = self._boot_baud
        self.purge_to_host()

    # -- device -> host ---------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Queue `data` for the host at the device's baud; blocks while the TX buffer is full."""
        self._reset.check()
        ct = 10 / self.device_baud  # the device's own framing: 8N1
        with self._tx_cv:
            line = self._line
            now = time.monotonic()
            start = max(now, self._tx_free)
            if line is not None:
                data = self.faults.process("to_host", data, lambda i: start + (i + 1) * ct)
                if not line.matches(self.device_baud):
                    data = _garble(data)
            sent = 0
            while sent < len(data):
                end = data.find(b"\n", sent, sent + PIECE_BYTES)
                end = min(len(data), sent + PIECE_BYTES) if end < 0 else end + 1
                self._txq.append((start + end * ct, data[sent:end]))
                sent = end
            self._tx_free = start + len(data) * ct
            self._tx_cv.notify_all()
            release = self._tx_free - self.tx_buffer_bytes * ct
        if release > now:
            self._reset.sleep_until(release)

    def _transmit_loop(self) -> None:
        while not self._stopping.is_set():
            with self._tx_cv:
                while not self._txq and not self._stopping.is_set():
                    self._tx_cv.wait(0.5)
                if self._stopping.is_set():
                    return
                due, piece = self._txq[0]
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            with self._tx_cv:
                if not self._txq or self._txq[0] != (due, piece):
                    continue  # purged meanwhile
                self._txq.popleft()
                conn, manager = self._conn, self._manager
            if conn is not None and manager is not None:  # with no client the bytes go nowhere
                conn.write(b"".join(manager.escape(piece)))
