"""Simulators of the ACME M0 board and the ACME PS1K sampler, for labbench's simulated lab.

Both are `labbench.sims` entry points (labbench.sim.Simulator): `BoardSimulator` is the `simulator`
the acme_m0 family names, `SamplerSimulator` simulates instruments of kind ps1k. `labbench lab check`
loads them for their settings, so this module stays light: the simulators themselves (`board`,
`sampler`) load when the simulated lab builds them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from labbench.sim import SimPart

if TYPE_CHECKING:
    from labbench.sim.faults import InstrumentFaults
    from labbench_acme.sim.board import AcmeBoardSim
    from labbench_acme.sim.sampler import Ps1kSim


class AcmeBoardSettings(BaseModel):
    """What lab.yaml's `sim:` block of an ACME M0 takes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = Field(None, min_length=1)  # the .tflite it boots with (relative: to lab.yaml's dir)
    speed_factor: float = Field(1.0, gt=0)  # > 1: a slower board
    boot_ms: float = Field(20.0, ge=0)  # from reset to the firmware answering


class SamplerSettings(BaseModel):
    """What lab.yaml's `sim:` block of a PS1K takes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rate_hz: float = Field(1000.0, gt=0, le=100_000)
    buffer_s: float = Field(60.0, gt=0)  # samples kept for the host to fetch


class BoardSimulator:
    """The `labbench.sims` entry point `acme_m0`: the simulator the acme_m0 family names."""

    settings = AcmeBoardSettings

    @staticmethod
    def build(part: SimPart) -> tuple[AcmeBoardSim, None]:
        from labbench_acme.sim.board import AcmeBoardSim

        s = AcmeBoardSettings.model_validate(part.settings)
        assert part.family is not None  # every board has one
        model = part.lab_dir / s.model if s.model else None
        board = AcmeBoardSim(
            part.name,
            part.host,
            part.port,
            part.family,
            part.channel,
            model=model,
            speed_factor=s.speed_factor,
            boot_ms=s.boot_ms,
        )
        return board, None


class SamplerSimulator:
    """The `labbench.sims` entry point `ps1k`: simulated instruments of kind ps1k."""

    settings = SamplerSettings

    @staticmethod
    def build(part: SimPart) -> tuple[Ps1kSim, InstrumentFaults]:
        from labbench_acme.sim.sampler import Ps1kSim

        s = SamplerSettings.model_validate(part.settings)
        sampler = Ps1kSim(
            part.name, part.host, part.port, part.channel, rate_hz=s.rate_hz, buffer_s=s.buffer_s
        )
        return sampler, sampler.faults
