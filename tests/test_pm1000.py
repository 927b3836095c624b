"""The PM1000+ driver, through real PyVISA (pyvisa-py), against the simulated instrument on loopback."""

from __future__ import annotations

import socket
import time
from types import SimpleNamespace

import pytest

from labbench.errors import InstrumentError, LabConfigError, UsageError
from labbench.instruments.pm1000 import DataStatus, Pm1000
from labbench.sim.pm1000 import DEFAULT_IDN, Pm1000Sim
from labbench.sim.powerbus import PowerBus, PowerChannel, SquareWave

NAME = "pm_test"


@pytest.fixture
def channel() -> PowerChannel:
    ch = PowerBus().channel(f"{NAME}:1")
    ch.set_power(0.8)
    return ch


@pytest.fixture
def sim(channel: PowerChannel):
    with Pm1000Sim(NAME, "127.0.0.1", 0, channel) as s:
        yield s


@pytest.fixture
def meter(sim: Pm1000Sim):
    m = Pm1000(sim.resource, name=NAME, timeout_s=1.0, current_range=3)
    yield m
    m.close()


def next_status(meter: Pm1000) -> DataStatus:
    """Poll until an update arrives; the status read that saw it (it clears on read)."""
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        status = meter.data_status()
        if status.new_data:
            return status
        time.sleep(0.01)
    raise AssertionError("no new data")


def whole_updates(elapsed_s: float) -> bool:
    """A whole number of 0.5 s updates (to the 5 digits the instrument prints)."""
    return elapsed_s > 0 and abs(elapsed_s / 0.5 - round(elapsed_s / 0.5)) < 1e-3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_identity_selection_and_results(meter: Pm1000, channel: PowerChannel) -> None:
    assert meter.identity() == DEFAULT_IDN
    meter.configure()
    assert meter.send(":FRF?") == "Watt, Vrms, Arms, PF, Whr, Ahr, Hrs"
    assert meter.send(":RNG:AMP:AUT?") == "0" and meter.send(":SYST:ZERO?") == "0"
    results = meter.wait_for_new_data()
    assert list(results) == ["W", "V", "A", "PF", "Wh", "Ah", "HRS"]
    assert results["W"] == pytest.approx(0.8) and results["V"] == pytest.approx(5.0)
    assert results["A"] == pytest.approx(0.16) and results["PF"] == pytest.approx(1.0)


@pytest.mark.slow
def test_scripted_load_within_one_percent_by_trace_and_integrator(meter: Pm1000, channel: PowerChannel) -> None:
    """The issue's load: 0.8 W idle, 2.4 W bursts of 30 ms every 100 ms, for 12 s."""
    with meter.capture() as cap:
        t0 = cap.mark("load-start")
        channel.play(SquareWave(0.8, 2.4, burst_s=0.03, period_s=0.1, start=t0, duration_s=12.0))
        time.sleep(max(0.0, t0 + 12.0 - time.monotonic()))
        cap.mark("load-end", t0 + 12.0)
    truth_j = channel.energy_j(t0, t0 + 12.0)
    assert truth_j == pytest.approx(12 * 0.8 + 120 * 0.03 * 1.6)
    trace = cap.trace
    assert trace.instrument == DEFAULT_IDN and len(trace) >= 25
    for method in ("trace", "integrator"):
        w = trace.between("load-start", "load-end", method=method)
        assert abs(w.energy_j - truth_j) / truth_j < 0.01, method
        assert abs(w.energy_j - truth_j) <= w.uncertainty_j + 1e-4 * truth_j, method  # + print rounding
        assert not w.overload
    # the integrator's own totals: whole updates only, the mean of what it saw
    totals = trace.integrator
    assert totals is not None and whole_updates(totals.elapsed_s)
    assert 0.8 < totals.mean_power_w < 1.28


def test_unknown_command_names_the_command_and_esr_bits(meter: Pm1000) -> None:
    with pytest.raises(InstrumentError) as err:
        meter.send(":FOO:BAR 1")
    assert err.value.target == NAME and err.value.action == ":FOO:BAR 1"
    assert "ESR=32" in err.value.seen and "CME" in err.value.seen
    with pytest.raises(InstrumentError, match=r":FOO\?.*ESR=32"):
        meter.send(":FOO?")
    assert meter.send("*ESR?") == "0"  # read and cleared; the instrument carries on
    with pytest.raises(InstrumentError, match=r":RNG:AMP:FIX 9.*ESR=16.*EXE"):
        meter.configure(current_range=9)  # a known command with a value out of range


def test_killed_mid_capture_raises_and_keeps_the_trace(sim: Pm1000Sim, channel: PowerChannel) -> None:
    meter = Pm1000(sim.resource, name=NAME, timeout_s=0.5, current_range=3)
    with pytest.raises(InstrumentError) as err, meter.capture() as cap:
        t0 = cap.mark("start")
        time.sleep(1.3)
        sim.stop()
        time.sleep(0.8)
    assert err.value.action == "capture" and "kept" in err.value.seen
    kept = err.value.trace
    assert len(kept) >= 3 and kept.marks[0].t_s == t0
    assert kept.energy(t0, t0 + 0.5).energy_j == pytest.approx(channel.energy_j(t0, t0 + 0.5), rel=1e-3)
    assert len(cap.trace) == len(kept)
    meter.close()


def test_unopenable_resources_name_the_resource() -> None:
    for resource in (f"TCPIP::127.0.0.1::{free_port()}::SOCKET", "ASRL/dev/no-such-port::INSTR", "TCPIP::bogus"):
        with pytest.raises(InstrumentError, match=f"open {resource}"):
            Pm1000(resource, name=NAME, timeout_s=0.5).identity()


def test_data_status_clears_on_read(meter: Pm1000) -> None:
    meter.configure()
    status = next_status(meter)
    assert status.data_available and status.new_data
    assert meter.data_status() == DataStatus(0)  # both bits cleared by the read that saw them
    time.sleep(0.55)
    assert meter.data_status().new_data


def test_integrator_preconditions(meter: Pm1000, channel: PowerChannel) -> None:
    meter.configure()
    with pytest.raises(InstrumentError, match=r":INT:MAN:RUN.*EXE"):
        meter.integrator_run()  # not in integrator mode
    meter.integrator_mode()
    with pytest.raises(InstrumentError, match=r":INT:MAN:STOP.*EXE"):
        meter.integrator_stop()  # not running
    meter.integrator_reset()
    ran_from = time.monotonic()
    meter.integrator_run()
    for refused in (meter.integrator_run, meter.integrator_reset):  # both need it stopped
        with pytest.raises(InstrumentError, match="EXE"):
            refused()
    time.sleep(1.6)
    meter.integrator_stop()
    span_s = time.monotonic() - ran_from
    r = meter.read_results()
    elapsed_s = r["HRS"] * 3600
    assert whole_updates(elapsed_s)  # whole updates only ...
    assert span_s - 1.0 <= elapsed_s <= span_s  # ... those that began after RUN and ended before STOP
    assert r["Wh"] * 3600 == pytest.approx(0.8 * elapsed_s, rel=1e-4)
    meter.integrator_reset()
    assert meter.read_results()["Wh"] == 0.0
    meter.send(":INT:START 1")  # clock start: manual run refused
    with pytest.raises(InstrumentError, match="EXE"):
        meter.integrator_run()


def test_overload_flag_on_a_fixed_range(meter: Pm1000, channel: PowerChannel) -> None:
    meter.configure(current_range=1)  # 0.1 A peak; the idle 0.8 W at 5 V is 0.16 A
    assert next_status(meter).current_overload
    with meter.capture() as cap:
        time.sleep(0.6)
    w = cap.trace.energy(*cap.trace.covers)
    assert w.overload and all(u.overload for u in cap.trace.updates)
    meter.configure(current_range=3)  # 1.6 A peak
    next_status(meter)
    assert not next_status(meter).current_overload


def test_autorange_follows_the_load(meter: Pm1000, channel: PowerChannel) -> None:
    meter.configure(current_range="auto")
    next_status(meter)
    assert meter.send(":RNG:AMP?") == "2"  # 0.16 A peak: the 0.4 A range
    channel.set_power(20.0)  # 4 A: above the 1.6 A range, within 6.25 A
    next_status(meter)
    assert meter.send(":RNG:AMP?") == "4" and not next_status(meter).current_overload


def test_rs232_path_through_the_pty(sim: Pm1000Sim, channel: PowerChannel) -> None:
    assert sim.serial_resource and sim.serial_resource.startswith("ASRL/dev/")
    with Pm1000(sim.serial_resource, name=NAME, timeout_s=0.5, current_range=3) as meter:
        assert meter.ack_set_commands is False
        assert meter.identity() == DEFAULT_IDN
        meter.configure()
        assert meter.wait_for_new_data()["W"] == pytest.approx(0.8)
        with pytest.raises(InstrumentError, match=r":FOO\?.*CME"):
            meter.send(":FOO?")  # no reply at all on RS232: the timeout, then *ESR? says why


def test_manual_literal_cr_terminator(channel: PowerChannel) -> None:
    with Pm1000Sim(NAME, "127.0.0.1", 0, channel, terminator="\r", use_pty=False) as sim:
        with Pm1000(sim.resource, name=NAME, read_termination="\r", timeout_s=0.5) as meter:
            meter.configure()
            assert meter.send(":BLK?") == "1"
            meter.send(":BLK:DIS")
            assert meter.send(":BLK?") == "0"


def test_from_lab_reads_the_inventory_settings(sim: Pm1000Sim) -> None:
    entry = SimpleNamespace(name="pm1000_esp32", resource=sim.resource, settings={"timeout_s": 0.5, "current_range": 3})
    meter = Pm1000.from_lab(entry)
    assert (meter.name, meter.timeout_s, meter.current_range) == ("pm1000_esp32", 0.5, 3)
    assert meter.identity() == DEFAULT_IDN
    meter.close()
    with pytest.raises(LabConfigError, match="poll_rate"):
        Pm1000.from_lab(SimpleNamespace(name="x", resource=sim.resource, settings={"poll_rate": 3}))
    with pytest.raises(LabConfigError, match="unknown result"):
        Pm1000.from_lab(SimpleNamespace(name="x", resource=sim.resource, settings={"results": ["W", "kWh"]}))
    with pytest.raises(UsageError, match="one input"):
        meter.capture(channel=2)


def test_a_taken_port_is_a_clear_error(sim: Pm1000Sim, channel: PowerChannel) -> None:
    with pytest.raises(LabConfigError, match=f"cannot listen on 127.0.0.1:{sim.port}"):
        Pm1000Sim("second", "127.0.0.1", sim.port, channel).start()
    with Pm1000(sim.resource, name=NAME, timeout_s=0.5) as meter:
        assert meter.identity() == DEFAULT_IDN  # the first one still answers
