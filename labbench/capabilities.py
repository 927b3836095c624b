"""The capabilities tests ask a board or instrument for, as typing.Protocols, and the records they return.

Drivers implement these; tests and `measure` depend only on them, never on a driver class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self, runtime_checkable

if TYPE_CHECKING:
    import numpy as np

    from labbench.powertrace import PowerTrace

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
    detail: dict[str, Any] = field(
        default_factory=dict
    )  # the tool's own facts: bytes, regions, files, boot log

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


@dataclass(frozen=True, eq=False)
class HiRun:
    """A hierarchical-inference pass on a device (seed 004 §2), one entry per sample in order.

    `p1`, `p2` are the local model's two highest probabilities, `accepted` the decision module's
    verdict (True: the local top-1 is final), `local_class` the local top-1 (-1 where no local
    inference ran: remote-only), `final_class` the class the device ends with (the server's where
    offloaded). Times are the device's own clock, in microseconds: local inference, decision, and
    offload (send, remote inference, reply received; 0 where not offloaded). `windows` are the spans
    the device ran samples back to back with no host traffic between them, on the host monotonic
    clock (start_s, end_s, samples): the power trace's windows for the strategy's energy.
    """

    p1: np.ndarray
    p2: np.ndarray
    accepted: np.ndarray
    local_class: np.ndarray
    final_class: np.ndarray
    t_inf_us: np.ndarray
    t_dec_us: np.ndarray
    t_off_us: np.ndarray
    windows: tuple[tuple[float, float, int], ...]
    extra: dict[str, Any] = field(default_factory=dict)  # runtime, server replies' own times, ...

    @property
    def count(self) -> int:
        return len(self.accepted)


@runtime_checkable
class HiTarget(Protocol):
    """A device that runs hierarchical inference: its local model, a decision module, and offload of
    the samples it does not accept to an edge server over its own network link.

    `decision` is `labbench.strategies.decision`'s device form: `{"kind": "logistic", "w1", "w2",
    "b"}`, `{"kind": "threshold", "theta"}`, or `{"kind": "remote"}` (no local inference: every
    sample offloaded). `server` is the (host, port) the device connects to. `settle_s`: the device
    idles this long before each pass's first sample (a Linux runner, whose start-up and reporting are
    CPU work, also after its last, before reporting), so that a power meter sees idle beside the
    pass's window.
    """

    def hi_configure(
        self, decision: dict[str, str | float], server: tuple[str, int], *, settle_s: float = 0.0
    ) -> None: ...

    def hi_run(self, samples: np.ndarray) -> HiRun: ...


@runtime_checkable
class InferenceTarget(Protocol):
    """A device that runs a model: identify it, time back-to-back inferences, classify a dataset."""

    def identify(self) -> DutIdentity: ...

    def run_timed(
        self, sample: np.ndarray, count: int, warmup: int, *, per_inference: bool = False
    ) -> TimedRun:
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
class ImageBuilder(Protocol):
    """A flasher whose board runs an image built around the model (the ESP32's app image) rather than the
    model file: the board has it build the image before flashing."""

    def build_image(self, model: Path, out_dir: Path) -> Path:
        """Write the image embedding `model` (and whatever goes with it) into `out_dir`; returns the image."""
        ...


@runtime_checkable
class Deployer(Protocol):
    """Puts a model (and what runs it) onto a Linux board."""

    def deploy(self, model: str | Path, dataset: str | Path | None = None) -> InstallRecord: ...


class PowerCapture(Protocol):
    """A power capture on one channel, open while its `with` block runs.

    Its `trace` is a labbench.powertrace.PowerTrace: updates, each the mean power over the period
    that ended at its refresh, placed on the host monotonic clock by when it can have been refreshed
    (`seen_after_s` .. `seen_by_s`). An averaging analyzer's updates are its readings (the PM1000+: one
    per 0.5 s, polled); a sampler's are its samples (numbered in `tick`, so one clock fits them all),
    a thousand a second or more. What else an update carries the energy method uses where present: the
    lowest and highest instantaneous power (which show a guard stretch steady), the documented accuracy
    and printed rounding, ranges and overloads, an integrator's running total.

    Entering returns once the first update is in, so that marks made afterwards lie inside the trace;
    leaving waits for the updates that cover the last mark (two that began after it) and stops. A
    capture that fails raises labbench.errors.InstrumentError, leaving with what it captured as the
    error's `partial`. A capture may also offer `failed` (a threading.Event set when it fails), which
    measure passes to the target so a run stops at once.
    """

    def __enter__(self) -> Self: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None: ...

    def mark(self, label: str, t_s: float | None = None) -> float:
        """Record an event at `t_s` (default now) on the host monotonic clock; returns its time."""
        ...

    def wait_for_updates_after(self, t_s: float, count: int = 1) -> None:
        """Return once `count` updates refreshed after `t_s` are in (or the capture has failed)."""
        ...

    @property
    def trace(self) -> PowerTrace:
        """Everything captured so far."""
        ...


@runtime_checkable
class PowerMeter(Protocol):
    """An instrument that captures power on a channel in sync with the host clock (see PowerCapture).

    It fits an averaging analyzer (the PM1000+) and a high-rate sampler alike: `update_period_s` is
    how long one update of its traces averages (0.5 s; 1 ms for a 1 kHz sampler), and measure keeps
    guard stretches of whole updates beside each energy window. labbench.measure.run also uses, where
    a meter has them: `result_latency_s` (how long after its period an update may appear), and range
    control for an analyzer whose autoranging would blank updates (`ranges_from_lab`, `range_tables`,
    `range_note`, `lowest_ranges()`, `hold_ranges(trace)`, `step_up(updates)`): a pre-scan fixes the
    ranges, an overload in a window raises them.
    """

    name: str  # the lab.yaml instrument name, for steps and errors
    update_period_s: float

    def identity(self) -> str:
        """What the instrument says it is (maker, model, serial number), for provenance."""
        ...

    def open(self) -> object:
        """Connect (again, after `close`: the pytest plugin reconnects after an instrument fault)."""
        ...

    def close(self) -> None: ...

    def capture(self, channel: int | str = 1) -> PowerCapture: ...


@runtime_checkable
class Closable(Protocol):
    """A driver holding a connection it lets go of (a serial port, an SSH session); the next use
    opens it again."""

    def close(self) -> None: ...


@runtime_checkable
class Reconnectable(Protocol):
    """A target that connects again after a fault (an SSH board)."""

    def connect(self) -> object: ...


@runtime_checkable
class Resettable(Protocol):
    """A target that can reset the board into its model (a cold start)."""

    def reset(self) -> object: ...


@runtime_checkable
class Resyncable(Protocol):
    """A target that brings its link back in step without a reset (a serial DUT whose port cannot
    reset the board)."""

    def resync(self) -> object: ...


CAPABILITIES.update(flash=Flasher, deploy=Deployer, inference=InferenceTarget, hi=HiTarget, power=PowerMeter)
