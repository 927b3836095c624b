"""One line-oriented command handler served on a TCP port and, optionally, behind a pty.

Instruments with an ASCII line protocol (SCPI over a raw socket, RS232 command sets) share
this transport: a real client (PyVISA, pyserial) connects to the TCP address or opens the pty's
slave path as a serial port. Hand-written because the stdlib has the TCP half (socketserver)
but nothing serves a pty; no library does both with the ack rules instruments need.

Lines end with LF, CR or CR LF. The handler returns a reply (sent with the terminator) or None
for a command that has none; a transport that acknowledges commands then sends the terminator
alone (the PM1000+'s Ethernet port does; its RS232 port does not).

Faults (`faults`, a `labbench.sim.faults.InstrumentFaults`) see every command line first: a silent
instrument neither executes nor answers it; a disconnect closes the TCP connection instead.
"""

from __future__ import annotations

import os
import re
import select
import socket
import socketserver
import threading
import tty
from collections.abc import Callable

from labbench.errors import LabConfigError
from labbench.sim.faults import InstrumentFaults

#: command line -> reply, or None for a command that has none
Handler = Callable[[str], "str | None"]

_LINE_END = re.compile(rb"\r\n|\r|\n")


class LineServer:
    """Serves `handler` on host:port (port 0: any free port) and on a pty when `use_pty`."""

    def __init__(
        self,
        name: str,
        handler: Handler,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        use_pty: bool = True,
        terminator: str = "\n",
        ack_tcp: bool = True,
        ack_serial: bool = False,
    ):
        self.name, self.host, self._port = name, host, port
        self._handler = handler
        self._use_pty = use_pty
        self._terminator = terminator.encode("ascii")
        self._ack = {"tcp": ack_tcp, "serial": ack_serial}
        self._tcp: socketserver.ThreadingTCPServer | None = None
        self._clients: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._pty: tuple[int, int] | None = None
        self.pty_path: str | None = None
        self.faults = InstrumentFaults(name, self._drop_clients)

    @property
    def port(self) -> int:
        return self._tcp.server_address[1] if self._tcp else self._port

    @property
    def running(self) -> bool:
        return self._tcp is not None

    def start(self) -> None:
        if self._tcp:
            return
        self._stop.clear()
        server = self

        class _Conn(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                server._serve_socket(self.request)

        tcp = socketserver.ThreadingTCPServer((self.host, self._port), _Conn, bind_and_activate=False)
        tcp.daemon_threads = True
        tcp.allow_reuse_address = True
        try:
            tcp.server_bind()
            tcp.server_activate()
        except OSError as e:
            tcp.server_close()
            raise LabConfigError(f"{self.name}: cannot listen on {self.host}:{self._port}: {e}") from e
        self._tcp, self._port = tcp, tcp.server_address[1]  # a restart comes back on the same port
        self._spawn(tcp.serve_forever, 0.05)
        if self._use_pty:
            master, slave = os.openpty()
            tty.setraw(slave)  # no echo, no CR/LF translation: bytes pass as on a serial line
            self._pty = (master, slave)
            self.pty_path = os.ttyname(slave)
            self._spawn(self._serve_pty, master)

    def stop(self) -> None:
        """Close the listener, every open connection and the pty, as if the instrument died."""
        if not self._tcp:
            return
        self._stop.set()
        self._tcp.shutdown()
        self._tcp.server_close()
        with self._lock:
            clients, self._clients = list(self._clients), set()
        for sock in clients:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        for t in self._threads:
            t.join(timeout=2.0)
        if self._pty:
            for fd in self._pty:
                os.close(fd)  # the client's next read on the slave fails, as on a dead line
        self._tcp, self._pty, self._threads = None, None, []

    def _spawn(self, target: Callable, *args) -> None:
        t = threading.Thread(target=target, args=args, name=f"{self.name}-{target.__name__}", daemon=True)
        t.start()
        self._threads.append(t)

    def _drop_clients(self) -> int:
        """Close every TCP connection (their threads end); returns how many there were."""
        with self._lock:
            clients = list(self._clients)
        for sock in clients:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return len(clients)

    def _respond(self, line: bytes, transport: str) -> bytes | None:
        """The bytes to send for one line; None: close the connection instead."""
        text = line.decode("ascii", errors="replace").strip()
        if not text:
            return b""
        verdict = self.faults.command(text, transport)
        if verdict != "reply":
            return None if verdict == "disconnect" else b""
        reply = self._handler(text)
        if reply is None:
            return self._terminator if self._ack[transport] else b""
        return reply.encode("ascii") + self._terminator

    def _serve_socket(self, sock: socket.socket) -> None:
        with self._lock:
            if self._stop.is_set():
                return
            self._clients.add(sock)
        buf = b""
        try:
            while not self._stop.is_set():
                data = sock.recv(4096)
                if not data:
                    return
                *lines, buf = _LINE_END.split(buf + data)
                out = bytearray()
                reply: bytes | None = b""
                for line in lines:
                    reply = self._respond(line, "tcp")
                    if reply is None:
                        break
                    out += reply
                if out:
                    sock.sendall(out)
                if reply is None:
                    return  # the server closes the connection
        except OSError:
            return  # the client went away, or stop() closed the socket under us
        finally:
            with self._lock:
                self._clients.discard(sock)

    def _serve_pty(self, master: int) -> None:
        buf = b""
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([master], [], [], 0.05)
                if not ready:
                    continue
                data = os.read(master, 4096)
            except (OSError, ValueError):
                return  # closed by stop()
            *lines, buf = _LINE_END.split(buf + data)
            out = b"".join(self._respond(line, "serial") or b"" for line in lines)
            if out:
                try:
                    os.write(master, out)
                except OSError:
                    return
