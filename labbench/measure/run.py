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

import math
import time
from dataclasses import dataclass, field
from statistics import median
from typing import Any, Callable

import numpy as np

from labbench.board import Board
from labbench.capabilities import DutIdentity, TimedRun
from labbench.errors import HardwareError
from labbench.measure.power import PowerTrace, WindowEnergy
from labbench.measure.record import Energy, Latency, Measurement, Memory, Provenance
from labbench.measure.stats import LatencySummary
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


class PayloadMismatch(HardwareError):
    """The board does not run the payload the test asked for."""


def check_identity(board: Board, payload: Payload, identity: DutIdentity) -> None:
    if identity.model_sha256 and identity.model_sha256 != payload.info.sha256:
        raise PayloadMismatch(board.name, "identify", f"runs model sha256 {identity.model_sha256[:12]}, "
                              f"expected {payload.name} ({payload.info.sha256[:12]})")


def _latency(board: Board, payload: Payload, s: RunSettings) -> TimedRun:
    """Inferences timed one by one: as many as fit in `latency_budget_s` (10 to `latency_samples`),
    sized by a 3-inference probe's wall time, so neither a 600 ms model nor one whose every reply
    carries 640 outputs over a serial line takes minutes."""
    sample = payload.timing_input()
    probe = board.target.run_timed(sample, 3, s.warmup, per_inference=True)
    per_s = max((probe.host_end - probe.host_start) / probe.count, float(np.median(probe.latencies_us)) / 1e6)
    n = int(min(s.latency_samples, max(10, math.ceil(s.latency_budget_s / max(per_s, 1e-9)))))
    return board.target.run_timed(sample, n, 0, per_inference=True)


def _window_count(board: Board, sample: np.ndarray, s: RunSettings, latency_ms: float) -> int:
    """Inferences per energy window: a short calibration run measures the wall time per inference
    (on an SSH board the per-inference overhead can exceed the inference itself), then the count
    that fills `window_s`."""
    n0 = max(10, math.ceil(min(1.0, s.window_s / 5) * 1000 / max(latency_ms, 1e-6)))
    cal = board.target.run_timed(sample, n0, s.warmup)
    per_inference_s = max((cal.host_end - cal.host_start) / cal.count, latency_ms / 1000, 1e-9)
    return max(10, math.ceil(s.window_s / per_inference_s))


def _energy(board: Board, payload: Payload, s: RunSettings, latency_ms: float, outcome: Outcome,
            progress: Callable[[str], None]) -> tuple[Energy, list[float]]:
    """Idle baseline, then windows of back-to-back inferences under a power capture."""
    count = _window_count(board, payload.timing_input(), s, latency_ms)
    runs: list[TimedRun] = []
    meter = board.power_meter
    # An update straddling a window edge is split assuming the load beyond the edge is steady, so
    # every window gets a settled update period of idle on each side (the idle baseline is taken
    # from the middle of its stretch for the same reason).
    guard_s = 2 * meter.update_period_s
    with meter.capture(board.power_channel) as cap:
        progress(f"idle baseline {s.idle_s:g} s")
        time.sleep(guard_s)
        t_idle0 = cap.mark("idle-start")
        time.sleep(s.idle_s)
        t_idle1 = cap.mark("idle-end")
        for i in range(s.windows):
            time.sleep(guard_s)
            progress(f"energy window {i + 1}/{s.windows}: {count} inferences")
            run = board.target.run_timed(payload.timing_input(), count, 0)
            cap.mark(f"window-{i}-start", run.host_start)
            cap.mark(f"window-{i}-end", run.host_end)
            runs.append(run)
        time.sleep(guard_s)
    trace = cap.trace
    outcome.trace, outcome.idle = trace, (t_idle0, t_idle1)
    outcome.windows = [(r.host_start, r.host_end) for r in runs]
    idle = _window(trace, t_idle0, t_idle1)
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
                + f"; instrument {trace.instrument or meter!r}, update period {trace.period_s:g} s")
    return energy, [x[1] for x in per_window]


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


def measure(board: Board, payload: Payload, settings: RunSettings = RunSettings(), *,
            firmware_sha256: str | None = None, extra: dict[str, Any] | None = None,
            progress: Callable[[str], None] = lambda step: None) -> Outcome:
    """Measure `payload` on `board` (already flashed or deployed); `progress` hears each step."""
    target = board.target
    identity = target.identify()
    check_identity(board, payload, identity)
    outcome = Outcome()
    progress("latency: inferences timed one by one")
    lat_run = _latency(board, payload, settings)
    samples_ms = [u / 1000 for u in lat_run.latencies_us]
    summary = LatencySummary.of(samples_ms)
    energy, window_ms = (None, [])
    instrument = None
    if "power" in board.capabilities:
        energy, window_ms = _energy(board, payload, settings, summary.mean_ms, outcome, progress)
        instrument = board.power_meter.identity()
    accuracy = n = None
    if payload.data is not None:
        x, y = payload.test_inputs(settings.accuracy_samples)
        progress(f"accuracy: {len(y)} test samples")
        outputs = target.classify(x)
        n = len(y)
        accuracy = float(np.mean(np.argmax(outputs.reshape(n, -1), axis=1) == y))
    extras = {**identity.extra, **lat_run.extra}
    latency = Latency(samples_ms=samples_ms, p50_ms=summary.p50_ms, p90_ms=summary.p90_ms,
                      p99_ms=summary.p99_ms, mean_ms=summary.mean_ms, p50_ci95_ms=summary.p50_ci95_ms,
                      p99_ci95_ms=summary.p99_ci95_ms, throughput_windows_ms=window_ms,
                      median_window_ms=median(window_ms) if window_ms else None,
                      method=f"{len(samples_ms)} inferences each timed on the device clock "
                             f"({extras.get('latency_basis', 'per_inference')})")
    cold = {k: float(v) for k, v in extras.items() if k.startswith("cold_start") and isinstance(v, (int, float))}
    lab = board.lab
    outcome.measurement = Measurement(
        board=board.name, model=payload.name, config=payload.config, latency=latency, energy=energy,
        accuracy=accuracy, accuracy_n=n, cold_start_ms=cold.pop("cold_start_ms", None),
        cold_start_breakdown_ms=cold, runtime=extras.get("runtime"),
        memory=Memory(flash_bytes=payload.info.size_bytes, arena_bytes=_int(extras.get("arena_bytes")),
                      peak_rss_kib=_int(extras.get("peak_rss_kib"))),
        provenance=Provenance(board=board.name, family=board.family.name,
                              source="sim" if board.simulated else "hw", power_mode=board.entry.power_mode,
                              model_sha256=payload.info.sha256, firmware_sha256=firmware_sha256,
                              dataset_sha256=payload.dataset_sha256, instrument=instrument,
                              dut=f"{identity.name} / {identity.firmware or ''}", lab_sha256=lab.sha256),
        extra=extra or {})
    return outcome


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) else None
