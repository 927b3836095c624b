"""Run orchestration: one model on one board -> a `Measurement`.

The sequence follows MLPerf Tiny and the seed paper's method:

1. identify the DUT and check it runs the payload (its reported sha256 or model name);
2. a latency distribution: `latency_samples` inferences, each bracketed by the DUT's own clock;
3. energy (`run_energy`): a pre-scan (`prescan_s` of back-to-back inferences, from the analyzer's
   lowest ranges up, raised at each overload, again until a run reads none) finds the peaks and
   fixes the ranges, with headroom, for everything after it (lab.yaml may fix them instead). Then,
   under one power capture, an idle baseline and `windows` windows of back-to-back inferences, each
   at least `window_s` long (MLPerf Tiny: 10 s, median of 5), each between guard stretches of idle.
   A window is checked before it counts: an overload, a range change, or an update the analyzer
   blanked (or the capture missed, where the integrator cannot vouch for it) makes it invalid, and
   the guard stretches beside it must be steady at the idle level, so the parts of the updates
   straddling its edges that lie outside it are known to have drawn that. An invalid window is
   measured again, and every re-measure is recorded with its reason: after an overload on ranges
   the pre-scan chose, on raised ranges (such a measurement does not count against `attempts`);
   after guard stretches that were not idle, with longer ones, and if they are still not idle,
   that measurement counts with the edges' worst case in its uncertainty. A window still invalid
   after `attempts` is an error.
   Per window, energy per inference is computed both ways: the window's average power (from the
   instrument's updates) x the latency per inference, and the instrument's integrated energy over
   the window / the count. The median window is reported, with the idle baseline, and each
   figure's uncertainty with its components (the instrument's documented accuracy for the ranges
   held, readout rounding, edge apportioning and the spread between windows);
4. accuracy: top-1 over the dataset's test split (`accuracy_samples` of it);
5. memory and cold start from what the target reports.

All times are on the host monotonic clock: the DUT's stamps are mapped onto it by its driver, the
instrument's updates by the capture, so the windows line up with the power trace.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from labbench.board import Board
from labbench.capabilities import DutIdentity, InferenceTarget, PowerMeter, Resettable, TimedRun
from labbench.errors import HardwareError, InstrumentError, UsageError
from labbench.measure.record import Energy, Measurement, Memory, Provenance, Uncertainty
from labbench.steps import step

if TYPE_CHECKING:
    import numpy as np

    from labbench.payloads import Payload
    from labbench.powertrace import PowerTrace, PowerUpdate, Steady, WindowEnergy


class Capture(Protocol):
    """What the energy phase uses of a running power capture (a Pm1000Capture)."""

    @property
    def trace(self) -> PowerTrace: ...

    def mark(self, label: str, t_s: float | None = None) -> float: ...

    def wait_for_updates_after(self, t_s: float, count: int = 1) -> None: ...


T = TypeVar("T")


@runtime_checkable
class RangedMeter(Protocol):
    """A power meter whose ranges the bench chooses (the PM1000+): what the pre-scan and the
    re-measures after an overload use."""

    name: str
    range_note: str
    range_tables: dict[str, tuple[float, ...]]

    @property
    def ranges_from_lab(self) -> bool: ...

    def lowest_ranges(self) -> None: ...

    def hold_ranges(self, trace: PowerTrace) -> str: ...

    def step_up(self, overloaded: Sequence[PowerUpdate]) -> str | None: ...


def _setting(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class RunSettings:
    """How a board is measured; each field is a command-line option of both front doors (`options`)."""

    latency_samples: int = _setting(
        200,
        "individually timed inferences for the latency distribution, at most "
        "(fewer when they would take longer than --latency-budget-s)",
    )
    latency_budget_s: float = _setting(10.0, "seconds the timed inferences may take")
    warmup: int = _setting(10, "inferences run before any timed one")
    window_s: float = _setting(10.0, "minimum length of an energy window (MLPerf Tiny: shorter is invalid)")
    windows: int = _setting(5, "energy windows per model, the median taken (MLPerf Tiny's 5)")
    idle_s: float = _setting(3.0, "idle baseline length")
    accuracy_samples: int | None = _setting(400, "test-split samples for accuracy")
    prescan_s: float = _setting(
        1.5, "back-to-back inferences that find the peaks the analyzer's ranges must hold"
    )
    attempts: int = _setting(
        3, "invalid measurements of a window (or the idle baseline) before it is an error"
    )
    strategy_samples: int = _setting(
        300, "evaluation samples per strategy in the strategy study (half the test split at most)"
    )

    def __post_init__(self) -> None:
        for f in fields(self):
            value, may_be_0 = getattr(self, f.name), f.name == "warmup"
            if value is not None and (value < 0 if may_be_0 else value <= 0):
                floor = "0 or more" if may_be_0 else "more than 0"
                raise UsageError(f"--{f.name.replace('_', '-')} {value:g}: must be {floor}")

    @staticmethod
    def options() -> list[tuple[str, str, type, Any, str]]:
        """(option, field, type, default, help) for each setting: `--window-s` for `window_s`."""
        types = {"int": int, "float": float, "int | None": int}
        return [
            (
                f"--{f.name.replace('_', '-')}",
                f.name,
                types[str(f.type)],
                f.default,
                f"{f.metadata['help']} (default {f.default:g}{' s' if f.name.endswith('_s') else ''})",
            )
            for f in fields(RunSettings)
        ]

    @classmethod
    def from_options(cls, get: Callable[[str], Any]) -> RunSettings:
        """The settings from parsed options (`get(field)` gives a field's value)."""
        return cls(**{f.name: get(f.name) for f in fields(cls)})


@dataclass
class Outcome:
    """A measurement and what produced it (for plots): the power trace and the window bounds."""

    measurement: Measurement | None = None  # set once everything is measured
    trace: PowerTrace | None = None
    windows: list[tuple[float, float]] = field(default_factory=list)
    idle: tuple[float, float] | None = None


@dataclass(frozen=True)
class WindowResult:
    """An energy window that counts: the run, its energy from the power readings and from the
    integrator (either may be None: a missed reading the integrator vouches for, no integrator),
    and whether its edges were apportioned with verified idle guards (else: their worst case)."""

    run: TimedRun
    trace: WindowEnergy | None
    integrator: WindowEnergy | None
    guarded: bool

    @property
    def power(self) -> WindowEnergy:
        """The energy from the power readings, else the integrator's."""
        if self.trace is not None:
            return self.trace
        if self.integrator is None:
            raise ValueError("a window result holds no energy")
        return self.integrator


@dataclass
class EnergyRun:
    """What the energy phase measured: all of it, or what came before a fault."""

    idle: WindowEnergy | None = None
    windows: list[WindowResult] = field(default_factory=list)
    remeasured: list[str] = field(default_factory=list)  # each invalid measurement and what was done
    ranges: str | None = None  # how the analyzer's ranges were chosen


@dataclass
class _Sofar:
    """What a run has measured so far: enough for a whole record, or for a partial one after a fault."""

    identity: DutIdentity | None = None
    latency: TimedRun | None = None
    runs: list[TimedRun] = field(default_factory=list)  # completed energy windows
    energy_run: EnergyRun = field(default_factory=EnergyRun)
    energy: Energy | None = None
    window_ms: list[float] = field(default_factory=list)
    instrument: str | None = None
    accuracy: float | None = None
    accuracy_n: int | None = None


class PayloadMismatch(HardwareError):
    """The board does not run the payload the test asked for."""


def check_identity(board: Board, payload: Payload, identity: DutIdentity) -> None:
    if identity.model_sha256 and identity.model_sha256 != payload.info.sha256:
        raise PayloadMismatch(
            board.name,
            "identify",
            f"runs model sha256 {identity.model_sha256[:12]}, "
            f"expected {payload.name} ({payload.info.sha256[:12]})",
        )


def _latency(board: Board, payload: Payload, s: RunSettings, got: _Sofar) -> TimedRun:
    """Inferences timed one by one: as many as fit in `latency_budget_s` (10 to `latency_samples`),
    sized by a 3-inference probe's wall time, so neither a 600 ms model nor one whose every reply
    carries 640 outputs over a serial line takes minutes. A run cut short keeps the inferences timed."""
    import numpy as np

    sample = payload.timing_input()
    try:
        probe = board.target.run_timed(sample, 3, s.warmup, per_inference=True)
        per_s = max(
            (probe.host_end - probe.host_start) / probe.count, float(np.median(probe.latencies_us)) / 1e6
        )
        n = int(min(s.latency_samples, max(10, math.ceil(s.latency_budget_s / max(per_s, 1e-9)))))
        latency = got.latency = board.target.run_timed(sample, n, 0, per_inference=True)
    except HardwareError as exc:
        if isinstance(exc.partial, TimedRun) and exc.partial.count:
            got.latency = exc.partial
        raise
    return latency


def _window_count(board: Board, sample: np.ndarray, s: RunSettings, latency_ms: float) -> int:
    """Inferences per energy window: a short calibration run measures the wall time per inference
    (on an SSH board the per-inference overhead can exceed the inference itself), then the count
    that fills `window_s`."""
    n0 = max(10, math.ceil(min(1.0, s.window_s / 5) * 1000 / max(latency_ms, 1e-6)))
    cal = board.target.run_timed(sample, n0, s.warmup)
    per_inference_s = max((cal.host_end - cal.host_start) / cal.count, latency_ms / 1000, 1e-9)
    return max(10, math.ceil(s.window_s / per_inference_s))


def _stop_when(target: InferenceTarget, cap: object) -> dict[str, Any]:
    """`stop=cap.failed` for run_timed, so a failed capture ends the window at once, where both the
    capture and the target support it."""
    failed = getattr(cap, "failed", None)
    if failed is None or "stop" not in inspect.signature(target.run_timed).parameters:
        return {}
    return {"stop": failed}


def _energy(
    board: Board,
    payload: Payload,
    s: RunSettings,
    latency: TimedRun,
    got: _Sofar,
    outcome: Outcome,
    progress: Callable[[str], None],
) -> None:
    """Energy windows of `payload` under a power capture; accepted windows, the trace and the idle
    baseline are kept in `got` and `outcome` as they come, so a fault keeps them."""
    latency_ms = sum(latency.latencies_us) / latency.count / 1000
    sample = payload.timing_input()
    count = _window_count(board, sample, s, latency_ms)
    meter = board.power_meter
    run_energy(
        meter,
        board.target,
        sample,
        count,
        s,
        got.energy_run,
        outcome,
        progress=progress,
        capture=lambda **kw: meter.capture(board.power_channel, **kw),
        accepted=got.runs.append,
    )
    instrument = outcome.trace.instrument if outcome.trace is not None else ""
    got.energy, got.window_ms = energy_of(got.energy_run, instrument or repr(meter), meter.update_period_s)
    got.instrument = meter.identity()


def run_energy(
    meter: PowerMeter,
    target: InferenceTarget,
    sample: np.ndarray,
    count: int,
    s: RunSettings,
    record: EnergyRun,
    outcome: Outcome,
    *,
    capture: Callable[..., AbstractContextManager[Capture]] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    progress: Callable[[str], None] = lambda step: None,
    accepted: Callable[[TimedRun], None] = lambda run: None,
) -> None:
    """Step 3 of the module docstring: pre-scan, idle baseline and checked windows of `count`
    inferences of `sample` on `target`, measured by `meter` through `capture()` (default
    `meter.capture`; the pre-scan's takes `step_up=True`); `sleep` waits. Fills `record` and
    `outcome` as it goes (`accepted` hears each window that counts)."""
    capture = capture or meter.capture
    if isinstance(meter, RangedMeter) and not meter.ranges_from_lab:
        scan_count = max(1, math.ceil(count * s.prescan_s / s.window_s))
        record.ranges, _ = prescan(
            meter,
            lambda scan: target.run_timed(sample, scan_count, 0, **_stop_when(target, scan)),
            capture,
            _board(target),
            f"{scan_count} inferences",
            progress,
        )
    else:
        record.ranges = getattr(meter, "range_note", None)
    cap = None
    try:
        with capture() as cap:
            stop = _stop_when(target, cap)
            idle, span = idle_baseline(cap, meter, s, record, sleep, progress)
            record.idle, outcome.idle, guard_from = idle, span, span[1]
            for i in range(s.windows):
                result = _window(
                    cap, meter, target, sample, count, s, record, idle, i, guard_from, stop, progress
                )
                cap.mark(f"window-{i}-start", result.run.host_start)
                cap.mark(f"window-{i}-end", result.run.host_end)
                record.windows.append(result)
                outcome.windows.append((result.run.host_start, result.run.host_end))
                accepted(result.run)
                guard_from = result.run.host_end
    finally:
        if cap is not None:
            outcome.trace = cap.trace


def prescan(
    meter: RangedMeter,
    run: Callable[[Capture], T],
    capture: Callable[..., AbstractContextManager[Capture]],
    board: str,
    what: str,
    progress: Callable[[str], None],
) -> tuple[str, T]:
    """`run` (given the capture) from the lowest ranges up, the capture raising them at each overload,
    until a run reads no overload; then hold the ranges for the peaks it saw. Returns how they were
    chosen and the last run's result."""
    meter.lowest_ranges()
    for _ in range(len(meter.range_tables["AMP"]) + len(meter.range_tables["VLT"])):
        progress(f"pre-scan: {what} for the analyzer's ranges")
        with step(board, "pre-scan", what), capture(step_up=True) as scan:
            result = run(scan)
        if not any(u.overload for u in scan.trace.updates):
            break
    return meter.hold_ranges(scan.trace), result


def idle_baseline(
    cap: Capture,
    meter: PowerMeter,
    s: RunSettings,
    record: EnergyRun,
    sleep: Callable[[float], None],
    progress: Callable[[str], None],
) -> tuple[WindowEnergy, tuple[float, float]]:
    """The idle baseline, one settled update into the capture, its edges apportioned with the load
    beside it where that was steady at one level (else their worst case), and the marks around it;
    measured again while invalid."""
    after_s, settle, failed, measurement = -math.inf, 2, 0, 0
    lag = _lag(meter)
    problems: list[str] = []
    while failed < s.attempts:
        measurement += 1
        progress(f"idle baseline {s.idle_s:g} s")
        cap.wait_for_updates_after(after_s + lag, settle)  # one update straddling what came before, one whole
        with step(_board(meter), "idle baseline", f"{s.idle_s:g} s, measurement {measurement}"):
            t0 = cap.mark("idle-start")
            sleep(s.idle_s)
            t1 = cap.mark("idle-end")
        cap.wait_for_updates_after(t1 + lag, 2)
        trace = cap.trace
        before, after = trace.steady(after_s, t0), trace.steady(t1, math.inf)
        steady = (
            before is not None and after is not None and before.agrees_with(after.level_w, after.accuracy_w)
        )
        try:
            idle = trace.energy(t0, t1, before=before if steady else None, after=after if steady else None)
            problems = idle.problems
        except ValueError as e:
            problems = [str(e)]
        if not problems:
            return idle, (t0, t1)
        raised = _remedy(meter, problems, trace, t0)
        after_s, settle, failed = t1, settle + (3 if raised else 2), failed + (not raised)
        record.remeasured.append(f"idle baseline, measurement {measurement}: {'; '.join(problems)}")
    raise InstrumentError(
        getattr(meter, "name", "power meter"),
        "idle baseline",
        f"invalid in {s.attempts} measurements: {'; '.join(problems)}",
    )


def _window(
    cap: Capture,
    meter: PowerMeter,
    target: InferenceTarget,
    sample: np.ndarray,
    count: int,
    s: RunSettings,
    record: EnergyRun,
    idle: WindowEnergy,
    i: int,
    guard_from: float,
    stop: dict[str, Any],
    progress: Callable[[str], None],
) -> WindowResult:
    """Energy window `i`: measured (after a guard stretch of at least one whole idle update) and
    checked; measured again while invalid."""
    settle, failed, measurement = 2, 0, 0  # updates after the last stretch: its edge update, a whole idle one
    lag = _lag(meter)
    problems: list[str] = []
    while failed < s.attempts:  # a measurement after which the ranges were raised does not count
        measurement += 1
        cap.wait_for_updates_after(guard_from + lag, settle)
        progress(
            f"energy window {i + 1}/{s.windows}: {count} inferences"
            + (f" (measurement {measurement})" if measurement > 1 else "")
        )
        with step(
            _board(target),
            f"energy window {i + 1}/{s.windows}",
            f"{count} inferences, measurement {measurement}",
        ):
            run = target.run_timed(sample, count, 0, **stop)
        cap.wait_for_updates_after(run.host_end + lag, settle)  # the trailing guard: edge update, whole idle
        # guards that stay busy once lengthened are the DUT's own (an SSH runner starting up)
        trace = cap.trace
        result, problems = judge_window(trace, run, idle, guard_from, worst_case_edges=measurement > 1)
        if result is not None:
            if problems:
                record.remeasured.append(
                    f"window {i + 1}, measurement {measurement}: counted with the edges' "
                    f"worst case: {'; '.join(problems)}"
                )
            return result
        raised = _remedy(meter, problems, trace, run.host_start)
        cap.mark(f"window-{i}-invalid-{measurement}-start", run.host_start)
        cap.mark(f"window-{i}-invalid-{measurement}-end", run.host_end)
        record.remeasured.append(f"window {i + 1}, measurement {measurement}: {'; '.join(problems)}")
        guard_from, settle, failed = run.host_end, settle + (3 if raised else 2), failed + (not raised)
    raise InstrumentError(
        getattr(meter, "name", "power meter"),
        f"energy window {i + 1}/{s.windows}",
        f"invalid in {measurement} measurements: {'; '.join(problems)}",
    )


def _board(driver: object) -> str:
    """The board (or instrument) a driver serves, for its steps."""
    return str(getattr(driver, "board", None) or getattr(driver, "name", None) or type(driver).__name__)


def _lag(meter: PowerMeter) -> float:
    """How long after its period an update's results may appear: an update seen later than this
    after an instant ended after it."""
    return float(getattr(meter, "result_latency_s", 0.0))


def _remedy(meter: PowerMeter, problems: list[str], trace: PowerTrace, t0: float) -> bool:
    """Before measuring again: after an overload, raise the ranges the pre-scan chose (an error when
    lab.yaml fixed them, or they are at the top); whether they were raised (which is noted in
    `problems`, and blanks an update the next guard stretch must make up for)."""
    if not isinstance(meter, RangedMeter) or not any("overload" in p for p in problems):
        return False
    overloaded = [
        u for u, t in zip(trace.updates, trace.t_s, strict=True) if u.overload and t0 - trace.period_s <= t
    ]
    raised = meter.step_up(overloaded or list(trace.updates[-3:]))
    if raised is None:
        raise InstrumentError(
            meter.name,
            "energy measurement",
            f"a range overload on the ranges held ({meter.range_note}); nothing above them to "
            f"use: fix larger ranges in lab.yaml (settings current_range, voltage_range)",
        )
    problems.append(f"ranges raised: {raised}")
    return True


def judge_window(
    trace: PowerTrace, run: TimedRun, idle: WindowEnergy, guard_from: float, worst_case_edges: bool
) -> tuple[WindowResult | None, list[str]]:
    """A window's result and its problems. The guard stretches beside it (from `guard_from` to the
    run, and after the run to the end of the trace) must be steady at the idle level for the edge
    updates to be apportioned with that level; a window with other problems never counts; one
    whose guards are the only problem counts with the edges' worst case when `worst_case_edges`."""
    t0, t1 = run.host_start, run.host_end
    guards: list[str] = []
    sides: dict[str, Steady | None] = {
        "before": trace.steady(guard_from, t0),
        "after": trace.steady(t1, math.inf),
    }
    for side, steady in sides.items():
        if steady is None:
            guards.append(f"the guard stretch {side} it was not steady")
        elif not steady.agrees_with(idle.mean_power_w, idle.power_uncertainty_w):
            guards.append(
                f"the guard stretch {side} it drew {steady.level_w:.4g} W, not idle "
                f"({idle.mean_power_w:.4g} W)"
            )
    claims = {} if guards else sides
    measured: dict[str, WindowEnergy | None] = {}
    problems: list[str] = []
    for method in ("trace", "integrator"):
        try:
            measured[method] = trace.energy(t0, t1, method, **claims)
        except ValueError as e:
            measured[method] = None
            if method == "trace" or "fewer than two" not in str(e):
                problems.append(str(e))
    if measured["trace"] is None and measured["integrator"] is not None:
        problems = [p for p in problems if "no update for" not in p]  # the integrator vouches for the gap
    for w in measured.values():
        problems += [p for p in (w.problems if w else ()) if p not in problems]
    if not any(measured.values()) or problems or (guards and not worst_case_edges):
        return None, problems + guards
    return WindowResult(run, measured["trace"], measured["integrator"], guarded=not guards), guards


def energy_of(record: EnergyRun, instrument: str, period_s: float) -> tuple[Energy, list[float]]:
    """Energy per inference of the median window (by latency), with the idle baseline, each figure's
    uncertainty and its components, and the latency per inference of every window."""
    idle = record.idle
    if idle is None:
        raise ValueError("no idle baseline to take the dynamic energy from")
    # per window: the window, latency per inference (ms), and the figures' values
    rows: list[tuple[WindowResult, float, dict[str, float | None]]] = []
    for w in record.windows:
        per_inference_ms = sum(w.run.latencies_us) / w.run.count / 1000
        watts = w.power.mean_power_w
        rows.append(
            (
                w,
                per_inference_ms,
                {
                    "active_power_w": watts,
                    "power_x_latency_mj": watts * per_inference_ms,
                    "integrated_mj": w.integrator.energy_j * 1000 / w.run.count if w.integrator else None,
                    "dynamic_mj": (watts - idle.mean_power_w) * per_inference_ms,
                },
            )
        )
    # the median window by latency, as MLPerf Tiny takes the median throughput
    w, per_inf_ms, values = sorted(rows, key=lambda r: r[1])[len(rows) // 2]
    power, n = w.power, w.run.count
    integrated_mj, power_x_latency = values["integrated_mj"], values["power_x_latency_mj"]

    def spread(figure: str) -> float:
        """Half the range of a figure over the windows."""
        seen = [v for r in rows if (v := r[2][figure]) is not None]
        return (max(seen) - min(seen)) / 2

    per_w = 1 / power.duration_s
    figures = {
        "active_power_w": _uncertainty(power, per_w, spread=spread("active_power_w")),
        "idle_power_w": _uncertainty(idle, 1 / idle.duration_s),
        "power_x_latency_mj": _uncertainty(power, per_w * per_inf_ms, spread=spread("power_x_latency_mj")),
        "dynamic_mj": _uncertainty(
            power, per_w * per_inf_ms, idle, per_inf_ms / idle.duration_s, spread("dynamic_mj")
        ),
    }
    if w.integrator is not None:
        figures["integrated_mj"] = _uncertainty(w.integrator, 1000 / n, spread=spread("integrated_mj"))
    reported = "integrated_mj" if integrated_mj is not None else "power_x_latency_mj"
    figures["per_inference_mj"] = figures[reported]
    v_range, a_range = (w.integrator or power).ranges[0] if (w.integrator or power).ranges else (None, None)
    edges = (
        "edges apportioned with verified idle guards"
        if all(r[0].guarded for r in rows)
        else "edges at their worst case where the guards beside a window were not idle"
    )
    energy = Energy(
        per_inference_mj=integrated_mj if integrated_mj is not None else power_x_latency,
        power_x_latency_mj=power_x_latency,
        integrated_mj=integrated_mj,
        uncertainty_mj=figures["per_inference_mj"].total,
        uncertainties=figures,
        active_power_w=power.mean_power_w,
        idle_power_w=idle.mean_power_w,
        dynamic_mj=values["dynamic_mj"],
        window_s=power.duration_s,
        inferences=n,
        windows=len(rows),
        window_host_s=(w.run.host_start, w.run.host_end),
        voltage_range_v=v_range,
        current_range_a=a_range,
        ranges=record.ranges,
        remeasured=list(record.remeasured),
        method=(
            "median of windows; integrator energy / count"
            if integrated_mj is not None
            else f"median of windows; average power ({power.method} method) x latency per inference"
        )
        + f"; {edges}; instrument {instrument}, update period {period_s:g} s",
    )
    return energy, [r[1] for r in rows]


def _uncertainty(
    w: WindowEnergy,
    scale: float,
    other: WindowEnergy | None = None,
    other_scale: float = 0.0,
    spread: float = 0.0,
) -> Uncertainty:
    """A figure's uncertainty from the window(s) it derives from (each component scaled to the
    figure's unit), plus the spread between windows."""
    parts = {
        k: getattr(w, f"{k}_j") * scale + (getattr(other, f"{k}_j") * other_scale if other else 0.0)
        for k in ("accuracy", "rounding", "edges")
    }
    return Uncertainty(total=sum(parts.values()) + spread, spread=spread, **parts)


def _kept_energy(got: _Sofar, outcome: Outcome, meter: str) -> None:
    """After a fault in the energy phase: energy from the windows that counted before it, if any did
    (a window counts only once the trace holds the updates after it)."""
    trace = outcome.trace
    if got.energy_run.windows and got.energy_run.idle is not None and trace is not None:
        got.energy, got.window_ms = energy_of(got.energy_run, trace.instrument or meter, trace.period_s)
        got.instrument = trace.instrument or None


def _accuracy(
    board: Board, payload: Payload, s: RunSettings, got: _Sofar, progress: Callable[[str], None]
) -> None:
    """Top-1 accuracy over the test split; a run cut short keeps the accuracy of the rows it returned."""
    import numpy as np

    x, y = payload.test_inputs(s.accuracy_samples)
    progress(f"accuracy: {len(y)} test samples")
    try:
        outputs = board.target.classify(x)
    except HardwareError as exc:
        rows = np.asarray(exc.partial) if exc.partial is not None else np.empty((0,))
        if rows.ndim and len(rows):
            got.accuracy, got.accuracy_n = _top1(rows, y[: len(rows)]), len(rows)
        raise
    got.accuracy, got.accuracy_n = _top1(outputs, y), len(y)


def _top1(outputs: np.ndarray, y: np.ndarray) -> float:
    import numpy as np

    return float(np.mean(np.argmax(outputs.reshape(len(y), -1), axis=1) == y))


def measure(
    board: Board,
    payload: Payload,
    settings: RunSettings = RunSettings(),
    *,
    firmware_sha256: str | None = None,
    extra: dict[str, Any] | None = None,
    progress: Callable[[str], None] = lambda step: None,
) -> Outcome:
    """Measure `payload` on `board` (already flashed or deployed); `progress` hears each step.

    On a HardwareError after latency samples were taken, what was measured (latency samples, the
    energy of windows completed inside the power trace, accuracy over the rows returned) is
    attached to the error as `.partial`: a Measurement with status "partial" and the error."""
    got, outcome = _Sofar(), Outcome()
    serial = board.entry.serial
    try:
        if serial is not None and serial.reset == "rts":  # seed 000's cold start: reset to m-init-done
            phase = "cold start"
            progress("cold start: reset to m-init-done")
            target = board.target
            if not isinstance(target, Resettable):
                raise UsageError(
                    f"{board.name}: reset: rts, but its driver {type(target).__name__} cannot reset the board"
                )
            with step(board.name, phase, "reset to m-init-done"):
                target.reset()
        phase = "identify"
        with step(board.name, phase):
            identity = got.identity = board.target.identify()
            check_identity(board, payload, identity)
        phase = "latency"
        progress("latency: inferences timed one by one")
        with step(board.name, phase, payload.name):
            latency = _latency(board, payload, settings, got)
        if "power" in board.capabilities:
            phase = "energy"
            with step(board.name, phase, payload.name):
                _energy(board, payload, settings, latency, got, outcome, progress)
        if payload.data is not None:
            phase = "accuracy"
            with step(board.name, phase, payload.name):
                _accuracy(board, payload, settings, got, progress)
    except HardwareError as exc:
        if phase == "energy":
            _kept_energy(got, outcome, repr(board.power_meter))
        if got.identity is not None and got.latency is not None:
            kept = {
                "failed_phase": phase,
                "windows_completed": len(got.runs),
                "power_updates": len(outcome.trace) if outcome.trace is not None else 0,
            }
            exc.partial = _record(
                board,
                payload,
                got.identity,
                got.latency,
                got,
                firmware_sha256,
                {**(extra or {}), "partial": kept},
                error=str(exc),
            )
        raise
    outcome.measurement = _record(board, payload, identity, latency, got, firmware_sha256, extra or {})
    return outcome


def _record(
    board: Board,
    payload: Payload,
    identity: DutIdentity,
    timed: TimedRun,
    got: _Sofar,
    firmware_sha256: str | None,
    extra: dict[str, Any],
    error: str | None = None,
) -> Measurement:
    """The Measurement of what `got` holds (its `identity` and latency run `timed` given apart): whole,
    or partial when an `error` cut the run short."""
    from labbench.measure.stats import latency_record

    samples_ms = [u / 1000 for u in timed.latencies_us]
    extras = {**identity.extra, **timed.extra}
    latency = latency_record(
        samples_ms,
        throughput_windows_ms=got.window_ms,
        method=f"{len(samples_ms)} inferences each timed on the device clock "
        f"({extras.get('latency_basis', 'per_inference')})",
    )
    cold = {
        k: float(v) for k, v in extras.items() if k.startswith("cold_start") and isinstance(v, (int, float))
    }
    lab = board.lab
    return Measurement(
        board=board.name,
        model=payload.name,
        config=payload.config,
        latency=latency,
        energy=got.energy,
        accuracy=got.accuracy,
        accuracy_n=got.accuracy_n,
        cold_start_ms=cold.pop("cold_start_ms", None),
        cold_start_breakdown_ms=cold,
        runtime=extras.get("runtime"),
        memory=Memory(
            flash_bytes=payload.info.size_bytes,
            arena_bytes=_int(extras.get("arena_bytes")),
            peak_rss_kib=_int(extras.get("peak_rss_kib")),
        ),
        provenance=Provenance(
            board=board.name,
            family=board.family.name,
            source="sim" if board.simulated else "hw",
            power_mode=board.entry.power_mode,
            model_sha256=payload.info.sha256,
            firmware_sha256=firmware_sha256,
            dataset_sha256=payload.dataset_sha256,
            instrument=got.instrument,
            dut=f"{identity.name} / {identity.firmware or ''}",
            lab_sha256=lab.sha256,
        ),
        extra={**extra, **{k: v for k, v in extras.items() if k == "cold_start_basis"}},
        status="valid" if error is None else "partial",
        error=error,
    )


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) else None
