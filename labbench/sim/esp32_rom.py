"""The ESP32's boot ROM for the simulated MCU board: serial loader, flasher stub, NOR flash, boot.

`Esp32BootRom` is the boot-ROM personality of `labbench.sim.mcu.SimMcuBoard` for families flashed
with esptool. The board owns the DevKitC reset circuit (DTR/RTS -> EN/IO0, IO0 latched as EN
rises) and the UART (RFC 2217, line-rate timing, 3 % baud tolerance); on every boot it calls
`run(board, download)`, which prints the ROM banner and then:

- download boot (IO0 low): "waiting for download", and the serial loader serves the host until
  esptool makes it run the flash (FLASH_END) or resets the chip;
- flash boot: the second-stage bootloader's job, built in here: the partition table at 0x8000
  names the app partition, and a valid app image there (`labbench.firmware_image`) boots: `run`
  returns and the board's DUT firmware runs the model the image carries. Otherwise the chip prints
  the ROM's ``invalid header: 0x...`` line and why, then repeats that line in a boot loop that
  never answers the serial loader, as the chip does: only a reset into download mode (IO0 low,
  esptool's default reset) reaches the loader again.

The ROM loader reaches the flash only after SPI_ATTACH routes its pins (the stub attaches at start):
before that flash reads return 0xFF and RDID 0xFFFFFF (MISO idles high), and erase and program are
refused. Encrypted writes (the stub's FLASH_BEGIN flag, `write-flash --encrypt`) go through the
flash-encryption engine as on a chip whose eFuses were never burnt: BLOCK1's all-zero key and
FLASH_CRYPT_CONFIG 0, so the flash holds what `espsecure encrypt-flash-data` makes of the data with a
zero key and `--flash-crypt-conf 0`, never the plaintext. The flash chip keeps its status registers (RDSR/RDSR2/RDSR3, WRSR/WRSR2/WRSR3 after WREN or
the volatile-write enable 0x50, WRDI) across chip resets, as the flash is not reset with the ESP32.

Faithful enough that the unmodified esptool 5.x connects with its default reset, uploads its stub,
reads the MAC and the flash ID, writes (plain and deflated, before and after a baud change),
verifies, reads back, erases and hard-resets the board
(``shared/reference/esptool-serial-protocol.md``). `Esp32Loader` is the ROM loader and, once the
uploaded stub is recognised as one esptool ships, the flasher stub (4 vs 2 status bytes, ASCII vs
raw MD5, stub-only commands). Hand-written because no library implements the device side of this
protocol; command ids, register addresses, the chip magic, the checksum seed and the stub images
come from esptool itself. `SpiFlash` gives the board's flash store NOR semantics (erase sets 0xFF
by 4 KB sector, programming can only clear bits).
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from espsecure import (  # type: ignore[import-untyped]
    _flash_encryption_tweak_key,
    _flash_encryption_tweak_range_bits,
)
from esptool.loader import ESPLoader, StubFlasher
from esptool.targets.esp32 import ESP32ROM

from labbench import firmware_image
from labbench.firmware_image import AppImage, ImageError

if TYPE_CHECKING:
    from labbench.sim.mcu import SimMcuBoard

CMD = ESPLoader.ESP_CMDS
SECTOR_BYTES = ESPLoader.FLASH_SECTOR_SIZE
FLASH_ID = 0x1640EF  # Winbond W25Q32: manufacturer 0xEF, 4 MB
SYNC_VALUE = 0x20120707  # ROM's SYNC reply value; the stub replies 0
ROM_BANNER = "ets Jun  8 2016 00:22:57\r\n\r\n"
DOWNLOAD_BOOT = "boot:0x3 (DOWNLOAD_BOOT(UART0/UART1/SDIO_REI_REO_V2))\r\n"
FLASH_BOOT = "boot:0x13 (SPI_FAST_FLASH_BOOT)\r\n"
POWER_ON, SOFTWARE_RESET = "rst:0x1 (POWERON_RESET),", "rst:0xc (SW_CPU_RESET),"
WAITING = "waiting for download\r\n"
XTAL_HZ, STUB_APB_HZ = 40_000_000, 80_000_000

# SPI flash opcodes run through the SPI peripheral's user-command registers
SPI_CMD_USR = 1 << 18
SFDP = bytes.fromhex("53464450050101ff00050110800000ffef000101800000ff")  # signature, 2 headers

# W25Q32JV status registers (datasheet 7.1): writable bits of SR1, SR2 (LB1-3 one-time), SR3
SR_WRITABLE, SR2_ONE_TIME = (0xFC, 0x7B, 0x64), 0x38
SR1_WEL = 0x02
SPI_USR_MOSI, SPI_USR_MISO = 1 << 27, 1 << 28

# Flash encryption eFuses of a chip that never had flash encryption: BLOCK1 key and FLASH_CRYPT_CONFIG
BLANK_FLASH_KEY, BLANK_CRYPT_CONFIG = bytes(32), 0
ENCRYPTED_WRITE_ALIGN = ESP32ROM.FLASH_ENCRYPTED_WRITE_ALIGN

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
    """NOR semantics over a board's flash store (`read`, `write`, `erase`, `size_bytes`), and the
    flash chip's status registers (`status`: SR1..SR3, kept by the caller across chip resets)."""

    def __init__(self, store, status: bytearray | None = None):
        self.store = store
        self.size_bytes = store.size_bytes
        self.status = status if status is not None else bytearray(3)
        self.write_enable = False  # WEL (WREN) or the volatile-SR write enable (0x50)

    def command(self, opcode: int, mosi: bytes, address: int) -> int:
        """One SPI flash command run through the SPI peripheral's user-command registers; the bits
        the chip shifts out on MISO (little-endian, as they land in W0)."""
        if opcode == 0x9F:  # RDID
            return FLASH_ID
        if opcode == 0x5A:  # read SFDP, 24-bit address
            return int.from_bytes(SFDP[address : address + 4].ljust(4, b"\xff"), "little")
        if opcode in (0x05, 0x35, 0x15):  # RDSR, RDSR2, RDSR3
            index = (0x05, 0x35, 0x15).index(opcode)
            return self.status[index] | (SR1_WEL if index == 0 and self.write_enable else 0)
        if opcode in (0x06, 0x50):  # WREN, write enable for volatile status register
            self.write_enable = True
        elif opcode == 0x04:  # WRDI
            self.write_enable = False
        elif opcode in (0x01, 0x31, 0x11) and self.write_enable:  # WRSR (1 or 2 bytes), WRSR2, WRSR3
            first = (0x01, 0x31, 0x11).index(opcode)
            for index, value in enumerate(mosi[: 2 if opcode == 0x01 else 1], first):
                old = self.status[index]
                new = (old & ~SR_WRITABLE[index] | value & SR_WRITABLE[index]) & 0xFF
                if index == 1:
                    new |= old & SR2_ONE_TIME
                self.status[index] = new
            self.write_enable = False
        return 0

    def _check(self, offset: int, size: int) -> None:
        if offset < 0 or size < 0 or offset + size > self.size_bytes:
            raise LoaderError(ROM_FAILED, f"flash access {offset:#x}+{size:#x} beyond {self.size_bytes:#x}")

    def erase(self, offset: int, size: int) -> None:
        start = offset - offset % SECTOR_BYTES
        end = -(-(offset + size) // SECTOR_BYTES) * SECTOR_BYTES
        self._check(start, end - start)
        self.store.erase(start, end - start)

    def program(self, offset: int, data: bytes) -> None:
        self._check(offset, len(data))
        old = int.from_bytes(self.store.read(offset, len(data)), "little")
        self.store.write(offset, (old & int.from_bytes(data, "little")).to_bytes(len(data), "little"))

    def read(self, offset: int, size: int) -> bytes:
        self._check(offset, size)
        return self.store.read(offset, size)

    def md5(self, offset: int, size: int) -> bytes:
        return hashlib.md5(self.read(offset, size)).digest()

    def boot_image(self) -> AppImage:
        """The app the second-stage bootloader would boot; ImageError says why there is none."""
        partitions = firmware_image.parse_partition_table(
            self.read(firmware_image.PARTITION_TABLE_OFFSET, firmware_image.PARTITION_TABLE_BYTES)
        )
        app = firmware_image.boot_partition(partitions)
        try:
            return firmware_image.read_app_image(
                self.read(app.offset, min(app.size, self.size_bytes - app.offset))
            )
        except ImageError as exc:
            raise ImageError(f"image at {app.offset:#x}: {exc}") from None

    def invalid_header(self) -> str:
        """The ROM's line for a flash boot that finds no image header."""
        word = int.from_bytes(self.read(firmware_image.APP_OFFSET, 4), "little")
        return f"invalid header: {word:#010x}\r\n"

    def boot_failure(self, reason: ImageError) -> str:
        """What the chip prints when the flash holds nothing bootable: the ROM's line, then why."""
        return f"{self.invalid_header()}E (40) boot: {reason}\r\n"


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


def flash_encrypt(
    data: bytes, address: int, key: bytes = BLANK_FLASH_KEY, crypt_config: int = BLANK_CRYPT_CONFIG
) -> bytes:
    """ESP32 flash encryption of `data` written at `address`: per 16-byte block, byte-reversed, AES
    decryption with the key tweaked by the block's 32-byte-aligned offset (as espsecure models the
    hardware; `crypt_config` selects the tweaked key bits)."""
    tweak_bits, key_int = _flash_encryption_tweak_range_bits(crypt_config), int.from_bytes(key, "big")
    out = bytearray()
    for pos in range(0, len(data), 16):
        block_key = _flash_encryption_tweak_key(key_int, address + pos, tweak_bits)
        aes = Cipher(algorithms.AES(block_key), modes.ECB()).decryptor()
        out += aes.update(data[pos : pos + 16][::-1])[::-1]
    return bytes(out)


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
    encrypted: bool = False  # through the flash-encryption engine, in 32-byte units
    pending: bytearray = field(default_factory=bytearray)  # plaintext short of a whole unit


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

    def __init__(
        self,
        flash: SpiFlash,
        registers: dict[int, int],
        send: Callable[[bytes], None],
        set_baud: Callable[[int], None],
    ):
        self.flash, self.registers, self._send, self._set_baud = flash, registers, send, set_baud
        self._stubs = _known_stubs()
        self.stub = False
        self.attached = False  # SPI_ATTACH has routed the flash pins (the stub attaches at start)
        self.exit: str | None = None  # "run" (user code), "reboot", "rom" (stub back to ROM), "halt"
        self._rx = bytearray()
        self._download: _Download | None = None
        self._reading: _Reading | None = None
        self._ram: dict[int, bytearray] = {}
        self._mem: tuple[int, int] | None = None  # MEM_BEGIN (address, size)
        self._clock_divider(115200)

    # -- byte stream -----------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Bytes from the host; complete SLIP frames are executed in order, other bytes ignored."""
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
            frame = (
                bytes(self._rx[start + 1 : end]).replace(b"\xdb\xdc", b"\xc0").replace(b"\xdb\xdd", b"\xdb")
            )
            del self._rx[:end]  # the closing delimiter may open the next frame
            if frame and self.exit is None:
                self._frame(frame)

    def _clock_divider(self, baud: int) -> None:
        """UART_CLKDIV as the chip sets it: APB clock (crystal in the ROM, PLL in the stub) / baud."""
        self.registers[ESP32ROM.UART_CLKDIV_REG] = round((STUB_APB_HZ if self.stub else XTAL_HZ) / baud)

    @property
    def read_pending(self) -> bool:
        """A READ_FLASH transfer may send its next packet."""
        r = self._reading
        return r is not None and r.sent < r.length and r.sent - r.acked < r.max_unacked * r.packet_bytes

    def _reply(self, op: int, value: int = 0, data: bytes = b"", error: int = 0) -> None:
        status = bytes([1 if error else 0, error]) + (b"" if self.stub else b"\0\0")
        payload = data + status
        self._send(slip(struct.pack("<BBHI", 1, op, len(payload), value) + payload))

    def _frame(self, frame: bytes) -> None:
        reading = self._reading
        if reading is not None and len(frame) == 4:  # READ_FLASH acknowledgement
            reading.acked = struct.unpack("<I", frame)[0]
            self._read_acked(reading)
            return
        if len(frame) < 8 or frame[0] != 0:
            return
        _, op, size, chk = struct.unpack("<BBHI", frame[:8])
        data = frame[8 : 8 + size]
        handler = self._HANDLERS.get(op)
        if (
            handler is None
            or (op in self._STUB_ONLY and not self.stub)
            or (op in self._ROM_ONLY and self.stub)
        ):
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
            address, value, mask, _delay_us = struct.unpack("<IIII", data[pos : pos + 16])
            self.registers[address] = (self.registers.get(address, 0) & ~mask) | (value & mask)
            if address == ESP32ROM.SPI_REG_BASE and value & mask & SPI_CMD_USR:
                self._spi_user_command()
        return 0, b""

    def _spi_user_command(self) -> None:
        base, regs = ESP32ROM.SPI_REG_BASE, self.registers
        opcode = regs.get(base + ESP32ROM.SPI_USR2_OFFS, 0) & 0xFF
        usr = regs.get(base + ESP32ROM.SPI_USR_OFFS, 0)
        mosi_bits = regs.get(base + ESP32ROM.SPI_MOSI_DLEN_OFFS, 0) + 1 if usr & SPI_USR_MOSI else 0
        miso_bits = regs.get(base + ESP32ROM.SPI_MISO_DLEN_OFFS, 0) + 1 if usr & SPI_USR_MISO else 0
        mosi = b"".join(
            regs.get(base + ESP32ROM.SPI_W0_OFFS + 4 * i, 0).to_bytes(4, "little") for i in range(16)
        )[: mosi_bits // 8]
        address = regs.get(base + 0x04, 0) >> 8  # 24-bit address in the top of the ADDR register
        # without SPI_ATTACH the flash pins are not routed: nothing reaches the chip, MISO idles high
        result = self.flash.command(opcode, mosi, address) if self.attached else 0xFFFFFFFF
        if miso_bits:
            mask = (1 << min(miso_bits, 32)) - 1
            w0 = base + ESP32ROM.SPI_W0_OFFS
            regs[w0] = regs.get(w0, 0) & ~mask & 0xFFFFFFFF | result & mask
        regs[base] &= ~SPI_CMD_USR

    def _spi_attach(self, op, data, chk):
        self.attached = True
        return 0, b""

    def _ok(self, op, data, chk):
        return 0, b""  # SPI_SET_PARAMS: the flash is 4 MB

    def _require_flash(self) -> None:
        if not self.attached:
            raise LoaderError(ROM_FAILED, "flash not attached (SPI_ATTACH first)")

    def _run_user_code(self, op, data, chk):
        self.exit = "run"  # stub: no reply; the boot goes on from flash as after the ROM's loader

    def _change_baudrate(self, op, data, chk):
        new_baud, _old = struct.unpack("<II", data[:8])
        self._reply(op)  # answered at the old rate, then the UART switches
        self._clock_divider(new_baud)
        self._set_baud(new_baud)

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
            return
        text_start, text = self._stubs.get(entry, (0, b""))
        loaded = self._ram.get(text_start)
        if text and loaded is not None and bytes(loaded) == text:
            self.stub = self.attached = True
            self._send(slip(b"OHAI"))
        else:  # some other RAM program: the sim cannot run it; the chip is silent until reset
            self.exit = "halt"
        return

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
        # the stub takes a fifth word, the encrypted-write flag (the ESP32 ROM takes four)
        encrypted = self.stub and len(data) >= 20 and struct.unpack_from("<I", data, 16)[0] != 0
        if size:
            self._require_flash()
            self.flash.erase(offset, size)
        self._download = _Download(
            offset,
            size,
            block_bytes,
            inflate=zlib.decompressobj() if deflate else None,
            encrypted=encrypted,
        )
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
        if d.encrypted:
            self._program_encrypted(d, block)
        else:
            self.flash.program(offset, block)
        d.written += len(block)
        d.seq += 1
        return 0, b""

    def _program_encrypted(self, d: _Download, plain: bytes) -> None:
        """Encrypt and program whole 32-byte units, in order; a tail waits for the next block."""
        done = d.written - len(d.pending)  # bytes of this download already programmed
        d.pending += plain
        whole = len(d.pending) - len(d.pending) % ENCRYPTED_WRITE_ALIGN
        if whole:
            address = d.offset + done
            self.flash.program(address, flash_encrypt(bytes(d.pending[:whole]), address))
            del d.pending[:whole]

    def _flash_end(self, op, data, chk):
        (stay,) = struct.unpack("<I", data[:4]) if len(data) >= 4 else (1,)
        d = self._download
        if d is not None and d.encrypted and d.pending:  # esptool pads to 32 bytes: only odd callers
            tail = bytes(d.pending).ljust(ENCRYPTED_WRITE_ALIGN, b"\xff")
            address = d.offset + d.written - len(d.pending)
            self.flash.program(address, flash_encrypt(tail, address)[: len(d.pending)])
        self._download = None
        self._reply(op)
        # ROM: 0 reboots, 1 runs the user code; stub: 0 reboots into the ROM loader, 1 stays
        if not self.stub:
            self.exit = "run" if stay else "reboot"
        elif not stay:
            self.exit = "rom"

    def _md5(self, op, data, chk):
        offset, size = struct.unpack("<II", data[:8])
        self.flash._check(offset, size)
        digest = self.flash.md5(offset, size) if self.attached else hashlib.md5(b"\xff" * size).digest()
        return 0, digest if self.stub else digest.hex().encode()

    def _erase_flash(self, op, data, chk):
        self.flash.erase(0, self.flash.size_bytes)
        return 0, b""

    def _erase_region(self, op, data, chk):
        offset, size = struct.unpack("<II", data[:8])
        if offset % SECTOR_BYTES or size % SECTOR_BYTES:
            raise LoaderError(ROM_FAILED, "erase region not sector aligned")
        self.flash.erase(offset, size)
        return 0, b""

    def _read_flash_slow(self, op, data, chk):
        offset, length = struct.unpack("<II", data[:8])
        if not self.attached:
            self.flash._check(offset, min(length, 64))
            return 0, b"\xff" * 64
        return 0, self.flash.read(offset, min(length, 64)).ljust(64, b"\xff")

    def _read_flash(self, op, data, chk):
        offset, length, packet_bytes, max_unacked = struct.unpack("<IIII", data[:16])
        self.flash._check(offset, length)
        self._reply(op)
        self._reading = _Reading(offset, length, packet_bytes, max_unacked)

    def send_read_packet(self) -> None:
        """The next READ_FLASH packet; the caller interleaves these with the host's acknowledgements."""
        r = self._reading
        assert r is not None, "no READ_FLASH transfer (send only while read_pending)"
        chunk = self.flash.read(r.offset + r.sent, min(r.packet_bytes, r.length - r.sent))
        r.sent += len(chunk)
        self._send(slip(chunk))

    def _read_acked(self, r: _Reading) -> None:
        if r.acked >= r.length:
            self._reading = None
            self._send(slip(self.flash.md5(r.offset, r.length)))

    _HANDLERS: ClassVar[dict[int, Callable[..., tuple[int, bytes] | None]]] = {
        CMD["SYNC"]: _sync,
        CMD["READ_REG"]: _read_reg,
        CMD["WRITE_REG"]: _write_reg,
        CMD["SPI_ATTACH"]: _spi_attach,
        CMD["SPI_SET_PARAMS"]: _ok,
        CMD["CHANGE_BAUDRATE"]: _change_baudrate,
        CMD["MEM_BEGIN"]: _mem_begin,
        CMD["MEM_DATA"]: _mem_data,
        CMD["MEM_END"]: _mem_end,
        CMD["FLASH_BEGIN"]: _flash_begin,
        CMD["FLASH_DATA"]: _flash_data,
        CMD["FLASH_END"]: _flash_end,
        CMD["FLASH_DEFL_BEGIN"]: _flash_begin,
        CMD["FLASH_DEFL_DATA"]: _flash_data,
        CMD["FLASH_DEFL_END"]: _flash_end,
        CMD["SPI_FLASH_MD5"]: _md5,
        CMD["READ_FLASH_SLOW"]: _read_flash_slow,
        CMD["ERASE_FLASH"]: _erase_flash,
        CMD["ERASE_REGION"]: _erase_region,
        CMD["READ_FLASH"]: _read_flash,
        CMD["RUN_USER_CODE"]: _run_user_code,
    }  # GET_SECURITY_INFO is absent: the ESP32 ROM does not implement it
    _STUB_ONLY: ClassVar[set[int]] = {
        CMD["ERASE_FLASH"],
        CMD["ERASE_REGION"],
        CMD["READ_FLASH"],
        CMD["RUN_USER_CODE"],
    }
    _ROM_ONLY: ClassVar[set[int]] = {CMD["READ_FLASH_SLOW"]}


# ---------------------------------------------------------------------------------------------


class Esp32BootRom:
    """The ESP32 boot ROM as a `SimMcuBoard` boot-ROM personality (see the module docstring)."""

    rom_baud = 115200  # the ROM talks at 115200 (40 MHz crystal); the application sets its own rate

    def __init__(self, mac: bytes | None = None):
        self.mac = mac  # default: derived from the board's name
        self.last_boot = ""  # what the ROM printed at the last boot (for the sim's own reports)
        self.flash_status = bytearray(3)  # the flash chip's SR1..SR3: not reset with the ESP32
        self.boot_loop = False  # flash boot found nothing bootable: the chip loops until reset

    def run(self, board: SimMcuBoard, download: bool) -> None:
        """Runs in the board's CPU thread; returning boots the application from flash."""
        self.boot_loop = False
        flash = SpiFlash(board.flash, self.flash_status)
        text = ROM_BANNER + POWER_ON + (DOWNLOAD_BOOT if download else FLASH_BOOT)
        while True:
            if not download:
                try:
                    app = flash.boot_image()
                except ImageError as exc:
                    self._boot_loop(board, flash, text + flash.boot_failure(exc))
                else:
                    self._say(board, text + _app_boot_log(app))
                    return
            self._say(board, text + WAITING)
            exit = self._serve(board, flash)
            # "run": the ROM jumps to the flash app; "reboot"/"rom": a software reset of the chip
            download = exit == "rom"
            text = (
                ""
                if exit == "run"
                else ROM_BANNER + SOFTWARE_RESET + (DOWNLOAD_BOOT if download else FLASH_BOOT)
            )

    def _boot_loop(self, board: SimMcuBoard, flash: SpiFlash, text: str) -> None:
        """Nothing bootable: the ROM retries the flash boot for ever, printing its line each time at
        the UART's pace; the loader never runs, so the host's SYNC goes unanswered until a reset
        (ChipReset ends this)."""
        self._say(board, text)
        line = flash.invalid_header().encode()
        self.boot_loop = True
        try:
            while True:
                board.uart.write(line)
                board.uart.read(4096, timeout_s=0)  # what the host sends is lost: no loader reads it
        finally:
            self.boot_loop = False

    def _say(self, board: SimMcuBoard, text: str) -> None:
        self.last_boot = text
        board.uart.write(text.encode())

    def _serve(self, board: SimMcuBoard, flash: SpiFlash) -> str:
        """The loader (ROM, then stub) until it leaves; a chip reset ends it with ChipReset."""
        uart = board.uart
        loader = Esp32Loader(
            flash,
            default_registers(self.mac or default_mac(board.name)),
            uart.write,
            lambda baud: setattr(uart, "device_baud", baud),
        )
        while loader.exit is None:
            if loader.read_pending:  # stream READ_FLASH packets, taking acknowledgements as they come
                loader.send_read_packet()
                loader.feed(uart.read(4096, timeout_s=0))
            else:
                loader.feed(uart.read_until(b"\xc0"))
        if loader.exit == "halt":  # RAM code the sim cannot run: silent until the next reset
            while True:
                uart.read(4096)
        return loader.exit


def _app_boot_log(app: AppImage) -> str:
    """The lines ESP-IDF's bootloader and startup code print for this app."""
    return (
        f"I (31) boot: Loaded app from partition at offset {firmware_image.APP_OFFSET:#x}\r\n"
        f"I (52) cpu_start: Project name:     {app.project}\r\n"
        f"I (57) cpu_start: App version:      {app.version}\r\n"
        f"I (62) cpu_start: ELF file SHA256:  {app.model_sha256[:16]}...\r\n"
    )
