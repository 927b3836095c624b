"""The simulated lab's power bus: per-channel piecewise power on the host monotonic clock.

Simulated boards post what they draw (`set_power`, or a scripted `play`), simulated instruments
read the exact statistics of any interval (`stats`) or the time spent at each level (`levels`,
for what an input sees after clipping and calibration), and tests and benchmarks read the
ground-truth ledger (`energy_j`, `mean_power_w`). Everything is integrated in closed form from
the piecewise description, never by sampling, so the ledger is exact to floating point.

A channel keeps its timeline for `retention_s` behind the newest write; older segments are
folded into a running total, so the cumulative energy since the channel was created stays
available however long the lab runs, while intervals that start in the pruned past do not.

Level noise (`LevelNoise`, posted with `set_power(..., noise=)`): a board's draw varies around the
level it posts, by a fresh factor in every `period_s` cell of a fixed grid on the host clock. The
factors are a function of the noise's seed and the cell alone, so the noise adds no entries to the
timeline (one per posted level, as without it) and is integrated exactly, cell by cell.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol, TypedDict

import numpy as np

DEFAULT_VOLTAGE_V = 5.0
DEFAULT_RETENTION_S = 600.0
_PRUNE_BATCH = 64  # prune only once this many segments are behind the horizon (amortised cost)
# Level noise of the simulated boards, standard deviation in % of the level. Assumed: seed004 (3.4.1)
# found the standard deviation of its PM1000+ power measurements "negligible", 6.1 % of the mean at
# most (AlexNet on the Coral Micro); 2 % per 10 ms cell stays well inside that after any averaging.
POWER_NOISE_PCT = 2.0
NOISE_PERIOD_S = 0.01


class Pattern(Protocol):
    """A load shape on absolute time. `occupancy` says how long it spends at each power level."""

    @property
    def start(self) -> float | None:
        """Absolute start (host monotonic s); None: when it is played."""
        ...

    @property
    def duration_s(self) -> float | None:
        """How long it lasts; None: until something else is posted."""
        ...

    def occupancy(self, t0: float, t1: float) -> dict[float, float]:
        """Seconds spent at each power level (W) within [t0, t1], exactly."""
        ...

    def power_at(self, t: float) -> float:
        """The level in force at `t`."""
        ...


@dataclass(frozen=True)
class Constant:
    """A constant draw."""

    power_w: float
    start: float | None = None
    duration_s: float | None = None

    def occupancy(self, t0: float, t1: float) -> dict[float, float]:
        return {self.power_w: t1 - t0}

    def power_at(self, t: float) -> float:
        return self.power_w


@dataclass(frozen=True)
class SquareWave:
    """`base_w`, with a burst of `burst_w` for `burst_s` at the start of every `period_s`."""

    base_w: float
    burst_w: float
    burst_s: float
    period_s: float
    start: float | None = None
    duration_s: float | None = None

    def __post_init__(self) -> None:
        if not (self.period_s > 0 and 0 <= self.burst_s <= self.period_s):
            raise ValueError(f"need period_s > 0 and 0 <= burst_s <= period_s, got {self}")

    def _burst_time(self, t: float) -> float:
        """Burst seconds in [start, t] (a closed form: whole periods plus the part of the last)."""
        u = t - (self.start or 0.0)
        whole = math.floor(u / self.period_s)
        return whole * self.burst_s + min(u - whole * self.period_s, self.burst_s)

    def occupancy(self, t0: float, t1: float) -> dict[float, float]:
        on_s = self._burst_time(t1) - self._burst_time(t0)
        levels = {self.base_w: 0.0}
        levels[self.burst_w] = levels.get(self.burst_w, 0.0) + on_s
        levels[self.base_w] += (t1 - t0) - on_s
        return levels

    def power_at(self, t: float) -> float:
        phase_s = (t - (self.start or 0.0)) % self.period_s
        return self.burst_w if phase_s < self.burst_s else self.base_w


def derive_seed(seed: int | str, stream: str) -> int:
    """A 64-bit seed for one random stream (`stream`) of the simulator seeded `seed`, the same in every
    process (unlike hash())."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{stream}".encode()).digest()[:8], "little")


@dataclass(frozen=True)
class LevelNoise:
    """Variation of posted levels: in cell k (k x period_s <= t < (k + 1) x period_s) a level P is drawn
    as P x max(0, 1 + pct/100 x z_k), z_k a standard normal of (seed, k) alone."""

    pct: float
    seed: int
    period_s: float = NOISE_PERIOD_S

    def __post_init__(self) -> None:
        if not (self.pct >= 0 and self.period_s > 0):
            raise ValueError(f"need pct >= 0 and period_s > 0, got {self}")

    def factors(self, cells: np.ndarray) -> np.ndarray:
        """The factor on the level in each of `cells` (Box-Muller on two SplitMix64 outputs per cell)."""
        x = _mix(np.asarray(cells).astype(np.uint64) * np.uint64(2) + _mix(np.array([self.seed], np.uint64)))
        u1 = ((x >> np.uint64(11)) + np.uint64(1)) * 2.0**-53  # (0, 1]
        u2 = (_mix(x + np.uint64(1)) >> np.uint64(11)) * 2.0**-53
        z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
        return np.maximum(0.0, 1.0 + self.pct / 100 * z)


@dataclass(frozen=True)
class Noisy:
    """`power_w` with level noise on it."""

    power_w: float
    noise: LevelNoise
    start: float | None = None
    duration_s: float | None = None

    def occupancy(self, t0: float, t1: float) -> dict[float, float]:
        period_s = self.noise.period_s
        cells = np.arange(math.floor(t0 / period_s), math.floor(t1 / period_s) + 1)
        seconds = np.minimum((cells + 1) * period_s, t1) - np.maximum(cells * period_s, t0)
        inside = seconds > 0
        if not inside.any():
            return {self.power_at(t0): 0.0}
        watts = self.power_w * self.noise.factors(cells[inside])
        levels, which = np.unique(watts, return_inverse=True)
        return dict(zip(levels.tolist(), np.bincount(which, weights=seconds[inside]).tolist(), strict=True))

    def power_at(self, t: float) -> float:
        return float(self.power_w * self.noise.factors(np.array([math.floor(t / self.noise.period_s)]))[0])


@dataclass(frozen=True)
class LoadStats:
    """Exact statistics of a channel's power over an interval."""

    duration_s: float
    energy_j: float
    mean_power_w: float
    rms_power_w: float  # sqrt(mean(P^2)); with a fixed supply voltage, Arms = rms_power_w / V
    peak_power_w: float
    min_power_w: float


@dataclass
class _Segment:
    t0: float
    t1: float  # math.inf for the open-ended last segment
    pattern: Pattern


class PowerChannel:
    """One supply rail: a timeline of patterns, thread-safe, with a bounded memory."""

    def __init__(
        self,
        name: str,
        *,
        voltage_v: float = DEFAULT_VOLTAGE_V,
        retention_s: float = DEFAULT_RETENTION_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.name = name
        self._clock = clock
        self._voltage_v = voltage_v
        self._retention_s = retention_s
        self._lock = threading.Lock()
        self.origin_s = clock()  # nothing was drawn before the channel existed
        self._horizon_s = self.origin_s  # the timeline starts here; before it only a total is kept
        self._pruned_energy_j = 0.0  # energy between origin_s and _horizon_s
        self._segments = [_Segment(self.origin_s, math.inf, Constant(0.0))]
        self._starts = [self.origin_s]

    # -- writing -------------------------------------------------------------------------------

    @property
    def voltage_v(self) -> float:
        return self._voltage_v

    def set_voltage(self, voltage_v: float) -> None:
        """The supply voltage (a DC rail); the current is power / voltage."""
        if voltage_v <= 0:
            raise ValueError(f"{self.name}: supply voltage must be positive, got {voltage_v}")
        self._voltage_v = voltage_v

    def set_power(self, power_w: float, t: float | None = None, noise: LevelNoise | None = None) -> None:
        """Draw `power_w` (with `noise` on it, if any) from `t` (default now) on, replacing whatever was
        scheduled after `t`."""
        start = self._clock() if t is None else t
        pattern = Noisy(power_w, noise) if noise is not None and noise.pct else Constant(power_w)
        self._overlay(start, math.inf, pattern)

    def play(self, pattern: Pattern) -> tuple[float, float]:
        """Run `pattern` from its start (default now) for its duration (default: for ever).

        What was scheduled outside that span is kept. Returns the (start, end) it occupies.
        """
        start = self._clock() if pattern.start is None else pattern.start
        if pattern.start is None:  # anchor the pattern's phase at the moment it is played
            pattern = _with_start(pattern, start)
        end = math.inf if pattern.duration_s is None else start + pattern.duration_s
        self._overlay(start, end, pattern)
        return start, end

    def _overlay(self, t0: float, t1: float, pattern: Pattern) -> None:
        if not t0 < t1:
            return
        with self._lock:
            if t0 < self._horizon_s:
                raise ValueError(
                    f"{self.name}: cannot rewrite power at {t0:.6f} s, before the retained "
                    f"history starts ({self._horizon_s:.6f} s)"
                )
            segs = self._segments
            first = bisect.bisect_right(self._starts, t0) - 1
            last = bisect.bisect_left(self._starts, t1) - 1  # last segment starting before t1
            head, tail = segs[first], segs[last]
            new = []
            if head.t0 < t0:
                new.append(_Segment(head.t0, t0, head.pattern))
            new.append(_Segment(t0, t1, pattern))
            if tail.t1 > t1:
                new.append(_Segment(t1, tail.t1, tail.pattern))
            if new[0].t0 == t0 and first > 0 and _same_constant(segs[first - 1].pattern, pattern):
                first -= 1  # extend the previous constant instead of adding a boundary
                new[0] = _Segment(segs[first].t0, new[0].t1, pattern)
            segs[first : last + 1] = new
            self._starts[first : last + 1] = [s.t0 for s in new]
            self._prune()

    def _prune(self) -> None:
        cutoff = self._clock() - self._retention_s
        keep_from = bisect.bisect_right(self._starts, cutoff) - 1  # the segment holding cutoff
        if keep_from < _PRUNE_BATCH:
            return
        self._pruned_energy_j += sum(_energy(s, s.t0, s.t1) for s in self._segments[:keep_from])
        del self._segments[:keep_from], self._starts[:keep_from]
        self._horizon_s = self._starts[0]

    # -- reading -------------------------------------------------------------------------------

    def power_w(self, t: float | None = None) -> float:
        """The instantaneous draw at `t` (default now)."""
        t = self._clock() if t is None else t
        with self._lock:
            if t < self._horizon_s:
                raise LookupError(f"{self.name}: {t:.6f} s is before the retained history")
            seg = self._segments[bisect.bisect_right(self._starts, t) - 1]
            return seg.pattern.power_at(t)

    def energy_j(self, t0: float, t1: float | None = None) -> float:
        """Ground truth: energy drawn in [t0, t1] (t1 default now). From `origin_s` always works."""
        t1 = self._clock() if t1 is None else t1
        t0 = max(t0, self.origin_s)
        if t1 <= t0:
            return 0.0
        with self._lock:
            if t0 < self._horizon_s:
                if t0 > self.origin_s or t1 < self._horizon_s:
                    raise LookupError(
                        f"{self.name}: power before {self._horizon_s:.6f} s was pruned (retention "
                        f"{self._retention_s} s); only the total since {self.origin_s:.6f} s is kept"
                    )
                return self._pruned_energy_j + self._levels_energy(self._horizon_s, t1)
            return self._levels_energy(t0, t1)

    def mean_power_w(self, t0: float, t1: float | None = None) -> float:
        """Ground truth: mean power over [t0, t1]."""
        t1 = self._clock() if t1 is None else t1
        return self.energy_j(t0, t1) / (t1 - t0)

    def levels(self, t0: float, t1: float) -> dict[float, float]:
        """Seconds spent at each power level (W) within [t0, t1] (t0 < t1, in the retained history)."""
        if not t0 < t1:
            raise ValueError(f"{self.name}: empty interval [{t0}, {t1}]")
        with self._lock:
            if t0 < self._horizon_s:
                raise LookupError(f"{self.name}: {t0:.6f} s is before the retained history")
            return self._levels(t0, t1)

    def stats(self, t0: float, t1: float) -> LoadStats:
        """Exact mean, rms, peak and minimum power over [t0, t1] (t0 < t1, in the retained history)."""
        levels = self.levels(t0, t1)
        duration_s = t1 - t0
        energy_j = sum(p * s for p, s in levels.items())
        visited = [p for p, s in levels.items() if s > 0] or list(levels)
        return LoadStats(
            duration_s=duration_s,
            energy_j=energy_j,
            mean_power_w=energy_j / duration_s,
            rms_power_w=math.sqrt(sum(p * p * s for p, s in levels.items()) / duration_s),
            peak_power_w=max(visited),
            min_power_w=min(visited),
        )

    def _levels_energy(self, t0: float, t1: float) -> float:
        return sum(p * s for p, s in self._levels(t0, t1).items())

    def _levels(self, t0: float, t1: float) -> dict[float, float]:
        """Seconds at each power level within [t0, t1]; caller holds the lock."""
        i = bisect.bisect_right(self._starts, t0) - 1
        levels: dict[float, float] = {}
        while i < len(self._segments):
            seg = self._segments[i]
            if seg.t0 >= t1 and levels:
                break
            a, b = max(seg.t0, t0), min(seg.t1, t1)
            for p, s in seg.pattern.occupancy(a, b).items():
                levels[p] = levels.get(p, 0.0) + s
            i += 1
        return levels


class _ChannelSettings(TypedDict):
    voltage_v: float
    retention_s: float
    clock: Callable[[], float]


class PowerBus:
    """Named power channels ("<instrument>:<channel>"), created on first use."""

    def __init__(
        self,
        *,
        voltage_v: float = DEFAULT_VOLTAGE_V,
        retention_s: float = DEFAULT_RETENTION_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._defaults: _ChannelSettings = {
            "voltage_v": voltage_v,
            "retention_s": retention_s,
            "clock": clock,
        }
        self._channels: dict[str, PowerChannel] = {}
        self._lock = threading.Lock()

    def channel(self, name: str) -> PowerChannel:
        with self._lock:
            if name not in self._channels:
                self._channels[name] = PowerChannel(name, **self._defaults)
            return self._channels[name]

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._channels)


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (uint64 arithmetic wraps, as the algorithm wants)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _energy(seg: _Segment, t0: float, t1: float) -> float:
    return sum(p * s for p, s in seg.pattern.occupancy(t0, t1).items())


def _same_constant(a: Pattern, b: Pattern) -> bool:
    return isinstance(a, Constant) and isinstance(b, Constant) and a.power_w == b.power_w


def _with_start(pattern: Pattern, start: float) -> Pattern:
    return replace(pattern, start=start)  # type: ignore[type-var]
