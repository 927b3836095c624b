"""The pytest plugin: options, fixtures and markers, and infrastructure faults as ERRORs with bounded
recovery and quarantine, through pytest's own pytester."""

from __future__ import annotations

import base64
import json
import re
import textwrap
from pathlib import Path
from xml.etree import ElementTree

import pytest
from test_hil_faults import FlakyProxy

pytest_plugins = ["pytester"]

MODEL = Path(__file__).resolve().parents[1] / "fixtures" / "models" / "digits_mlp_int8.tflite"

# Hardware boards (no sim: blocks), so selecting them starts nothing; nothing here connects to them
# (runs that select them skip pre-flight, which would find them unreachable). Fault tests skip it too:
# they check what happens when a board fails mid-run, after pre-flight.
LAB = textwrap.dedent("""\
    lab: {name: plugin-test}
    instruments:
      meter: {kind: pm1000, resource: "TCPIP::10.9.9.9::5025::SOCKET"}
    boards:
      esp32:
        family: esp32_devkitc
        serial: {url: /dev/ttyUSB7}
        flash: {tool: esptool}
        power: {instrument: meter}
      pi:
        family: rpi4b
        ssh: {host: 10.9.9.10, user: lab}
    """)

TESTS = textwrap.dedent("""\
    import pytest

    def test_named(board):
        assert board.name in ("esp32", "pi")

    @pytest.mark.requires("flash", "power")
    def test_flash(board):
        assert "flash" in board.capabilities

    @pytest.mark.requires("deploy")
    def test_deploy(board):
        assert board.entry.ssh is not None
    """)


@pytest.fixture
def lab_dir(pytester, monkeypatch, tmp_path):
    monkeypatch.setenv("LABBENCH_LOCK_DIR", str(tmp_path / "locks"))
    pytester.makefile(".yaml", lab=LAB)
    pytester.makepyfile(test_hil=TESTS)
    return pytester


def test_list_boards(lab_dir):
    result = lab_dir.runpytest("--list-boards")
    assert result.ret == 0
    result.stdout.fnmatch_lines(
        [
            "boards in */lab.yaml:",
            "  esp32 * esp32_devkitc * /dev/ttyUSB7",
            "  pi * rpi4b * ssh://lab@10.9.9.10:22",
        ]
    )


def test_unknown_board_is_a_usage_error_listing_boards(lab_dir):
    result = lab_dir.runpytest("--board", "nosuch")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--board nosuch: no such board in */lab.yaml (boards: esp32, pi)*"])


def test_board_fixture_ids_and_requires(lab_dir):
    result = lab_dir.runpytest("--no-preflight", "--board", "all", "-v", "-rs")
    result.assert_outcomes(passed=4, skipped=2)
    result.stdout.fnmatch_lines_random(
        [
            "*test_named?esp32? PASSED*",
            "*test_named?pi? PASSED*",
            "*pi lacks capability flash, power*",
            "*esp32 lacks capability deploy*",
        ]
    )


def test_without_board_tests_skip(lab_dir):
    result = lab_dir.runpytest("-rs")
    result.assert_outcomes(skipped=3)
    result.stdout.fnmatch_lines(["*no --board given*"])


def test_lab_option_and_bad_lab(lab_dir):
    lab_dir.makefile(".yaml", other=LAB.replace("family: rpi4b", "family: rpi4"))
    result = lab_dir.runpytest("--lab", "other.yaml", "--board", "pi")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ['*other.yaml:11: boards.pi.family: unknown family "rpi4"; did you mean "rpi4b"?*']
    )


def test_board_lock_excludes_a_second_holder(lab_dir):
    from labbench import inventory
    from labbench.board import Board
    from labbench.errors import BoardBusy

    lab = inventory.load(lab_dir.path / "lab.yaml")
    with (
        Board(lab, "esp32"),
        pytest.raises(
            BoardBusy,
            match=r"^esp32: acquire: /dev/ttyUSB7 is held by pid \d+ on host .* \(board esp32 of .*lab\.yaml\) since ",
        ),
    ):
        Board(lab, "esp32").acquire()
    Board(lab, "esp32").acquire().release()


def test_busy_board_errors_once_then_its_tests_skip_while_the_other_board_runs(lab_dir):
    """The lock is the one fault needing no connection: this test holds esp32's lock itself."""
    from labbench import inventory
    from labbench.board import Board

    with Board(inventory.load(lab_dir.path / "lab.yaml"), "esp32"):
        result = lab_dir.runpytest(
            "--no-preflight", "--board", "esp32", "--board", "pi", "--journal", "j.jsonl", "-rs"
        )
    result.assert_outcomes(passed=2, skipped=3, errors=1)
    result.stdout.fnmatch_lines_random(
        [
            "*ERROR at setup of test_named?esp32?*",
            "*BoardBusy: esp32: acquire: /dev/ttyUSB7 is held by pid * (board esp32 of *lab.yaml) since *",
            "*labbench: quarantined boards*",
            "*board esp32 quarantined after BoardBusy: esp32: acquire: /dev/ttyUSB7 is held by pid * at *test_named?esp32?*",
        ]
    )
    events = [json.loads(line) for line in (lab_dir.path / "j.jsonl").read_text().splitlines()]
    assert [(e["kind"], e["board"], e["step"]) for e in events] == [("quarantine", "esp32", "acquire")]


# --- infrastructure faults on simulated boards ------------------------------------------------------
# Real MLPerf Tiny DUT simulators (labbench.sim.mcu) on ephemeral loopback ports, named in a lab.yaml
# without `sim:` blocks, so the bench treats them as hardware. A dead board is a simulator that was
# stopped (its port refuses connections); a flaky one sits behind a proxy (test_hil_faults.FlakyProxy)
# that drops the connection the first time the bench asks for the DUT's profile.

FAULT_TESTS = textwrap.dedent("""\
    import pytest

    from labbench.measure.run import RunSettings, measure
    from labbench.payloads import fixtures

    @pytest.fixture
    def identity(board, recovery, request):
        return recovery.run(request.node, board, "identify", board.target.identify)

    @pytest.fixture
    def outcome(board, recovery, request):
        payload = fixtures()["digits_mlp_int8"]
        settings = RunSettings(latency_samples=10, warmup=1, accuracy_samples=20)
        return recovery.run(request.node, board, "measure", lambda: measure(board, payload, settings))

    def test_identify(identity):
        assert identity.name == "nano33_ble_sense"

    def test_model(identity):
        assert identity.model

    @pytest.mark.budget(latency_p50_ms=1e-6)
    def test_budget(outcome, recorder):
        recorder.record(outcome.measurement)
    """)


@pytest.fixture(scope="module")
def sims():
    """Three simulated Nano 33 BLE Sense boards holding the int8 digits model: `good`, `dead`
    (stopped: its port refuses connections) and `flaky` (behind FlakyProxy instances)."""
    from labbench.sim.mcu import SimMcuBoard

    boards = {
        name: SimMcuBoard(name, family="nano33_ble_sense", model_path=MODEL)
        for name in ("good", "dead", "flaky")
    }
    for b in boards.values():
        b.start()
    boards["dead"].stop()
    yield boards
    for name in ("good", "flaky"):
        boards[name].stop()


def fault_lab(pytester, boards: dict[str, str]) -> None:
    """A lab.yaml of MCU boards at the given serial URLs, and the fault tests."""
    entries = "".join(
        f'  {name}:\n    family: nano33_ble_sense\n    serial: {{url: "{url}"}}\n'
        for name, url in boards.items()
    )
    pytester.makefile(".yaml", lab="lab: {name: faults}\nboards:\n" + entries)
    pytester.makepyfile(test_faults=FAULT_TESTS)


def junit(path) -> dict[str, tuple[str, str]]:
    """test name -> (outcome element or "passed", its message)."""
    cases = {}
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        child = next((c for c in case if c.tag in ("error", "failure", "skipped")), None)
        cases[case.get("name")] = (child.tag, child.get("message")) if child is not None else ("passed", "")
    return cases


def test_fault_is_a_junit_error_and_quarantines_its_board_while_the_next_board_runs(
    pytester, sims, monkeypatch, tmp_path
):
    monkeypatch.setenv("LABBENCH_LOCK_DIR", str(tmp_path / "locks"))
    fault_lab(pytester, {"dead": sims["dead"].url, "good": sims["good"].url})
    result = pytester.runpytest(
        "--no-preflight",
        "--board",
        "dead",
        "--board",
        "good",
        "--journal",
        "j.jsonl",
        "--junitxml",
        "junit.xml",
        "-rs",
    )
    result.assert_outcomes(passed=2, failed=1, skipped=2, errors=1)
    cases = junit(pytester.path / "junit.xml")
    assert cases["test_identify[dead]"][0] == "error"
    assert (
        "DutProtocolError" in cases["test_identify[dead]"][1]
        and "Connection refused" in cases["test_identify[dead]"][1]
    )
    # the typed error is the whole report: board, step and what was seen, no driver traceback
    assert "DutProtocolError: dead: open " in result.stdout.str() and "Traceback" not in result.stdout.str()
    assert "serial_for_url" not in result.stdout.str()
    for name in ("test_model[dead]", "test_budget[dead]"):
        tag, message = cases[name]
        assert tag == "skipped" and message.startswith(
            "board dead quarantined after DutProtocolError: dead: open "
        )
        assert message.endswith("at test_faults.py::test_identify[dead]")
    assert cases["test_identify[good]"][0] == cases["test_model[good]"][0] == "passed"
    assert cases["test_budget[good]"][0] == "failure"  # a valid measurement against a budget: the only FAIL
    assert "latency_p50_ms: measured" in cases["test_budget[good]"][1]
    result.stdout.fnmatch_lines(
        ["*labbench: quarantined boards*", "board dead quarantined after DutProtocolError*"]
    )

    events = [json.loads(line) for line in (pytester.path / "j.jsonl").read_text().splitlines()]
    attempt, quarantine, measurement = events
    assert attempt["kind"] == "attempt" and attempt["board"] == "dead" and attempt["attempt"] == 1
    assert attempt["attempts"] == 2 and attempt["recovery"].startswith("recovery failed: dead: open ")
    assert quarantine["kind"] == "quarantine" and quarantine["test"] == "test_faults.py::test_identify[dead]"
    assert measurement["board"] == "good" and measurement["status"] == "valid"


def test_a_dropped_connection_is_recovered_by_a_resync_and_the_step_retried(
    pytester, sims, monkeypatch, tmp_path
):
    monkeypatch.setenv("LABBENCH_LOCK_DIR", str(tmp_path / "locks"))
    target = (sims["flaky"].uart.host, sims["flaky"].uart.port)
    proxy = FlakyProxy(target, cut=b"profile%")
    try:
        fault_lab(pytester, {"flaky": f"rfc2217://127.0.0.1:{proxy.port}"})
        result = pytester.runpytest(
            "--no-preflight",
            "--board",
            "flaky",
            "--journal",
            "j.jsonl",
            "--junitxml",
            "junit.xml",
            "-k",
            "identify or model",
        )
    finally:
        proxy.close()
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "*labbench: steps recovered after a retry*",
            "flaky: identify passed at attempt 2 of 2 (test_faults.py::test_identify[flaky])",
        ]
    )
    events = [json.loads(line) for line in (pytester.path / "j.jsonl").read_text().splitlines()]
    assert [(e["kind"], e["attempt"], e["recovery"]) for e in events] == [
        ("attempt", 1, "resynced"),
        ("attempt", 2, None),
    ]
    assert "profile: connection lost" in events[0]["error"] and events[1]["error"] is None
    properties = {
        p.get("name"): p.get("value")
        for p in ElementTree.parse(pytester.path / "junit.xml").getroot().iter("property")
    }
    assert properties["attempt.identify.1"].endswith("; then resynced")
    assert properties["attempt.identify.2"] == "passed"


def test_without_retries_the_dropped_connection_quarantines(pytester, sims, monkeypatch, tmp_path):
    monkeypatch.setenv("LABBENCH_LOCK_DIR", str(tmp_path / "locks"))
    proxy = FlakyProxy((sims["flaky"].uart.host, sims["flaky"].uart.port), cut=b"profile%")
    try:
        fault_lab(pytester, {"flaky": f"rfc2217://127.0.0.1:{proxy.port}"})
        result = pytester.runpytest(
            "--no-preflight", "--board", "flaky", "--retries", "0", "-k", "identify or model", "-rs"
        )
    finally:
        proxy.close()
    result.assert_outcomes(errors=1, skipped=1)
    result.stdout.fnmatch_lines(
        ["*board flaky quarantined after DutProtocolError: flaky: profile: connection lost*"]
    )


def test_negative_retries_is_a_usage_error(lab_dir):
    result = lab_dir.runpytest("--board", "pi", "--retries", "-1")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--retries -1: must be 0 or more*"])


def test_no_credential_reaches_the_html_report_junit_or_journal(lab_dir, monkeypatch):
    """A token in the environment table, a test's JUnit property and a journal record comes out masked."""
    lab_dir.makepyfile(
        test_secret=textwrap.dedent("""\
        from labbench.measure.record import Event

        def test_secret(record_property, journal):
            record_property("origin", "https://ci:s3cr3t-prop@git.example/repo.git")
            journal.append(Event(kind="attempt", board="esp32", test="t", step="flash", attempt=1,
                                 error="clone https://oauth2:s3cr3t-journal@git.example/x failed"))
        """)
    )
    result = lab_dir.runpytest(
        "test_secret.py",
        "--journal",
        "j.jsonl",
        "--junitxml",
        "junit.xml",
        "--html",
        "report.html",
        "--metadata",
        "API_TOKEN",
        "s3cr3t-meta",
        "-o",
        "junit_logging=no",
    )
    result.assert_outcomes(passed=1)
    outputs = {name: (lab_dir.path / name).read_text() for name in ("junit.xml", "report.html", "j.jsonl")}
    for name, text in outputs.items():
        assert "s3cr3t" not in text, name
    assert "https://***@git.example/repo.git" in outputs["junit.xml"]
    assert "oauth2" not in outputs["j.jsonl"] and "***@git.example/x" in outputs["j.jsonl"]


def _with_embedded(report: str) -> str:
    """The HTML report with its base64 data URIs (self-contained text extras) decoded alongside."""
    decoded = [
        base64.b64decode(data).decode("utf-8", "replace")
        for data in re.findall(r";base64,([A-Za-z0-9+/=]+)", report)
    ]
    return "\n".join([report, *decoded])


def test_no_credential_in_captured_output_logs_or_html_extras(lab_dir, monkeypatch):
    """What a test prints and logs, its skip reason and the HTML and extras added to the report come out
    masked in the self-contained HTML report, JUnit (with captured output) and the terminal."""
    monkeypatch.setenv("LAB_API_TOKEN", "s3cr3t-env")
    lab_dir.makepyfile(
        test_prints=textwrap.dedent("""\
        import logging
        import os
        import sys

        import pytest
        from pytest_html import extras as html_extras

        from labbench.pytest_plugin import add_report_html

        def test_prints(request, extras):
            print("token:", os.environ["LAB_API_TOKEN"])
            print("cloning https://ci:s3cr3t-stderr@git.example/lab.git", file=sys.stderr)
            logging.getLogger("bench").warning('pushing with DB_PASSWORD="s3cr3t log" to the lab')
            add_report_html(request.node, "<p>remote https://ci:s3cr3t-html@git.example/lab.git</p>")
            extras.append(html_extras.text("LAB_API_TOKEN=s3cr3t-extra"))
            extras.append(html_extras.url("https://ci:s3cr3t-url@git.example/lab"))

        def test_skips():
            pytest.skip("mirror https://ci:s3cr3t-skip@git.example/lab.git is down")
        """)
    )
    result = lab_dir.runpytest(
        "test_prints.py",
        "--junitxml",
        "junit.xml",
        "-o",
        "junit_logging=all",
        "--html",
        "report.html",
        "--self-contained-html",
        "-rA",
    )
    result.assert_outcomes(passed=1, skipped=1)
    report = (lab_dir.path / "report.html").read_text()
    outputs = {
        "report.html": _with_embedded(report),
        "junit.xml": (lab_dir.path / "junit.xml").read_text(),
        "terminal": "\n".join(result.outlines + result.errlines),
    }
    for name, text in outputs.items():
        assert "s3cr3t" not in text, name
    assert "token: ***" in outputs["junit.xml"] and "https://***@git.example/lab.git" in outputs["junit.xml"]
    assert "DB_PASSWORD=*** to the lab" in outputs["junit.xml"]
    for shown in (
        "token: ***",
        "remote https://***@git.example/lab.git",
        "LAB_API_TOKEN=***",
        "https://***@git.example/lab",
        "mirror https://***@git.example/lab.git is down",
    ):
        assert shown in outputs["report.html"], shown


def test_no_credential_in_a_failure(lab_dir):
    """A failing test's traceback is masked, in the terminal and JUnit alike."""
    lab_dir.makepyfile(
        test_fails=textwrap.dedent("""\
        def test_fails():
            url = "https://ci:s3cr3t@git.example/lab.git"
            assert url.endswith(".zip"), f"{url} is not an archive"
        """)
    )
    result = lab_dir.runpytest("test_fails.py", "--junitxml", "junit.xml", "--html", "report.html")
    result.assert_outcomes(failed=1)
    junit = (lab_dir.path / "junit.xml").read_text()
    for text in (junit, (lab_dir.path / "report.html").read_text(), "\n".join(result.outlines)):
        assert "s3cr3t" not in text
    assert "https://***@git.example/lab.git is not an archive" in junit


def test_bad_marker_arguments_are_a_usage_error_at_collection(lab_dir):
    lab_dir.makepyfile(
        test_markers="""
        import pytest

        @pytest.mark.budget(latency_p99_ms=-1)
        def test_budget(board):
            pass
        """
    )
    result = lab_dir.runpytest("--collect-only", "test_markers.py")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            "*test_markers.py::test_budget*: @pytest.mark.budget: latency_p99_ms.max: "
            "must be greater than 0, got -1"
        ]
    )
    lab_dir.makepyfile(
        test_markers="""
        import pytest

        @pytest.mark.requires("flsh")
        def test_requires(board):
            pass
        """
    )
    result = lab_dir.runpytest("--collect-only", "test_markers.py")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*test_markers.py::test_requires*: @pytest.mark.requires: unknown capability 'flsh'*"]
    )


def test_a_value_inside_the_guard_band_passes_as_marginal_and_reaches_the_summary(lab_dir):
    """OpenHTF's marginal: inside the limit, within its guard band, a pass with a warning; past the limit a FAIL."""
    lab_dir.makepyfile(
        test_marginal="""
        import pytest
        from labbench.measure.record import Measurement, Provenance
        from labbench.measure.stats import latency_record

        def record(p50):
            return Measurement(board="esp32", model="m", latency=latency_record([p50] * 20, method="test"),
                               provenance=Provenance(board="esp32", family="esp32_devkitc", source="hw",
                                                     model_sha256="0" * 64, lab_sha256="0" * 64))

        @pytest.mark.budget(latency_p50_ms={"max": 2.0, "marginal_pct": 10})
        def test_inside_the_band(board, recorder):
            recorder.record(record(1.9))

        @pytest.mark.budget(latency_p50_ms={"max": 2.0, "marginal_pct": 10})
        def test_past_the_limit(board, recorder):
            recorder.record(record(2.1))
        """
    )
    result = lab_dir.runpytest(
        "--no-preflight", "--board", "esp32", "--journal", "j.jsonl", "test_marginal.py"
    )
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*labbench: MARGINAL: passed inside a budget's guard band*",
            "*test_inside_the_band*latency_p50_ms: measured 1.9 ms*vs budget max 2 ms (guard band 10%): MARGINAL",
        ]
    )
    assert (
        "test_past_the_limit[esp32]: latency_p50_ms" not in result.stdout.str().split("MARGINAL: passed")[1]
    )
