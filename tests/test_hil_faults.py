"""Infrastructure faults on simulated boards and instruments: kept work and the HIL suite's handling.

Real simulators (labbench.sim: MLPerf Tiny DUTs with the ESP32 boot ROM, the PM1000+) run in this
process on ephemeral loopback ports, named in a lab.yaml without `sim:` blocks, so the bench treats
them as hardware. Faults are real: a simulator that was stopped (its port refuses connections), or
`FlakyProxy`, a TCP proxy that drops a connection when the client sends a given command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from xml.etree import ElementTree

import pytest
from netproxy import Filter, TcpProxy, passthrough

from labbench import inventory, results
from labbench.board import Board
from labbench.errors import InstrumentError
from labbench.gate import collect
from labbench.measure.run import RunSettings, measure
from labbench.payloads import fixtures
from labbench.sim.mcu import SimMcuBoard
from labbench.sim.pm1000 import Pm1000Sim
from labbench.sim.powerbus import PowerBus

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "fixtures" / "models" / "digits_mlp_int8.tflite"
QUICK = [
    "--window-s",
    "1",
    "--windows",
    "2",
    "--idle-s",
    "1",
    "--latency-samples",
    "20",
    "--accuracy-samples",
    "60",
    "-p",
    "no:cacheprovider",
]


class FlakyProxy(TcpProxy):
    """A loopback TCP proxy to `target` that drops its first `drop` connections when the client has
    sent `cut` for the `after`-th time; later connections pass through untouched."""

    def __init__(self, target: tuple[str, int], cut: bytes, after: int = 1, drop: int = 1):
        self.cut, self.after, self.drop = cut, after, drop
        super().__init__(target)

    def filters(self) -> tuple[Filter, Filter]:
        if self.drop <= 0:
            return passthrough, passthrough
        self.drop -= 1
        seen = 0

        def until_cut(data: bytes) -> bytes | None:
            nonlocal seen
            seen += data.count(self.cut)
            return None if seen >= self.after else data

        return until_cut, passthrough


def test_instrument_fault_mid_energy_keeps_latency_and_completed_windows_as_a_partial_record(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # the drivers' logs go under the working directory
    channel = PowerBus().channel("pm:1")
    sim = SimMcuBoard("nano", family="nano33_ble_sense", model_path=MODEL, bus_channel=channel)
    sim.start()
    meter = Pm1000Sim("pm", channel=channel, use_pty=False).start()
    (tmp_path / "lab.yaml").write_text(
        textwrap.dedent(f"""\
        lab: {{name: kept-work}}
        instruments:
          pm: {{kind: pm1000, resource: "{meter.resource}"}}
        boards:
          nano:
            family: nano33_ble_sense
            serial: {{url: "{sim.url}"}}
            power: {{instrument: pm}}
        """)
    )
    board = Board(inventory.load(tmp_path / "lab.yaml"), "nano")

    def progress(step: str) -> None:
        if step.startswith("energy window 2/"):  # the meter goes away once the first window is done
            meter.stop()

    settings = RunSettings(
        latency_samples=20, warmup=1, window_s=0.5, windows=3, idle_s=0.5, accuracy_samples=20
    )
    try:
        with pytest.raises(InstrumentError) as caught:
            measure(board, fixtures()["digits_mlp_int8"], settings, progress=progress)
    finally:
        board.release()
        sim.stop()
    m = caught.value.partial
    assert m.status == "partial" and m.error == str(caught.value) and m.error.startswith("pm: ")
    assert len(m.latency.samples_ms) == 20 and m.latency.p50_ms > 0  # the latency phase, whole
    assert m.energy is not None and m.energy.windows >= 1 and m.energy.per_inference_mj > 0  # kept windows
    assert m.extra["partial"]["failed_phase"] == "energy" and m.extra["partial"]["power_updates"] > 0
    assert m.accuracy is None  # never reached


@pytest.mark.slow
def test_hil_suite_quarantines_a_dead_board_recovers_a_meter_and_keeps_the_partial_record(tmp_path):
    """`pytest tests_hil` on two ESP32s: `dead` (a stopped simulator) and `live`, whose power meter
    link drops during the first energy measurement. dead: one ERROR, then its tests are skipped as
    quarantined; live: the partial record is journalled, the meter reconnected, the board reset and
    the measurement retried, so its tests pass."""
    channel = PowerBus().channel("pm:1")
    dead = SimMcuBoard("dead", family="esp32_devkitc", model_path=MODEL, baud=921600)
    dead.start()
    dead.stop()
    live = SimMcuBoard("live", family="esp32_devkitc", model_path=MODEL, baud=921600, bus_channel=channel)
    live.start()
    meter = Pm1000Sim("pm", channel=channel, use_pty=False).start()
    proxy = FlakyProxy((meter.host, meter.port), cut=b":FRD?", after=11)  # during the energy windows
    lab = tmp_path / "lab.yaml"
    lab.write_text(
        textwrap.dedent(f"""\
        lab: {{name: faults}}
        instruments:
          pm: {{kind: pm1000, resource: "TCPIP::127.0.0.1::{proxy.port}::SOCKET"}}
        boards:
          dead:
            family: esp32_devkitc
            serial: {{url: "{dead.url}", baud: 921600}}
            flash: {{tool: esptool, baud: 460800}}
          live:
            family: esp32_devkitc
            serial: {{url: "{live.url}", baud: 921600, reset: rts}}
            flash: {{tool: esptool, baud: 460800}}
            power: {{instrument: pm}}
        """)
    )
    journal, xml = tmp_path / "journal.jsonl", tmp_path / "junit.xml"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(REPO / "tests_hil"),
        "--lab",
        str(lab),
        "--board",
        "dead",
        "--board",
        "live",
        "--journal",
        str(journal),
        "--junitxml",
        str(xml),
        "-rs",
        "--no-preflight",
        *QUICK,
        "-k",
        "identify or digits_mlp_int8 and not aggressive or power",
    ]
    t0 = time.monotonic()
    try:
        done = subprocess.run(
            cmd,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            env={**os.environ, "LABBENCH_LOCK_DIR": str(tmp_path / "locks")},
        )
    finally:
        proxy.close()
        meter.stop()
        live.stop()
    out = done.stdout[-4000:] + done.stderr[-2000:] + f"\n({time.monotonic() - t0:.0f} s)"
    assert done.returncode == 1, out  # errors, no failures

    cases = {}
    for case in ElementTree.parse(xml).getroot().iter("testcase"):
        child = next((c for c in case if c.tag in ("error", "failure", "skipped")), None)
        cases[case.get("name")] = (child.tag, child.get("message")) if child is not None else ("passed", "")
    assert cases["test_install_and_identify[dead]"][0] == "error", out
    assert "FlashError" in cases["test_install_and_identify[dead]"][1], out
    for name in (
        "test_inference_budget[digits_mlp_int8-dead]",
        "test_idle_and_active_power_within_profile[dead]",
    ):
        assert cases[name][0] == "skipped", out
        assert cases[name][1].startswith("board dead quarantined after FlashError: dead: "), out
    assert {cases[n][0] for n in cases if n.endswith("live]")} == {"passed"}, out
    assert "labbench: quarantined boards" in done.stdout and "steps recovered after a retry" in done.stdout, (
        out
    )

    records = [json.loads(line) for line in journal.read_text().splitlines()]
    dead_events = [(r["kind"], r.get("attempt")) for r in records if r["board"] == "dead"]
    assert dead_events == [("attempt", 1), ("attempt", 2), ("quarantine", None)], records
    live_records = [r for r in records if r["board"] == "live"]
    partial, failed, retried, valid = live_records
    assert partial["status"] == "partial" and partial["extra"]["partial"]["failed_phase"] == "energy"
    assert len(partial["latency"]["samples_ms"]) == 20 and partial["error"].startswith("pm: ")
    assert failed["kind"] == "attempt" and failed["error"].startswith("InstrumentError: pm: ")
    assert failed["recovery"] == "power meter reconnected, reset"
    assert retried["kind"] == "attempt" and retried["attempt"] == 2 and retried["error"] is None
    assert valid["status"] == "valid" and valid["energy"]["per_inference_mj"] > 0

    # the partial record is in the journal, but neither in the default table nor judged by the gate
    assert results.load(journal)["status"].tolist() == ["valid"]
    latest, notes, _ = collect([journal])
    assert latest[("live", "digits_mlp_int8")].id == valid["id"]
    assert any("partial record" in n for n in notes)
