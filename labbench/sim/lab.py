"""The simulated lab as one background process: bring it up, report it, take it down.

`up()` starts `python -m labbench.sim.lab LAB STATE_DIR`, a daemon that builds one power bus and a
simulator for every instrument and board of lab.yaml that has a `sim:` block, each bound to exactly
the address lab.yaml gives: the `labbench.sims` entry point of the instrument's kind or of the
board family's `simulator` builds it (labbench.sim.Simulator; the built-in ones are below:
`Pm1000Simulator`, `McuSimulator`, `LinuxSimulator`). It writes `state.json` (its pid and the pids
of the sshd servers it started) once everything answers; `down()` stops exactly those processes and
removes what `up()` created. The state lives in `.labbench/sim/<lab file stem>/` beside lab.yaml.

Faults (labbench.sim.faults): each simulator may have an injector, armed with the `sim: {faults: [...]}`
of lab.yaml at start and driven at run time through the control socket (`fault_set`, `fault_clear`,
`faults`; see SimControl). An MCU board's reset faults use the board's reset. A Linux board's sshd
listens on a free loopback port behind a fault proxy (`FaultProxy`) on lab.yaml's address, which
is the one in known_hosts.
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
from typing import TYPE_CHECKING, Any

from labbench import catalog, inventory
from labbench.errors import LabbenchError, UsageError
from labbench.inventory import SIM_GROUP, Lab, endpoint, registered
from labbench.sim import Running, SimPart, Simulator, bus_channel
from labbench.sim.control import SOCKET_NAME, ControlServer, SimControl, SimControlError
from labbench.sim.faults import FaultProxy, Injector, parse
from labbench.sim.settings import FaultInjecting, LinuxSim, McuSim, Pm1000Sim
from labbench.yamlsource import unknown

if TYPE_CHECKING:  # they load where used: validating lab.yaml loads this module, for its simulators' settings
    from labbench.edge.server import EdgeServer
    from labbench.sim.linux import SimLinuxBoard
    from labbench.sim.radio import Radio

STATE_FILE = "state.json"


class SimLabError(LabbenchError):
    """The simulated lab could not be started, reached or stopped."""


def state_dir(lab: Lab) -> Path:
    return lab.dir / ".labbench" / "sim" / lab.path.stem


# ---------------------------------------------------------------------------------------------
# The daemon: runs the simulators


class ProxiedLinuxBoard:
    """A simulated Linux board behind a fault proxy: its sshd on a free port of the same host, the
    proxy on the address clients use, and that address's host key in the lab's known_hosts."""

    def __init__(self, board: SimLinuxBoard, host: str, port: int, known_hosts: Path | None):
        self.board, self.known_hosts = board, known_hosts
        self.proxy = FaultProxy(board.name, host, port, (board.host, board.port))

    def __repr__(self) -> str:
        return f"ProxiedLinuxBoard({self.board!r} at {self.proxy.host}:{self.proxy.port})"

    def start(self) -> None:
        from labbench.sim.linux import known_hosts_name, set_known_host

        self.board.start()
        try:
            self.proxy.start()
            if self.known_hosts:
                name = known_hosts_name(self.proxy.host, self.proxy.port)
                key = _host_key(self.board.host, self.board.port)
                set_known_host(self.known_hosts, name, f"{name} {key.get_name()} {key.get_base64()}")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        from labbench.sim.linux import known_hosts_name, set_known_host

        self.proxy.stop()
        self.board.stop()
        if self.known_hosts:
            set_known_host(self.known_hosts, known_hosts_name(self.proxy.host, self.proxy.port), None)

    def pids(self) -> list[int]:
        return self.board.pids()


def _host_key(host: str, port: int) -> Any:
    """The host key (a paramiko.PKey) an SSH server offers, as ssh-keyscan reads it."""
    import paramiko

    with socket.create_connection((host, port), timeout=10) as sock:
        transport = paramiko.Transport(sock)
        try:
            transport.start_client(timeout=10)
            return transport.get_remote_server_key()
        finally:
            transport.close()


def _free_port(host: str) -> int:
    with socket.create_server((host, 0)) as s:
        return s.getsockname()[1]


class Pm1000Simulator(FaultInjecting):
    """The simulated Voltech PM1000+ (labbench.sim.pm1000), each unit with its own serial number in
    *IDN? (the gate tells analyzers apart by it)."""

    settings = Pm1000Sim

    @staticmethod
    def build(part: SimPart) -> tuple[Running, Injector]:
        from labbench.sim.pm1000 import Pm1000Sim

        settings = {"idn": f"Voltech,PM1000+,SIM-{part.name},1.00", **part.settings}
        sim = Pm1000Sim(name=part.name, host=part.host, port=part.port, channel=part.channel, **settings)
        return sim, sim.faults


class McuSimulator(FaultInjecting):
    """Simulated MCU boards running MLPerf Tiny DUT firmware on an RFC 2217 port (labbench.sim.mcu)."""

    settings = McuSim

    @staticmethod
    def build(part: SimPart) -> tuple[Running, Injector]:
        from labbench.sim.mcu import SimMcuBoard

        assert part.family is not None  # every board has one
        settings = dict(part.settings)
        if "model" in settings:
            settings["model_path"] = part.lab_dir / settings.pop("model")
        mcu = SimMcuBoard(
            name=part.name,
            host=part.host,
            port=part.port,
            family=part.family,
            bus_channel=part.channel,
            radio=part.radio,
            **settings,
        )
        mcu.uart.faults.reset = mcu.reset
        return mcu, mcu.uart.faults


class LinuxSimulator(FaultInjecting):
    """Simulated Linux boards: an OpenSSH server per board behind a fault proxy (labbench.sim.linux)."""

    settings = LinuxSim

    @staticmethod
    def build(part: SimPart) -> tuple[Running, Injector]:
        from labbench.sim.linux import SimLinuxBoard

        board = part.entry
        assert isinstance(board, inventory.BoardEntry) and board.ssh is not None and part.family is not None
        ssh = board.ssh
        sshd = SimLinuxBoard(
            name=part.name,
            host=part.host,
            port=_free_port(part.host),
            family=part.family,
            bus_channel=part.channel,
            user=ssh.user,
            key=ssh.key,
            power_mode=board.power_mode,
            state_dir=part.state_dir,
            radio=part.radio,
            **part.settings,
        )
        proxied = ProxiedLinuxBoard(sshd, part.host, part.port, ssh.known_hosts)
        return proxied, proxied.proxy


class SimLab:
    """Every simulated part of one lab, sharing one power bus, in this process."""

    def __init__(self, lab: Lab, directory: Path):
        from labbench.sim.powerbus import PowerBus

        self.lab, self.dir = lab, directory
        self.bus = PowerBus()
        self.components: dict[str, Any] = {}
        self.injectors: dict[str, Injector] = {}
        self.servers: dict[str, EdgeServer] = {}
        self.radios: dict[str, Radio] = {}

    def start(self) -> None:
        for name, server in self.lab.servers.items():
            if server.sim is not None and server.model.is_file():
                self.servers[name] = self._server(server)
            elif server.sim is not None:
                print(
                    f"servers.{name}: not started: its model {server.model} does not exist", file=sys.stderr
                )
        for name, board in self.lab.boards.items():
            if board.sim is not None and board.link is not None:
                self.radios[name] = self._radio(board)
        for name, inst in self.lab.instruments.items():
            if inst.sim is not None:
                self._start(f"instruments.{name}", inst.sim, *self._instrument(inst))
        for name, board in self.lab.boards.items():
            if board.sim is not None:
                self._start(f"boards.{name}", board.sim, *self._board(board))

    def _start(
        self, key: str, sim: inventory.SimBlock, component: Running, injector: Injector | None
    ) -> None:
        if injector is not None:
            for fault in sim.faults:
                injector.add(fault)
        elif sim.faults:
            raise SimLabError(f"{key}: its simulator injects no faults (sim.faults in {self.lab.path.name})")
        component.start()
        self.components[key] = component
        if injector is not None:
            self.injectors[key] = injector

    def _server(self, server: inventory.ServerEntry) -> EdgeServer:
        from labbench.edge.server import EdgeServer

        assert server.sim is not None  # only simulated servers are started
        host, port = server.address
        return EdgeServer(server.model, host, port, service_s=server.sim.service_ms / 1e3).start()

    def _radio(self, board: inventory.BoardEntry) -> Radio:
        """The board's link emulators, one to each edge server of the lab, shaped with its figures."""
        from labbench.edge.link import Link, LinkProfile
        from labbench.sim.radio import Radio

        assert board.link is not None  # only boards with a link get a radio
        figures = catalog.load_family(board.family, self.lab.devices_dir).link(
            board.link.kind, board.power_mode
        )
        figures = figures.model_copy(update=board.link.overrides())
        assert figures.power_w is not None  # BoardFamily.link fills it in
        source = f"devices/{board.family}.yaml links.{board.link.kind}" + (
            f", overridden in {self.lab.path.name}: {board.link.overrides()}"
            if board.link.overrides()
            else ""
        )
        profile = LinkProfile.of(figures, source)
        radio = Radio(board.link.kind, figures.power_w, profile)
        for name, server in self.lab.servers.items():
            radio.links[name] = Link(server.address, profile, seed=_seed(board.name, name))
        return radio

    def link_address(self, board: str, server: str) -> list[Any]:
        """Where a simulated board sends its offloads to `server`: its link emulator's address."""
        if server in self.lab.servers and server not in self.servers:
            raise UsageError(
                f"edge server {server} is not running: its model {self.lab.server(server).model} does not exist"
            )
        if board not in self.radios:
            raise UsageError(
                f"{board} has no simulated offload link (add `link:` to it in {self.lab.path.name})"
            )
        links = self.radios[board].links
        if server not in links:
            raise UsageError(unknown("edge server", server, links))
        return list(links[server].address)

    def link_set(self, board: str, changes: dict[str, float | None]) -> dict[str, Any]:
        """Reshape a board's links at run time (`latency_s`, `bandwidth_bps`, `loss`, `rto_s`)."""
        if board not in self.radios:
            raise UsageError(f"{board} has no simulated offload link")
        self.radios[board].set(**changes)
        return (
            next(iter(self.radios[board].links.values())).profile.model_dump()
            if self.radios[board].links
            else {}
        )

    def server_stop(self, name: str) -> None:
        """Stop a simulated edge server (its boards' next offload fails); `server_start` brings it back."""
        if name not in self.servers:
            raise UsageError(unknown("simulated edge server", name, self.servers))
        self.servers[name].stop()

    def server_start(self, name: str) -> None:
        self.servers[name] = self._server(self.lab.server(name))

    def _instrument(self, inst: inventory.InstrumentEntry) -> tuple[Running, Injector | None]:
        host, port = endpoint(inst.resource) or _no_endpoint(inst.name, inst.resource)
        return _simulator(inst.kind).build(self._part(inst, None, host, port, bus_channel(inst.name)))

    def _board(self, board: inventory.BoardEntry) -> tuple[Running, Injector | None]:
        family = catalog.load_family(board.family, self.lab.devices_dir)
        power = board.power
        channel = bus_channel(power.instrument, power.channel) if power else f"{board.name}:unwired"
        if board.ssh is not None:
            host, port = board.ssh.host, board.ssh.port
        else:
            assert board.serial is not None  # a board has exactly one of serial: and ssh:
            host, port = endpoint(board.serial.url) or _no_endpoint(board.name, board.serial.url)
        return _simulator(family.simulator).build(self._part(board, family, host, port, channel))

    def _part(
        self,
        entry: inventory.BoardEntry | inventory.InstrumentEntry,
        family: catalog.BoardFamily | None,
        host: str,
        port: int,
        channel: str,
    ) -> SimPart:
        assert entry.sim is not None  # only simulated entries are built
        return SimPart(
            entry=entry,
            family=family,
            host=host,
            port=port,
            settings=dict(entry.sim.settings),
            bus=self.bus,
            channel=self.bus.channel(channel),
            lab_dir=self.lab.dir,
            state_dir=self.dir / entry.name,
            radio=self.radios.get(entry.name) if isinstance(entry, inventory.BoardEntry) else None,
        )

    def stop(self) -> None:
        parts = [*reversed(self.components.values()), *self.radios.values(), *self.servers.values()]
        for part in parts:
            try:
                part.stop()
            except Exception as exc:
                print(f"stopping {part!r}: {exc}", file=sys.stderr)
        self.components.clear()
        self.radios.clear()
        self.servers.clear()

    def child_pids(self) -> list[int]:
        return [pid for c in self.components.values() for pid in getattr(c, "pids", list)()]

    def ledger(self, channel: str, t0: float, t1: float) -> dict[str, float]:
        ch = self.bus.channel(channel)
        return {"energy_j": ch.energy_j(t0, t1), "mean_power_w": ch.mean_power_w(t0, t1)}

    def load_firmware(self, board: str, path: str) -> dict[str, Any]:
        """Used by the stand-in flashing tools of the simulated Nano and Coral (see sim/standin_tools)."""
        return self.components[f"boards.{board}"].load_firmware(Path(path).read_bytes())

    def fault_set(self, target: str, spec: dict[str, Any]) -> int:
        """Arm a fault (a spec as in lab.yaml) on a board or instrument; returns its id."""
        injector = self.injector(target)
        return injector.add(parse(spec, injector.link, target))

    def fault_clear(self, target: str, fault: int | None = None) -> int:
        """Disarm one fault of a target (by id) or all of them; returns how many."""
        return self.injector(target).clear(fault)

    def faults(self, target: str | None = None) -> dict[str, Any]:
        """A target's armed faults and injection log (see Injector.report); every target's by key."""
        if target is None:
            return {key: injector.report() for key, injector in self.injectors.items()}
        return self.injector(target).report()

    def injector(self, target: str) -> Injector:
        """By key (`boards.esp32`) or by name when no board and instrument share it."""
        keys = [k for k in self.injectors if target in (k, k.split(".", 1)[1])]
        if len(keys) != 1:
            names = {k.split(".", 1)[1] for k in self.injectors}
            raise UsageError(
                f"{target} is ambiguous: say {' or '.join(keys)}"
                if keys
                else unknown("simulated board or instrument", target, names)
            )
        return self.injectors[keys[0]]


def _seed(board: str, server: str) -> int:
    """A link's losses are reproducible per board and server."""
    from labbench.sim.powerbus import derive_seed

    return derive_seed(board, f"link:{server}")


def _no_endpoint(name: str, address: str) -> tuple[str, int]:
    raise SimLabError(f"{name}: cannot simulate {address!r}: a simulator needs a host:port address")


def _simulator(name: str) -> Simulator:
    """The `labbench.sims` entry point `name` (lab.yaml's validation has checked it is installed)."""
    simulators = registered(SIM_GROUP)
    if name not in simulators:
        raise SimLabError(unknown("simulator", name, simulators))
    simulator: Simulator = simulators[name].load()
    return simulator


def serve(lab_path: Path, directory: Path) -> None:
    """Daemon body: start everything, publish state.json, serve control requests until told to stop."""
    lab = inventory.load(lab_path)
    sim = SimLab(lab, directory)
    stopped = threading.Event()
    control = ControlServer(
        directory / SOCKET_NAME,
        {
            "ping": lambda: "pong",
            "ledger": sim.ledger,
            "load_firmware": sim.load_firmware,
            "fault_set": sim.fault_set,
            "fault_clear": sim.fault_clear,
            "faults": sim.faults,
            "link_address": sim.link_address,
            "link_set": sim.link_set,
            "server_stop": sim.server_stop,
            "server_start": sim.server_start,
            "shutdown": stopped.set,
        },
    )
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    try:
        sim.start()
        control.start()
        _write_state(
            directory,
            {
                "pid": os.getpid(),
                "lab": str(lab.path),
                "lab_sha256": lab.sha256,
                "children": sim.child_pids(),
                "started": time.time(),
            },
        )
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
            found.append((f"boards.{n}", endpoint(b.serial.url) if b.serial else _ssh_address(b)))
    found += [(f"servers.{n}", s.address) for n, s in lab.servers.items() if s.simulated]
    return [(owner, addr) for owner, addr in found if addr]


def _ssh_address(board: inventory.BoardEntry) -> tuple[str, int]:
    """host, port of a board without a serial link (a board has exactly one of serial: and ssh:)."""
    assert board.ssh is not None
    return board.ssh.host, board.ssh.port


def _check_free(lab: Lab) -> None:
    for owner, (host, port) in _addresses(lab):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as exc:
                raise SimLabError(
                    f"cannot start the simulated lab: {host}:{port} ({owner} in "
                    f"{lab.path.name}) is already in use ({exc.strerror})"
                ) from None


def up(lab: Lab, timeout_s: float = 90.0) -> dict:
    """Start the simulated lab unless it is already up; returns its status. Idempotent."""
    if not lab.simulated:
        raise SimLabError(f"{lab.path.name}: nothing to simulate (no sim: blocks)")
    state = _running_state(lab)
    if state is not None:
        return _report(lab, state)
    _check_free(lab)
    directory = state_dir(lab)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / STATE_FILE).unlink(missing_ok=True)
    log = directory / "sim.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "labbench.sim.lab", str(lab.path), str(directory)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=lab.dir,
        )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-15:]
            raise SimLabError(
                f"simulated lab exited while starting (code {proc.returncode}); "
                f"log {log}:\n" + "\n".join(tail)
            )
        if (directory / STATE_FILE).exists() and (state := _running_state(lab)) is not None:
            return _report(lab, state)
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
    return _report(lab, state)


def _report(lab: Lab, state: dict) -> dict:
    """`status` of the lab whose daemon wrote `state`."""
    boards: dict[str, Any] = {}
    for name, b in lab.boards.items():
        if b.simulated:
            if b.serial:
                boards[name] = {"serial": b.serial.url}
            else:
                assert b.ssh is not None  # a board has exactly one of serial: and ssh:
                boards[name] = {
                    "ssh": {
                        "host": b.ssh.host,
                        "port": b.ssh.port,
                        "user": b.ssh.user,
                        "key": str(b.ssh.key) if b.ssh.key else None,
                    }
                }
    return {
        "pid": state["pid"],
        "state_dir": str(state_dir(lab)),
        "instruments": {n: {"resource": i.resource} for n, i in lab.instruments.items() if i.simulated},
        "boards": boards,
        "servers": {
            n: {"address": f"{e.host}:{e.port}", "model": str(e.model), "running": e.model.is_file()}
            for n, e in lab.servers.items()
            if e.simulated
        },
    }


if __name__ == "__main__":
    serve(Path(sys.argv[1]), Path(sys.argv[2]))
