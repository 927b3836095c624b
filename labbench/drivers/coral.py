"""The Coral Dev Board Micro's flasher: coralmicro's flashtool.py.

flashtool drives the board over USB (1200-baud reset into the NXP ROM's SDP, the flashloader, then
ELFLoader over HID; ../shared/reference/flashing-tools.md section 2), so the bench only runs it:
``flashtool.py --elf_path IMAGE.elf`` by default (coralmicro's scripts/ on PATH), or lab.yaml's
`flash.command` (e.g. adding ``--serial`` to pick one of several boards). Running it, logging
and errors are `CommandFlasher`'s.
"""

from __future__ import annotations

from labbench.drivers.flashcmd import CommandFlasher


class FlashtoolFlasher(CommandFlasher):
    TOOL = "flashtool"
    DEFAULT_COMMAND = ("flashtool.py", "--elf_path", "{image}")
