"""Power traces from instruments that report one average per update period, and energy over windows.

An instrument like the PM1000+ refreshes its results every `period_s` (0.5 s): each update is
the mean power over the period that just ended. The host cannot see the refresh itself, only
that a poll found new data, so each update is recorded with the interval in which the refresh
must have happened: after the previous poll was sent (`seen_after_s`), no later than the reply
of the poll that reported it (`seen_by_s`). Its width is the poll interval plus one round trip.

Anchoring. If one regular clock (a phase and a period, both fitted) fits inside every update's
interval, the update times are that clock's ticks and their uncertainty the half-width of the
phases the fit allows, usually far below the poll interval. Otherwise (a firmware that jitters,
an auto-zero that shifts the phase) each update is anchored at its interval's midpoint, with
half the interval as its uncertainty. An instrument that shows results up to `latency_s` after
their period ends (a processing time that may vary) has each period end that much before the
interval in which its results appeared: the intervals are widened by it before the fit. Each update then covers the period ending at its time,
back to the previous update's time when they are one period apart (a contiguous partition, so
nothing is counted twice); after a missed update it covers one period and leaves a gap, which
the trace method refuses to bridge. The integrator method (the increments of the instrument's own
energy counter between readings) bridges a missed reading only where the counter's elapsed time
shows it counted every period in between: a blanked update (a range change, auto-zero) is counted
by nothing, and a window holding one is refused rather than reported short.

Uncertainty. Every window's energy comes with a bound, the sum of three components:
- accuracy: the instrument's documented accuracy of each reading (`PowerUpdate.power_accuracy_w`,
  for the ranges in use) over each update the window touches, whole (the error of an edge update
  passes into its inside part whole);
- rounding: the printed digits of each power reading, and of the integrator's running total at
  the two readings the window's increments telescope to;
- edges: apportioning the (at most two) updates straddling an edge, and where the update
  boundaries lie on the host clock (their anchoring uncertainty times the power at the boundary).

Edges. The part of a straddling update outside the window is not observed. What bounds it is the
update's own range of instantaneous power (the instrument's peak readings, `power_min_w` and
`power_max_w`, widened by their accuracy): its inside part lies between what the lowest and the
highest power over the inside and outside parts allow. The stated uncertainty covers that whole
interval unless the caller knows better: a caller that has checked the load outside the edge was
steady (the bench's orchestration, from the updates of its idle guard stretches, `steady()`)
passes that level as `before`/`after`, and the outside part is then taken at that level, with its
spread and accuracy as the uncertainty. A claim the straddling update contradicts is reported as a
problem of the window (`WindowEnergy.problems`). Without a claim the point estimate takes the
neighbouring update's level when that update was steady (the usual case), an even spread over the
update otherwise; either way the uncertainty covers the interval's far end.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from itertools import pairwise
from typing import Literal, NamedTuple

import numpy as np

Method = Literal["trace", "integrator"]
_CONTIGUOUS = 1.5  # consecutive updates closer than this many periods are adjacent (none missed)
_BLANK_TOLERANCE = 0.25  # periods: an integrator increment shorter than its span by more than this missed one


@dataclass(frozen=True)
class PowerUpdate:
    """One refresh of the instrument's results, placed on the host monotonic clock."""

    seen_after_s: float  # the refresh happened after this (the previous poll was sent)
    seen_by_s: float  # ... and no later than this (the reply reporting new data)
    voltage_v: float
    current_a: float
    power_w: float
    overload: bool = False  # the instrument flagged a range overload for this update
    integrator_energy_j: float | None = None  # the integrator's running total at this update
    integrator_charge_ah: float | None = None
    integrator_elapsed_s: float | None = None
    power_accuracy_w: float = 0.0  # bound on the error of power_w (documented accuracy, ranges in use)
    power_rounding_w: float = 0.0  # half the last printed digit of power_w
    power_min_w: float | None = None  # the lowest instantaneous power in the update, as read (None: not read)
    power_max_w: float | None = None  # the highest
    extremes_accuracy_w: float = 0.0  # bound on the error of power_min_w and power_max_w
    integrator_rounding_j: float = 0.0  # half the last printed digit of the running total
    integrator_elapsed_rounding_s: float = 0.0
    voltage_range_v: float | None = None  # the ranges the instrument held for this update
    current_range_a: float | None = None
    current_peak_a: float | None = None  # the peak instantaneous current, as read
    tick: int | None = None  # the instrument's own number of the update, if it gives one (a sampler's index)


@dataclass(frozen=True)
class Mark:
    label: str
    t_s: float


@dataclass(frozen=True)
class IntegratorReading:
    """The integrator's totals when it was stopped at the end of a capture."""

    energy_j: float
    charge_ah: float | None
    elapsed_s: float | None

    @property
    def mean_power_w(self) -> float | None:
        return self.energy_j / self.elapsed_s if self.elapsed_s else None


@dataclass(frozen=True)
class Steady:
    """A load that held `level_w` over whole updates, its instantaneous power within `spread_w`
    (the instrument's lowest and highest readings), the level read to within `accuracy_w`."""

    level_w: float
    spread_w: float
    accuracy_w: float
    t0_s: float  # the span of the updates it rests on
    t1_s: float

    def agrees_with(self, level_w: float, accuracy_w: float) -> bool:
        """Whether another reading of a level (to `accuracy_w`) could be this load."""
        return abs(self.level_w - level_w) <= self.accuracy_w + accuracy_w + self.spread_w + 1e-9 * abs(
            level_w
        )


@dataclass(frozen=True)
class WindowEnergy:
    t0_s: float
    t1_s: float
    energy_j: float
    method: str
    accuracy_j: float  # the instrument's documented accuracy over the updates the window touches
    rounding_j: float  # printed digits of the readings (and of the integrator's running total)
    edges_j: float  # apportioning the updates straddling the edges, and their placement on the clock
    overload: bool = False  # an update overlapping the window (or the one after it) was over range
    ranges: tuple[tuple[float | None, float | None], ...] = ()  # (V, A) ranges held, in order seen
    contradicted: tuple[str, ...] = ()  # edges whose steady-outside claim the straddling update refutes

    @property
    def uncertainty_j(self) -> float:
        return self.accuracy_j + self.rounding_j + self.edges_j

    @property
    def duration_s(self) -> float:
        return self.t1_s - self.t0_s

    @property
    def mean_power_w(self) -> float:
        return self.energy_j / self.duration_s

    @property
    def power_uncertainty_w(self) -> float:
        return self.uncertainty_j / self.duration_s

    @property
    def range_change(self) -> bool:
        return len(self.ranges) > 1

    @property
    def problems(self) -> list[str]:
        """Why the value cannot be trusted (empty when it can)."""
        out = []
        if self.overload:
            out.append("a range overload")
        if self.range_change:
            out.append("a range change (" + " -> ".join(_range_text(r) for r in self.ranges) + ")")
        out += [
            f"the update straddling the {edge} edge contradicts a steady load outside it"
            for edge in self.contradicted
        ]
        return out

    @property
    def valid(self) -> bool:
        return not self.problems


def _range_text(ranges: tuple[float | None, float | None]) -> str:
    v, a = ranges
    return f"{'?' if v is None else f'{v:g}'} V / {'?' if a is None else f'{a:g}'} A"


class UpdateClock(NamedTuple):
    t_s: np.ndarray  # when each update's period ended
    uncertainty_s: np.ndarray
    period_s: float
    regular: bool  # one regular clock fits every update (its ticks share one phase error)


def fit_update_clock(
    seen_after_s: np.ndarray, seen_by_s: np.ndarray, period_s: float, ticks: np.ndarray | None = None
) -> UpdateClock:
    """Update times, their uncertainties and the period, from the interval each refresh lies in.

    The updates' tick numbers are `ticks` when the instrument numbers them (a sampler: many samples
    arrive in one poll, so their intervals coincide), else they follow from the intervals' midpoints.

    The clocks (phase, period) that put tick k inside interval k for every update form a polygon.
    The estimate keeps the nominal period when the polygon allows it (a short trace cannot pin
    the period down, and a clock chosen freely inside a wide polygon would stretch every
    interval), centring the phase; otherwise it is the polygon's point with the largest margin.
    The uncertainty is half the widest range of a tick over the polygon (reached at the first or
    the last tick). Small linear programmes. Falls back to the midpoints when no regular clock
    fits (or there are too few updates).
    """
    lo, hi = np.asarray(seen_after_s, float), np.asarray(seen_by_s, float)
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    fallback = UpdateClock(mid, half, period_s, False)
    if len(mid) < 3:
        return fallback
    if ticks is not None:
        k = np.asarray(ticks, float) - ticks[0]
    else:
        k = np.concatenate([[0.0], np.cumsum(np.round(np.diff(mid) / period_s))])  # tick numbers, gaps kept
    if np.any(np.diff(k) < 1):
        return fallback
    # variables (phase - lo[0], period, margin): lo + margin <= phase + k period <= hi - margin. As the period
    # is positive, a bound no later (earlier) than one of an earlier (later) tick adds nothing: dropped
    low = lo > np.concatenate([[-np.inf], np.maximum.accumulate(lo)[:-1]])
    high = hi < np.concatenate([np.minimum.accumulate(hi[::-1])[::-1][1:], [np.inf]])
    a_ub = np.vstack(
        [
            np.column_stack([-np.ones(low.sum()), -k[low], np.ones(low.sum())]),
            np.column_stack([np.ones(high.sum()), k[high], np.ones(high.sum())]),
        ]
    )
    b_ub = np.concatenate([-(lo[low] - lo[0]), hi[high] - lo[0]])
    bounds: list[tuple[float | None, float | None]] = [
        (None, None),
        (0.5 * period_s, 2.0 * period_s),
        (0.0, None),
    ]
    band = np.max(lo - k * period_s), np.min(hi - k * period_s)
    if band[0] <= band[1]:
        phase, fitted = (band[0] + band[1]) / 2, period_s
    else:
        best = _lp_minimum([0.0, 0.0, -1.0], a_ub, b_ub, bounds)
        if best is None:
            return fallback
        phase, fitted = best[1][0] + lo[0], best[1][1]
    bounds[2] = (0.0, 0.0)
    spread = 0.0
    for kk in (0.0, k[-1]):
        earliest, latest = (_lp_minimum([sign, sign * kk, 0.0], a_ub, b_ub, bounds) for sign in (1.0, -1.0))
        if earliest is None or latest is None:
            return fallback
        spread = max(spread, (-latest[0] - earliest[0]) / 2)
    return UpdateClock(phase + k * fitted, np.full_like(mid, spread), float(fitted), True)


def _lp_minimum(
    c: list[float], a_ub: np.ndarray, b_ub: np.ndarray, bounds: list[tuple[float | None, float | None]]
) -> tuple[float, np.ndarray] | None:
    """The minimum of c x subject to a_ub x <= b_ub within `bounds`, and where (None when linprog
    finds none)."""
    from scipy.optimize import linprog

    result = linprog(c, A_ub=a_ub, b_ub=b_ub, bounds=bounds)
    if result.status != 0 or result.fun is None or result.x is None:
        return None
    return float(result.fun), result.x


@dataclass(frozen=True)
class _Increments:
    """What a method counts, one entry per interval: the intervals, the energy counted in each and
    what bounds it (per-interval arrays)."""

    starts: np.ndarray
    ends: np.ndarray
    energy: np.ndarray
    level: np.ndarray  # the power reading for the interval's last period
    accuracy: np.ndarray  # J: bound on the energy's error from the documented accuracy
    rounding: np.ndarray  # J: bound on the energy's error from the printed digits
    low: np.ndarray  # W: bounds on the instantaneous power over the interval (0 and inf: unknown)
    high: np.ndarray
    steady: np.ndarray  # the interval's extremes show a constant load (within their accuracy)
    clock: np.ndarray  # s: anchoring uncertainty of the interval's end
    overload: np.ndarray
    ranges: list[tuple[float | None, float | None]]


@dataclass(frozen=True)
class PowerTrace:
    """What a capture recorded: the updates, the caller's marks, the integrator's final totals.

    A partial trace (a capture that failed) holds what came before the fault, with `fault` saying
    why it ends there: windows inside it measure as usual, one reaching past its end is refused.
    """

    period_s: float
    updates: tuple[PowerUpdate, ...]
    marks: tuple[Mark, ...] = ()
    instrument: str = ""
    integrator: IntegratorReading | None = None  # None also when the capture failed before stopping it
    fault: str | None = None  # why the capture stopped short; None when it ran to its end
    latency_s: float = 0.0  # the instrument shows an update's results up to this long after its period ends

    def __len__(self) -> int:
        return len(self.updates)

    @property
    def power_w(self) -> np.ndarray:
        return np.array([u.power_w for u in self.updates])

    @property
    def voltage_v(self) -> np.ndarray:
        return np.array([u.voltage_v for u in self.updates])

    @property
    def current_a(self) -> np.ndarray:
        return np.array([u.current_a for u in self.updates])

    @cached_property
    def clock(self) -> UpdateClock:
        if not self.updates:
            return UpdateClock(np.empty(0), np.empty(0), self.period_s, False)
        lo = np.array([u.seen_after_s for u in self.updates])
        hi = np.array([u.seen_by_s for u in self.updates])
        ticks = [u.tick for u in self.updates]
        numbered = None if None in ticks else np.array(ticks)
        return fit_update_clock(lo - self.latency_s, hi, self.period_s, numbered)

    @property
    def t_s(self) -> np.ndarray:
        """When each update's period ended (host monotonic s)."""
        return self.clock.t_s

    @property
    def t_uncertainty_s(self) -> np.ndarray:
        return self.clock.uncertainty_s

    @cached_property
    def _intervals(self) -> tuple[np.ndarray, np.ndarray]:
        t, _, period, _ = self.clock
        starts = t - period
        adjacent = np.diff(t) < _CONTIGUOUS * period
        starts[1:][adjacent] = t[:-1][adjacent]
        return starts, t.copy()

    @property
    def covers(self) -> tuple[float, float]:
        """The span the trace method can measure."""
        starts, ends = self._intervals
        if not len(ends):
            raise ValueError("the trace holds no updates")
        return float(starts[0]), float(ends[-1])

    # -- marks ---------------------------------------------------------------------------------

    def mark_time(self, label: str, occurrence: int = 0) -> float:
        times = [m.t_s for m in self.marks if m.label == label]
        if len(times) <= occurrence:
            raise KeyError(
                f"mark {label!r} #{occurrence} not in trace (marks: {[m.label for m in self.marks]})"
            )
        return times[occurrence]

    def between(self, start: str, end: str, method: Method = "trace") -> WindowEnergy:
        """Energy between two marks (their first occurrences)."""
        return self.energy(self.mark_time(start), self.mark_time(end), method=method)

    # -- steadiness ----------------------------------------------------------------------------

    def steady(self, t0_s: float, t1_s: float) -> Steady | None:
        """The load over the whole updates inside [t0_s, t1_s], if they show it steady: each one's
        extremes within their accuracy of each other, so the load was constant through them (None
        when there is no whole update, an extreme was not read, or the load moved)."""
        starts, ends = self._intervals
        idx = np.flatnonzero((starts >= t0_s) & (ends <= t1_s))
        ups = [self.updates[i] for i in idx]
        lows = [u.power_min_w for u in ups if u.power_min_w is not None and not u.overload]
        highs = [u.power_max_w for u in ups if u.power_max_w is not None and not u.overload]
        if not ups or len(lows) < len(ups) or len(highs) < len(ups):
            return None
        low, high = min(lows), max(highs)
        if high - low > _steady_tolerance(ups):
            return None
        weights = ends[idx] - starts[idx]
        level = float(np.dot([u.power_w for u in ups], weights) / weights.sum())
        accuracy = max(u.power_accuracy_w + u.power_rounding_w for u in ups)
        return Steady(level, float(high - low), accuracy, float(starts[idx[0]]), float(ends[idx[-1]]))

    # -- energy --------------------------------------------------------------------------------

    def _increments(self, method: Method) -> _Increments:
        starts, ends = self._intervals
        ups = self.updates
        if method == "integrator":
            idx = np.array([i for i, u in enumerate(ups) if u.integrator_energy_j is not None], int)
            if len(idx) < 2:
                raise ValueError("the trace holds fewer than two integrator readings")
            ends = self.t_s[idx]
            # each increment covers the time since the previous reading; the first reading only
            # opens the record (a zero-length interval whose level is still the edge's neighbour)
            starts = np.concatenate([ends[:1], ends[:-1]])
            energy = np.diff(
                [ups[i].integrator_energy_j for i in idx], prepend=ups[idx[0]].integrator_energy_j
            )
            totals_rounding = np.array([ups[i].integrator_rounding_j for i in idx])
            rounding = totals_rounding + np.concatenate([[0.0], totals_rounding[:-1]])
        elif method == "trace":
            idx = np.arange(len(ups))
            energy = np.array([u.power_w for u in ups]) * (ends - starts)
            rounding = np.array([u.power_rounding_w for u in ups]) * (ends - starts)
        else:
            raise ValueError(f"unknown method {method!r}")
        sel = [ups[i] for i in idx]
        single = (ends - starts) < _CONTIGUOUS * self.period_s  # one period: the extremes describe it all
        low = np.array(
            [
                max(0.0, u.power_min_w - u.extremes_accuracy_w) if u.power_min_w is not None and s else 0.0
                for u, s in zip(sel, single, strict=True)
            ]
        )
        high = np.array(
            [
                u.power_max_w + u.extremes_accuracy_w if u.power_max_w is not None and s else np.inf
                for u, s in zip(sel, single, strict=True)
            ]
        )
        steady = np.array(
            [
                s
                and u.power_min_w is not None
                and u.power_max_w is not None
                and not u.overload
                and u.power_max_w - u.power_min_w <= _steady_tolerance([u])
                for u, s in zip(sel, single, strict=True)
            ]
        )
        return _Increments(
            starts=starts, ends=ends, energy=energy, level=np.array([u.power_w for u in sel]),
            accuracy=np.array([u.power_accuracy_w for u in sel]) * (ends - starts), rounding=rounding,
            low=low, high=high, steady=steady, clock=self.t_uncertainty_s[idx],
            overload=np.array([u.overload for u in sel]),
            ranges=[(u.voltage_range_v, u.current_range_a) for u in sel],
        )  # fmt: skip

    def energy(
        self,
        t0_s: float,
        t1_s: float,
        method: Method = "trace",
        *,
        before: Steady | None = None,
        after: Steady | None = None,
    ) -> WindowEnergy:
        """Energy drawn in [t0_s, t1_s] by the trace (power x time) or the instrument's integrator.

        `before` / `after`: the load outside each edge, as the caller has checked it (see the
        module docstring). Raises ValueError for a window the trace cannot measure: outside it,
        across a missed or blanked update, or past the end of a partial trace.
        """
        if not t0_s < t1_s:
            raise ValueError(f"empty window [{t0_s}, {t1_s}]")
        inc = self._increments(method)
        starts, ends = inc.starts, inc.ends
        if self.fault and (not len(ends) or t1_s > ends[-1]):
            last = f"its last reading ends at {ends[-1]:.3f}" if len(ends) else "it holds no readings"
            window = f"window [{t0_s:.3f}, {t1_s:.3f}]"
            raise ValueError(f"{window} reaches past the end of a partial trace ({last}): {self.fault}")
        if not len(ends) or t0_s < starts[0] or t1_s > ends[-1]:
            span = f"[{starts[0]:.3f}, {ends[-1]:.3f}]" if len(ends) else "nothing"
            raise ValueError(
                f"window [{t0_s:.3f}, {t1_s:.3f}] is not covered by the trace, which covers {span}"
            )
        inside = np.flatnonzero((ends > t0_s) & (starts < t1_s))
        if method == "trace":
            for g in np.flatnonzero(starts[1:] > ends[:-1]):
                if ends[g] < t1_s and starts[g + 1] > t0_s:
                    raise ValueError(
                        f"the trace has no update for [{ends[g]:.3f}, {starts[g + 1]:.3f}] "
                        "inside the window (missed or blanked)"
                    )
        else:
            self._check_counted(inside)
        energy_j, edges_j, accuracy_j, contradicted = _apportion(t0_s, t1_s, inside, inc, before, after)
        interior = method == "trace" and not self.clock.regular
        edges_j += _clock_terms(inside, inc, before, after, interior)
        rounding_j = float(
            inc.rounding[inside].sum() if method == "trace" else self._telescoped_rounding(inside)
        )
        for claim, left in ((before, True), (after, False)):
            if claim is not None:  # the level of a claimed outside part carries its reading's accuracy
                accuracy_j += claim.accuracy_w * _outside(t0_s, t1_s, inside, inc, left)
        following = inside[-1] + 1  # a flag may come one update late
        overload = bool(inc.overload[inside].any() or (following < len(ends) and inc.overload[following]))
        ranges = tuple(dict.fromkeys(r for r in (inc.ranges[i] for i in inside) if r != (None, None)))
        return WindowEnergy(
            t0_s,
            t1_s,
            energy_j,
            method,
            accuracy_j,
            rounding_j,
            edges_j,
            overload,
            ranges,
            tuple(contradicted),
        )

    def _check_counted(self, inside: np.ndarray) -> None:
        """Refuse integrator increments that span a blanked update (the counter's elapsed time fell
        short of the time between its readings) or a gap the elapsed time cannot vouch for."""
        ups = [u for u in self.updates if u.integrator_energy_j is not None]
        t = self.t_s[[i for i, u in enumerate(self.updates) if u.integrator_energy_j is not None]]
        for i in inside:
            if i == 0:
                continue
            span_s = t[i] - t[i - 1]
            a, b = ups[i - 1], ups[i]
            where = f"[{t[i - 1]:.3f}, {t[i]:.3f}]"
            if a.integrator_elapsed_s is None or b.integrator_elapsed_s is None:
                if span_s >= _CONTIGUOUS * self.period_s:
                    raise ValueError(
                        f"the integrator readings miss {where} and no elapsed time shows whether "
                        "it counted that time"
                    )
                continue
            counted_s = b.integrator_elapsed_s - a.integrator_elapsed_s
            slack_s = (
                _BLANK_TOLERANCE * self.period_s
                + a.integrator_elapsed_rounding_s
                + b.integrator_elapsed_rounding_s
            )
            if counted_s < span_s - slack_s:
                raise ValueError(
                    f"the integrator counted {counted_s:.3f} s of {where} ({span_s:.3f} s): "
                    "a blanked update inside the window"
                )

    def _telescoped_rounding(self, inside: np.ndarray) -> float:
        """The integrator's increments telescope: only the readings that open and close them round."""
        ups = [u for u in self.updates if u.integrator_energy_j is not None]
        first, last = int(inside[0]), int(inside[-1])
        return ups[max(first - 1, 0)].integrator_rounding_j + ups[last].integrator_rounding_j


def _steady_tolerance(ups: list[PowerUpdate]) -> float:
    """How far apart the extremes of a constant load can read: twice their accuracy and rounding."""
    return 2 * max(u.extremes_accuracy_w + u.power_rounding_w for u in ups)


def _outside(t0: float, t1: float, inside: np.ndarray, inc: _Increments, left: bool) -> float:
    """Seconds of the straddling update outside the window at one edge."""
    i = inside[0] if left else inside[-1]
    return max(0.0, t0 - float(inc.starts[i])) if left else max(0.0, float(inc.ends[i]) - t1)


def _apportion(
    t0: float, t1: float, inside: np.ndarray, inc: _Increments, before: Steady | None, after: Steady | None
) -> tuple[float, float, float, list[str]]:
    """Energy over [t0, t1], the edge uncertainty, the accuracy bound and the refuted edge claims."""
    energy_j = edges_j = accuracy_j = 0.0
    contradicted: list[str] = []
    n = len(inc.ends)
    for i in inside:
        e, span = float(inc.energy[i]), inc.ends[i] - inc.starts[i]
        accuracy_j += inc.accuracy[i]
        sides = [
            (max(0.0, t0 - inc.starts[i]), before, i - 1, "start"),
            (max(0.0, inc.ends[i] - t1), after, i + 1, "end"),
        ]
        sides = [s for s in sides if s[0] > 0]
        if not sides:
            energy_j += e
            continue
        out_s = sum(s[0] for s in sides)
        in_s, u = span - out_s, inc.clock[i]  # each part's length is known to within the boundary's placement
        low, high, r = inc.low[i], inc.high[i], inc.rounding[i]
        lo = max(low * max(in_s - u, 0.0), e - high * (out_s + u), 0.0) - r
        hi = min(high * (in_s + u), e - low * max(out_s - u, 0.0), e) + r
        lo, hi = min(lo, hi), max(lo, hi)
        claims = [(o, c) for o, c, _, _ in sides if c is not None]
        if len(claims) == len(sides):
            estimate = e - sum(o * c.level_w for o, c in claims)
            claimed = sum(o * c.spread_w for o, c in claims)
            peak = max(
                [high if np.isfinite(high) else inc.level[i]] + [c.level_w + c.spread_w for _, c in claims]
            )
            slack = (
                inc.accuracy[i]
                + inc.rounding[i]
                + claimed
                + sum(o * c.accuracy_w for o, c in claims)
                + peak * inc.clock[i]
            )  # the boundary's placement moves the outside part
            if not lo - slack <= estimate <= hi + slack:
                contradicted += [edge for _, _, _, edge in sides]
            energy_j += min(max(estimate, lo), hi)
            edges_j += claimed
            continue
        # no claim: the neighbour's level when it was steady and could be this update's too, else an
        # even spread over the update
        levels = [
            inc.level[j] if 0 <= j < n and inc.steady[j] and low <= inc.level[j] <= high else None
            for _, _, j, _ in sides
        ]
        if None in levels:
            estimate = min(max(e * in_s / span, lo), hi)
        else:
            estimate = min(max(e - sum(o * p for (o, _, _, _), p in zip(sides, levels, strict=True)), lo), hi)
        energy_j += estimate
        edges_j += max(estimate - lo, hi - estimate)
    return float(energy_j), float(edges_j), float(accuracy_j), contradicted


def _clock_terms(
    inside: np.ndarray, inc: _Increments, before: Steady | None, after: Steady | None, interior: bool
) -> float:
    """Where the update boundaries lie: a boundary off by up to its anchoring uncertainty moves the
    power at it across an edge. For the two edges, the highest power at the outer boundary of the
    edge updates; with `interior` (power readings x durations, and no regular clock: each update's
    duration is then uncertain on its own, not only the phase), every boundary inside the window too."""
    n = len(inc.ends)
    total = 0.0
    for i, claim, j in ((inside[0], before, inside[0] - 1), (inside[-1], after, inside[-1] + 1)):
        near = [k for k in (i, j) if 0 <= k < n]
        if claim is not None:
            peak = claim.level_w + claim.spread_w
        elif np.isfinite(inc.high[near]).all():
            peak = float(inc.high[near].max())
        else:
            peak = float(inc.level[near].max())
        total += peak * float(inc.clock[near].max())
    if interior:
        for a, b in pairwise(inside):
            total += abs(inc.level[a] - inc.level[b]) * max(inc.clock[a], inc.clock[b])
    return total
