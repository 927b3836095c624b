"""Shared fixtures of the HIL suites: run settings, the payloads a board can hold, and one
install + measurement per (board, payload) per run, reused by every test that needs it.

Board I/O happens in fixtures (`outcome`, `default_outcome`, `installed`), each step through the
plugin's `recovery`: an infrastructure fault is then a setup ERROR after a bounded recovery, and a
board that still fails is quarantined for the rest of the run."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from labbench.bench import Bench, NotDeployable, StepRunner
from labbench.board import Board
from labbench.capabilities import DutIdentity, InstallRecord
from labbench.errors import UsageError
from labbench.measure.run import Outcome, RunSettings
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
    for option, name, kind, default, text in RunSettings.options():
        group.addoption(option, dest=name, type=kind, default=default, help=text)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "payload" in metafunc.fixturenames:
        found = payloads()
        names = getattr(metafunc.function, "payloads", None) or list(found)
        metafunc.parametrize("payload", [found[n] for n in names if n in found], ids=lambda p: p.name,
                             scope="session")


def pytest_configure(config: pytest.Config) -> None:
    """Bad settings are a usage error before anything runs."""
    try:
        RunSettings.from_options(config.getoption)
    except UsageError as exc:
        raise pytest.UsageError(str(exc)) from None


@pytest.fixture(scope="session")
def run_settings(pytestconfig: pytest.Config) -> RunSettings:
    return RunSettings.from_options(pytestconfig.getoption)


class Steps:
    """The library's Bench, each board step run through the plugin's `recovery` on behalf of the test
    `node` that needs it first; a payload that cannot fit the board skips the test."""

    def __init__(self, bench: Bench, recovery: Recovery):
        self.bench, self.recovery = bench, recovery

    def _runner(self, node: pytest.Item) -> StepRunner:
        return lambda board, step, fn: self.recovery.run(node, board, step, fn)

    def install(self, node: pytest.Item, board: Board, payload: Payload) -> InstallRecord:
        try:
            return self.bench.install(board, payload, self._runner(node))
        except NotDeployable as exc:
            pytest.skip(str(exc))

    def measure(self, node: pytest.Item, board: Board, payload: Payload) -> Outcome:
        try:
            return self.bench.measure(board, payload, self._runner(node))
        except NotDeployable as exc:
            pytest.skip(str(exc))

    def identify(self, node: pytest.Item, board: Board) -> DutIdentity:
        return self.bench.identify(board, self._runner(node))


@pytest.fixture(scope="session")
def default_payload() -> Payload:
    """The payload every board can hold: the int8 digits classifier."""
    return payloads()[DEFAULT_PAYLOAD]


@pytest.fixture(scope="session")
def bench(run_settings: RunSettings, pytestconfig: pytest.Config, recovery: Recovery) -> Steps:
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")

    def say(line: str) -> None:
        """Progress of long measurements, shown past pytest's output capture (not with -q)."""
        if reporter is None or pytestconfig.getoption("verbose") < 0:
            return
        with capture.global_and_fixture_disabled():
            reporter.write_line(line, cyan=True)

    return Steps(Bench(run_settings, Path(pytestconfig.rootpath) / "build", say=say), recovery)


@pytest.fixture
def outcome(board: Board, payload: Payload, bench: Steps, request: pytest.FixtureRequest) -> Outcome:
    """(board, payload) installed and measured, in setup."""
    return bench.measure(request.node, board, payload)


@pytest.fixture
def default_outcome(board: Board, default_payload: Payload, bench: Steps, request: pytest.FixtureRequest) -> Outcome:
    """(board, the default payload) installed and measured, in setup."""
    return bench.measure(request.node, board, default_payload)


@pytest.fixture
def installed(board: Board, default_payload: Payload, bench: Steps,
              request: pytest.FixtureRequest) -> tuple[InstallRecord, DutIdentity]:
    """The default payload installed, with its install record and what the board then says it is."""
    record = bench.install(request.node, board, default_payload)
    return record, bench.identify(request.node, board)
