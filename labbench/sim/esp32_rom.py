"""The simulated ESP32 below the application: reset circuit, boot ROM, serial loader, flasher stub, flash.

Faithful enough that the unmodified esptool 5.x connects, uploads its stub, reads the MAC and the
flash ID, writes (plain and deflated, before and after a baud change), verifies, reads back,
erases and resets the board (``shared/reference/esptool-serial-protocol.md``):

- `Esp32Chip` is the chip on an ESP32-DevKitC. DTR/RTS drive EN and IO0 through the board's two
  transistors (EN low = RTS and not DTR; IO0 low = DTR and not RTS). The chip leaves reset
  `en_rc_s` after EN is released (the EN pin's RC delay) and latches IO0 then: low = download
  boot (ROM loader, "waiting for download"), high = flash boot. A flash boot runs the app image
  the partition table at 0x8000 points to, when it is valid; otherwise the chip prints the ROM's
  ``invalid header`` line and stays in the loader. Hence a client must turn around the classic
  reset's "EN released, then IO0 low" step within `en_rc_s`: plain ``rfc2217://host:port`` does
  (it waits for the server's acknowledgement, about a millisecond); ``?ign_set_control`` makes
  pyserial sleep 100 ms after every control-line write, so the chip boots the app, as a real
  DevKitC behind a plain RFC 2217 server does (esptool then reports "Wrong boot mode detected").
- `Esp32Loader` is the ROM loader and, once uploaded, the flasher stub (reply formats differ:
  4 vs 2 status bytes, ASCII vs raw MD5, stub-only commands). Hand-written because no library
  implements the device side of this protocol; command ids, register addresses, the chip magic,
  the checksum seed and the stub images come from esptool itself.
- `SpiFlash` is 4 MB of NOR flash (erase sets 0xFF, programming can only clear bits).

The application itself (the MLPerf Tiny DUT) is the MCU board's business: `Esp32Chip` calls
`boot_app(AppImage)` with what the flash holds and `halt()` when the app stops running.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from serial import rfc2217
from esptool.loader import ESPLoader, StubFlasher
from esptool.targets.esp32 import ESP32ROM

from labbench import firmware_image
from labbench.firmware_image import AppImage, ImageError

CMD = ESPLoader.ESP_CMDS
FLASH_SIZE_BYTES = firmware_image.FLASH_SIZE_BYTES
SECTOR_BYTES = ESPLoader.FLASH_SECTOR_SIZE
FLASH_ID = 0x1640EF  # Winbond W25Q32: manufacturer 0xEF, 4 MB
SYNC_VALUE = 0x20120707  # ROM's SYNC reply value; the stub replies 0
ROM_BANNER = "ets Jun  8 2016 00:22:57\r\n\r\n"
DOWNLOAD_BOOT = "rst:0x1 (POWERON_RESET),boot:0x3 (DOWNLOAD_BOOT(UART0/UART1/SDIO_REI_REO_V2))\r\n"
FLASH_BOOT = "rst:0x1 (POWERON_RESET),boot:0x13 (SPI_FAST_FLASH_BOOT)\r\n"
WAITING = "waiting for download\r\n"
XTAL_HZ, STUB_APB_HZ = 40_000_000, 80_000_000
BAUD_TOLERANCE = 0.03  # a UART still decodes bytes sent up to ~3 % off its rate
DEFAULT_EN_RC_S = 0.15

# SPI flash opcodes run through the SPI peripheral's user-command registers
SPI_CMD_USR = 1 << 18
SFDP = bytes.fromhex("53464450050101ff" "00050110800000ff" "ef000101800000ff")  # signature, 2 headers

# Error codes: ROM (serial-protocol.rst) and flasher stub (esp-flasher-stub commands.h)
ROM_INVALID_MESSAGE, ROM_FAILED, ROM_BAD_CHECKSUM, ROM_FLASH_WRITE, ROM_DEFLATE = 0x05, 0x06, 0x07, 0x08, 0x0B
STUB_BAD_LENGTH, STUB_BAD_CHECKSUM, STUB_INVALID_COMMAND = 0xC0, 0xC1, 0xC3
STUB_NOT_IN_FLASH_MODE, STUB_INFLATE, STUB_TOO_MUCH_DATA = 0xC6, 0xC7, 0xC9


class LoaderError(Exception):
    """A request the loader refuses; `code` is the error byte of the reply."""

    def __init__(self, code: int, why: str):
        super().__init__(why)
        self.code = code


# ---------------------------------------------------------------------------------------------


class SpiFlash:
    """NOR flash: erase works on 4 KB sectors and sets 0xFF; programming ANDs bits in."""

    def __init__(self, size_bytes: int = FLASH_SIZE_BYTES):
        self.data = bytearray(b"\xff") * size_bytes

    def _check(self, offset: int, size: int) -> None:
        if offset < 0 or size < 0 or offset + size > len(self.data):
            raise LoaderError(ROM_FAILED, f"flash access {offset:#x}+{size:#x} beyond {len(self.data):#x}")

    def erase(self, offset: int, size: int) -> None:
        start = offset - offset % SECTOR_BYTES
        end = -(-(offset + size) // SECTOR_BYTES) * SECTOR_BYTES
        self._check(start, end - start)
        self.data[start:end] = b"\xff" * (end - start)

    def program(self, offset: int, data: bytes) -> None:
        self._check(offset, len(data))
        old = int.from_bytes(self.data[offset:offset + len(data)], "little")
        self.data[offset:offset + len(data)] = (old & int.from_bytes(data, "little")).to_bytes(len(data), "little")

    def read(self, offset: int, size: int) -> bytes:
        self._check(offset, size)
        return bytes(self.data[offset:offset + size])

    def md5(self, offset: int, size: int) -> bytes:
        self._check(offset, size)
        return hashlib.md5(memoryview(self.data)[offset:offset + size]).digest()

    def load_packed(self, model: bytes, model_name: str) -> None:
        """Flash the partition table and an app image carrying `model`, as `labbench firmware pack` would."""
        for offset, blob in ((firmware_image.PARTITION_TABLE_OFFSET, firmware_image.partition_table_bin()),
                             (firmware_image.APP_OFFSET, firmware_image.build_app_image(model, model_name))):
            self.erase(offset, len(blob))
            self.program(offset, blob)

    def boot_image(self) -> AppImage:
        """The app the second-stage bootloader would boot; ImageError says why there is none."""
        partitions = firmware_image.parse_partition_table(self.read(firmware_image.PARTITION_TABLE_OFFSET,
                                                                    firmware_image.PARTITION_TABLE_BYTES))
        app = firmware_image.boot_partition(partitions)
        try:
            return firmware_image.read_app_image(self.read(app.offset, min(app.size, len(self.data) - app.offset)))
        except ImageError as exc:
            raise ImageError(f"image at {app.offset:#x}: {exc}") from None

    def boot_failure(self, reason: ImageError) -> str:
        """What the chip prints when the flash holds nothing bootable: the ROM's line, then why."""
        word = int.from_bytes(self.read(firmware_image.APP_OFFSET, 4), "little")
        return f"invalid header: {word:#010x}\r\nE (40) boot: {reason}\r\n"


# ---------------------------------------------------------------------------------------------


def default_mac(name: str) -> bytes:
    """A stable MAC in Espressif's OUI (24:0a:c4) derived from the board name."""
    return bytes.fromhex("240ac4") + hashlib.sha256(name.encode()).digest()[:3]


def default_registers(mac: bytes) -> dict[int, int]:
    """What esptool reads to detect an ESP32-D0WD-V3 rev 3.0 with a 40 MHz crystal and `mac`."""
    efuse = ESP32ROM.EFUSE_RD_REG_BASE
    ck8m_freq, cali = 100, 1024  # ROM-calibrated crystal: cali * 15625 * ck8m / 40 = 40 MHz
    return {
        ESPLoader.CHIP_DETECT_MAGIC_REG_ADDR: ESP32ROM.MAGIC_VALUE,
        efuse + 4: int.from_bytes(mac[2:6], "big"),  # MAC bytes 2..5
        efuse + 8: int.from_bytes(mac[0:2], "big"),  # MAC bytes 0..1
        efuse + 12: (1 << 9) | (1 << 13) | (1 << 15),  # package D0WD, 240 MHz rated, rev bit 0
        efuse + 16: (0x14 << 8) | ck8m_freq,  # ADC Vref calibrated, 8 MHz clock calibration
        efuse + 20: 1 << 20,  # rev bit 1
        ESP32ROM.APB_CTL_DATE_ADDR: (1 << ESP32ROM.APB_CTL_DATE_S) | 0x16042000,  # rev bit 2
        ESP32ROM.RTCCALICFG1: cali << ESP32ROM.TIMERS_RTC_CALI_VALUE_S,
    }


def slip(packet: bytes) -> bytes:
    return b"\xc0" + packet.replace(b"\xdb", b"\xdb\xdd").replace(b"\xc0", b"\xdb\xdc") + b"\xc0"


def _checksum(data: bytes) -> int:
    """ESPLoader.checksum (XOR seeded with ESP_CHECKSUM_MAGIC), vectorised for 16 KB blocks."""
    return int(np.bitwise_xor.reduce(np.frombuffer(data, np.uint8), initial=ESPLoader.ESP_CHECKSUM_MAGIC))


def _known_stubs() -> dict[int, tuple[int, bytes]]:
    """Entry point -> (text address, text) of the ESP32 flasher stubs esptool ships (v2, legacy v1)."""
    stubs = {}
    for subdir in StubFlasher.STUB_SUBDIRS:
        path = Path(StubFlasher.STUB_DIR) / subdir / "esp32.json"
        if path.exists():
            stub = json.loads(path.read_text())
            stubs[stub["entry"]] = (stub["text_start"], base64.b64decode(stub["text"]))
    return stubs


@dataclass
class _Download:
    """An open FLASH_BEGIN / FLASH_DEFL_BEGIN session."""

    offset: int
    size: int
    block_bytes: int
    written: int = 0
    seq: int = 0
    inflate: zlib._Decompress | None = None


@dataclass
class _Reading:
    """A stub READ_FLASH transfer waiting for the host's acknowledgements."""

    offset: int
    length: int
    packet_bytes: int
    max_unacked: int
    sent: int = 0
    acked: int = 0


class Esp32Loader:
    """The ROM serial loader, and the flasher stub after esptool uploads and starts it."""

    def __init__(self, flash: SpiFlash, registers: dict[int, int], send: Callable[[bytes], None],
                 on_run_user_code: Callable[[bool], None]):
        self.flash, self.registers, self._send = flash, registers, send
        self._run_user_code = on_run_user_code  # called with reboot=True/False after FLASH_END
        self._stubs = _known_stubs()
        self.stub = False
        self.uart_baud: int | None = None  # None: the ROM autobauds on SYNC
        self.halted = False  # running RAM code the sim cannot execute
        self._rx = bytearray()
        self._download: _Download | None = None
        self._reading: _Reading | None = None
        self._ram: dict[int, bytearray] = {}
        self._mem: tuple[int, int] | None = None  # MEM_BEGIN (address, size)
        self.set_uart_baud(None)

    # -- byte stream -----------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Bytes from the host; complete SLIP frames are executed in order, other bytes ignored."""
        if self.halted:
            return
        self._rx += data
        while True:
            start = self._rx.find(b"\xc0")
            if start < 0:
                self._rx.clear()
                return
            end = self._rx.find(b"\xc0", start + 1)
            if end < 0:
                del self._rx[:start]
                return
            frame = bytes(self._rx[start + 1:end]).replace(b"\xdb\xdc", b"\xc0").replace(b"\xdb\xdd", b"\xdb")
            del self._rx[:end]  # the closing delimiter may open the next frame
            if frame:
                self._frame(frame)

    def set_uart_baud(self, baud: int | None) -> None:
        self.uart_baud = baud
        apb_hz = STUB_APB_HZ if self.stub else XTAL_HZ
        self.registers[ESP32ROM.UART_CLKDIV_REG] = round(apb_hz / (baud or 115200))

    def _reply(self, op: int, value: int = 0, data: bytes = b"", error: int = 0) -> None:
        status = bytes([1 if error else 0, error]) + (b"" if self.stub else b"\0\0")
        payload = data + status
        self._send(slip(struct.pack("<BBHI", 1, op, len(payload), value) + payload))

    def _frame(self, frame: bytes) -> None:
        if self._reading is not None and len(frame) == 4:  # READ_FLASH acknowledgement
            self._reading.acked = struct.unpack("<I", frame)[0]
            self._pump_read()
            return
        if len(frame) < 8 or frame[0] != 0:
            return
        _, op, size, chk = struct.unpack("<BBHI", frame[:8])
        data = frame[8:8 + size]
        handler = self._HANDLERS.get(op)
        if handler is None or (op in self._STUB_ONLY and not self.stub) or (op in self._ROM_ONLY and self.stub):
            self._reply(op, error=STUB_INVALID_COMMAND if self.stub else ROM_INVALID_MESSAGE)
            return
        try:
            if len(data) != size:
                raise LoaderError(STUB_BAD_LENGTH if self.stub else ROM_INVALID_MESSAGE, "truncated")
            result = handler(self, op, data, chk)
        except LoaderError as exc:
            self._reply(op, error=exc.code)
            return
        if result is not None:
            value, payload = result
            self._reply(op, value, payload)

    # -- commands ----------------------------------------------------------------------------

    def _sync(self, op, data, chk):
        if data[:4] != b"\x07\x07\x12\x20":
            raise LoaderError(ROM_INVALID_MESSAGE, "bad SYNC")
        for _ in range(8):
            self._reply(op, 0 if self.stub else SYNC_VALUE)

    def _read_reg(self, op, data, chk):
        (address,) = struct.unpack("<I", data[:4])
        return self.registers.get(address, 0), b""

    def _write_reg(self, op, data, chk):
        for pos in range(0, len(data) - 15, 16):
            address, value, mask, _delay_us = struct.unpack("<IIII", data[pos:pos + 16])
            self.registers[address] = (self.registers.get(address, 0) & ~mask) | (value & mask)
            if address == ESP32ROM.SPI_REG_BASE and value & mask & SPI_CMD_USR:
                self._spi_user_command()
        return 0, b""

    def _spi_user_command(self) -> None:
        base = ESP32ROM.SPI_REG_BASE
        opcode = self.registers.get(base + ESP32ROM.SPI_USR2_OFFS, 0) & 0xFF
        if opcode == 0x9F:  # RDID
            result = FLASH_ID
        elif opcode == 0x5A:  # read SFDP, 24-bit address in the top of the ADDR register
            address = self.registers.get(base + 0x04, 0) >> 8
            result = int.from_bytes(SFDP[address:address + 4].ljust(4, b"\xff"), "little")
        else:  # status registers read 0; reset, write enable and the like just happen
            result = 0
        self.registers[base + ESP32ROM.SPI_W0_OFFS] = result
        self.registers[base] &= ~SPI_CMD_USR

    def _ok(self, op, data, chk):
        return 0, b""  # SPI_ATTACH, SPI_SET_PARAMS: the flash is always attached, 4 MB

    def _change_baudrate(self, op, data, chk):
        new_baud, _old = struct.unpack("<II", data[:8])
        self._reply(op)  # answered at the old rate, then the UART switches
        self.set_uart_baud(new_baud)

    def _mem_begin(self, op, data, chk):
        size, _blocks, _block_bytes, address = struct.unpack("<IIII", data[:16])
        self._mem = (address, size)
        self._ram[address] = bytearray()
        return 0, b""

    def _mem_data(self, op, data, chk):
        block = self._data_block(data, chk)
        if self._mem is None:
            raise LoaderError(ROM_FAILED, "MEM_DATA without MEM_BEGIN")
        self._ram[self._mem[0]] += block
        return 0, b""

    def _mem_end(self, op, data, chk):
        no_entry, entry = struct.unpack("<II", data[:8])
        self._reply(op)
        if no_entry:
            return None
        text_start, text = self._stubs.get(entry, (None, b""))
        if text and self._ram.get(text_start) == text:
            self.stub = True
            self.set_uart_baud(self.uart_baud)
            self._send(slip(b"OHAI"))
        else:  # some other RAM program: the sim cannot run it; the chip is silent until reset
            self.halted = True
        return None

    def _data_block(self, data: bytes, chk: int) -> bytes:
        length, _seq = struct.unpack("<II", data[:8])
        block = data[16:]
        if len(block) != length:
            raise LoaderError(STUB_BAD_LENGTH if self.stub else ROM_INVALID_MESSAGE, "block length")
        if _checksum(block) != chk & 0xFF:
            raise LoaderError(STUB_BAD_CHECKSUM if self.stub else ROM_BAD_CHECKSUM, "checksum")
        return block

    def _flash_begin(self, op, data, chk):
        size, _blocks, block_bytes, offset = struct.unpack("<IIII", data[:16])
        deflate = op == CMD["FLASH_DEFL_BEGIN"]
        if size:
            self.flash.erase(offset, size)
        self._download = _Download(offset, size, block_bytes, inflate=zlib.decompressobj() if deflate else None)
        return 0, b""

    def _flash_data(self, op, data, chk):
        block = self._data_block(data, chk)
        d = self._download
        if d is None or (d.inflate is None) != (op == CMD["FLASH_DATA"]):
            raise LoaderError(STUB_NOT_IN_FLASH_MODE if self.stub else ROM_FAILED, "not in flash mode")
        (seq,) = struct.unpack("<I", data[4:8])
        if seq != d.seq:
            raise LoaderError(ROM_FAILED, f"block {seq}, expected {d.seq}")
        if d.inflate is not None:
            try:
                block = d.inflate.decompress(block)
            except zlib.error:
                raise LoaderError(STUB_INFLATE if self.stub else ROM_DEFLATE, "inflate") from None
            if d.written + len(block) > d.size:
                raise LoaderError(STUB_TOO_MUCH_DATA if self.stub else ROM_FLASH_WRITE, "more than announced")
            offset = d.offset + d.written
        else:
            offset = d.offset + seq * d.block_bytes
        self.flash.program(offset, block)
        d.written += len(block)
        d.seq += 1
        return 0, b""

    def _flash_end(self, op, data, chk):
        (stay,) = struct.unpack("<I", data[:4]) if len(data) >= 4 else (1,)
        self._download = None
        self._reply(op)
        if not stay or not self.stub:
            # ROM: 0 reboots, 1 runs the user code; stub: 0 reboots back into the ROM loader
            self._run_user_code(not stay)
        return None

    def _md5(self, op, data, chk):
        offset, size = struct.unpack("<II", data[:8])
        digest = self.flash.md5(offset, size)
        return 0, digest if self.stub else digest.hex().encode()

    def _erase_flash(self, op, data, chk):
        self.flash.erase(0, len(self.flash.data))
        return 0, b""

    def _erase_region(self, op, data, chk):
        offset, size = struct.unpack("<II", data[:8])
        if offset % SECTOR_BYTES or size % SECTOR_BYTES:
            raise LoaderError(ROM_FAILED, "erase region not sector aligned")
        self.flash.erase(offset, size)
        return 0, b""

    def _read_flash_slow(self, op, data, chk):
        offset, length = struct.unpack("<II", data[:8])
        return 0, self.flash.read(offset, min(length, 64)).ljust(64, b"\xff")

    def _read_flash(self, op, data, chk):
        offset, length, packet_bytes, max_unacked = struct.unpack("<IIII", data[:16])
        self.flash._check(offset, length)
        self._reply(op)
        self._reading = _Reading(offset, length, packet_bytes, max_unacked)
        self._pump_read()
        return None

    def _pump_read(self) -> None:
        r = self._reading
        while r.sent < r.length and r.sent - r.acked < r.max_unacked * r.packet_bytes:
            chunk = self.flash.read(r.offset + r.sent, min(r.packet_bytes, r.length - r.sent))
            self._send(slip(chunk))
            r.sent += len(chunk)
        if r.acked >= r.length:
            self._send(slip(self.flash.md5(r.offset, r.length)))
            self._reading = None

    _HANDLERS = {
        CMD["SYNC"]: _sync, CMD["READ_REG"]: _read_reg, CMD["WRITE_REG"]: _write_reg,
        CMD["SPI_ATTACH"]: _ok, CMD["SPI_SET_PARAMS"]: _ok, CMD["CHANGE_BAUDRATE"]: _change_baudrate,
        CMD["MEM_BEGIN"]: _mem_begin, CMD["MEM_DATA"]: _mem_data, CMD["MEM_END"]: _mem_end,
        CMD["FLASH_BEGIN"]: _flash_begin, CMD["FLASH_DATA"]: _flash_data, CMD["FLASH_END"]: _flash_end,
        CMD["FLASH_DEFL_BEGIN"]: _flash_begin, CMD["FLASH_DEFL_DATA"]: _flash_data,
        CMD["FLASH_DEFL_END"]: _flash_end, CMD["SPI_FLASH_MD5"]: _md5, CMD["READ_FLASH_SLOW"]: _read_flash_slow,
        CMD["ERASE_FLASH"]: _erase_flash, CMD["ERASE_REGION"]: _erase_region, CMD["READ_FLASH"]: _read_flash,
    }  # GET_SECURITY_INFO is absent: the ESP32 ROM does not implement it
    _STUB_ONLY = {CMD["ERASE_FLASH"], CMD["ERASE_REGION"], CMD["READ_FLASH"]}
    _ROM_ONLY = {CMD["READ_FLASH_SLOW"]}


# ---------------------------------------------------------------------------------------------


class Esp32Chip:
    """An ESP32 on a DevKitC: auto-reset circuit, boot modes, the loader, and the app hand-off.

    `send(bytes)` carries the chip's UART output; `boot_app(AppImage)` starts the application a
    flash boot found; `halt()` stops it (the chip went into reset). Thread-safe: line changes,
    host bytes and the boot timer may come from different threads.
    """

    def __init__(self, name: str, send: Callable[[bytes], None], boot_app: Callable[[AppImage], None],
                 halt: Callable[[], None], flash: SpiFlash | None = None, mac: bytes | None = None,
                 en_rc_s: float = DEFAULT_EN_RC_S):
        self.name, self._send, self._boot_app, self._halt = name, send, boot_app, halt
        self.flash = flash or SpiFlash()
        self.mac = mac or default_mac(name)
        self.en_rc_s = en_rc_s
        self.state = "reset"  # reset | loader | app | halted
        self.last_boot: str = ""  # the boot log of the last reset, for the sim's own reports
        self._lock = threading.RLock()
        self._dtr = self._rts = False
        self._generation = 0
        self.loader = self._new_loader()

    def _new_loader(self) -> Esp32Loader:
        return Esp32Loader(self.flash, default_registers(self.mac), self._send, self._on_flash_end)

    # -- lines -------------------------------------------------------------------------------

    @property
    def en_low(self) -> bool:
        return self._rts and not self._dtr

    @property
    def io0_low(self) -> bool:
        return self._dtr and not self._rts

    def set_lines(self, dtr: bool | None = None, rts: bool | None = None) -> None:
        """The host changed DTR and/or RTS (True = asserted)."""
        with self._lock:
            was_low = self.en_low
            self._dtr = self._dtr if dtr is None else dtr
            self._rts = self._rts if rts is None else rts
            if self.en_low and not was_low:
                self._generation += 1
                self._enter_reset()
            elif was_low and not self.en_low:
                self._generation += 1
                timer = threading.Timer(self.en_rc_s, self._leave_reset, args=(self._generation,))
                timer.daemon = True
                timer.start()

    def _enter_reset(self) -> None:
        if self.state == "app":
            self._halt()
        self.state = "reset"

    def _leave_reset(self, generation: int) -> None:
        with self._lock:
            if generation == self._generation and not self.en_low:
                self.boot(download=self.io0_low)

    # -- boot --------------------------------------------------------------------------------

    def power_on(self) -> None:
        """Power applied with nothing on the lines: a flash boot."""
        self.boot(download=False)

    def boot(self, download: bool, banner: bool = True) -> None:
        """Leave reset: the ROM prints its banner, then waits for the host or boots the flash."""
        with self._lock:
            self.loader = self._new_loader()
            self.loader.registers[ESP32ROM.GPIO_STRAP_REG] = 0x03 if download else 0x13
            text = ROM_BANNER + (DOWNLOAD_BOOT if download else FLASH_BOOT) if banner else ""
            if download:
                self._enter_loader(text + WAITING)
                return
            try:
                app = self.flash.boot_image()
            except ImageError as exc:
                # the ROM's complaint, then (a sim policy) the loader, so the board can be reflashed
                self._enter_loader(text + self.flash.boot_failure(exc) + WAITING)
                return
            self.state = "app"
            self.last_boot = text + _app_boot_log(app)
            self._send(self.last_boot.encode())
            self._boot_app(app)

    def _enter_loader(self, text: str) -> None:
        self.state = "loader"
        self.last_boot = text
        self._send(text.encode())

    def _on_flash_end(self, reboot: bool) -> None:
        """FLASH_END: the ROM reboots (0) or runs the app (1); the stub's 0 re-enters the ROM loader."""
        if self.loader.stub:
            self.boot(download=True, banner=False)
        elif reboot:
            self.boot(download=self.io0_low)
        else:
            self.boot(download=False, banner=False)

    # -- bytes from the host -------------------------------------------------------------------

    def receive(self, data: bytes, line_baud: int | None = None) -> bool:
        """Host bytes while the loader runs; False when they are not for the loader (app, reset).

        Bytes sent at a rate more than 3 % off the loader's UART rate arrive garbled and are lost.
        """
        with self._lock:
            if self.state != "loader":
                return False
            uart = self.loader.uart_baud
            if uart and line_baud and abs(line_baud - uart) > BAUD_TOLERANCE * uart:
                return True
            self.loader.feed(data)
            if self.loader.halted:
                self.state = "halted"
            return True

    @property
    def in_loader(self) -> bool:
        return self.state == "loader"


def _app_boot_log(app: AppImage) -> str:
    """The lines ESP-IDF's bootloader and startup code print for this app."""
    return (f"I (31) boot: Loaded app from partition at offset {firmware_image.APP_OFFSET:#x}\r\n"
            f"I (52) cpu_start: Project name:     {app.project}\r\n"
            f"I (57) cpu_start: App version:      {app.version}\r\n"
            f"I (62) cpu_start: ELF file SHA256:  {app.model_sha256[:16]}...\r\n")



# ---------------------------------------------------------------------------------------------


class _Line:
    """The serial line as pyserial's rfc2217.PortManager drives it: modem lines, baud, purges."""

    bytesize, parity, stopbits, xonxoff, rtscts, break_condition = 8, "N", 1, False, False, False
    cts = dsr = ri = cd = False

    def __init__(self, server: RomSerialServer):
        self._server = server
        self._baudrate = 115200

    @property
    def baudrate(self) -> int:
        return self._baudrate

    @baudrate.setter
    def baudrate(self, baud: int) -> None:
        self._server._flush_rx()
        self._baudrate = baud

    dtr = property(lambda self: self._server.chip._dtr, lambda self, v: self._set(dtr=v))
    rts = property(lambda self: self._server.chip._rts, lambda self, v: self._set(rts=v))

    def _set(self, **lines: bool) -> None:
        self._server._flush_rx()
        self._server.chip.set_lines(**lines)

    def reset_input_buffer(self) -> None:  # purge what the chip sent and the client has not read
        self._server._purge_tx()

    def reset_output_buffer(self) -> None:
        pass


class RomSerialServer:
    """An `Esp32Chip` on its own RFC 2217 port, paced at the client's baud rate both ways.

    For exercising the loader alone (tests, the flashing benchmark): the booted app is recorded
    in `app` and host bytes meant for it are dropped. The sim lab's ESP32 is the MCU board, which
    runs the DUT on top of the same chip.
    """

    def __init__(self, name: str = "esp32", host: str = "127.0.0.1", port: int = 0,
                 flash: SpiFlash | None = None, en_rc_s: float = DEFAULT_EN_RC_S):
        self.chip = Esp32Chip(name, self._emit, self._booted, self._halted, flash=flash, en_rc_s=en_rc_s)
        self.app: AppImage | None = None
        self._address = (host, port)
        self._line = _Line(self)
        self._listener: socket.socket | None = None
        self._client: socket.socket | None = None
        self._manager: rfc2217.PortManager | None = None
        self._tx: list[bytes] = []
        self._tx_ready = threading.Condition()
        self._rx_pending = bytearray()
        self._rx_free_at = 0.0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def port(self) -> int:
        return self._listener.getsockname()[1] if self._listener else self._address[1]

    @property
    def url(self) -> str:
        return f"rfc2217://{self._address[0]}:{self.port}"

    def start(self) -> None:
        self._listener = socket.create_server(self._address, reuse_port=False)
        self._stop.clear()
        for target in (self._accept_loop, self._tx_loop):
            t = threading.Thread(target=target, name=f"{self.chip.name}-{target.__name__}", daemon=True)
            t.start()
            self._threads.append(t)
        self.chip.power_on()

    def stop(self) -> None:
        self._stop.set()
        for sock in (self._client, self._listener):
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
        with self._tx_ready:
            self._tx_ready.notify_all()
        for t in self._threads:
            t.join(timeout=2.0)
        self._threads.clear()
        self._listener = None

    def _booted(self, app: AppImage) -> None:
        self.app = app

    def _halted(self) -> None:
        self.app = None

    # -- chip -> host ----------------------------------------------------------------------

    def _emit(self, data: bytes) -> None:
        with self._tx_ready:
            self._tx.append(data)
            self._tx_ready.notify()

    def _purge_tx(self) -> None:
        with self._tx_ready:
            self._tx.clear()

    def _tx_loop(self) -> None:
        free_at = 0.0
        while not self._stop.is_set():
            with self._tx_ready:
                while not self._tx and not self._stop.is_set():
                    self._tx_ready.wait()
                chunk = b"".join(self._tx)
                self._tx.clear()
            free_at = max(free_at, time.monotonic()) + len(chunk) * 10 / self._line.baudrate
            time.sleep(max(0.0, free_at - time.monotonic()))
            client, manager = self._client, self._manager
            if client is not None and manager is not None and chunk:
                try:
                    client.sendall(b"".join(manager.escape(chunk)))
                except OSError:
                    pass  # nobody listening: the bytes are lost, as on a real line

    # -- host -> chip ----------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """PortManager's connection: telnet replies to the client."""
        client = self._client
        if client is not None:
            try:
                client.sendall(data)
            except OSError:
                pass

    def _flush_rx(self) -> None:
        """Deliver the bytes received so far, once the line has had time to carry them."""
        if not self._rx_pending:
            return
        data = bytes(self._rx_pending)
        self._rx_pending.clear()
        self._rx_free_at = max(self._rx_free_at, time.monotonic()) + len(data) * 10 / self._line.baudrate
        time.sleep(max(0.0, self._rx_free_at - time.monotonic()))
        self.chip.receive(data, self._line.baudrate)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._client = client
            self._manager = rfc2217.PortManager(self._line, self)
            try:
                while not self._stop.is_set():
                    data = client.recv(65536)
                    if not data:
                        break
                    for byte in self._manager.filter(data):
                        self._rx_pending += byte
                    self._flush_rx()
            except OSError:
                pass
            finally:
                self._client = self._manager = None
                client.close()
