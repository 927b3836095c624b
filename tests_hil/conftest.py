"""Shared fixtures of the HIL suites: run settings, the payloads a board can hold, and one
install + measurement per (board, payload) per run, reused by every test that needs it."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from labbench.board import Board
from labbench.measure.run import Outcome, RunSettings, measure
from labbench.modelinfo import min_arena_bytes
from labbench.payloads import Payload, all_payloads

PAYLOADS = all_payloads()
DEFAULT_PAYLOAD = "digits_mlp_int8"


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
        names = getattr(metafunc.function, "payloads", None) or list(PAYLOADS)
        metafunc.parametrize("payload", [PAYLOADS[n] for n in names if n in PAYLOADS], ids=lambda p: p.name,
                             scope="session")


@pytest.fixture(scope="session")
def run_settings(pytestconfig: pytest.Config) -> RunSettings:
    o = pytestconfig.getoption
    return RunSettings(latency_samples=o("latency_samples"), window_s=o("window_s"), windows=o("windows"),
                       idle_s=o("idle_s"), accuracy_samples=o("accuracy_samples"))


def not_deployable(board: Board, payload: Payload) -> str | None:
    """Why `payload` cannot go on `board` (the catalog's sizes), or None when it fits."""
    why = board.family.fits(payload.info.size_bytes, min_arena_bytes(payload.path))
    return f"{payload.name} is not deployable on {board.name}: {why}" if why else None


class Bench:
    """Installs and measures each (board, payload) once per run; tests share the outcomes."""

    def __init__(self, settings: RunSettings, build_dir: Path, say: Callable[[str], None]):
        self.settings, self.build_dir, self.say = settings, build_dir, say
        self.installed: dict[str, tuple[str, dict]] = {}  # board -> (payload it holds, install record)
        self.outcomes: dict[tuple[str, str], Outcome] = {}

    def install(self, board: Board, payload: Payload) -> dict:
        """Make `payload` what the board runs (the driver skips bytes the board already holds)."""
        held = self.installed.get(board.name)
        if held is None or held[0] != payload.name:
            if (why := not_deployable(board, payload)):
                pytest.skip(why)
            self.say(f"  {board.name}: installing {payload.name}")
            self.installed[board.name] = (payload.name, board.install(payload.path, payload.dataset, self.build_dir))
        return self.installed[board.name][1]

    def measure(self, board: Board, payload: Payload) -> Outcome:
        key = (board.name, payload.name)
        if key not in self.outcomes:
            record = self.install(board, payload)
            self.outcomes[key] = measure(board, payload, self.settings,
                                         progress=lambda step: self.say(f"  {board.name} / {payload.name}: {step}"),
                                         firmware_sha256=record.get("image_sha256") or record.get("sha256"),
                                         extra={"install": {k: v for k, v in record.items()
                                                            if isinstance(v, (str, int, float, bool))}})
        return self.outcomes[key]


@pytest.fixture(scope="session")
def default_payload() -> Payload:
    """The payload every board can hold: the int8 digits classifier."""
    return PAYLOADS[DEFAULT_PAYLOAD]


@pytest.fixture(scope="session")
def bench(run_settings: RunSettings, pytestconfig: pytest.Config) -> Bench:
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")

    def say(line: str) -> None:
        """Progress of long measurements, shown past pytest's output capture (not with -q)."""
        if reporter is None or pytestconfig.getoption("verbose") < 0:
            return
        with capture.global_and_fixture_disabled():
            reporter.write_line(line, cyan=True)

    return Bench(run_settings, Path(pytestconfig.rootpath) / "build", say=say)
