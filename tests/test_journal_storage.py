"""A journal that survives the disk: every write checked (a full disk on a tiny tmpfs, a read-only
file system, short writes and EIO), no torn line left behind, damaged journals read with a warning
per skipped line, `labbench journal check|repair`, and a pytest run whose journal fills up mid-run."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import textwrap
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from xml.etree import ElementTree

import pytest
from test_results import measurement

from labbench import cli, results
from labbench.gate import gate
from labbench.measure.record import Event

pytest_plugins = ["pytester"]


@contextmanager
def tmpfs(path: Path, *options: str) -> Iterator[Path]:
    """A tmpfs mounted at `path` with mount `options` (size=64k, ro), unmounted after; the test is
    skipped where mounting is not permitted (it needs root or CAP_SYS_ADMIN)."""
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command: cannot make a tiny or read-only file system")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join(options) or "defaults", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs (needs root or CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", str(path)], check=True)


def fill(directory: Path) -> None:
    """Write a filler file in `directory` until its file system is full."""
    with open(directory / "filler", "wb", buffering=0) as f:
        try:
            while f.write(b"\0" * 4096):
                pass
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def lines_warned(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, results.JournalWarning)]


# --- writing -------------------------------------------------------------------------------------


def test_a_full_disk_raises_naming_the_journal_and_leaves_no_torn_line(tmp_path):
    with tmpfs(tmp_path / "tiny", "size=64k") as tiny:
        journal = results.Journal(tiny / "reports" / "journal.jsonl")
        journal.append(measurement())
        before = journal.path.read_bytes()
        fill(tiny)
        with pytest.raises(results.JournalError) as raised:
            journal.append(measurement(model="digits_mlp_fp32"))
        message = str(raised.value)
        assert message.startswith(f"journal {journal.path}: append: ")
        assert "No space left on device (ENOSPC)" in message or "short write" in message
        assert message.endswith("the record was not journaled")
        assert journal.path.read_bytes() == before  # cut back: no torn line
        (tiny / "filler").unlink()
        journal.append(measurement(model="digits_mlp_fp32"))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert results.load(journal.path)["model"].tolist() == ["digits_mlp_int8", "digits_mlp_fp32"]


def test_a_read_only_file_system_raises_naming_the_journal(tmp_path):
    with tmpfs(tmp_path / "ro", "ro", "size=64k") as ro:
        with pytest.raises(
            results.JournalError,
            match=rf"^journal {ro}/j\.jsonl: append: "
            r"Read-only file system \(EROFS\); the record",
        ):
            results.Journal(ro / "j.jsonl").append(measurement())
        with pytest.raises(results.JournalError, match=r"append: Read-only file system \(EROFS\)"):
            results.Journal(ro / "new" / "j.jsonl").append(measurement())  # its folder cannot be made


def test_short_write_and_eio_are_errors_and_cut_back(tmp_path, monkeypatch):
    journal = results.Journal(tmp_path / "j.jsonl")
    journal.append(measurement())
    before = journal.path.read_bytes()
    write = os.write

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    with monkeypatch.context() as m:
        m.setattr(os, "write", lambda fd, data: write(fd, data[: len(data) // 2]))
        with pytest.raises(results.JournalError, match=r"append: short write, \d+ of \d+ bytes \(disk full"):
            journal.append(measurement(model="b"))
    assert journal.path.read_bytes() == before
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", eio)
        with pytest.raises(results.JournalError, match=r"append: Input/output error \(EIO\); the record"):
            journal.append(measurement(model="b"))
    assert journal.path.read_bytes() == before


def test_an_append_after_a_torn_tail_starts_its_own_line(tmp_path):
    journal = results.Journal(tmp_path / "j.jsonl")
    journal.append(measurement())
    with journal.path.open("a") as f:
        f.write('{"schema_version":1,"board":"es')  # a run killed mid-write
    journal.append(measurement(model="after"))
    with pytest.warns(results.JournalWarning) as caught:
        models = results.load(journal.path)["model"].tolist()
    assert models == ["digits_mlp_int8", "after"]
    why = "not JSON: Unterminated string starting at (column 29)"
    assert lines_warned(caught) == [f"{journal.path}:2: skipped: {why}"]


# --- reading a damaged journal -------------------------------------------------------------------


def torn_journal(path: Path) -> Path:
    """A journal torn in the middle (an older bench appended onto a torn line), with an invalid line
    and a torn last line: 3 whole measurements and 1 event survive."""
    whole = [results.dumps(measurement(model=f"m{i}")) for i in range(3)]
    event = results.dumps(Event(kind="quarantine", board="esp32", step="measure", error="gone"))
    path.write_text(
        f'{whole[0]}\n{whole[1][:80]}{whole[1]}\n{{"kind": "attempt"}}\n{event}\n{whole[2]}\n{whole[2][:120]}'
    )
    return path


def test_a_torn_journal_loads_with_a_warning_naming_file_and_line(tmp_path):
    path = torn_journal(tmp_path / "journal.jsonl")
    with pytest.warns(results.JournalWarning) as caught:
        df = results.load(path)
    assert df["model"].tolist() == ["m0", "m1", "m2"]
    assert lines_warned(caught) == [
        f"{path}:2: skipped: torn record (80 bytes) before a whole record, which is kept",
        f"{path}:3: skipped: not a valid Event (2 errors; board: Field required)",
        f"{path}:6: skipped: incomplete last record (run interrupted or disk full?)",
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", results.JournalWarning)
        assert [e.kind for e in results.events(path)] == ["quarantine"]


def test_report_and_gate_read_past_damaged_lines(tmp_path, monkeypatch, capsys):
    path = torn_journal(tmp_path / "journal.jsonl")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["report", str(path), "--out", "index.html"]) == 0
    err = capsys.readouterr().err
    assert f"warning: {path}:3: skipped: not a valid Event" in err and f"{path}:6: skipped: incomplete" in err
    html = (tmp_path / "index.html").read_text()
    assert "3 damaged journal lines skipped" in html and f"{path}:2: skipped: torn record" in html
    assert all(f"<td>m{i}</td>" in html for i in range(3)) and "QUARANTINED" in html
    result = gate([path])
    assert result.exit_code == 2  # as before: a skipped line makes the data incomplete
    assert [p.split(": skipped")[0] for p in result.incomplete] == [f"{path}:2", f"{path}:3", f"{path}:6"]
    assert {c.model for c in result.checks} == {"m0", "m1", "m2"}


def test_journal_check_and_repair_round_trip(tmp_path, capsys):
    path = torn_journal(tmp_path / "journal.jsonl")
    original = path.read_bytes()
    assert cli.main(["journal", "check", str(path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{path}: DAMAGED: 3 valid measurements, 0 partial, 1 events, 3 damaged lines"
    assert out[1:4] == [
        f"  {path}:2: torn record (80 bytes) before a whole record, which is kept",
        f"  {path}:3: not a valid Event (2 errors; board: Field required)",
        f"  {path}:6: incomplete last record (run interrupted or disk full?)",
    ]
    assert cli.main(["journal", "repair", str(path)]) == 0
    out = capsys.readouterr().out
    backup = Path(out.split("the original is in ")[1].strip())
    assert out.startswith(f"{path}: repaired: kept 4 records, dropped the damaged part of line(s) 2, 3, 6")
    assert backup.name.startswith("journal.jsonl.bak-") and backup.read_bytes() == original
    assert cli.main(["journal", "check", str(path)]) == 0
    healthy = f"{path}: healthy: 3 valid measurements, 0 partial, 1 events, 0 damaged lines\n"
    assert capsys.readouterr().out == healthy
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert results.load(path)["model"].tolist() == ["m0", "m1", "m2"]
    assert cli.main(["journal", "repair", str(path)]) == 0
    assert capsys.readouterr().out == f"{path}: healthy, nothing to repair\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["journal.jsonl", backup.name]
    assert cli.main(["journal", "check", str(tmp_path / "absent.jsonl")]) == 2


def test_repair_on_a_full_disk_leaves_the_journal_as_it_was(tmp_path):
    with tmpfs(tmp_path / "tiny", "size=64k") as tiny:
        path = torn_journal(tiny / "journal.jsonl")
        original = path.read_bytes()
        fill(tiny)
        with pytest.raises(
            results.JournalError,
            match=rf"^journal {path}: repair: No space left on device "
            r"\(ENOSPC\); the journal is unchanged$",
        ):
            results.repair(path)
        assert path.read_bytes() == original
        assert sorted(p.name for p in tiny.iterdir()) == ["filler", "journal.jsonl"]


# --- a pytest run whose journal fills up mid-run -------------------------------------------------

FILLS_THE_DISK = textwrap.dedent("""\
    from pathlib import Path

    from labbench.measure.record import Measurement

    def test_measure(board, recorder, pytestconfig):
        journal = pytestconfig.getoption("journal")
        with open(journal.parent / "filler", "wb", buffering=0) as f:  # the disk fills during the run
            try:
                while f.write(bytes(1 << 16)):
                    pass
            except OSError:
                pass
        recorder.record(Measurement.model_validate_json(Path("measured.json").read_text()))
    """)


def test_a_journal_write_failure_is_an_error_and_the_measurement_is_kept(
    pytester, sim_board, monkeypatch, tmp_path
):
    monkeypatch.setenv("LABBENCH_LOCK_DIR", str(tmp_path / "locks"))
    pytester.makefile(
        ".yaml",
        lab=f"lab: {{name: full}}\nboards:\n  good:\n    family: nano33_ble_sense\n"
        f'    serial: {{url: "{sim_board.url}"}}\n',
    )
    pytester.makepyfile(test_fill=FILLS_THE_DISK)
    m = measurement(board="good")
    (pytester.path / "measured.json").write_text(m.model_dump_json())
    with tmpfs(tmp_path / "disk", "size=12m") as disk:  # room for pre-flight's 10 MiB, then filled
        journal = disk / "journal.jsonl"
        result = pytester.runpytest(
            "--board", "good", "--journal", str(journal), "--junitxml", "junit.xml", "--html", "report.html"
        )
        journal_bytes = journal.read_bytes() if journal.exists() else b""
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=1, errors=1)  # the measurement was judged; the journal failure an ERROR
    enospc = f"journal {journal}: append: No space left on device (ENOSPC)"
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_measure?good?*",
            (
                f"*JournalError: {enospc}; 1 record(s) of this test not journaled, each kept in the JUnit property "
                "'unjournaled' and the HTML report*"
            ),
            "*labbench: records NOT journaled*",
            f"test_fill.py::test_measure?good?: {enospc}; the record was not journaled",
        ]
    )
    assert journal_bytes == b""  # nothing journaled, nothing torn
    case = next(ElementTree.parse(pytester.path / "junit.xml").getroot().iter("testcase"))
    assert case.find("error") is not None
    kept = {p.get("name"): p.get("value") for p in case.iter("property")}["unjournaled"]
    kept = json.loads(kept)
    assert kept["id"] == m.id and kept["latency"]["samples_ms"] == m.latency.samples_ms
    html = (pytester.path / "report.html").read_text()
    assert "not journaled" in html and m.id in html
