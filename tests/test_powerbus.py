"""The power bus ledger: exact integration, overlays, pruning with a kept total, concurrent writers,
level noise."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from labbench.sim.powerbus import Constant, LevelNoise, PowerBus, PowerChannel, SquareWave, derive_seed


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def numeric_energy(channel: PowerChannel, t0: float, t1: float, n: int = 400_000) -> float:
    """Midpoint-rule reference from point samples (independent of the closed forms)."""
    dt = (t1 - t0) / n
    return sum(channel.power_w(t0 + (i + 0.5) * dt) for i in range(n)) * dt


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def channel(clock: FakeClock) -> PowerChannel:
    return PowerBus(clock=clock).channel("pm:1")


def test_square_wave_is_integrated_exactly(channel: PowerChannel, clock: FakeClock) -> None:
    channel.set_power(0.8)
    start, end = channel.play(SquareWave(0.8, 2.4, burst_s=0.03, period_s=0.1, start=1001.0, duration_s=12.0))
    assert (start, end) == (1001.0, 1013.0)
    # 120 bursts of 30 ms at +1.6 W on a 0.8 W base
    assert channel.energy_j(1001.0, 1013.0) == pytest.approx(12 * 0.8 + 120 * 0.03 * 1.6, rel=1e-12)
    # an arbitrary window cutting bursts at both ends, against brute-force sampling
    t0, t1 = 1000.5137, 1003.0421
    assert channel.energy_j(t0, t1) == pytest.approx(numeric_energy(channel, t0, t1), rel=2e-5)
    assert channel.power_w(1001.015) == 2.4 and channel.power_w(1001.05) == 0.8
    assert channel.power_w(1013.01) == 0.8  # after the pattern: what was scheduled before it


def test_stats_give_rms_and_peak(channel: PowerChannel) -> None:
    channel.play(SquareWave(1.0, 3.0, burst_s=0.25, period_s=1.0, start=1000.0))
    s = channel.stats(1000.0, 1002.0)
    assert s.mean_power_w == pytest.approx(1.5)
    assert s.rms_power_w == pytest.approx(np.sqrt(0.75 * 1.0 + 0.25 * 9.0))
    assert (s.peak_power_w, s.min_power_w) == (3.0, 1.0)
    assert channel.stats(1000.5, 1000.9).peak_power_w == 1.0  # no burst inside


def test_levels_give_the_time_at_each_power(channel: PowerChannel) -> None:
    channel.set_power(0.5, t=1000.0)
    channel.play(SquareWave(1.0, 3.0, burst_s=0.25, period_s=1.0, start=1001.0, duration_s=2.0))
    levels = channel.levels(1000.5, 1002.1)
    assert levels == pytest.approx({0.5: 0.5, 1.0: 0.75, 3.0: 0.25 + 0.1})  # the second burst cut at 0.1 s
    assert sum(p * s for p, s in levels.items()) == pytest.approx(channel.energy_j(1000.5, 1002.1), rel=1e-12)
    with pytest.raises(ValueError, match="empty interval"):
        channel.levels(1001.0, 1001.0)


def test_set_power_replaces_the_future_and_play_keeps_the_rest(channel: PowerChannel) -> None:
    channel.set_power(1.0, t=1000.0)
    channel.set_power(2.0, t=1010.0)
    channel.set_power(3.0, t=1005.0)  # posted late: from 1005 on, replacing the step at 1010
    assert channel.energy_j(1000.0, 1020.0) == pytest.approx(5 * 1.0 + 15 * 3.0)
    channel.play(Constant(10.0, start=1002.0, duration_s=1.0))
    assert channel.energy_j(1000.0, 1020.0) == pytest.approx(5 * 1.0 + 15 * 3.0 + 1 * 9.0)
    assert channel.mean_power_w(1002.0, 1003.0) == pytest.approx(10.0)


def test_pattern_without_start_is_anchored_when_played(channel: PowerChannel, clock: FakeClock) -> None:
    clock.t = 1000.07
    channel.play(SquareWave(0.0, 1.0, burst_s=0.05, period_s=0.1, duration_s=1.0))
    assert channel.power_w(1000.07) == 1.0 and channel.power_w(1000.125) == 0.0
    assert channel.energy_j(1000.0, 1002.0) == pytest.approx(0.5)


def test_pruning_keeps_the_cumulative_total(clock: FakeClock) -> None:
    channel = PowerChannel("pm:1", retention_s=10.0, clock=clock)
    origin = channel.origin_s
    levels = [1.0 + i % 3 for i in range(400)]
    for p in levels:  # a step every 0.5 s for 200 s: far more than the retention holds
        clock.t += 0.5
        channel.set_power(p, t=clock.t)
    clock.t += 0.5
    assert len(channel._segments) < 100  # bounded
    assert channel.energy_j(origin, clock.t) == pytest.approx(0.5 * sum(levels), rel=1e-12)
    assert channel.energy_j(clock.t - 5, clock.t) == pytest.approx(0.5 * sum(levels[-10:]), rel=1e-12)
    with pytest.raises(LookupError, match="pruned"):
        channel.energy_j(origin + 1.0, clock.t)
    with pytest.raises(ValueError, match="before the retained history"):
        channel.set_power(5.0, t=origin + 1.0)


def test_concurrent_writers_lose_nothing(clock: FakeClock) -> None:
    bus = PowerBus(clock=clock)
    names = [f"board{i}:1" for i in range(4)]

    def writer(name: str) -> None:
        ch = bus.channel(name)
        for k in range(500):
            ch.set_power(float(k % 2), t=1000.0 + k * 0.01)

    threads = [threading.Thread(target=writer, args=(n,)) for n in names for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert bus.names() == sorted(names)
    for n in names:  # each writer posted the same steps; the result is one consistent timeline
        assert bus.channel(n).energy_j(1000.0, 1005.0) == pytest.approx(250 * 0.01, rel=1e-9)


def test_voltage_and_invalid_patterns(channel: PowerChannel) -> None:
    assert channel.voltage_v == 5.0
    channel.set_voltage(3.3)
    assert channel.voltage_v == 3.3
    with pytest.raises(ValueError):
        channel.set_voltage(0.0)
    with pytest.raises(ValueError):
        SquareWave(0.8, 2.4, burst_s=0.2, period_s=0.1)


def test_level_noise_is_integrated_exactly_and_adds_no_entries(channel: PowerChannel) -> None:
    channel.set_power(2.0, t=1000.0, noise=LevelNoise(5.0, seed=1))
    assert len(channel._segments) == 1  # the one level posted (from the channel's origin): no entry per cell
    t0, t1 = 1000.0137, 1001.2421  # cells cut at both ends
    levels = channel.levels(t0, t1)
    assert len(levels) == 124 and sum(levels.values()) == pytest.approx(t1 - t0, rel=1e-12)
    assert channel.energy_j(t0, t1) == pytest.approx(numeric_energy(channel, t0, t1, n=24_000), rel=2e-5)
    s = channel.stats(t0, t1)
    assert (s.peak_power_w, s.min_power_w) == (max(levels), min(levels))
    assert channel.power_w(1000.0137) == channel.power_w(1000.0199) != channel.power_w(1000.0201)


def test_level_noise_is_a_function_of_seed_and_cell() -> None:
    noise = LevelNoise(2.0, derive_seed("esp32", "power"))
    factors = noise.factors(np.arange(200_000))
    assert factors.mean() == pytest.approx(1.0, abs=4 * 0.02 / np.sqrt(200_000))
    assert factors.std() == pytest.approx(0.02, rel=4 / np.sqrt(400_000))
    assert np.array_equal(noise.factors(np.arange(1000, 1010)), factors[1000:1010])  # any block, same draws
    assert derive_seed("esp32", "power") == derive_seed("esp32", "power") != derive_seed("esp33", "power")
    other = LevelNoise(2.0, derive_seed("esp33", "power")).factors(np.arange(1000))
    assert abs(np.corrcoef(factors[:1000], other)[0, 1]) < 0.15
    with pytest.raises(ValueError):
        LevelNoise(-1.0, 0)


def test_zero_noise_posts_a_constant(channel: PowerChannel) -> None:
    channel.set_power(1.5, t=1000.0, noise=LevelNoise(0.0, seed=1))
    assert channel.levels(1000.0, 1002.0) == {1.5: 2.0}
