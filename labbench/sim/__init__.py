"""The simulated lab: boards and instruments that listen on real ports and speak the real protocols.

Simulators are entry points of the group `labbench.sims` (labbench.inventory.SIM_GROUP), named by
the instrument kind they simulate (`pm1000`) or by the `simulator` a board family names (`mcu`,
`linux`: the catalog's defaults for the two kinds). An entry point is a `Simulator`: the settings
its lab.yaml `sim:` block takes, as a pydantic model (`labbench lab check` validates the block
with it), and `build(part)`, which makes the running simulator of one board or instrument on the
address lab.yaml gives. `labbench sim up` builds and starts them all (labbench.sim.lab), so a
package adds a simulated board or instrument without editing the bench.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from pydantic import BaseModel

    from labbench.catalog import BoardFamily
    from labbench.inventory import BoardEntry, InstrumentEntry
    from labbench.sim.faults import Injector
    from labbench.sim.powerbus import PowerBus, PowerChannel
    from labbench.sim.radio import Radio


def bus_channel(instrument: str, channel: int = 1) -> str:
    """The power bus channel an instrument input measures and a board wired to it draws from."""
    return f"{instrument}:{channel}"


@dataclass(frozen=True)
class SimPart:
    """One simulated board or instrument of lab.yaml, as the simulated lab hands it to its simulator."""

    entry: BoardEntry | InstrumentEntry  # its lab.yaml entry
    family: BoardFamily | None  # a board's family (None for an instrument)
    host: str  # where it listens: lab.yaml's address for it
    port: int
    settings: dict[str, Any]  # its `sim:` block without the faults, validated with the simulator's settings
    bus: PowerBus  # the lab's power bus (an instrument's input n: `bus.channel(bus_channel(name, n))`)
    channel: PowerChannel  # what a board draws from, or what an instrument's input 1 measures
    lab_dir: Path  # lab.yaml's directory (relative paths in settings are relative to it)
    state_dir: Path  # a directory of its own for state (created by the simulator if it needs it)
    radio: Radio | None = None  # a board's offload link, when lab.yaml gives it one (`link:`)

    @property
    def name(self) -> str:
        return self.entry.name


class Running(Protocol):
    """A built simulator. The simulated lab starts it, stops it at the end, and uses what it offers of:
    `pids()` (child processes it started), `load_firmware(image: bytes)` (what a stand-in flashing tool
    asks the lab to load into a board)."""

    def start(self) -> object: ...

    def stop(self) -> None: ...


class Simulator(Protocol):
    """A `labbench.sims` entry point (see the module docstring)."""

    settings: type[BaseModel]  # what its lab.yaml `sim:` block takes besides `faults`

    def build(self, part: SimPart) -> tuple[Running, Injector | None]:
        """The simulator of `part`, not started yet, and the injector lab.yaml's `faults:` and `labbench
        sim` arm (None: it injects none)."""
        ...
