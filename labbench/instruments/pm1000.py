"""Voltech PM1000+ power analyzer over PyVISA (pyvisa-py backend, no vendor VISA needed).

Resources: `TCPIP::host::port::SOCKET` (Ethernet; the instrument acknowledges every set
command with an empty line) or `ASRL<port>::INSTR` (RS232; no acknowledge). Terminators and the
acknowledge are settings because the manual is ambiguous (../shared/reference/voltech-pm1000.md
section 2.2). Every configuration command is followed by `*ESR?`, which also serves as the flow
control the manual asks for between configuration commands; a nonzero ESR names the command.

A capture (`with meter.capture() as cap:`) runs the new-data idiom in a background thread:
`:DSR?` about every `poll_interval_s` (dithered), and `:FRD?` when NDV is set. It also watches the
instrument (Pm1000Capture says how) and fails at once, keeping what it captured, when the instrument
stops answering or stops updating. How updates are placed on the host clock, and how energy over a
window is computed from them, is labbench.powertrace's job.

Each update carries what bounds it: the documented accuracy of its power reading for the ranges
the instrument held (`Accuracy`, the manual's figures), half the last digit each value was printed
with, the instantaneous extremes of the period (peak currents, `:SEL:APK+` / `:SEL:APK-`) and the
ranges themselves (`:SEL:VRNG` / `:SEL:ARNG`).

Ranges. Autoranging blanks an update at every range change (a bursty load can keep it changing
every update), so energy is measured on fixed ranges: those lab.yaml gives (`voltage_range`,
`current_range`), or, where it says "auto", the lowest ones that hold the peaks a pre-scan saw with
`range_headroom` to spare. The pre-scan starts on the lowest ranges (`lowest_ranges()`) and a
capture made with `step_up=True` raises them at each overload it reads; `hold_ranges(trace)` then
fixes them, and `step_up()` raises them after an overload in a window.
"""

from __future__ import annotations

import inspect
import math
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from decimal import Decimal
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import pyvisa
from pyvisa.resources import MessageBasedResource

from labbench.errors import InstrumentError, LabConfigError, UsageError
from labbench.powertrace import IntegratorReading, Mark, PowerTrace, PowerUpdate
from labbench.steps import step

if TYPE_CHECKING:
    from labbench.catalog import BoardFamily
    from labbench.inventory import InstrumentEntry

#: result name -> the :SEL mnemonic that adds it to the display list
RESULTS = {
    "W": "WAT", "V": "VLT", "A": "AMP", "PF": "PWF", "VA": "VAS", "var": "VAR", "Hz": "FRQ",
    "Vdc": "VDC", "Adc": "ADC", "Wh": "WHR", "Ah": "AHR", "VAh": "VAH", "varh": "VRH", "HRS": "HRS",
    "Apk+": "APK+", "Apk-": "APK-", "Vrng": "VRNG", "Arng": "ARNG",
}  # fmt: skip
DEFAULT_RESULTS = ("W", "V", "A", "PF", "Apk+", "Apk-", "Vrng", "Arng", "Wh", "Ah", "HRS")
_CAPTURE_NEEDS = ("W", "V", "A")
# Range tables (peak values): voltage ranges 1 and 4 and current ranges 1 and 6 are the manual's
# (../shared/reference/voltech-pm1000.md section 3.9), 215 V and 6.25 A its p.79 accuracy example's,
# 1.6 A its inrush example's; the others are inferred, and both tables are settings.
VOLTAGE_RANGES_V = (10.0, 50.0, 215.0, 1000.0)
CURRENT_RANGES_A = (0.1, 0.4, 1.6, 6.25, 25.0, 100.0)
DSR_DVL, DSR_NDV, DSR_OVA, DSR_OVV = 1, 2, 8, 16
ESR_EXE = 16
# A capture's poll queries get this long beyond one update period to answer, and a query left
# unanswered ends the capture (see Pm1000Capture). A healthy instrument answers in milliseconds (a
# 9600 baud :FRD? reply takes about 0.1 s); on loopback with every core oversubscribed and three
# threads contending for the interpreter lock, :DSR? round trips reached 0.37 s.
_POLL_MARGIN_S = 0.5
_STALE_PERIODS = 3  # a capture fails when no new reading came for this many update periods ...
_ZERO_BLANK_S = 1.0  # ... plus this long while auto-zero is on (the manual: no results for ~1 s a minute)
_ESR_BITS = {0: "OPC", 1: "RQC", 2: "QYE query error", 3: "DDE device error", 4: "EXE execution error",
             5: "CME command error", 6: "URQ", 7: "PON"}  # fmt: skip


def describe_esr(esr: int) -> str:
    names = ", ".join(f"bit {b} {n}" for b, n in _ESR_BITS.items() if esr & (1 << b))
    return f"ESR={esr} ({names})"


@dataclass(frozen=True)
class Accuracy:
    """The PM1000+ accuracy specification (User Manual, Voltech 2010, p. 79, "Example of Volts, Amps and
    Watts Accuracy Calculations"): volts 0.1 % of reading + 0.1 % of range + 4 mV, amps 0.1 % of
    reading + 0.1 % of range + 1 mA, each + (0.02 x F) % of reading with F the frequency in kHz (0 on
    a DC rail). Watts are bounded from the two as the error of a product, |dW| <= V dI + I dV + dV dI,
    with I the mean current (W / V): the manual's own watts figure is not in the pages consulted.
    Each figure is a setting (`accuracy: {amps_floor_a: ...}` in lab.yaml) for an instrument
    calibrated better or fitted with another shunt."""

    volts_reading: float = 1e-3
    volts_range: float = 1e-3
    volts_floor_v: float = 4e-3
    amps_reading: float = 1e-3
    amps_range: float = 1e-3
    amps_floor_a: float = 1e-3

    def volts(self, v: float, v_range: float) -> float:
        return self.volts_reading * abs(v) + self.volts_range * v_range + self.volts_floor_v

    def amps(self, a: float, a_range: float) -> float:
        return self.amps_reading * abs(a) + self.amps_range * a_range + self.amps_floor_a

    def watts(self, v: float, a: float, v_range: float, a_range: float) -> float:
        """Bound on the error of V x A (a power reading, or an instantaneous power from peaks)."""
        dv, da = self.volts(v, v_range), self.amps(a, a_range)
        return abs(v) * da + abs(a) * dv + dv * da


@dataclass(frozen=True)
class DataStatus:
    """The data status register (`:DSR?`, as enabled by `:DSE`), which clears on read."""

    raw: int

    @property
    def data_available(self) -> bool:
        return bool(self.raw & DSR_DVL)

    @property
    def new_data(self) -> bool:
        return bool(self.raw & DSR_NDV)

    @property
    def current_overload(self) -> bool:
        return bool(self.raw & DSR_OVA)

    @property
    def voltage_overload(self) -> bool:
        return bool(self.raw & DSR_OVV)


class Pm1000:
    """One PM1000+ (a single-channel analyzer); implements the PowerMeter capability."""

    def __init__(
        self,
        resource: str,
        *,
        name: str = "pm1000",
        read_termination: str = "\n",
        write_termination: str = "\n",
        ack_set_commands: bool | None = None,  # None: True for TCPIP sockets, False for serial
        timeout_s: float = 2.0,
        update_period_s: float = 0.5,
        poll_interval_s: float = 0.01,
        baud_rate: int = 9600,
        results: tuple[str, ...] | list[str] = DEFAULT_RESULTS,
        voltage_range: int | str = "auto",  # "auto" (a pre-scan picks it) or the range number (1-4)
        current_range: int | str = "auto",  # "auto" or the range number (1-6)
        auto_zero: bool = False,  # the manual: auto-zero blanks ~1 s of results each minute
        integrator: bool = True,  # run the integrator during captures (needs "Wh" in results)
        accuracy: dict[str, float] | None = None,  # Accuracy's figures that differ from the manual's
        voltage_ranges_v: Sequence[float] = VOLTAGE_RANGES_V,
        current_ranges_a: Sequence[float] = CURRENT_RANGES_A,
        range_headroom: float = 1.25,  # a held range is at least this times the peak the pre-scan saw
        result_latency_s: float = 0.05,  # results appear up to this long after their period ends (assumed)
    ):
        unknown = [r for r in results if r not in RESULTS]
        if unknown:
            raise ValueError(f"{name}: unknown result(s) {unknown}; known: {sorted(RESULTS)}")
        known = {f.name for f in fields(Accuracy)}
        if set(accuracy or {}) - known:
            raise ValueError(
                f"{name}: unknown accuracy figure(s) {sorted(set(accuracy or {}) - known)}; "
                f"known: {sorted(known)}"
            )
        if range_headroom < 1:
            raise ValueError(f"{name}: range_headroom must be at least 1, got {range_headroom}")
        self.resource, self.name = resource, name
        self.read_termination, self.write_termination = read_termination, write_termination
        self.ack_set_commands = (
            resource.upper().startswith("TCPIP") if ack_set_commands is None else ack_set_commands
        )
        self.timeout_s, self.update_period_s, self.poll_interval_s = (
            timeout_s,
            update_period_s,
            poll_interval_s,
        )
        self.baud_rate = baud_rate
        self.results = tuple(results)
        self.voltage_range, self.current_range, self.auto_zero = voltage_range, current_range, auto_zero
        self.integrator = integrator
        self.accuracy = Accuracy(**(accuracy or {}))
        self.range_tables = {
            "VLT": tuple(map(float, voltage_ranges_v)),
            "AMP": tuple(map(float, current_ranges_a)),
        }
        self.range_headroom = range_headroom
        self.result_latency_s = result_latency_s
        self._ranges: dict[str, int | str] = {"VLT": voltage_range, "AMP": current_range}  # as configured
        self.range_note = (
            "lab.yaml" if self.ranges_from_lab else "autorange"
        )  # why the ranges are what they are
        self._res: MessageBasedResource | None = None
        self._res_timeout_ms = 0  # the resource's read timeout as last set
        self._io = threading.Lock()
        self._idn: str | None = None
        self._selected: tuple[str, ...] | None = None  # what :FRD? returns, once configured
        self._zeroing = auto_zero  # auto-zero as last configured

    @classmethod
    def from_lab(cls, entry: InstrumentEntry, family: BoardFamily | None = None) -> Pm1000:
        """From an inventory InstrumentEntry: its resource, name and `settings` (the keywords above);
        `family` is part of the common driver signature (unused)."""
        settings = dict(getattr(entry, "settings", None) or {})
        known = [
            p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "resource", "name")
        ]
        unknown = sorted(set(settings) - set(known))
        if unknown:
            raise LabConfigError(
                f"instruments.{entry.name}.settings: unknown key(s) {unknown}; known: {known}"
            )
        try:
            return cls(entry.resource, name=entry.name, **settings)
        except (TypeError, ValueError) as e:
            raise LabConfigError(f"instruments.{entry.name}.settings: {e}") from e

    # -- connection ----------------------------------------------------------------------------

    def open(self) -> Self:
        """Open the resource and ask who it is (an instrument that does not answer fails here)."""
        if self._res is not None:
            return self
        kwargs: dict[str, Any] = {
            "read_termination": self.read_termination, "write_termination": self.write_termination,
            "timeout": round(self.timeout_s * 1000),
        }  # fmt: skip
        if self.resource.upper().startswith("ASRL"):
            kwargs["baud_rate"] = self.baud_rate
        try:
            res = pyvisa.ResourceManager("@py").open_resource(self.resource, **kwargs)
        except (pyvisa.Error, ValueError, OSError) as e:
            raise InstrumentError(self.name, f"open {self.resource}", _seen(e)) from e
        if not isinstance(res, MessageBasedResource):
            res.close()
            raise InstrumentError(
                self.name, f"open {self.resource}", f"not a message-based resource ({type(res).__name__})"
            )
        self._res, self._res_timeout_ms = res, kwargs["timeout"]
        try:
            self._idn = self._query("*IDN?")
        except InstrumentError as e:
            self.close()
            raise InstrumentError(self.name, f"open {self.resource}", f"no answer to *IDN?: {e.seen}") from e
        return self

    def close(self) -> None:
        res, self._res, self._selected = self._res, None, None
        if res is not None:
            try:
                res.close()
            except (pyvisa.Error, OSError):
                pass  # closing a connection the instrument already dropped

    def __enter__(self) -> Self:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- commands ------------------------------------------------------------------------------

    def identity(self) -> str:
        """The instrument's `*IDN?` reply."""
        self.open()
        return self._idn or ""

    def send(self, command: str) -> str | None:
        """One command line, checked: the reply of a query (None for a set command).

        Raises InstrumentError naming the command and the ESR bits when the instrument refused it.
        """
        self.open()
        is_query = command.rstrip().endswith("?")
        try:
            reply = self._transact(command, expect_reply=is_query)  # a query's reply is never None
        except InstrumentError as e:  # a refused query may send nothing at all: ask why
            esr = self._esr()
            if esr:
                raise InstrumentError(self.name, command, describe_esr(esr)) from e
            raise
        self._check(command)
        return reply

    def configure(
        self,
        results: tuple[str, ...] | list[str] | None = None,
        *,
        voltage_range: int | str | None = None,
        current_range: int | str | None = None,
        auto_zero: bool | None = None,
    ) -> tuple[str, ...]:
        """Select the results (in this order), set the ranges, auto-zero, and enable new-data status;
        returns the results selected."""
        results = tuple(results or self.results)
        unknown = [r for r in results if r not in RESULTS]
        if unknown:
            raise ValueError(f"{self.name}: unknown result(s) {unknown}; known: {sorted(RESULTS)}")
        self.open()
        commands = ["*CLS", ":SEL:CLR", *(f":SEL:{RESULTS[r]}" for r in results)]
        for which, value in (("VLT", voltage_range), ("AMP", current_range)):
            if value is not None:
                self._ranges[which] = value
            commands.append(_range_command(which, self._ranges[which]))
        zeroing = self.auto_zero if auto_zero is None else auto_zero
        commands += [f":SYST:ZERO {int(zeroing)}", ":AVG 0", f":DSE {DSR_DVL | DSR_NDV | DSR_OVA | DSR_OVV}"]
        for command in commands:
            self.send(command)
        self._selected, self._zeroing = results, zeroing
        return results

    # -- ranges --------------------------------------------------------------------------------

    @property
    def ranges_from_lab(self) -> bool:
        """Both ranges fixed by the settings (lab.yaml): no pre-scan, no stepping up."""
        return self.voltage_range != "auto" and self.current_range != "auto"

    def held_range(self, which: str) -> float | None:
        """The range value in force for "VLT" or "AMP" (None while autoranging)."""
        number = self._ranges[which]
        return None if number == "auto" else self.range_tables[which][int(number) - 1]

    def lowest_ranges(self) -> None:
        """The lowest ranges, for what lab.yaml leaves to the bench (the start of a pre-scan)."""
        for which, setting in (("VLT", self.voltage_range), ("AMP", self.current_range)):
            if setting == "auto":
                self._set_range(which, 1)

    def hold_ranges(self, trace: PowerTrace) -> str:
        """Fix the ranges lab.yaml leaves to the bench at the lowest, no lower than those held now,
        that hold the peaks seen in `trace` (a pre-scan without an overload) with `range_headroom`;
        returns how they were chosen."""
        ups = [u for u in trace.updates if not u.overload] or list(trace.updates)
        if not ups:
            raise InstrumentError(self.name, "pre-scan", "no reading to choose the ranges from")
        peak_v = max(u.voltage_v for u in ups)
        peak_a = max(u.current_peak_a if u.current_peak_a is not None else u.current_a for u in ups)
        for which, setting, peak in (
            ("VLT", self.voltage_range, peak_v),
            ("AMP", self.current_range, peak_a),
        ):
            if setting == "auto":
                held = self._ranges[which]
                self._set_range(which, max(self._fitting(which, peak), 0 if held == "auto" else int(held)))
        self.range_note = (
            f"pre-scan: peaks {peak_v:.4g} V, {peak_a:.4g} A, held with x{self.range_headroom:g} "
            f"headroom"
            + ("" if self.voltage_range == self.current_range == "auto" else "; lab.yaml fixes the other")
        )
        return self.range_note

    def step_up(self, overloaded: Sequence[PowerUpdate]) -> str | None:
        """After an overload: raise the ranges the pre-scan chose to hold the peaks of `overloaded`
        (updates; one range up at least). None when lab.yaml fixed them or they are at the top."""
        raised = []
        for which, setting in (("VLT", self.voltage_range), ("AMP", self.current_range)):
            number = self._ranges[which]
            if setting != "auto" or number == "auto" or int(number) >= len(self.range_tables[which]):
                continue
            peak = max(
                (
                    u.voltage_v
                    if which == "VLT"
                    else u.current_peak_a
                    if u.current_peak_a is not None
                    else u.current_a
                )
                for u in overloaded
            )
            if which == "VLT" and peak * self.range_headroom <= self.range_tables[which][int(number) - 1]:
                continue  # the voltage held: the current overloaded
            new = max(int(number) + 1, self._fitting(which, peak))
            self._set_range(which, new)
            raised.append(
                f"{'voltage' if which == 'VLT' else 'current'} range {self.range_tables[which][new - 1]:g} "
                f"{'V' if which == 'VLT' else 'A'}"
            )
        if not raised:
            return None
        self.range_note += f"; raised to the {' and '.join(raised)} after an overload"
        return ", ".join(raised)

    def _fitting(self, which: str, peak: float) -> int:
        table = self.range_tables[which]
        return next((i + 1 for i, r in enumerate(table) if peak * self.range_headroom <= r), len(table))

    def _set_range(self, which: str, number: int | str) -> None:
        self._ranges[which] = number
        if self._selected is not None:
            self.send(_range_command(which, number))

    def data_status(self) -> DataStatus:
        """Read (and so clear) the data status register."""
        self.open()
        return DataStatus(int(self._query(":DSR?")))

    def read_results(self) -> dict[str, float]:
        """The selected results (`:FRD?`) by name."""
        if self._selected is None:
            self.configure()
        return {k: v for k, (v, _) in self._parse(self._query(":FRD?")).items()}

    def read_update(self, after_s: float, by_s: float, overload: bool, integrating: bool) -> PowerUpdate:
        """`:FRD?` as a PowerUpdate refreshed in [after_s, by_s] (host monotonic s), with its bounds;
        `overload`: the status register flagged one since the previous update."""
        r = self._parse(self._query(":FRD?", self.poll_timeout_s))
        value = {k: v for k, (v, _) in r.items()}
        v, w = value["V"], value["W"]
        v_range, a_range = (
            self._reported_range("VLT", value.get("Vrng")),
            self._reported_range("AMP", value.get("Arng")),
        )
        # an unknown range (autoranging, not reported) is taken at the top: the accuracy's worst case
        acc_v, acc_a = v_range or self.range_tables["VLT"][-1], a_range or self.range_tables["AMP"][-1]
        extremes: dict[str, float | None] = {"min": None, "max": None}
        extremes_accuracy = 0.0
        for key, name in (("min", "Apk-"), ("max", "Apk+")):
            if name in value:
                a = value[name]
                extremes[key] = v * a
                bound = self.accuracy.watts(v, a, acc_v, acc_a) + abs(v) * r[name][1] + abs(a) * r["V"][1]
                extremes_accuracy = max(extremes_accuracy, bound)
        wh = value.get("Wh") if integrating else None
        hours = value.get("HRS") if integrating else None
        return PowerUpdate(
            seen_after_s=after_s, seen_by_s=by_s, voltage_v=v, current_a=value["A"], power_w=w,
            overload=overload, integrator_energy_j=wh * 3600.0 if wh is not None else None,
            integrator_charge_ah=value.get("Ah") if integrating else None,
            integrator_elapsed_s=hours * 3600.0 if hours is not None else None,
            power_accuracy_w=self.accuracy.watts(v, w / v if v else 0.0, acc_v, acc_a), power_rounding_w=r["W"][1],
            power_min_w=extremes["min"], power_max_w=extremes["max"], extremes_accuracy_w=extremes_accuracy,
            integrator_rounding_j=r["Wh"][1] * 3600.0 if wh is not None else 0.0,
            integrator_elapsed_rounding_s=r["HRS"][1] * 3600.0 if hours is not None else 0.0,
            voltage_range_v=v_range, current_range_a=a_range, current_peak_a=value.get("Apk+"),
        )  # fmt: skip

    def _reported_range(self, which: str, reported: float | None) -> float | None:
        """A range from `:SEL:VRNG`/`ARNG` (its value, or its number: the manual does not say which
        it prints), else the fixed range configured (None while autoranging)."""
        if reported is None:
            return self.held_range(which)
        table = self.range_tables[which]
        for value in table:
            if math.isclose(reported, value, rel_tol=1e-3):
                return value
        if float(reported).is_integer() and 1 <= reported <= len(table):
            return table[int(reported) - 1]
        return reported

    def wait_for_new_data(self, timeout_s: float | None = None) -> dict[str, float]:
        """The manual's idiom: poll `:DSR?` until NDV, then `:FRD?`."""
        if self._selected is None:
            self.configure()
        timeout_s = timeout_s or 2 * self.update_period_s + self.timeout_s
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.data_status().new_data:
                return self.read_results()
            time.sleep(self.poll_interval_s)
        raise InstrumentError(self.name, "wait for new data", f"no new results within {timeout_s:.1f} s")

    def integrator_mode(self) -> None:
        """Integrator mode with the manual start method."""
        self.send(":MOD:INT")
        self.send(":INT:START 0")

    def integrator_run(self) -> None:
        self.send(":INT:MAN:RUN")

    def integrator_stop(self) -> None:
        self.send(":INT:MAN:STOP")

    def integrator_reset(self) -> None:
        self.send(":INT:RESET")

    @property
    def poll_timeout_s(self) -> float:
        """How long a capture's poll query may go unanswered: one update period and a margin (or
        `timeout_s`, when shorter)."""
        return min(self.timeout_s, self.update_period_s + _POLL_MARGIN_S)

    def capture(self, channel: int | str = 1, *, step_up: bool = False) -> Pm1000Capture:
        """A capture window: background polling, host-clock marks, a PowerTrace at the end;
        `step_up`: raise the ranges the bench chooses at each overload read (a pre-scan)."""
        if str(channel) != "1":
            raise UsageError(f"{self.name}: the PM1000+ has one input (channel 1), not {channel!r}")
        return Pm1000Capture(self, step_up=step_up)

    # -- the wire ------------------------------------------------------------------------------

    def _transact(self, command: str, expect_reply: bool, timeout_s: float | None = None) -> str | None:
        """One command and its reply (or acknowledge), read within `timeout_s` (default `self.timeout_s`)."""
        timeout_s = timeout_s or self.timeout_s
        with self._io:
            res = self._res
            if res is None:
                raise InstrumentError(self.name, command, "not open")
            try:
                if round(timeout_s * 1000) != self._res_timeout_ms:
                    res.timeout = self._res_timeout_ms = round(timeout_s * 1000)
                res.write(command)
                if expect_reply or self.ack_set_commands:
                    reply = res.read()
                    return reply.strip() if expect_reply else None
                return None
            except (pyvisa.Error, OSError) as e:
                raise InstrumentError(self.name, command, _seen(e, timeout_s)) from e

    def _query(self, command: str, timeout_s: float | None = None) -> str:
        return self._transact(command, expect_reply=True, timeout_s=timeout_s) or ""

    def _write(self, command: str) -> None:
        self._transact(command, expect_reply=False)

    def _esr(self) -> int:
        return int(self._query("*ESR?"))

    def _check(self, command: str, tolerate: int = 0) -> None:
        esr = self._esr()
        if esr & ~tolerate:
            raise InstrumentError(self.name, command, describe_esr(esr))

    def _parse(self, reply: str) -> dict[str, tuple[float, float]]:
        """Each selected result's value and its rounding (half the last digit printed)."""
        tokens = [v for v in reply.replace(" ", "").split(",") if v]
        names = self._selected or ()
        if len(tokens) != len(names):
            raise InstrumentError(
                self.name, ":FRD?", f"{len(tokens)} values for {len(names)} results {names}: {reply!r}"
            )
        return dict(zip(names, map(_value_and_rounding, tokens), strict=True))


class Pm1000Capture:
    """Returned by `Pm1000.capture()`; use it as a context manager.

    Entering configures the meter if needed, starts the integrator (when "Wh" is selected),
    and returns once the first update is in, so marks made afterwards lie inside the trace.
    Leaving waits for two updates that began after the exit (the edge update and the baseline
    beyond it), stops the integrator and keeps its totals.

    Watchdog. The capture fails the moment the instrument
    - leaves a poll query (`:DSR?`, `:FRD?`) unanswered for `meter.poll_timeout_s` (one update period
      plus 0.5 s; pyvisa-py reports a dropped TCP connection as such a timeout too), or
    - brings no new reading for `stale_after_s` after the last one (or the start): 3 update periods,
      plus the auto-zero blanking while auto-zero is on (a range change blanks one update: tolerated).
    A silent instrument is so caught one poll timeout after it went silent (1 s at the 0.5 s period),
    and at the latest 3 update periods after its last reading. Failing sets `failed` (a
    threading.Event: pass it as the `stop` of a DUT run), sets `error` (an InstrumentError, action
    "capture", naming the resource, what was seen and the last reading's time), calls the
    `on_failure` callbacks, and stops polling.

    Leaving a failed capture (or entering, when it fails before the first reading) raises `error`,
    with `.partial` = the PowerTrace of everything captured before the fault (readings and marks,
    `fault` set; `cap.trace` stays readable too). When the body raised an
    exception of its own after the capture had failed (typically RunAborted, the DUT stopped by
    `failed`), the instrument error is the cause and surfaces instead, with the body's exception as
    its `__context__` (its message carries the failing query's text rather than chaining that
    error, so a traceback shows the body's exception). A body exception while the capture was still
    healthy, or one that is not an Exception (KeyboardInterrupt), propagates as it is.

    `step_up` (a pre-scan): raise the ranges the bench chooses at each overload read. `clock`: the host
    clock readings and marks are placed on; a caller that polls on a clock of its own drives `begin()`
    and `poll_once()` itself instead of entering.
    """

    def __init__(self, meter: Pm1000, clock: Callable[[], float] = time.monotonic, *, step_up: bool = False):
        self.meter = meter
        self._clock = clock  # the host clock marks and readings are placed on
        self._step_up = step_up
        self.failed = threading.Event()
        self.error: InstrumentError | None = None
        self._updates: list[PowerUpdate] = []
        self._marks: list[Mark] = []
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._callbacks: list[Callable[[InstrumentError], None]] = []
        self._threads: list[threading.Thread] = []
        self._last_reading_s = 0.0  # host time of the newest reading (of the start, before any)
        self._integrating = False
        self._integrator: IntegratorReading | None = None
        self._flagged = False  # an overload flag read without new data: it goes with the next update

    @property
    def stale_after_s(self) -> float:
        """How long the capture waits for a new reading before it fails."""
        m = self.meter
        periods = _STALE_PERIODS + (math.ceil(_ZERO_BLANK_S / m.update_period_s) if m._zeroing else 0)
        return periods * m.update_period_s

    def mark(self, label: str, t_s: float | None = None) -> float:
        """Record an event at `t_s` (default now) on the host monotonic clock."""
        t_s = self._clock() if t_s is None else t_s
        with self._lock:
            self._marks.append(Mark(label, t_s))
        return t_s

    def on_failure(self, callback: Callable[[InstrumentError], None]) -> None:
        """Call `callback(error)` when the capture fails (at once if it already has), on the thread
        that noticed the failure: it should be quick and not raise."""
        with self._lock:
            if self.error is None:
                self._callbacks.append(callback)
                return
        callback(self.error)

    @property
    def trace(self) -> PowerTrace:
        """What has been captured so far (everything, after the with block)."""
        with self._lock:
            return PowerTrace(
                period_s=self.meter.update_period_s, updates=tuple(self._updates), marks=tuple(self._marks),
                instrument=self.meter._idn or "", integrator=self._integrator,
                fault=str(self.error) if self.error else None, latency_s=self.meter.result_latency_s,
            )  # fmt: skip

    def __enter__(self) -> Self:
        with step(self.meter.name, "capture start"):
            return self._start()

    def _start(self) -> Self:
        """Drain, start polling and watching, and wait for the first update."""
        drained_at = self.begin()
        for target, args, role in ((self._poll, (drained_at,), "poll"), (self._watch, (), "watch")):
            thread = threading.Thread(
                target=target, args=args, name=f"{self.meter.name}-capture-{role}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        self._wait_for(lambda: len(self._updates) >= 1)
        if self.error:
            self._finish()
            raise self.error
        return self

    def begin(self) -> float:
        """Configure the meter if needed, start its integrator (when "Wh" is selected) and clear a
        stale new-data flag; returns when the flag was cleared (the first `poll_once`'s
        `previous_sent_s`). Entering the capture calls it; a caller polling on its own clock too."""
        m = self.meter
        selected = m._selected if m._selected is not None else m.configure()
        missing = [r for r in _CAPTURE_NEEDS if r not in selected]
        if missing:
            raise UsageError(f"{m.name}: a capture needs results {missing} selected")
        if m.integrator and "Wh" in selected:
            m.integrator_mode()
            m._write(":INT:MAN:STOP")  # a run left over from an earlier session; EXE when none was
            m._check(":INT:MAN:STOP", tolerate=ESR_EXE)
            m.integrator_reset()
            m.integrator_run()
            self._integrating = True
        drained_at = self._last_reading_s = self._clock()
        m.data_status()  # clears any stale NDV: the first update recorded refreshed after this
        return drained_at

    def poll_once(self, previous_sent_s: float) -> float:
        """One round of the new-data idiom: `:DSR?`, then `:FRD?` when it reports new data, recorded
        as refreshed after `previous_sent_s`; returns when this round's `:DSR?` was sent."""
        m = self.meter
        sent = self._clock()
        status = DataStatus(int(m._query(":DSR?", m.poll_timeout_s)))
        replied = self._clock()
        self._flagged |= status.current_overload or status.voltage_overload
        if status.new_data:
            update = m.read_update(previous_sent_s, replied, self._flagged, self._integrating)
            self._record(update)
            self._flagged = False
            if self._step_up and update.overload:
                m.step_up([update])
        return sent

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        failed_before = self.failed.is_set()
        with step(self.meter.name, "capture stop", f"{len(self._updates)} updates"):
            if exc_type is None:
                self.wait_for_updates_after(max([self._clock()] + [mk.t_s for mk in self._marks]), 2)
            self._finish()
        if self.error and (exc_type is None or (failed_before and isinstance(exc, Exception))):
            raise self.error  # the body's exception, if any, becomes its __context__

    def wait_for_updates_after(self, t_s: float, count: int = 1) -> None:
        """Until `count` updates refreshed after `t_s` are in (or the capture fails)."""
        self._wait_for(lambda: sum(u.seen_after_s > t_s for u in self._updates) >= count)

    def _wait_for(self, condition: Callable[[], bool]) -> None:
        """Until `condition` holds or the capture fails (the watchdog bounds the wait)."""
        with self._lock:
            self._lock.wait_for(lambda: condition() or self.error is not None)

    def _finish(self) -> None:
        with self._lock:
            self._stop.set()
            self._lock.notify_all()
        for thread in self._threads:
            thread.join(timeout=self.meter.poll_timeout_s + 1.0)
        if self._integrating and not self.error:
            try:
                self.meter.integrator_stop()
                r = self.meter.read_results()
                self._integrator = IntegratorReading(
                    energy_j=r["Wh"] * 3600.0, charge_ah=r.get("Ah"),
                    elapsed_s=r["HRS"] * 3600.0 if "HRS" in r else None,
                )  # fmt: skip
            except InstrumentError as e:
                self._fail(f"stopping the integrator: {e.action}: {e.seen}")
        if self.error:
            self.error.partial = self.trace

    def _fail(self, seen: str) -> None:
        """Mark the capture failed (the first failure only), then tell the callbacks."""
        m = self.meter
        with self._lock:
            if self.error is not None:
                return
            last = f"last reading at t={self._last_reading_s:.3f} s" if self._updates else "no reading yet"
            self.error = InstrumentError(
                m.name, "capture", f"{m.resource}: {seen}; {last}, {len(self._updates)} readings kept"
            )
            callbacks, self._callbacks = self._callbacks, []
            self._lock.notify_all()
        self.failed.set()
        for callback in callbacks:
            callback(self.error)

    def _watch(self) -> None:
        """Fail the capture when no new reading has come for `stale_after_s`."""
        limit_s = self.stale_after_s
        with self._lock:
            while True:
                if self._stop.is_set() or self.error is not None:
                    return
                quiet_s = self._clock() - self._last_reading_s
                if quiet_s >= limit_s:
                    break
                self._lock.wait(limit_s - quiet_s)
        periods = limit_s / self.meter.update_period_s
        self._fail(f"no new reading for {quiet_s:.2f} s (limit {limit_s:g} s, {periods:g} update periods)")

    def _poll(self, previous_sent: float) -> None:
        m = self.meter
        try:
            while not (self._stop.is_set() or self.failed.is_set()):
                sent = previous_sent = self.poll_once(previous_sent)
                # dithered: polls at a fixed phase to the instrument's clock would let every
                # update's interval fall at the same offset, and the clock fit could not narrow it
                pause_s = m.poll_interval_s * (0.5 + random.random())
                self._stop.wait(max(0.0, sent + pause_s - self._clock()))
        except InstrumentError as e:
            self._fail(f"{e.action}: {e.seen.rstrip('.')}")
        except ValueError as e:  # a reply that is not a number
            self._fail(f":DSR?: {e}")

    def _record(self, update: PowerUpdate) -> None:
        with self._lock:
            if self.error is None:  # nothing after the fault: the partial trace ends where it failed
                self._updates.append(update)
                self._last_reading_s = update.seen_by_s
                self._lock.notify_all()


def _range_command(which: str, number: int | str) -> str:
    return f":RNG:{which}:AUT" if number == "auto" else f":RNG:{which}:FIX {int(number)}"


def _value_and_rounding(token: str) -> tuple[float, float]:
    """A printed number and half its last digit (`2.7778E-03` -> 0.0027778, 5e-8; a zero in
    scientific notation is exact, as anything else would have printed with a smaller exponent)."""
    value = float(token)
    exponent = Decimal(token).as_tuple().exponent  # a letter for inf and nan
    if not isinstance(exponent, int) or (value == 0 and "E" in token.upper()):
        return value, 0.0
    return value, 0.5 * 10.0**exponent


def _seen(e: Exception, timeout_s: float | None = None) -> str:
    text = str(e)
    if isinstance(e, pyvisa.VisaIOError) and e.error_code == pyvisa.constants.StatusCode.error_timeout:
        return f"no reply within {timeout_s:g} s: {text}" if timeout_s else f"no reply (timeout): {text}"
    return text or type(e).__name__
