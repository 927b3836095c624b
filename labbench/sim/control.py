"""The simulated lab's control socket: one JSON request per line, one JSON reply per line.

It is the sim's back door, not an instrument: tests and benchmarks ask it for the power bus's
ground-truth ledger and inject faults with it (labbench.sim.faults), the stand-in flashing tools use
it to load a board, and `labbench sim down` uses it to stop the lab. The bench itself never talks
to it.
"""

from __future__ import annotations

import json
import socket
import socketserver
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from labbench.errors import LabbenchError

SOCKET_NAME = "control.sock"


class SimControlError(LabbenchError):
    """The simulated lab could not be reached or refused a control request."""


class ControlServer:
    """Serves `handlers[op](**args)` on a Unix socket; a handler's exception becomes an error reply."""

    def __init__(self, path: Path, handlers: dict[str, Callable[..., Any]]):
        self.path = Path(path)
        handlers = dict(handlers)

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                for line in self.rfile:
                    try:
                        request = json.loads(line)
                        reply = {"ok": True, "result": handlers[request.pop("op")](**request)}
                    except Exception as exc:
                        reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                    self.wfile.write(json.dumps(reply).encode() + b"\n")

        self.path.unlink(missing_ok=True)
        self._server = socketserver.ThreadingUnixStreamServer(str(self.path), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="sim-control", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self.path.unlink(missing_ok=True)


class SimControl:
    """Client of a running simulated lab's control socket (in its state directory)."""

    def __init__(self, state_dir: Path, timeout_s: float = 10.0):
        self.path = Path(state_dir) / SOCKET_NAME
        self.timeout_s = timeout_s

    def call(self, op: str, **args: Any) -> Any:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(self.timeout_s)
                s.connect(str(self.path))
                s.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
                reply = json.loads(s.makefile("rb").readline() or b"null")
        except (OSError, ValueError) as exc:
            raise SimControlError(f"simulated lab at {self.path}: {op}: {exc}") from None
        if not reply or not reply.get("ok"):
            raise SimControlError(f"simulated lab: {op}: {reply and reply.get('error')}")
        return reply["result"]

    def ledger(self, channel: str, t0: float, t1: float) -> dict[str, float]:
        """Ground-truth energy (J) and mean power (W) a bus channel drew between two monotonic times."""
        return self.call("ledger", channel=channel, t0=t0, t1=t1)

    def fault_set(self, target: str, spec: dict[str, Any]) -> int:
        """Arm a fault on a board or instrument (`esp32`, `instruments.pm1000_esp32`); returns its id.
        `spec` is a fault as lab.yaml writes it, e.g. {"kind": "silence", "duration_s": 2}."""
        return self.call("fault_set", target=target, spec=spec)

    def fault_clear(self, target: str, fault: int | None = None) -> int:
        """Disarm fault `fault` of `target`, or all its faults; returns how many were disarmed."""
        return self.call("fault_clear", target=target, fault=fault)

    def faults(self, target: str | None = None) -> dict[str, Any]:
        """`target`'s armed faults and the log of what they injected (every target's, by key, when None)."""
        return self.call("faults", target=target)
