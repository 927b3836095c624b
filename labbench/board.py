"""A board of the lab bound to its family and drivers, and the OS-level lock that makes it ours.

`Board` knows which capabilities a board has from lab.yaml alone (no connection needed), and builds
each driver on first use from the `labbench.drivers` / `labbench.instruments` entry points, so a lab
adds a board family or an instrument by installing a package, without editing this module.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any, Self, TypeVar

from labbench import catalog, locks
from labbench.capabilities import Deployer, Flasher, InferenceTarget, InstallRecord, PowerMeter
from labbench.errors import UsageError
from labbench.steps import step
from labbench.inventory import DRIVER_GROUP, INSTRUMENT_GROUP, BoardEntry, Lab, registered
from labbench.yamlsource import unknown

T = TypeVar("T")


def _construct(group: str, name: str, capability: type[T], entry: Any, family: Any = None, **options: Any) -> T:
    """The `name` plugin of `group` built for `entry`; it must implement `capability`."""
    plugins = registered(group)
    if name not in plugins:
        raise UsageError(unknown(group.split(".")[-1].rstrip("s"), name, plugins))
    driver = plugins[name].load().from_lab(entry, family, **options)
    if not isinstance(driver, capability):
        raise UsageError(f"{group} entry point {name!r} ({type(driver).__name__}) is not a {capability.__name__}")
    return driver


class Board:
    """One board: its lab.yaml entry, its family, and lazily-built drivers for each capability."""

    def __init__(self, lab: Lab, name: str):
        self.lab, self.entry = lab, lab.board(name)
        self.name = name
        self.family = catalog.load_family(self.entry.family, lab.devices_dir)
        self._locks: list[int] = []  # open lock files while acquired

    def __repr__(self) -> str:
        return f"Board({self.name!r}, {self.family.name})"

    @property
    def simulated(self) -> bool:
        return self.entry.simulated

    @property
    def capabilities(self) -> set[str]:
        """What tests may ask of this board (see `@pytest.mark.requires`)."""
        e: BoardEntry = self.entry
        caps = {"inference"}
        caps |= {"flash"} if e.serial else {"deploy"}
        if e.serial and not e.flash:
            caps.discard("flash")
        if e.power:
            caps.add("power")
        return caps

    @cached_property
    def target(self) -> InferenceTarget:
        """The InferenceTarget: the MLPerf Tiny DUT over serial, or the SSH runner."""
        if self.entry.serial:
            return _construct(DRIVER_GROUP, "dut_serial", InferenceTarget, self.entry, self.family)
        # its own directory per lab
        return _construct(DRIVER_GROUP, "ssh", InferenceTarget, self.entry, self.family, lab=self.lab.name)

    @cached_property
    def flasher(self) -> Flasher:
        if "flash" not in self.capabilities:
            raise UsageError(f"{self.name}: has no flash: settings in {self.lab.path.name}")
        return _construct(DRIVER_GROUP, self.entry.flash.tool, Flasher, self.entry, self.family)

    @property
    def deployer(self) -> Deployer:
        if "deploy" not in self.capabilities:
            raise UsageError(f"{self.name}: is not an SSH board; flash it instead")
        target = self.target
        if not isinstance(target, Deployer):
            raise UsageError(f"{self.name}: its driver {type(target).__name__} cannot deploy")
        return target

    @cached_property
    def power_meter(self) -> PowerMeter:
        if self.entry.power is None:
            raise UsageError(f"{self.name}: has no power: link in {self.lab.path.name}")
        inst = self.lab.instruments[self.entry.power.instrument]
        return _construct(INSTRUMENT_GROUP, inst.kind, PowerMeter, inst)

    def install(self, model: Path, dataset: Path | None = None, build_dir: Path = Path("build")) -> InstallRecord:
        """Put `model` on the board: flash an MCU (an ESP32 app image is packed first) or deploy over SSH.
        Each driver skips the transfer when the board already holds the same bytes."""
        with step(self.name, "install", Path(model).name):
            if "deploy" in self.capabilities:
                return self.deployer.deploy(model, dataset)
            self._close("target")  # a serial port has one user: the flasher needs it to itself
            image = Path(model)
            if self.family.flasher == "esptool":
                from labbench.firmware_image import pack

                image = pack(model, build_dir / "firmware" / self.name / Path(model).stem, board="esp32").image
            return self.flasher.flash(str(image))

    @property
    def power_channel(self) -> int:
        return self.entry.power.channel

    def lock_keys(self) -> list[locks.Key]:
        """What the board is attached to (see labbench.locks): its serial port or SSH host:port, and
        its power instrument's channel. No key involves the board's name."""
        e = self.entry
        if e.serial:
            keys = locks.serial_keys(e.serial.url)
        else:
            keys = locks.network_keys(e.ssh.host, e.ssh.port, f"ssh://{locks.host_text(e.ssh.host)}:{e.ssh.port}")
        if e.power:
            keys += locks.instrument_keys(self.lab.instruments[e.power.instrument].resource, e.power.channel)
        return keys

    def acquire(self) -> Board:
        """Lock everything the board is attached to (non-blocking, all or none): BoardBusy names the
        holder. A board already acquired keeps its locks."""
        if not self._locks:
            self._locks = locks.acquire(self.lock_keys(), self.name, self.lab.path)
        return self

    def release(self) -> None:
        locks.release(self._locks)
        for attr in ("target", "flasher", "power_meter"):
            self._close(attr)

    def _close(self, attr: str) -> None:
        driver = self.__dict__.pop(attr, None)
        if hasattr(driver, "close"):
            driver.close()

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
