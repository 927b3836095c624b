"""A simulated Voltech PM1000+ power analyzer reading one power-bus channel.

It speaks the PM1000+ command set (../shared/reference/voltech-pm1000.md, "ref" below) on a TCP port
and, with the same parser, behind a pty standing in for its RS232 port. It follows the manual where
it speaks; where it is silent the choice is a setting, marked "assumed" below (docs/pm1000-sim.md
lists every figure with its source). `IDEAL` holds the settings of an instrument without errors.

- Updates: results refresh every `update_period_s` (0.5 s, ref 2.1) on the instrument's own clock
  (epoch = `start()`), each the statistics of the input over the period just ended: W = mean of
  v x i, Vrms, Arms (so PF < 1 for a bursty DC load). The results, and DVL/NDV, appear
  `ndv_latency_s` +- `ndv_jitter_s` (uniform) after the period ends: assumed 20 +- 5 ms of
  processing, which no source gives.
- Accuracy (`accuracy="spec"`): every range of each input has a fixed gain and offset error, drawn
  once from `seed` (default: the instrument's name) uniformly within the manual's accuracy at DC
  (user manual p.79: V +-(0.1 % rdg + 0.1 % range + 4 mV), A +-(0.1 % rdg + 0.1 % range + 1 mA)),
  applied to every sample. W, VA and the integrator follow from the corrected samples, so W errs
  by at most `power_bound()`. `accuracy="ideal"`: no error.
- Noise: each update's readings carry Gaussian noise on the V and A inputs, sigma
  `noise_pct_of_range` % of the range (assumed 0.02 %); W, Arms and the peaks follow from it. The
  integrator sums the calibrated samples without it (it samples continuously).
- Ranges are peak values (the manual quotes "1.6Apk" for current range 3, and 215 V as the range
  for 120 Vrms on p.79); the other table entries between the manual's end points are assumed.
  Autorange goes up at once when the peak exceeds the range, down after `downrange_after` updates
  (assumed 1) with the peak within `downrange_fraction` (assumed 0.8) of the lower range, straight
  to the range needed. A range change blanks one update (ref 2.1): no results and, assumed, nothing
  integrated; an up-range sets OVA/OVV for the overload that caused it. Changing the range by
  command blanks the update in progress. On a fixed range an input beyond it is clipped at the
  range and every such update sets OVA/OVV (ref 3.4).
- Auto-zero (2 updates each minute while `:SYST:ZERO 1`) blanks updates as a range change does.
- DSR: `:DSR?` answers DSR AND DSE and clears the register (the manual's loop waits for the reply
  "2" after `:DSE 2`, which only a masked read gives).
- Integrator: `:MOD:INT`, `:INT:START 0`, `:INT:MAN:RUN` / `:INT:MAN:STOP` / `:INT:RESET` with the
  manual's preconditions (a violation sets ESR bit 4, EXE). While running it adds whole updates
  only (those that began after RUN and completed before STOP). While it runs `:FRD?` reports its
  totals as of the latest update; stopped, its final totals. `HRS` is in hours (from the
  mnemonic). Leaving integrator mode stops it (assumed). Every result, Wh included, is printed with
  `number_format` ("%.4E": five significant digits, ref 3.3's suggestion for an unknown format).
- ESR: bit 5 (CME) for an unknown or malformed command, bit 4 (EXE) for a refused one or an
  out-of-range value; a refused query sends no reply (only the Ethernet acknowledge).
- Faults (`faults`: silence, disconnect; see labbench.sim.faults) act in the transport, before the
  parser sees a command.
- Not simulated: harmonics, distortion factors (selecting them sets EXE), averaging, filters,
  clock-started integration, the display; their settings are kept and read back.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, Self

from pyvisa import rname

from labbench.sim.faults import InstrumentFaults
from labbench.sim.lineserver import LineServer
from labbench.sim.powerbus import PowerChannel

DEFAULT_IDN = "Voltech,PM1000+,SIM-0001,1.00"
DEFAULT_VOLTAGE_RANGES_V = (10.0, 50.0, 215.0, 1000.0)  # 1 and 4: ref 3.9; 3: manual p.79
DEFAULT_CURRENT_RANGES_A = (0.1, 0.4, 1.6, 6.25, 25.0, 100.0)  # 1, 3, 4 (p.79, inrush example), 6: manual

#: accuracy at DC (the manual's frequency term vanishes): input -> (% of reading, % of range, fixed)
ACCURACY_SPEC = {"V": (0.1, 0.1, 0.004), "A": (0.1, 0.1, 0.001)}  # user manual p.79
#: settings that make the simulated instrument error-free and prompt
IDEAL: dict[str, Any] = {
    "accuracy": "ideal",
    "noise_pct_of_range": 0.0,
    "ndv_latency_s": 0.0,
    "ndv_jitter_s": 0.0,
}

DSR_DVL, DSR_NDV, DSR_OVA, DSR_OVV = 1, 2, 8, 16
ESR_EXE, ESR_CME = 16, 32
MODE_NORMAL, MODE_INTEGRATOR = 0, 4
_MODES = {"MOD:NOR": 0, "MOD:BAL": 1, "MOD:INR": 2, "MOD:SBY": 3, "MOD:INT": 4}
_NAN = 9.91e37  # the SCPI "not a number" value, for a result with no meaning (Z with no current)
_ZERO_BLANK_S = 1.0  # auto-zero produces no new results for about 1 s


def accuracy_bound(which: str, reading: float, range_: float) -> float:
    """The manual's accuracy for one `which` ("V" or "A") reading on a range, in V or A."""
    rdg_pct, range_pct, fixed = ACCURACY_SPEC[which]
    return abs(reading) * rdg_pct / 100 + range_ * range_pct / 100 + fixed


def power_bound(v: float, a: float, v_range: float, a_range: float) -> float:
    """How far W can be off when V and A are each within their accuracy (a DC load; `a` its Arms)."""
    dv, da = accuracy_bound("V", v, v_range), accuracy_bound("A", a, a_range)
    return v * da + a * dv + dv * da


@dataclass(frozen=True)
class Calibration:
    """One range's error: what the instrument makes of an input value x."""

    gain: float = 1.0
    offset: float = 0.0

    def __call__(self, x: float) -> float:
        return self.gain * x + self.offset


def _calibrations(
    rng: random.Random, which: str, ranges: tuple[float, ...], accuracy: str
) -> tuple[Calibration, ...]:
    if accuracy == "ideal":
        return tuple(Calibration() for _ in ranges)
    rdg_pct, range_pct, fixed = ACCURACY_SPEC[which]
    return tuple(
        Calibration(
            1.0 + rng.uniform(-1, 1) * rdg_pct / 100, rng.uniform(-1, 1) * (r * range_pct / 100 + fixed)
        )
        for r in ranges
    )


@dataclass(frozen=True)
class _Update:
    """One refresh of the results, already scaled."""

    v: float
    a: float  # rms
    w: float
    a_peak: float
    a_min: float
    v_range: float
    a_range: float

    @property
    def va(self) -> float:
        return self.v * self.a


def _ratio(num: float, den: float) -> float:
    return num / den if den else _NAN


# :SEL code -> (label returned by :FRF?, value from the latest update and the integrator totals)
_QUANTITIES: dict[str, tuple[str, Callable[[_Update, dict[str, float]], float]]] = {
    "VLT": ("Vrms", lambda u, i: u.v),
    "AMP": ("Arms", lambda u, i: u.a),
    "WAT": ("Watt", lambda u, i: u.w),
    "VAS": ("VA", lambda u, i: u.va),
    "VAR": ("Var", lambda u, i: math.sqrt(max(u.va**2 - u.w**2, 0.0))),
    "PWF": ("PF", lambda u, i: u.w / u.va if u.va else 0.0),
    "FRQ": ("Freq", lambda u, i: 0.0),  # a DC rail
    "VDC": ("Vdc", lambda u, i: u.v),
    "ADC": ("Adc", lambda u, i: _ratio(u.w, u.v)),
    "VPK+": ("Vpk+", lambda u, i: u.v),
    "VPK-": ("Vpk-", lambda u, i: u.v),
    "APK+": ("Apk+", lambda u, i: u.a_peak),
    "APK-": ("Apk-", lambda u, i: u.a_min),
    "VCF": ("Vcf", lambda u, i: 1.0),
    "ACF": ("Acf", lambda u, i: _ratio(u.a_peak, u.a)),
    "RES": ("R", lambda u, i: _ratio(u.w, u.a**2)),
    "IMP": ("Z", lambda u, i: _ratio(u.v, u.a)),
    "REA": ("X", lambda u, i: math.sqrt(max(_ratio(u.v, u.a) ** 2 - _ratio(u.w, u.a**2) ** 2, 0.0))),
    "WHR": ("Whr", lambda u, i: i["wh"]),
    "VAH": ("VAhr", lambda u, i: i["vah"]),
    "VRH": ("VArhr", lambda u, i: i["varh"]),
    "AHR": ("Ahr", lambda u, i: i["ah"]),
    "HRS": ("Hrs", lambda u, i: i["elapsed_s"] / 3600.0),
    "VRNG": ("Vrng", lambda u, i: u.v_range),
    "ARNG": ("Arng", lambda u, i: u.a_range),
}
_NOT_SIMULATED = {"VDF", "ADF", "VHM", "AHM"}

# plain registers: header -> (default, allowed values (a set) or an inclusive (min, max) range,
# integers when the bounds are); "HDR v" sets, "HDR?" reads
_ONOFF = frozenset({0, 1})
_REGISTERS: dict[str, tuple[float, frozenset | tuple]] = {
    "AVG": (0, _ONOFF),
    "INP:FILT:LPAS": (0, _ONOFF),
    "SYST:ZERO": (1, _ONOFF),
    "INT:START": (0, _ONOFF),
    "MOD:SBY:PER": (60, (1, 300)),
    "MOD:INR:RNG": (6, (1, 6)),
    "MOD:INR:VRNG": (4, (1, 4)),
    "SCL:VLT": (1.0, (0.0001, 100000.0)),
    "SCL:AMP": (1.0, (0.0001, 100000.0)),
}
_COMMS_REGISTERS: dict[str, tuple[float, frozenset | tuple]] = {
    "COM:RS2:BAUD": (9600, frozenset({9600, 19200, 38400})),
    "COM:IEE:ADDR": (5, (1, 30)),
}
# switches: command -> (register read back by "<register>?", value)
_SWITCHES = {
    "BLK:ENB": ("BLK", 1), "BLK:DIS": ("BLK", 0),
    "SHU:INT": ("SHU", 0), "SHU:EXT": ("SHU", 1),
    "FSR:VLT": ("FSR", 0), "FSR:AMP": ("FSR", 1),
}  # fmt: skip
_SWITCH_DEFAULTS = {"BLK": 1, "SHU": 0, "FSR": 0}
_ACCEPTED = {"REM:OFF", "DSP:Z04", "DSP:Z14", "MOD:INR:CLR", "INT:CLK:TIME", "INT:CLK:DATE", "INT:CLK:DUR"}


class _Refused(Exception):
    def __init__(self, esr_bit: int):
        self.esr_bit = esr_bit


class Pm1000Model:
    """The instrument's state and command parser, transport-free and thread-safe."""

    def __init__(
        self,
        channel: PowerChannel,
        *,
        idn: str = DEFAULT_IDN,
        update_period_s: float = 0.5,
        number_format: str = "%.4E",
        voltage_ranges_v: tuple[float, ...] = DEFAULT_VOLTAGE_RANGES_V,
        current_ranges_a: tuple[float, ...] = DEFAULT_CURRENT_RANGES_A,
        auto_zero_interval_s: float = 60.0,
        accuracy: str = "spec",
        seed: int | str = 0,
        noise_pct_of_range: float = 0.02,
        ndv_latency_s: float = 0.02,
        ndv_jitter_s: float = 0.005,
        downrange_after: int = 1,
        downrange_fraction: float = 0.8,
        clock: Callable[[], float] = time.monotonic,
    ):
        if accuracy not in ("spec", "ideal"):
            raise ValueError(f"accuracy must be 'spec' or 'ideal', not {accuracy!r}")
        if not 0 <= ndv_jitter_s <= ndv_latency_s < update_period_s - ndv_jitter_s:
            raise ValueError(
                f"need 0 <= ndv_jitter_s <= ndv_latency_s and ndv_latency_s + ndv_jitter_s < the period, "
                f"got {ndv_latency_s} +- {ndv_jitter_s} s for a {update_period_s} s period"
            )
        if noise_pct_of_range < 0 or downrange_after < 1 or not 0 < downrange_fraction <= 1:
            raise ValueError(
                "need noise_pct_of_range >= 0, downrange_after >= 1 and 0 < downrange_fraction <= 1"
            )
        self.channel, self.idn = channel, idn
        self.period_s = update_period_s
        self._fmt = number_format
        self._ranges = {"V": tuple(voltage_ranges_v), "A": tuple(current_ranges_a)}
        self._zero_every = max(1, round(auto_zero_interval_s / update_period_s))
        self._zero_blanks = max(1, round(_ZERO_BLANK_S / update_period_s))
        cal_rng = random.Random(f"{seed}/calibration")
        #: input -> one Calibration per range (range number - 1)
        self.calibration = {w: _calibrations(cal_rng, w, r, accuracy) for w, r in self._ranges.items()}
        self._rng = random.Random(f"{seed}/noise")  # reading noise and flag latency
        self._noise = noise_pct_of_range / 100
        self._latency, self._jitter = ndv_latency_s, ndv_jitter_s
        self._down_after, self._down_fraction = downrange_after, downrange_fraction
        self._clock = clock
        self._lock = threading.RLock()
        self._comms = {k: d for k, (d, _) in _COMMS_REGISTERS.items()}
        self._handlers = self._commands()
        self.restart()

    def restart(self) -> None:
        """Power on: defaults, and the update clock starts now."""
        with self._lock:
            self._epoch = self._clock()
            self._k = 0  # index of the last update completed; update k ends at epoch + k * period
            self._reset()

    @property
    def epoch_s(self) -> float:
        """When the update clock started (host monotonic s): update k's period ends k periods later."""
        return self._epoch

    def _reset(self) -> None:
        """*RST / :DVC: defaults, comms settings kept."""
        self._regs = {k: d for k, (d, _) in _REGISTERS.items()}
        self._switches = dict(_SWITCH_DEFAULTS)
        self._selection = ["VLT", "AMP", "WAT", "PWF"]  # inferred: the 4-result screen
        self._mode = MODE_NORMAL
        self._auto = {"V": True, "A": True}
        self._range = {w: len(r) for w, r in self._ranges.items()}  # range numbers, 1-based
        self._below = {"V": 0, "A": 0}  # consecutive updates that would allow a lower range
        self._blank_next = False
        self._dsr = self._dse = self._esr = self._ese = 0
        self._update: _Update | None = None
        self._pending: deque[tuple[float, _Update | None, int, dict[str, float]]] = deque()
        self._integrating = False
        self._run_since = 0.0
        self._totals = dict.fromkeys(("wh", "vah", "varh", "ah", "elapsed_s"), 0.0)
        self._shown_totals = dict(self._totals)  # as of the latest update, while the integrator runs

    # -- the update clock ----------------------------------------------------------------------

    def next_update_s(self) -> float:
        """When the next update completes or its results appear, whichever is first (host monotonic s)."""
        with self._lock:
            end = self._epoch + (self._k + 1) * self.period_s
            return min(end, self._pending[0][0]) if self._pending else end

    def advance(self) -> None:
        """Complete every update whose period has ended by now, and publish the results that are due."""
        with self._lock:
            now = self._clock()
            while True:
                end = self._epoch + (self._k + 1) * self.period_s
                if self._pending and self._pending[0][0] <= min(now, end):
                    self._publish(*self._pending.popleft())
                elif end <= now:
                    self._k += 1
                    self._complete(self._k)
                else:
                    return

    def _publish(self, _due: float, update: _Update | None, bits: int, totals: dict[str, float]) -> None:
        if update is not None:
            self._update, self._shown_totals = update, totals
        self._dsr |= bits

    def _complete(self, k: int) -> None:
        """Update k's period has ended: measure it, integrate it, schedule its results."""
        t1 = self._epoch + k * self.period_s
        t0 = t1 - self.period_s
        due = t1 + self._latency + (self._rng.uniform(-self._jitter, self._jitter) if self._jitter else 0.0)
        levels = self.channel.levels(t0, t1)
        v = self.channel.voltage_v
        a_peak = max([p for p, s in levels.items() if s > 0] or levels) / v
        v_range, a_range = self._ranges["V"][self._range["V"] - 1], self._ranges["A"][self._range["A"] - 1]
        overload = (DSR_OVA if a_peak > a_range else 0) | (DSR_OVV if v > v_range else 0)
        zeroing = (
            self._regs["SYST:ZERO"] == 1
            and k >= self._zero_every
            and k % self._zero_every < self._zero_blanks
        )
        blank, self._blank_next = self._blank_next or zeroing, False
        blank |= self._auto["A"] and self._autorange("A", a_peak)
        blank |= self._auto["V"] and self._autorange("V", v)
        if blank:
            if overload:
                self._pending.append((due, None, overload, {}))
            return
        cal_v = self.calibration["V"][self._range["V"] - 1]
        cal_a = self.calibration["A"][self._range["A"] - 1]
        v_in = cal_v(min(v, v_range))
        amps: dict[float, float] = {}
        for p, s in levels.items():
            i = cal_a(max(-a_range, min(p / v, a_range)))
            amps[i] = amps.get(i, 0.0) + s
        i_mean = sum(i * s for i, s in amps.items()) / self.period_s
        i_ms = sum(i * i * s for i, s in amps.items()) / self.period_s
        seen = [i for i, s in amps.items() if s > 0] or list(amps)
        sv, sa = self._regs["SCL:VLT"], self._regs["SCL:AMP"]

        def reading(nv: float, na: float) -> _Update:
            return _Update(
                v=(v_in + nv) * sv, a=math.sqrt(max(i_ms + 2 * na * i_mean + na * na, 0.0)) * sa,
                w=(v_in + nv) * (i_mean + na) * sv * sa, a_peak=(max(seen) + na) * sa,
                a_min=(min(seen) + na) * sa, v_range=v_range, a_range=a_range,
            )  # fmt: skip

        clean = reading(0.0, 0.0)
        shown = (
            reading(*(self._rng.gauss(0.0, self._noise * r) for r in (v_range, a_range)))
            if self._noise
            else clean
        )
        if self._integrating and t0 >= self._run_since:
            h = self.period_s / 3600.0
            var = _QUANTITIES["VAR"][1](clean, self._totals)
            for key, value in (("wh", clean.w), ("vah", clean.va), ("varh", var), ("ah", clean.a)):
                self._totals[key] += value * h
            self._totals["elapsed_s"] += self.period_s
        self._pending.append((due, shown, DSR_DVL | DSR_NDV | overload, dict(self._totals)))

    def _autorange(self, which: str, peak: float) -> bool:
        """Pick the range for `peak`; True when it changed (which blanks this update)."""
        ranges, current = self._ranges[which], self._range[which]
        needed = next((i + 1 for i, r in enumerate(ranges) if peak <= r), len(ranges))
        if needed < current and peak <= self._down_fraction * ranges[needed - 1]:
            self._below[which] += 1
            if self._below[which] < self._down_after:
                return False
        elif needed <= current:
            self._below[which] = 0
            return False
        self._range[which], self._below[which] = needed, 0
        return True

    # -- commands ------------------------------------------------------------------------------

    def handle(self, line: str) -> str | None:
        """Execute one command line; the reply, or None when there is none."""
        header, _, arg = line.strip().partition(" ")
        key, arg = header.upper().lstrip(":"), arg.strip()
        with self._lock:
            self.advance()
            try:
                return self._execute(key, arg)
            except _Refused as e:
                self._esr |= e.esr_bit
                return None

    def _execute(self, key: str, arg: str) -> str | None:
        query = key.endswith("?")
        base = key[:-1] if query else key
        if query and arg:
            raise _Refused(ESR_CME)
        if base in _MODES:
            if query:
                _fail()
            self._set_mode(_MODES[base])
            return None
        if base == "MOD":
            return str(self._mode) if query else _fail()
        if base.startswith(("SEL:", "SCL:VCF", "SCL:ACF")) and not query:
            self._select(base.split(":", 1)[1], arg)
            return None
        if base in _REGISTERS or base in _COMMS_REGISTERS:
            return self._register(base, arg, query)
        if base in _SWITCHES and not query:
            _no_arg(arg)
            register, value = _SWITCHES[base]
            self._switches[register] = value
            return None
        if base in self._switches and query:
            return str(self._switches[base])
        if base in _ACCEPTED and not query:
            return None
        handler = self._handlers.get(key)
        if handler is None:
            raise _Refused(ESR_CME)
        return handler(arg)

    def _commands(self) -> dict[str, Callable[[str], str | None]]:
        return {
            "*IDN?": lambda a: self.idn,
            "*RST": _no_arg_then(self._reset),
            "DVC": _no_arg_then(self._reset),
            "*CLS": _no_arg_then(self._clear_status),
            "*ESR?": lambda a: str(self._read_clear("_esr", 0xFF)),
            "*ESE": lambda a: self._set_int("_ese", a, 0, 255),
            "*ESE?": lambda a: str(self._ese),
            "*STB?": lambda a: str(self._stb()),
            "DSE": lambda a: self._set_int("_dse", a, 0, 255),
            "DSE?": lambda a: str(self._dse),
            "DSR?": lambda a: str(self._read_clear("_dsr", self._dse)),
            "FRD?": lambda a: self._frd(),
            "FRF?": lambda a: ", ".join(_QUANTITIES[c][0] for c in self._selection),
            "RNG:VLT:FIX": lambda a: self._fix_range("V", a),
            "RNG:AMP:FIX": lambda a: self._fix_range("A", a),
            "RNG:VLT:AUT": _no_arg_then(lambda: self._auto.update(V=True)),
            "RNG:AMP:AUT": _no_arg_then(lambda: self._auto.update(A=True)),
            "RNG:VLT?": lambda a: str(self._range["V"]),
            "RNG:AMP?": lambda a: str(self._range["A"]),
            "RNG:VLT:AUT?": lambda a: str(int(self._auto["V"])),
            "RNG:AMP:AUT?": lambda a: str(int(self._auto["A"])),
            "INT:MAN:RUN": _no_arg_then(self._integrator_run),
            "INT:MAN:STOP": _no_arg_then(self._integrator_stop),
            "INT:RESET": _no_arg_then(self._integrator_reset),
        }

    def _clear_status(self) -> None:
        self._esr = self._ese = self._dsr = 0  # the manual: clears ESE and DSR (and, per 488.2, ESR)

    def _read_clear(self, attr: str, mask: int) -> int:
        value = getattr(self, attr) & mask
        setattr(self, attr, 0)
        return value

    def _stb(self) -> int:
        return (1 if self._dsr & self._dse else 0) | (32 if self._esr & self._ese else 0)

    def _set_int(self, attr: str, arg: str, lo: int, hi: int) -> None:
        setattr(self, attr, int(_number(arg, (lo, hi))))

    def _register(self, key: str, arg: str, query: bool) -> str | None:
        store = self._comms if key in self._comms else self._regs
        _, allowed = {**_COMMS_REGISTERS, **_REGISTERS}[key]
        if query:
            value = store[key]
            return str(value) if isinstance(value, int) else self._fmt % value
        store[key] = _number(arg, allowed)
        return None

    def _select(self, code: str, arg: str) -> None:
        _no_arg(arg)
        if code == "CLR":
            self._selection = []
        elif code in _NOT_SIMULATED:
            raise _Refused(ESR_EXE)
        elif code in _QUANTITIES:
            if code not in self._selection:
                self._selection.append(code)
        else:
            raise _Refused(ESR_CME)

    def _frd(self) -> str:
        upd = self._update or _Update(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        totals = self._shown_totals if self._integrating else self._totals
        return ",".join(self._fmt % _QUANTITIES[c][1](upd, totals) for c in self._selection)

    def _fix_range(self, which: str, arg: str) -> None:
        number = int(_number(arg, (1, len(self._ranges[which]))))
        if number != self._range[which]:
            self._blank_next = True  # the update in progress mixes two ranges
        self._range[which], self._auto[which] = number, False

    def _set_mode(self, mode: int) -> None:
        if mode != MODE_INTEGRATOR:
            self._integrating = False
        self._mode = mode

    def _integrator_ready(self, *, running: bool, manual: bool = True) -> None:
        if (
            self._mode != MODE_INTEGRATOR
            or self._integrating != running
            or (manual and self._regs["INT:START"] != 0)
        ):
            raise _Refused(ESR_EXE)

    def _integrator_run(self) -> None:
        self._integrator_ready(running=False)
        self._integrating, self._run_since = True, self._clock()
        self._shown_totals = dict(self._totals)

    def _integrator_stop(self) -> None:
        self._integrator_ready(running=True)
        self._integrating = False

    def _integrator_reset(self) -> None:
        self._integrator_ready(running=False, manual=False)
        self._totals = dict.fromkeys(self._totals, 0.0)


def _fail() -> NoReturn:
    raise _Refused(ESR_CME)


def _no_arg(arg: str) -> None:
    if arg:
        raise _Refused(ESR_CME)


def _no_arg_then(action: Callable[[], object]) -> Callable[[str], None]:
    """A handler for a command that takes no parameter: `action`, no reply."""

    def handler(arg: str) -> None:
        _no_arg(arg)
        action()

    return handler


def _number(arg: str, allowed: frozenset | tuple) -> float:
    """Parse a parameter: CME when it is not a number, EXE when it is not allowed."""
    try:
        value = float(arg)
    except ValueError:
        raise _Refused(ESR_CME) from None
    if isinstance(allowed, frozenset):
        ok = value in allowed
    else:
        lo, hi = allowed
        ok = lo <= value <= hi and (isinstance(lo, float) or value == int(value))
    if not ok:
        raise _Refused(ESR_EXE)
    return value if isinstance(allowed, tuple) and isinstance(allowed[0], float) else int(value)


class Pm1000Sim:
    """The simulated PM1000+ on `host:port` (TCP, acknowledging commands) and a pty (RS232).

    `instrument` settings are Pm1000Model's (the `sim:` block of lab.yaml passes them on); `seed`
    defaults to `name`, so each named instrument is one reproducible unit with its own errors.
    """

    def __init__(
        self,
        name: str,
        host: str = "127.0.0.1",
        port: int = 0,
        channel: PowerChannel | None = None,
        *,
        terminator: str = "\n",
        ack_tcp: bool = True,
        ack_serial: bool = False,
        use_pty: bool = True,
        seed: int | str | None = None,
        clock: Callable[[], float] = time.monotonic,
        **instrument: Any,
    ):
        if channel is None:
            raise ValueError(f"{name}: a PowerChannel to measure is required")
        self.name = name
        try:
            self.model = Pm1000Model(channel, seed=name if seed is None else seed, clock=clock, **instrument)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name}: {e}") from e
        self._server = LineServer(
            name, self.model.handle, host=host, port=port, use_pty=use_pty,
            terminator=terminator, ack_tcp=ack_tcp, ack_serial=ack_serial,
        )  # fmt: skip
        self._clock = clock
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    @classmethod
    def from_resource(cls, name: str, resource: str, channel: PowerChannel, **kwargs) -> Pm1000Sim:
        """Listen where a `TCPIP::host::port::SOCKET` resource string points."""
        parsed = rname.parse_resource_name(resource)
        if isinstance(parsed, rname.TCPIPSocket):
            return cls(name, parsed.host_address, int(parsed.port), channel, **kwargs)
        raise ValueError(f"{name}: {resource!r} is not a TCPIP::host::port::SOCKET resource")

    @property
    def host(self) -> str:
        return self._server.host

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def resource(self) -> str:
        return f"TCPIP::{self.host}::{self.port}::SOCKET"

    @property
    def faults(self) -> InstrumentFaults:
        return self._server.faults

    @property
    def pty_path(self) -> str | None:
        return self._server.pty_path

    @property
    def serial_resource(self) -> str | None:
        """`ASRL/dev/pts/N::INSTR` for the RS232 path (while running with a pty)."""
        return f"ASRL{self.pty_path}::INSTR" if self.pty_path else None

    @property
    def running(self) -> bool:
        return self._server.running

    def start(self) -> Self:
        if self.running:
            return self
        self._server.start()
        self.model.restart()
        self._stop.clear()
        self._ticker = threading.Thread(target=self._tick, name=f"{self.name}-updates", daemon=True)
        self._ticker.start()
        return self

    def stop(self) -> None:
        """Stop answering and drop every connection (also how a test kills it mid-capture)."""
        self._stop.set()
        if self._ticker:
            self._ticker.join(timeout=2.0)
            self._ticker = None
        self._server.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _tick(self) -> None:
        """Refresh at each update even when nobody asks (keeps the integrator's bus reads recent)."""
        while not self._stop.wait(max(0.0, self.model.next_update_s() - self._clock()) + 0.001):
            self.model.advance()
