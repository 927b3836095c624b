"""Trace math: placing updates on the host clock, energy over windows, edges, the uncertainty budget."""

from __future__ import annotations

import numpy as np
import pytest

from labbench.powertrace import Mark, PowerTrace, PowerUpdate, Steady, fit_update_clock
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
    blank: tuple[int, ...] = (),
    overload: tuple[int, ...] = (),
    ranges: dict[int, float] | None = None,
    marks: tuple[Mark, ...] = (),
    accuracy: float = 0.0,
    rounding: float = 0.0,
) -> PowerTrace:
    """What a poller would record from an exact instrument: update k ends at phase + k * period,
    with its mean power, its extremes and the integrator's totals (a `blank` update is counted by
    nothing, a `skip`ped one is counted but never read); `accuracy` and `rounding` relative."""
    rng = np.random.default_rng(seed)
    updates, energy_j, elapsed_s = [], 0.0, 0.0
    for k in range(1, n + 1):
        end = phase_s + k * PERIOD_S
        stats = channel.stats(end - PERIOD_S, end)
        w = stats.mean_power_w
        if k in blank:
            continue
        energy_j, elapsed_s = energy_j + w * PERIOD_S, elapsed_s + PERIOD_S
        if k in skip:
            continue
        before, after = rng.uniform(0, poll_s), rng.uniform(0, poll_s)
        updates.append(PowerUpdate(
            end - before, end + after, 5.0, w / 5.0, w, overload=k in overload, integrator_energy_j=energy_j,
            integrator_elapsed_s=elapsed_s, power_accuracy_w=accuracy * w, power_rounding_w=rounding * w,
            power_min_w=stats.min_power_w, power_max_w=stats.peak_power_w,
            extremes_accuracy_w=accuracy * stats.peak_power_w, integrator_rounding_j=rounding * energy_j,
            current_range_a=(ranges or {}).get(k, 1.6),
        ))  # fmt: skip
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
    t, unc, period, regular = fit_update_clock(lo, hi, PERIOD_S)
    assert regular and period == pytest.approx(PERIOD_S, abs=1e-4)
    assert np.all(np.abs(t - ticks) <= unc + 1e-12)
    assert unc.max() < 0.005  # the midpoints alone would be good to +-10 ms


def test_clock_fit_falls_back_to_midpoints_when_no_regular_clock_fits() -> None:
    ticks = PERIOD_S * np.arange(20) + np.where(np.arange(20) < 10, 0.0, 0.2)  # a phase jump
    lo, hi = ticks - 0.004, ticks + 0.006
    t, unc, period, regular = fit_update_clock(lo, hi, PERIOD_S)
    assert not regular and np.allclose(t, ticks + 0.001) and np.allclose(unc, 0.005) and period == PERIOD_S


def test_result_latency_widens_the_anchoring(channel: PowerChannel) -> None:
    """Results that appear up to 30 ms after their period: the fitted ends move back, the ticks stay
    within the anchoring uncertainty of the true ends."""
    late = synthetic_trace(channel, phase_s=0.11, n=20)
    shifted = tuple(
        PowerUpdate(u.seen_after_s + 0.03, u.seen_by_s + 0.03, u.voltage_v, u.current_a, u.power_w)
        for u in late.updates
    )
    trace = PowerTrace(PERIOD_S, shifted, latency_s=0.03)
    true_ends = 0.11 + PERIOD_S * np.arange(1, 21)
    assert trace.clock.regular and np.all(np.abs(trace.t_s - true_ends) <= trace.t_uncertainty_s + 1e-12)


@pytest.mark.parametrize("t0, t1", [(2.13, 7.87), (2.0, 8.0), (3.41, 3.62), (2.49, 12.01)])
def test_edges_take_the_steady_neighbour_and_state_their_worst_case(
    channel: PowerChannel, t0: float, t1: float
) -> None:
    truth = workload(channel, t0, t1)
    trace = synthetic_trace(channel, phase_s=0.0371, n=30)
    for method in ("trace", "integrator"):
        w = trace.energy(t0, t1, method=method)
        assert abs(w.energy_j - truth) <= w.uncertainty_j, method
        assert abs(w.energy_j - truth) / truth < 2e-3, method  # the idle neighbour's level was right
        assert w.edges_j > 50 * abs(w.energy_j - truth), method  # ... but nothing showed it, so: worst case


def test_a_burst_just_past_the_edge_is_within_the_stated_uncertainty(channel: PowerChannel) -> None:
    """The case the old edge rule missed: steady idle inside the window's last update and beyond it,
    and a 5 W burst just after the window's end, inside the straddling update. Taking the outside
    part at the neighbour's idle puts the burst inside the window; the uncertainty now says so."""
    channel.set_power(5.0, t=6.1)
    channel.set_power(0.8, t=6.3)
    t0, t1 = 2.0, 6.05
    truth = channel.energy_j(t0, t1)
    trace = synthetic_trace(channel, phase_s=0.0, n=20)
    for method in ("trace", "integrator"):
        w = trace.energy(t0, t1, method=method)
        assert w.energy_j - truth > 0.05 * truth  # burst counted in, as far as the update's peak allows ...
        assert abs(w.energy_j - truth) <= w.uncertainty_j  # ... and stated


def test_steady_guards_make_tight_edges_and_a_refuted_claim_is_a_problem(channel: PowerChannel) -> None:
    truth = workload(channel, 3.13, 9.87)
    trace = synthetic_trace(channel, phase_s=0.0371, n=30)
    before, after = trace.steady(1.5, 3.13), trace.steady(9.87, 11.0)
    assert isinstance(before, Steady) and before.level_w == pytest.approx(0.8) and before.spread_w == 0.0
    assert trace.steady(4.0, 8.0) is None  # the workload is not steady
    assert before.agrees_with(0.8, 0.0) and not before.agrees_with(0.9, 0.05)
    for method in ("trace", "integrator"):
        w = trace.energy(3.13, 9.87, method, before=before, after=after)
        assert w.valid and abs(w.energy_j - truth) <= w.uncertainty_j and w.edges_j < 2e-3 * truth, method
    busy = Steady(2.4, 0.0, 0.0, 1.5, 3.0)  # claims the load outside drew 2.4 W: the edge update read 0.8 W
    w = trace.energy(2.1, 8.0, before=busy)
    assert w.contradicted == ("start",) and not w.valid
    assert "straddling the start edge contradicts" in w.problems[0]


def test_the_budget_adds_accuracy_rounding_and_edges(channel: PowerChannel) -> None:
    """Accuracy over every update the window touches (an edge update's whole: its error passes into
    its inside part), rounding of each reading, or of the two totals the integrator's telescope to."""
    workload(channel, 2.0, 8.0)
    trace = synthetic_trace(channel, phase_s=0.0, n=20, accuracy=0.01, rounding=1e-4)
    w = trace.energy(2.2, 7.8)
    touched_j = channel.energy_j(2.0, 8.0)
    assert w.accuracy_j == pytest.approx(0.01 * touched_j) and w.rounding_j == pytest.approx(1e-4 * touched_j)
    assert w.uncertainty_j == w.accuracy_j + w.rounding_j + w.edges_j
    assert w.power_uncertainty_w == pytest.approx(w.uncertainty_j / 5.6)
    integrated = trace.energy(2.2, 7.8, method="integrator")
    totals = [u.integrator_energy_j for u in trace.updates]  # update k ends at k / 2 s
    assert integrated.rounding_j == pytest.approx(1e-4 * (totals[3] + totals[15]))


def test_steady_load_gives_a_tiny_uncertainty(channel: PowerChannel) -> None:
    trace = synthetic_trace(channel, phase_s=0.2, n=20)
    w = trace.energy(1.234, 8.765)
    assert w.energy_j == pytest.approx(0.8 * (8.765 - 1.234), rel=1e-12)
    assert w.uncertainty_j < 1e-3 * w.energy_j  # the clock's anchoring only
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
    w = trace.energy(1.1, 8.9, method="integrator")  # the counter kept counting, its elapsed time says so
    assert w.energy_j == pytest.approx(truth, rel=2e-3) and abs(w.energy_j - truth) <= w.uncertainty_j


def test_a_blanked_update_is_refused_never_counted_short(channel: PowerChannel) -> None:
    """A range change blanks an update: no reading, and nothing integrated. Both methods refuse a
    window holding it (the integrator's elapsed time shows the missing period)."""
    workload(channel, 1.1, 8.9)
    trace = synthetic_trace(channel, phase_s=0.0, n=20, blank=(9,))
    with pytest.raises(ValueError, match="no update for"):
        trace.energy(1.1, 8.9)
    with pytest.raises(ValueError, match=r"counted 0\.500 s of .* a blanked update inside the window"):
        trace.energy(1.1, 8.9, method="integrator")
    assert trace.energy(5.0, 8.9, method="integrator").valid  # after it, windows measure as usual
    bare = PowerTrace(
        PERIOD_S,
        tuple(
            PowerUpdate(
                u.seen_after_s, u.seen_by_s, 5.0, 0.16, u.power_w, integrator_energy_j=u.integrator_energy_j
            )
            for u in trace.updates
        ),
    )
    with pytest.raises(ValueError, match="no elapsed time shows"):
        bare.energy(1.1, 8.9, method="integrator")  # a gap the counter cannot vouch for


def test_marks_overload_and_range_changes(channel: PowerChannel) -> None:
    marks = (Mark("infer-start", 2.3), Mark("infer-end", 6.6), Mark("infer-start", 7.0))
    trace = synthetic_trace(
        channel, phase_s=0.0, n=20, overload=(9,), marks=marks, ranges=dict.fromkeys((18, 19), 6.25)
    )
    assert trace.mark_time("infer-start", 1) == 7.0
    w = trace.between("infer-start", "infer-end")
    assert (
        (w.t0_s, w.t1_s) == (2.3, 6.6) and w.overload and not w.valid and w.problems == ["a range overload"]
    )
    assert not trace.energy(5.0, 8.0).overload
    assert trace.energy(3.1, 3.9).overload  # the flag may come an update late
    changed = trace.energy(8.0, 9.6)
    assert changed.range_change and changed.problems == ["a range change (? V / 1.6 A -> ? V / 6.25 A)"]
    with pytest.raises(KeyError, match="infer-stop"):
        trace.between("infer-start", "infer-stop")


def test_integrator_needs_readings(channel: PowerChannel) -> None:
    trace = synthetic_trace(channel, phase_s=0.0, n=5)
    bare = PowerTrace(
        PERIOD_S, tuple(PowerUpdate(u.seen_after_s, u.seen_by_s, 5.0, 0.16, 0.8) for u in trace.updates)
    )
    with pytest.raises(ValueError, match="integrator readings"):
        bare.energy(1.0, 2.0, method="integrator")
    assert bare.covers[1] == pytest.approx(trace.covers[1])


def test_an_edge_update_mostly_outside_before_a_load_step_stays_physical(channel: PowerChannel) -> None:
    """The idle window ends a few ms into an update whose rest, and the next update, carry a
    workload: taking the next update's level for the outside part would make the inside negative."""
    channel.set_power(2.2, t=3.0)
    trace = synthetic_trace(channel, phase_s=0.499, n=12)
    w = trace.energy(1.0, 3.0001)
    truth = channel.energy_j(w.t0_s, w.t1_s)
    assert w.energy_j > 0 and abs(w.energy_j - truth) <= w.uncertainty_j


def test_partial_trace_measures_its_complete_windows_and_refuses_the_rest(channel: PowerChannel) -> None:
    """A capture that failed at about t=4.5 s: window 0 finished before it, window 1 did not."""
    truth = workload(channel, 1.1, 3.9)
    marks = (Mark("window-0-start", 1.1), Mark("window-0-end", 3.9), Mark("window-1-start", 4.3))
    updates = synthetic_trace(channel, phase_s=0.0, n=20).updates[:9]  # the last one ends at 4.5
    fault = "pm: capture: TCPIP::x::1::SOCKET: no new reading for 1.50 s"
    partial = PowerTrace(PERIOD_S, updates, marks, fault=fault)
    for method in ("trace", "integrator"):
        w = partial.between("window-0-start", "window-0-end", method=method)
        assert abs(w.energy_j - truth) <= w.uncertainty_j, method
        assert abs(w.energy_j - truth) / truth < 2e-3, method
        tail = partial.energy(1.1, 4.4, method=method)  # ends inside the last reading: no neighbour beyond
        assert abs(tail.energy_j - (truth + 0.8 * 0.5)) <= tail.uncertainty_j, method
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
