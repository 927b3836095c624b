"""Loopback TCP for tests: a free port, and a proxy whose connections pass through filters that can
change, hold back or cut what goes by (a flaky link, a hung instrument, a flipped bit).

Imported by name (`from netproxy import TcpProxy`), as pytest puts this directory on sys.path."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from contextlib import suppress
from typing import Self

#: what one direction of a connection does with each chunk it reads: returns the bytes to send on
#: (b"" sends nothing), or None to end the connection both ways
Filter = Callable[[bytes], bytes | None]


def free_port() -> int:
    """A loopback port nothing listens on (connections to it are refused until something binds it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def passthrough(data: bytes) -> bytes:
    return data


class TcpProxy:
    """A TCP proxy on 127.0.0.1:`port` to `upstream` (host, port). Each connection it accepts gets a
    connection of its own upstream and a thread a direction, which sends on what the connection's
    `filters()` make of every chunk it reads; when either direction ends (end of stream, an error or
    a filter's None) both sockets are shut down. `nodelay` sets TCP_NODELAY on both.

    Subclasses override `filters`; a proxy is closed by `close()` or by leaving a `with` block."""

    def __init__(self, upstream: tuple[str, int], *, nodelay: bool = False):
        self.upstream, self.nodelay = upstream, nodelay
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def filters(self) -> tuple[Filter, Filter]:
        """A new connection's filters: (client to upstream, upstream to client). Everything passes."""
        return passthrough, passthrough

    def close(self) -> None:
        """Stop accepting; shut down and close every connection."""
        self._listener.close()
        for sock in self._sockets:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            to_upstream, to_client = self.filters()
            upstream = socket.create_connection(self.upstream)
            if self.nodelay:
                for sock in (client, upstream):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, to_upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, to_client), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, through: Filter) -> None:
        try:
            while data := src.recv(65536):
                out = through(data)
                if out is None:
                    break
                if out:
                    dst.sendall(out)
        except OSError:
            pass
        for sock in (src, dst):
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
