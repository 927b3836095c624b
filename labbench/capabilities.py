"""The capabilities tests ask a board or instrument for, as typing.Protocols, and the records they return.

Drivers implement these; tests and `measure` depend only on them, never on a driver class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ContextManager, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np

#: capability name (as used by ``@pytest.mark.requires``) -> Protocol, filled at the end of the module
CAPABILITIES: dict[str, type] = {}


@dataclass(frozen=True)
class DutIdentity:
    """What the device says it is and what it runs."""

    name: str  # e.g. the MLPerf Tiny `name%` vendor string, or the Linux board's hostname
    model: str  # the model the DUT reports (`profile%` model string, or the deployed model name)
    model_sha256: str | None = None
    firmware: str | None = None  # firmware version / runner version
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class InstallRecord:
    """What putting a model on a board did (a flash or a deploy), and what the board runs after it."""

    board: str
    tool: str  # the flasher or deployer: esptool, bossac, flashtool, ssh, ...
    firmware_sha256: str  # what runs the model: the flashed image, or the deployed runner
    model_sha256: str | None  # the model installed (None: a compiled image the bench cannot read)
    skipped: bool  # the board already held these bytes: nothing was written
    seconds: float
    identity: DutIdentity | None = None  # what the board said it is afterwards, when it was asked
    log: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)  # the tool's own facts: bytes, regions, files, boot log

    def provenance(self) -> dict[str, str | int | float | bool]:
        """The record's scalar facts (its detail's included), for a measurement's provenance."""
        facts = {k: v for k, v in vars(self).items() if k not in ("identity", "detail")} | self.detail
        return {k: v for k, v in facts.items() if isinstance(v, (str, int, float, bool))}


@dataclass(frozen=True)
class TimedRun:
    """Back-to-back inferences of one input (MLPerf Tiny performance mode).

    `latencies_us` are per inference on the device's own clock; `host_start`/`host_end` bracket
    the measured inferences on the host monotonic clock (seconds), so power samples can be aligned.
    """

    latencies_us: tuple[float, ...]
    host_start: float
    host_end: float
    outputs: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # cold_start_ms, peak_rss_kib, runtime, ...

    @property
    def count(self) -> int:
        return len(self.latencies_us)


@runtime_checkable
class InferenceTarget(Protocol):
    """A device that runs a model: identify it, time back-to-back inferences, classify a dataset."""

    def identify(self) -> DutIdentity: ...

    def run_timed(self, sample: np.ndarray, count: int, warmup: int, *, per_inference: bool = False) -> TimedRun:
        """`count` inferences of `sample` after `warmup`. With `per_inference`, each inference is timed on
        its own (a latency distribution); without, they run back to back (a throughput/energy window).
        A target that always times each inference back to back may ignore the flag."""
        ...

    def classify(self, samples: np.ndarray) -> np.ndarray:
        """Outputs (one row per sample) for accuracy; raises on a partial run, never returns fewer rows."""
        ...


@runtime_checkable
class Flasher(Protocol):
    """Writes a firmware image to an MCU board, verifies it and resets into it."""

    def flash(self, image: str, *, force: bool = False) -> InstallRecord: ...


@runtime_checkable
class Deployer(Protocol):
    """Puts a model (and what runs it) onto a Linux board."""

    def deploy(self, model: str | Path, dataset: str | Path | None = None) -> InstallRecord: ...


@runtime_checkable
class PowerMeter(Protocol):
    """An instrument that captures power on a channel in sync with the host clock."""

    update_period_s: float  # each reading averages this long; windows need a settled update each side

    def identity(self) -> str: ...

    def capture(self, channel: int | str = 1) -> ContextManager[Any]: ...


CAPABILITIES.update(flash=Flasher, deploy=Deployer, inference=InferenceTarget, power=PowerMeter)
