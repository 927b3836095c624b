"""Shared fixtures of the HIL suites: run settings, the payloads a board can hold, and one
install + measurement per (board, payload) per run, reused by every test that needs it.

Board I/O happens in fixtures (`outcome`, `default_outcome`, `installed`), each step through the
plugin's `recovery`: an infrastructure fault is then a setup ERROR after a bounded recovery, and a
board that still fails is quarantined for the rest of the run."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import pytest

from labbench.board import Board
from labbench.capabilities import DutIdentity, InstallRecord
from labbench.measure.run import Outcome, RunSettings, measure
from labbench.payloads import Payload, all_payloads
from labbench.pytest_plugin import Recovery

DEFAULT_PAYLOAD = "digits_mlp_int8"


@functools.cache
def payloads() -> dict[str, Payload]:
    """The payloads of this run, found once when a test first needs them (not at import: `--list-boards`
    and `--help` stay free of numpy and the runtimes)."""
    return all_payloads()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("labbench-hil", "HIL measurement settings")
    d = RunSettings()
    group.addoption("--window-s", type=float, default=d.window_s,
                    help=f"minimum length of an energy window (default {d.window_s:g} s, MLPerf Tiny's)")
    group.addoption("--windows", type=int, default=d.windows, help=f"energy windows per model, median taken (default {d.windows})")
    group.addoption("--latency-samples", type=int, default=d.latency_samples,
                    help=f"individually timed inferences for the latency distribution (default {d.latency_samples})")
    group.addoption("--accuracy-samples", type=int, default=d.accuracy_samples,
                    help=f"test-split samples for accuracy (default {d.accuracy_samples})")
    group.addoption("--idle-s", type=float, default=d.idle_s, help=f"idle baseline length (default {d.idle_s:g} s)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "payload" in metafunc.fixturenames:
        found = payloads()
        names = getattr(metafunc.function, "payloads", None) or list(found)
        metafunc.parametrize("payload", [found[n] for n in names if n in found], ids=lambda p: p.name,
                             scope="session")


@pytest.fixture(scope="session")
def run_settings(pytestconfig: pytest.Config) -> RunSettings:
    o = pytestconfig.getoption
    return RunSettings(latency_samples=o("latency_samples"), window_s=o("window_s"), windows=o("windows"),
                       idle_s=o("idle_s"), accuracy_samples=o("accuracy_samples"))


def not_deployable(board: Board, payload: Payload) -> str | None:
    """Why `payload` cannot go on `board` (the catalog's sizes), or None when it fits."""
    from labbench.modelinfo import min_arena_bytes

    why = board.family.fits(payload.info.size_bytes, min_arena_bytes(payload.path))
    return f"{payload.name} is not deployable on {board.name}: {why}" if why else None


class Bench:
    """Installs and measures each (board, payload) once per run; tests share the outcomes. Each step
    runs through `recovery` on behalf of the test `node` that needs it first."""

    def __init__(self, settings: RunSettings, build_dir: Path, say: Callable[[str], None], recovery: Recovery):
        self.settings, self.build_dir, self.say, self.recovery = settings, build_dir, say, recovery
        self.installed: dict[str, tuple[str, InstallRecord]] = {}  # board -> (payload it holds, its install)
        self.outcomes: dict[tuple[str, str], Outcome] = {}

    def install(self, node: pytest.Item, board: Board, payload: Payload) -> InstallRecord:
        """Make `payload` what the board runs (the driver skips bytes the board already holds)."""
        held = self.installed.get(board.name)
        if held is None or held[0] != payload.name:
            if (why := not_deployable(board, payload)):
                pytest.skip(why)
            self.say(f"  {board.name}: installing {payload.name}")
            record = self.recovery.run(node, board, f"install {payload.name}",
                                       lambda: board.install(payload.path, payload.dataset, self.build_dir))
            self.installed[board.name] = (payload.name, record)
        return self.installed[board.name][1]

    def measure(self, node: pytest.Item, board: Board, payload: Payload) -> Outcome:
        key = (board.name, payload.name)
        if key not in self.outcomes:
            record = self.install(node, board, payload)
            extra = {"install": record.provenance()}
            self.outcomes[key] = self.recovery.run(
                node, board, f"measure {payload.name}",
                lambda: measure(board, payload, self.settings, firmware_sha256=record.firmware_sha256, extra=extra,
                                progress=lambda step: self.say(f"  {board.name} / {payload.name}: {step}")))
        return self.outcomes[key]

    def identify(self, node: pytest.Item, board: Board) -> DutIdentity:
        return self.recovery.run(node, board, "identify", board.target.identify)


@pytest.fixture(scope="session")
def default_payload() -> Payload:
    """The payload every board can hold: the int8 digits classifier."""
    return payloads()[DEFAULT_PAYLOAD]


@pytest.fixture(scope="session")
def bench(run_settings: RunSettings, pytestconfig: pytest.Config, recovery: Recovery) -> Bench:
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")

    def say(line: str) -> None:
        """Progress of long measurements, shown past pytest's output capture (not with -q)."""
        if reporter is None or pytestconfig.getoption("verbose") < 0:
            return
        with capture.global_and_fixture_disabled():
            reporter.write_line(line, cyan=True)

    return Bench(run_settings, Path(pytestconfig.rootpath) / "build", say=say, recovery=recovery)


@pytest.fixture
def outcome(board: Board, payload: Payload, bench: Bench, request: pytest.FixtureRequest) -> Outcome:
    """(board, payload) installed and measured, in setup."""
    return bench.measure(request.node, board, payload)


@pytest.fixture
def default_outcome(board: Board, default_payload: Payload, bench: Bench, request: pytest.FixtureRequest) -> Outcome:
    """(board, the default payload) installed and measured, in setup."""
    return bench.measure(request.node, board, default_payload)


@pytest.fixture
def installed(board: Board, default_payload: Payload, bench: Bench,
              request: pytest.FixtureRequest) -> tuple[InstallRecord, DutIdentity]:
    """The default payload installed, with its install record and what the board then says it is."""
    record = bench.install(request.node, board, default_payload)
    return record, bench.identify(request.node, board)
