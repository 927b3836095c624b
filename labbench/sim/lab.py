"""The simulated lab as one background process: bring it up, report it, take it down.

`up()` starts `python -m labbench.sim.lab LAB STATE_DIR`, a daemon that builds one power bus and a
simulator for every instrument and board of lab.yaml that has a `sim:` block, each bound to exactly
the address lab.yaml gives. It writes `state.json` (its pid and the pids of the sshd servers it
started) once everything answers; `down()` stops exactly those processes and removes what `up()`
created. The state lives in `.labbench/sim/<lab file stem>/` beside lab.yaml.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from labbench import catalog, inventory
from labbench.errors import LabbenchError
from labbench.inventory import Lab, endpoint
from labbench.sim.control import ControlServer, SimControl, SimControlError, SOCKET_NAME
from labbench.sim.powerbus import PowerBus

STATE_FILE = "state.json"


class SimLabError(LabbenchError):
    """The simulated lab could not be started, reached or stopped."""


def state_dir(lab: Lab) -> Path:
    return lab.dir / ".labbench" / "sim" / lab.path.stem


def bus_channel(instrument: str, channel: int = 1) -> str:
    """The power bus channel an instrument input measures and a board wired to it draws from."""
    return f"{instrument}:{channel}"


# ---------------------------------------------------------------------------------------------
# The daemon: runs the simulators


class SimLab:
    """Every simulated part of one lab, sharing one power bus, in this process."""

    def __init__(self, lab: Lab, directory: Path):
        self.lab, self.dir = lab, directory
        self.bus = PowerBus()
        self.components: dict[str, Any] = {}

    def start(self) -> None:
        for name, inst in self.lab.instruments.items():
            if inst.simulated:
                self._start(f"instruments.{name}", self._instrument(inst))
        for name, board in self.lab.boards.items():
            if board.simulated:
                self._start(f"boards.{name}", self._board(board))

    def _start(self, key: str, component: Any) -> None:
        component.start()
        self.components[key] = component

    def _instrument(self, inst: inventory.InstrumentEntry) -> Any:
        from labbench.sim.pm1000 import Pm1000Sim

        host, port = endpoint(inst.resource) or _no_endpoint(inst.name, inst.resource)
        return Pm1000Sim(name=inst.name, host=host, port=port,
                         channel=self.bus.channel(bus_channel(inst.name)), **inst.sim)

    def _board(self, board: inventory.BoardEntry) -> Any:
        family = catalog.load_family(board.family, self.lab.devices_dir)
        power = board.power
        channel = self.bus.channel(bus_channel(power.instrument, power.channel) if power else f"{board.name}:unwired")
        settings = dict(board.sim)
        if family.kind == "linux":
            from labbench.sim.linux import SimLinuxBoard

            return SimLinuxBoard(name=board.name, host=board.ssh.host, port=board.ssh.port, family=family,
                                 bus_channel=channel, user=board.ssh.user, key=board.ssh.key,
                                 known_hosts=board.ssh.known_hosts, power_mode=board.power_mode,
                                 state_dir=self.dir / board.name, **settings)
        from labbench.sim.mcu import SimMcuBoard

        host, port = endpoint(board.serial.url) or _no_endpoint(board.name, board.serial.url)
        if "model" in settings:
            settings["model_path"] = self.lab.dir / settings.pop("model")
        return SimMcuBoard(name=board.name, host=host, port=port, family=family, bus_channel=channel,
                           **settings)

    def stop(self) -> None:
        for component in reversed(list(self.components.values())):
            try:
                component.stop()
            except Exception as exc:  # keep stopping the others; the log says which failed
                print(f"stopping {component!r}: {exc}", file=sys.stderr)
        self.components.clear()

    def child_pids(self) -> list[int]:
        return [pid for c in self.components.values() for pid in getattr(c, "pids", lambda: [])()]

    def ledger(self, channel: str, t0: float, t1: float) -> dict[str, float]:
        ch = self.bus.channel(channel)
        return {"energy_j": ch.energy_j(t0, t1), "mean_power_w": ch.mean_power_w(t0, t1)}

    def load_firmware(self, board: str, path: str) -> dict[str, Any]:
        """Used by the stand-in flashing tools of the simulated Nano and Coral (see sim/standin_tools)."""
        return self.components[f"boards.{board}"].load_firmware(Path(path).read_bytes())


def _no_endpoint(name: str, address: str) -> tuple[str, int]:
    raise SimLabError(f"{name}: cannot simulate {address!r}: a simulator needs a host:port address")


def serve(lab_path: Path, directory: Path) -> None:
    """Daemon body: start everything, publish state.json, serve control requests until told to stop."""
    lab = inventory.load(lab_path)
    sim = SimLab(lab, directory)
    stopped = threading.Event()
    control = ControlServer(directory / SOCKET_NAME, {
        "ping": lambda: "pong",
        "ledger": sim.ledger,
        "load_firmware": sim.load_firmware,
        "shutdown": stopped.set,
    })
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    try:
        sim.start()
        control.start()
        _write_state(directory, {"pid": os.getpid(), "lab": str(lab.path), "lab_sha256": lab.sha256,
                                 "children": sim.child_pids(), "started": time.time()})
        stopped.wait()
    finally:
        sim.stop()
        control.stop()


def _write_state(directory: Path, state: dict) -> None:
    tmp = directory / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(directory / STATE_FILE)


# ---------------------------------------------------------------------------------------------
# The front door: up, down, status (used by the CLI and the pytest plugin)


def _alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (a daemon this process started and has not reaped) is reaped."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:  # not our child: ask the kernel
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _running_state(lab: Lab) -> dict | None:
    path = state_dir(lab) / STATE_FILE
    if not path.exists():
        return None
    state = json.loads(path.read_text())
    if not _alive(state["pid"]):
        return None
    try:
        SimControl(state_dir(lab), timeout_s=3).call("ping")
    except SimControlError:
        return None
    return state


def _addresses(lab: Lab) -> list[tuple[str, tuple[str, int]]]:
    found = [(f"instruments.{n}", endpoint(i.resource)) for n, i in lab.instruments.items() if i.simulated]
    for n, b in lab.boards.items():
        if b.simulated:
            found.append((f"boards.{n}", endpoint(b.serial.url) if b.serial else (b.ssh.host, b.ssh.port)))
    return [(owner, addr) for owner, addr in found if addr]


def _check_free(lab: Lab) -> None:
    for owner, (host, port) in _addresses(lab):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as exc:
                raise SimLabError(f"cannot start the simulated lab: {host}:{port} ({owner} in "
                                  f"{lab.path.name}) is already in use ({exc.strerror})") from None


def up(lab: Lab, timeout_s: float = 90.0) -> dict:
    """Start the simulated lab unless it is already up; returns its status. Idempotent."""
    if not lab.simulated:
        raise SimLabError(f"{lab.path.name}: nothing to simulate (no sim: blocks)")
    if _running_state(lab):
        return status(lab)
    _check_free(lab)
    directory = state_dir(lab)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / STATE_FILE).unlink(missing_ok=True)
    log = directory / "sim.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "labbench.sim.lab", str(lab.path), str(directory)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=lab.dir)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-15:]
            raise SimLabError(f"simulated lab exited while starting (code {proc.returncode}); "
                              f"log {log}:\n" + "\n".join(tail))
        if (directory / STATE_FILE).exists() and _running_state(lab):
            return status(lab)
        time.sleep(0.1)
    proc.kill()
    raise SimLabError(f"simulated lab did not come up within {timeout_s:.0f} s; log {log}")


def down(lab: Lab, timeout_s: float = 20.0) -> bool:
    """Stop exactly the processes `up()` recorded and remove its state; False if nothing was up."""
    directory = state_dir(lab)
    path = directory / STATE_FILE
    if not path.exists():
        return False
    state = json.loads(path.read_text())
    pids = [state["pid"], *state.get("children", [])]
    try:
        SimControl(directory, timeout_s=3).call("shutdown")
    except SimControlError:
        _signal(pids, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    _signal([p for p in pids if _alive(p)], signal.SIGKILL)
    for item in sorted(directory.rglob("*"), reverse=True):
        item.unlink() if not item.is_dir() or item.is_symlink() else item.rmdir()
    directory.rmdir()
    return True


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def status(lab: Lab) -> dict | None:
    """What is up, by lab.yaml name and address, or None when the lab is down."""
    state = _running_state(lab)
    if state is None:
        return None
    boards: dict[str, Any] = {}
    for name, b in lab.boards.items():
        if b.simulated:
            boards[name] = {"serial": b.serial.url} if b.serial else {"ssh": {
                "host": b.ssh.host, "port": b.ssh.port, "user": b.ssh.user,
                "key": str(b.ssh.key) if b.ssh.key else None}}
    return {"pid": state["pid"], "state_dir": str(state_dir(lab)),
            "instruments": {n: {"resource": i.resource} for n, i in lab.instruments.items() if i.simulated},
            "boards": boards}


if __name__ == "__main__":
    serve(Path(sys.argv[1]), Path(sys.argv[2]))
