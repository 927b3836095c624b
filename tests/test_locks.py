"""Board locks are keyed on the physical thing: two lab files naming one port, host or instrument
channel under other names exclude each other, in one process or two; a dead holder's lock is free."""

from __future__ import annotations

import fcntl
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from labbench import inventory, locks
from labbench.board import Board
from labbench.errors import BoardBusy

PORT = 14991  # never connected to: locking needs no listener

HOLD = textwrap.dedent("""\
    import sys
    from labbench import inventory
    from labbench.board import Board

    Board(inventory.load(sys.argv[1]), sys.argv[2]).acquire()
    print("held", flush=True)
    sys.stdin.read()
    """)


@pytest.fixture(autouse=True)
def lock_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LABBENCH_LOCK_DIR", str(tmp_path / "locks"))
    return tmp_path / "locks"


def lab_file(path: Path, boards: str, instruments: str = "") -> inventory.Lab:
    """A lab file written to `path`, loaded as the bench loads any."""
    text = f"lab: {{name: {path.stem}}}\n"
    if instruments:
        text += "instruments:\n" + textwrap.indent(textwrap.dedent(instruments), "  ")
    path.write_text(text + "boards:\n" + textwrap.indent(textwrap.dedent(boards), "  "))
    return inventory.load(path)


def serial_board(name: str, url: str, power: str = "") -> str:
    return f'{name}:\n  family: esp32_devkitc\n  serial: {{url: "{url}"}}\n' + (
        f"  power: {power}\n" if power else ""
    )


@pytest.fixture
def holder_lab(tmp_path):
    return lab_file(tmp_path / "a.yaml", serial_board("esp32", f"rfc2217://localhost:{PORT}"))


@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]", "LOCALHOST"])
def test_one_port_under_two_names_excludes_in_one_process(tmp_path, holder_lab, host):
    other = lab_file(tmp_path / "b.yaml", serial_board("dut", f"rfc2217://{host}:{PORT}?ign_set_control"))
    with Board(holder_lab, "esp32"), pytest.raises(BoardBusy) as busy:
        Board(other, "dut").acquire()
    shown = f"rfc2217://{host.lower()}:{PORT}"
    as_ = f", as rfc2217://localhost:{PORT}" if host != "LOCALHOST" else ""  # said when the names differ
    assert re.fullmatch(
        rf"dut: acquire: {re.escape(shown)} is held by pid {os.getpid()} on host {re.escape(socket.gethostname())} "
        rf"\(board esp32 of {re.escape(str(holder_lab.path))}{re.escape(as_)}\) "
        rf"since \d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\dZ \(lock file .*\.lock\)",
        str(busy.value),
    ), busy.value
    assert "esp32" not in str(busy.value).split("lock file ")[1]  # the file is not named after a board
    Board(other, "dut").acquire().release()  # free once the holder let go


def hold(lab: inventory.Lab, board: str) -> subprocess.Popen:
    """A second process holding `board`'s locks until killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(lab.path), board],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline() == "held\n"
    return proc


def test_holder_in_another_process_is_named_and_its_death_frees_the_board(tmp_path, holder_lab):
    other = lab_file(tmp_path / "b.yaml", serial_board("dut", f"socket://127.0.0.1:{PORT}"))
    proc = hold(holder_lab, "esp32")
    try:
        with pytest.raises(
            BoardBusy,
            match=rf"^dut: acquire: socket://127.0.0.1:{PORT} is held by pid {proc.pid} "
            rf"on host .* \(board esp32 of .*a\.yaml, as rfc2217://localhost:{PORT}\)",
        ):
            Board(other, "dut").acquire()
    finally:
        proc.send_signal(signal.SIGKILL)  # no release: the kernel drops the lock with the process
        proc.wait()
    lock_file = locks.lock_file(Board(other, "dut").lock_keys()[0])
    assert f'"pid": {proc.pid}' in lock_file.read_text()  # left behind, and no obstacle
    with Board(other, "dut"):
        assert f'"pid": {os.getpid()}' in lock_file.read_text()


def test_serial_device_by_its_real_path(tmp_path):
    if not os.access("/dev/shm", os.W_OK):
        pytest.skip("needs a writable /dev/shm for a device symlink under /dev")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as dev:
        (Path(dev) / "ttyUSB0").touch()
        (Path(dev) / "by-id").mkdir()
        (Path(dev) / "by-id" / "usb-CP2102N-0001").symlink_to("../ttyUSB0")
        a = lab_file(tmp_path / "a.yaml", serial_board("esp32", f"{dev}/by-id/usb-CP2102N-0001"))
        b = lab_file(tmp_path / "b.yaml", serial_board("board7", f"{dev}/ttyUSB0"))
        with (
            Board(a, "esp32"),
            pytest.raises(BoardBusy, match=rf"^board7: acquire: {dev}/ttyUSB0 is held by"),
        ):
            Board(b, "board7").acquire()
        with (
            Board(b, "board7"),
            pytest.raises(
                BoardBusy, match=rf"^esp32: acquire: {dev}/by-id/usb-CP2102N-0001 \(= {dev}/ttyUSB0\) is held"
            ),
        ):
            Board(a, "esp32").acquire()


def ssh_board(name: str, host: str, port: int) -> str:
    return f'{name}:\n  family: rpi4b\n  ssh: {{host: "{host}", port: {port}, user: lab}}\n'


def test_ssh_host_port_under_two_names(tmp_path):
    a = lab_file(tmp_path / "a.yaml", ssh_board("pi", "localhost", 2222))
    b = lab_file(
        tmp_path / "b.yaml", ssh_board("rpi4", "127.0.0.1", 2222) + ssh_board("other", "127.0.0.1", 2223)
    )
    with Board(a, "pi"):
        with pytest.raises(BoardBusy, match=r"^rpi4: acquire: ssh://127.0.0.1:2222 is held by .*board pi of"):
            Board(b, "rpi4").acquire()
        Board(b, "other").acquire().release()  # another port is another board


METERS = """\
    pm: {kind: pm1000, resource: "TCPIP0::127.0.0.1::5025::SOCKET"}
    """
OTHER_NAMES = """\
    analyzer: {kind: pm1000, resource: "TCPIP::localhost::5025::SOCKET"}
    """


def test_one_instrument_channel_excludes_and_two_channels_coexist(tmp_path):
    a = lab_file(
        tmp_path / "a.yaml",
        serial_board("esp32", f"rfc2217://127.0.0.1:{PORT}", "{instrument: pm, channel: 2}"),
        METERS,
    )
    b = lab_file(
        tmp_path / "b.yaml",
        serial_board("nano", f"rfc2217://127.0.0.1:{PORT + 1}", "{instrument: analyzer, channel: 2}")
        + serial_board("coral", f"rfc2217://127.0.0.1:{PORT + 2}", "{instrument: analyzer, channel: 3}"),
        OTHER_NAMES,
    )
    c = lab_file(tmp_path / "c.yaml", serial_board("bare", f"rfc2217://127.0.0.1:{PORT + 1}"))
    with Board(a, "esp32"):
        with pytest.raises(
            BoardBusy,
            match=r"^nano: acquire: channel 2 of TCPIP::localhost::5025::SOCKET is held by "
            r"pid \d+ .*\(board esp32 of .*a\.yaml, as channel 2 of "
            r"TCPIP::127.0.0.1::5025::SOCKET\)",
        ):
            Board(b, "nano").acquire()
        with Board(b, "coral"):  # another channel of the same analyzer
            pass
        with Board(c, "bare"):  # nano's link lock was given back when its channel was busy (all or none)
            pass
    proc = hold(a, "esp32")
    try:
        with pytest.raises(BoardBusy, match=rf"^nano: acquire: channel 2 of .* is held by pid {proc.pid} "):
            Board(b, "nano").acquire()
    finally:
        proc.kill()
        proc.wait()
    Board(b, "nano").acquire().release()


@pytest.mark.parametrize(("content", "seen"), [(b"", "is empty"), (b"pid 12\x00\xff", "names no holder")])
def test_a_lock_file_naming_no_holder_still_gives_a_clear_message(holder_lab, content, seen):
    path = locks.lock_file(Board(holder_lab, "esp32").lock_keys()[0])
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with path.open("rb") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        with pytest.raises(
            BoardBusy,
            match=rf"^esp32: acquire: rfc2217://localhost:{PORT} is held by another "
            rf"process \(its lock file {seen}.*\) \(lock file {re.escape(str(path))}\)$",
        ):
            Board(holder_lab, "esp32").acquire()


def test_lock_dir_is_read_at_each_call(tmp_path, monkeypatch, holder_lab):
    with Board(holder_lab, "esp32"):
        monkeypatch.setenv("LABBENCH_LOCK_DIR", str(tmp_path / "elsewhere"))
        Board(holder_lab, "esp32").acquire().release()  # another lock dir: another set of locks


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("TCPIP0::127.0.0.1::5025::SOCKET", "tcpip::LOCALHOST::5025::socket"),
        ("TCPIP::10.0.0.5::INSTR", "TCPIP1::10.0.0.5::inst0::INSTR"),
        ("GPIB::12", "gpib0::12::INSTR"),
        ("ASRL/dev/../dev/ttyS0::INSTR", "ASRL/dev/ttyS0::INSTR"),
    ],
)
def test_visa_resources_in_other_notations_are_one_key(a, b):
    assert locks.instrument_keys(a, 1)[0].id == locks.instrument_keys(b, 1)[0].id


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("TCPIP::127.0.0.1::5025::SOCKET", "TCPIP::127.0.0.1::5026::SOCKET"),
        ("TCPIP::10.0.0.5::INSTR", "TCPIP::10.0.0.5::hislip0::INSTR"),
        ("GPIB0::12::INSTR", "GPIB1::12::INSTR"),
    ],
)
def test_other_resources_are_other_keys(a, b):
    assert locks.instrument_keys(a, 1)[0].id != locks.instrument_keys(b, 1)[0].id


def test_an_unresolvable_host_is_keyed_on_its_name_with_a_warning():
    with pytest.warns(UserWarning, match="cannot resolve host 'bench-pi.invalid'.*keyed on the name"):
        keys = locks.serial_keys("rfc2217://Bench-Pi.invalid:4001")
    assert [k.id for k in keys] == ["tcp:bench-pi.invalid:4001"]
