"""Stand-ins for `bossac` and coralmicro's `flashtool.py` that load a SIMULATED board.

They are not the real tools and speak no flashing protocol: bossac talks SAM-BA to the Nano's
bootloader and flashtool talks USB HID to the Coral's ROM, neither of which a socket can carry.
They take the same arguments as the real commands, find the running simulated lab whose board
serves the given port (its state under `.labbench/sim/` in this directory or a parent, or
`$LABBENCH_SIM_STATE`), and ask it over its control socket to load the image, as the real tool
would have (`load_firmware`: the board resets into it). Exit code 0 on success, 1 otherwise, with
the reason on stderr, so the bench's flashers see what they would see from the real tools.

    python -m labbench.sim.standin_tools bossac --port=rfc2217://127.0.0.1:14002 -U -i -e -w IMAGE -R
    python -m labbench.sim.standin_tools flashtool --elf_path IMAGE --serial rfc2217://127.0.0.1:14003

(flashtool's --serial is a USB serial number; a simulated Coral has none, so its serial URL stands in.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from labbench import inventory
from labbench.errors import LabbenchError
from labbench.sim.control import SimControl

STATE_ENV = "LABBENCH_SIM_STATE"


def _state_dirs() -> list[Path]:
    if os.environ.get(STATE_ENV):
        return [Path(os.environ[STATE_ENV])]
    here = Path.cwd().resolve()
    for directory in (here, *here.parents):
        found = sorted(p.parent for p in (directory / ".labbench" / "sim").glob("*/state.json"))
        if found:
            return found
    return []


def _find_board(port: str) -> tuple[Path, str]:
    """(state dir, board name) of the simulated board whose serial URL is `port`."""
    wanted = inventory.endpoint(port)
    for state_dir in _state_dirs():
        lab = inventory.load(json.loads((state_dir / "state.json").read_text())["lab"])
        for name, board in lab.boards.items():
            if board.simulated and board.serial and inventory.endpoint(board.serial.url) == wanted:
                return state_dir, name
    raise LabbenchError(
        f"no running simulated lab serves a board at {port} (is `labbench sim up` running, "
        f"here or in a parent directory, or {STATE_ENV} set?)"
    )


def _load(tool: str, port: str, image: str) -> None:
    state_dir, board = _find_board(port)
    path = Path(image).resolve()
    t0 = time.monotonic()
    booted = SimControl(state_dir, timeout_s=120).call("load_firmware", board=board, path=str(path))
    print(
        f"labbench stand-in for {tool}: simulated board {board!r} loaded {path.name} "
        f"({path.stat().st_size} bytes) in {time.monotonic() - t0:.1f} s and reset; it runs model "
        f"{booted.get('model')} (sha256 {booted.get('model_sha256')})"
    )
    if booted.get("refused"):
        raise LabbenchError(f"the board does not run it: {booted['refused']}")


def bossac(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="bossac (labbench stand-in)")
    p.add_argument("-p", "--port", required=True)
    p.add_argument("-U", "--usb-port", nargs="?", const="true")
    for flag, long in (
        ("-i", "--info"),
        ("-e", "--erase"),
        ("-w", "--write"),
        ("-v", "--verify"),
        ("-R", "--reset"),
        ("-d", "--debug"),
        ("-b", "--boot"),
    ):
        p.add_argument(flag, long, action="store_true")
    p.add_argument("file", nargs="?")
    args = p.parse_args(argv)
    if not (args.write and args.file):
        raise LabbenchError("the stand-in only writes: give -w FILE")
    _load("bossac", args.port, args.file)


def flashtool(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="flashtool.py (labbench stand-in)")
    p.add_argument("--elf_path", "-e", required=True)
    p.add_argument(
        "--serial",
        default=os.environ.get("CORAL_MICRO_SERIAL"),
        help="the simulated board's serial URL (a real Coral's USB serial number)",
    )
    p.add_argument("--ram", action="store_true")
    p.add_argument("--noram", action="store_true")
    args = p.parse_args(argv)
    if not args.serial:
        raise LabbenchError("a simulated Coral is chosen by --serial URL (or CORAL_MICRO_SERIAL)")
    _load("flashtool", args.serial, args.elf_path)


TOOLS = {"bossac": bossac, "flashtool": flashtool}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in TOOLS:
        print(f"usage: python -m labbench.sim.standin_tools {{{','.join(TOOLS)}}} ARGS...", file=sys.stderr)
        return 2
    try:
        TOOLS[argv[0]](argv[1:])
    except LabbenchError as exc:
        print(f"labbench stand-in for {argv[0]}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
