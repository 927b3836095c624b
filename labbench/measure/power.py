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
half the interval as its uncertainty. Each update then covers the period ending at its time,
back to the previous update's time when they are one period apart (a contiguous partition, so
nothing is counted twice); after a missed update it covers one period and leaves a gap.

Windows. Updates wholly inside a window count whole. An update straddling an edge is
apportioned: the part outside the window is taken to have drawn what the neighbouring update
further outside drew (a steady baseline up to the edge, the usual case when the window brackets
a workload), and the part inside gets the rest. Spreading the update evenly instead would be
wrong by up to a quarter period times the step, at each edge (up to 0.78 % of a 12 s window
stepping from 0.8 W to 1.28 W and back). The uncertainty adds, per edge, the step between the levels on either
side times the anchoring uncertainty, and the variation of the outside level (between the two
updates beyond the edge) times the length of the outside part. It is a bound only as far as the
load outside the window is as steady as those updates show: structure shorter than an update
is invisible to this instrument. The integrator method does the same with the increments of the
instrument's own energy counter (read at every update) between consecutive readings in place of
power x time, taking the neighbouring levels from the power readings.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import numpy as np

Method = Literal["trace", "integrator"]
_CONTIGUOUS = 1.5  # consecutive updates closer than this many periods are adjacent (none missed)


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
class WindowEnergy:
    t0_s: float
    t1_s: float
    energy_j: float
    uncertainty_j: float
    method: str
    overload: bool  # an update overlapping the window was over range: the value is not trustworthy

    @property
    def duration_s(self) -> float:
        return self.t1_s - self.t0_s

    @property
    def mean_power_w(self) -> float:
        return self.energy_j / self.duration_s


def fit_update_clock(
    seen_after_s: np.ndarray, seen_by_s: np.ndarray, period_s: float
) -> tuple[np.ndarray, np.ndarray, float]:
    """Update times, their uncertainties and the period, from the interval each refresh lies in.

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
    if len(mid) < 3:
        return mid, half, period_s
    k = np.concatenate([[0.0], np.cumsum(np.round(np.diff(mid) / period_s))])  # tick numbers, gaps kept
    if np.any(np.diff(k) < 1):
        return mid, half, period_s
    from scipy.optimize import linprog

    # variables (phase - lo[0], period, margin): lo + margin <= phase + k period <= hi - margin
    ones = np.ones_like(k)
    a_ub = np.vstack([np.column_stack([-ones, -k, ones]), np.column_stack([ones, k, ones])])
    b_ub = np.concatenate([-(lo - lo[0]), hi - lo[0]])
    bounds = [(None, None), (0.5 * period_s, 2.0 * period_s), (0.0, None)]
    band = np.max(lo - k * period_s), np.min(hi - k * period_s)
    if band[0] <= band[1]:
        phase, fitted = (band[0] + band[1]) / 2, period_s
    else:
        best = linprog([0.0, 0.0, -1.0], A_ub=a_ub, b_ub=b_ub, bounds=bounds)
        if best.status != 0:
            return mid, half, period_s
        phase, fitted = best.x[0] + lo[0], best.x[1]
    bounds[2] = (0.0, 0.0)
    spread = 0.0
    for kk in (0.0, k[-1]):
        ends = [linprog([sign, sign * kk, 0.0], A_ub=a_ub, b_ub=b_ub, bounds=bounds) for sign in (1.0, -1.0)]
        if any(r.status != 0 for r in ends):
            return mid, half, period_s
        spread = max(spread, (-ends[1].fun - ends[0].fun) / 2)
    return phase + k * fitted, np.full_like(mid, spread), float(fitted)


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
    def _clock(self) -> tuple[np.ndarray, np.ndarray, float]:
        if not self.updates:
            return np.empty(0), np.empty(0), self.period_s
        lo = np.array([u.seen_after_s for u in self.updates])
        hi = np.array([u.seen_by_s for u in self.updates])
        return fit_update_clock(lo, hi, self.period_s)

    @property
    def t_s(self) -> np.ndarray:
        """When each update's period ended (host monotonic s)."""
        return self._clock[0]

    @property
    def t_uncertainty_s(self) -> np.ndarray:
        return self._clock[1]

    @cached_property
    def _intervals(self) -> tuple[np.ndarray, np.ndarray]:
        t, _, period = self._clock
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
            raise KeyError(f"mark {label!r} #{occurrence} not in trace (marks: {[m.label for m in self.marks]})")
        return times[occurrence]

    def between(self, start: str, end: str, method: Method = "trace") -> WindowEnergy:
        """Energy between two marks (their first occurrences)."""
        return self.energy(self.mark_time(start), self.mark_time(end), method=method)

    # -- energy --------------------------------------------------------------------------------

    def energy(self, t0_s: float, t1_s: float, method: Method = "trace") -> WindowEnergy:
        """Energy drawn in [t0_s, t1_s] by the trace (power x time) or the instrument's integrator."""
        if not t0_s < t1_s:
            raise ValueError(f"empty window [{t0_s}, {t1_s}]")
        starts, ends = self._intervals
        levels, unc = self.power_w, self.t_uncertainty_s
        overload = np.array([u.overload for u in self.updates])
        if method == "trace":
            increments = levels * (ends - starts)
        elif method == "integrator":
            idx = np.array([i for i, u in enumerate(self.updates) if u.integrator_energy_j is not None], int)
            if len(idx) < 2:
                raise ValueError("the trace holds fewer than two integrator readings")
            totals = np.array([self.updates[i].integrator_energy_j for i in idx])
            # each increment covers the time since the previous reading; the first reading only
            # opens the record (a zero-length interval whose level is still the edge's neighbour)
            ends = self.t_s[idx]
            starts = np.concatenate([ends[:1], ends[:-1]])
            increments = np.concatenate([[0.0], np.diff(totals)])
            levels, unc, overload = levels[idx], unc[idx], overload[idx]
        else:
            raise ValueError(f"unknown method {method!r}")
        if self.fault and (not len(ends) or t1_s > ends[-1]):
            last = f"its last reading ends at {ends[-1]:.3f}" if len(ends) else "it holds no readings"
            window = f"window [{t0_s:.3f}, {t1_s:.3f}]"
            raise ValueError(f"{window} reaches past the end of a partial trace ({last}): {self.fault}")
        energy_j, uncertainty_j, flagged = _apportion(t0_s, t1_s, starts, ends, increments, levels, unc, overload)
        return WindowEnergy(t0_s, t1_s, energy_j, uncertainty_j, method, flagged)


def _apportion(t0, t1, starts, ends, increments, levels, unc, overload) -> tuple[float, float, bool]:
    """Sum the increments over [t0, t1], splitting the (at most two) updates straddling an edge."""
    if not len(ends) or t0 < starts[0] or t1 > ends[-1]:
        span = f"[{starts[0]:.3f}, {ends[-1]:.3f}]" if len(ends) else "nothing"
        raise ValueError(f"window [{t0:.3f}, {t1:.3f}] is not covered by the trace, which covers {span}")
    inside = np.flatnonzero((ends > t0) & (starts < t1))
    gaps = np.flatnonzero(starts[1:] > ends[:-1])
    for g in gaps:
        if ends[g] < t1 and starts[g + 1] > t0:
            raise ValueError(f"the trace has no update for [{ends[g]:.3f}, {starts[g + 1]:.3f}] inside the window")

    def adjacent(i: int, j: int) -> bool:
        return 0 <= j < len(ends) and (ends[j] == starts[i] if j < i else ends[i] == starts[j])

    def level(i: int, j: int) -> float:
        return levels[j] if adjacent(i, j) else levels[i]

    energy_j = uncertainty_j = 0.0
    for i in inside:
        left_out, right_out = max(0.0, t0 - starts[i]), max(0.0, ends[i] - t1)
        part = increments[i]
        seen = [levels[i]]
        for out_s, outward in ((left_out, -1), (right_out, +1)):
            if out_s <= 0:
                continue
            p_out, p_in = level(i, i + outward), level(i, i - outward)
            p_far = level(i + outward, i + 2 * outward) if adjacent(i, i + outward) else p_out
            part -= p_out * out_s
            seen += [p_out, p_in]
            uncertainty_j += abs(p_in - p_out) * unc[i] + abs(p_out - p_far) * out_s
        # When the load changed inside this update (a workload starting just past the edge), the
        # outside part did not draw its neighbour's level throughout and the estimate can leave the
        # physically possible range: the inside part lies between nothing and the whole update.
        bounded = min(max(part, 0.0), increments[i])
        if bounded != part:
            uncertainty_j += max(seen) * ((ends[i] - starts[i]) - left_out - right_out)
        energy_j += bounded
    return float(energy_j), float(uncertainty_j), bool(overload[inside].any())
