"""The Flasher drivers against simulated boards: esptool as a library on the simulated ESP32, and
bossac / flashtool as commands (the simulator's stand-ins) on a simulated Nano 33 BLE and Coral Micro."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest

from labbench import firmware_image, inventory
from labbench.capabilities import Flasher
from labbench.drivers.bossac import BossacFlasher
from labbench.drivers.coral import FlashtoolFlasher
from labbench.drivers.esptool import EsptoolFlasher
from labbench.errors import FlashError
from labbench.modelinfo import ModelInfo
from labbench.sim import lab as simlab
from labbench.sim.control import SOCKET_NAME, ControlServer
from labbench.sim.standin_tools import STATE_ENV

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "fixtures" / "models"


def test_esptool_flasher_writes_verifies_identifies_then_skips_on_md5(esp32, tmp_path):
    packed = firmware_image.pack(MODELS / "mnist5k_mlp_int8.tflite", tmp_path / "mnist")
    flasher = EsptoolFlasher(esp32.url, board="esp32", log_dir=tmp_path / "logs", show_progress=False)
    assert isinstance(flasher, Flasher)

    first = flasher.flash(str(packed.image))
    assert not first.skipped and first.detail["baud"] == 460800
    # the partition table already in flash matches its MD5: only the app region is written
    assert first.detail["bytes_written"] == packed.image.stat().st_size
    assert first.identity.model == "mnist5k_mlp_int8"
    assert (
        first.identity.model_sha256
        == packed.model_sha256
        == ModelInfo.from_file(MODELS / "mnist5k_mlp_int8.tflite").sha256
    )
    log = Path(first.log).read_text()
    assert "Hash of data verified." in log and "Writing at 0x" in log  # verified, progress recorded
    assert "m-ready" in first.detail["boot_log"]

    again = flasher.flash(str(packed.image))
    assert again.skipped and again.detail["bytes_written"] == 0 and "write_s" not in again.detail
    assert again.identity.model_sha256 == packed.model_sha256
    assert "Hash of data verified." not in Path(again.log).read_text()

    forced = flasher.flash(str(packed.image), force=True)
    assert not forced.skipped
    assert (
        forced.detail["bytes_written"] == packed.image.stat().st_size + firmware_image.PARTITION_TABLE_BYTES
    )


def test_esptool_flasher_reports_a_board_left_in_the_loader(esp32, tmp_path):
    packed = firmware_image.pack(MODELS / "digits_mlp_int8.tflite", tmp_path / "digits")
    broken = tmp_path / "digits" / "broken.bin"
    data = bytearray(packed.image.read_bytes())
    data[0] = 0x00  # not an application image any more
    broken.write_bytes(bytes(data))
    flasher = EsptoolFlasher(esp32.url, board="esp32", log_dir=tmp_path / "logs", show_progress=False)
    with pytest.raises(FlashError) as failed:
        flasher.flash(str(broken))
    err = failed.value
    assert err.target == "esp32" and err.action == "boot after flashing"
    assert "stayed in the ROM loader" in err.seen and "invalid header: 0x" in err.seen
    assert Path(err.log).exists() and "invalid header" in Path(err.log).read_text()
    recovered = flasher.flash(str(packed.image))  # the loader takes the next image
    assert recovered.identity.model_sha256 == packed.model_sha256


def test_esptool_flasher_from_lab_entry():
    entry = inventory.BoardEntry(
        name="esp32",
        family="esp32_devkitc",
        serial={"url": "rfc2217://127.0.0.1:14001", "baud": 115200},
        flash={"tool": "esptool", "baud": 921600, "timeout_s": 60},
        sim={},
    )
    flasher = EsptoolFlasher.from_lab(entry)
    assert (flasher.url, flasher.board, flasher.baud, flasher.dut_baud) == (
        "rfc2217://127.0.0.1:14001",
        "esp32",
        921600,
        115200,
    )


def test_command_flasher_failure_names_board_tool_exit_code_output_and_log(tmp_path):
    failing = [sys.executable, "-c", "print('No device found on {port}'); raise SystemExit(3)"]
    flasher = BossacFlasher("loop://", board="nano33", command=failing, log_dir=tmp_path)
    with pytest.raises(FlashError) as failed:
        flasher.flash(str(MODELS / "digits_mlp_int8.tflite"), force=True)
    err = failed.value
    assert (err.target, err.action) == ("nano33", "flash with bossac")
    assert "exit code 3" in err.seen and "No device found on loop://" in err.seen
    assert str(err).startswith("nano33: flash with bossac: exit code 3") and err.log in str(err)
    assert "[exit code 3]" in Path(err.log).read_text()


def test_command_flasher_default_command_lines():
    entry = inventory.BoardEntry(
        name="nano33", family="nano33_ble_sense", serial={"url": "/dev/ttyACM0"}, flash={"tool": "bossac"}
    )
    assert BossacFlasher.from_lab(entry).argv(Path("/b/fw.bin")) == [
        "bossac",
        "--port=/dev/ttyACM0",
        "-U",
        "-i",
        "-e",
        "-w",
        "/b/fw.bin",
        "-R",
    ]
    coral = inventory.BoardEntry(
        name="coral",
        family="coral_dev_board_micro",
        serial={"url": "/dev/ttyACM1"},
        flash={
            "tool": "flashtool",
            "command": ["flashtool.py", "--elf_path", "{image}", "--serial", "ABC123"],
        },
    )
    assert FlashtoolFlasher.from_lab(coral).argv(Path("/b/app.elf")) == [
        "flashtool.py",
        "--elf_path",
        "/b/app.elf",
        "--serial",
        "ABC123",
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mcu_lab(tmp_path_factory):
    """A simulated lab of a Nano 33 BLE and a Coral Micro: the sim lab's boards and control socket,
    served in this process (the daemon `labbench sim up` starts runs the same objects)."""
    d = tmp_path_factory.mktemp("standin-lab")
    model = MODELS / "digits_mlp_int8.tflite"
    (d / "lab.yaml").write_text(f"""lab: {{name: standin-lab}}
boards:
  nano33:
    family: nano33_ble_sense
    serial: {{url: "rfc2217://127.0.0.1:{_free_port()}", baud: 115200}}
    flash:
      tool: bossac
      command: ["{{python}}", -m, labbench.sim.standin_tools, bossac, "--port={{port}}", -U, -w, "{{image}}", -R]
    sim: {{model: {model}}}
  coral_micro:
    family: coral_dev_board_micro
    serial: {{url: "rfc2217://127.0.0.1:{_free_port()}", baud: 115200}}
    flash:
      tool: flashtool
      command: ["{{python}}", -m, labbench.sim.standin_tools, flashtool, --elf_path, "{{image}}", --serial, "{{port}}"]
    sim: {{model: {model}}}
""")
    lab = inventory.load(d / "lab.yaml")
    state = simlab.state_dir(lab)
    state.mkdir(parents=True)
    sim = simlab.SimLab(lab, state)
    control = ControlServer(state / SOCKET_NAME, {"load_firmware": sim.load_firmware})
    sim.start()
    control.start()
    (state / simlab.STATE_FILE).write_text(json.dumps({"pid": os.getpid(), "lab": str(lab.path)}))
    yield lab
    control.stop()
    sim.stop()


@pytest.mark.parametrize(
    "board_name,flasher_class", [("nano33", BossacFlasher), ("coral_micro", FlashtoolFlasher)]
)
def test_standin_tools_load_the_simulated_board(mcu_lab, board_name, flasher_class, tmp_path, monkeypatch):
    monkeypatch.setenv(STATE_ENV, str(simlab.state_dir(mcu_lab)))
    flasher = flasher_class.from_lab(mcu_lab.boards[board_name])
    flasher.log_dir = tmp_path
    assert flasher.argv(tmp_path / "x")[:4] == [
        sys.executable,
        "-m",
        "labbench.sim.standin_tools",
        flasher.TOOL,
    ]
    model = tmp_path / "mnist5k_mlp_int8.tflite"
    shutil.copy(MODELS / "mnist5k_mlp_int8.tflite", model)

    record = flasher.flash(str(model))
    assert not record.skipped
    assert record.identity.model_sha256 == ModelInfo.from_file(model).sha256
    assert (
        f"labbench stand-in for {flasher.TOOL}: simulated board '{board_name}' loaded"
        in Path(record.log).read_text()
    )
    assert flasher.flash(str(model)).skipped  # the DUT already reports the model's hash
