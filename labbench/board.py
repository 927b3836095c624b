"""A board of the lab bound to its family and drivers, and the OS-level lock that makes it ours.

`Board` knows which capabilities a board has from lab.yaml alone (no connection needed), and builds
each driver on first use from the `labbench.drivers` / `labbench.instruments` entry points, so a lab
adds a board family or an instrument by installing a package, without editing this module.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import Any, Self, cast

from labbench import catalog, locks
from labbench.capabilities import Deployer, Flasher, ImageBuilder, InferenceTarget, InstallRecord, PowerMeter
from labbench.errors import UsageError
from labbench.inventory import DRIVER_GROUP, INSTRUMENT_GROUP, BoardEntry, Lab, registered
from labbench.steps import Step, step
from labbench.steps import count as steps_count
from labbench.steps import since as steps_since
from labbench.yamlsource import unknown


def _construct(
    group: str, name: str, capability: type[Any], entry: Any, family: Any = None, **context: Any
) -> object:
    """The `name` plugin of `group` built for `entry`; it must implement `capability` (a capability
    Protocol: the callers cast to it, which this check makes safe). Of `context` (what the board
    knows besides the entry and family: the lab's name), `from_lab` gets the keywords it takes."""
    plugins = registered(group)
    if name not in plugins:
        raise UsageError(unknown(group.split(".")[-1].rstrip("s"), name, plugins))
    from_lab = plugins[name].load().from_lab
    params = inspect.signature(from_lab).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        context = {k: v for k, v in context.items() if k in params}
    driver = from_lab(entry, family, **context)
    if not isinstance(driver, capability):
        raise UsageError(
            f"{group} entry point {name!r} ({type(driver).__name__}) is not a {capability.__name__}"
        )
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
        if e.link:
            caps.add("hi")  # it offloads over a network link (hierarchical inference)
        return caps

    @cached_property
    def target(self) -> InferenceTarget:
        """The InferenceTarget: the driver the family names (by default the MLPerf Tiny DUT over serial for
        an MCU, the SSH runner for a Linux board, which keeps its files in a directory per lab)."""
        target = _construct(
            DRIVER_GROUP, self.family.target, InferenceTarget, self.entry, self.family, lab=self.lab.name
        )
        return cast(InferenceTarget, target)

    @cached_property
    def flasher(self) -> Flasher:
        flash = self.entry.flash
        if "flash" not in self.capabilities or flash is None:
            raise UsageError(f"{self.name}: has no flash: settings in {self.lab.path.name}")
        return cast(Flasher, _construct(DRIVER_GROUP, flash.tool, Flasher, self.entry, self.family))

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
        return cast(PowerMeter, _construct(INSTRUMENT_GROUP, inst.kind, PowerMeter, inst))

    def install(
        self, model: Path, dataset: Path | None = None, build_dir: Path = Path("build")
    ) -> InstallRecord:
        """Put `model` on the board: flash an MCU (with the image its flasher builds around the model, if it
        builds one: an ESP32 app image) or deploy it. Each driver skips the transfer when the board already
        holds the same bytes."""
        with step(self.name, "install", Path(model).name):
            if "deploy" in self.capabilities:
                return self.deployer.deploy(model, dataset)
            self._close("target")  # a serial port has one user: the flasher needs it to itself
            image = Path(model)
            if isinstance(self.flasher, ImageBuilder):
                image = self.flasher.build_image(image, build_dir / "firmware" / self.name / image.stem)
            mark, started = steps_count(), time.monotonic()
            record = self.flasher.flash(str(image))
            return self._with_cold_start(record, steps_since(mark), (started, time.monotonic()))

    def _with_cold_start(
        self, record: InstallRecord, taken: list[Step], call: tuple[float, float]
    ) -> InstallRecord:
        """The install's cold start, for a board whose port cannot reset it (lab.yaml `serial: {reset:
        none}`: USB CDC boards, which the host cannot reset and whose port re-enumerates on reset). Its
        flasher reset it after writing, so that boot is timed on the DUT's clock and, bounded by the
        flasher's own step (`flash with ...`, `taken` during the install; else the whole `call`), on
        the host's: DutSerial.boot_cold_start. The figures go into the record's detail with their
        `cold_start_basis` ("host_and_dut"; "dut_clock" alone when the install was skipped) and stay
        with the target, whose identify reports them to the run. A board reset through its port
        (`reset: rts`) is timed at the start of every run instead (labbench.measure.run)."""
        serial = self.entry.serial
        if serial is None or serial.reset == "rts" or not hasattr(self.target, "boot_cold_start"):
            return record
        flashes = [s for s in taken if s.board == self.name and s.name.startswith("flash with") and s.end_s]
        window = None if record.skipped else (flashes[-1].start_s, flashes[-1].end_s) if flashes else call
        with step(self.name, "cold start", "of the install's boot"):
            cold = self.target.boot_cold_start(window)
        return replace(record, detail={**record.detail, **cold}) if cold else record

    @property
    def power_channel(self) -> int:
        if self.entry.power is None:
            raise UsageError(f"{self.name}: has no power: link in {self.lab.path.name}")
        return self.entry.power.channel

    def lock_keys(self) -> list[locks.Key]:
        """What the board is attached to (see labbench.locks): its serial port or SSH host:port, and
        its power instrument's channel. No key involves the board's name."""
        e = self.entry
        if e.serial:
            keys = locks.serial_keys(e.serial.url)
        else:
            assert e.ssh is not None  # lab.yaml gives a board exactly one of serial: and ssh:
            keys = locks.network_keys(
                e.ssh.host, e.ssh.port, f"ssh://{locks.host_text(e.ssh.host)}:{e.ssh.port}"
            )
        if e.power:
            keys += locks.instrument_keys(self.lab.instruments[e.power.instrument].resource, e.power.channel)
        return keys

    def acquire(self) -> Self:
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
