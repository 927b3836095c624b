"""The command line and the pytest plugins start without the heavy libraries: those load where used."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from labbench import firmware_image

REPO = Path(__file__).resolve().parents[1]
HEAVY = (
    "numpy",
    "pandas",
    "matplotlib",
    "scipy",
    "ai_edge_litert",
    "tflite_micro",
    "esptool",
    "paramiko",
    "pyvisa",
)
# run after the code under test: prints which of the packages named in argv it loaded
REPORT = """
import json, sys
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[1:]))))
"""
LAB = str(REPO / "lab.yaml")

STARTS = {
    "lab check": f"import labbench.cli\nassert labbench.cli.main(['lab', 'check', {LAB!r}]) == 0",
    "--help": "import contextlib, labbench.cli\n"
    "with contextlib.suppress(SystemExit):\n"
    "    labbench.cli.main(['--help'])",
    "plugins": "import labbench.pytest_plugin, labbench.gate_plugin",
    "pytest tests_hil --list-boards": "import pytest\n"
    "args = ['tests_hil', '--list-boards', '-p', 'no:cacheprovider']\n"
    "assert pytest.main(args) == 0",
}


@pytest.mark.parametrize("code", STARTS.values(), ids=STARTS.keys())
def test_start_loads_no_heavy_library(code: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", code + REPORT, *HEAVY],
        cwd=REPO,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == []


def test_firmware_layout_matches_esptool() -> None:
    """firmware_image writes out ESP32ROM's values so that importing it does not load esptool."""
    from esptool.targets.esp32 import ESP32ROM

    assert firmware_image.BOOTLOADER_OFFSET == ESP32ROM.BOOTLOADER_FLASH_OFFSET
    assert firmware_image.DROM_SEGMENT_ADDR == ESP32ROM.DROM_MAP_START + 0x20
    assert ESP32ROM.FLASH_SIZES["4MB"] | ESP32ROM.FLASH_FREQUENCY["40m"] == firmware_image.FLASH_SIZE_FREQ
