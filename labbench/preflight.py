"""Pre-flight: before a HIL session flashes or measures anything, check in seconds what would
otherwise fail an hour in.

- Outputs (the journal, `--html`, `--junitxml`): the folder is created if missing (as the run would),
  a probe file is created, written, fsync'd and deleted there, an existing file is opened for append,
  and at least `MIN_FREE_BYTES` must be free.
- Boards: an RFC 2217, socket:// or SSH endpoint must accept a TCP connection within
  `CONNECT_TIMEOUT_S` (no protocol exchange); a local serial device must exist and be readable and
  writable. It is not opened: opening a port toggles DTR/RTS, which resets many boards.
- Instruments: a board's power instrument is opened through its driver and must answer `*IDN?`
  (a TCP socket resource must first accept a connection within `CONNECT_TIMEOUT_S`).

Boards are checked in parallel, each under its lock; a board whose lock another session holds is
not probed (the board fixture reports it, as without pre-flight). The pytest plugin runs `check`
at session start, once the simulated lab is up, and stops the session listing every problem.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from labbench.board import Board
from labbench.errors import BoardBusy, LabbenchError
from labbench.inventory import BoardEntry, Lab, endpoint

MIN_FREE_BYTES = 10 * 1024 * 1024
CONNECT_TIMEOUT_S = 3.0
_PROBE = b"labbench pre-flight probe\n"


@dataclass
class Result:
    """What pre-flight found: `problems` (none: clear to go), what `passed`, and how long it took."""

    problems: list[str] = field(default_factory=list)
    passed: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _errno(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0)
    return f"{exc.strerror or exc}{f' ({name})' if name else ''}"


def output_problem(what: str, path: Path, min_free: int = MIN_FREE_BYTES) -> str | None:
    """Why the run could not write `path` (a file it writes, named `what`), or None."""
    directory = path.parent
    if path.is_dir():
        return f"{what} {path}: is a directory"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".labbench-preflight-", dir=directory)
        try:
            written = os.write(fd, _PROBE)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
        if path.exists():
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
        free = shutil.disk_usage(directory).free
    except OSError as exc:
        return f"{what} {path}: cannot write in {directory}: {_errno(exc)}"
    if written != len(_PROBE):
        return f"{what} {path}: short write in {directory} (disk full?)"
    if free < min_free:
        return (
            f"{what} {path}: {free / 2**20:.2f} MiB free in {directory}; pre-flight asks for "
            f"{min_free / 2**20:g} MiB"
        )
    return None


def _connect(host: str, port: int, timeout_s: float) -> str | None:
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        seen = "timed out" if isinstance(exc, TimeoutError) else _errno(exc)
        return f"no TCP connection to {host}:{port} within {timeout_s:g} s: {seen}"
    return None


def link_problem(entry: BoardEntry, timeout_s: float = CONNECT_TIMEOUT_S) -> str | None:
    """Why the board's serial or SSH link is unreachable, or None (also for a URL not checked here:
    loop://, hwgrep://, cp2110://)."""
    if entry.ssh is not None:
        problem = _connect(entry.ssh.host, entry.ssh.port, timeout_s)
        return f"ssh: {problem}" if problem else None
    assert entry.serial is not None  # lab.yaml gives a board exactly one of serial: and ssh:
    url = entry.serial.url
    if url.lower().startswith(("spy://", "alt://")):
        url = url.split("://", 1)[1].split("?", 1)[0]
    if (address := endpoint(url)) is not None:
        problem = _connect(*address, timeout_s)
        return f"serial {entry.serial.url}: {problem}" if problem else None
    if "://" in url or re.fullmatch(r"COM\d+", url, re.IGNORECASE):
        return None
    if not os.path.exists(url):
        return f"serial {url}: no such device (unplugged?)"
    if not os.access(url, os.R_OK | os.W_OK):
        return f"serial {url}: no read/write permission (the dialout group?)"
    return None


def instrument_problem(board: Board, timeout_s: float = CONNECT_TIMEOUT_S) -> tuple[str | None, str]:
    """Why the board's power instrument does not answer `*IDN?` (or None), and its reply; the
    instrument stays open until `board.release()`."""
    if board.entry.power is None:
        return "no power: link in lab.yaml", ""
    inst = board.lab.instruments[board.entry.power.instrument]
    address = endpoint(inst.resource)
    if address is not None and (problem := _connect(*address, timeout_s)):
        return f"instrument {inst.name} ({inst.resource}): {problem}", ""
    try:
        return None, board.power_meter.identity()
    except LabbenchError as exc:
        return f"instrument {inst.name}: {exc}", ""


def board_check(lab: Lab, name: str, timeout_s: float = CONNECT_TIMEOUT_S) -> Result:
    """Board `name`'s link and power instrument, probed under the board's lock."""
    result = Result()
    board = Board(lab, name)
    try:
        board.acquire()
    except BoardBusy:
        result.passed.append(f"{name} not probed (busy)")
        return result
    except (LabbenchError, OSError) as exc:
        result.problems.append(f"board {name}: lock: {exc}")
        return result
    try:
        if problem := link_problem(board.entry, timeout_s):
            result.problems.append(f"board {name}: {problem}")
        else:
            result.passed.append(f"{name} reachable")
        if board.entry.power is not None:
            problem, idn = instrument_problem(board, timeout_s)
            if problem:
                result.problems.append(f"board {name}: {problem}")
            else:
                result.passed.append(f"{board.entry.power.instrument} answers *IDN?: {idn}")
    finally:
        board.release()
    return result


def check(
    outputs: list[tuple[str, Path]], lab: Lab, boards: list[str], timeout_s: float = CONNECT_TIMEOUT_S
) -> Result:
    """Every output path (what, path) and every board of `boards` (in parallel); see the module doc."""
    start = time.monotonic()
    result = Result()
    for what, path in outputs:
        if problem := output_problem(what, path):
            result.problems.append(problem)
        else:
            result.passed.append(f"{what} writable")
    with ThreadPoolExecutor(max_workers=max(1, len(boards))) as pool:
        for found in pool.map(lambda name: board_check(lab, name, timeout_s), boards):
            result.problems += found.problems
            result.passed += found.passed
    result.seconds = time.monotonic() - start
    return result
