"""pytest plugin: `--labbench-gate BASELINE` runs the release gate over this run's measurements at the end.

The journal is the one the labbench plugin writes (`--journal PATH`, default reports/journal.jsonl
under the rootdir). Only measurements taken during this session count, and only of the boards
selected with --board (every board when none or `all`), so a runner attached to one board gates that
board. Budgets come from --lab (default lab.yaml at the rootdir, if there is one), checked as
`labbench lab check` checks it, a problem a usage error. The summary is printed and written
next to the journal (gate.md, gate.json); a non-zero gate code becomes the exit status when the
tests themselves passed. BASELINE is a file or a name under reports/baselines/ at the rootdir,
checked before any test runs.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from labbench import inventory
from labbench.errors import LabConfigError, UsageError
from labbench.gate import BASELINE_DIR, Baseline, GateResult, gate, load_baseline

_BASELINE = pytest.StashKey[Baseline]()
_LAB = pytest.StashKey[inventory.Lab | None]()
_START = pytest.StashKey[dt.datetime]()
_RESULT = pytest.StashKey[tuple[GateResult, Path]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("labbench", "hardware-in-the-loop bench").addoption(
        "--labbench-gate",
        metavar="BASELINE",
        default=None,
        help="after the run, gate its measurements against BASELINE (a file or a name in "
        f"{BASELINE_DIR}) and the lab's budgets; exit 1 on a failure or regression, 2 on missing data",
    )


def pytest_configure(config: pytest.Config) -> None:
    ref = config.getoption("labbench_gate")
    if ref is None:
        return
    given = config.getoption("lab", None)
    lab = Path(given or Path(config.rootpath) / "lab.yaml")
    try:  # checked and reported as the labbench plugin and `labbench lab check` do
        config.stash[_LAB] = inventory.load(lab, check_files=True) if given or lab.is_file() else None
    except (UsageError, LabConfigError) as exc:
        raise pytest.UsageError(str(exc)) from None
    try:
        config.stash[_BASELINE] = load_baseline(ref, Path(config.rootpath) / BASELINE_DIR)
    except UsageError as exc:
        raise pytest.UsageError(f"--labbench-gate: {exc}") from None


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_START] = dt.datetime.now(dt.UTC)


@pytest.hookimpl(trylast=True)  # after the other plugins have finished writing the journal
def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    if _BASELINE not in config.stash:
        return
    root = Path(config.rootpath)
    journal = Path(config.getoption("journal", None) or root / "reports" / "journal.jsonl")
    selected = config.getoption("board", None) or []
    result = gate(
        [journal],
        lab=config.stash[_LAB],
        baseline=config.stash[_BASELINE],
        boards=None if not selected or "all" in selected else selected,
        since=config.stash.get(_START, None),
    )
    result.write(journal.parent / "gate.md", journal.parent / "gate.json")
    config.stash[_RESULT] = result, journal.parent
    if result.exit_code and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = result.exit_code


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    if _RESULT not in config.stash:
        return
    result, where = config.stash[_RESULT]
    terminalreporter.write_sep("=", f"labbench gate: {result.status} (exit {result.exit_code})")
    terminalreporter.write_line(result.markdown())
    terminalreporter.write_line(f"gate summary: {where / 'gate.md'}, {where / 'gate.json'}")
