"""pytest plugin: `--lab`, `--board`, `--list-boards`, `--retries`, the measurement settings (one option
per field of labbench.measure.run.RunSettings), the `board`, `bench`, `run_settings`, `recorder` and
`recovery` fixtures, the `requires` and `budget` markers, and each test's step timeline.

A suite brings its payloads and asks `bench` for the board's install and measurement: each (board,
payload) is installed and measured once per run (labbench.bench), shared by the tests that need it.

Installed through the `pytest11` entry point, so it works from any test folder. It does nothing
unless a test asks for `board` or `--board` / `--list-boards` is given.

Infrastructure faults are errors, never failures: suites do a board's I/O (install, measure) in
fixtures through `recovery.run(...)`, so a HardwareError is raised in setup and pytest reports an
ERROR (JUnit `<error>`); only a budget verdict (`recorder.record`) fails a test. A failed step gets
a bounded recovery (`--retries N`: reset or reconnect, then the step again), each attempt journalled
and reported; a board that still fails (or whose lock is held) is quarantined: its later tests are
skipped with the reason, while the other boards' tests go on.

Before any board is touched, pre-flight (labbench.preflight; `--no-preflight` skips it) checks that
the journal, `--html` and `--junitxml` paths can be written and that the boards and their instruments
answer, and stops the session in seconds listing every problem. A record the journal cannot take
(a full disk, an I/O error) is kept in the test's JUnit properties and HTML report, and the test is
an ERROR at teardown naming the journal.

No credential reaches the HTML report, JUnit or the terminal (labbench.redact): every report is
redacted before they read it (traceback, captured output and logs, properties, HTML extras), and so
are the environment table, the results table's cells and the summary.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from labbench import inventory, steps
from labbench.bench import Bench, NotDeployable, StepRunner
from labbench.board import Board
from labbench.capabilities import (
    CAPABILITIES,
    Closable,
    DutIdentity,
    InstallRecord,
    Reconnectable,
    Resettable,
    Resyncable,
)
from labbench.errors import HardwareError, LabConfigError, UsageError
from labbench.measure.record import Measurement
from labbench.measure.run import Outcome, RunSettings
from labbench.payloads import Payload
from labbench.results import Journal, JournalError

if TYPE_CHECKING:
    from labbench.budgets import Judgement
    from labbench.preflight import Result
    from labbench.strategies.run import Study

STEP_LOG_DIR = Path("reports/logs")  # <board>-steps.log, beside the drivers' serial and SSH logs
_LAB = pytest.StashKey[inventory.Lab]()
_SELECTED = pytest.StashKey[list[str]]()
_STARTED_SIM = pytest.StashKey[bool]()
_RECOVERY = pytest.StashKey["Recovery"]()
_PREFLIGHT = pytest.StashKey[list["Result"]]()  # the pre-flight Results that passed
_UNJOURNALED = pytest.StashKey[list[JournalError]]()  # an item's records the journal refused
_UNJOURNALED_RUN = pytest.StashKey[list[str]]()  # the session's, for the terminal summary
_MARGINAL_RUN = pytest.StashKey[list[str]]()  # passes inside a budget's guard band, for the summary
_STEPS_FROM = pytest.StashKey[int]()  # steps.count() when an item's setup began
_STEP_LOGS = pytest.StashKey[steps.BoardLogFiles]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("labbench", "hardware-in-the-loop bench")
    group.addoption("--lab", type=Path, default=None, help="lab inventory (default: lab.yaml at the rootdir)")
    group.addoption(
        "--board",
        action="append",
        default=[],
        metavar="NAME",
        help="board to test (repeatable); 'all' selects every board of the lab",
    )
    group.addoption("--list-boards", action="store_true", help="list the lab's boards and exit")
    group.addoption(
        "--journal",
        type=Path,
        default=Path("reports/journal.jsonl"),
        help="results journal to append measurements, attempts and quarantines to "
        "(default reports/journal.jsonl)",
    )
    group.addoption(
        "--retries",
        type=int,
        default=1,
        metavar="N",
        help="after an infrastructure error, reset or reconnect the board and retry the step up "
        "to N times; a board that still fails is quarantined for the rest of the run (default 1)",
    )
    group.addoption(
        "--no-preflight",
        action="store_true",
        help="skip the pre-flight checks made before any board is touched (output paths "
        "writable with free space, boards reachable, instruments answering *IDN?)",
    )
    hil = parser.getgroup("labbench-hil", "HIL measurement settings")
    for option, name, kind, default, text in RunSettings.options():
        hil.addoption(option, dest=name, type=kind, default=default, help=text)


@pytest.hookimpl(tryfirst=True)  # pre-flight on the outputs before pytest-html writes its assets
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"requires(*capabilities): skip boards lacking any of the capabilities ({', '.join(CAPABILITIES)})",
    )
    config.addinivalue_line(
        "markers",
        "strategies: the seed paper's strategy study (on-device, HI, remote; long): run only when "
        "-m selects it (`-m strategies`)",
    )
    config.addinivalue_line(
        "markers",
        "budget(**limits): budget for the measurement this test records, "
        "e.g. latency_p99_ms=5, energy_mj=0.5, accuracy=0.95, arena_kib=8; "
        "tighter than and merged over lab.yaml's",
    )
    if config.getoption("retries") < 0:
        raise pytest.UsageError(f"--retries {config.getoption('retries')}: must be 0 or more")
    try:
        RunSettings.from_options(config.getoption)
    except UsageError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[_RECOVERY] = Recovery(config.getoption("journal"), config.getoption("retries"))
    names: list[str] = config.getoption("board")
    if not names and not config.getoption("list_boards"):
        if config.getoption("lab") is not None:
            _load_lab(config)  # a lab named on the command line is checked even when no board is selected
        return
    lab = _load_lab(config)
    config.stash[_LAB] = lab
    selected = list(lab.boards) if "all" in names else list(dict.fromkeys(names))
    missing = [n for n in selected if n not in lab.boards]
    if missing:
        raise pytest.UsageError(
            f"--board {missing[0]}: no such board in {lab.path} (boards: {', '.join(lab.boards)})"
        )
    config.stash[_SELECTED] = selected
    handler = config.stash[_STEP_LOGS] = steps.BoardLogFiles(STEP_LOG_DIR)
    steps.log.addHandler(handler)
    steps.log.setLevel(logging.INFO)
    if _preflight_wanted(config):
        outputs = [("journal", Path(config.getoption("journal")))]
        for what, option in (("--html", "htmlpath"), ("--junitxml", "xmlpath")):
            if value := config.getoption(option, None):
                outputs.append((what, Path(os.path.expandvars(value)).expanduser()))
        _preflight(config, outputs, [])


def _load_lab(config: pytest.Config) -> inventory.Lab:
    path = config.getoption("lab") or Path(config.rootpath) / "lab.yaml"
    try:
        return inventory.load(path, check_files=True)
    except (LabConfigError, UsageError) as exc:
        raise pytest.UsageError(str(exc)) from None


def pytest_cmdline_main(config: pytest.Config) -> int | None:
    if not config.getoption("list_boards"):
        return None
    lab = _load_lab(config)
    print(f"boards in {lab.path}:")
    for b in lab.boards.values():
        if b.serial:
            link = b.serial.url
        else:
            assert b.ssh is not None  # lab.yaml gives a board exactly one of serial: and ssh:
            link = f"ssh://{b.ssh.user}@{b.ssh.host}:{b.ssh.port}"
        print(f"  {b.name:<14} {b.family:<24} {link}{'  (sim)' if b.simulated else ''}")
    return 0


def pytest_sessionstart(session: pytest.Session) -> None:
    """Bring the simulated lab up when a selected board is simulated and it is not up yet, then run
    pre-flight."""
    config = session.config
    if not config.stash.get(_SELECTED, None):
        return
    lab = config.stash[_LAB]
    if any(lab.boards[n].simulated for n in config.stash[_SELECTED]):
        from labbench.sim import lab as simlab

        config.stash[_STARTED_SIM] = simlab.status(lab) is None
        if config.stash[_STARTED_SIM]:
            simlab.up(lab)
    if _preflight_wanted(config):
        _preflight(config, [], config.stash[_SELECTED])


def _preflight_wanted(config: pytest.Config) -> bool:
    return bool(config.stash.get(_SELECTED, None)) and not (
        config.getoption("no_preflight") or config.option.collectonly
    )


def _preflight(config: pytest.Config, outputs: list[tuple[str, Path]], boards: list[str]) -> None:
    """labbench.preflight on output paths (at configure) or boards (at session start, once the simulated
    lab is up); a UsageError listing every problem."""
    from labbench import preflight

    result = preflight.check(outputs, config.stash[_LAB], boards)
    if result.problems:
        _sim_down(config)  # the session ends here: pytest_sessionfinish will not run
        raise pytest.UsageError(
            f"labbench pre-flight found {len(result.problems)} problem(s) in {result.seconds:.1f} s, before "
            "any board was flashed or measured (--no-preflight skips the checks):\n"
            + "\n".join(f"  {p}" for p in result.problems)
        )
    config.stash.setdefault(_PREFLIGHT, []).append(result)


def pytest_report_header(config: pytest.Config) -> str | None:
    if not (results := config.stash.get(_PREFLIGHT, None)):
        return None
    seconds, passed = sum(r.seconds for r in results), "; ".join(p for r in results for p in r.passed)
    return f"labbench pre-flight passed in {seconds:.1f} s: {passed}"


def pytest_sessionfinish(session: pytest.Session) -> None:
    _sim_down(session.config)


def pytest_unconfigure(config: pytest.Config) -> None:
    if (handler := config.stash.get(_STEP_LOGS, None)) is not None:
        steps.log.removeHandler(handler)
        handler.close()


def _sim_down(config: pytest.Config) -> None:
    """Stop the simulated lab if this session started it."""
    if config.stash.get(_STARTED_SIM, False):
        from labbench.sim import lab as simlab

        simlab.down(config.stash[_LAB])


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Each test using `board` runs once per selected board (unless it parametrizes `board` itself)."""
    if "board" not in metafunc.fixturenames or any(
        "board" in _names(m.args[0]) for m in metafunc.definition.iter_markers("parametrize") if m.args
    ):
        return
    selected = metafunc.config.stash.get(_SELECTED, [])
    metafunc.parametrize(
        "board", selected or [None], indirect=True, scope="session", ids=selected or ["no-board"]
    )


def _names(argnames: str | list[str] | tuple[str, ...]) -> list[str]:
    return [n.strip() for n in argnames.split(",")] if isinstance(argnames, str) else list(argnames)


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
    b.acquire()  # BoardBusy quarantines the board at once (pytest_runtest_makereport): no use retrying
    request.addfinalizer(b.release)
    return b


def recover(board: Board, exc: Exception) -> str:
    """Bring `board` back before a failed step is tried again; returns what was done (a HardwareError
    if that failed). The power meter is reconnected after an instrument fault; a serial board is
    reset through its DUT port where the port can reset it (lab.yaml `reset: rts`), else its link is
    brought back in step (`resync`: reopened, drained, identified); after a flash fault only the port
    is closed (the flasher resets the chip); an SSH board is reconnected."""
    from labbench.errors import FlashError, InstrumentError, RunAborted

    done = []
    if isinstance(exc, (InstrumentError, RunAborted)) and "power" in board.capabilities:
        board.power_meter.close()
        board.power_meter.open()
        done.append("power meter reconnected")
    target = board.target
    driver = type(target).__name__
    if not isinstance(target, Closable):
        raise UsageError(f"{board.name}: its driver {driver} cannot close its connection to recover")
    target.close()
    if "deploy" in board.capabilities:
        if not isinstance(target, Reconnectable):
            raise UsageError(f"{board.name}: its driver {driver} cannot reconnect to recover")
        target.connect()
        done.append("reconnected")
    elif isinstance(exc, FlashError):
        done.append("serial port closed")
    elif board.entry.serial is not None and board.entry.serial.reset == "rts":
        if not isinstance(target, Resettable):
            raise UsageError(f"{board.name}: reset: rts, but its driver {driver} cannot reset the board")
        target.reset()
        done.append("reset")
    else:
        if not isinstance(target, Resyncable):
            raise UsageError(f"{board.name}: its driver {driver} cannot resync its link to recover")
        target.resync()
        done.append("resynced")
    return ", ".join(done)


class Recovery:
    """Runs board steps with bounded recovery, and quarantines a board whose step still fails.

    `run(node, board, step, fn)` calls `fn`. After a HardwareError it journals the attempt (and the
    partial measurement the error kept, `.partial`), recovers the board (`recover`) and calls `fn`
    again, at most `retries` times; each attempt also goes to the test's report and JUnit properties.
    When the step still fails, or the recovery itself does, the board is quarantined and the error
    propagates: raised in a fixture, it makes the test an ERROR."""

    def __init__(self, journal: Path, retries: int):
        self.journal_path, self.retries = journal, retries
        self.quarantined: dict[str, str] = {}  # board -> why
        self.recovered: list[str] = []  # steps that passed after a retry

    def run(self, node: pytest.Item, board: Board, step: str, fn: Callable[[], Any]) -> Any:
        from labbench.errors import HardwareError
        from labbench.measure.record import Event

        if board.name in self.quarantined:
            pytest.skip(self.quarantined[board.name])
        attempts, attempt = self.retries + 1, 1
        while True:
            try:
                with steps.step(board.name, step, f"attempt {attempt} of {attempts}"):
                    result = fn()
            except HardwareError as exc:
                self._keep_partial(node, exc)
                recovered, recovery = attempt < attempts, None
                if recovered:
                    try:
                        with steps.step(board.name, "recover", f"after {type(exc).__name__}"):
                            recovery = recover(board, exc)
                    except HardwareError as failed:
                        recovered, recovery = False, f"recovery failed: {failed}"
                self._attempt(
                    node,
                    Event(
                        kind="attempt",
                        test=node.nodeid,
                        board=board.name,
                        step=step,
                        error=f"{type(exc).__name__}: {exc}",
                        attempt=attempt,
                        attempts=attempts,
                        recovery=recovery,
                    ),
                )
                if not recovered:
                    self.quarantine(node, board.name, step, exc)
                    raise
                attempt += 1
                continue
            if attempt > 1:
                self._attempt(
                    node,
                    Event(
                        kind="attempt",
                        test=node.nodeid,
                        board=board.name,
                        step=step,
                        attempt=attempt,
                        attempts=attempts,
                    ),
                )
                self.recovered.append(
                    f"{board.name}: {step} passed at attempt {attempt} of {attempts} ({node.nodeid})"
                )
            return result

    def quarantine(self, node: pytest.Item, board: str, step: str, exc: BaseException) -> None:
        """Skip `board`'s remaining tests, saying why; journal and report it."""
        from labbench.measure.record import Event
        from labbench.report import extras

        reason = f"board {board} quarantined after {type(exc).__name__}: {exc} at {node.nodeid}"
        self.quarantined[board] = reason
        error = f"{type(exc).__name__}: {exc}"
        journal_record(
            node,
            Journal(self.journal_path),
            Event(kind="quarantine", test=node.nodeid, board=board, step=step, error=error),
        )
        node.user_properties.append(("quarantined", reason))
        add_report_html(node, extras.quarantine_html(reason))

    def _attempt(self, node: pytest.Item, event: Any) -> None:
        from labbench.report import extras

        journal_record(node, Journal(self.journal_path), event)
        outcome = event.error or "passed"
        node.user_properties.append(
            (
                f"attempt.{event.step}.{event.attempt}",
                outcome + (f"; then {event.recovery}" if event.recovery else ""),
            )
        )
        add_report_html(node, extras.attempt_html(event))

    def _keep_partial(self, node: pytest.Item, exc: HardwareError) -> None:
        """Journal and report what the failed step measured before the fault; it is never judged."""
        from labbench.report import extras

        m = exc.partial
        if isinstance(m, Measurement):
            m = m.model_copy(update={"test": node.nodeid})
            journal_record(node, Journal(self.journal_path), m)
            add_report_html(node, extras.measurement_table(m))


@pytest.fixture(scope="session")
def recovery(pytestconfig: pytest.Config) -> Recovery:
    """`recovery.run(request.node, board, step, fn)`: a board step with bounded recovery and quarantine."""
    return pytestconfig.stash[_RECOVERY]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip, before any fixture runs, the tests of a board quarantined earlier in the session; mark
    where the test's steps begin (its timeline)."""
    item.stash[_STEPS_FROM] = steps.count()
    quarantined = item.config.stash[_RECOVERY].quarantined
    if (name := _board_of(item)) in quarantined:
        pytest.skip(quarantined[name])


def _board_of(item: pytest.Item) -> str | None:
    """The board a test is parametrized with, if any."""
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("board") if callspec else None


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    recovery = config.stash[_RECOVERY]
    if recovery.recovered:
        terminalreporter.write_sep("=", "labbench: steps recovered after a retry", yellow=True)
        for line in recovery.recovered:
            terminalreporter.write_line(line)
    if recovery.quarantined:
        terminalreporter.write_sep("=", "labbench: quarantined boards", red=True)
        for reason in recovery.quarantined.values():
            terminalreporter.write_line(reason)
    if marginal := config.stash.get(_MARGINAL_RUN, None):
        terminalreporter.write_sep(
            "=", "labbench: MARGINAL: passed inside a budget's guard band", yellow=True
        )
        for line in marginal:
            terminalreporter.write_line(line)
    if unjournaled := config.stash.get(_UNJOURNALED_RUN, None):
        terminalreporter.write_sep(
            "=",
            "labbench: records NOT journaled (kept in the JUnit property 'unjournaled' and the HTML report)",
            red=True,
        )
        for line in unjournaled:
            terminalreporter.write_line(line)


@pytest.hookimpl(optionalhook=True, trylast=True)  # last: what other plugins add is redacted too
def pytest_html_results_summary(
    prefix: list[object], summary: list[object], postfix: list[object], session: pytest.Session
) -> None:
    import html

    from labbench.redact import redact_html

    for reason in session.config.stash[_RECOVERY].quarantined.values():
        prefix.append(f"<p style='color:#c33'><b>{html.escape(reason)}</b></p>")
    for part in (prefix, summary, postfix):
        part[:] = [redact_html(str(p)) for p in part]


@pytest.hookimpl(optionalhook=True, trylast=True)
def pytest_html_results_table_row(report: pytest.TestReport, cells: list[object]) -> None:
    """The results table's cells (the test id: a parameter may hold a URL)."""
    from labbench.redact import redact_html

    cells[:] = [redact_html(str(c)) for c in cells]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Bad `requires` and `budget` marker arguments are a usage error at collection, not at run time.
    The strategy study runs only when `-m` names it: a plain HIL run stays a budget run."""
    from pydantic import ValidationError

    if "strategies" not in (config.getoption("markexpr") or ""):
        study = [item for item in items if item.get_closest_marker("strategies")]
        if study:
            config.hook.pytest_deselected(items=study)
            items[:] = [item for item in items if not item.get_closest_marker("strategies")]

    for item in items:
        for marker in item.iter_markers("requires"):
            if unknown := [c for c in marker.args if c not in CAPABILITIES]:
                raise pytest.UsageError(
                    f"{item.nodeid}: @pytest.mark.requires: unknown capability "
                    f"{unknown[0]!r} (known: {', '.join(CAPABILITIES)})"
                )
        for marker in item.iter_markers("budget"):
            try:
                inventory.ModelBudget.model_validate(marker.kwargs)
            except ValidationError as exc:
                problems = "; ".join(
                    f"{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}"
                    for e in exc.errors()
                )
                raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.budget: {problems}") from None


@pytest.fixture(autouse=True)
def _requires(request: pytest.FixtureRequest) -> None:
    marker = request.node.get_closest_marker("requires")
    if marker is None or "board" not in request.fixturenames:
        return
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

    def record(self, m: Measurement, html_parts: Sequence[str] = ()) -> list[Judgement]:
        from labbench.budgets import Verdict, judge
        from labbench.report import extras

        if m.status != "valid":
            raise UsageError(
                f"{m.board} / {m.model}: a partial record (cut short by {m.error}) is never judged"
            )
        m = m.model_copy(update={"test": self.request.node.nodeid})
        node = self.request.node
        journal_record(node, self.journal, m)  # first, so no verdict or report failure can lose it
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
        if marginal := [j for j in judgements if j.verdict is Verdict.MARGINAL]:
            node.config.stash.setdefault(_MARGINAL_RUN, []).extend(f"{node.nodeid}: {j}" for j in marginal)
        failed = [j for j in judgements if j.verdict in (Verdict.FAIL, Verdict.MISSING)]
        if failed:
            pytest.fail(
                f"{m.board} / {m.model}: budget not met:\n" + "\n".join(f"  {j}" for j in failed),
                pytrace=False,
            )
        return judgements


_EXTRAS = pytest.StashKey[list[str]]()


def add_report_html(node: pytest.Item, html: str) -> None:
    """Show `html` under the test in the pytest-html report."""
    node.stash.setdefault(_EXTRAS, []).append(html)


def journal_record(node: pytest.Item, journal: Journal, record: Any) -> None:
    """Journal `record` for `node`'s test. When the journal cannot take it, the record is kept whole in
    the test's JUnit property `unjournaled` and its HTML report, and the test is an ERROR at teardown
    (pytest_runtest_teardown); the test itself goes on."""
    import html

    from labbench.results import dumps

    try:
        journal.append(record)
    except JournalError as exc:
        node.stash.setdefault(_UNJOURNALED, []).append(exc)
        node.config.stash.setdefault(_UNJOURNALED_RUN, []).append(f"{node.nodeid}: {exc}")
        line = dumps(record)
        node.user_properties.append(("unjournaled", line))
        add_report_html(
            node,
            f"<p style='color:#c33'><b>not journaled</b>: {html.escape(str(exc))}; the "
            "record is kept here and in the JUnit property <code>unjournaled</code>:</p>"
            f"<details><summary>record</summary><pre>{html.escape(line)}</pre></details>",
        )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, None, None]:
    """A test whose records the journal refused is an ERROR, after its fixtures are torn down."""
    result = yield
    if errors := item.stash.get(_UNJOURNALED, None):
        raise JournalError(
            errors[0].path,
            errors[0].what,
            f"{len(errors)} record(s) of this test not "
            "journaled, each kept in the JUnit property 'unjournaled' and the HTML report",
        )
    return result


class HilBench:
    """labbench.bench.Bench for a pytest run: each board step goes through `recovery` on behalf of the
    test `node` that needs it first, and a payload that cannot fit the board skips the test."""

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

    def study(self, node: pytest.Item, study: Study) -> list[Measurement]:
        """The strategy study (labbench.strategies.run), each board step with recovery."""
        from labbench.strategies.run import run_study

        try:
            return run_study(self.bench, study, self._runner(node))
        except NotDeployable as exc:
            pytest.skip(str(exc))


@pytest.fixture(scope="session")
def run_settings(pytestconfig: pytest.Config) -> RunSettings:
    """The measurement settings of this run (the `labbench-hil` options)."""
    return RunSettings.from_options(pytestconfig.getoption)


@pytest.fixture(scope="session")
def bench(run_settings: RunSettings, pytestconfig: pytest.Config, recovery: Recovery) -> HilBench:
    """`bench.install / measure / identify(request.node, board, payload)`: each (board, payload)
    installed and measured once per run, shared by every test that asks, with recovery."""
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")

    def say(line: str) -> None:
        """Progress of long measurements, shown past pytest's output capture (not with -q)."""
        if reporter is None or pytestconfig.getoption("verbose") < 0:
            return
        if capture is None:  # -p no:capture: no capture to get past
            reporter.write_line(line, cyan=True)
            return
        with capture.global_and_fixture_disabled():
            reporter.write_line(line, cyan=True)

    return HilBench(Bench(run_settings, Path(pytestconfig.rootpath) / "build", say=say), recovery)


@pytest.fixture(scope="session")
def journal(pytestconfig: pytest.Config) -> Journal:
    return Journal(pytestconfig.getoption("journal"))


@pytest.fixture
def recorder(request: pytest.FixtureRequest, journal: Journal) -> Recorder:
    """`recorder.record(measurement)`: journal, report and judge one measurement."""
    return Recorder(request, journal)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    from labbench.errors import BoardBusy, LabbenchError

    report = yield
    if call.excinfo is not None and call.excinfo.errisinstance(LabbenchError):
        # a typed bench error already names the board, the step, what was seen and the log file:
        # that line is the report, not the driver's traceback
        report.longrepr = f"{call.excinfo.typename}: {call.excinfo.value}"
    excinfo = call.excinfo
    busy = report.when == "setup" and excinfo is not None and excinfo.errisinstance(BoardBusy)
    if busy and excinfo is not None and (board := _board_of(item)):
        item.config.stash[_RECOVERY].quarantine(item, board, "acquire", excinfo.value)
    parts = item.stash.get(_EXTRAS, [])
    # what setup and call added, shown with the call, or with the setup error when there is no call
    if (taken := steps.since(item.stash.get(_STEPS_FROM, steps.count()))) and (
        report.when == "call" or (report.when == "setup" and report.failed)
    ):
        from labbench.report import extras

        parts = [*parts, extras.timeline_html(taken)]
    if parts and (report.when == "call" or (report.when == "setup" and report.failed)):
        try:
            from pytest_html import extras as html_extras
        except ImportError:
            return report
        _set_attribute(
            report, "extras", [*getattr(report, "extras", []), *(html_extras.html(p) for p in parts)]
        )
    return report


@pytest.hookimpl(tryfirst=True)  # before pytest-html, JUnit and the terminal read the report
def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _redact_report(report)


@pytest.hookimpl(tryfirst=True)
def pytest_collectreport(report: pytest.CollectReport) -> None:
    _redact_report(report)


def _redact_report(report: pytest.TestReport | pytest.CollectReport) -> None:
    """No credential in what pytest-html, JUnit and the terminal show of a test or a collection error:
    its traceback or skip reason, captured output and logs, JUnit properties and HTML extras (the
    bench's tables and a test's own). Done here rather than in pytest_runtest_makereport, where
    pytest-html adds the `extras` fixture's after the bench's hook has run."""
    from labbench.redact import redact_text, redact_value

    report.longrepr = _redacted_longrepr(report.longrepr)
    report.sections = [(header, redact_text(content)) for header, content in report.sections]
    if isinstance(report, pytest.TestReport):
        report.user_properties = [(k, redact_value(k, v)) for k, v in report.user_properties]
    if hasattr(report, "wasxfail"):
        _set_attribute(report, "wasxfail", redact_text(report.wasxfail))
    if extras := getattr(report, "extras", None):
        _set_attribute(report, "extras", [_redacted_extra(e) for e in extras])


def _set_attribute(report: pytest.TestReport | pytest.CollectReport, name: str, value: object) -> None:
    """Set an attribute pytest's report classes do not declare: pytest-html's `extras`, and `wasxfail` on
    a collect report (plugins add attributes to reports as they please)."""
    setattr(report, name, value)


def _redacted_extra(extra: dict[str, Any]) -> dict[str, Any]:
    """A pytest-html extra with its content redacted (an image or a video is kept as it is)."""
    from labbench.redact import redact_html, redact_text, redact_value

    kind, content = extra.get("format_type"), extra["content"]
    if kind == "json":
        return {**extra, "content": redact_value(extra.get("name") or "", content)}
    if kind in ("html", "text", "url"):
        text = content.decode("utf-8", "replace") if isinstance(content, bytes) else content
        return {**extra, "content": (redact_html if kind == "html" else redact_text)(text)}
    return extra


def _redacted_longrepr(longrepr: Any) -> Any:
    """A report's longrepr redacted: a skip's reason, or the whole text (then kept as text, only when
    something in it was masked)."""
    from labbench.redact import redact_text

    if longrepr is None:
        return None
    if isinstance(longrepr, tuple):  # a skip: (path, line, reason)
        path, line, reason = longrepr
        return path, line, redact_text(reason)
    text = str(longrepr)
    redacted = redact_text(text)
    return longrepr if redacted == text else redacted


@pytest.hookimpl(optionalhook=True)
def pytest_metadata(metadata: dict[str, Any], config: pytest.Config) -> None:
    """No credential in pytest-metadata's table, which pytest-html shows as Environment, `-v` prints
    in the header and `include_metadata_in_junit_xml` writes as JUnit testsuite properties."""
    from labbench.redact import redact_env

    redacted = redact_env(metadata)
    metadata.clear()
    metadata.update(redacted)


@pytest.hookimpl(tryfirst=True, specname="pytest_sessionfinish")
def pytest_sessionfinish_redact(session: pytest.Session) -> None:
    """Entries added during the run (the `metadata` fixture), redacted before pytest-html renders."""
    try:
        from pytest_metadata.plugin import metadata_key
    except ImportError:
        return
    if (metadata := session.config.stash.get(metadata_key, None)) is not None:
        pytest_metadata(metadata, session.config)
