"""The lab inventory: `lab.yaml` -> a typed, validated `Lab`.

Validation is strict: unknown keys, wrong types, values out of range and dangling references (a
power link to a missing instrument, a family with no devices/ file, two boards on one port or one
instrument channel, an unknown driver) are errors formatted `lab.yaml:LINE: key.path: message`, with
a did-you-mean where a close name exists. Names of boards and instruments are identifiers (NAME);
addresses are parsed (pyserial URLs, VISA resource strings, host names, ports 1..65535); SSH user
names are account names (USER_NAME); budget limits have the sign and range of their metric; a `sim:`
block is checked against its simulator's settings, and a path in it stays inside the lab's directory
unless it is absolute. `load(..., check_files=True)` (the front doors: `labbench`, pytest) also
checks that the files the lab names exist here: real boards' SSH keys, simulated models.
`${VAR}` and `${VAR:-default}` in any string are taken from the environment (see yamlsource); an
unset variable without a default is an error naming it.
Relative paths are resolved against the directory of lab.yaml.
"""

from __future__ import annotations

import hashlib
import inspect
import ipaddress
import os
import pwd
import re
import string
import typing
from functools import cached_property
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from labbench.errors import LabConfigError, UsageError
from labbench.metrics import METRICS
from labbench.yamlsource import KeyPath, Source, shown, unknown

DRIVER_GROUP = "labbench.drivers"
INSTRUMENT_GROUP = "labbench.instruments"
#: how a fault's target is reached, which decides the fault kinds that apply to it
FaultLink = Literal["serial", "instrument", "ssh"]
SIM_GROUP = "labbench.sims"  # simulators, by the instrument kind or a family's `simulator`

#: a board or instrument name: it becomes part of file names, pytest ids, logs and tables
NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
#: a lab name: the lab's directory on SSH boards is named after it
LAB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: an account name as useradd takes it: nothing in it means anything to a shell, passwd or sshd_config
USER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*")
#: an SSH host may also be an ssh_config alias (underscores) or an IPv6 address
_SSH_HOST = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,252}")
_DEVICE = re.compile(r"/dev/[A-Za-z0-9_.:+@/-]+")
_QUERY = r"(\?[A-Za-z0-9_=&.-]*)?"
_VISA_FORMS = (
    "TCPIP::host::port::SOCKET, TCPIP::host::INSTR, ASRL/dev/ttyS0::INSTR, GPIB0::12::INSTR "
    "or USB0::0x0957::0x1798::SERIAL::INSTR"
)
_VISA = [
    re.compile(p, re.IGNORECASE)
    for p in (
        r"TCPIP\d*::(?P<host>[^:]+)(::[A-Za-z0-9_,.]+)?(::INSTR)?",
        rf"ASRL(\d+|{_DEVICE.pattern}|COM\d+)::INSTR",
        r"GPIB\d*::\d{1,2}(::\d{1,3})?(::INSTR)?",
        r"USB\d*::(0x[0-9A-F]{1,4}|\d{1,5})::(0x[0-9A-F]{1,4}|\d{1,5})::[A-Za-z0-9_.-]+(::\d+)?(::(INSTR|RAW))?",
    )
]
FLASH_PLACEHOLDERS = ("image", "port", "baud", "board", "python")


def registered(group: str) -> dict[str, Any]:
    """Entry points of `group` by name (drivers and instruments register this way)."""
    return {ep.name: ep for ep in entry_points(group=group)}


def host_problem(host: str, ssh: bool = False) -> str | None:
    """What is wrong with `host` as a host name or IPv4 address (for SSH also an alias or IPv6), or None."""
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
            return None
        except ValueError:
            return f"{shown(host)} is not an IPv4 address"
    if ssh and ":" in host:
        try:
            ipaddress.IPv6Address(host)
            return None
        except ValueError:
            return f"{shown(host)} is not an IPv6 address"
    if (_SSH_HOST if ssh else _HOSTNAME).fullmatch(host):
        return None
    return f"{shown(host)} is not a host name or address"


def port_problem(port: str) -> str | None:
    if not port.isdigit():
        return f"port {shown(port)} is not a number"
    if len(port) > 5 or not 1 <= int(port) <= 65535:
        return f"port {port if len(port) <= 5 else port[:5] + '...'} is out of range 1..65535"
    return None


def serial_problem(url: str) -> str | None:
    """What is wrong with `url` as a serial device or pyserial URL, or None."""
    m = re.fullmatch(rf"(rfc2217|socket)://(\[[^]]*\]|[^:/?#[\]]*)(?::([^/?#]*))?{_QUERY}", url)
    if m:
        scheme, host, port = m.group(1), m.group(2), m.group(3)
        if port is None:
            return f"{shown(url)} has no port: expected {scheme}://{host or 'host'}:PORT"
        if not host:
            return f"{shown(url)} has no host: expected {scheme}://HOST:{port}"
        if host.startswith("["):  # an IPv6 address, bracketed as in any URL
            if ":" not in host:
                return f"{shown(host)} is not an IPv6 address"
            return host_problem(host[1:-1], ssh=True) or port_problem(port)
        return host_problem(host) or port_problem(port)
    if (_DEVICE.fullmatch(url) and ".." not in url.split("/")) or re.fullmatch(r"COM[1-9][0-9]{0,2}", url):
        return None
    if re.fullmatch(rf"loop://{_QUERY}|(spy|alt|hwgrep|cp2110)://[A-Za-z0-9_.:/?=&+@-]+", url):
        return None
    hint = ""
    m = re.fullmatch(r"([A-Za-z0-9.-]+):(\d+)", url)
    if m and ("." in m.group(1) or m.group(1) == "localhost"):
        hint = f'; did you mean "rfc2217://{url}"?'
    return (
        "expected a serial device or pyserial URL (rfc2217://host:port, socket://host:port), "
        f"got {shown(url)}{hint}"
    )


def visa_problem(resource: str) -> str | None:
    """What is wrong with `resource` as a VISA resource string, or None."""
    parts = resource.split("::")
    if re.fullmatch(r"TCPIP\d*", parts[0], re.IGNORECASE) and parts[-1].upper() == "SOCKET":
        if len(parts) != 4:
            return f"expected TCPIP::host::port::SOCKET, got {shown(resource)}"
        return host_problem(parts[1]) or port_problem(parts[2])
    for form in _VISA:
        m = form.fullmatch(resource)
        if m and ".." not in resource.split("/"):
            return host_problem(m.group("host")) if "host" in form.groupindex else None
    hint = ""
    if m := re.fullmatch(r"([A-Za-z0-9.-]+):(\d+)", resource):
        hint = f'; did you mean "TCPIP::{m.group(1)}::{m.group(2)}::SOCKET"?'
    elif _DEVICE.fullmatch(resource):
        hint = f'; did you mean "ASRL{resource}::INSTR"?'
    return f"expected a VISA resource string ({_VISA_FORMS}), got {shown(resource)}{hint}"


def _checked(problem: Any) -> Any:
    """A pydantic validator from a function returning what is wrong with a value (or None)."""

    def validate(value: Any) -> Any:
        message = problem(value)
        if message:
            raise ValueError(message)
        return value

    return AfterValidator(validate)


def matching(pattern: str, what: str) -> Any:
    """A pydantic validator: the value must match `pattern` (as a whole), described as `what`."""

    def problem(value: str) -> str | None:
        return None if re.fullmatch(pattern, value) else f"expected {what}, got {shown(value)}"

    return _checked(problem)


def _user_problem(user: str) -> str | None:
    if USER_NAME.fullmatch(user):
        return None
    return (
        f"{shown(user)} is not a valid user name: a letter or _, then letters, digits, ., _ or - (at most 32)"
    )


def _placeholder_problem(arg: str) -> str | None:
    """What is wrong with the `{...}` placeholders of a flash command argument, or None."""
    known = ", ".join(f"{{{p}}}" for p in FLASH_PLACEHOLDERS)
    try:
        fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(arg) if f is not None]
    except ValueError as exc:
        return f"{exc} (write {{{{ and }}}} for a literal brace)"
    for field, spec, conv in fields:
        if field not in FLASH_PLACEHOLDERS or spec or conv:
            placeholder = shown("{" + field + "}")
            return f"unknown placeholder {placeholder} (known: {known}; {{{{ and }}}} for a literal brace)"
    return None


def name_problem(kind: str, name: Any) -> str | None:
    """What is wrong with `name` as the name of a board or instrument, or None."""
    if isinstance(name, str) and NAME.fullmatch(name):
        return None
    fixed = re.sub(r"[^A-Za-z0-9_-]+", "_", str(name)).strip("_-")[:64]
    hint = f'; did you mean "{fixed}"?' if NAME.fullmatch(fixed) else ""
    return f"a {kind} name is a letter, then up to 63 letters, digits, _ or -{hint}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class SerialConn(_Strict):
    """A serial link given as a pyserial URL (a device path, rfc2217://, socket://)."""

    url: Annotated[str, _checked(serial_problem)]
    baud: int = Field(115200, gt=0)
    timeout_s: float = Field(5.0, gt=0)
    # how the host can reset the board through the port: "rts" (the ESP32 DevKitC's auto-reset
    # circuit), or "none" (USB CDC boards such as the Nano 33 BLE and the Coral Micro); with "rts"
    # every run starts with a reset, timing the cold start to m-init-done
    reset: Literal["rts", "none"] = "none"


class SshConn(_Strict):
    """An SSH link; without `user:` the user is the local account name, as ssh uses."""

    host: Annotated[str, _checked(lambda host: host_problem(host, ssh=True))]
    port: int = Field(22, gt=0, lt=65536)
    user: Annotated[str, _checked(_user_problem)]
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
    """How a board is flashed; `command` is a list of arguments (no shell) with FLASH_PLACEHOLDERS."""

    tool: str
    baud: int | None = Field(None, gt=0)
    command: list[Annotated[str, Field(min_length=1), _checked(_placeholder_problem)]] | None = Field(
        None, min_length=1
    )
    timeout_s: float = Field(120.0, gt=0)


class PowerLink(_Strict):
    """The instrument (and its input channel) that measures a board's supply."""

    instrument: str
    channel: int = Field(1, ge=1)


class SimBlock(BaseModel):
    """A `sim:` block: the simulator's settings, passed on as they are, and the faults it injects.
    Both are checked by `load` with what the simulator (its entry point in SIM_GROUP) declares: its
    `settings` model, and its `fault` model and `fault_problems` for the entry's link."""

    model_config = ConfigDict(extra="allow", frozen=True)

    faults: list[Any] = []  # as written; once loaded, each one of the simulator's `fault` model

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


#: a field filled from the entry's key in lab.yaml, not written in the entry itself
def _from_key() -> Any:
    return Field(json_schema_extra={"from_key": True})


LinkKind = Literal["wifi", "ble", "ethernet"]


class OffloadLink(_Strict):
    """The network link a board offloads over (`link: wifi`): one of its family's `links:`, whose
    figures any of these override (`link: {kind: wifi, latency_ms: 20, loss: 0.01}`)."""

    kind: LinkKind
    latency_ms: float | None = Field(None, ge=0)
    bandwidth_mbps: float | None = Field(None, gt=0)
    loss: float | None = Field(None, ge=0, lt=1)
    power_w: float | None = Field(None, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _bare_kind(cls, data: Any) -> Any:
        return {"kind": data} if isinstance(data, str) else data

    def overrides(self) -> dict[str, float]:
        return {k: v for k, v in self.model_dump(exclude={"kind"}).items() if v is not None}


class ServerSim(_Strict):
    """A simulated edge server's settings. `service_ms`: the least time it takes per request, standing
    in for the seed paper's A100 server (§4.1: 6.95 ms per CIFAR-10 image); 0 answers as fast as this
    host infers."""

    service_ms: float = Field(0.0, ge=0)


class ServerEntry(_Strict):
    """An edge server boards offload to (`labbench edge-server`): where it listens and what it runs.
    A real server's model is on the server, so the file is not looked for here; a simulated one whose
    model is missing is not started, and offloading to it says why."""

    name: str = _from_key()
    host: Annotated[str, _checked(host_problem)]
    port: int = Field(gt=0, lt=65536)
    model: Path
    sim: ServerSim | None = None

    @property
    def simulated(self) -> bool:
        return self.sim is not None

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port


class BoardEntry(_Strict):
    name: str = _from_key()
    family: str
    serial: SerialConn | None = None
    ssh: SshConn | None = None
    flash: FlashSettings | None = None
    power: PowerLink | None = None
    power_mode: str | None = None
    link: OffloadLink | None = None  # the network link it offloads over (hierarchical inference)
    sim: SimBlock | None = None

    @model_validator(mode="after")
    def _one_link(self) -> BoardEntry:
        if (self.serial is None) == (self.ssh is None):
            raise ValueError("a board needs exactly one of serial: or ssh:")
        return self

    @property
    def simulated(self) -> bool:
        return self.sim is not None


class InstrumentEntry(_Strict):
    name: str = _from_key()
    kind: str
    resource: Annotated[str, _checked(visa_problem)]
    settings: dict[str, Any] = {}
    sim: SimBlock | None = None

    @property
    def simulated(self) -> bool:
        return self.sim is not None


class Limit(_Strict):
    """A budget limit; `marginal_pct` is a guard band inside the limit, in percent of it (OpenHTF's
    marginal): a value inside the band passes, judged MARGINAL (a warning). A kind of
    limit takes one `bound`, whose value `value_problem` checks, and refuses the other with
    `other_bound_problem`."""

    max: float | None = None
    min: float | None = None
    marginal_pct: float = Field(0.0, ge=0, le=100)

    bound: ClassVar[Literal["max", "min"] | None] = None
    other_bound_problem: ClassVar[str] = ""

    @staticmethod
    def value_problem(value: float) -> str | None:
        """What is wrong with `value` as the bound of this kind of limit, or None."""
        return None

    @field_validator("max", "min")
    @classmethod
    def _kind_of_bound(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is None or cls.bound is None:
            return value
        problem = cls.value_problem(value) if info.field_name == cls.bound else cls.other_bound_problem
        if problem:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _one_bound(self) -> Limit:
        if (self.max is None) == (self.min is None):
            raise ValueError("a limit needs exactly one of max: or min:")
        return self


class Ceiling(Limit):
    """A limit a measurement must stay under (latency, energy, sizes): `max:`, greater than 0."""

    bound = "max"
    other_bound_problem = "this metric is a ceiling: give max:, not min:"

    @staticmethod
    def value_problem(value: float) -> str | None:
        return f"must be greater than 0, got {value:g}" if value <= 0 else None


class Floor(Limit):
    """The accuracy a model must reach: `min:`, a fraction in 0..1."""

    bound = "min"
    other_bound_problem = "accuracy is a floor: give min:, not max:"

    @staticmethod
    def value_problem(value: float) -> str | None:
        if 0 <= value <= 1:
            return None
        hint = f"; did you mean {value / 100:g}?" if 1 < value <= 100 else ""
        return f"accuracy is a fraction in 0..1, got {value:g}{hint}"


class _Budget(_Strict):
    """What every budget does (its fields, one per metric, are made from METRICS below)."""

    @model_validator(mode="before")
    @classmethod
    def _bare_numbers(cls, data: Any) -> Any:
        """`energy_mj: 0.5` means a ceiling of 0.5 mJ; `accuracy: 0.95` a floor."""
        if isinstance(data, dict):
            return {
                k: {METRICS[k].direction: v}
                if k in METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)
                else v
                for k, v in data.items()
            }
        return data

    def limits(self) -> dict[str, Limit]:
        return {k: v for k in METRICS if (v := getattr(self, k)) is not None}


#: a model's budget on a board: one optional limit per metric of labbench.metrics, a floor for the
#: metrics that must stay above it (accuracy), a ceiling for the others
if TYPE_CHECKING:
    ModelBudget = _Budget
else:
    ModelBudget = create_model(
        "ModelBudget",
        __base__=_Budget,
        **{name: ((Floor if m.direction == "min" else Ceiling) | None, None) for name, m in METRICS.items()},
    )


class LabInfo(_Strict):
    name: Annotated[
        str,
        _checked(
            lambda name: (
                None
                if LAB_NAME.fullmatch(name)
                else (
                    "a lab name is a letter or digit, then up to 63 letters, digits, ., _ or - "
                    "(it names the lab's directory on SSH boards)"
                )
            )
        ),
    ]
    devices: Path | None = None


class _LabFile(_Strict):
    lab: LabInfo
    instruments: dict[str, dict[str, Any]] = {}
    boards: dict[str, dict[str, Any]] = {}
    servers: dict[str, dict[str, Any]] = {}
    budgets: dict[str, dict[str, ModelBudget]] = {}


class _Named(_Strict):
    """Validates entries with their name injected from the key."""

    instruments: dict[str, InstrumentEntry] = {}
    boards: dict[str, BoardEntry] = {}
    servers: dict[str, ServerEntry] = {}


class Lab(BaseModel):
    """A validated lab: its boards, instruments and budgets, and where it came from."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    name: str
    path: Path
    devices_dir: Path
    instruments: dict[str, InstrumentEntry]
    boards: dict[str, BoardEntry]
    servers: dict[str, ServerEntry] = {}
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
        entries: list[BoardEntry | InstrumentEntry | ServerEntry] = [
            *self.boards.values(),
            *self.instruments.values(),
            *self.servers.values(),
        ]
        return any(e.simulated for e in entries)

    def board(self, name: str) -> BoardEntry:
        if name not in self.boards:
            raise UsageError(f"{self.path.name}: {unknown('board', name, self.boards)}")
        return self.boards[name]

    def server(self, name: str) -> ServerEntry:
        if name not in self.servers:
            raise UsageError(f"{self.path.name}: {unknown('edge server', name, self.servers)}")
        return self.servers[name]

    def budget(self, board: str, model: str) -> ModelBudget | None:
        """The budget for `model` on `board`: the board's own entry first, then its family's."""
        for key in (board, self.boards[board].family):
            if model in self.budgets.get(key, {}):
                return self.budgets[key][model]
        return None


_SECTIONS = {"instruments": "instrument", "boards": "board", "servers": "server"}


def load(path: str | Path = "lab.yaml", *, check_files: bool = False) -> Lab:
    """Read and validate a lab.yaml; raises LabConfigError with every problem found, one per line.
    With `check_files`, the files the lab names must also exist (see the module docstring)."""
    path = Path(path).resolve()
    src = Source.load(path)
    raw: _LabFile = src.validate(_LabFile)
    problems = []
    for section, kind in _SECTIONS.items():
        for name, entry in getattr(raw, section).items():
            if (problem := name_problem(kind, name)) is not None:
                problems.append(src.where((section, name), problem))
            if not isinstance(entry, dict):
                problems.append(src.where((section, name), "expected a mapping"))
            elif "name" in entry:
                problems.append(
                    src.where((section, name, "name"), f"unknown key; a {kind} is named by its key")
                )
    if problems:
        raise LabConfigError("\n".join(problems))
    named = {
        section: {name: {**entry, "name": name} for name, entry in getattr(raw, section).items()}
        for section in _SECTIONS
    }
    entries: _Named = src.validate(_Named, named)
    lab_dir = path.parent
    devices_dir = _devices_dir(lab_dir, raw.lab.devices)
    if not devices_dir.is_dir():
        raise LabConfigError(src.where(("lab", "devices"), f"{devices_dir} is not a directory"))
    boards = {n: _resolved(b, lab_dir) for n, b in entries.boards.items()}
    servers = {n: e.model_copy(update={"model": lab_dir / e.model}) for n, e in entries.servers.items()}
    instruments = dict(entries.instruments)
    problems = _sim_settings(src, "instruments", instruments, lab_dir, check_files, devices_dir)
    problems += _sim_settings(src, "boards", boards, lab_dir, check_files, devices_dir)
    problems += _instrument_settings(src, instruments)
    problems += _cross_check(src, boards, instruments, servers, raw.budgets, devices_dir)
    if check_files:
        problems += _missing_keys(src, boards)
    if problems:
        raise LabConfigError("\n".join(problems))
    lab = Lab(
        name=raw.lab.name,
        path=path,
        devices_dir=devices_dir,
        instruments=instruments,
        boards=boards,
        servers=servers,
        budgets=raw.budgets,
    )
    lab._text = path.read_bytes()
    return lab


def _devices_dir(lab_dir: Path, configured: Path | None) -> Path:
    from labbench.catalog import default_devices_dir

    if configured is not None:
        configured = configured.expanduser()
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

    ssh = board.ssh.model_copy(
        update={"key": absolute(board.ssh.key), "known_hosts": absolute(board.ssh.known_hosts)}
    )
    return board.model_copy(update={"ssh": ssh})


_Entry = TypeVar("_Entry", BoardEntry, InstrumentEntry)


def _sim_settings(
    src: Source, section: str, entries: dict[str, _Entry], lab_dir: Path, check_files: bool, devices_dir: Path
) -> list[str]:
    """Check each `sim:` block of `section` against its simulator's settings (the `settings` model of its
    SIM_GROUP entry point); an entry that passes gets the validated values (replaced in `entries`)."""
    problems: list[str] = []
    simulators = registered(SIM_GROUP)
    for name, entry in entries.items():
        if entry.sim is None or (wanted := _simulator(entry, devices_dir)) is None:
            continue
        at = (section, name, "sim")
        simulator, owner = wanted
        if simulator not in simulators:
            missing = unknown("simulator", simulator, simulators)
            problems.append(src.where(at, f"no simulator for {owner}: {missing}"))
            continue
        try:
            schema = simulators[simulator].load().settings
        except Exception as exc:
            problems.append(src.where(at, f"cannot load simulator {simulator}: {exc}"))
            continue
        settings, found = src.check(schema, entry.sim.settings, at)
        if settings is None:
            problems += found
            continue
        faults, found = _faults(src, at, entry, simulators[simulator].load())
        if found:
            problems += found
            continue
        found = _sim_paths(src, at, settings, lab_dir, check_files)
        problems += found
        if not found:
            values = settings.model_dump(exclude_unset=True, exclude={"faults"})
            entries[name] = entry.model_copy(update={"sim": SimBlock(faults=faults, **values)})
    return problems


def _faults(
    src: Source, at: KeyPath, entry: BoardEntry | InstrumentEntry, simulator: Any
) -> tuple[list[BaseModel], list[str]]:
    """The `sim:` block's faults, each checked with the simulator's `fault` model and then against the
    entry's link (`fault_problems`), and the problems found; a simulator without them injects none."""
    assert entry.sim is not None
    if entry.sim.faults and getattr(simulator, "fault", None) is None:
        return [], [src.where(at + ("faults",), "this simulator injects no faults")]
    link: FaultLink = (
        "instrument" if isinstance(entry, InstrumentEntry) else "serial" if entry.serial else "ssh"
    )
    faults: list[BaseModel] = []
    problems: list[str] = []
    for i, raw in enumerate(entry.sim.faults):
        fault, found = src.check(simulator.fault, raw, at + ("faults", i))
        problems += found
        if fault is not None:
            faults.append(fault)
            problems += [
                src.where(at + ("faults", i, *path), message)
                for path, message in simulator.fault_problems(fault, link)
            ]
    return faults, problems


def _simulator(entry: BoardEntry | InstrumentEntry, devices_dir: Path) -> tuple[str, str] | None:
    """The simulator a `sim:` block asks for (an instrument's kind, or its board family's `simulator`) and
    what asks for it; None for an unknown kind or family, which _cross_check reports."""
    from labbench.catalog import family_files, load_family

    if isinstance(entry, InstrumentEntry):
        known = entry.kind in registered(INSTRUMENT_GROUP)
        return (entry.kind, f"instrument kind {entry.kind}") if known else None
    if entry.family not in family_files(devices_dir):
        return None
    return load_family(entry.family, devices_dir).simulator, f"family {entry.family}"


def _sim_paths(src: Source, at: KeyPath, settings: BaseModel, lab_dir: Path, check_files: bool) -> list[str]:
    """A model path stays inside the lab's directory unless absolute; an absolute one, or any with
    `check_files`, must be a file; with `check_files`, the simulated board's python must be executable."""
    problems = []
    model = getattr(settings, "model", None)
    if model is not None:
        given = Path(model).expanduser()
        resolved = (lab_dir / given).resolve()
        if not given.is_absolute() and not resolved.is_relative_to(lab_dir.resolve()):
            message = (
                f'"{model}" is outside the lab\'s directory ({lab_dir}): '
                "give a path inside it or an absolute one"
            )
            problems.append(src.where(at + ("model",), message))
        elif (given.is_absolute() or check_files) and not resolved.is_file():
            problems.append(src.where(at + ("model",), f"{resolved} does not exist or is not a file"))
    python = getattr(settings, "python", None)
    if python is not None and check_files and not (Path(python).is_file() and os.access(python, os.X_OK)):
        problems.append(src.where(at + ("python",), f"{python} is not an executable file"))
    return problems


def _instrument_settings(src: Source, instruments: dict[str, InstrumentEntry]) -> list[str]:
    """Check each instrument's `settings:` against the keyword arguments its driver takes."""
    problems: list[str] = []
    kinds = registered(INSTRUMENT_GROUP)
    for name, inst in instruments.items():
        if inst.kind not in kinds or not inst.settings:
            continue
        try:
            schema = _keywords(kinds[inst.kind].load())
        except Exception as exc:
            problems.append(
                src.where(("instruments", name, "kind"), f"cannot load instrument kind {inst.kind}: {exc}")
            )
            continue
        if schema is not None:
            problems += src.check(schema, inst.settings, ("instruments", name, "settings"))[1]
    return problems


def _keywords(cls: type[Any]) -> type[BaseModel] | None:
    """A model of the keyword arguments `cls(resource, name=..., **settings)` takes (None: any)."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:
        hints = {}
    fields: dict[str, Any] = {  # name -> (type, default), as create_model takes them
        n: (hints.get(n, Any), ... if p.default is p.empty else p.default)
        for n, p in params.items()
        if n not in ("self", "resource", "name") and p.kind is not p.VAR_POSITIONAL
    }
    config = ConfigDict(extra="forbid", allow_inf_nan=False, arbitrary_types_allowed=True)
    model: type[BaseModel] = create_model(f"{cls.__name__}Settings", __config__=config, **fields)
    return model


def _missing_keys(src: Source, boards: dict[str, BoardEntry]) -> list[str]:
    """A real board's SSH key must be a file here (a simulated board's is made by `sim up`)."""
    return [
        src.where(("boards", name, "ssh", "key"), f"{b.ssh.key} does not exist or is not a file")
        for name, b in boards.items()
        if b.ssh and b.ssh.key is not None and not b.simulated and not b.ssh.key.is_file()
    ]


def endpoint(address: str) -> tuple[str, int] | None:
    """host and port of a network address in any of the lab's notations, or None for a local device."""
    for pattern in (r"^(?:rfc2217|socket)://([^:/?]+):(\d+)", r"^TCPIP\d*::([^:]+)::(\d+)::SOCKET$"):
        m = re.match(pattern, address, re.IGNORECASE)
        if m:
            return m.group(1), int(m.group(2))
    return None


def _cross_check(
    src: Source,
    boards: dict[str, BoardEntry],
    instruments: dict[str, InstrumentEntry],
    servers: dict[str, ServerEntry],
    budgets: dict[str, dict[str, ModelBudget]],
    devices_dir: Path,
) -> list[str]:
    from labbench.catalog import family_files, load_family

    problems: list[str] = []
    families = list(family_files(devices_dir))
    drivers, kinds = registered(DRIVER_GROUP), registered(INSTRUMENT_GROUP)
    taken: dict[Any, str] = {}

    def problem(message: str, *loc: str | int) -> None:
        problems.append(src.where(loc, message))

    def claim(address: Any, owner: str, *loc: str) -> None:
        if address in taken:
            problem(f"{_fmt(address)} is already used by {taken[address]}", *loc)
        else:
            taken[address] = owner

    for name, inst in instruments.items():
        at = ("instruments", name)
        if inst.kind not in kinds:
            problem(unknown("instrument kind", inst.kind, kinds), *at, "kind")
        claim(endpoint(inst.resource) or inst.resource, f"instruments.{name}", *at, "resource")
        if inst.simulated and endpoint(inst.resource) is None:
            problem("a simulated instrument listens on TCPIP::host::port::SOCKET", *at, "resource")
    for name, board in boards.items():
        at = ("boards", name)
        if board.family not in families:
            problem(unknown("family", board.family, families) + f" in {devices_dir}", *at, "family")
        else:
            family = load_family(board.family, devices_dir)
            if (family.kind == "linux") != (board.ssh is not None):
                link, needs = ("serial", "ssh") if board.ssh is None else ("ssh", "serial")
                problem(f"{board.family} boards are reached by {needs}:, not {link}:", *at, link)
            if board.link is not None and board.link.kind not in family.links:
                problem(
                    f"{board.family} boards offload over {', '.join(family.links) or 'no network link'}"
                    f" (devices/{board.family}.yaml links:), not {board.link.kind}",
                    *at,
                    "link",
                )
            if family.target not in drivers:
                problem(
                    f"the target of {board.family}: {unknown('driver', family.target, drivers)}",
                    *at,
                    "family",
                )
        if board.flash and board.flash.tool not in drivers:
            problem(unknown("flash tool", board.flash.tool, drivers), *at, "flash", "tool")
        if board.power and board.power.instrument not in instruments:
            problem(unknown("instrument", board.power.instrument, instruments), *at, "power", "instrument")
        elif board.power:
            claim(f"{board.power.instrument} channel {board.power.channel}", f"boards.{name}", *at, "power")
        if board.serial:
            claim(endpoint(board.serial.url) or board.serial.url, f"boards.{name}", *at, "serial", "url")
            if board.simulated and endpoint(board.serial.url) is None:
                problem("a simulated board listens on rfc2217://host:port", *at, "serial", "url")
        else:
            assert board.ssh is not None  # lab.yaml gives a board exactly one of serial: and ssh:
            claim((board.ssh.host, board.ssh.port), f"boards.{name}", *at, "ssh", "port")
        if board.power_mode is not None and board.family in families:
            modes = load_family(board.family, devices_dir).power_modes
            if board.power_mode not in modes:
                problem(unknown(f"power mode of {board.family}", board.power_mode, modes), *at, "power_mode")
    for name, server in servers.items():
        claim(server.address, f"servers.{name}", "servers", name, "port")
    targets = set(boards) | {b.family for b in boards.values()}
    for key in budgets:
        if key not in targets:
            problem(unknown("board or family", key, targets), "budgets", key)
    return problems


def _fmt(address: Any) -> str:
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
