"""acmeflash: write a model image to an ACME M0 through its bootloader, which then boots it.

    acmeflash --port socket://127.0.0.1:44001 model.tflite
    python -m labbench_acme.flashtool --port /dev/ttyACM0 model.tflite

It sends `flash <name> <sha256> <hex>` (labbench_acme.dut lists the protocol) and checks the sealed
`flashed <bytes> <sha256>` the board answers once it runs the image. Exit code 0 on success, 1 with the
reason on stderr otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import serial

from labbench_acme.wire import opened

TIMEOUT_S = 30.0


def flash(port: str, image: Path, baud: int) -> str:
    """Write `image` to the board at `port`; what the board said."""
    data = image.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    with serial.serial_for_url(port, baudrate=baud, timeout=TIMEOUT_S) as link:
        link.write(f"flash {image.stem} {sha256} {data.hex()}\n".encode("ascii"))
        line = link.readline().decode("ascii", "replace")
    text = opened(line)
    if text != f"flashed {len(data)} {sha256}":
        raise RuntimeError(f"the board answered {line.strip()!r}, not flashed {len(data)} {sha256}")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="acmeflash", description=__doc__.splitlines()[0])
    parser.add_argument("--port", required=True, help="the board's serial device or pyserial URL")
    parser.add_argument("--baud", type=int, default=115200)
    parser.add_argument("image", type=Path)
    args = parser.parse_args(argv)
    try:
        print(f"acmeflash: {args.image.name}: {flash(args.port, args.image, args.baud)}")
    except (OSError, serial.SerialException, RuntimeError) as exc:
        print(f"acmeflash: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
