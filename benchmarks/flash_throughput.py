"""esptool's flash write time on the simulated ESP32 against the serial line-rate floor, and the MD5 skip.

Part 1. On one stub connection at the flash baud (default 460800, lab.yaml's), esptool's public
API writes app images of 256 KiB and 1 MiB at 0x10000, uncompressed (FLASH_DATA) and deflated
(FLASH_DEFL_DATA), and verifies each (SPI_FLASH_MD5). The images carry real model bytes (the
MLPerf Tiny models in ../shared/workloads, else the fixtures), so they deflate as firmware does.
The floor is the time the payload alone needs on the wire: bytes sent (deflated size when
compressed) x 10 bits / baud. The ratio measured / floor is the protocol's cost: SLIP framing and
escaping, command headers, one reply round trip per 16 KiB block, the MD5 verify, and the RFC 2217
client. Each case runs on two ports side by side: pyserial's RFC 2217 client as esptool opens it,
and `LocalTimeoutRfc2217`, the one EsptoolFlasher opens, which keeps read-timeout changes local
(stock pyserial renegotiates every port setting with the server on each, and esptool changes the
timeout around each deflated block). The simulated flash programs and erases instantly; a real
ESP32 adds its erase and program time (the stub overlaps it with the transfer).

Part 2. `EsptoolFlasher.flash` of a packed model image, first writing it, then again when the
flash already holds it (skipped on the ROM's SPI_FLASH_MD5; no stub upload), then forced: what
the skip saves, with its breakdown (connect + MD5, reset + boot + DUT identity).

    .venv/bin/python benchmarks/flash_throughput.py [--baud 460800 ...] [--sizes-kib 256 1024]

It takes about 3 minutes with the defaults.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import zlib
from pathlib import Path

import serial
from esptool.cmds import attach_flash, detect_chip, run_stub, write_flash
from esptool.loader import DEFAULT_TIMEOUT
from esptool.logger import log as esptool_log

from labbench import firmware_image
from labbench.drivers.esptool import EsptoolFlasher, open_port
from labbench.sim.mcu import SimMcuBoard

REPO = Path(__file__).resolve().parents[1]
SHARED_MODELS = REPO.parent / "shared" / "workloads" / "mlperf_tiny"
FIXTURE_MODELS = REPO / "fixtures" / "models"


def model_files() -> tuple[list[Path], str]:
    shared = sorted(SHARED_MODELS.glob("*.tflite"))
    if shared:
        return shared, "MLPerf Tiny models (../shared/workloads)"
    return sorted(FIXTURE_MODELS.glob("*.tflite")), "fixture models (../shared absent)"


def app_image(size_bytes: int, models: list[Path]) -> bytes:
    """An app image of about `size_bytes` whose payload is model bytes, the models in turn."""
    overhead = len(firmware_image.build_app_image(b"", "bench"))
    blob = bytearray()
    while len(blob) < size_bytes - overhead:
        for path in models:
            blob += path.read_bytes()
    return firmware_image.build_app_image(bytes(blob[: size_bytes - overhead]), "bench")


PORTS = {
    "pyserial": lambda url: serial.serial_for_url(url, timeout=DEFAULT_TIMEOUT),
    "local-timeout": open_port,
}


def write_times(
    board: SimMcuBoard, port_kind: str, baud: int, sizes_kib: list[int], models: list[Path]
) -> list[dict]:
    rows = []
    port = PORTS[port_kind](board.url)
    try:
        esp = run_stub(detect_chip(port))
        esp.change_baud(baud)
        attach_flash(esp)
        for kib in sizes_kib:
            image = app_image(kib * 1024, models)
            for compress in (False, True):
                wire = len(zlib.compress(image, 9)) if compress else len(image)
                t = time.monotonic()
                write_flash(
                    esp, [(firmware_image.APP_OFFSET, image)], compress=compress, no_compress=not compress
                )
                seconds = time.monotonic() - t
                floor = wire * 10 / baud
                rows.append(
                    {
                        "port": port_kind,
                        "size": f"{kib} KiB",
                        "mode": "deflated" if compress else "plain",
                        "baud": baud,
                        "image": len(image),
                        "wire": wire,
                        "floor_s": floor,
                        "write_s": seconds,
                        "ratio": seconds / floor,
                        "kbit_s": len(image) * 8 / seconds / 1000,
                    }
                )
    finally:
        port.close()
    return rows


def skip_times(board: SimMcuBoard, model: Path, work: Path) -> list[dict]:
    packed = firmware_image.pack(model, work / model.stem)
    flasher = EsptoolFlasher(board.url, board="esp32", log_dir=work / "logs", show_progress=False)
    rows = []
    for label, force in (("first write", False), ("again: skipped on MD5", False), ("again, forced", True)):
        r = flasher.flash(str(packed.image), force=force)
        rows.append(
            {
                "run": label,
                "skipped": r.skipped,
                "bytes": r.detail["bytes_written"],
                "total_s": r.seconds,
                "md5_s": r.detail["md5_check_s"],
                "write_s": r.detail.get("write_s", 0.0),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baud", type=int, nargs="+", default=[460800])
    parser.add_argument("--sizes-kib", type=int, nargs="+", default=[256, 1024])
    args = parser.parse_args()
    models, source = model_files()
    esptool_log.set_verbosity("silent")
    board = SimMcuBoard(
        "esp32",
        family="esp32_devkitc",
        model_path=FIXTURE_MODELS / "digits_mlp_int8.tflite",
    )
    board.start()
    try:
        rows = [
            row
            for baud in args.baud
            for kib in args.sizes_kib
            for kind in PORTS
            for row in write_times(board, kind, baud, [kib], models)
        ]
        with tempfile.TemporaryDirectory() as tmp:
            skip_model = max(models, key=lambda p: p.stat().st_size)
            skips = skip_times(board, skip_model, Path(tmp))
    finally:
        board.stop()

    print(f"\nesptool write-flash on the simulated ESP32 (stub, RFC 2217 on loopback); payload: {source}")
    print(
        f"{'image':>8} {'mode':>9} {'port':>14} {'baud':>7} {'bytes':>8} {'on wire':>8} {'floor s':>8} "
        f"{'write s':>8} {'x floor':>8} {'kbit/s':>7}"
    )
    for r in rows:
        print(
            f"{r['size']:>8} {r['mode']:>9} {r['port']:>14} {r['baud']:>7} {r['image']:>8} {r['wire']:>8} "
            f"{r['floor_s']:>8.2f} {r['write_s']:>8.2f} {r['ratio']:>8.2f} {r['kbit_s']:>7.0f}"
        )
    print(
        f"\nEsptoolFlasher.flash of {skip_model.name} packed ({skips[0]['bytes']} bytes written "
        f"the first time), flash baud {EsptoolFlasher(board.url).baud}"
    )
    print(f"{'run':>24} {'skipped':>8} {'bytes':>8} {'total s':>8} {'MD5 s':>7} {'write s':>8}")
    for r in skips:
        print(
            f"{r['run']:>24} {r['skipped']!s:>8} {r['bytes']:>8} {r['total_s']:>8.2f} {r['md5_s']:>7.3f} "
            f"{r['write_s']:>8.2f}"
        )
    first, skipped = skips[0]["total_s"], skips[1]["total_s"]
    print(
        f"the skip takes {skipped:.2f} s, {skipped / first:.0%} of writing it "
        "(connect with reset, ROM MD5 per region, hard reset, boot, DUT identity)"
    )


if __name__ == "__main__":
    main()
