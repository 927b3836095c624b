"""The results journal: append-only JSONL, one record per line, each write checked and fsync'd.

Records are `Measurement`s (whole, or partial: what was measured before an infrastructure error)
and `Event`s (a failed attempt at a board step and its recovery, a board quarantined). A write that
fails (a full disk, an I/O error, a read-only file system) raises `JournalError` naming the journal
and leaves no torn line behind. A journal damaged all the same (a run killed mid-write, a full disk
under an older bench) still reads: `records()`, `load()` and the readers built on them skip each
torn or invalid line with a `JournalWarning` naming `file:line`. `check()` reports a journal's
health; `repair()` rewrites it without the damaged lines, keeping a backup.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import json
import os
import re
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from labbench.errors import LabbenchError
from labbench.measure.record import EVENT_KINDS, Event, Measurement

if TYPE_CHECKING:
    import pandas as pd

INCOMPLETE = "incomplete last record (run interrupted or disk full?)"
_RECORD_START = re.compile(rb'\{"schema_version"')  # every record's first key


class JournalError(LabbenchError):
    """A journal could not be written (or rewritten): `what` failed, and `note` says what it means."""

    def __init__(self, path: str | Path, what: str, note: str = ""):
        self.path, self.what = Path(path), what
        super().__init__(f"journal {path}: {what}" + (f"; {note}" if note else ""))


class JournalWarning(UserWarning):
    """A journal line a reader skipped: `file:line: skipped: why`."""


def _seen(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0)
    return f"{exc.strerror or exc}{f' ({name})' if name else ''}"


def dumps(record: Measurement | Event) -> str:
    """A record as its journal line (without the newline): compact JSON, credentials masked."""
    from labbench.redact import redact_env

    data = redact_env(json.loads(record.model_dump_json()))
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


@contextmanager
def _locked(path: Path, flags: int) -> Iterator[tuple[int, bool]]:
    """`path` opened with `flags` under an exclusive flock (writers and `repair` take it), reopened
    when `repair` replaced the file meanwhile. Yields the fd and whether the lock was taken (a file
    system without locks still gets O_APPEND's whole-line appends)."""
    while True:
        fd = os.open(path, flags, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            locked = False
            break
        try:
            now = os.stat(path)
        except FileNotFoundError:
            now = None
        opened = os.fstat(fd)
        if now is not None and (now.st_dev, now.st_ino) == (opened.st_dev, opened.st_ino):
            locked = True
            break
        os.close(fd)
    try:
        yield fd, locked
    finally:
        os.close(fd)


class Journal:
    """Appends records to a JSONL file; safe for several processes appending at once."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def append(self, record: Measurement | Event) -> None:
        """Write `record` as one line with one write, then fsync. Raises JournalError (the record not
        journaled, no torn line left) when the folder, the open, the write or the fsync fails."""
        line = (dumps(record) + "\n").encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with _locked(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT) as (fd, locked):
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    line = b"\n" + line  # after a torn tail from an earlier crash: a line of its own
                self._write(fd, line, size, locked)
        except OSError as exc:
            raise JournalError(self.path, f"append: {_seen(exc)}", "the record was not journaled") from exc

    def _write(self, fd: int, line: bytes, size: int, locked: bool) -> None:
        try:
            written = os.write(fd, line)  # one write per record: concurrent writers' lines never interleave
            if written == len(line):
                os.fsync(fd)
                return
            seen = f"short write, {written} of {len(line)} bytes (disk full?)"
        except OSError as exc:
            seen = _seen(exc)
        undone = self._undo(fd, size, locked)
        raise JournalError(self.path, f"append: {seen}", f"the record was not journaled{undone}")

    def _undo(self, fd: int, size: int, locked: bool) -> str:
        """Cut what a failed append left back to the journal's size before it; what remains, said."""
        if locked:
            try:
                os.ftruncate(fd, size)
                return ""
            except OSError as exc:
                return f" and a torn line may remain at byte {size} (truncate: {_seen(exc)}); readers skip it"
        return f" and a torn line may remain at byte {size} (no lock to truncate under); readers skip it"


# --- reading -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Line:
    """One non-blank line of a journal: its record, or why it was skipped. A line with both is a
    torn record followed by a whole one (an append after a crash, by an older bench): `problem`
    says what was skipped, `raw` is the whole record's bytes."""

    number: int
    record: Measurement | Event | None
    problem: str | None
    raw: bytes


class _Damaged(Exception):
    """Why a line holds no record."""


def _parse(raw: bytes) -> Measurement | Event:
    """The record on one line; _Damaged saying why it is not one."""
    try:
        data = json.loads(raw.decode())
    except UnicodeDecodeError:
        raise _Damaged("not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise _Damaged(f"not JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(data, dict):
        raise _Damaged(f"not a record (a JSON {type(data).__name__})")
    kind = Event if data.get("kind") in EVENT_KINDS else Measurement
    try:
        return kind.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"])) or "record"
        why = f"{exc.error_count()} errors; {where}: {first['msg']}"
        raise _Damaged(f"not a valid {kind.__name__} ({why})") from None


def _lines(data: bytes) -> Iterator[Line]:
    chunks = data.split(b"\n")
    for n, raw in enumerate(chunks, 1):
        if not raw.strip():
            continue
        try:
            yield Line(n, _parse(raw), None, raw)
            continue
        except _Damaged as exc:
            problem = INCOMPLETE if n == len(chunks) else str(exc)  # the last chunk has no newline: torn
        for start in (m.start() for m in _RECORD_START.finditer(raw, 1)):
            try:
                record = _parse(raw[start:])
            except _Damaged:
                continue
            yield Line(
                n, record, f"torn record ({start} bytes) before a whole record, which is kept", raw[start:]
            )
            break
        else:
            yield Line(n, None, problem, raw)


def scan(path: str | Path) -> Iterator[Line]:
    """Every non-blank line of a journal with its record or why it is skipped, in file order."""
    return _lines(Path(path).read_bytes())


def records(paths: str | Path | Iterable[str | Path]) -> Iterator[Measurement | Event]:
    """Every record of one or more journals, in file order; each torn or invalid line is skipped
    with a JournalWarning `file:line: skipped: why`."""
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        for line in scan(path):
            if line.problem:
                warnings.warn(f"{path}:{line.number}: skipped: {line.problem}", JournalWarning, stacklevel=2)
            if line.record is not None:
                yield line.record


def read(paths: str | Path | Iterable[str | Path]) -> Iterator[Measurement]:
    """The measurements of the journals (partial ones included: see `Measurement.status`), in file order."""
    return (r for r in records(paths) if isinstance(r, Measurement))


def events(paths: str | Path | Iterable[str | Path]) -> list[Event]:
    """The attempt and quarantine records of the journals, in file order."""
    return [r for r in records(paths) if isinstance(r, Event)]


def frame(measurements: Iterable[Measurement]) -> pd.DataFrame:
    """Measurements -> a DataFrame, one row each, nested fields as dotted columns (`latency.p99_ms`)."""
    import pandas as pd

    rows = [json.loads(m.model_dump_json()) for m in measurements]
    return pd.json_normalize(rows) if rows else pd.DataFrame()


def load(paths: str | Path | Iterable[str | Path], include_partial: bool = False) -> pd.DataFrame:
    """Journals -> a DataFrame, one row per measurement, nested fields as dotted columns.

    Partial records (cut short by an infrastructure error) are left out unless `include_partial`;
    the `status` and `error` columns tell them apart. Damaged lines are skipped (see `records`)."""
    return frame(m for m in read(paths) if include_partial or m.status == "valid")


# --- health and repair ---------------------------------------------------------------------------


@dataclass
class Health:
    """What a journal holds: whole records by kind, and its damaged lines (number, why)."""

    path: Path
    valid: int = 0
    partial: int = 0
    events: int = 0
    damaged: list[tuple[int, str]] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not self.damaged

    def summary(self) -> str:
        state = "healthy" if self.healthy else "DAMAGED"
        return (
            f"{self.path}: {state}: {self.valid} valid measurements, {self.partial} partial, "
            f"{self.events} events, {len(self.damaged)} damaged lines"
        )


def _health(path: Path, lines: Iterable[Line]) -> Health:
    health = Health(path)
    for line in lines:
        if line.problem:
            health.damaged.append((line.number, line.problem))
        if isinstance(line.record, Event):
            health.events += 1
        elif line.record is not None and line.record.status == "valid":
            health.valid += 1
        elif line.record is not None:
            health.partial += 1
    return health


def check(path: str | Path) -> Health:
    """A journal's health (FileNotFoundError when there is none)."""
    return _health(Path(path), scan(path))


def repair(path: str | Path) -> tuple[Health, Path | None]:
    """Rewrite a damaged journal without its damaged lines (a whole record after a torn one is kept),
    first copying it to PATH.bak-<UTC time>. The rewrite is atomic (temporary file, fsync, rename)
    and excludes appenders meanwhile. Returns the health found and the backup (None: nothing to do)."""
    path = Path(path)
    try:
        with _locked(path, os.O_RDONLY) as (fd, _):
            data = b"".join(iter(lambda: os.read(fd, 1 << 20), b""))
            lines = list(_lines(data))
            health = _health(path, lines)
            if health.healthy:
                return health, None
            backup = _backup(path, data)
            _replace(
                path,
                b"".join(line.raw + b"\n" for line in lines if line.record is not None),
                os.fstat(fd).st_mode & 0o7777,
            )
    except OSError as exc:
        raise JournalError(path, f"repair: {_seen(exc)}", "the journal is unchanged") from exc
    return health, backup


def _backup(path: Path, data: bytes) -> Path:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    for n in range(1, 100):
        backup = path.with_name(f"{path.name}.bak-{stamp}" + (f"-{n}" if n > 1 else ""))
        try:
            fd = os.open(backup, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            continue
        try:
            _write_all(fd, data)
        except OSError:
            os.unlink(backup)
            raise
        finally:
            os.close(fd)
        return backup
    raise FileExistsError(errno.EEXIST, "too many backups this second", str(path))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def _replace(path: Path, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            os.fchmod(fd, mode)
            _write_all(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
