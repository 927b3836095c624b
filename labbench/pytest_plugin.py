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

_LAB = pytest.StashKey[inventory.Lab]()
_SELECTED = pytest.StashKey[list[str]]()
_STARTED_SIM = pytest.StashKey[bool]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("labbench", "hardware-in-the-loop bench")
    group.addoption("--lab", type=Path, default=None, help="lab inventory (default: lab.yaml at the rootdir)")
    group.addoption("--board", action="append", default=[], metavar="NAME",
                    help="board to test (repeatable); 'all' selects every board of the lab")
    group.addoption("--list-boards", action="store_true", help="list the lab's boards and exit")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "requires(*capabilities): skip boards lacking any of "
                            f"the capabilities ({', '.join(CAPABILITIES)})")
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
    if "board" not in metafunc.fixturenames:
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
