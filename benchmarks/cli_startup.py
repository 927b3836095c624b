"""Start-up time of the bench's commands next to the interpreter's own: `python -c pass`.

Each command runs `--runs` times (default 10), interleaved with the others so that all see the
same machine load, from the repository root with the virtualenv's executables, after one
unmeasured round that warms the file cache and the bytecode. Reported per command: the median and
the fastest wall time, the median's ratio to `python -c pass`, and what the command adds to it.
The floor of `pytest tests_hil --list-boards` is pytest's own start-up: `pytest --version` imports
pytest alone (it loads no plugins); `pytest --markers --noconftest` configures pytest with every
installed plugin (pytest-html's too) and no conftest, with and without labbench's two, whose
difference is what the labbench plugins add to every pytest run. Target: `labbench --help` and
`labbench lab check` under 0.4 s.

    .venv/bin/python benchmarks/cli_startup.py [--runs 10] [--lab lab.yaml]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TARGET_S = 0.4
TARGETED = ("labbench --help", "labbench lab check")


def commands(lab: str) -> dict[str, list[str]]:
    py, labbench, pytest = sys.executable, str(BIN / "labbench"), str(BIN / "pytest")
    return {
        "python -c pass": [py, "-c", "pass"],
        "python -c 'import labbench'": [py, "-c", "import labbench"],
        "labbench --help": [labbench, "--help"],
        "labbench lab check": [labbench, "lab", "check", lab],
        "pytest --version": [pytest, "--version"],
        "pytest --markers, no labbench": [
            pytest,
            "--markers",
            "--noconftest",
            "-p",
            "no:labbench",
            "-p",
            "no:labbench_gate",
        ],
        "pytest --markers": [pytest, "--markers", "--noconftest"],
        "pytest tests_hil --list-boards": [pytest, "tests_hil", "--list-boards", "--lab", lab],
    }


def run(argv: list[str]) -> tuple[float, int]:
    t0 = time.perf_counter()
    rc = subprocess.run(
        argv, check=False, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    ).returncode
    return time.perf_counter() - t0, rc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="measured runs per command")
    parser.add_argument("--lab", default="lab.yaml", help="lab file for lab check and --list-boards")
    args = parser.parse_args()
    cmds = commands(args.lab)
    times: dict[str, list[float]] = {label: [] for label in cmds}
    failed: dict[str, int] = {}
    for round_ in range(args.runs + 1):
        for label, argv in cmds.items():
            seconds, rc = run(argv)
            if rc:
                failed[label] = rc
            if round_:
                times[label].append(seconds)

    base = statistics.median(times["python -c pass"])
    print(f"start-up wall time, {args.runs} interleaved runs each, from {REPO} ({os.cpu_count()} cores)")
    header = f"{'command':<32} {'median s':>9} {'min s':>7} {'x pass':>7} {'+ms':>7}"
    print(header)
    print("-" * len(header))
    for label, ts in times.items():
        med = statistics.median(ts)
        note = f"  (exit {failed[label]})" if label in failed else ""
        print(f"{label:<32} {med:>9.3f} {min(ts):>7.3f} {med / base:>7.1f} {(med - base) * 1000:>7.0f}{note}")
    slow = [label for label in TARGETED if statistics.median(times[label]) >= TARGET_S]
    verdict = f"misses it: {', '.join(slow)}" if slow else "meets it"
    print(f"\ntarget: {' and '.join(TARGETED)} under {TARGET_S} s; {verdict}")
    return 1 if slow or failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
