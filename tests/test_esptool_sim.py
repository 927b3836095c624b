"""The real esptool against the simulated ESP32 (SimMcuBoard + Esp32BootRom) over RFC 2217.

One command runs esptool's own command line in a subprocess with a URL and its default DTR/RTS
reset. The others run esptool's command line in-process (`esptool.main(argv, esp=...)`, as
pytest-embedded does) on a port opened with esptool's default timeout: the same command code,
without pyserial's RFC 2217 renegotiation around every command that makes each one cost ~0.2 s.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import esptool
import numpy as np
import pytest
import serial
from esptool.cmds import (
    attach_flash,
    detect_chip,
    erase_region,
    read_flash,
    reset_chip,
    run_stub,
    write_flash,
)
from esptool.loader import DEFAULT_TIMEOUT
from esptool.util import FatalError

from labbench import firmware_image
from labbench.drivers.dut_serial import DutSerial
from labbench.modelinfo import ModelInfo, dequantize_output, quantize_input
from labbench.sim.esp32_rom import default_mac

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "fixtures" / "models"
DATA = REPO / "fixtures" / "datasets"
SCRATCH = 0x200000  # a flash region no image uses


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """Two small packed images: the board's boot model and another one."""
    out = tmp_path_factory.mktemp("packed")
    return {
        name: firmware_image.pack(MODELS / f"{name}.tflite", out / name)
        for name in ("digits_mlp_int8", "mnist5k_mlp_int8")
    }


def connect(esp32) -> esptool.ESPLoader:
    port = serial.serial_for_url(esp32.url, timeout=DEFAULT_TIMEOUT, do_not_open=True)
    port.open()
    return detect_chip(port)


def esptool_cli(esp32, *argv: str) -> esptool.ESPLoader:
    """Run one esptool command line on a fresh connection (default reset); returns the loader."""
    esp = connect(esp32)
    try:
        esptool.main(list(argv), esp=esp)
    finally:
        esp._port.close()
    return esp


def boot_output(esp_port: serial.SerialBase, until: bytes, timeout_s: float = 10.0) -> bytes:
    import time

    esp_port.baudrate, esp_port.timeout = 115200, 0.05
    out, deadline = b"", time.monotonic() + timeout_s
    while until not in out and time.monotonic() < deadline:
        out += esp_port.read(4096)
    return out


def test_cli_subprocess_over_rfc2217_url(esp32):
    """esptool's own executable, the URL form esptool documents, its default classic reset (the
    board runs its app: only a reset into download mode gets the loader to answer)."""
    proc = subprocess.run(
        [sys.executable, "-m", "esptool", "--port", f"{esp32.url}?ign_set_control", "--no-stub", "chip-id"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NO_COLOR": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "Chip type:          ESP32-D0WD-V3 (revision v3.0)" in out
    assert "Crystal frequency:  40MHz" in out
    assert "ESP32 has no chip ID. Reading MAC address instead." in proc.stderr
    assert f"MAC:                {default_mac('esp32').hex(':')}" in out
    assert "Hard resetting via RTS pin" in out


def test_flash_id(esp32, capsys):
    esptool_cli(esp32, "flash-id")
    out = capsys.readouterr().out
    assert "Stub flasher running." in out
    assert "Manufacturer: ef" in out and "Device: 4016" in out and "Detected flash size: 4MB" in out


def test_write_flash_with_stub_after_baud_change_boots_the_new_model(esp32, packed):
    new = packed["mnist5k_mlp_int8"]
    esptool_cli(
        esp32,
        "--baud",
        "460800",
        "--after",
        "hard-reset",
        "write-flash",
        "0x8000",
        str(new.partition_table),
        "0x10000",
        str(new.image),
    )
    with DutSerial(esp32.url, board="esp32") as dut:
        assert dut.reset()[-1] == "m-ready"  # a fresh boot banner: the board runs the flashed app
        identity = dut.identify()
        info = ModelInfo.from_file(MODELS / "mnist5k_mlp_int8.tflite")
        assert identity.model == "mnist5k_mlp_int8"
        assert identity.model_sha256 == info.sha256 == new.model_sha256
        samples = quantize_input(info, np.load(DATA / "mnist5k.npz")["x_test"][:3])
        outputs = dut.classify(samples[:, None, :])
    from tflite_micro import runtime

    interpreter = runtime.Interpreter.from_bytes((MODELS / "mnist5k_mlp_int8.tflite").read_bytes())
    for sample, got in zip(samples, outputs, strict=True):
        interpreter.set_input(sample[None, :], 0)
        interpreter.invoke()
        expected = dequantize_output(info, interpreter.get_output(0))
        np.testing.assert_array_equal(
            np.asarray(got, np.float32).ravel(), expected.astype(np.float32).ravel()
        )


@pytest.mark.parametrize("compression", ["-u", "-z"])
def test_write_flash_without_stub(esp32, packed, compression, capsys):
    image = packed["digits_mlp_int8"].image
    esptool_cli(esp32, "--no-stub", "--after", "no-reset", "write-flash", compression, "0x10000", str(image))
    out = capsys.readouterr().out
    assert "Stub flasher" not in out
    assert ("compressed" in out) == (compression == "-z")
    assert "Hash of data verified." in out  # the ROM's MD5 (ASCII hex) of what it wrote


def test_verify_flash_passes_and_fails_on_purpose(esp32, packed, tmp_path, capsys):
    """The partition table at 0x8000 (every image here uses the same one): verified by the ROM's
    MD5, then a copy with one bit flipped fails, and --diff (stub READ_FLASH) finds that byte."""
    table = packed["digits_mlp_int8"].partition_table
    esptool_cli(esp32, "--no-stub", "--after", "no-reset", "verify-flash", "0x8000", str(table))
    assert "verification successful (digest matched)" in capsys.readouterr().out.lower()
    tampered, data = tmp_path / "tampered.bin", bytearray(table.read_bytes())
    data[0x20] ^= 0x01
    tampered.write_bytes(bytes(data))
    with pytest.raises(FatalError, match="Verification failed"):
        esptool_cli(esp32, "--after", "no-reset", "verify-flash", "--diff", "0x8000", str(tampered))
    out = capsys.readouterr().out
    assert "Verification failed: 1 differences" in out
    assert f"{0x8020:#010x} {data[0x20] ^ 1:02x} {data[0x20]:02x}" in out


def test_read_flash_round_trip_and_erase_region(esp32):
    """esptool's public API on one stub connection at 460800 baud."""
    payload = np.random.default_rng(5).integers(0, 256, 24 * 1024, np.uint8).tobytes()  # does not deflate
    esp = run_stub(connect(esp32))
    try:
        esp.change_baud(460800)
        attach_flash(esp)
        write_flash(esp, [(SCRATCH, payload)])
        assert read_flash(esp, SCRATCH, len(payload)) == payload
        erase_region(esp, SCRATCH, 0x4000)
        assert read_flash(esp, SCRATCH, 0x5000) == b"\xff" * 0x4000 + payload[0x4000:0x5000]
    finally:
        esp._port.close()


def test_read_flash_through_the_rom(esp32, tmp_path):
    """Without the stub esptool reads 64 bytes per READ_FLASH_SLOW command."""
    back = tmp_path / "rom.bin"
    esptool_cli(esp32, "--no-stub", "--after", "no-reset", "read-flash", "0x8000", "0x200", str(back))
    assert back.read_bytes() == firmware_image.partition_table_bin()[:0x200]


def read_for(esp_port: serial.SerialBase, seconds: float) -> bytes:
    import time

    esp_port.baudrate, esp_port.timeout = 115200, 0.05
    out, deadline = b"", time.monotonic() + seconds
    while time.monotonic() < deadline:
        out += esp_port.read(4096)
    return out


def test_invalid_image_boot_loops_until_a_reset_into_download_mode(esp32, packed, tmp_path):
    """As the chip: a flash boot that finds no valid image prints "invalid header" in a loop and
    never answers the serial loader; esptool's default reset (IO0 low via DTR/RTS) reaches the
    loader, and a good image flashed there boots."""
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not an application image" * 64)
    esp = connect(esp32)
    try:
        esptool.main(["--after", "hard-reset", "write-flash", "0x10000", str(junk)], esp=esp)
        boot = read_for(esp._port, 1.5)
    finally:
        esp._port.close()
    first_word = int.from_bytes(junk.read_bytes()[:4], "little")
    assert boot.count(f"invalid header: {first_word:#010x}\r\n".encode()) >= 3
    assert b"waiting for download" not in boot
    # no loader answers without a reset into download mode
    port = serial.serial_for_url(esp32.url, timeout=DEFAULT_TIMEOUT)
    try:
        with pytest.raises(FatalError, match="Failed to connect"):
            detect_chip(port, connect_mode="no-reset", connect_attempts=1)
    finally:
        port.close()
    esp = connect(esp32)  # esptool's default reset: download boot
    try:
        good = packed["digits_mlp_int8"]
        write_flash(run_stub(esp), [(0x8000, str(good.partition_table)), (0x10000, str(good.image))])
        reset_chip(esp, "hard-reset")
    finally:
        esp._port.close()
    with DutSerial(esp32.url, board="esp32") as dut:
        assert dut.identify().model_sha256 == good.model_sha256


def test_flash_is_reached_only_after_spi_attach(esp32):
    """The ROM loader before SPI_ATTACH: the flash pins are not routed, so RDID, the status
    registers and flash reads see MISO idle high (0xFF); after esptool's attach, the real flash."""
    esp = connect(esp32)  # the ROM loader, nothing attached yet
    try:
        assert esp.flash_id(cache=False) == 0xFFFFFF
        assert esp.read_status(3) == 0xFFFFFF
        assert esp.read_flash_slow(0x8000, 0x80, None) == b"\xff" * 0x80
        assert esp.flash_md5sum(0x8000, 0x100) == hashlib.md5(b"\xff" * 0x100).hexdigest()
        attach_flash(esp)
        assert esp.flash_id(cache=False) == 0x1640EF
        table = firmware_image.partition_table_bin()
        assert esp.read_flash_slow(0x8000, 0x80, None) == table[:0x80]
        assert esp.flash_md5sum(0x8000, 0x100) == hashlib.md5(table[:0x100]).hexdigest()
    finally:
        esp._port.close()


def test_flash_status_register_is_stored(esp32, capsys):
    """A non-zero status written through esptool reads back, from the stub's command line and from
    the ROM's helpers, and survives a chip reset (the flash is not reset with the ESP32)."""
    try:
        esptool_cli(esp32, "write-flash-status", "--bytes", "2", "0x0200")
        out = capsys.readouterr().out
        assert "Setting flash memory status: 0x0200" in out
        assert "After flash memory status:   0x0200" in out
        esp = connect(esp32)
        try:
            attach_flash(esp)
            assert esp.read_status(2) == 0x0200
            esp.write_status(0x0210)  # QE and BP2
            assert esp.read_status(3) == 0x000210
        finally:
            esp._port.close()
    finally:
        esp = connect(esp32)
        try:
            attach_flash(esp)
            esp.write_status(0)
            assert esp.read_status(2) == 0
        finally:
            esp._port.close()


def test_run_user_code_leaves_the_loader_and_boots_the_app(esp32):
    """The stub answers RUN_USER_CODE (0xD3) as esptool's stub does: no reply, and the boot goes on
    from flash. esptool 5 sends it for `--after soft-reset` on the ESP8266 only; on an ESP32 it
    refuses the stub's soft reset itself, before sending anything."""
    esp = run_stub(connect(esp32))
    try:
        with pytest.raises(FatalError, match="only supported on ESP8266"):
            reset_chip(esp, "soft-reset")
        esp.command(esp.ESP_CMDS["RUN_USER_CODE"], wait_response=False)
        boot = boot_output(esp._port, b"m-ready")
    finally:
        esp._port.close()
    assert b"cpu_start: Project name:     labbench-dut" in boot and b"m-ready" in boot
    # through the ROM, `--after soft-reset` is "run user code" (FLASH_BEGIN 0, FLASH_END 0)
    esp = connect(esp32)
    try:
        esptool.main(["--no-stub", "--after", "soft-reset", "read-mac"], esp=esp)
        boot = boot_output(esp._port, b"m-ready")
    finally:
        esp._port.close()
    assert b"cpu_start: Project name:     labbench-dut" in boot and b"m-ready" in boot


def test_image_info_shows_the_app_description(packed, capsys):
    esptool.main(["image-info", str(packed["digits_mlp_int8"].image)])
    out = capsys.readouterr().out
    assert "Project name: labbench-dut" in out
    assert "App version: 0.1.0" in out
    assert (
        f"ELF file SHA256: {hashlib.sha256((MODELS / 'digits_mlp_int8.tflite').read_bytes()).hexdigest()}"
        in out
    )
    assert "Validation hash:" in out and "(valid)" in out


@pytest.mark.parametrize("compression", ["-u", "-z"])
def test_encrypted_write_uses_the_blank_efuse_key(esp32, tmp_path, compression, capsys):
    """On a chip whose eFuses were never burnt esptool refuses `--encrypt` (no key programmed);
    forced past that check, the flash-encryption engine writes with BLOCK1's zero key and
    FLASH_CRYPT_CONFIG 0: the flash holds espsecure's ciphertext of the data, not the data."""
    import io

    import espsecure

    plain = tmp_path / "plain.bin"
    rng = np.random.default_rng(7)
    plain.write_bytes(
        rng.integers(0, 256, 3000, np.uint8).tobytes() + bytes(2000)
    )  # odd length, partly compressible
    with pytest.raises(FatalError, match="Can't perform encrypted flash write"):
        esptool_cli(esp32, "--after", "no-reset", "write-flash", "--encrypt", hex(SCRATCH), str(plain))
    assert "Flash encryption key is not programmed." in capsys.readouterr().out
    esptool_cli(
        esp32,
        "--after",
        "no-reset",
        "write-flash",
        compression,
        "--encrypt",
        "--ignore-flash-enc-efuse",
        hex(SCRATCH),
        str(plain),
    )
    assert "Cannot verify written data if encrypted" in capsys.readouterr().out
    padded = plain.read_bytes().ljust(5024, b"\xff")  # esptool pads encrypted writes to 32 bytes
    expected = io.BytesIO()
    espsecure.encrypt_flash_data(io.BytesIO(bytes(32)), expected, SCRATCH, 0, False, io.BytesIO(padded))
    esp = run_stub(connect(esp32))
    try:
        attach_flash(esp)
        stored = read_flash(esp, SCRATCH, len(padded))
    finally:
        esp._port.close()
    assert stored == expected.getvalue() and stored != padded
