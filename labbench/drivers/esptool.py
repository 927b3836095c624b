"""Flash an ESP32 with esptool as a library: skip on MD5, write, verify, hard-reset, check the DUT.

`EsptoolFlasher.build_image(model, out_dir)` packs a .tflite into an ESP-IDF app image, as `labbench
firmware pack` does (the board does so before flashing a model: capabilities.ImageBuilder).
`EsptoolFlasher.flash(image)` takes such an app image (the partition table beside it, named by its
flasher_args.json, goes too) and:

1. connects with esptool's default DTR/RTS reset into the ROM loader;
2. asks the ROM for the MD5 of every region (SPI_FLASH_MD5) and, when all match and `force` is
   not set, writes nothing (`skipped`);
3. otherwise starts the flasher stub, switches to the lab's flash baud and writes the regions that
   differ, deflated; esptool verifies each against the flash's MD5 after writing;
4. hard-resets (RTS) and reads the boot log: a board that stays in the ROM loader ("waiting for
   download", the ROM's "invalid header" line) is a FlashError; otherwise it waits for the DUT's
   `m-ready`;
5. identifies the DUT (`DutSerial.identify`): the model SHA-256 it reports must be the image's.

esptool's output goes to a log file per flash (its path is in the record and in every
FlashError); its progress bars drive a rich progress bar on stderr. esptool's logger is
process-wide, so flashes in one process take turns.

The port is opened here, not by esptool: an ``rfc2217://`` URL gets `LocalTimeoutRfc2217`.
esptool sets the port's read timeout around nearly every command, and pyserial's RFC 2217 client
answers each timeout change by sending every port setting to the server and waiting for its
answers (50 ms or more, twice per command): a deflated 16 KiB block then costs 0.2 s more than
its bytes (benchmarks/flash_throughput.py measures both).
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import serial
from esp_pylib.logger import EspLogBase
from esptool.cmds import attach_flash, detect_chip, reset_chip, run_stub, write_flash
from esptool.loader import DEFAULT_TIMEOUT, ESPLoader
from esptool.util import FatalError
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn, TimeRemainingColumn
from serial import rfc2217

from labbench import firmware_image
from labbench.capabilities import DutIdentity, InstallRecord
from labbench.errors import FlashError
from labbench.steps import step

ROM_BAUD = ESPLoader.ESP_ROM_BAUD  # 115200: the ROM loader's rate after reset
DEFAULT_FLASH_BAUD = 460800
BOOT_WAIT_S = 10.0  # for the DUT's m-ready after the reset (model load included)
_ESPTOOL_TURN = threading.Lock()


class LocalTimeoutRfc2217(rfc2217.Serial):
    """pyserial's RFC 2217 client whose read timeout stays local, as it is on every other port.

    The server has no use for it; SerialBase's setter reconfigures the port anyway, which this
    client turns into a renegotiation of baud rate, data size, parity and stop bits."""

    @property
    def timeout(self) -> float | None:
        return self._timeout

    @timeout.setter
    def timeout(self, timeout: float | None) -> None:
        if timeout is not None and timeout < 0:
            raise ValueError(f"Not a valid timeout: {timeout!r}")
        self._timeout = timeout


def open_port(url: str, timeout_s: float = DEFAULT_TIMEOUT) -> serial.SerialBase:
    """The port esptool gets: `LocalTimeoutRfc2217` for an rfc2217:// URL, pyserial's own otherwise."""
    if url.startswith("rfc2217://"):
        return LocalTimeoutRfc2217(url, timeout=timeout_s)
    return serial.serial_for_url(url, timeout=timeout_s)


class _LogToFile(EspLogBase):
    """esptool's output into the flash log; its progress into a rich progress bar."""

    def __init__(self, log_file: IO[str], progress: Progress | None):
        self._file, self._progress = log_file, progress
        self._task: TaskID | None = None
        self._partial = ""
        self.lines: list[str] = []

    def _line(self, text: str, end: str = "\n") -> None:
        text = self._partial + re.sub(r"\[/?[a-z ]+\]", "", text) + end  # drop esptool's rich markup
        *lines, self._partial = text.split("\n")
        for line in lines:
            self._file.write(line + "\n")
            self.lines.append(line)
        self._file.flush()

    def print(self, *args: Any, **kwargs: Any) -> None:
        self._line(kwargs.get("sep", " ").join(str(a) for a in args), kwargs.get("end", "\n"))

    def err(self, *args: Any, suggestion: str | None = None) -> None:
        self._line("ERROR: " + " ".join(str(a) for a in args))

    def warn(self, *args: Any, suggestion: str | None = None) -> None:
        self._line("WARNING: " + " ".join(str(a) for a in args))

    def note(self, *args: Any) -> None:
        self._line("NOTE: " + " ".join(str(a) for a in args))

    def hint(self, *args: Any) -> None:
        self._line(" ".join(str(a) for a in args))

    def debug(self, *args: Any) -> None:
        pass

    def set_verbosity(self, mode: int | str) -> None:
        pass

    def progress_bar(
        self, cur_iter: int, total_iters: int, prefix: str = "", suffix: str = "", bar_length: int = 30
    ) -> None:
        if self._progress is None:
            return
        if self._task is None or cur_iter == 0:
            self._task = self._progress.add_task(prefix.strip() or "esptool", total=total_iters)
        self._progress.update(self._task, completed=cur_iter, total=total_iters, description=prefix.strip())
        if cur_iter >= total_iters:
            self._line(f"{prefix.strip()} {suffix.strip()}")
            self._task = None


class EsptoolFlasher:
    """The Flasher of ESP32 boards (see the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        board: str = "esp32",
        baud: int = DEFAULT_FLASH_BAUD,
        dut_baud: int = 115200,
        log_dir: str | Path = "reports/flash",
        show_progress: bool = True,
    ):
        """esptool's own per-command timeouts bound every step (lab.yaml's flash.timeout_s is the
        command flashers')."""
        self.url, self.board, self.baud = url, board, baud
        self.dut_baud = dut_baud
        self.log_dir = Path(log_dir)
        self.show_progress = show_progress

    @classmethod
    def from_lab(cls, entry: Any, family: Any = None) -> EsptoolFlasher:
        flash = entry.flash
        return cls(
            entry.serial.url,
            board=entry.name,
            baud=(flash.baud if flash and flash.baud else DEFAULT_FLASH_BAUD),
            dut_baud=entry.serial.baud,
        )

    def __repr__(self) -> str:
        return f"EsptoolFlasher({self.board!r}, {self.url!r})"

    def build_image(self, model: Path, out_dir: Path) -> Path:
        """The app image embedding `model`, with its partition layout and flash manifest, in `out_dir`."""
        return firmware_image.pack(model, out_dir, board="esp32").image

    def _identify(self) -> DutIdentity:
        from labbench.drivers.dut_serial import DutSerial

        with DutSerial(self.url, board=self.board, baud=self.dut_baud) as dut:
            return dut.identify()

    # -- Flasher ----------------------------------------------------------------------------------

    def flash(self, image: str, *, force: bool = False) -> InstallRecord:
        t0 = time.monotonic()
        files = [(offset, path.read_bytes(), path.name) for offset, path in firmware_image.flash_files(image)]
        app = next(data for offset, data, _ in files if offset == firmware_image.APP_OFFSET)
        try:
            expected_sha = firmware_image.read_app_image(app).model_sha256
        except firmware_image.ImageError:
            expected_sha = None  # flashed all the same: the boot check reports what the board makes of it
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{self.board}-{datetime.now():%Y%m%d-%H%M%S-%f}.log"
        detail: dict[str, Any] = {
            "image": str(image),
            "regions": [{"offset": offset, "file": name, "bytes": len(data)} for offset, data, name in files],
        }
        with (
            step(self.board, "flash with esptool", Path(image).name),
            _ESPTOOL_TURN,
            open(log_path, "w") as log_file,
            self._progress() as progress,
        ):
            logger = _LogToFile(log_file, progress)
            previous = _swap_logger(logger)
            try:
                detail |= self._session(files, force, logger)
            finally:
                _swap_logger(previous)
        if detail["stayed_in_loader"]:
            raise FlashError(
                self.board,
                "boot after flashing",
                f"stayed in the ROM loader: {_loader_reason(detail['boot_log'])}",
                log=str(log_path),
            )
        with step(self.board, "identify after flashing"):
            identity = self._checked_identity(expected_sha, log_path)
        return InstallRecord(
            self.board,
            "esptool",
            firmware_sha256=hashlib.sha256(app).hexdigest(),
            model_sha256=expected_sha,
            skipped=detail.pop("skipped"),
            seconds=round(time.monotonic() - t0, 3),
            identity=identity,
            log=str(log_path),
            detail=detail,
        )

    def _progress(self) -> Progress:
        return Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
            disable=not self.show_progress,
        )

    def _session(
        self, files: list[tuple[int, bytes, str]], force: bool, logger: _LogToFile
    ) -> dict[str, Any]:
        """One esptool connection: MD5 check, write, reset, boot log."""
        action = "connect"
        port = None
        try:
            port = open_port(self.url)
            esp = detect_chip(port, baud=ROM_BAUD)
            action = "compare flash MD5"
            t = time.monotonic()
            attach_flash(esp)  # the ROM computes the MD5s: no stub upload when nothing needs writing
            stale = [
                (offset, data, name)
                for offset, data, name in files
                if force
                or esp.flash_md5sum(offset, len(_padded(data))) != hashlib.md5(_padded(data)).hexdigest()
            ]
            result: dict[str, Any] = {
                "md5_check_s": round(time.monotonic() - t, 3),
                "skipped": not stale,
                "bytes_written": sum(len(data) for _, data, _ in stale),
                "baud": ROM_BAUD,
            }
            if stale:
                action = "start the flasher stub"
                esp = run_stub(esp)
                attach_flash(esp)
                if self.baud != ROM_BAUD:
                    action = f"change baud to {self.baud}"
                    esp.change_baud(self.baud)
                    result["baud"] = self.baud
                action = "write and verify flash"
                t = time.monotonic()
                write_flash(esp, [(offset, data) for offset, data, _ in stale], compress=True)
                result["write_s"] = round(time.monotonic() - t, 3)
            action = "hard reset"
            port.baudrate = ROM_BAUD  # the ROM and the bootloader log at 115200, the app at its own rate
            reset_chip(esp, "hard-reset")
            boot = _read_boot_log(port, BOOT_WAIT_S, self.dut_baud)
            logger.print("boot log after reset:\n" + boot)
            return result | {
                "boot_log": boot,
                "stayed_in_loader": "waiting for download" in boot or "invalid header" in boot,
            }
        except (FatalError, serial.SerialException, OSError) as exc:
            tail = "; ".join(logger.lines[-3:])
            raise FlashError(
                self.board, action, f"{exc} (esptool: {tail})" if tail else str(exc), log=logger._file.name
            ) from None
        finally:
            if port is not None:
                port.close()

    def _checked_identity(self, expected_sha: str | None, log_path: Path) -> DutIdentity:
        try:
            identity = self._identify()
        except FlashError:
            raise
        except Exception as exc:  # DutProtocolError and the like: the board did not come up as a DUT
            raise FlashError(
                self.board, "identify the DUT after flashing", str(exc), log=str(log_path)
            ) from None
        if expected_sha is not None and identity.model_sha256 != expected_sha:
            raise FlashError(
                self.board,
                "verify the DUT's model",
                f"DUT reports model sha256 {identity.model_sha256}, the image carries {expected_sha}",
                log=str(log_path),
            )
        return identity


def _padded(data: bytes) -> bytes:
    """What esptool writes for `data`: padded to 4 bytes."""
    return data + b"\xff" * (-len(data) % 4)


def _swap_logger(new: EspLogBase | None) -> EspLogBase | None:
    from esp_pylib.logger import EspLog

    previous = EspLog.instance
    EspLog.instance = new
    return previous


def _read_boot_log(port: serial.SerialBase, wait_s: float, app_baud: int) -> str:
    """The chip's output after reset: the ROM's and bootloader's lines at 115200 up to the loader's
    prompt or the app's start (its ELF SHA256 line), then the app's banner at `app_baud` up to m-ready."""
    out = bytearray()
    deadline = time.monotonic() + wait_s
    port.timeout = 0.05
    while time.monotonic() < deadline and not re.search(
        rb"waiting for download|invalid header|ELF file SHA256:[^\n]*\n", out
    ):
        out += port.read(4096)
    if b"waiting for download" in out or b"invalid header" in out:  # the loader, or the ROM's boot loop
        return out.decode("latin-1")
    if app_baud != port.baudrate:
        port.baudrate = app_baud
    while time.monotonic() < deadline and b"m-ready" not in out:
        out += port.read(4096)
    return out.decode("latin-1")


def _loader_reason(boot: str) -> str:
    lines = [line.strip() for line in boot.splitlines() if line.strip()]
    why = [line for line in lines if "invalid header" in line or line.startswith("E (")]
    return "; ".join(why or lines[-2:]) or "no boot output"
