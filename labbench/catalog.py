"""The board-family catalog: `devices/<family>.yaml` -> a typed, validated `BoardFamily`.

A family file holds what every board of that family shares: CPU, clock, memories, accelerator,
connectivity, runtimes, flasher, serial defaults, a power profile and a device model that the
simulated lab uses to time inferences. Every number in the file names its source: `sources:` maps
the number's key path to a citation whose first word is a key of the file's `references:`.
A family also names the driver that runs its inferences (`target`, an entry point of
`labbench.drivers`) and its simulator (`simulator`, one of `labbench.sims`); a file that names
neither gets its kind's (`KIND_DEFAULTS`).

The families are the lab's catalog directory (lab.yaml `lab.devices`, else the package's own) and
those installed packages add: an entry point of the group `labbench.devices` names a package whose
`*.yaml` files are families, read with importlib.resources. A file of the lab's directory takes
precedence over a packaged family of the same name; two packages may not both define one.

Validation is strict (unknown keys, wrong types, a number without a source, a source for a key that
does not exist, an MCU without SRAM or flash, a Linux board not reached over SSH) and errors read
`devices/esp32_devkitc.yaml:LINE: key.path: message`.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Iterator
from importlib import resources
from importlib.abc import Traversable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from labbench.errors import CatalogError
from labbench.yamlsource import KeyPath, Source, plain, unknown

#: accepted `dtype` names for DeviceModel.inference_us -> the throughput field they use
_DTYPES = {"int8": "int8_macs_per_s", "fp32": "fp32_macs_per_s", "float32": "fp32_macs_per_s"}
_REF = re.compile(r"[A-Za-z0-9_]+")
FAMILY_GROUP = "labbench.devices"
#: the inference driver and the simulator of a family that names none, by kind
KIND_DEFAULTS = {
    "mcu": {"target": "dut_serial", "simulator": "mcu"},
    "linux": {"target": "ssh", "simulator": "linux"},
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class PowerProfile(_Strict):
    """Watts a board draws in each state, at the point its sources measured.

    The seed paper measured whole boards at the socket (PM1000+ and breakout box); datasheet figures
    are at the chip's supply. Each family's `sources:` says which applies.
    """

    idle_w: float = Field(gt=0)  # powered, firmware waiting for a command
    active_w: float = Field(gt=0)  # running inferences back to back
    upload_w: float = Field(gt=0)  # receiving a sample (serial bytes, or SSH for Linux boards)
    radio_tx_w: float = Field(gt=0)  # transmitting over the radio (Wi-Fi or BLE offload)


class DeviceModel(_Strict):
    """How long one inference takes: a fixed overhead plus MACs at an effective throughput.

    `fp32_macs_per_s` is None where no published figure exists; fp32 inference is then refused.
    """

    int8_macs_per_s: float = Field(gt=0)
    fp32_macs_per_s: float | None = Field(gt=0)
    overhead_us: float = Field(ge=0)

    def inference_us(self, macs: int, dtype: str = "int8") -> float:
        """Latency of one inference of a model with `macs` multiply-accumulates, in µs."""
        if dtype not in _DTYPES:
            raise CatalogError(f'unknown dtype "{dtype}" (known: {", ".join(_DTYPES)})')
        rate: float | None = getattr(self, _DTYPES[dtype])
        if rate is None:
            raise CatalogError(f"no {dtype} throughput in the catalog for this device (no published figure)")
        return self.overhead_us + macs / rate * 1e6


LinkKind = Literal["wifi", "ble", "ethernet"]


class LinkFigures(_Strict):
    """How a board offloads over one of its network links (seed 004 §4.2): one-way latency and
    bandwidth of the path to the edge server, and the whole board's power while an offload is in
    flight (None: the power mode's `radio_tx_w`). The simulated lab shapes its link emulator and
    draws power with these; on a real lab they only say what to expect."""

    latency_ms: float = Field(ge=0)
    bandwidth_mbps: float = Field(gt=0)
    loss: float = Field(0.0, ge=0, lt=1)
    power_w: float | None = Field(None, gt=0)

    def offload_ms(self, request_bytes: int, reply_bytes: int) -> float:
        """Network time of one exchange: both one-way latencies and both serialisations."""
        return 2 * self.latency_ms + (request_bytes + reply_bytes) * 8 / (self.bandwidth_mbps * 1e3)


class PowerMode(_Strict):
    """One power mode of a family that has several (Jetson nvpmodel 7W / 15W)."""

    device_model: DeviceModel
    power: PowerProfile


class BoardFamily(_Strict):
    """One family of boards. Families with power modes take `power`/`device_model` from the default mode."""

    name: str = Field(json_schema_extra={"from_key": True})  # the file's stem
    display_name: str
    kind: Literal["mcu", "linux"]
    cpu: str
    clock_mhz: float = Field(gt=0)
    sram_kib: int | None = Field(None, gt=0)
    flash_kib: int | None = Field(None, gt=0)
    ram_mib: int | None = Field(None, gt=0)  # external or system RAM: models and arenas load there
    accelerator: str | None = None
    connectivity: list[str]
    runtimes: list[str] = Field(min_length=1)
    flasher: str = Field(min_length=1)  # the labbench.drivers entry point that flashes it ("ssh": deployed)
    # the labbench.drivers entry point that runs its inferences and the labbench.sims one that simulates it;
    # unnamed, its kind's (_kind_defaults: the default "" stays only where the kind itself is invalid)
    target: str = Field("", min_length=1)
    simulator: str = Field("", min_length=1)
    serial_baud: int | None = Field(None, gt=0)
    power: PowerProfile
    device_model: DeviceModel
    power_modes: dict[str, PowerMode] = {}
    default_power_mode: str | None = None
    links: dict[LinkKind, LinkFigures] = {}  # the network links it can offload over
    references: dict[str, str]
    sources: dict[str, str]

    @model_validator(mode="before")
    @classmethod
    def _from_default_mode(cls, data: Any) -> Any:
        """A family with power modes writes its figures once, under power_modes."""
        if isinstance(data, dict) and "power" not in data and "device_model" not in data:
            mode = (data.get("power_modes") or {}).get(data.get("default_power_mode"))
            if isinstance(mode, dict):
                data = {**data, "power": mode.get("power"), "device_model": mode.get("device_model")}
        return data

    @model_validator(mode="before")
    @classmethod
    def _kind_defaults(cls, data: Any) -> Any:
        """The target and simulator a family does not name are its kind's."""
        if isinstance(data, dict) and isinstance(data.get("kind"), str):
            return {**KIND_DEFAULTS.get(data["kind"], {}), **data}
        return data

    def profile(self, power_mode: str | None = None) -> tuple[DeviceModel, PowerProfile]:
        """The device model and power profile in `power_mode` (None: the default)."""
        if power_mode is None:
            return self.device_model, self.power
        if power_mode not in self.power_modes:
            raise CatalogError(f"{self.name}: {unknown('power mode', power_mode, self.power_modes)}")
        mode = self.power_modes[power_mode]
        return mode.device_model, mode.power

    def link(self, kind: str, power_mode: str | None = None) -> LinkFigures:
        """The figures of link `kind`, with the power filled in from `power_mode`'s profile."""
        if kind not in self.links:
            raise CatalogError(f"{self.name}: {unknown('network link', kind, self.links)}")
        figures = self.links[kind]
        if figures.power_w is not None:
            return figures
        return figures.model_copy(update={"power_w": self.profile(power_mode)[1].radio_tx_w})

    def fits(self, model_bytes: int, arena_bytes: int) -> str | None:
        """None if the model and its arena fit this family's memories, else what does not fit.

        Boards with RAM (Linux boards; the Coral Micro's SDRAM) load the model into RAM next to the
        arena. Boards without (ESP32, Nano 33) run the model from flash and keep the arena in SRAM.
        """
        problems = []
        if self.flash_kib is not None and model_bytes > self.flash_kib * 1024:
            problems.append(f"model {model_bytes:,} B exceeds flash {self.flash_kib:,} KiB")
        if self.ram_mib is not None:
            if model_bytes + arena_bytes > self.ram_mib * 1024 * 1024:
                problems.append(
                    f"model {model_bytes:,} B + arena {arena_bytes:,} B exceeds RAM {self.ram_mib:,} MiB"
                )
        elif self.sram_kib is not None and arena_bytes > self.sram_kib * 1024:
            problems.append(f"arena {arena_bytes:,} B exceeds SRAM {self.sram_kib:,} KiB")
        return "; ".join(problems) or None

    def cite(self, key: str) -> str:
        """The source of the number at `key` (e.g. "power.active_w"), its reference spelled out."""
        source = self.sources[key]
        ref = _reference(source)
        return f"{source} [{ref}: {self.references[ref]}]"


def default_devices_dir() -> Path:
    """The catalog shipped with the package (labbench.devices: devices/ of the checkout when editable)."""
    files = resources.files("labbench.devices")
    if not isinstance(files, Path):  # a zip, or a namespace package over several directories
        raise CatalogError(f"the package's board catalog is not a directory: {files}")
    return files


def family_files(devices_dir: str | Path | None = None) -> dict[str, Traversable]:
    """Every family file by name: `devices_dir`'s (default: the package's own catalog), then those of
    the packages registered under `labbench.devices` (see the module docstring)."""
    devices_dir = Path(devices_dir) if devices_dir is not None else default_devices_dir()
    packaged: dict[str, Traversable] = {}
    for ep in entry_points(group=FAMILY_GROUP):
        for file in resources.files(ep.module).iterdir():
            if not (file.name.endswith(".yaml") and file.is_file()):
                continue
            name = file.name.removesuffix(".yaml")
            if name in packaged:
                raise CatalogError(f'board family "{name}" is defined twice: in {packaged[name]} and {file}')
            packaged[name] = file
    local: dict[str, Traversable] = {p.stem: p for p in devices_dir.glob("*.yaml")}
    return dict(sorted({**packaged, **local}.items()))


def load_family(name: str, devices_dir: str | Path | None = None) -> BoardFamily:
    """Read and validate the family `name` (see `family_files`); an unknown name lists the known families."""
    files = family_files(devices_dir)
    if name not in files:
        where = devices_dir if devices_dir is not None else default_devices_dir()
        raise CatalogError(f"{unknown('board family', name, files)} in {where}")
    return _load_file(files[name])


def families(devices_dir: str | Path | None = None) -> dict[str, BoardFamily]:
    """Every family (see `family_files`), by name."""
    return {name: _load_file(file) for name, file in family_files(devices_dir).items()}


def _load_file(file: Traversable) -> BoardFamily:
    with resources.as_file(file) as path:
        return _load(path)


def _load(path: Path) -> BoardFamily:
    label = f"{path.parent.name}/{path.name}"
    try:
        src = Source.load(path, CatalogError)
    except CatalogError as exc:  # a YAML syntax error names the bare file; name it as the others do
        message = str(exc)
        raise CatalogError(
            label + message.removeprefix(path.name) if message.startswith(f"{path.name}:") else message
        ) from None
    src.label = label
    if not isinstance(src.data, dict):
        raise CatalogError(src.where((), "expected a mapping of family settings"))
    data = plain(src.data)
    problems = _layout_problems(data, path.stem)
    if problems:
        raise CatalogError("\n".join(src.where(loc, msg) for loc, msg in problems))
    family: BoardFamily = src.validate(BoardFamily, {**data, "name": path.stem}, CatalogError)
    problems = _kind_problems(family) + _source_problems(data)
    if problems:
        raise CatalogError("\n".join(src.where(loc, msg) for loc, msg in problems))
    return family


Problems = list[tuple[KeyPath, str]]


def _layout_problems(data: dict[str, Any], name: str) -> Problems:
    """The file does not name itself; power modes and the top-level figures exclude each other; the
    default mode must be one of the modes."""
    named: Problems = (
        [(("name",), f'unknown key; a family is named by its file name, "{name}"')] if "name" in data else []
    )
    modes, default = data.get("power_modes"), data.get("default_power_mode")
    if not modes:
        return named + (
            [(("default_power_mode",), "only a family with power_modes has a default")] if default else []
        )
    clash: Problems = named + [
        ((key,), "not allowed with power_modes (each mode has its own)")
        for key in ("power", "device_model")
        if key in data
    ]
    if default is None:
        return clash + [(("power_modes",), "a family with power_modes needs default_power_mode")]
    if not isinstance(modes, dict) or not isinstance(default, str) or default in modes:
        return clash
    return clash + [(("default_power_mode",), unknown("power mode", str(default), modes))]


def _kind_problems(family: BoardFamily) -> Problems:
    """What an MCU or a Linux board must declare, and which flashers fit each."""
    if family.kind == "mcu":
        needed: tuple[str, ...] = ("sram_kib", "flash_kib", "serial_baud")
        wrong_flasher = family.flasher == "ssh"
    else:
        needed = ("ram_mib",)
        wrong_flasher = family.flasher != "ssh"
    problems: Problems = [
        ((key,), f"required when kind is {family.kind}") for key in needed if getattr(family, key) is None
    ]
    if wrong_flasher:
        problems.append((("flasher",), f'"{family.flasher}" cannot flash a board of kind {family.kind}'))
    return problems


def _source_problems(data: dict[str, Any]) -> Problems:
    """Every number names a source; every source names a number (or a null it explains) and a reference."""
    leaves = dict(_leaves(data, ()))
    sources, refs = data.get("sources", {}), data.get("references", {})
    problems: Problems = [
        (loc, "no source: add it under sources:")
        for key, (loc, value) in leaves.items()
        if _is_number(value) and key not in sources
    ]
    for key, citation in sources.items():
        if key not in leaves:
            numeric = [k for k, (_, v) in leaves.items() if _is_number(v)]
            problems.append((("sources", key), unknown("key", key, numeric)))
        elif _reference(citation) not in refs:
            known = unknown("reference", _reference(citation), refs)
            problems.append((("sources", key), f"the citation must start with a reference: {known}"))
    return problems


def _leaves(node: Any, loc: KeyPath) -> Iterator[tuple[str, tuple[KeyPath, Any]]]:
    """(dotted key, (key path, value)) for every scalar outside references: and sources:."""
    if isinstance(node, dict):
        for key, value in node.items():
            if not loc and key in ("references", "sources"):
                continue
            yield from _leaves(value, loc + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _leaves(value, loc + (i,))
    else:
        yield ".".join(str(p) for p in loc), (loc, node)


def _reference(citation: str) -> str:
    """The reference a citation starts with: its first word, without trailing punctuation."""
    match = _REF.match(citation)
    return match.group(0) if match else ""


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Number) and not isinstance(value, bool)
