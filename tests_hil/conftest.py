"""What is specific to these HIL suites: their payloads (the fixtures' models and, beside the project,
the MLPerf Tiny ones) and the fixtures that ask the plugin's `bench` for a board's install and
measurement of them.

Board I/O happens in fixtures (`outcome`, `default_outcome`, `installed`), so an infrastructure fault
is a setup ERROR after the plugin's bounded recovery, and a board that still fails is quarantined
for the rest of the run."""

from __future__ import annotations

import functools

import pytest

from labbench.board import Board
from labbench.capabilities import DutIdentity, InstallRecord
from labbench.measure.run import Outcome
from labbench.payloads import Payload, all_payloads
from labbench.pytest_plugin import HilBench

DEFAULT_PAYLOAD = "digits_mlp_int8"


@functools.cache
def payloads() -> dict[str, Payload]:
    """The payloads of this run, found once when a test first needs them (not at import: `--list-boards`
    and `--help` stay free of numpy and the runtimes)."""
    return all_payloads()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "payload" in metafunc.fixturenames:
        found = payloads()
        names = getattr(metafunc.function, "payloads", None) or list(found)
        metafunc.parametrize(
            "payload", [found[n] for n in names if n in found], ids=lambda p: p.name, scope="session"
        )


@pytest.fixture(scope="session")
def found_payloads() -> dict[str, Payload]:
    """Every payload of this run, by name."""
    return payloads()


@pytest.fixture(scope="session")
def default_payload() -> Payload:
    """The payload every board can hold: the int8 digits classifier."""
    return payloads()[DEFAULT_PAYLOAD]


@pytest.fixture
def outcome(board: Board, payload: Payload, bench: HilBench, request: pytest.FixtureRequest) -> Outcome:
    """(board, payload) installed and measured, in setup."""
    return bench.measure(request.node, board, payload)


@pytest.fixture
def default_outcome(
    board: Board, default_payload: Payload, bench: HilBench, request: pytest.FixtureRequest
) -> Outcome:
    """(board, the default payload) installed and measured, in setup."""
    return bench.measure(request.node, board, default_payload)


@pytest.fixture
def installed(
    board: Board, default_payload: Payload, bench: HilBench, request: pytest.FixtureRequest
) -> tuple[InstallRecord, DutIdentity]:
    """The default payload installed, with its install record and what the board then says it is."""
    record = bench.install(request.node, board, default_payload)
    return record, bench.identify(request.node, board)
