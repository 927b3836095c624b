"""Flashers that run a vendor's command line (bossac, flashtool), shared by their driver modules.

The command is lab.yaml's `flash.command` for the board, a list of arguments with placeholders
`{image}` (absolute path), `{port}` (the board's serial URL or device), `{baud}`, `{board}` and
`{python}` (the bench's own interpreter, for tools installed as Python modules); without one, the
tool's usual command line for the board (the driver's `DEFAULT_COMMAND`). A lab may name any
tool this way, a stand-in for a simulated board included (docs/flashing.md), and the bench runs it
as any other command. Its exit code and its output (stdout and stderr,
interleaved) go to a log file per flash; a failure is a FlashError naming the board, the tool, the
exit code, the output's tail and the log.

Afterwards the board is identified as a DUT (`DutSerial.identify`). When the image is a TFLite
model (some boards take the .tflite itself), the DUT must report its SHA-256, and a
board already reporting it is not flashed again unless `force`; a compiled firmware image (.bin,
.elf) carries no hash the bench can read, so it is always written.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Self

from labbench.capabilities import DutIdentity, InstallRecord
from labbench.errors import FlashError, UsageError
from labbench.steps import step

if TYPE_CHECKING:
    from labbench.catalog import BoardFamily
    from labbench.inventory import BoardEntry

TAIL_LINES = 8


class CommandFlasher:
    """Runs `command` to flash `image`, then checks the DUT (see the module docstring)."""

    TOOL = "command"
    DEFAULT_COMMAND: tuple[str, ...] = ()

    def __init__(
        self,
        port: str,
        *,
        board: str,
        command: list[str] | None = None,
        baud: int | None = None,
        timeout_s: float = 300.0,
        dut_baud: int = 115200,
        log_dir: str | Path = "reports/flash",
    ):
        self.port, self.board, self.baud, self.timeout_s = port, board, baud, timeout_s
        self.command = list(command or self.DEFAULT_COMMAND)
        self.dut_baud = dut_baud
        self.log_dir = Path(log_dir)

    @classmethod
    def from_lab(cls, entry: BoardEntry, family: BoardFamily | None = None) -> Self:
        """From a lab.yaml board entry (`family` is part of the common driver signature; unused)."""
        if entry.serial is None:
            raise UsageError(f"board {entry.name} has no serial: link in lab.yaml to flash through")
        flash = entry.flash
        command = flash.command if flash and flash.command else None
        return cls(
            entry.serial.url,
            board=entry.name,
            command=command,
            baud=flash.baud if flash else None,
            timeout_s=flash.timeout_s if flash else 300.0,
            dut_baud=entry.serial.baud,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.board!r}, {self.command[0] if self.command else '?'!r})"

    def _identify(self) -> DutIdentity:
        from labbench.drivers.dut_serial import DutSerial

        with DutSerial(self.port, board=self.board, baud=self.dut_baud) as dut:
            return dut.identify()

    def before_command(self) -> None:
        """A step the tool's usual flow takes before it runs (e.g. the 1200-baud touch)."""

    def argv(self, image: Path) -> list[str]:
        values = {
            "image": str(image),
            "port": self.port,
            "baud": self.baud or "",
            "board": self.board,
            "python": sys.executable,
        }
        return [arg.format(**values) for arg in self.command]

    # -- Flasher ----------------------------------------------------------------------------------

    def flash(self, image: str, *, force: bool = False) -> InstallRecord:
        t0 = time.monotonic()
        path = Path(image).resolve()
        data = path.read_bytes()
        expected = hashlib.sha256(data).hexdigest() if data[4:8] == b"TFL3" else None
        done = partial(InstallRecord, self.board, self.TOOL, hashlib.sha256(data).hexdigest(), expected)
        if expected and not force:
            try:
                current = self._identify()
            except Exception:
                current = None
            if current is not None and current.model_sha256 == expected:
                return done(True, round(time.monotonic() - t0, 3), current, detail={"image": str(path)})
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{self.board}-{self.TOOL}-{datetime.now():%Y%m%d-%H%M%S-%f}.log"
        argv = self.argv(path)
        self.before_command()
        t = time.monotonic()
        try:
            with step(self.board, f"flash with {self.TOOL}", path.name), open(log_path, "w") as log:
                log.write(f"$ {subprocess.list2cmdline(argv)}\n")
                log.flush()
                proc = subprocess.run(
                    argv,
                    check=False,  # the exit code is judged below, with the log
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    timeout=self.timeout_s,
                )
                log.write(f"[exit code {proc.returncode}]\n")
        except subprocess.TimeoutExpired:
            raise FlashError(
                self.board,
                f"flash with {self.TOOL}",
                f"no exit within {self.timeout_s:g} s; output: {_tail(log_path)}",
                log=str(log_path),
            ) from None
        except OSError as exc:  # the tool is not installed, not executable
            raise FlashError(
                self.board, f"flash with {self.TOOL}", f"cannot run {argv[0]!r}: {exc}", log=str(log_path)
            ) from None
        if proc.returncode != 0:
            raise FlashError(
                self.board,
                f"flash with {self.TOOL}",
                f"exit code {proc.returncode}; output: {_tail(log_path)}",
                log=str(log_path),
            )
        detail = {"image": str(path), "bytes_written": len(data), "write_s": round(time.monotonic() - t, 3)}
        try:
            with step(self.board, "identify after flashing"):
                identity = self._identify()
        except Exception as exc:
            raise FlashError(
                self.board, f"identify the DUT after {self.TOOL}", str(exc), log=str(log_path)
            ) from None
        if expected and identity.model_sha256 != expected:
            raise FlashError(
                self.board,
                "verify the DUT's model",
                f"DUT reports model sha256 {identity.model_sha256}, the image is {expected}",
                log=str(log_path),
            )
        return done(False, round(time.monotonic() - t0, 3), identity, str(log_path), detail)


def _tail(log_path: Path) -> str:
    lines = [line for line in log_path.read_text(errors="replace").splitlines()[1:] if line.strip()]
    return " | ".join(lines[-TAIL_LINES:]) or "(none)"
