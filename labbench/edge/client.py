"""The edge server's client: one request at a time over one kept-open TCP connection.

The wire protocol is in labbench.edge.server. Every reply is checked (magic, CRC, echoed request id)
before it becomes a class; anything else is an EdgeError naming the server, the request (id, bytes,
CRC) and what was seen. A connection that failed is closed; the next request opens a new one (no
request is retried behind the caller's back).
"""

from __future__ import annotations

import math
import socket
import time
import zlib
from dataclasses import dataclass
from typing import Self

from labbench.edge.server import CRC32, REPLY_HEAD, REPLY_MAGIC, REQUEST, Status, request_bytes
from labbench.errors import EdgeError

_STATUSES = frozenset(Status)


@dataclass(frozen=True)
class EdgeReply:
    """One answered request. `sent_s` and `received_s` are on the host monotonic clock: just before the
    request's first byte was sent and just after the reply's last byte was read."""

    request_id: int
    class_index: int
    top1_probability: float
    server_us: int  # the server's own time: payload received -> inference done
    sent_s: float
    received_s: float

    @property
    def rtt_s(self) -> float:
        return self.received_s - self.sent_s

    @property
    def network_s(self) -> float:
        """The round trip without the server's time: what the link (and both TCP stacks) took."""
        return self.rtt_s - self.server_us / 1e6


class EdgeClient:
    """A client of the edge server at host:port. Not for use by several threads at once."""

    def __init__(self, host: str, port: int, *, timeout_s: float = 5.0):
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self.target = f"edge server {host}:{port}"
        self._sock: socket.socket | None = None
        self._next_id = 1

    def infer(self, input_bytes: bytes) -> EdgeReply:
        """The server's class for one input (the model's input tensor as raw bytes)."""
        request_id, self._next_id = self._next_id, (self._next_id + 1) & 0xFFFFFFFF
        return self.exchange(request_bytes(request_id, input_bytes), request_id)

    def exchange(self, request: bytes, request_id: int) -> EdgeReply:
        """Send `request` (header and payload, as built by `request_bytes`) and read its reply, which must
        echo `request_id`."""
        deadline = time.monotonic() + self.timeout_s
        action = _describe(request, request_id)
        sock = self._connection(deadline)
        try:
            sent_s = time.monotonic()
            sock.settimeout(max(deadline - sent_s, 1e-6))
            sock.sendall(request)
            head = self._receive(sock, REPLY_HEAD.size + CRC32.size, deadline, action)
            magic, _, _, class_index, probability, server_us, length = REPLY_HEAD.unpack_from(head)
            if magic != REPLY_MAGIC:
                raise EdgeError(self.target, action, f"reply magic {magic!r}, expected {REPLY_MAGIC!r}")
            message = self._receive(sock, length, deadline, action)
            received_s = time.monotonic()
        except (TimeoutError, OSError) as exc:
            self.close()
            raise EdgeError(self.target, action, _seen(exc, self.timeout_s)) from exc
        except EdgeError:
            self.close()
            raise
        problem = _problem(head, message, request_id)
        if problem is not None:
            self.close()
            raise EdgeError(self.target, action, problem)
        return EdgeReply(request_id, class_index, probability, server_us, sent_s, received_s)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connection(self, deadline: float) -> socket.socket:
        if self._sock is None:
            try:
                self._sock = socket.create_connection(
                    (self.host, self.port), timeout=max(deadline - time.monotonic(), 1e-6)
                )
            except OSError as exc:
                raise EdgeError(self.target, "connect", _seen(exc, self.timeout_s)) from exc
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self._sock

    def _receive(self, sock: socket.socket, size: int, deadline: float, action: str) -> bytes:
        """Exactly `size` bytes, before the deadline."""
        data = bytearray()
        while len(data) < size:
            sock.settimeout(max(deadline - time.monotonic(), 1e-6))
            chunk = sock.recv(size - len(data))
            if not chunk:
                raise EdgeError(
                    self.target,
                    action,
                    f"connection closed by the server after {len(data)} of {size} reply bytes",
                )
            data += chunk
        return bytes(data)


def _describe(request: bytes, request_id: int) -> str:
    """`request 7 (3136-byte payload, CRC-32 1A2B3C4D)`: what was sent, as its header says."""
    if len(request) < REQUEST.size:
        return f"request {request_id} ({len(request)} bytes, shorter than a header)"
    _, _, length, crc = REQUEST.unpack_from(request)
    return f"request {request_id} ({length}-byte payload, CRC-32 {crc:08X})"


def _problem(head: bytes, message: bytes, request_id: int) -> str | None:
    """What is wrong with a reply (its magic already checked), or None for a good answer."""
    (stated,) = CRC32.unpack_from(head, REPLY_HEAD.size)
    if (crc := zlib.crc32(head[: REPLY_HEAD.size] + message)) != stated:
        return f"reply CRC-32 {crc:08X}, its header says {stated:08X}"
    _, echoed, status, class_index, probability, _, _ = REPLY_HEAD.unpack_from(head)
    if echoed != request_id:
        return f"a reply to request {echoed}"
    if status not in _STATUSES:
        return f"unknown reply status {status}"
    if status != Status.OK:
        return f"refused ({Status(status).name.lower()}): {message.decode(errors='replace')}"
    if class_index < 0 or not math.isfinite(probability):
        return f"class {class_index} with probability {probability} in a reply marked ok"
    return None


def _seen(exc: OSError, timeout_s: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within the {timeout_s:g} s timeout"
    return f"{type(exc).__name__}: {exc.strerror or exc}"
