"""pytest plugin: `--lab`, `--board`, `--list-boards`, the `board` fixture and the `requires` marker.

Installed through the `pytest11` entry point, so it works from any test folder. It does nothing
unless a test asks for `board` or `--board` / `--list-boards` is given.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from labbench import inventory
from labbench.board import Board
from labbench.capabilities import CAPABILITIES
from labbench.errors import LabConfigError, UsageError
from labbench.measure.record import Measurement
from labbench.results import Journal

_LAB = pytest.StashKey[inventory.Lab]()
_SELECTED = pytest.StashKey[list[str]]()
_STARTED_SIM = pytest.StashKey[bool]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("labbench", "hardware-in-the-loop bench")
    group.addoption("--lab", type=Path, default=None, help="lab inventory (default: lab.yaml at the rootdir)")
    group.addoption("--board", action="append", default=[], metavar="NAME",
                    help="board to test (repeatable); 'all' selects every board of the lab")
    group.addoption("--list-boards", action="store_true", help="list the lab's boards and exit")
    group.addoption("--journal", type=Path, default=Path("reports/journal.jsonl"),
                    help="results journal to append measurements to (default reports/journal.jsonl)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "requires(*capabilities): skip boards lacking any of "
                            f"the capabilities ({', '.join(CAPABILITIES)})")
    config.addinivalue_line("markers", "budget(**limits): budget for the measurement this test records, "
                            "e.g. latency_p99_ms=5, energy_mj=0.5, accuracy=0.95, arena_kib=8; "
                            "tighter than and merged over lab.yaml's")
    names: list[str] = config.getoption("board")
    if not names and not config.getoption("list_boards"):
        return
    lab = _load_lab(config)
    config.stash[_LAB] = lab
    selected = list(lab.boards) if "all" in names else list(dict.fromkeys(names))
    missing = [n for n in selected if n not in lab.boards]
    if missing:
        raise pytest.UsageError(
            f"--board {missing[0]}: no such board in {lab.path} (boards: {', '.join(lab.boards)})")
    config.stash[_SELECTED] = selected


def _load_lab(config: pytest.Config) -> inventory.Lab:
    path = config.getoption("lab") or Path(config.rootpath) / "lab.yaml"
    try:
        return inventory.load(path)
    except LabConfigError as exc:
        raise pytest.UsageError(str(exc)) from None


def pytest_cmdline_main(config: pytest.Config) -> int | None:
    if not config.getoption("list_boards"):
        return None
    lab = _load_lab(config)
    print(f"boards in {lab.path}:")
    for b in lab.boards.values():
        link = b.serial.url if b.serial else f"ssh://{b.ssh.user}@{b.ssh.host}:{b.ssh.port}"
        print(f"  {b.name:<14} {b.family:<24} {link}{'  (sim)' if b.simulated else ''}")
    return 0


def pytest_sessionstart(session: pytest.Session) -> None:
    """Bring the simulated lab up when a selected board is simulated and it is not up yet."""
    config = session.config
    if not config.stash.get(_SELECTED, None):
        return
    lab = config.stash[_LAB]
    if not any(lab.boards[n].simulated for n in config.stash[_SELECTED]):
        return
    from labbench.sim import lab as simlab

    config.stash[_STARTED_SIM] = simlab.status(lab) is None
    if config.stash[_STARTED_SIM]:
        simlab.up(lab)


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    if config.stash.get(_STARTED_SIM, False):
        from labbench.sim import lab as simlab

        simlab.down(config.stash[_LAB])


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    defs = metafunc._arg2fixturedefs.get("board")
    if not defs or defs[-1].func.__module__ != __name__:  # a test suite's own `board` fixture
        return
    selected = metafunc.config.stash.get(_SELECTED, [])
    metafunc.parametrize("board", selected or [None], indirect=True, scope="session",
                         ids=selected or ["no-board"])


@pytest.fixture(scope="session")
def lab(pytestconfig: pytest.Config) -> inventory.Lab:
    if _LAB not in pytestconfig.stash:
        pytest.skip("no --board given: this test needs a lab board")
    return pytestconfig.stash[_LAB]


@pytest.fixture(scope="session")
def board(request: pytest.FixtureRequest) -> Board:
    """The board under test, locked for the whole run so no other job can use it."""
    if request.param is None:
        pytest.skip("no --board given (try --board esp32, or --list-boards)")
    b = Board(request.config.stash[_LAB], request.param)
    b.acquire()
    request.addfinalizer(b.release)
    return b


@pytest.fixture(autouse=True)
def _requires(request: pytest.FixtureRequest) -> None:
    marker = request.node.get_closest_marker("requires")
    if marker is None or "board" not in request.fixturenames:
        return
    unknown = [c for c in marker.args if c not in CAPABILITIES]
    if unknown:
        raise UsageError(f"@pytest.mark.requires: unknown capability {unknown[0]!r} "
                         f"(known: {', '.join(CAPABILITIES)})")
    b: Board = request.getfixturevalue("board")
    lacking = [c for c in marker.args if c not in b.capabilities]
    if lacking:
        pytest.skip(f"{b.name} lacks capability {', '.join(lacking)}")


class Recorder:
    """Journals a measurement at once, attaches it to the reports, then judges it against its budget."""

    def __init__(self, request: pytest.FixtureRequest, journal: Journal):
        self.request, self.journal = request, journal

    def budget(self, board: str, model: str) -> inventory.ModelBudget | None:
        """lab.yaml's budget for (board, model) with the test's `@pytest.mark.budget` limits over it."""
        lab = self.request.config.stash[_LAB]
        base = lab.budget(board, model)
        marker = self.request.node.get_closest_marker("budget")
        if marker is None:
            return base
        merged = {**(base.model_dump(exclude_none=True) if base else {}), **marker.kwargs}
        return inventory.ModelBudget.model_validate(merged)

    def record(self, m: Measurement, html_parts: list[str] = ()) -> list:
        from labbench.budgets import Verdict, judge
        from labbench.report import extras

        m = m.model_copy(update={"test": self.request.node.nodeid})
        self.journal.append(m)  # first, so no verdict or report failure can lose it
        node = self.request.node
        for key in ("board", "model"):
            node.user_properties.append((key, getattr(m, key)))
        for key, value in m.provenance.model_dump().items():
            node.user_properties.append((f"provenance.{key}", value))
        budget = self.budget(m.board, m.model)
        judgements = judge(m, budget) if budget else []
        for j in judgements:
            node.user_properties.append((f"verdict.{j.metric}", j.verdict.value))
        add_report_html(node, extras.measurement_table(m))
        if judgements:
            add_report_html(node, extras.verdict_table(judgements))
        for part in html_parts:
            add_report_html(node, part)
        failed = [j for j in judgements if j.verdict in (Verdict.FAIL, Verdict.MISSING)]
        if failed:
            pytest.fail(f"{m.board} / {m.model}: budget not met:\n" + "\n".join(f"  {j}" for j in failed),
                        pytrace=False)
        return judgements


_EXTRAS = pytest.StashKey[list]()


def add_report_html(node: pytest.Item, html: str) -> None:
    """Show `html` under the test in the pytest-html report."""
    node.stash.setdefault(_EXTRAS, []).append(html)


@pytest.fixture(scope="session")
def journal(pytestconfig: pytest.Config) -> Journal:
    return Journal(pytestconfig.getoption("journal"))


@pytest.fixture
def recorder(request: pytest.FixtureRequest, journal: Journal) -> Recorder:
    """`recorder.record(measurement)`: journal, report and judge one measurement."""
    return Recorder(request, journal)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    parts = item.stash.get(_EXTRAS, None)
    if parts and report.when == "call":
        try:
            from pytest_html import extras as html_extras
        except ImportError:
            return report
        report.extras = [*getattr(report, "extras", []), *(html_extras.html(p) for p in parts)]
    return report
