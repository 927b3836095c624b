"""ESP32 application images that carry a model, and the flash layout they boot from.

`labbench firmware pack MODEL.tflite --board esp32` writes, into one directory:

- ``labbench-dut.bin``: a real ESP32 application image (esptool's ``bin_image`` builds it, so
  ``esptool image-info`` reads it). Its one flash-mapped DROM segment starts with the ESP-IDF
  application description (``esp_app_desc_t``: project ``labbench-dut``, version, and, in the
  32-byte ``app_elf_sha256`` field, the model's SHA-256, since the image has no ELF of its own),
  followed by a model record (magic, size, SHA-256, name) and the ``.tflite`` bytes.
- ``partitions.csv`` and ``partition-table.bin``: the ESP-IDF partition table for 4 MB of flash
  (``nvs``, ``phy_init``, and a 3 MB ``factory`` app at 0x10000), written at 0x8000.
- ``flasher_args.json``: what goes where, in ESP-IDF's ``build/flasher_args.json`` shape. The
  second-stage bootloader belongs at 0x1000; pack does not build one (the simulated ESP32 has it
  built in; a real board keeps the one ESP-IDF flashed with ``firmware/esp32``), so the manifest
  notes its offset with no file.

The layout is the format shared by the packer and the simulated ESP32's boot path, so it lives
here once: this module imports only esptool and the bench's errors, and builds deterministic
bytes (no build date), so re-packing a model gives the same image and flashing it again is
skipped on the flash's MD5.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labbench import __version__
from labbench.errors import LabbenchError

PROJECT_NAME = "labbench-dut"
IMAGE_NAME = f"{PROJECT_NAME}.bin"
PARTITIONS_CSV = "partitions.csv"
PARTITION_TABLE_BIN = "partition-table.bin"
FLASHER_ARGS = "flasher_args.json"

# Values of esptool's ESP32ROM are written out: the CLI imports this module, and esptool loads only
# where an image is built or read.
FLASH_SIZE_BYTES = 4 * 1024 * 1024
BOOTLOADER_OFFSET = 0x1000  # ESP32ROM.BOOTLOADER_FLASH_OFFSET
PARTITION_TABLE_OFFSET = 0x8000
APP_OFFSET = 0x10000
SUPPORTED_BOARDS = ("esp32",)

# esp_app_desc_t, as ESP-IDF defines it and esptool's image-info parses it
APP_DESC_MAGIC = 0xABCD5432
APP_DESC_FMT = "<II8s32s32s16s16s32s32sHHB3s72s"
APP_DESC_BYTES = struct.calcsize(APP_DESC_FMT)  # 256
MMU_PAGE_SIZE_LOG2 = 16  # 64 KB pages on the ESP32
# The model record that follows the application description in the DROM segment
MODEL_MAGIC = b"LBMODEL1"
MODEL_HEADER_FMT = "<8sI32s32s"  # magic, size_bytes, sha256, name
MODEL_HEADER_BYTES = struct.calcsize(MODEL_HEADER_FMT)
# First flash-mapped segment: its data lands at DROM + 0x20, matching its file offset modulo 64 KB
DROM_SEGMENT_ADDR = 0x3F400000 + 0x20  # ESP32ROM.DROM_MAP_START + 0x20
FLASH_MODE_DIO = 2
FLASH_SIZE_FREQ = 0x20 | 0x00  # ESP32ROM.FLASH_SIZES["4MB"] | ESP32ROM.FLASH_FREQUENCY["40m"]
MAX_CHIP_REV_FULL = 399  # v3.99, ESP-IDF's default upper bound for the ESP32

# ESP-IDF partition table binary (components/partition_table/gen_esp32part.py)
PARTITION_ENTRY_FMT = "<2sBBII16sI"
PARTITION_MAGIC = b"\xaa\x50"
PARTITION_MD5_MAGIC = b"\xeb\xeb"
PARTITION_TABLE_BYTES = 0xC00
TYPES = {"app": 0x00, "data": 0x01}
SUBTYPES = {
    "app": {"factory": 0x00, "ota_0": 0x10, "ota_1": 0x11},
    "data": {"ota": 0x00, "phy": 0x01, "nvs": 0x02, "coredump": 0x03},
}


class ImageError(LabbenchError):
    """Bytes that are not a valid labbench ESP32 application image or partition table."""


@dataclass(frozen=True)
class Partition:
    name: str
    type: str
    subtype: str
    offset: int
    size: int


DEFAULT_PARTITIONS = (
    Partition("nvs", "data", "nvs", 0x9000, 0x6000),
    Partition("phy_init", "data", "phy", 0xF000, 0x1000),
    Partition("factory", "app", "factory", APP_OFFSET, 0x300000),
)


@dataclass(frozen=True)
class AppImage:
    """What an application image says it is and the model it carries."""

    project: str
    version: str
    model_name: str
    model_sha256: str
    model: bytes
    size_bytes: int  # of the image, digest included


# ---------------------------------------------------------------------------------------------
# Partition table. Written by hand: ESP-IDF's gen_esp32part.py ships inside ESP-IDF only, not as
# a maintained package; the format is 32-byte entries, an MD5 entry, 0xFF padding to 3 KB.


def partitions_csv(partitions: tuple[Partition, ...] = DEFAULT_PARTITIONS) -> str:
    rows = [
        "# ESP-IDF Partition Table (labbench firmware pack)",
        "# Name, Type, SubType, Offset, Size, Flags",
    ]
    rows += [f"{p.name}, {p.type}, {p.subtype}, {p.offset:#x}, {p.size:#x}," for p in partitions]
    return "\n".join(rows) + "\n"


def partition_table_bin(partitions: tuple[Partition, ...] = DEFAULT_PARTITIONS) -> bytes:
    entries = b"".join(
        struct.pack(
            PARTITION_ENTRY_FMT,
            PARTITION_MAGIC,
            TYPES[p.type],
            SUBTYPES[p.type][p.subtype],
            p.offset,
            p.size,
            p.name.encode(),
            0,
        )
        for p in partitions
    )
    table = entries + PARTITION_MD5_MAGIC + b"\xff" * 14 + hashlib.md5(entries).digest()
    return table + b"\xff" * (PARTITION_TABLE_BYTES - len(table))


def parse_partition_table(data: bytes) -> tuple[Partition, ...]:
    """The partitions of a table binary; raises ImageError on a bad magic or MD5."""
    entry_bytes = struct.calcsize(PARTITION_ENTRY_FMT)
    found: list[Partition] = []
    names = {v: k for k, v in TYPES.items()}
    for pos in range(0, min(len(data), PARTITION_TABLE_BYTES), entry_bytes):
        entry = data[pos : pos + entry_bytes]
        if entry[:2] == PARTITION_MD5_MAGIC:
            if entry[16:] != hashlib.md5(data[:pos]).digest():
                raise ImageError("partition table MD5 mismatch")
            return tuple(found)
        if entry[:2] != PARTITION_MAGIC:
            break
        _, type_id, subtype_id, offset, size, name, _ = struct.unpack(PARTITION_ENTRY_FMT, entry)
        type_name = names.get(type_id, f"{type_id:#x}")
        subtype = {v: k for k, v in SUBTYPES.get(type_name, {}).items()}.get(subtype_id, f"{subtype_id:#x}")
        found.append(Partition(name.rstrip(b"\0").decode(errors="replace"), type_name, subtype, offset, size))
    raise ImageError(f"no valid partition table (first bytes {data[:4].hex() or 'none'})")


def boot_partition(partitions: tuple[Partition, ...]) -> Partition:
    """The app partition the bootloader boots with no OTA data: factory, else the first app."""
    apps = [p for p in partitions if p.type == "app"]
    if not apps:
        raise ImageError("no app partition in the partition table")
    return next((p for p in apps if p.subtype == "factory"), apps[0])


# ---------------------------------------------------------------------------------------------
# Application image


def build_app_image(model: bytes, model_name: str, version: str = __version__) -> bytes:
    """An ESP32 application image whose DROM segment holds the app description and the model."""
    from esptool.bin_image import ESP32FirmwareImage, ImageSegment

    sha = hashlib.sha256(model).digest()
    desc = struct.pack(
        APP_DESC_FMT,
        APP_DESC_MAGIC,
        0,
        b"",
        version.encode()[:31],
        PROJECT_NAME.encode(),
        b"",
        b"",
        b"labbench pack",
        sha,
        0,
        99,
        MMU_PAGE_SIZE_LOG2,
        b"",
        b"",
    )
    record = struct.pack(MODEL_HEADER_FMT, MODEL_MAGIC, len(model), sha, model_name.encode()[:31])
    data = desc + record + model
    image = ESP32FirmwareImage()
    image.flash_mode, image.flash_size_freq = FLASH_MODE_DIO, FLASH_SIZE_FREQ
    image.max_rev_full = MAX_CHIP_REV_FULL
    image.segments = [ImageSegment(DROM_SEGMENT_ADDR, data + b"\0" * (-len(data) % 4))]
    saved: bytes = image.save(None)  # no file name: the image's bytes
    return saved


def read_app_image(data: bytes) -> AppImage:
    """Validate an image (magic, chip, checksum, SHA-256 digest, app description, model record)."""
    from esptool.bin_image import ESP32FirmwareImage
    from esptool.targets.esp32 import ESP32ROM

    if not data or data[0] != ESP32ROM.ESP_IMAGE_MAGIC:
        raise ImageError(f"invalid magic byte {data[:1].hex() or 'none'} (nothing flashed?)")
    try:
        image = ESP32FirmwareImage(io.BytesIO(data))
    except Exception as exc:
        raise ImageError(f"malformed image: {exc}") from None
    if image.chip_id != ESP32ROM.IMAGE_CHIP_ID:
        raise ImageError(f"image is for chip id {image.chip_id}, not the ESP32")
    if image.checksum != image.calculate_checksum():
        raise ImageError("image checksum mismatch")
    if not image.append_digest or image.stored_digest != image.calc_digest:
        raise ImageError("image SHA-256 digest mismatch")
    drom = next(
        (s.data for s in image.segments if ESP32ROM.DROM_MAP_START <= s.addr < ESP32ROM.DROM_MAP_END), None
    )
    if drom is None or len(drom) < APP_DESC_BYTES + MODEL_HEADER_BYTES:
        raise ImageError("image has no DROM segment with an application description")
    desc = struct.unpack(APP_DESC_FMT, drom[:APP_DESC_BYTES])
    if desc[0] != APP_DESC_MAGIC:
        raise ImageError("image has no application description (esp_app_desc_t)")
    magic, size, sha, name = struct.unpack(
        MODEL_HEADER_FMT, drom[APP_DESC_BYTES : APP_DESC_BYTES + MODEL_HEADER_BYTES]
    )
    model = drom[APP_DESC_BYTES + MODEL_HEADER_BYTES :][:size]
    if magic != MODEL_MAGIC or len(model) != size or hashlib.sha256(model).digest() != sha:
        raise ImageError("image carries no intact model record")
    return AppImage(
        project=_cstr(desc[4]),
        version=_cstr(desc[3]),
        model_name=_cstr(name),
        model_sha256=sha.hex(),
        model=bytes(model),
        size_bytes=image.data_length + 32,
    )


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


# ---------------------------------------------------------------------------------------------
# Packing and the flash manifest


@dataclass(frozen=True)
class Packed:
    image: Path
    partitions_csv: Path
    partition_table: Path
    flasher_args: Path
    model_sha256: str


def pack(model_path: str | Path, out_dir: str | Path, board: str = "esp32") -> Packed:
    """Write the image, the partition layout and the flash manifest for `board` into `out_dir`."""
    if board not in SUPPORTED_BOARDS:
        raise ImageError(
            f"pack: no image format for board family {board!r} (known: {', '.join(SUPPORTED_BOARDS)})"
        )
    model_path, out = Path(model_path), Path(out_dir)
    model = model_path.read_bytes()
    out.mkdir(parents=True, exist_ok=True)
    image = build_app_image(model, model_path.stem)
    app = boot_partition(DEFAULT_PARTITIONS)
    if len(image) > app.size:
        raise ImageError(
            f"pack: {model_path.name} makes a {len(image)} B image; the app partition holds {app.size} B"
        )
    paths = Packed(
        out / IMAGE_NAME,
        out / PARTITIONS_CSV,
        out / PARTITION_TABLE_BIN,
        out / FLASHER_ARGS,
        hashlib.sha256(model).hexdigest(),
    )
    paths.image.write_bytes(image)
    paths.partitions_csv.write_text(partitions_csv())
    paths.partition_table.write_bytes(partition_table_bin())
    paths.flasher_args.write_text(json.dumps(_flasher_args(), indent=4) + "\n")
    return paths


def _flasher_args() -> dict[str, Any]:
    return {
        "write_flash_args": ["--flash-mode", "dio", "--flash-size", "4MB", "--flash-freq", "40m"],
        "flash_settings": {"flash_mode": "dio", "flash_size": "4MB", "flash_freq": "40m"},
        "flash_files": {f"{PARTITION_TABLE_OFFSET:#x}": PARTITION_TABLE_BIN, f"{APP_OFFSET:#x}": IMAGE_NAME},
        "bootloader": {
            "offset": f"{BOOTLOADER_OFFSET:#x}",
            "file": None,
            "note": "not built by pack: ESP-IDF's bootloader from firmware/esp32 on a real board",
        },
        "partition-table": {"offset": f"{PARTITION_TABLE_OFFSET:#x}", "file": PARTITION_TABLE_BIN},
        "app": {"offset": f"{APP_OFFSET:#x}", "file": IMAGE_NAME},
        "extra_esptool_args": {
            "after": "hard-reset",
            "before": "default-reset",
            "stub": True,
            "chip": "esp32",
        },
    }


def flash_files(image: str | Path) -> list[tuple[int, Path]]:
    """(offset, file) pairs to flash for the app `image`: with the other files its flasher_args.json
    names when one lies beside it (the partition table), else the app alone."""
    image = Path(image)
    manifest = image.parent / FLASHER_ARGS
    files = {APP_OFFSET: image}
    if manifest.exists():
        named = json.loads(manifest.read_text())["flash_files"]
        files = {int(offset, 0): image.parent / name for offset, name in named.items()} | files
    return sorted(files.items())


# ---------------------------------------------------------------------------------------------
# CLI: `labbench firmware pack`


def pack_command(args: argparse.Namespace) -> int:
    from rich.console import Console

    packed = pack(
        args.model,
        args.out or Path("build") / "firmware" / args.board / Path(args.model).stem,
        board=args.board,
    )
    Console().print(
        f"packed {args.model} for {args.board}: {packed.image} "
        f"(model sha256 {packed.model_sha256}), layout in {packed.partitions_csv.name}, "
        f"{packed.partition_table.name} @ {PARTITION_TABLE_OFFSET:#x}, {packed.flasher_args.name}",
        highlight=False,
    )
    return 0


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`labbench firmware pack MODEL.tflite --board esp32 [--out DIR]`."""
    firmware = subparsers.add_parser("firmware", help="build firmware images").add_subparsers(
        dest="firmware_command", required=True
    )
    p = firmware.add_parser("pack", help="pack a .tflite model into a bootable application image")
    p.add_argument("model", type=Path, help="the .tflite model")
    p.add_argument("--board", default="esp32", choices=SUPPORTED_BOARDS, help="board family (default esp32)")
    p.add_argument(
        "--out", type=Path, default=None, help="output directory (default build/firmware/BOARD/MODEL)"
    )
    p.set_defaults(func=pack_command)
