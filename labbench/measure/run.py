"""Run orchestration: one model on one board -> a `Measurement`.

The sequence follows MLPerf Tiny and the seed paper's method:

1. identify the DUT and check it runs the payload (its reported sha256 or model name);
2. a latency distribution: `latency_samples` inferences, each bracketed by the DUT's own clock;
3. energy: with the power meter capturing, an idle stretch (the baseline), then `windows` windows of
   back-to-back inferences, each at least `window_s` long (MLPerf Tiny: 10 s, median of 5).
   Per window, energy per inference is computed both ways: the window's average power (from the
   instrument's updates) x the latency per inference, and the instrument's integrated energy over
   the window / the count. The median window is reported, with the idle baseline and the
   uncertainty the update period implies at the window edges;
4. accuracy: top-1 over the dataset's test split (`accuracy_samples` of it);
5. memory and cold start from what the target reports.

All times are on the host monotonic clock: the DUT's stamps are mapped onto it by its driver, the
instrument's updates by the capture, so the windows line up with the power trace.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from statistics import median
from typing import TYPE_CHECKING, Any

from labbench.board import Board
from labbench.capabilities import DutIdentity, TimedRun
from labbench.errors import HardwareError
from labbench.measure.record import Energy, Latency, Measurement, Memory, Provenance

if TYPE_CHECKING:
    import numpy as np

    from labbench.measure.power import PowerTrace, WindowEnergy
    from labbench.payloads import Payload


@dataclass(frozen=True)
class RunSettings:
    latency_samples: int = 200  # at most; fewer when they would take longer than latency_budget_s
    latency_budget_s: float = 10.0
    warmup: int = 10
    window_s: float = 10.0  # MLPerf Tiny: a window shorter than 10 s is invalid
    windows: int = 5  # MLPerf Tiny takes the median of 5
    idle_s: float = 3.0
    accuracy_samples: int | None = 400


@dataclass
class Outcome:
    """A measurement and what produced it (for plots): the power trace and the window bounds."""

    measurement: Measurement | None = None  # set once everything is measured
    trace: PowerTrace | None = None
    windows: list[tuple[float, float]] = field(default_factory=list)
    idle: tuple[float, float] | None = None


@dataclass
class _Sofar:
    """What a run has measured so far: enough for a whole record, or for a partial one after a fault."""

    identity: DutIdentity | None = None
    latency: TimedRun | None = None
    runs: list[TimedRun] = field(default_factory=list)  # completed energy windows
    energy: Energy | None = None
    window_ms: list[float] = field(default_factory=list)
    instrument: str | None = None
    accuracy: float | None = None
    accuracy_n: int | None = None


class PayloadMismatch(HardwareError):
    """The board does not run the payload the test asked for."""


def check_identity(board: Board, payload: Payload, identity: DutIdentity) -> None:
    if identity.model_sha256 and identity.model_sha256 != payload.info.sha256:
        raise PayloadMismatch(board.name, "identify", f"runs model sha256 {identity.model_sha256[:12]}, "
                              f"expected {payload.name} ({payload.info.sha256[:12]})")


def _latency(board: Board, payload: Payload, s: RunSettings, got: _Sofar) -> None:
    """Inferences timed one by one: as many as fit in `latency_budget_s` (10 to `latency_samples`),
    sized by a 3-inference probe's wall time, so neither a 600 ms model nor one whose every reply
    carries 640 outputs over a serial line takes minutes. A run cut short keeps the inferences timed."""
    import numpy as np

    sample = payload.timing_input()
    try:
        probe = board.target.run_timed(sample, 3, s.warmup, per_inference=True)
        per_s = max((probe.host_end - probe.host_start) / probe.count, float(np.median(probe.latencies_us)) / 1e6)
        n = int(min(s.latency_samples, max(10, math.ceil(s.latency_budget_s / max(per_s, 1e-9)))))
        got.latency = board.target.run_timed(sample, n, 0, per_inference=True)
    except HardwareError as exc:
        if isinstance(exc.partial, TimedRun) and exc.partial.count:
            got.latency = exc.partial
        raise


def _window_count(board: Board, sample: np.ndarray, s: RunSettings, latency_ms: float) -> int:
    """Inferences per energy window: a short calibration run measures the wall time per inference
    (on an SSH board the per-inference overhead can exceed the inference itself), then the count
    that fills `window_s`."""
    n0 = max(10, math.ceil(min(1.0, s.window_s / 5) * 1000 / max(latency_ms, 1e-6)))
    cal = board.target.run_timed(sample, n0, s.warmup)
    per_inference_s = max((cal.host_end - cal.host_start) / cal.count, latency_ms / 1000, 1e-9)
    return max(10, math.ceil(s.window_s / per_inference_s))


def _stop_when(target: Any, cap: Any) -> dict[str, Any]:
    """`stop=cap.failed` for run_timed, so a failed capture ends the window at once, where both the
    capture and the target support it."""
    failed = getattr(cap, "failed", None)
    if failed is None or "stop" not in inspect.signature(target.run_timed).parameters:
        return {}
    return {"stop": failed}


def _energy(board: Board, payload: Payload, s: RunSettings, got: _Sofar, outcome: Outcome,
            progress: Callable[[str], None]) -> None:
    """Idle baseline, then windows of back-to-back inferences under a power capture. Completed
    windows and the trace are kept in `got` and `outcome` as they come, so a fault keeps them."""
    latency_ms = sum(got.latency.latencies_us) / got.latency.count / 1000
    count = _window_count(board, payload.timing_input(), s, latency_ms)
    meter = board.power_meter
    # An update straddling a window edge is split assuming the load beyond the edge is steady, so
    # every window gets a settled update period of idle on each side (the idle baseline is taken
    # from the middle of its stretch for the same reason).
    guard_s = 2 * meter.update_period_s
    cap = None
    try:
        with meter.capture(board.power_channel) as cap:
            progress(f"idle baseline {s.idle_s:g} s")
            time.sleep(guard_s)
            t_idle0 = cap.mark("idle-start")
            time.sleep(s.idle_s)
            outcome.idle = (t_idle0, cap.mark("idle-end"))
            stop = _stop_when(board.target, cap)
            for i in range(s.windows):
                time.sleep(guard_s)
                progress(f"energy window {i + 1}/{s.windows}: {count} inferences")
                run = board.target.run_timed(payload.timing_input(), count, 0, **stop)
                cap.mark(f"window-{i}-start", run.host_start)
                cap.mark(f"window-{i}-end", run.host_end)
                got.runs.append(run)
                outcome.windows.append((run.host_start, run.host_end))
            time.sleep(guard_s)
    finally:
        if cap is not None:
            outcome.trace = cap.trace
    got.energy, got.window_ms = _energy_of(outcome.trace, outcome.idle, got.runs, repr(meter))
    got.instrument = meter.identity()


def _energy_of(trace: PowerTrace, idle_span: tuple[float, float], runs: list[TimedRun],
               meter: str) -> tuple[Energy, list[float]]:
    """Energy per inference of the median window (by latency), with the idle baseline, and the
    latency per inference of every window."""
    idle = _window(trace, *idle_span)
    per_window = []
    for r in runs:
        w = _window(trace, r.host_start, r.host_end)
        per_inference_ms = sum(r.latencies_us) / len(r.latencies_us) / 1000
        per_window.append((w, per_inference_ms, _integrated(trace, r), r.count))
    # the median window by latency, as MLPerf Tiny takes the median throughput
    w, per_inf_ms, integrated, n = sorted(per_window, key=lambda x: x[1])[len(per_window) // 2]
    power_x_latency = w.mean_power_w * per_inf_ms
    integrated_mj = integrated.energy_j * 1000 / n if integrated else None
    unc_mj = (integrated or w).uncertainty_j * 1000 / n
    energy = Energy(
        per_inference_mj=integrated_mj if integrated_mj is not None else power_x_latency,
        power_x_latency_mj=power_x_latency, integrated_mj=integrated_mj, uncertainty_mj=unc_mj,
        active_power_w=w.mean_power_w, idle_power_w=idle.mean_power_w,
        dynamic_mj=(w.mean_power_w - idle.mean_power_w) * per_inf_ms, window_s=w.duration_s,
        inferences=n, windows=len(runs),
        method=("median of windows; integrator energy / count" if integrated_mj is not None
                else f"median of windows; average power ({w.method} method) x latency per inference")
                + f"; instrument {trace.instrument or meter}, update period {trace.period_s:g} s")
    return energy, [x[1] for x in per_window]


def _kept_energy(got: _Sofar, outcome: Outcome, meter: str) -> None:
    """After a fault in the energy phase: energy from the windows that completed inside what the
    power trace holds, if any did."""
    trace = outcome.trace
    if trace is None or outcome.idle is None:
        return
    kept = [r for r in got.runs if _measurable(trace, r.host_start, r.host_end)]
    if kept and _measurable(trace, *outcome.idle):
        got.energy, got.window_ms = _energy_of(trace, outcome.idle, kept, meter)
        got.instrument = trace.instrument or None


def _measurable(trace: PowerTrace, t0: float, t1: float) -> bool:
    try:
        _window(trace, t0, t1)
    except ValueError:
        return False
    return True


def _window(trace: PowerTrace, t0: float, t1: float) -> WindowEnergy:
    """Energy over a window from the power updates; where the capture missed an update inside it
    (a busy host can poll late), from the instrument's integrator, which misses nothing."""
    try:
        return trace.energy(t0, t1)
    except ValueError as gap:
        try:
            return trace.energy(t0, t1, method="integrator")
        except ValueError:
            raise gap from None


def _integrated(trace: PowerTrace, run: TimedRun) -> Any:
    try:
        return trace.energy(run.host_start, run.host_end, method="integrator")
    except ValueError:  # the instrument has no integrator readings in this trace
        return None


def _accuracy(board: Board, payload: Payload, s: RunSettings, got: _Sofar,
              progress: Callable[[str], None]) -> None:
    """Top-1 accuracy over the test split; a run cut short keeps the accuracy of the rows it returned."""
    import numpy as np

    x, y = payload.test_inputs(s.accuracy_samples)
    progress(f"accuracy: {len(y)} test samples")
    try:
        outputs = board.target.classify(x)
    except HardwareError as exc:
        rows = np.asarray(exc.partial) if exc.partial is not None else np.empty((0,))
        if rows.ndim and len(rows):
            got.accuracy, got.accuracy_n = _top1(rows, y[:len(rows)]), len(rows)
        raise
    got.accuracy, got.accuracy_n = _top1(outputs, y), len(y)


def _top1(outputs: np.ndarray, y: np.ndarray) -> float:
    import numpy as np

    return float(np.mean(np.argmax(outputs.reshape(len(y), -1), axis=1) == y))


def measure(board: Board, payload: Payload, settings: RunSettings = RunSettings(), *,
            firmware_sha256: str | None = None, extra: dict[str, Any] | None = None,
            progress: Callable[[str], None] = lambda step: None) -> Outcome:
    """Measure `payload` on `board` (already flashed or deployed); `progress` hears each step.

    On a HardwareError after latency samples were taken, what was measured (latency samples, the
    energy of windows completed inside the power trace, accuracy over the rows returned) is
    attached to the error as `.partial`: a Measurement with status "partial" and the error."""
    got, outcome = _Sofar(), Outcome()
    phase = "identify"
    try:
        got.identity = board.target.identify()
        check_identity(board, payload, got.identity)
        phase = "latency"
        progress("latency: inferences timed one by one")
        _latency(board, payload, settings, got)
        if "power" in board.capabilities:
            phase = "energy"
            _energy(board, payload, settings, got, outcome, progress)
        if payload.data is not None:
            phase = "accuracy"
            _accuracy(board, payload, settings, got, progress)
    except HardwareError as exc:
        if phase == "energy":
            _kept_energy(got, outcome, repr(board.power_meter))
        if got.latency is not None:
            kept = {"failed_phase": phase, "windows_completed": len(got.runs),
                    "power_updates": len(outcome.trace) if outcome.trace is not None else 0}
            exc.partial = _record(board, payload, got, firmware_sha256, {**(extra or {}), "partial": kept},
                                  error=str(exc))
        raise
    outcome.measurement = _record(board, payload, got, firmware_sha256, extra or {})
    return outcome


def _record(board: Board, payload: Payload, got: _Sofar, firmware_sha256: str | None, extra: dict[str, Any],
            error: str | None = None) -> Measurement:
    """The Measurement of what `got` holds: whole, or partial when an `error` cut the run short."""
    from labbench.measure.stats import LatencySummary

    samples_ms = [u / 1000 for u in got.latency.latencies_us]
    summary = LatencySummary.of(samples_ms)
    window_ms = got.window_ms
    extras = {**got.identity.extra, **got.latency.extra}
    latency = Latency(samples_ms=samples_ms, p50_ms=summary.p50_ms, p90_ms=summary.p90_ms,
                      p99_ms=summary.p99_ms, mean_ms=summary.mean_ms, p50_ci95_ms=summary.p50_ci95_ms,
                      p99_ci95_ms=summary.p99_ci95_ms, throughput_windows_ms=window_ms,
                      median_window_ms=median(window_ms) if window_ms else None,
                      method=f"{len(samples_ms)} inferences each timed on the device clock "
                             f"({extras.get('latency_basis', 'per_inference')})")
    cold = {k: float(v) for k, v in extras.items() if k.startswith("cold_start") and isinstance(v, (int, float))}
    identity, lab = got.identity, board.lab
    return Measurement(
        board=board.name, model=payload.name, config=payload.config, latency=latency, energy=got.energy,
        accuracy=got.accuracy, accuracy_n=got.accuracy_n, cold_start_ms=cold.pop("cold_start_ms", None),
        cold_start_breakdown_ms=cold, runtime=extras.get("runtime"),
        memory=Memory(flash_bytes=payload.info.size_bytes, arena_bytes=_int(extras.get("arena_bytes")),
                      peak_rss_kib=_int(extras.get("peak_rss_kib"))),
        provenance=Provenance(board=board.name, family=board.family.name,
                              source="sim" if board.simulated else "hw", power_mode=board.entry.power_mode,
                              model_sha256=payload.info.sha256, firmware_sha256=firmware_sha256,
                              dataset_sha256=payload.dataset_sha256, instrument=got.instrument,
                              dut=f"{identity.name} / {identity.firmware or ''}", lab_sha256=lab.sha256),
        extra=extra, status="valid" if error is None else "partial", error=error)


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) else None
