"""The pytest plugin's options, fixture and markers, through pytest's own pytester."""

from __future__ import annotations

import textwrap

import pytest

pytest_plugins = ["pytester"]

# Hardware boards (no sim: blocks), so selecting them starts nothing; nothing here connects to them.
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
    result.stdout.fnmatch_lines(["boards in */lab.yaml:", "  esp32 * esp32_devkitc * /dev/ttyUSB7",
                                 "  pi * rpi4b * ssh://lab@10.9.9.10:22"])


def test_unknown_board_is_a_usage_error_listing_boards(lab_dir):
    result = lab_dir.runpytest("--board", "nosuch")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--board nosuch: no such board in */lab.yaml (boards: esp32, pi)*"])


def test_board_fixture_ids_and_requires(lab_dir):
    result = lab_dir.runpytest("--board", "all", "-v", "-rs")
    result.assert_outcomes(passed=4, skipped=2)
    result.stdout.fnmatch_lines_random([
        "*test_named?esp32? PASSED*", "*test_named?pi? PASSED*",
        "*pi lacks capability flash, power*", "*esp32 lacks capability deploy*"])


def test_without_board_tests_skip(lab_dir):
    result = lab_dir.runpytest("-rs")
    result.assert_outcomes(skipped=3)
    result.stdout.fnmatch_lines(["*no --board given*"])


def test_lab_option_and_bad_lab(lab_dir):
    lab_dir.makefile(".yaml", other=LAB.replace("family: rpi4b", "family: rpi4"))
    result = lab_dir.runpytest("--lab", "other.yaml", "--board", "pi")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(['*other.yaml:11: boards.pi.family: unknown family "rpi4"; did you mean "rpi4b"?*'])


def test_board_lock_excludes_a_second_holder(lab_dir):
    from labbench import inventory
    from labbench.board import Board
    from labbench.errors import BoardBusy

    lab = inventory.load(lab_dir.path / "lab.yaml")
    with Board(lab, "esp32"):
        with pytest.raises(BoardBusy, match=r"esp32: acquire: board is locked by pid \d+"):
            Board(lab, "esp32").acquire()
    Board(lab, "esp32").acquire().release()
