"""The `Measurement` record: what one measured (board, model) run produced, and where it came from.

Every number carries its unit in its name and every record its provenance (board, family, sim or
hw, model and firmware sha256, instrument identity, bench git revision, lab.yaml sha256), so a
value in a report or a journal can be traced back to how it was obtained.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from labbench import __version__

SCHEMA = 1


@lru_cache(maxsize=1)
def git_revision() -> str:
    """The bench's git revision (with `-dirty` when the tree has changes), or `unknown` outside git."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return rev or "unknown"


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Provenance(_Record):
    board: str
    family: str
    source: Literal["sim", "hw"]
    power_mode: str | None = None
    model_sha256: str
    firmware_sha256: str | None = None  # the flashed image (MCU) or the deployed runner (Linux)
    dataset_sha256: str | None = None
    instrument: str | None = None  # the instrument's *IDN? reply
    dut: str | None = None  # what the DUT said it is
    bench_version: str = __version__
    bench_git_rev: str = Field(default_factory=lambda: git_revision())
    lab_sha256: str


class Latency(_Record):
    """Per-inference latency on the device's own clock."""

    samples_ms: list[float]
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    p50_ci95_ms: tuple[float, float]
    p99_ci95_ms: tuple[float, float]
    throughput_windows_ms: list[float] = []  # 1000/throughput of each back-to-back window (MLPerf Tiny)
    median_window_ms: float | None = None
    method: str


class Uncertainty(_Record):
    """A figure's stated uncertainty (a bound, in the figure's unit) and what it is made of."""

    total: float  # the sum of the components
    accuracy: float  # the instrument's documented accuracy for the ranges it held
    rounding: float  # the printed digits of the readings (and of the integrator's running total)
    edges: float  # apportioning the instrument updates straddling the window edges, and their timing
    spread: float = 0.0  # between the windows (half the range of their values)


class Energy(_Record):
    """Energy per inference by both methods, over the median-latency window, with the idle baseline."""

    per_inference_mj: float  # the reported value (integrator when available, else power x latency)
    power_x_latency_mj: float  # average power over the steady-state window x latency per inference
    integrated_mj: float | None  # integrator energy over the window / inference count
    uncertainty_mj: float  # of per_inference_mj: the total of uncertainties["per_inference_mj"]
    active_power_w: float
    idle_power_w: float
    dynamic_mj: float  # (active - idle) x latency: the inference's own share
    window_s: float
    inferences: int
    windows: int
    #: the reported (median) window's start and end on the host monotonic clock, the clock of the
    #: power trace and of a simulated lab's ledger
    window_host_s: tuple[float, float] | None = None
    method: str
    #: per figure (a field name above: per_inference_mj, power_x_latency_mj, integrated_mj,
    #: active_power_w, idle_power_w, dynamic_mj), its uncertainty and the components
    uncertainties: dict[str, Uncertainty] = {}
    voltage_range_v: float | None = None  # the ranges the analyzer held over the reported window
    current_range_a: float | None = None
    ranges: str | None = None  # how they were chosen (a pre-scan's peaks, or lab.yaml)
    remeasured: list[str] = []  # each invalid measurement of a window (or the idle baseline), and why


class Memory(_Record):
    flash_bytes: int | None = None  # the model (MCU image) bytes stored on the device
    arena_bytes: int | None = None  # TFLite Micro tensor arena
    peak_rss_kib: int | None = None  # Linux boards


class Measurement(_Record):
    """One journalled result: latency, energy, accuracy, cold start and memory of a model on a board."""

    schema_version: int = SCHEMA
    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    time_utc: str = Field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat())
    test: str | None = None  # the pytest node id that produced it
    board: str
    model: str
    config: str | None = None  # model configuration (fp32, pruned fp32, int8, aggressive int8)
    latency: Latency | None = None
    energy: Energy | None = None
    accuracy: float | None = None
    accuracy_n: int | None = None
    cold_start_ms: float | None = None
    cold_start_breakdown_ms: dict[str, float] = {}
    memory: Memory = Memory()
    runtime: str | None = None
    provenance: Provenance
    extra: dict[str, Any] = {}
    #: "partial": what was measured before an infrastructure error cut the run short (`error`);
    #: journalled and reported, never judged against a budget or used as a baseline
    status: Literal["valid", "partial"] = "valid"
    error: str | None = None


class Event(_Record):
    """An infrastructure event journalled beside the measurements: an attempt at a board step
    (failed, with the recovery made before the next one, or the attempt that succeeded after a
    failure), or a board quarantined for the rest of a session."""

    schema_version: int = SCHEMA
    kind: Literal["attempt", "quarantine"]
    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    time_utc: str = Field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat())
    test: str | None = None  # the pytest node id it happened in
    board: str
    step: str  # e.g. "install digits_mlp_int8", "measure digits_mlp_int8"
    error: str | None = None  # None on the attempt that succeeded
    attempt: int | None = None  # 1-based, of `attempts`
    attempts: int | None = None
    recovery: str | None = None  # what was done before the next attempt, or how that failed


EVENT_KINDS = ("attempt", "quarantine")
