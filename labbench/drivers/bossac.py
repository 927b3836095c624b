"""The Arduino Nano 33 BLE's flasher: Arduino's bossac, after the 1200-baud touch.

The command is Arduino's upload pattern for the board (ArduinoCore-mbed platform.txt:
``bossac --port=PORT -U -i -e -w IMAGE.bin -R``), or lab.yaml's `flash.command`; running it,
logging and errors are `CommandFlasher`'s. As the Arduino IDE does (upload.use_1200bps_touch),
the serial port is first opened at 1200 baud and closed, which makes the board's running sketch
jump to its bootloader.
"""

from __future__ import annotations

import time

import serial

from labbench.drivers.flashcmd import CommandFlasher

TOUCH_BAUD = 1200
TOUCH_SETTLE_S = 0.5  # the bootloader re-enumerates before bossac opens the port


class BossacFlasher(CommandFlasher):
    TOOL = "bossac"
    DEFAULT_COMMAND = ("bossac", "--port={port}", "-U", "-i", "-e", "-w", "{image}", "-R")

    def before_command(self) -> None:
        try:
            port = serial.serial_for_url(self.port, baudrate=TOUCH_BAUD)
            port.close()
        except (serial.SerialException, ValueError, OSError):
            return  # the board may already sit in its bootloader; bossac reports if it cannot reach it
        time.sleep(TOUCH_SETTLE_S)
