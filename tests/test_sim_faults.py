"""Fault injection in the simulated lab: each fault through the real ports, as real clients see it.

Serial faults go through an in-process ESP32 (RFC 2217, pyserial and the bench's DutSerial), the
instrument's through an in-process PM1000+ (PyVISA), SSH faults through the fault proxy in front of
an in-process sshd (paramiko). The control socket and lab.yaml's `sim: {faults: ...}` are driven
against a real `labbench.sim.lab` process. Each test asserts what reached the client and what the
injector logged, and, where the bench already has one, its typed error or its retry.
"""

from __future__ import annotations

import os
import pwd
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import serial

from labbench import inventory
from labbench.catalog import load_family
from labbench.drivers.dut_serial import DutResetError, DutSerial, DutTimeout
from labbench.drivers.ssh import RemoteRunError, SshBoard
from labbench.errors import DutProtocolError, InstrumentError, LabConfigError, RemoteError
from labbench.instruments.pm1000 import Pm1000
from labbench.modelinfo import ModelInfo, quantize_input
from labbench.sim import lab as simlab
from labbench.sim.control import SimControl, SimControlError
from labbench.sim.faults import Fault, FaultSpecError, parse
from labbench.sim.lab import ProxiedLinuxBoard
from labbench.sim.linux import SimLinuxBoard
from labbench.sim.mcu import SimMcuBoard
from labbench.sim.pm1000 import IDEAL, Pm1000Sim
from labbench.sim.powerbus import PowerBus

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "fixtures" / "models" / "digits_mlp_int8.tflite"
MNIST = REPO / "fixtures" / "models" / "mnist5k_mlp_int8.tflite"
BAUD = 921600
NAME_LINE = b"m-name-dut-[esp32_devkitc]\r\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def digits(n: int) -> np.ndarray:
    with np.load(REPO / "fixtures" / "datasets" / "digits.npz") as npz:
        x = npz["x_test"][:n]
    return quantize_input(ModelInfo.from_file(DIGITS), x.reshape(-1, 1, 64))[:, 0]


def log(injector, fault_id: int) -> list[dict]:
    return [e for e in injector.report()["log"] if e["fault"] == fault_id]


# -- the spec ------------------------------------------------------------------------------------


def test_a_spec_is_checked_against_the_link_it_is_set_on():
    assert (
        parse({"kind": "corrupt", "pattern": "m-lap-us-", "nth": 3, "offset": 9}, "serial", "esp32").xor
        is None
    )
    assert parse({"kind": "stall", "direction": "to_device", "duration_s": 2}, "ssh", "pi").duration_s == 2
    bad = [
        (
            "serial",
            {"kind": "throttle", "bytes_per_s": 10},
            'kind: a serial board has no "throttle" fault (its faults: drop, corrupt, garbage, silence, reset)',
        ),
        ("serial", {"kind": "drop"}, "a drop fault needs rate: or pattern:"),
        ("serial", {"kind": "drop", "rate": 0.1, "pattern": "x"}, "rate: give rate: or pattern:, not both"),
        ("serial", {"kind": "drop", "rate": 0.1, "nth": 2}, "nth: applies only with pattern:"),
        (
            "serial",
            {"kind": "silence", "direction": "both"},
            "direction: a serial fault acts on one direction: to_host or to_device",
        ),
        ("serial", {"kind": "reset"}, "pattern: required key is missing"),
        (
            "instrument",
            {"kind": "silence", "rate": 0.5},
            "rate: does not apply to a silence fault of an instrument (it takes: duration_s, nth, pattern)",
        ),
        ("ssh", {"kind": "throttle"}, "bytes_per_s: required key is missing"),
        (
            "ssh",
            {"kind": "disconnect", "after_bytes": 1, "after_s": 1},
            "after_s: give after_bytes: or after_s:, not both",
        ),
        ("ssh", {"kind": "stall", "rate": 2}, "rate: input should be less than or equal to 1, got 2"),
        ("ssh", {"kind": "stall", "durations": 2}, 'durations: unknown key; did you mean "duration_s"?'),
    ]
    for link, spec, message in bad:
        with pytest.raises(FaultSpecError) as err:
            parse(spec, link, "target")
        assert str(err.value).startswith(f"target: {message}"), str(err.value)


LAB = """\
lab:
  name: faults
instruments:
  meter:
    kind: pm1000
    resource: TCPIP::127.0.0.1::@METER@::SOCKET
    sim:
      update_period_s: 0.1
      faults:
        - {kind: silence, pattern: ":FRD?", nth: 1000}
boards:
  esp32:
    family: esp32_devkitc
    serial: {url: "rfc2217://127.0.0.1:@ESP32@", baud: 921600}
    power: {instrument: meter}
    sim:
      model: @MODEL@
      baud: 921600
      faults:
        - kind: drop
          pattern: "m-name-dut-["
          offset: 12
          length: 3
  pi:
    family: rpi4b
    ssh: {host: 127.0.0.1, port: @PI@, user: @USER@, key: keys/id_ed25519, known_hosts: known_hosts}
    sim: {}
"""


def lab_text(**values: object) -> str:
    text = LAB
    for key, value in values.items():
        text = text.replace(f"@{key.upper()}@", str(value))
    return text


def write_lab(directory: Path, text: str) -> Path:
    path = directory / "lab.yaml"
    path.write_text(text)
    return path


def test_lab_yaml_faults_load_typed_and_the_rest_of_sim_passes_through(tmp_path):
    lab = inventory.load(
        write_lab(tmp_path, lab_text(meter=15025, esp32=14001, model=DIGITS, pi=12201, user="pi"))
    )
    esp32 = lab.boards["esp32"].sim
    assert esp32.faults == [Fault(kind="drop", pattern="m-name-dut-[", offset=12, length=3)]
    assert esp32.settings == {"model": str(DIGITS), "baud": 921600}
    assert lab.instruments["meter"].sim.faults[0].nth == 1000
    assert lab.boards["pi"].sim.faults == [] and lab.boards["pi"].simulated


def test_lab_yaml_fault_errors_name_the_line_and_key(tmp_path):
    base = lab_text(meter=15025, esp32=14001, model=DIGITS, pi=12201, user="pi")
    wrong_types = base.replace('pattern: "m-name-dut-["', "pattern: 7\n          rate: 2").replace(
        "sim: {}", "sim: {faults: [{kind: stal}]}"
    )
    with pytest.raises(LabConfigError) as err:
        inventory.load(write_lab(tmp_path, wrong_types))
    assert str(err.value).splitlines() == [
        "lab.yaml:22: boards.esp32.sim.faults.0.rate: input should be less than or equal to 1, got 2",
        "lab.yaml:21: boards.esp32.sim.faults.0.pattern: expected a string, got 7",
        (
            "lab.yaml:28: boards.pi.sim.faults.0.kind: expected 'drop', 'corrupt', 'garbage', 'silence', 'reset', "
            "'disconnect', 'throttle' or 'stall', got \"stal\""
        ),
    ]
    wrong_link = (
        base.replace("kind: drop", "kind: throttle")
        .replace(
            '{kind: silence, pattern: ":FRD?", nth: 1000}', '{kind: silence, pattern: ":FRD?", offset: 2}'
        )
        .replace("sim: {}", "sim: {faults: [{kind: stall, after_bytes: 10, after_s: 1}]}")
    )
    with pytest.raises(LabConfigError) as err:
        inventory.load(write_lab(tmp_path, wrong_link))
    assert str(err.value).splitlines() == [
        (
            "lab.yaml:10: instruments.meter.sim.faults.0.offset: does not apply to a silence fault of an instrument "
            "(it takes: duration_s, nth, pattern)"
        ),
        (
            'lab.yaml:20: boards.esp32.sim.faults.0.kind: a serial board has no "throttle" fault '
            "(its faults: drop, corrupt, garbage, silence, reset)"
        ),
        (
            "lab.yaml:27: boards.pi.sim.faults.0.after_s: does not apply to a stall fault of an SSH board "
            "(it takes: after_bytes, direction, duration_s)"
        ),
    ]


# -- serial: an in-process ESP32 -------------------------------------------------------------------


@pytest.fixture(scope="module")
def esp32():
    """Exact timing (no jitter): a run after a fault must give the clean run's very numbers."""
    board = SimMcuBoard("esp32", family="esp32_devkitc", model_path=DIGITS, baud=BAUD, jitter_pct=0)
    board.uart.faults.reset = board.reset
    board.start()
    yield board
    board.stop()


@pytest.fixture
def mcu(esp32):
    """The board freshly booted (the bench may have left its crc32 extension on), faults cleared after."""
    esp32.reset(wait=True)
    yield esp32
    esp32.uart.faults.clear()


@pytest.fixture
def port(mcu):
    p = serial.serial_for_url(mcu.url, baudrate=BAUD, timeout=0.05)
    yield p
    p.close()


@pytest.fixture
def dut(mcu):
    d = DutSerial(mcu.url, board=mcu.name, baud=BAUD, timeout_s=1.0, infer_timeout_s=1.0)
    yield d
    d.close()


def ask(
    port: serial.SerialBase, command: bytes, until: bytes = b"m-ready\r\n", timeout_s: float = 2.0
) -> bytes:
    port.write(command)
    buf, deadline = b"", time.monotonic() + timeout_s
    while not buf.endswith(until) and time.monotonic() < deadline:
        buf += port.read(max(1, port.in_waiting))
    return buf


def test_drop_the_nth_occurrence_removes_exactly_those_bytes(mcu, port):
    fid = mcu.uart.faults.add(Fault(kind="drop", pattern="m-name-dut-[", nth=2, offset=12, length=3))
    replies = [ask(port, b"name%") for _ in range(3)]
    assert replies == [
        NAME_LINE + b"m-ready\r\n",
        b"m-name-dut-[32_devkitc]\r\nm-ready\r\n",
        NAME_LINE + b"m-ready\r\n",
    ]
    assert [e["byte"] for e in log(mcu.uart.faults, fid)] == ["e", "s", "p"]
    assert mcu.uart.faults.report()["faults"][0]["spent"]


def test_corrupt_the_nth_lap_stamp_exactly(mcu, port):
    faults = mcu.uart.faults
    first = faults.add(Fault(kind="corrupt", pattern="m-lap-us-", nth=3, xor=0x20))
    digit = faults.add(Fault(kind="corrupt", pattern="m-lap-us-", nth=4, offset=9))
    lines = [ask(port, b"timestamp%").split(b"\r\n")[0].decode("latin-1") for _ in range(4)]
    assert [line[:9] for line in lines] == ["m-lap-us-", "m-lap-us-", "M-lap-us-", "m-lap-us-"]
    [hit] = log(faults, digit)
    assert lines[3][9] == hit["now"] and (ord(hit["was"]) ^ ord(hit["now"])).bit_count() == 1
    assert log(faults, first)[0]["was"] == "m"


def test_rate_faults_hit_where_the_seed_says_and_the_log_says(mcu, port):
    clean = ask(port, b"help%")
    assert clean.endswith(b"m-ready\r\n") and len(clean) > 400
    faults = mcu.uart.faults
    runs = []
    for _ in range(2):  # the same seeds hit the same bytes of the same reply
        drop = faults.add(Fault(kind="drop", rate=0.02, seed=7))
        flip = faults.add(Fault(kind="corrupt", rate=0.02, seed=8))
        origin = faults.report()["faults"][0]["position"]  # the reply's first byte on the stream
        got = ask(port, b"help%", timeout_s=0.5)
        faults.clear()
        hits = {e["at"] - origin: e for e in faults.report()["log"] if e["fault"] in (drop, flip)}
        expected = bytearray()
        for i, byte in enumerate(clean):
            hit = hits.get(i)
            assert hit is None or hit.get("byte", hit.get("was")) == chr(byte)
            if hit is None or hit["kind"] == "corrupt":
                expected.append(byte if hit is None else ord(hit["now"]))
        assert got == bytes(expected)
        runs.append(sorted(hits))
    assert runs[0] == runs[1] and len(runs[0]) >= 10


def test_a_changed_digit_is_never_recorded_as_a_valid_number(mcu, dut):
    """The worst corruption: a digit that becomes another digit (xor 1). The bench must refuse the run
    with a typed error, or (after a retry) record the right numbers, never the changed ones."""
    x = digits(1)[0]
    dut.identify()  # as a session starts (it turns on the reply CRC where the firmware offers it)
    clean = dut.run_timed(x, 50, 0)
    for fault in (
        Fault(kind="corrupt", pattern="m-lap-us-", nth=3, offset=13, xor=1),  # the window's end
        Fault(kind="corrupt", pattern="m-results-[", offset=14, xor=1),
    ):
        fid = mcu.uart.faults.add(fault)
        try:
            run = dut.run_timed(x, 50, 0)
        except DutProtocolError:
            pass
        else:
            assert abs(sum(run.latencies_us) - sum(clean.latencies_us)) <= 1
            assert np.array_equal(run.outputs, clean.outputs)
        assert len(log(mcu.uart.faults, fid)) == 1


def test_a_lost_command_terminator_swallows_the_next_command(mcu, port):
    mcu.uart.faults.add(Fault(kind="drop", direction="to_device", pattern="%"))
    assert ask(port, b"name%", timeout_s=0.3) == b""  # the DUT still waits for the end of the command
    assert ask(port, b"name%") == b"e-[Unknown command: namename]\r\nm-ready\r\n"


def test_a_garbage_line_is_retried_by_identify(mcu, dut):
    fid = mcu.uart.faults.add(Fault(kind="garbage", pattern="m-name-dut-"))
    ident = dut.identify()
    assert ident.name == "esp32_devkitc" and ident.extra["name_retries"] == 1  # PASS after a recorded retry
    [hit] = log(mcu.uart.faults, fid)
    assert len(hit["text"]) == 14 and hit["text"].endswith("\r\n") and min(hit["text"][:12]) >= "\x80"


def test_reset_mid_command_prints_the_boot_banner_and_keeps_the_rows_done(mcu, dut):
    x = digits(4)
    clean = dut.classify(x)
    fid = mcu.uart.faults.add(Fault(kind="reset", pattern="infer", nth=3))
    with pytest.raises(DutResetError) as err:
        dut.classify(x)
    assert "boot banner" in str(err.value)
    assert np.array_equal(err.value.partial, clean[:2])  # no completed measurement lost
    assert log(mcu.uart.faults, fid)[0]["kind"] == "reset"
    dut.identify()  # re-aligns: bytes sent during the boot may have reached the DUT garbled
    assert np.array_equal(dut.classify(x), clean)  # the board came back with its model


def test_reset_on_what_the_dut_prints_hits_mid_inference(mcu, port):
    mcu.uart.faults.add(Fault(kind="reset", direction="to_host", pattern="m-warmup-done", delay_s=0.01))
    banner = b"m-timestamp-mode-performance\r\nm-lap-us-0\r\nm-init-done\r\nm-ready\r\n"
    got = (
        ask(port, b"db load 64%")
        + ask(port, b"db " + b"00" * 32 + b"%")
        + ask(port, b"db " + b"00" * 32 + b"%")
    )
    assert got.endswith(b"m-load-done\r\nm-ready\r\n")
    reply = ask(port, b"infer 100000 1%", until=banner)  # minutes of inferences, had it not reset
    assert reply.startswith(b"m-warmup-start-1\r\nm-warmup-done") and reply.endswith(banner)
    assert b"m-infer-done" not in reply


def test_dut_silence_times_out_until_it_ends(mcu, dut):
    dut.identify()
    fid = mcu.uart.faults.add(Fault(kind="silence"))
    with pytest.raises(DutTimeout):
        dut.identify()
    assert log(mcu.uart.faults, fid)[0]["bytes"] > 0  # the DUT answered; nothing reached the host
    mcu.uart.faults.clear()
    dut.identify()
    mcu.uart.faults.add(Fault(kind="silence", direction="to_device", duration_s=0.3))
    with pytest.raises(DutTimeout):
        dut.sync_clock()
    time.sleep(0.3)
    assert dut.identify().name == "esp32_devkitc"


# -- instruments: an in-process PM1000+ ------------------------------------------------------------


@pytest.fixture
def pm():
    channel = PowerBus().channel("meter:1")
    channel.set_power(0.8)
    with Pm1000Sim("meter", "127.0.0.1", 0, channel, update_period_s=0.1, use_pty=False, **IDEAL) as sim:
        meter = Pm1000(sim.resource, name="meter", timeout_s=0.5, update_period_s=0.1, current_range=3)
        yield sim, meter
        meter.close()


def test_instrument_silence_is_a_typed_timeout_and_leaves_no_stale_reply(pm):
    sim, meter = pm
    meter.configure(["W", "V", "A"])
    fid = sim.faults.add(Fault(kind="silence"))
    with pytest.raises(InstrumentError, match=r"timeout|no reply"):
        meter.read_results()
    assert log(sim.faults, fid)[0]["command"] == ":FRD?"
    sim.faults.clear()
    assert meter.identity() == sim.model.idn
    assert meter.send("*IDN?") == sim.model.idn  # the reply to this query, not one the silence held back
    assert meter.read_results()["V"] > 0


def test_instrument_silence_mid_capture_keeps_the_updates_captured(pm):
    sim, meter = pm
    meter.integrator = False
    meter.configure(["W", "V", "A"])
    sim.faults.add(Fault(kind="silence", pattern=":FRD?", nth=3))
    with pytest.raises(InstrumentError) as err, meter.capture():
        time.sleep(1.0)
    updates = err.value.partial.updates
    assert len(updates) == 2  # both readings taken before the silence are kept
    assert all(u.power_w == pytest.approx(0.8) for u in updates)


def test_instrument_disconnect_is_a_typed_error_and_a_new_connection_works(pm):
    sim, meter = pm
    meter.identity()
    fid = sim.faults.add(Fault(kind="disconnect"))
    assert log(sim.faults, fid)[0]["connections"] == 1
    with pytest.raises(InstrumentError):
        meter.data_status()
    meter.close()
    assert meter.identity() == sim.model.idn
    fid = sim.faults.add(Fault(kind="disconnect", pattern="*idn?", nth=2))
    meter.send("*IDN?")
    with pytest.raises(InstrumentError):
        meter.send("*IDN?")
    assert log(sim.faults, fid)[0]["command"] == "*IDN?"


# -- SSH: the fault proxy in front of an in-process sshd -----------------------------------------


@pytest.fixture(scope="module")
def pi(tmp_path_factory):
    root = tmp_path_factory.mktemp("pi")
    sshd = SimLinuxBoard(
        "pi",
        "127.0.0.1",
        free_port(),
        load_family("rpi4b"),
        PowerBus().channel("pi:1"),
        key=root / "keys" / "id_ed25519",
        state_dir=root / "pi",
    )
    board = ProxiedLinuxBoard(sshd, "127.0.0.1", free_port(), root / "known_hosts")
    board.start()
    yield board
    board.stop()


@pytest.fixture
def proxy(pi):
    yield pi.proxy
    pi.proxy.clear()


def ssh(pi: ProxiedLinuxBoard, remote_dir: str = "labbench/faults", **options) -> SshBoard:
    """The bench's driver at the address clients use (the proxy's), with the lab's known_hosts."""
    return SshBoard(
        "pi",
        pi.proxy.host,
        pi.proxy.port,
        pi.board.user,
        pi.board.key,
        pi.known_hosts,
        command_timeout_s=2,
        ssh_config=None,
        remote_dir=remote_dir,
        log_path=pi.known_hosts.parent / "pi-ssh.log",
        **options,
    )


def test_ssh_drop_mid_command_is_a_remote_error_and_the_next_command_reconnects(pi, proxy):
    board = ssh(pi)
    assert board.execute(["echo", "up"]).stdout == b"up\n"
    fid = proxy.add(Fault(kind="disconnect", direction="to_host", after_bytes=50_000))
    with pytest.raises(RemoteError, match="connection lost"):
        board.execute(["python3", "-c", "import sys; sys.stdout.write('x' * 400000)"])
    [hit] = log(proxy, fid)
    assert hit["at"] - proxy.report()["faults"][0]["position"] == 50_000 and hit["connections"] == 1
    assert board.execute(["echo", "again"]).stdout == b"again\n"
    board.close()


def test_ssh_drop_mid_run_keeps_the_completed_inferences(pi, proxy):
    board = ssh(pi)
    board.deploy(DIGITS)
    proxy.add(Fault(kind="disconnect", direction="to_host", after_bytes=60_000))
    with pytest.raises(
        RemoteRunError, match=r"broke off after \d+ of 5000 inferences completed: connection lost"
    ) as err:
        board.run_timed(digits(1)[0], 5000, 0)
    assert type(err.value) is RemoteRunError and 0 < err.value.completed < 5000
    assert len(err.value.partial.latencies_us) == err.value.completed  # every inference that arrived
    assert all(lat > 0 for lat in err.value.partial.latencies_us)
    assert err.value.log == str(board.log_path)
    board.close()


def test_slow_sftp_takes_its_time_and_arrives_whole(pi, proxy):
    board = ssh(pi, "labbench/slow")
    board.connect()
    proxy.add(Fault(kind="throttle", direction="to_device", bytes_per_s=50_000))
    t0 = time.monotonic()
    record = board.deploy(MNIST)
    elapsed = time.monotonic() - t0
    assert elapsed >= MNIST.stat().st_size / 50_000
    assert board.remote_sha256([record.detail["files"]["model"]["remote"]]) == [
        record.detail["files"]["model"]["sha256"]
    ]
    board.close()


def test_stalled_sftp_is_a_remote_error_within_the_stall_timeout(pi, proxy):
    board = ssh(pi, "labbench/stalled", transfer_stall_s=1.0)
    board.connect()
    fid = proxy.add(Fault(kind="stall", direction="to_device", after_bytes=4000))
    t0 = time.monotonic()
    with pytest.raises(
        RemoteError,
        match=r"^pi: deploy: upload of runner.py to \S+/labbench/stalled/runner.py: "
        r"no progress for 1 s \(\d+ of \d+ bytes sent\)",
    ) as err:
        board.deploy(MNIST)
    [stalled] = log(proxy, fid)
    assert stalled["until"] is None and 1.0 <= time.monotonic() - stalled["t"] < 2.0
    assert time.monotonic() - t0 < 3.0 and err.value.log == str(board.log_path)
    proxy.clear()
    record = board.deploy(MNIST)  # reconnects; the broken upload never looked deployed
    assert not record.detail["files"]["runner"]["skipped"]
    assert board.remote_sha256([record.detail["files"]["model"]["remote"]]) == [
        record.detail["files"]["model"]["sha256"]
    ]
    timed = ssh(
        pi, "labbench/stalled-1s", transfer_stall_s=3.0
    )  # a stall shorter than the bound is waited out
    timed.connect()
    proxy.add(Fault(kind="stall", direction="to_device", duration_s=1.0))
    t0 = time.monotonic()
    record = timed.deploy(DIGITS)
    assert time.monotonic() - t0 >= 1.0 and record.detail["files"]["model"]["bytes"] == DIGITS.stat().st_size
    board.close()
    timed.close()


# -- the lab process: lab.yaml faults and the control socket -------------------------------------


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    directory = tmp_path_factory.mktemp("faults-lab")
    ports = {"meter": free_port(), "esp32": free_port(), "pi": free_port()}
    path = write_lab(directory, lab_text(**ports, model=DIGITS, user=pwd.getpwuid(os.getuid()).pw_name))
    lab = inventory.load(path)
    simlab.up(lab)
    yield lab
    simlab.down(lab)


def test_lab_yaml_faults_are_armed_when_the_lab_starts(lab):
    control = SimControl(simlab.state_dir(lab))
    armed = control.faults()
    assert [f["spec"] for f in armed["boards.esp32"]["faults"]] == [
        {"kind": "drop", "pattern": "m-name-dut-[", "offset": 12, "length": 3}
    ]
    assert (
        armed["instruments.meter"]["faults"][0]["spec"]["nth"] == 1000 and armed["boards.pi"]["faults"] == []
    )
    with serial.serial_for_url(lab.boards["esp32"].serial.url, baudrate=BAUD, timeout=0.05) as port:
        assert ask(port, b"name%") == b"m-name-dut-[32_devkitc]\r\nm-ready\r\n"
    assert [e["byte"] for e in control.faults("esp32")["log"]] == ["e", "s", "p"]


def test_the_control_socket_sets_clears_and_reports_faults(lab):
    control = SimControl(simlab.state_dir(lab))
    meter = Pm1000.from_lab(lab.instruments["meter"])
    meter.timeout_s = 0.5
    assert meter.identity().startswith("Voltech")
    fid = control.fault_set("instruments.meter", {"kind": "silence", "pattern": "*idn?"})
    with pytest.raises(InstrumentError):
        meter.send("*IDN?")
    assert [e["command"] for e in control.faults("meter")["log"]] == ["*IDN?", "*ESR?"]  # and why?
    assert control.fault_clear("meter", fid) == 1
    assert meter.send("*IDN?").startswith("Voltech")
    meter.close()

    board = SshBoard.from_lab(lab.boards["pi"], lab="faults")  # through the proxy, host key from known_hosts
    board.command_timeout_s = 2
    assert board.execute(["echo", "up"]).stdout == b"up\n"
    control.fault_set("pi", {"kind": "disconnect", "after_s": 0.2})
    with pytest.raises(RemoteError, match="connection lost"):
        board.execute(["sleep", "2"])
    assert control.faults("pi")["log"][-1]["connections"] == 1
    assert board.execute(["echo", "back"]).stdout == b"back\n"
    board.close()

    with pytest.raises(SimControlError, match='esp32: kind: a serial board has no "throttle" fault'):
        control.fault_set("esp32", {"kind": "throttle", "bytes_per_s": 10})
    with pytest.raises(SimControlError, match='unknown simulated board or instrument "esp23"; did you mean'):
        control.fault_set("esp23", {"kind": "silence"})
    assert control.fault_clear("esp32") == 1 and control.faults("esp32")["faults"] == []
