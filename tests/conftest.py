"""Fixtures shared by the project's tests: simulators started in-process on ephemeral loopback ports."""

from __future__ import annotations

from pathlib import Path

import pytest

from labbench.sim.esp32_rom import Esp32BootRom
from labbench.sim.mcu import SimMcuBoard

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "fixtures" / "models"


@pytest.fixture(scope="module")
def esp32():
    """A simulated ESP32 DevKitC (boot ROM included) holding the int8 digits model."""
    b = SimMcuBoard(
        "esp32", family="esp32_devkitc", model_path=MODELS / "digits_mlp_int8.tflite", boot_rom=Esp32BootRom()
    )
    b.start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def sim_board():
    """A simulated Nano 33 BLE Sense named "good" holding the int8 digits model, on an ephemeral port."""
    b = SimMcuBoard("good", family="nano33_ble_sense", model_path=MODELS / "digits_mlp_int8.tflite")
    b.start()
    yield b
    b.stop()
