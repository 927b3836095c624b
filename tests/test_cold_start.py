"""Cold start on MCUs whose port cannot reset them (the Nano 33 BLE and the Coral Micro: USB CDC).

Their flasher resets them after writing, so `Board.install` times that boot: on the DUT's clock
from the firmware's `boot%` report (basis "dut_clock"), and bounded by the flasher's own step on the
host's clock (basis "host_and_dut"); DutSerial.boot_cold_start does the arithmetic. Everything goes
through the real ports: the simulated boards listen on RFC 2217, their stand-in flashers run as
commands and reach the simulator over its control socket, as `labbench sim up` serves them. The
simulator's `last_boot` is the ground truth. Boards reset through their port (the ESP32, `reset:
rts`) keep their own cold start, timed at every run's reset (tests/test_sim_mcu.py).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

import pytest

from labbench import inventory
from labbench.board import Board
from labbench.capabilities import InstallRecord
from labbench.drivers.dut_serial import TIMER_SLACK_S, DutSerial
from labbench.modelinfo import ModelInfo
from labbench.sim import lab as simlab
from labbench.sim.control import SOCKET_NAME, ControlServer
from labbench.sim.mcu import SimMcuBoard
from labbench.sim.standin_tools import STATE_ENV

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "fixtures" / "models"
USB_CDC = ["nano33", "coral_micro"]
SCHEDULING_MS = 1.0  # what a loaded host may add to the simulator's own sleeps


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def usb_lab(tmp_path_factory):
    """A simulated lab of a Nano 33 BLE and a Coral Micro flashed by their stand-in tools, served in
    this process (the objects `labbench sim up` runs), and an ESP32 entry reset through RTS."""
    d = tmp_path_factory.mktemp("cold-start-lab")
    model = MODELS / "digits_mlp_int8.tflite"
    (d / "lab.yaml").write_text(f"""lab: {{name: cold-start-lab}}
boards:
  nano33:
    family: nano33_ble_sense
    serial: {{url: "rfc2217://127.0.0.1:{_free_port()}", baud: 921600}}
    flash:
      tool: bossac
      command: ["{{python}}", -m, labbench.sim.standin_tools, bossac, "--port={{port}}", -U, -i, -e, -w,
                "{{image}}", -R]
    sim: {{model: {model}, baud: 921600}}
  coral_micro:
    family: coral_dev_board_micro
    serial: {{url: "rfc2217://127.0.0.1:{_free_port()}", baud: 921600}}
    flash:
      tool: flashtool
      command: ["{{python}}", -m, labbench.sim.standin_tools, flashtool, --elf_path, "{{image}}",
                --serial, "{{port}}"]
    sim: {{model: {model}, baud: 921600}}
  esp32:
    family: esp32_devkitc
    serial: {{url: "rfc2217://127.0.0.1:{_free_port()}", baud: 921600, reset: rts}}
""")
    lab = inventory.load(d / "lab.yaml")
    state = simlab.state_dir(lab)
    state.mkdir(parents=True)
    sim = simlab.SimLab(lab, state)
    control = ControlServer(state / SOCKET_NAME, {"load_firmware": sim.load_firmware})
    sim.start()
    control.start()
    (state / simlab.STATE_FILE).write_text(json.dumps({"pid": os.getpid(), "lab": str(lab.path)}))
    yield lab, sim
    control.stop()
    sim.stop()


@pytest.fixture
def board_of(usb_lab, tmp_path, monkeypatch):
    """`board_of(name)`: the lab's Board and its simulator; logs (serial, flash) go to tmp_path."""
    lab, sim = usb_lab
    monkeypatch.setenv(STATE_ENV, str(simlab.state_dir(lab)))
    monkeypatch.chdir(tmp_path)  # the drivers' default log directories are relative
    made: list[Board] = []

    def make(name: str) -> tuple[Board, SimMcuBoard | None]:
        board = Board(lab, name)
        made.append(board)
        return board, sim.components.get(f"boards.{name}")  # the ESP32 entry is not simulated

    yield make
    for board in made:
        board.release()


def copy_model(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    shutil.copy(MODELS / name, path)
    return path


def within(measured: float, truth: float, uncertainty: float) -> bool:
    return abs(measured - truth) <= uncertainty + SCHEDULING_MS


@pytest.mark.parametrize("name", USB_CDC)
def test_an_install_times_its_boot_on_the_dut_clock_and_bounds_it_on_the_host(board_of, tmp_path, name):
    board, sim = board_of(name)
    sim.load_firmware((MODELS / "digits_mlp_int8.tflite").read_bytes())  # so that the install writes
    model = copy_model(tmp_path, "mnist5k_mlp_int8.tflite")
    record = board.install(model)
    truth, cold = sim.last_boot, record.detail
    assert isinstance(record, InstallRecord) and not record.skipped
    assert record.model_sha256 == ModelInfo.from_file(model).sha256
    assert cold["cold_start_basis"] == "host_and_dut"
    # the DUT's clock: from the application's start (its counter's zero) to m-init-done
    assert within(
        cold["cold_start_dut_ms"],
        (truth.init_done_s - truth.app_s) * 1e3,
        cold["cold_start_dut_uncertainty_ms"],
    )
    # model_init_ms, or longer while the simulator's first load of a model takes longer in host time
    assert within(
        cold["cold_start_init_ms"],
        (truth.init_done_s - truth.banner_s) * 1e3,
        cold["cold_start_dut_uncertainty_ms"],
    )
    assert cold["cold_start_init_ms"] >= sim.model_init_ms - TIMER_SLACK_S * 1e3
    assert cold["cold_start_dut_uncertainty_ms"] == TIMER_SLACK_S * 1e3
    # the host's: reset -> m-init-done, bounded by the flasher's own step, which holds the reset
    assert within(cold["cold_start_ms"], truth.cold_start_ms, cold["cold_start_uncertainty_ms"])
    boot_truth_ms = (truth.banner_s - truth.reset_s) * 1e3
    assert within(cold["cold_start_boot_ms"], boot_truth_ms, cold["cold_start_uncertainty_ms"])
    # the DUT's own count bounds the host interval from below
    low = cold["cold_start_ms"] - cold["cold_start_uncertainty_ms"]
    assert low >= cold["cold_start_dut_ms"] - TIMER_SLACK_S * 1e3 - 1e-9
    # the run reads it from the target: identify reports it (labbench.measure.run records it)
    extra = board.target.identify().extra
    assert {k: v for k, v in extra.items() if k.startswith("cold_start")} == {
        k: v for k, v in cold.items() if k.startswith("cold_start")
    }
    assert record.provenance()["cold_start_basis"] == "host_and_dut"  # journalled with the install


@pytest.mark.parametrize("name", USB_CDC)
def test_a_skipped_install_reports_the_dut_clock_of_the_boot_before(board_of, tmp_path, name):
    board, sim = board_of(name)
    model = copy_model(tmp_path, "digits_mlp_int8.tflite")
    board.install(model)  # written, or already there
    truth = sim.last_boot
    again = board.install(model)
    assert again.skipped and sim.last_boot is truth  # no reset: the same boot
    cold = again.detail
    assert cold["cold_start_basis"] == "dut_clock" and "cold_start_ms" not in cold
    assert within(
        cold["cold_start_dut_ms"],
        (truth.init_done_s - truth.app_s) * 1e3,
        cold["cold_start_dut_uncertainty_ms"],
    )
    assert within(
        cold["cold_start_init_ms"],
        (truth.init_done_s - truth.banner_s) * 1e3,
        cold["cold_start_dut_uncertainty_ms"],
    )


def test_a_board_reset_through_its_port_keeps_the_cold_start_of_its_runs(board_of):
    board, _ = board_of("esp32")
    record = InstallRecord("esp32", "esptool", "0" * 64, None, False, 1.0, detail={"image": "x"})
    assert board._with_cold_start(record, [], (0.0, 1.0)) is record  # nothing asked of the DUT


# -- DutSerial.boot_cold_start against simulated boards directly ------------------------------------


def start(**kwargs) -> SimMcuBoard:
    kwargs.setdefault("family", "nano33_ble_sense")
    kwargs.setdefault("model_path", MODELS / "digits_mlp_int8.tflite")
    kwargs.setdefault("jitter_pct", 0)
    board = SimMcuBoard(kwargs.pop("name", "cold"), **kwargs)
    board.start()
    return board


def flash(b: SimMcuBoard, d: DutSerial, model: str = "mnist5k_mlp_int8.tflite") -> tuple[float, float]:
    """The simulator's flasher path (write, reset, boot), with the host instants around it."""
    d.close()
    before = time.monotonic()
    b.load_firmware((MODELS / model).read_bytes(), Path(model).stem)
    return before, time.monotonic()


def test_the_boot_report_and_a_window_around_the_reset(tmp_path):
    b = start(name="window", boot_ms=40, model_init_ms=25)
    d = DutSerial(b.url, board=b.name, log_path=tmp_path / "serial.log")
    try:
        window = flash(b, d)
        cold, truth = d.boot_cold_start(window), b.last_boot
        assert cold["cold_start_basis"] == "host_and_dut"
        assert within(
            cold["cold_start_dut_ms"],
            (truth.init_done_s - truth.app_s) * 1e3,
            cold["cold_start_dut_uncertainty_ms"],
        )
        assert within(
            cold["cold_start_init_ms"],
            (truth.init_done_s - truth.banner_s) * 1e3,
            cold["cold_start_dut_uncertainty_ms"],
        )
        assert cold["cold_start_dut_ms"] >= 65.0 - TIMER_SLACK_S * 1e3  # boot_ms + model_init_ms
        assert within(cold["cold_start_ms"], truth.cold_start_ms, cold["cold_start_uncertainty_ms"])
        assert within(
            cold["cold_start_boot_ms"],
            (truth.banner_s - truth.reset_s) * 1e3,
            cold["cold_start_uncertainty_ms"],
        )
        # the window opened just before the reset: the host interval is narrow
        assert cold["cold_start_uncertainty_ms"] < (window[1] - window[0]) * 1e3 / 2 + 10
        assert d.identify().extra["cold_start_basis"] == "host_and_dut"
        assert "-> b'boot%'" in (tmp_path / "serial.log").read_text()

        # a window that closed before the boot: not the reset of this boot, the DUT's clock alone
        later = flash(b, d)
        cold = d.boot_cold_start((window[0], later[0]))
        assert cold["cold_start_basis"] == "dut_clock" and "cold_start_ms" not in cold
    finally:
        d.close()
        b.stop()


def test_a_counter_that_does_not_start_with_the_application(tmp_path):
    """A counter already at 50 minutes when the application starts (one that runs through resets):
    its m-init-done stamp still maps onto the host clock, but its value is no time since the start."""
    b = start(name="running", timer_start_us=3_000_000_000)
    d = DutSerial(b.url, board=b.name, log_path=tmp_path / "serial.log")
    try:
        cold, truth = d.boot_cold_start(flash(b, d)), b.last_boot
        assert "cold_start_dut_ms" not in cold and cold["cold_start_basis"] == "host_and_dut"
        init_ms = (truth.init_done_s - truth.banner_s) * 1e3
        assert within(cold["cold_start_init_ms"], init_ms, TIMER_SLACK_S * 1e3)
        assert within(cold["cold_start_ms"], truth.cold_start_ms, cold["cold_start_uncertainty_ms"])
        assert d.boot_cold_start()["cold_start_dut_ms"] > 3e6  # without a window nothing can tell
    finally:
        d.close()
        b.stop()


def test_firmware_without_the_boot_extension_gives_nothing(tmp_path):
    """MLPerf's reference firmware has no `boot`: no cold start, and no command it does not offer."""
    b = start(name="noboot", boot_report=False, reply_crc=False)
    d = DutSerial(b.url, board=b.name, log_path=tmp_path / "serial.log")
    try:
        assert d.boot_cold_start(flash(b, d)) == {} and d.cold_start == {}
        assert "cold_start_basis" not in d.identify().extra
        assert "b'boot%'" not in (tmp_path / "serial.log").read_text()
    finally:
        d.close()
        b.stop()
