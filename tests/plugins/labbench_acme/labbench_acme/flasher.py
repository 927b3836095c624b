"""The ACME M0's Flasher: ACME's command-line tool, acmeflash, run by labbench's CommandFlasher.

The command is `{python} -m labbench_acme.flashtool --port {port} {image}` unless lab.yaml gives a
`flash.command`; CommandFlasher runs it, logs its output, skips a board that already runs the image's
model and checks afterwards that the board does. Only how the DUT is asked is the ACME board's own.
"""

from __future__ import annotations

from labbench.capabilities import DutIdentity
from labbench.drivers.flashcmd import CommandFlasher
from labbench_acme.dut import AcmeDut


class AcmeFlasher(CommandFlasher):
    TOOL = "acmeflash"
    DEFAULT_COMMAND = ("{python}", "-m", "labbench_acme.flashtool", "--port", "{port}", "{image}")

    def _identify(self) -> DutIdentity:
        with AcmeDut(self.port, board=self.board, baud=self.dut_baud) as dut:
            return dut.identify()
