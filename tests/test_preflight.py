"""Pre-flight: outputs on a full or read-only file system, an unreachable board or instrument and a
silent instrument are errors in seconds, before any board is touched; a healthy lab passes."""

from __future__ import annotations

import socket
import textwrap
import threading
import time
from pathlib import Path

import pytest
from netproxy import free_port
from test_journal_storage import fill, tmpfs

from labbench import inventory, preflight
from labbench.board import Board

pytest_plugins = ["pytester"]

# The test a run would do first: it marks that a board was touched.
TOUCHES = textwrap.dedent("""\
    from pathlib import Path

    def test_identify(board):
        Path("touched").write_text(board.name)
        assert board.target.identify().model
    """)


@pytest.fixture
def sim_meter():
    """A simulated PM1000+ answering on an ephemeral port."""
    from labbench.sim.pm1000 import IDEAL, Pm1000Sim
    from labbench.sim.powerbus import PowerBus

    with Pm1000Sim("meter", "127.0.0.1", 0, PowerBus().channel("meter:1"), use_pty=False, **IDEAL) as sim:
        yield sim


@pytest.fixture
def silent_port():
    """A loopback port that accepts connections and never answers."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(server.accept()[0]), daemon=True).start()
    yield server.getsockname()[1]
    server.close()
    for s in accepted:
        s.close()


def lab_yaml(directory: Path, url: str, resource: str | None = None) -> Path:
    """A lab of one MCU board at `url`, measured by a PM1000+ at `resource` when given."""
    instruments = (
        (
            f'instruments:\n  meter:\n    kind: pm1000\n    resource: "{resource}"\n'
            "    settings: {timeout_s: 0.5}\n"
        )
        if resource
        else ""
    )
    power = "    power: {instrument: meter}\n" if resource else ""
    path = directory / "lab.yaml"
    path.write_text(
        f"lab: {{name: preflight}}\n{instruments}boards:\n  good:\n    family: nano33_ble_sense\n"
        f'    serial: {{url: "{url}"}}\n{power}'
    )
    return path


@pytest.fixture(autouse=True)
def lock_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("LABBENCH_LOCK_DIR", str(tmp_path / "locks"))


# --- the checks ----------------------------------------------------------------------------------


def test_outputs_writable_with_free_space(tmp_path):
    assert preflight.output_problem("journal", tmp_path / "reports" / "journal.jsonl") is None
    assert (tmp_path / "reports").is_dir() and list((tmp_path / "reports").iterdir()) == []  # probe removed
    assert preflight.output_problem("--html", tmp_path) == f"--html {tmp_path}: is a directory"


def test_a_full_tiny_or_read_only_file_system_is_a_problem(tmp_path):
    with tmpfs(tmp_path / "tiny", "size=64k") as tiny:
        assert preflight.output_problem("journal", tiny / "j.jsonl") == (
            f"journal {tiny}/j.jsonl: 0.06 MiB free in {tiny}; pre-flight asks for 10 MiB"
        )
        fill(tiny)
        assert preflight.output_problem("journal", tiny / "j.jsonl") == (
            f"journal {tiny}/j.jsonl: cannot write in {tiny}: No space left on device (ENOSPC)"
        )
        assert sorted(p.name for p in tiny.iterdir()) == ["filler"]
    with tmpfs(tmp_path / "ro", "ro") as ro:
        assert preflight.output_problem("--junitxml", ro / "out" / "junit.xml") == (
            f"--junitxml {ro}/out/junit.xml: cannot write in {ro}/out: Read-only file system (EROFS)"
        )


def test_links_refused_missing_or_not_checked():
    port = free_port()
    entry = inventory.BoardEntry.model_validate(
        {"name": "b", "family": "nano33_ble_sense", "serial": {"url": f"rfc2217://127.0.0.1:{port}"}}
    )
    refused = f"no TCP connection to 127.0.0.1:{port} within 3 s: Connection refused (ECONNREFUSED)"
    assert preflight.link_problem(entry) == f"serial rfc2217://127.0.0.1:{port}: {refused}"
    ssh = inventory.BoardEntry.model_validate(
        {"name": "p", "family": "rpi4b", "ssh": {"host": "127.0.0.1", "port": port, "user": "lab"}}
    )
    assert preflight.link_problem(ssh) == f"ssh: {refused}"
    missing = entry.model_copy(update={"serial": entry.serial.model_copy(update={"url": "/dev/ttyNOSUCH9"})})
    assert preflight.link_problem(missing) == "serial /dev/ttyNOSUCH9: no such device (unplugged?)"
    loop = entry.model_copy(update={"serial": entry.serial.model_copy(update={"url": "loop://"})})
    assert preflight.link_problem(loop) is None


def test_a_healthy_board_and_instrument_pass(tmp_path, sim_board, sim_meter):
    lab = inventory.load(lab_yaml(tmp_path, sim_board.url, sim_meter.resource))
    result = preflight.check([("journal", tmp_path / "j.jsonl")], lab, ["good"])
    assert result.problems == []
    assert result.passed[:2] == ["journal writable", "good reachable"]
    assert result.passed[2].startswith("meter answers *IDN?: Voltech,PM1000+,")


def test_a_silent_instrument_times_out_in_seconds(tmp_path, sim_board, silent_port):
    lab = inventory.load(lab_yaml(tmp_path, sim_board.url, f"TCPIP::127.0.0.1::{silent_port}::SOCKET"))
    start = time.monotonic()
    result = preflight.check([], lab, ["good"])
    assert time.monotonic() - start < 5
    assert len(result.problems) == 1
    resource = f"TCPIP::127.0.0.1::{silent_port}::SOCKET"
    assert result.problems[0].startswith(f"board good: instrument meter: meter: open {resource}: no answer")


def test_a_busy_board_is_not_probed(tmp_path):
    lab = inventory.load(lab_yaml(tmp_path, f"rfc2217://127.0.0.1:{free_port()}"))
    with Board(lab, "good"):
        result = preflight.check([], lab, ["good"])
    assert result.problems == [] and result.passed == ["good not probed (busy)"]


# --- pytest runs ---------------------------------------------------------------------------------


def run(pytester, *args: str):
    start = time.monotonic()
    result = pytester.runpytest("--board", "good", *args)
    return result, time.monotonic() - start


def test_run_with_its_journal_on_a_full_disk_stops_at_preflight(pytester, sim_board, tmp_path):
    lab_yaml(pytester.path, sim_board.url)
    pytester.makepyfile(test_hil=TOUCHES)
    with tmpfs(tmp_path / "tiny", "size=64k") as tiny:
        fill(tiny)
        result, seconds = run(pytester, "--journal", str(tiny / "journal.jsonl"))
    assert result.ret == pytest.ExitCode.USAGE_ERROR and seconds < 10
    result.stderr.fnmatch_lines(
        [
            (
                "ERROR: labbench pre-flight found 1 problem(s) in *s, before any board was flashed or measured "
                "(--no-preflight skips the checks):"
            ),
            f"  journal {tiny}/journal.jsonl: cannot write in {tiny}: No space left on device (ENOSPC)",
        ]
    )
    assert not (pytester.path / "touched").exists()


def test_run_with_its_reports_in_a_read_only_folder_stops_at_preflight(pytester, sim_board, tmp_path):
    lab_yaml(pytester.path, sim_board.url)
    pytester.makepyfile(test_hil=TOUCHES)
    with tmpfs(tmp_path / "ro", "ro") as ro:
        result, seconds = run(
            pytester,
            "--journal",
            f"{ro}/journal.jsonl",
            "--html",
            f"{ro}/run.html",
            "--junitxml",
            f"{ro}/junit.xml",
        )
    assert result.ret == pytest.ExitCode.USAGE_ERROR and seconds < 10
    erofs = f"cannot write in {ro}: Read-only file system (EROFS)"
    result.stderr.fnmatch_lines(
        [
            "ERROR: labbench pre-flight found 3 problem(s) in *",
            f"  journal {ro}/journal.jsonl: {erofs}",
            f"  --html {ro}/run.html: {erofs}",
            f"  --junitxml {ro}/junit.xml: {erofs}",
        ]
    )
    assert not (pytester.path / "touched").exists()


def test_run_with_an_unreachable_board_and_instrument_stops_at_preflight(pytester):
    board_port, meter_port = free_port(), free_port()
    lab_yaml(pytester.path, f"rfc2217://127.0.0.1:{board_port}", f"TCPIP::127.0.0.1::{meter_port}::SOCKET")
    pytester.makepyfile(test_hil=TOUCHES)
    result, seconds = run(pytester, "--journal", "j.jsonl")
    assert result.ret == pytest.ExitCode.USAGE_ERROR and seconds < 10
    result.stderr.fnmatch_lines(
        [
            "ERROR: labbench pre-flight found 2 problem(s) in *",
            (
                f"  board good: serial rfc2217://127.0.0.1:{board_port}: no TCP connection to "
                f"127.0.0.1:{board_port} within 3 s: Connection refused (ECONNREFUSED)"
            ),
            (
                f"  board good: instrument meter (TCPIP::127.0.0.1::{meter_port}::SOCKET): no TCP connection to "
                f"127.0.0.1:{meter_port} within 3 s: Connection refused (ECONNREFUSED)"
            ),
        ]
    )
    assert not (pytester.path / "touched").exists() and not (pytester.path / "j.jsonl").exists()
    skipped = pytester.runpytest("--board", "good", "--journal", "j.jsonl", "--no-preflight")
    assert "pre-flight" not in skipped.stderr.str()
    skipped.assert_outcomes(failed=1)  # without it: found only once the test gets to the board
    skipped.stdout.fnmatch_lines(["*DutProtocolError: good: open rfc2217://127.0.0.1:*Connection refused*"])


def test_run_on_a_healthy_lab_passes_preflight_and_says_so(pytester, sim_board, sim_meter):
    lab_yaml(pytester.path, sim_board.url, sim_meter.resource)
    pytester.makepyfile(test_hil=TOUCHES)
    result, _ = run(pytester, "--journal", "j.jsonl")
    result.assert_outcomes(passed=1)
    passed = (
        "labbench pre-flight passed in *s: journal writable; good reachable; meter answers ?IDN?: Voltech*"
    )
    result.stdout.fnmatch_lines([passed])
