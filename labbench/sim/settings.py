"""What the built-in simulators take from a lab.yaml `sim:` block (pydantic models, checked by `labbench
lab check` through each simulator's entry point) and the faults they inject.

Light on purpose (pydantic and the fault model only): `lab check` reads these without starting, or
importing, any simulator.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from labbench.inventory import matching
from labbench.sim.faults import Fault, Link
from labbench.sim.faults import check as check_fault


class FaultInjecting:
    """What a simulator that injects faults declares: their model and which apply to a link."""

    fault: ClassVar[type[BaseModel]] = Fault

    @staticmethod
    def fault_problems(fault: BaseModel, link: Link) -> list[tuple[tuple[str, ...], str]]:
        """(key path in the fault, message) for what does not apply to a target reached by `link`."""
        assert isinstance(fault, Fault)  # made from `fault` by the caller
        return check_fault(fault, link)


class SimSettings(BaseModel):
    """The keywords a simulator takes from lab.yaml (tests/test_lab_hostile.py keeps them in step).

    A setting left out is None here and not passed on (`model_dump(exclude_unset=True)`): the
    simulator uses its own default. A setting given is passed on as it is, so it may not be null,
    except those in `_nullable`."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    _nullable: ClassVar[frozenset[str]] = frozenset()

    faults: list[Any] = []  # checked with the simulator's `fault` model

    @field_validator("*", mode="before")
    @classmethod
    def _given(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None and info.field_name not in cls._nullable:
            raise ValueError("a setting given needs a value (leave it out for the simulator's default)")
        return value


class McuSim(SimSettings):
    """Settings of a simulated MCU board (labbench.sim.mcu.SimMcuBoard)."""

    _nullable = frozenset({"model"})
    model: str | None = Field(None, min_length=1)  # the .tflite it boots with (relative: to lab.yaml's dir)
    baud: int | None = Field(None, gt=0)
    speed_factor: float | None = Field(None, gt=0)
    vendor: (
        Annotated[str, matching(r"[A-Za-z0-9 _.-]{1,32}", "up to 32 letters, digits, spaces, _, . or -")]
        | None
    ) = None  # what the DUT names itself
    rx_fifo_bytes: int | None = Field(None, gt=0)
    tx_buffer_bytes: int | None = Field(None, gt=0)
    timer_start_us: int | None = Field(None, ge=0)
    strap_delay_s: float | None = Field(None, ge=0)
    reply_crc: bool | None = None
    boot_report: bool | None = None  # answers `boot%` (the m-ext-[boot] extension)
    hi: bool | None = None  # the hierarchical-inference extension (hi-cfg, hi-srv, hi; m-ext-[hi])
    boot_ms: float | None = Field(None, ge=0)
    model_init_ms: float | None = Field(None, ge=0)
    seed: int | str | None = None  # of its latency jitter and power noise (default: the board's name)
    # wider spreads would trip the bench's check that a window lasts at least half the time per inference
    # seen before (labbench.drivers.dut_serial WINDOW_MIN_FRACTION)
    jitter_pct: float | None = Field(None, ge=0, le=10)
    outlier_rate: float | None = Field(None, ge=0, le=1)
    outlier_pct: float | None = Field(None, ge=0, le=25)
    power_noise_pct: float | None = Field(None, ge=0, le=20)


class LinuxSim(SimSettings):
    """Settings of a simulated Linux board (labbench.sim.linux.SimLinuxBoard)."""

    # the interpreter of its python3
    python: Annotated[str, matching(r"/.+", "an absolute path")] | None = None
    sample_period_s: float | None = Field(None, gt=0)
    seed: int | str | None = None  # of its power noise (default: the board's name)
    power_noise_pct: float | None = Field(None, ge=0, le=20)


class Pm1000Sim(SimSettings):
    """Settings of a simulated PM1000+ (labbench.sim.pm1000.Pm1000Sim and the Pm1000Model it runs)."""

    terminator: Literal["\n", "\r\n", "\r"] | None = None
    ack_tcp: bool | None = None
    ack_serial: bool | None = None
    use_pty: bool | None = None
    seed: int | str | None = None
    idn: Annotated[str, matching(r"[ -~]{1,100}", "up to 100 printable ASCII characters")] | None = None
    update_period_s: float | None = Field(None, gt=0)
    number_format: (
        Annotated[
            str, matching(r"%[-+ 0#]?\d{0,2}(\.\d{1,2})?[eEfFgG]", "a printf number format such as %.4E")
        ]
        | None
    ) = None
    voltage_ranges_v: tuple[Annotated[float, Field(gt=0)], ...] | None = Field(None, min_length=1)
    current_ranges_a: tuple[Annotated[float, Field(gt=0)], ...] | None = Field(None, min_length=1)
    auto_zero_interval_s: float | None = Field(None, gt=0)
    accuracy: Literal["spec", "ideal"] | None = None
    noise_pct_of_range: float | None = Field(None, ge=0)
    ndv_latency_s: float | None = Field(None, ge=0)
    ndv_jitter_s: float | None = Field(None, ge=0)
    downrange_after: int | None = Field(None, ge=1)
    downrange_fraction: float | None = Field(None, gt=0, le=1)
