"""The lab inventory: `lab.yaml` -> a typed, validated `Lab`.

Validation is strict: unknown keys, wrong types and dangling references (a power link to a missing
instrument, a family with no devices/ file, two boards on one port, an unknown driver) are errors
formatted `lab.yaml:LINE: key.path: message`, with a did-you-mean where a close name exists.
`${VAR}` and `${VAR:-default}` in any string are taken from the environment (see yamlsource); an
unset variable without a default is an error naming it.
Relative paths are resolved against the directory of lab.yaml.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import re
from functools import cached_property
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from labbench.errors import LabConfigError, UsageError
from labbench.sim.faults import Fault
from labbench.sim.faults import check as check_fault
from labbench.yamlsource import Source, unknown

DRIVER_GROUP = "labbench.drivers"
INSTRUMENT_GROUP = "labbench.instruments"

_SERIAL_URL = re.compile(r"^(/dev/\S+|COM\d+|(rfc2217|socket|loop|spy|alt|hwgrep|cp2110)://\S*)$")


def registered(group: str) -> dict[str, Any]:
    """Entry points of `group` by name (drivers and instruments register this way)."""
    return {ep.name: ep for ep in entry_points(group=group)}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SerialConn(_Strict):
    """A serial link given as a pyserial URL (a device path, rfc2217://, socket://)."""

    url: str
    baud: int = Field(115200, gt=0)
    timeout_s: float = Field(5.0, gt=0)

    @field_validator("url")
    @classmethod
    def _pyserial_url(cls, url: str) -> str:
        if not _SERIAL_URL.match(url):
            raise ValueError(f'expected a serial device or pyserial URL (rfc2217://host:port, socket://host:port), got "{url}"')
        return url


class SshConn(_Strict):
    """An SSH link; without `user:` the user is the local account name, as ssh uses."""

    host: str
    port: int = Field(22, gt=0, lt=65536)
    user: str
    key: Path | None = None
    known_hosts: Path | None = None
    trust_on_first_use: bool = False
    connect_timeout_s: float = Field(10.0, gt=0)
    command_timeout_s: float = Field(120.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _local_user(cls, data: Any) -> Any:
        """The account of the uid, from the passwd database ($USER may be unset or stale)."""
        if not isinstance(data, dict) or "user" in data:
            return data
        try:
            return {**data, "user": pwd.getpwuid(os.getuid()).pw_name}
        except KeyError:
            raise ValueError(f"no user: given and uid {os.getuid()} has no account name") from None


class FlashSettings(_Strict):
    tool: str
    baud: int | None = Field(None, gt=0)
    command: list[str] | None = None
    timeout_s: float = Field(120.0, gt=0)


class PowerLink(_Strict):
    """The instrument (and its input channel) that measures a board's supply."""

    instrument: str
    channel: int = Field(1, ge=1)


class SimBlock(BaseModel):
    """A `sim:` block: the simulator's settings, passed on as they are, and the faults it injects
    (labbench.sim.faults; which kinds apply is checked against the entry's link)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    faults: list[Fault] = []

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


#: a field filled from the entry's key in lab.yaml, not written in the entry itself
def _from_key() -> Any:
    return Field(json_schema_extra={"from_key": True})


class BoardEntry(_Strict):
    name: str = _from_key()
    family: str
    serial: SerialConn | None = None
    ssh: SshConn | None = None
    flash: FlashSettings | None = None
    power: PowerLink | None = None
    power_mode: str | None = None
    sim: SimBlock | None = None

    @model_validator(mode="after")
    def _one_link(self) -> "BoardEntry":
        if (self.serial is None) == (self.ssh is None):
            raise ValueError("a board needs exactly one of serial: or ssh:")
        return self

    @property
    def simulated(self) -> bool:
        return self.sim is not None


class InstrumentEntry(_Strict):
    name: str = _from_key()
    kind: str
    resource: str
    settings: dict[str, Any] = {}
    sim: SimBlock | None = None

    @property
    def simulated(self) -> bool:
        return self.sim is not None


class Limit(_Strict):
    """A budget limit; `marginal_pct` is the band beyond the limit still judged MARGINAL."""

    max: float | None = None
    min: float | None = None
    marginal_pct: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _one_bound(self) -> "Limit":
        if (self.max is None) == (self.min is None):
            raise ValueError("a limit needs exactly one of max: or min:")
        return self


#: budget metric -> unit and direction; accuracy is a floor, everything else a ceiling
METRICS: dict[str, tuple[str, Literal["max", "min"]]] = {
    "latency_p50_ms": ("ms", "max"), "latency_p90_ms": ("ms", "max"), "latency_p99_ms": ("ms", "max"),
    "latency_mean_ms": ("ms", "max"), "cold_start_ms": ("ms", "max"), "energy_mj": ("mJ", "max"),
    "accuracy": ("", "min"), "flash_kib": ("KiB", "max"), "arena_kib": ("KiB", "max"),
    "peak_rss_mib": ("MiB", "max"),
}


class ModelBudget(_Strict):
    latency_p50_ms: Limit | None = None
    latency_p90_ms: Limit | None = None
    latency_p99_ms: Limit | None = None
    latency_mean_ms: Limit | None = None
    cold_start_ms: Limit | None = None
    energy_mj: Limit | None = None
    accuracy: Limit | None = None
    flash_kib: Limit | None = None
    arena_kib: Limit | None = None
    peak_rss_mib: Limit | None = None

    @model_validator(mode="before")
    @classmethod
    def _bare_numbers(cls, data: Any) -> Any:
        """`energy_mj: 0.5` means a ceiling of 0.5 mJ; `accuracy: 0.95` a floor."""
        if isinstance(data, dict):
            return {k: {METRICS[k][1]: v} if k in METRICS and isinstance(v, (int, float))
                    and not isinstance(v, bool) else v for k, v in data.items()}
        return data

    def limits(self) -> dict[str, Limit]:
        return {k: v for k in METRICS if (v := getattr(self, k)) is not None}


class LabInfo(_Strict):
    name: str
    devices: Path | None = None


class _LabFile(_Strict):
    lab: LabInfo
    instruments: dict[str, dict[str, Any]] = {}
    boards: dict[str, dict[str, Any]] = {}
    budgets: dict[str, dict[str, ModelBudget]] = {}


class _Named(_Strict):
    """Validates entries with their name injected from the key."""

    instruments: dict[str, InstrumentEntry] = {}
    boards: dict[str, BoardEntry] = {}


class Lab(BaseModel):
    """A validated lab: its boards, instruments and budgets, and where it came from."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    name: str
    path: Path
    devices_dir: Path
    instruments: dict[str, InstrumentEntry]
    boards: dict[str, BoardEntry]
    budgets: dict[str, dict[str, ModelBudget]]
    _text: bytes = PrivateAttr(b"")

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self._text).hexdigest()

    @property
    def dir(self) -> Path:
        return self.path.parent

    @property
    def simulated(self) -> bool:
        return any(b.simulated for b in self.boards.values()) or any(
            i.simulated for i in self.instruments.values())

    def board(self, name: str) -> BoardEntry:
        if name not in self.boards:
            raise UsageError(f"{self.path.name}: {unknown('board', name, self.boards)}")
        return self.boards[name]

    def budget(self, board: str, model: str) -> ModelBudget | None:
        """The budget for `model` on `board`: the board's own entry first, then its family's."""
        for key in (board, self.boards[board].family):
            if model in self.budgets.get(key, {}):
                return self.budgets[key][model]
        return None


def load(path: str | Path = "lab.yaml") -> Lab:
    """Read and validate a lab.yaml; raises LabConfigError with every problem found, one per line."""
    path = Path(path).resolve()
    src = Source.load(path)
    raw: _LabFile = src.validate(_LabFile)
    named = {section: {name: {**(entry if isinstance(entry, dict) else {}), "name": name}
                       for name, entry in getattr(raw, section).items()}
             for section in ("instruments", "boards")}
    bad = [src.where((s, n), "expected a mapping") for s in named for n, e in getattr(raw, s).items()
           if not isinstance(e, dict)]
    if bad:
        raise LabConfigError("\n".join(bad))
    entries: _Named = src.validate(_Named, named)
    devices_dir = _devices_dir(path.parent, raw.lab.devices)
    boards = {n: _resolved(b, path.parent) for n, b in entries.boards.items()}
    problems = _cross_check(src, boards, entries.instruments, raw.budgets, devices_dir)
    if problems:
        raise LabConfigError("\n".join(problems))
    lab = Lab(name=raw.lab.name, path=path, devices_dir=devices_dir, instruments=entries.instruments,
              boards=boards, budgets=raw.budgets)
    lab._text = path.read_bytes()
    return lab


def _devices_dir(lab_dir: Path, configured: Path | None) -> Path:
    from labbench.catalog import default_devices_dir

    if configured is not None:
        return configured if configured.is_absolute() else lab_dir / configured
    local = lab_dir / "devices"
    return local if local.is_dir() else default_devices_dir()


def _resolved(board: BoardEntry, lab_dir: Path) -> BoardEntry:
    """Make the SSH key and known_hosts paths absolute (relative ones are relative to lab.yaml)."""
    if board.ssh is None:
        return board

    def absolute(p: Path | None) -> Path | None:
        if p is None:
            return None
        p = p.expanduser()
        return p if p.is_absolute() else lab_dir / p

    ssh = board.ssh.model_copy(update={"key": absolute(board.ssh.key),
                                       "known_hosts": absolute(board.ssh.known_hosts)})
    return board.model_copy(update={"ssh": ssh})


def endpoint(address: str) -> tuple[str, int] | None:
    """host and port of a network address in any of the lab's notations, or None for a local device."""
    for pattern in (r"^(?:rfc2217|socket)://([^:/?]+):(\d+)", r"^TCPIP\d*::([^:]+)::(\d+)::SOCKET$"):
        m = re.match(pattern, address, re.IGNORECASE)
        if m:
            return m.group(1), int(m.group(2))
    return None


def _cross_check(src: Source, boards: dict[str, BoardEntry], instruments: dict[str, InstrumentEntry],
                 budgets: dict, devices_dir: Path) -> list[str]:
    problems: list[str] = []
    families = sorted(p.stem for p in devices_dir.glob("*.yaml"))
    drivers, kinds = registered(DRIVER_GROUP), registered(INSTRUMENT_GROUP)
    taken: dict[Any, str] = {}

    def claim(address: Any, owner: str, loc: tuple) -> None:
        if address in taken:
            problems.append(src.where(loc, f"{_fmt(address)} is already used by {taken[address]}"))
        else:
            taken[address] = owner

    for name, inst in instruments.items():
        if inst.kind not in kinds:
            problems.append(src.where(("instruments", name, "kind"), unknown("instrument kind", inst.kind, kinds)))
        claim(endpoint(inst.resource) or inst.resource, f"instruments.{name}", ("instruments", name, "resource"))
    for name, board in boards.items():
        if board.family not in families:
            problems.append(src.where(("boards", name, "family"),
                                      unknown("family", board.family, families) + f" in {devices_dir}"))
        if board.flash and board.flash.tool not in drivers:
            problems.append(src.where(("boards", name, "flash", "tool"), unknown("flash tool", board.flash.tool, drivers)))
        if board.power and board.power.instrument not in instruments:
            problems.append(src.where(("boards", name, "power", "instrument"),
                                      unknown("instrument", board.power.instrument, instruments)))
        if board.serial:
            claim(endpoint(board.serial.url) or board.serial.url, f"boards.{name}", ("boards", name, "serial", "url"))
        else:
            claim((board.ssh.host, board.ssh.port), f"boards.{name}", ("boards", name, "ssh", "port"))
        if board.power_mode is not None and board.family in families:
            problems += _check_power_mode(src, name, board, devices_dir)
    for section, entries in (("instruments", instruments), ("boards", boards)):
        for name, entry in entries.items():
            link = "instrument" if section == "instruments" else "serial" if entry.serial else "ssh"
            for i, fault in enumerate(entry.sim.faults if entry.sim else ()):
                problems += [src.where((section, name, "sim", "faults", i, *key), message)
                             for key, message in check_fault(fault, link)]
    targets = set(boards) | {b.family for b in boards.values()}
    for key in budgets:
        if key not in targets:
            problems.append(src.where(("budgets", key), unknown("board or family", key, targets)))
    return problems


def _check_power_mode(src: Source, name: str, board: BoardEntry, devices_dir: Path) -> list[str]:
    from labbench.catalog import load_family

    modes = load_family(board.family, devices_dir).power_modes
    if board.power_mode in modes:
        return []
    return [src.where(("boards", name, "power_mode"), unknown(f"power mode of {board.family}", board.power_mode, modes))]


def _fmt(address: Any) -> str:
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
