"""The simulated PM1000+ errs as the manual allows: accuracy, noise, ranging, new-data latency, rounding.

Through the real driver (PyVISA, pyvisa-py) on TCP loopback, against the power bus ledger. Short
update periods keep the file fast; the behaviour does not depend on the period.
"""

from __future__ import annotations

import math
import re
import statistics
import time

import pytest

from labbench.instruments.pm1000 import DataStatus, Pm1000
from labbench.sim.pm1000 import IDEAL, Pm1000Model, Pm1000Sim, accuracy_bound, power_bound
from labbench.sim.powerbus import PowerBus, PowerChannel

NAME = "pm_realism"


@pytest.fixture
def channel() -> PowerChannel:
    ch = PowerBus().channel(f"{NAME}:1")
    ch.set_power(1.0)  # 0.2 A from the 5 V rail
    return ch


def open_pair(channel: PowerChannel, period_s: float, **settings) -> tuple[Pm1000Sim, Pm1000]:
    sim = Pm1000Sim(
        NAME, "127.0.0.1", 0, channel, use_pty=False, update_period_s=period_s, **settings
    ).start()
    return sim, Pm1000(
        sim.resource, name=NAME, timeout_s=1.0, update_period_s=period_s, poll_interval_s=0.003
    )


def next_update(meter: Pm1000) -> tuple[DataStatus, dict[str, float]]:
    """Poll until new data; the status read that saw it, and the results."""
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        status = meter.data_status()
        if status.new_data:
            return status, meter.read_results()
        time.sleep(0.003)
    raise AssertionError("no new data")


def sleep_until(t: float) -> None:
    time.sleep(max(0.0, t - time.monotonic()))


def test_readings_err_within_the_manual_accuracy_by_the_drawn_calibration(channel: PowerChannel) -> None:
    sim, meter = open_pair(channel, 0.1)  # the defaults: the manual's accuracy, noise, latency; autorange
    try:
        meter.configure(["W", "V", "A"])
        for _ in range(3):  # settle on the range for 0.2 A
            next_update(meter)
        ranges = meter.send(":RNG:VLT?"), meter.send(":RNG:AMP?")
        readings = [next_update(meter)[1] for _ in range(30)]
    finally:
        meter.close()
        sim.stop()
    assert ranges == ("1", "2")  # 10 V and 0.4 A
    cal_v, cal_a = sim.model.calibration["V"][0], sim.model.calibration["A"][1]
    mean = {q: statistics.fmean(r[q] for r in readings) for q in ("V", "A", "W")}
    noise = {"V": 0.0002 * 10.0, "A": 0.0002 * 0.4}
    noise["W"] = math.hypot(5.0 * noise["A"], 0.2 * noise["V"])
    slack = {q: 4 * s / math.sqrt(len(readings)) + 1e-4 for q, s in noise.items()}  # + the printed digit
    bound = {
        "V": accuracy_bound("V", 5.0, 10.0),
        "A": accuracy_bound("A", 0.2, 0.4),
        "W": power_bound(5.0, 0.2, 10.0, 0.4),
    }
    for q, truth in (("V", 5.0), ("A", 0.2), ("W", 1.0)):
        assert abs(mean[q] - truth) <= bound[q] + slack[q], q  # within the manual's accuracy
    assert abs(mean["W"] - 1.0) > 10 * slack["W"]  # and really off: a systematic error, not noise
    # the error is the instrument's fixed calibration for these ranges
    assert mean["V"] == pytest.approx(cal_v(5.0), abs=slack["V"])
    assert mean["A"] == pytest.approx(cal_a(0.2), abs=slack["A"])
    assert mean["W"] == pytest.approx(cal_v(5.0) * cal_a(0.2), abs=slack["W"])


def test_calibrations_fill_the_spec_and_differ_by_seed() -> None:
    """Many instruments (seeds): every range's error is inside the manual's accuracy, and uses most of it."""
    channel = PowerBus().channel("bench:1")
    used = {"V": 0.0, "A": 0.0}
    for seed in range(200):
        model = Pm1000Model(channel, seed=seed)
        for which, ranges, reading in (
            ("V", (10.0, 50.0, 215.0, 1000.0), 5.0),
            ("A", (0.1, 0.4, 1.6, 6.25, 25.0, 100.0), 0.05),
        ):
            for cal, r in zip(model.calibration[which], ranges, strict=True):
                error = abs(cal(reading) - reading)
                assert error <= accuracy_bound(which, reading, r)
                used[which] = max(used[which], error / accuracy_bound(which, reading, r))
    assert used["V"] > 0.9 and used["A"] > 0.9
    assert Pm1000Model(channel, seed=1).calibration != Pm1000Model(channel, seed=2).calibration
    assert Pm1000Model(channel, seed=1).calibration == Pm1000Model(channel, seed=1).calibration
    ideal = Pm1000Model(channel, seed=1, accuracy="ideal").calibration
    assert all(c(0.2) == 0.2 for c in ideal["V"] + ideal["A"])


def test_reading_noise_has_the_configured_spread(channel: PowerChannel) -> None:
    sim, meter = open_pair(channel, 0.1, accuracy="ideal")  # noise: 0.02 % of range, the default
    try:
        meter.configure(["W", "V", "A"], current_range=2)
        next_update(meter)
        readings = [next_update(meter)[1] for _ in range(40)]
    finally:
        meter.close()
        sim.stop()
    sigma = {"V": 0.0002 * 10.0, "A": 0.0002 * 0.4}
    sigma["W"] = math.hypot(5.0 * sigma["A"], 0.2 * sigma["V"])  # W = (V + nv)(I + na)
    for q, truth in (("V", 5.0), ("A", 0.2), ("W", 1.0)):
        values = [r[q] for r in readings]
        assert 0.6 * sigma[q] < statistics.stdev(values) < 1.5 * sigma[q], q
        assert statistics.fmean(values) == pytest.approx(
            truth, abs=4 * sigma[q] / math.sqrt(len(values)) + 1e-4
        )


def test_range_change_blanks_one_update_flags_the_overload_and_the_integrator_misses_it(
    channel: PowerChannel,
) -> None:
    period = 0.2
    channel.set_power(0.8)  # 0.16 A: the 0.4 A range
    sim, meter = open_pair(channel, period, **IDEAL)
    try:
        meter.configure(["W", "V", "A", "Wh", "HRS"])
        for _ in range(3):
            next_update(meter)
        assert meter.send(":RNG:AMP?") == "2"
        meter.integrator_mode()
        meter.integrator_reset()
        k = math.ceil((time.monotonic() - sim.model.epoch_s) / period) + 1

        def at(n: float) -> float:
            """When update n's period ends (n whole), or a fraction of a period after."""
            return sim.model.epoch_s + n * period

        channel.set_power(20.0, t=at(k + 2.5))  # 4 A, mid-way through update k + 3
        sleep_until(at(k + 0.5))
        meter.integrator_run()  # integrates updates k + 2 on
        seen = []
        while time.monotonic() < at(k + 5.2):
            seen.append((time.monotonic(), meter.data_status()))
            time.sleep(0.003)
        sleep_until(at(k + 6.5))
        meter.integrator_stop()  # ... up to update k + 6
        totals = meter.read_results()
        amp_range = meter.send(":RNG:AMP?")
    finally:
        meter.close()
        sim.stop()
    events = [(round((t - sim.model.epoch_s) / period - k, 1), s) for t, s in seen if s.raw]
    after_step = [(n, s) for n, s in events if n > 2.5]
    blank, following = after_step[0], after_step[1]
    assert blank[1].current_overload and not blank[1].new_data  # update k + 3: blanked, the overload flagged
    assert following[1].new_data and not following[1].current_overload  # k + 4, on the 6.25 A range
    ndv_at = [n for n, s in events if s.new_data]
    assert 3.0 not in ndv_at and {2.0, 4.0, 5.0} <= set(ndv_at)
    assert amp_range == "4"
    # the integrator: updates k + 2, k + 4, k + 5, k + 6; the blanked k + 3 counts nothing
    assert totals["HRS"] * 3600 == pytest.approx(4 * period, rel=1e-4)
    expected_j = channel.energy_j(at(k + 1), at(k + 2)) + channel.energy_j(at(k + 3), at(k + 6))
    assert totals["Wh"] * 3600 == pytest.approx(expected_j, rel=1e-4)
    assert channel.energy_j(at(k + 1), at(k + 6)) - expected_j == pytest.approx(0.8 * 0.1 + 20.0 * 0.1)


def test_fixed_ranges_clip_and_flag_an_overload(channel: PowerChannel) -> None:
    channel.set_voltage(12.0)
    channel.set_power(1.92)  # 0.16 A
    sim, meter = open_pair(channel, 0.1, **IDEAL)
    try:
        meter.configure(["W", "V", "A"], voltage_range=1, current_range=1)  # 10 V and 0.1 A peak
        status, over = next_update(meter)
        again, _ = next_update(meter)
        meter.configure(["W", "V", "A"], voltage_range=2, current_range=2)  # 50 V and 0.4 A
        next_update(meter)
        fine, within = next_update(meter)
    finally:
        meter.close()
        sim.stop()
    assert status.current_overload and status.voltage_overload and again.current_overload
    assert over == pytest.approx({"W": 1.0, "V": 10.0, "A": 0.1})  # clipped at the ranges
    assert not (fine.current_overload or fine.voltage_overload)
    assert within == pytest.approx({"W": 1.92, "V": 12.0, "A": 0.16})


def test_new_data_flag_rises_the_configured_latency_after_the_period_end(channel: PowerChannel) -> None:
    period, latency, jitter = 0.25, 0.08, 0.02
    sim, meter = open_pair(channel, period, accuracy="ideal", ndv_latency_s=latency, ndv_jitter_s=jitter)
    rises = []  # (earliest, latest) delay of each rise after its period's end
    try:
        meter.configure(["W", "V", "A"], current_range=2)
        sent = time.monotonic()
        meter.data_status()
        while len(rises) < 16:
            previous, sent = sent, time.monotonic()
            status = meter.data_status()
            replied = time.monotonic()
            if status.new_data:
                end = sim.model.epoch_s + math.floor((replied - sim.model.epoch_s) / period) * period
                rises.append((previous - end, replied - end))
            time.sleep(0.002)
    finally:
        meter.close()
        sim.stop()
    for earliest, latest in rises:
        assert latest >= latency - jitter  # never at the period's end
        assert earliest <= latency + jitter
    latest = [hi for _, hi in rises]
    assert max(latest) - min(latest) > jitter / 2  # it jitters


def test_integrator_prints_five_digits_of_the_calibrated_energy_without_the_noise(
    channel: PowerChannel,
) -> None:
    period = 0.1
    sim, meter = open_pair(channel, period, noise_pct_of_range=1.0)  # noise far above the rounding
    try:
        meter.configure(["W", "Wh", "HRS"], current_range=2)
        meter.integrator_mode()
        meter.integrator_reset()
        next_update(meter)
        meter.integrator_run()
        watts = [next_update(meter)[1]["W"] for _ in range(12)]
        meter.integrator_stop()
        raw = meter.send(":FRD?")
    finally:
        meter.close()
        sim.stop()
    _, wh, hrs = raw.split(",")
    assert re.fullmatch(r"\d\.\d{4}E[+-]\d{2}", wh)  # five significant digits
    elapsed_s = float(hrs) * 3600
    expected_wh = sim.model.calibration["V"][0](5.0) * sim.model.calibration["A"][1](0.2) * elapsed_s / 3600
    assert float(wh) == pytest.approx(expected_wh, rel=5e-5)  # the calibrated power, to the last digit
    assert f"{expected_wh:.4E}" == wh
    assert statistics.stdev(watts) > 0.005  # while the readings scatter by about 1 %


def test_settings_are_checked_and_name_the_instrument(channel: PowerChannel) -> None:
    with pytest.raises(ValueError, match=f"{NAME}: need 0 <= ndv_jitter_s"):
        Pm1000Sim(NAME, channel=channel, ndv_latency_s=0.6)
    with pytest.raises(ValueError, match=f"{NAME}: accuracy must be"):
        Pm1000Sim(NAME, channel=channel, accuracy="typical")
    with pytest.raises(ValueError, match=f"{NAME}: .*unexpected keyword.*noise_pct"):
        Pm1000Sim(NAME, channel=channel, noise_pct=0.1)
