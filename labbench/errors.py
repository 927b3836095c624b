"""Typed errors: each names the board or instrument, the action, and what was seen."""

from __future__ import annotations


class LabbenchError(Exception):
    """Base of every error the bench raises on purpose."""


class LabConfigError(LabbenchError):
    """A lab.yaml or devices/*.yaml file is malformed; the message carries file:line and key path."""


class CatalogError(LabConfigError):
    """A board family file in devices/ is missing or malformed."""


class UsageError(LabbenchError):
    """The user asked for something the lab does not have (an unknown board, driver or instrument)."""


class HardwareError(LabbenchError):
    """Infrastructure failure talking to a board or instrument (never a budget failure)."""

    transcript: list[str]  # the DUT's last lines, where a serial DUT's driver raised it (DutSerial)

    def __init__(self, target: str, action: str, seen: str, log: str | None = None):
        self.target, self.action, self.seen, self.log = target, action, seen, log
        self.partial: object = None  # what was measured before the fault, kept but never judged
        where = f" (full log: {log})" if log else ""
        super().__init__(f"{target}: {action}: {seen}{where}")


class FlashError(HardwareError):
    """Flashing, verifying or resetting a board failed."""


class DutProtocolError(HardwareError):
    """The DUT answered outside the MLPerf Tiny protocol, timed out or reset."""


class InstrumentError(HardwareError):
    """An instrument could not be opened, refused a command or stopped answering."""


class RemoteError(HardwareError):
    """An SSH board could not be reached, refused a host key, or a remote run broke off."""


class RunAborted(HardwareError):
    """A run was stopped from outside: another part of the bench (the power capture) failed mid-run."""


class EdgeError(HardwareError):
    """An edge server refused a request, could not be reached, or broke off or garbled its reply."""


class BoardBusy(LabbenchError):
    """Another process holds the board's lock."""
