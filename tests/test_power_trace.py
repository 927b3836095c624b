"""Trace math: placing updates on the host clock, energy over windows, edge apportioning."""

from __future__ import annotations

import numpy as np
import pytest

from labbench.measure.power import Mark, PowerTrace, PowerUpdate, fit_update_clock
from labbench.sim.powerbus import PowerChannel, SquareWave

PERIOD_S = 0.5


class FakeClock:
    def __call__(self) -> float:
        return 0.0


def synthetic_trace(
    channel: PowerChannel,
    phase_s: float,
    n: int,
    *,
    poll_s: float = 0.01,
    seed: int = 0,
    skip: tuple[int, ...] = (),
    overload: tuple[int, ...] = (),
    marks: tuple[Mark, ...] = (),
) -> PowerTrace:
    """What a poller would record from an ideal instrument: update k ends at phase + k * period."""
    rng = np.random.default_rng(seed)
    updates, energy_j = [], 0.0
    for k in range(1, n + 1):
        end = phase_s + k * PERIOD_S
        w = channel.mean_power_w(end - PERIOD_S, end)
        energy_j += w * PERIOD_S
        if k in skip:
            continue
        before, after = rng.uniform(0, poll_s), rng.uniform(0, poll_s)
        updates.append(PowerUpdate(end - before, end + after, 5.0, w / 5.0, w, overload=k in overload,
                                   integrator_energy_j=energy_j))  # fmt: skip
    return PowerTrace(PERIOD_S, tuple(updates), marks)


@pytest.fixture
def channel() -> PowerChannel:
    ch = PowerChannel("pm:1", clock=FakeClock())
    ch.set_power(0.8, t=0.0)
    return ch


def workload(channel: PowerChannel, t0: float, t1: float, duty: float = 0.3) -> float:
    """A bursty workload on an idle baseline in [t0, t1]; returns the true energy in the window."""
    channel.play(SquareWave(0.8, 2.4, burst_s=duty * 0.1, period_s=0.1, start=t0, duration_s=t1 - t0))
    return channel.energy_j(t0, t1)


def test_clock_fit_narrows_the_anchoring_below_the_poll_interval() -> None:
    rng = np.random.default_rng(1)
    ticks = 3.217 + PERIOD_S * np.arange(40)
    lo, hi = ticks - rng.uniform(0, 0.02, 40), ticks + rng.uniform(0, 0.02, 40)
    t, unc, period = fit_update_clock(lo, hi, PERIOD_S)
    assert period == pytest.approx(PERIOD_S, abs=1e-4)
    assert np.all(np.abs(t - ticks) <= unc + 1e-12)
    assert unc.max() < 0.005  # the midpoints alone would be good to +-10 ms


def test_clock_fit_falls_back_to_midpoints_when_no_regular_clock_fits() -> None:
    ticks = PERIOD_S * np.arange(20) + np.where(np.arange(20) < 10, 0.0, 0.2)  # a phase jump
    lo, hi = ticks - 0.004, ticks + 0.006
    t, unc, period = fit_update_clock(lo, hi, PERIOD_S)
    assert np.allclose(t, ticks + 0.001) and np.allclose(unc, 0.005) and period == PERIOD_S


@pytest.mark.parametrize("t0, t1", [(2.13, 7.87), (2.0, 8.0), (3.41, 3.62), (2.49, 12.01)])
def test_edges_are_apportioned_by_the_outside_neighbour(channel: PowerChannel, t0: float, t1: float) -> None:
    truth = workload(channel, t0, t1)
    trace = synthetic_trace(channel, phase_s=0.0371, n=30)
    for method in ("trace", "integrator"):
        w = trace.energy(t0, t1, method=method)
        assert abs(w.energy_j - truth) <= w.uncertainty_j + 1e-9, method
        assert abs(w.energy_j - truth) / truth < 2e-3, method


def test_steady_load_gives_a_tiny_uncertainty(channel: PowerChannel) -> None:
    trace = synthetic_trace(channel, phase_s=0.2, n=20)
    w = trace.energy(1.234, 8.765)
    assert w.energy_j == pytest.approx(0.8 * (8.765 - 1.234), rel=1e-12)
    assert w.uncertainty_j == pytest.approx(0.0, abs=1e-12)
    assert w.mean_power_w == pytest.approx(0.8)


def test_window_outside_the_trace_is_refused(channel: PowerChannel) -> None:
    trace = synthetic_trace(channel, phase_s=0.0, n=10)  # covers about [0, 5]
    with pytest.raises(ValueError, match="not covered"):
        trace.energy(4.0, 6.0)
    with pytest.raises(ValueError, match="empty window"):
        trace.energy(2.0, 2.0)


def test_missed_update_is_a_gap_for_the_trace_but_not_for_the_integrator(channel: PowerChannel) -> None:
    truth = workload(channel, 1.1, 8.9)
    trace = synthetic_trace(channel, phase_s=0.0, n=20, skip=(9,))
    with pytest.raises(ValueError, match="no update for"):
        trace.energy(1.1, 8.9)
    assert trace.energy(5.0, 8.9).energy_j == pytest.approx(channel.energy_j(5.0, 8.9), rel=1e-3)
    w = trace.energy(1.1, 8.9, method="integrator")  # the counter kept counting across the gap
    assert w.energy_j == pytest.approx(truth, rel=2e-3)


def test_marks_and_overload(channel: PowerChannel) -> None:
    marks = (Mark("infer-start", 2.3), Mark("infer-end", 6.6), Mark("infer-start", 7.0))
    trace = synthetic_trace(channel, phase_s=0.0, n=20, overload=(9,), marks=marks)
    assert trace.mark_time("infer-start", 1) == 7.0
    w = trace.between("infer-start", "infer-end")
    assert (w.t0_s, w.t1_s) == (2.3, 6.6) and w.overload
    assert not trace.energy(5.0, 8.0).overload
    with pytest.raises(KeyError, match="infer-stop"):
        trace.between("infer-start", "infer-stop")


def test_integrator_needs_readings(channel: PowerChannel) -> None:
    trace = synthetic_trace(channel, phase_s=0.0, n=5)
    bare = PowerTrace(PERIOD_S, tuple(PowerUpdate(u.seen_after_s, u.seen_by_s, 5.0, 0.16, 0.8) for u in trace.updates))
    with pytest.raises(ValueError, match="integrator readings"):
        bare.energy(1.0, 2.0, method="integrator")
    assert bare.covers[1] == pytest.approx(trace.covers[1])


def test_an_edge_update_mostly_outside_before_a_load_step_stays_physical():
    """The idle window ends a few ms into an update whose rest, and the next update, carry a
    workload: taking the next update's level for the outside part would make the inside negative."""
    from labbench.measure.power import _apportion

    starts = np.array([-1.001, -0.501, -0.001, 0.499, 0.999, 1.499, 1.999, 2.499])
    ends = starts + 0.5
    levels = np.array([0.1309, 0.099, 0.099, 0.099, 0.099, 0.099, 0.099, 0.2204])
    energy_j, uncertainty_j, _ = _apportion(0.0, 2.0001, starts, ends, levels * 0.5, levels,
                                            np.full(8, 0.004), np.zeros(8, bool))
    truth_j = 0.099 * 2.0001
    assert abs(energy_j - truth_j) <= uncertainty_j and abs(energy_j - truth_j) / truth_j < 0.001


def test_partial_trace_measures_its_complete_windows_and_refuses_the_rest(channel: PowerChannel) -> None:
    """A capture that failed at about t=4.5 s: window 0 finished before it, window 1 did not."""
    truth = workload(channel, 1.1, 3.9)
    marks = (Mark("window-0-start", 1.1), Mark("window-0-end", 3.9), Mark("window-1-start", 4.3))
    updates = synthetic_trace(channel, phase_s=0.0, n=20).updates[:9]  # the last one ends at 4.5
    fault = "pm: capture: TCPIP::x::1::SOCKET: no new reading for 1.50 s"
    partial = PowerTrace(PERIOD_S, updates, marks, fault=fault)
    for method in ("trace", "integrator"):
        w = partial.between("window-0-start", "window-0-end", method=method)
        assert abs(w.energy_j - truth) <= w.uncertainty_j + 1e-9, method
        assert abs(w.energy_j - truth) / truth < 2e-3, method
        tail = partial.energy(1.1, 4.4, method=method)  # ends inside the last reading: no neighbour beyond
        assert tail.energy_j == pytest.approx(truth + 0.8 * 0.5, rel=2e-3), method
        with pytest.raises(ValueError, match=r"end of a partial trace \(its last reading ends at 4\.5"):
            partial.energy(4.3, 6.0, method=method)
    with pytest.raises(ValueError, match=f"partial trace.*{fault}"):
        partial.energy(4.3, 6.0)
    with pytest.raises(KeyError, match="window-1-end"):
        partial.between("window-1-start", "window-1-end")  # never marked: the run stopped at the fault
    with pytest.raises(ValueError, match="not covered"):
        PowerTrace(PERIOD_S, updates, marks).energy(4.3, 6.0)  # a complete trace says so plainly
    with pytest.raises(ValueError, match=r"holds no readings\): pm: capture"):
        PowerTrace(PERIOD_S, (), marks, fault=fault).energy(1.1, 3.9)  # failed before the first reading
