"""MLPerf Tiny DUT protocol client over any pyserial URL: `DutSerial`, the InferenceTarget of MCU boards.

The protocol is ../shared/reference/mlperf-tiny-dut-protocol.md: commands end with "%", replies
are "\\r\\n"-terminated lines ending with `m-ready`, `e-[...]` lines are errors. Written over
pyserial (`serial_for_url`: /dev/tty..., rfc2217://, socket://) because the only other client,
MLCommons' runner, is an application that waits out every reply, not a library.

Speed. Commands are pipelined: up to `max_inflight_bytes` (default 160, two full upload chunks)
of commands are on their way while earlier replies come back. The DUT's parser takes one command
at a time; the rest waits in its UART receive buffer (mbed's BufferedSerial and Arduino-ESP32
keep 256 B, USB CDC boards flow-control), so two commands in flight never overflow it, and the
line to the DUT never idles for a round trip. Uploads use 38-byte chunks (`db ` + 76 hex digits
= 79 characters, the most the reference's 80-character command buffer holds; MLCommons' runner
sends 31). Results come from the `m-results-[...]` line that ends every `infer` reply, so no
separate `results%` round trip is made.

Latency. The DUT's two `m-lap-us-` stamps bracket all N inferences of `infer N W`, so:
- `run_timed(..., per_inference=False)` (default): one `infer count warmup` window, MLPerf Tiny's
  performance mode: back-to-back inferences, the window for throughput and energy. Only the
  window's mean per inference is observable; every entry of `latencies_us` is that mean and
  `extra["latency_basis"]` is "window_mean".
- `run_timed(..., per_inference=True)`: `infer 1 W`, then `infer 1 0` count-1 times (pipelined);
  each pair of stamps brackets exactly one inference, a true distribution
  (`latency_basis` "per_inference"). The inferences are separated by their serial replies.

Host clock. A `timestamp%` exchange with nothing else in flight maps the DUT's microsecond counter
onto time.monotonic(): the stamp lies between the command's arrival and the reply's departure
(wire times taken off both ends); the midpoint is used and the half-width recorded
(`clock_uncertainty_s`). `host_start`/`host_end` are the first and last stamps mapped. The 32-bit
counter wraps after 71.6 min; stamps are unwrapped against the sync.

Inputs. `run_timed` and `classify` send what the DUT expects (`input_bytes`). A DUT whose profile
reported one of the MLPerf Tiny IDs (ic01, kws01, vww01, ad01: labbench.modelinfo.MLPERF_TINY) gets
the runner's format, as the reference firmware takes it: uint8 images for ic01/vww01 (the firmware
subtracts 128), int8 features for kws01, little-endian float32 for ad01 (the firmware quantizes).
Samples may be given in that format or as the model's int8 input tensor, which is converted (+128;
dequantized with the model's input scale and zero point). Any other DUT gets the raw bytes of the
model's input tensor, in C order: an int8 model gets int8 values (quantize floats with
`labbench.modelinfo.quantize_input`). `upload` sends bytes as given.

Cold start. `reset` releases the reset line and times the boot to `m-init-done` on the host clock.
`m-init-done` left the DUT no later than its line's arrival minus the line's wire time (and the wire
time of any bytes that came after it in the same read), and no earlier than that minus the link
latency. Right after the banner a `timestamp%` exchange bounds that latency (its round trip minus
the wire times of command and reply) and maps the DUT's counter onto the host clock, which places
the banner's own `m-lap-us-N` (th_timestamp_initialize, printed before the model is initialised) on
the host clock. A line that left right behind the one before it may have waited in the DUT's
transmit queue (a boot ROM's log still draining): it was written no earlier than the banner's
stamp, which bounds it instead. The reset edge lies between the host's instants before and after it
set the line (µs on a local UART); over RFC 2217 the change goes out at once as a Telnet message on
the same connection and pyserial then polls for the acknowledgement every 50 ms, so the edge lies
within one link latency of the first instant.
`cold_start` then holds, in ms (interval midpoints; the uncertainty is the half-width):
- `cold_start_ms`: reset edge -> m-init-done, host clock; `cold_start_uncertainty_ms` (the parts
  below carry about as much);
- `cold_start_boot_ms`: reset edge -> the banner stamp (boot ROM, bootloader, runtime start-up);
- `cold_start_init_ms`: banner stamp -> m-init-done (the firmware's initialisation: model load);
- `cold_start_dut_ms`: the banner stamp's own value + cold_start_init_ms: the DUT's counter at
  m-init-done, its own count since its timer started (mbed's us_ticker and ESP-IDF's esp_timer start
  with the application, after any bootloader); left out when the stamp exceeds the host's time since
  the edge (a counter that kept running through the reset).
A banner without a stamp (energy-mode firmware) gives `cold_start_ms` alone, its uncertainty then
covering the edge only. `cold_start_basis` says which clocks a figure rests on: "host_and_dut" (the
host timed the reset edge and the banner, the DUT's stamp split them), "host_clock" (no stamp).
`identify` adds `cold_start` to its `extra`, which run orchestration records.

Cold start without a reset line (`boot_cold_start`). A USB CDC board (the Nano 33 BLE, the Coral
Micro) cannot be reset through its port, and its port re-enumerates on reset, so its banner is
easily missed. Its firmware keeps the banner's stamp B and its counter D at m-init-done and reports
them on request (`boot%` -> `m-boot-us-[B,D]`, announced in `profile` by `m-ext-[boot]`; the
project's firmware core and the simulated boards have it, MLPerf's reference firmware does not):
- on the DUT's clock (basis "dut_clock"): `cold_start_dut_ms` = D, the counter's start (the
  application's) -> m-init-done, and `cold_start_init_ms` = D - B, the model's initialisation, each
  within `cold_start_dut_uncertainty_ms` (TIMER_SLACK_S: two readings of a 1 kHz timer). What ran
  before the counter started (boot ROM, bootloader) is not in D;
- with the host's clock (basis "host_and_dut"), when the caller knows host instants before and
  after the reset that started the boot (`reset_window`: the install step, whose flasher resets the
  board after writing): a `timestamp%` exchange places m-init-done and the counter's zero on the
  host clock (its uncertainty, TIMER_SLACK_S and `clock_tolerance_ppm` over the time since the
  window opened count into `u`). The reset lies after the window opened and before both the
  window's end and the counter's zero (when the counter started inside the window, i.e. with the
  application), so `cold_start_ms` is the midpoint of [m-init-done - that latest reset - u (and no
  less than D - TIMER_SLACK_S), m-init-done - window start + u] and `cold_start_uncertainty_ms` its
  half-width; `cold_start_boot_ms` is reset -> banner stamp likewise. The interval is as wide as
  the part of the window before the reset: a flasher that reported when it reset would narrow it.
  A counter that did not start inside the window keeps `cold_start_init_ms` and the host interval,
  not `cold_start_dut_ms`; an m-init-done outside the window (the board was not reset by it, or
  was reset again since) leaves the DUT's clock alone.

Checks. No number from the DUT is believed before its exchange is checked:
- each reply has exactly the lines its command calls for, and echoes what was sent: `db load N`
  `m-[Expecting N bytes]`; a chunk nothing, the last `m-load-done`; `infer N W` `m-warmup-start-W`,
  `m-warmup-done`, `m-infer-start-N`, two `m-lap-us-T`, `m-infer-done`, `m-results-[...]` (a byte
  lost on the way to the DUT turns `infer 8742 0` into `infer 742 0`, or `infer 1 0` into `infer 10`);
- numbers are written as the firmware writes them: counts and stamps in decimal without leading
  zeros, stamps below 2^32; result values `-?(0|[1-9][0-9]*)(\\.[0-9]+)?` with an optional exponent,
  finite, as many as the model has outputs (`output_count`: given, else the first results line
  since `identify`);
- stamps are monotonic (mod 2^32) and agree with the host clock: each stamp follows the one before
  it (the clock sync's, the previous run's) by at most the host time from the sending of the
  earlier stamp's command to the arrival of the later stamp's line, x (1 + `clock_tolerance_ppm`)
  + TIMER_SLACK_S (a stamp that went backwards wraps to ~71 min and fails this). The host side can
  only be longer: it adds the link and the host's own delays;
- a window is at least as long as the host saw it: T1 - T0 >= (arrival of T1's line - arrival of
  T0's line) x (1 - tolerance) - `link_latency_s` (how much later than its event a line can be
  read: wire time, USB latency timers, a loaded host; 1 s); and at least WINDOW_MIN_FRACTION of
  count x the time per inference known from earlier runs;
- `classify` returns exactly one row per sample sent.
A lost digit changes a stamp by at least half its value, so a lost byte in a count or a stamp is an
error, not a number, unless the DUT's counter is within about twice a command's duration of zero
(just after boot or the 71.6-min wrap). A lost '.' of a value below 1 leaves a leading zero
(`0.967` -> `0967`): an error. What the checks cannot see without the CRC extension: a lost or
changed digit of a result that still leaves a well-formed number (`0.967` -> `0.97`, `12.5` ->
`125`), a lost '-', before `output_count` is known a lost ',' between two integers (`1,0` -> `10`),
and a changed (not lost) low digit of a stamp. Commands carry no CRC: a lost hex digit of an upload
leaves an odd count, which the firmware refuses, but a changed one reaches the model unnoticed.

Reply integrity (an extension of the protocol, firmware/core/src/lb_dut.h). A DUT that has it
lists `m-ext-[crc32]` in its `profile` reply; `identify` then sends `crc32 on%` (answered
`m-crc32-[on]`), and from that reply on every line comes as `<line> *XXXXXXXX`, XXXXXXXX the
CRC-32 (zlib.crc32) of the line before " *" in upper-case hex. The client checks and strips it; a
line without a valid tag is a DutProtocolError. A reset turns it off; the client turns it on again
before its next exchange. `crc32 off%` ends it. DUTs that do not announce it (MLPerf's reference
firmware) are never sent `crc32` and get the checks above only. `extra["reply_crc32"]` of
`identify` and of each TimedRun says whether it was on.

Timeouts. A command is timed from when it heads the pipeline (its predecessor's m-ready arrived,
or it was sent) to its own m-ready. `infer N W` gets max(2 x E, E + EXPECTED_SLACK_S) with E its
expected duration (`expected_s`): (N + W) x the time per inference + the command's and reply's
wire time. The time per inference is `inference_s`: given, or measured by the longest infer run
since `identify`, whose elapsed time is taken as up to TIMER_SLACK_S off (a 1 kHz timer's
resolution), so a one-inference probe gives a loose bound and a longer run a tight one. While it
is unknown, `infer_timeout_s` (default 120 s). Other commands get `timeout_s`. So once a run was
timed, a DUT silent inside a 10 s window is reported about 20 s after the window's command started.

Stopping. `run_timed`, `classify` and `infer` take `stop` (a threading.Event): once it is set,
the wait ends within READ_POLL_S with RunAborted. The DUT still finishes what it was sent; the
next exchange first collects those replies, so the link stays in step.

Hierarchical inference (HiTarget; the firmware core's `hi` extension, firmware/core/src/lb_dut.h,
announced by `m-ext-[hi]`). `hi_configure(decision, server)` sends `hi-cfg` (the decision's
coefficients as float32, which the DUT uses) and `hi-srv`, and checks that the echoes are the values
sent. `hi_run(samples)` runs passes of as many samples as the DUT's `db` holds (DB_CAPACITY_BYTES,
at most HI_MAX_SAMPLES): per pass an upload of the samples back to back, a `timestamp%` clock sync
and `hi k`, with nothing sent after it, so the pass's window holds no host traffic. Every line is
checked before it becomes a number: the samples' indices in sequence, 0 <= p2 <= p1 <= 1, the
verdict against the decision recomputed here from the DUT's own p1 and p2 (a threshold exactly in
float32; a logistic score within HI_SCORE_TOLERANCE of 0 either way), the final class the local one
where accepted, classes within the outputs (when `output_count` is known), t_off 0 exactly where
accepted, the remote mode's local fields empty, the per-sample times within the window, the count
echoed by `m-hi-done-[k,start,end]` and its stamps consistent with the host clock. The HiRun has one
window per pass, its stamps mapped to the host clock. A DUT that reports a failed offload
(`e-[hi: sample i: offload to ip:port failed: why]`) raises EdgeError naming the board, the server
and the sample (the passes done before it attached as `.partial`); anything else malformed is a
DutProtocolError.

Serial log. Every byte both ways is appended, with host time.monotonic() stamps, to `log_path`
(default `reports/logs/<board>-serial.log` under the working directory; `from_lab(log_dir=...)`
puts it elsewhere): one line per read or write, `<time> -> b'...'` to the DUT, `<time> <- b'...'`
from it, `<time> -- ...` for events (open, flush, reset). Every error names it.

Errors name the board, the command, what was expected and what was seen: `DutReplyError` (an
`e-[...]` reply), `DutResetError` (a boot banner arrived: the DUT reset), `DutTimeout` (no complete
reply in time), `DutProtocolError` (their base; also a garbled, unexpected or inconsistent line, a
lost connection), RunAborted (stopped from outside). What was measured before the failure is
attached as `.partial`, and the recent lines as `.transcript`.
"""

from __future__ import annotations

import ipaddress
import math
import re
import threading
import time
import zlib
from collections import deque
from collections.abc import Generator
from contextlib import closing
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Protocol, Self, TypeVar, cast

import numpy as np
import serial

from labbench.capabilities import DutIdentity, HiRun, TimedRun
from labbench.errors import DutProtocolError, EdgeError, HardwareError, RunAborted
from labbench.modelinfo import MLPERF_TINY

NAME_ATTEMPTS = 3
CHUNK_BYTES = 38  # "db " + 76 hex digits = 79 characters: the reference's EE_CMD_SIZE is 80
DEFAULT_INFLIGHT_BYTES = 160
READ_POLL_S = 0.05  # pyserial read timeout; waits loop on it up to their own deadline
TIMER_WRAP = 1 << 32
TIMER_SLACK_S = 0.002  # two readings of a 1 kHz timer (the EEMBC minimum) are each up to 1 ms off
EXPECTED_SLACK_S = 5.0  # an infer command's bound: max(2 x expected, expected + 5 s)
WINDOW_MIN_FRACTION = 0.5  # a window is at least half of count x the time per inference seen before
REPLY_BYTES = 160  # an infer reply without its results line, tags included
VALUE_BYTES = 24  # the most one result value takes on the line
UNKNOWN_OUTPUTS = 640  # outputs assumed while the model's are unknown (AD01's, the largest in MLPerf Tiny)
# lines only a booting board prints: the DUT harness's banner, the ESP32 ROM's first lines
RESET_MARKERS = ("m-timestamp-mode-", "m-init-done", "ets ", "rst:0x")
_FIELD = re.compile(r"^m-([a-z0-9-]+)-\[(.*)\]$")
_NAME = re.compile(r"^m-name-([^\[]+)-\[(.*)\]$")
_STAMP = re.compile(r"^m-lap-us-(0|[1-9][0-9]{0,9})$")
_RESULTS = re.compile(r"^m-results-\[(.*)\]$")
_BOOT = re.compile(r"^m-boot-us-\[(0|[1-9][0-9]{0,9}),(0|[1-9][0-9]{0,9})\]$")
_VALUE = re.compile(r"^-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?$")
_TAG = re.compile(rb"^(.*) \*([0-9A-F]{8})$", re.DOTALL)
# the hi extension (firmware/core/src/lb_dut.h)
DB_CAPACITY_BYTES = 27648  # LB_DB_CAPACITY_BYTES: the samples of one pass
HI_MAX_SAMPLES = 256  # LB_HI_MAX_SAMPLES
HI_SAMPLE_ALLOWANCE_S = 1.0  # a pass's time limit allows each sample this much beyond its inference
HI_OFFLOAD_FAILURE_S = 10.0  # the DUT gives up on an offload within this (5 s timeout, one retry)
HI_SCORE_TOLERANCE = 1e-5  # of |w1| + |w2| + |b|: float32 arithmetic on the DUT, float64 here
_COUNT = re.compile(r"^(0|[1-9][0-9]{0,9})$")  # a count or a stamp as the firmware prints one
_HI_LINE = re.compile(r"^m-hi-\[(.*)\]$")
_HI_DONE = re.compile(r"^m-hi-done-\[(0|[1-9][0-9]{0,9}),(0|[1-9][0-9]{0,9}),(0|[1-9][0-9]{0,9})\]$")
_HI_CFG = re.compile(r"^m-hi-cfg-\[(lr|th|remote)((?:,[^,]+)*)\]$")
_HI_KINDS = {"logistic": ("lr", ("w1", "w2", "b")), "threshold": ("th", ("theta",)), "remote": ("remote", ())}
_HI_FAILED = re.compile(r"^e-\[hi: sample (0|[1-9][0-9]*): offload to (\S+) failed: (.*)\]$")

_Error = TypeVar("_Error", bound=HardwareError)


class _Port(Protocol):
    """What DutSerial uses of the port `serial.serial_for_url` opens. Its stubs declare a SerialBase,
    which lacks `in_waiting` and `reset_input_buffer`; every class it returns (a URL handler's or the
    platform's `Serial`) has them."""

    dtr: bool
    rts: bool

    @property
    def in_waiting(self) -> int: ...

    def read(self, size: int = 1) -> bytes: ...

    def write(self, data: bytes) -> int | None: ...

    def reset_input_buffer(self) -> None: ...

    def close(self) -> None: ...


class DutReplyError(DutProtocolError):
    """The DUT answered a command with an e-[...] line."""


class DutResetError(DutProtocolError):
    """The DUT printed its boot banner during a command: it reset."""


class DutTimeout(DutProtocolError):
    """The DUT did not complete a reply in time."""


@dataclass(frozen=True)
class InferRun:
    """One `infer N W`: the DUT's stamps around the N timed inferences, and the outputs."""

    count: int
    warmup: int
    start_us: int
    end_us: int
    outputs: np.ndarray

    @property
    def elapsed_us(self) -> int:
        return (self.end_us - self.start_us) % TIMER_WRAP


@dataclass(frozen=True)
class ClockSync:
    """DUT counter value `dut_us` was read at host time `host_s` (± `uncertainty_s`)."""

    dut_us: int
    host_s: float
    uncertainty_s: float

    def host_time(self, stamp_us: int) -> float:
        return self.host_s + ((stamp_us - self.dut_us) % TIMER_WRAP) / 1e6


@dataclass
class _Command:
    text: str
    timeout_s: float | None = None  # None: an infer command's bound, computed when it heads the pipeline
    alone: bool = False  # sent only with nothing else in flight (clock sync)
    expect: tuple[str, ...] | None = None  # the exact lines the reply must hold
    count: int | None = None  # of an `infer count warmup`
    warmup: int = 0
    crc: bool | None = None  # the reply-CRC state this command sets (and its own reply has)
    wire: bytes = b""
    sent_s: float = 0.0
    lines: list[tuple[str, float]] = field(default_factory=list)  # (line, host time its end arrived)
    error: HardwareError | None = None


@dataclass
class _Stamps:
    """The last DUT stamp of an exchange and when its command was sent (for the next stamp's check)."""

    last: tuple[int, float] | None = None


class _Timeout(Exception):
    pass


class _Stopped(Exception):
    pass


def tensor_bytes(sample: np.ndarray) -> bytes:
    """The raw bytes of an input tensor (C order). float64 is refused: no TFLite input is float64."""
    sample = np.asarray(sample)
    if sample.dtype == np.float64 or sample.dtype.kind not in "iuf":
        raise TypeError(
            f"a sample must hold the model's input tensor values (int8, uint8, float32, ...), "
            f"got {sample.dtype}; quantize with labbench.modelinfo.quantize_input"
        )
    return np.ascontiguousarray(sample).tobytes()


class DutSerial:
    """A board running MLPerf Tiny DUT firmware, reached at a pyserial URL (see the module docstring).

    `inference_s` (the DUT's time per inference) and `output_count` (the model's outputs) may be
    given; otherwise runs measure them, and `identify` and `reset` forget what was measured.
    A given `inference_s` is taken as exact: the bounds of the module docstring rest on it.
    """

    def __init__(
        self,
        url: str,
        *,
        board: str,
        baud: int = 115200,
        timeout_s: float = 5.0,
        infer_timeout_s: float = 120.0,
        max_inflight_bytes: int = DEFAULT_INFLIGHT_BYTES,
        log_path: str | Path | None = None,
        inference_s: float | None = None,
        output_count: int | None = None,
        clock_tolerance_ppm: float = 1000.0,
        link_latency_s: float = 1.0,
    ):
        """`clock_tolerance_ppm` bounds how far the DUT's and the host's clocks may disagree in rate
        (crystals: tens of ppm; NTP slews CLOCK_MONOTONIC by up to 500 ppm); an RC-clocked DUT needs
        more."""
        self.url, self.board, self.baud = url, board, baud
        self.timeout_s, self.infer_timeout_s = timeout_s, infer_timeout_s
        self.max_inflight_bytes = max_inflight_bytes
        self.log_path = Path(log_path or Path("reports") / "logs" / f"{board}-serial.log").resolve()
        self._given_inference_s, self._given_output_count = inference_s, output_count
        self.output_count = output_count
        self._longest: tuple[float, int] | None = None  # (elapsed s, count) of the longest run measured
        self.clock_tolerance = clock_tolerance_ppm * 1e-6
        self.link_latency_s = link_latency_s
        self.bytes_tx = self.bytes_rx = 0  # bytes written to / read from the line so far
        self.transcript: deque[str] = deque(maxlen=50)
        self._port: _Port | None = None
        self._log: IO[str] | None = None
        self._rx = bytearray()
        self._rx_s = 0.0
        self._crc = False  # the DUT tags its reply lines
        self._crc_announced = False  # its profile offered the crc32 extension
        self._owed: list[_Command] = []  # sent commands whose replies are still to come (after a stop)
        self.reported_model: str | None = None  # the m-model-[...] of the last identify: the input format
        self.cold_start: dict[str, float | str] = {}  # the last reset's or boot_cold_start's (module doc)
        self._hi: tuple[str, tuple[np.float32, ...], str] | None = None  # hi-cfg kind, values, server
        self._hi_settle_s = 0.0

    @classmethod
    def from_lab(cls, entry: Any, family: Any = None, *, log_dir: str | Path | None = None) -> DutSerial:
        """From a lab.yaml board entry (`family` is part of the common driver signature; unused); the
        serial log goes to `log_dir`/<board>-serial.log (default reports/logs/)."""
        conn = entry.serial
        log_path = Path(log_dir) / f"{entry.name}-serial.log" if log_dir is not None else None
        return cls(conn.url, board=entry.name, baud=conn.baud, timeout_s=conn.timeout_s, log_path=log_path)

    def __repr__(self) -> str:
        return f"DutSerial({self.board!r}, {self.url!r})"

    # -- connection and log -----------------------------------------------------------------------

    @property
    def char_time_s(self) -> float:
        """Seconds one character takes on the line (8N1: 10 bits)."""
        return 10 / self.baud

    def _open(self) -> _Port:
        if self._log is None:
            try:
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                self._log = open(self.log_path, "a", buffering=1)  # noqa: SIM115 (kept open until close())
            except OSError as exc:
                raise DutProtocolError(self.board, f"open log {self.log_path}", str(exc)) from None
        if self._port is None:
            self._event(f"open {self.url} at {self.baud} baud; host time {datetime.now().isoformat()}")
            try:
                port = serial.serial_for_url(self.url, baudrate=self.baud, timeout=READ_POLL_S)
                self._port = cast(_Port, port)
            except (serial.SerialException, ValueError, OSError) as exc:
                raise self._fail(DutProtocolError, f"open {self.url}", str(exc)) from None
        return self._port

    def close(self) -> None:
        if self._port is not None:
            self._port.close()
            self._port = None
            self._event("closed")
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Self:
        self._open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _event(self, what: str) -> None:
        self._wire_log(f"{time.monotonic():.6f} -- {what}")

    def _wire_log(self, line: str) -> None:
        """A line of the serial log (open while the port is: `_open`)."""
        if self._log is not None:
            self._log.write(line + "\n")

    def _flush_input(self) -> None:
        port = self._open()
        port.reset_input_buffer()
        self._rx.clear()
        self._event("input flushed")

    def _forget(self) -> None:
        """A new session or a reset: the firmware may be another; what runs measured is forgotten."""
        self.output_count = self._given_output_count
        self._longest = None

    # -- lines ------------------------------------------------------------------------------------

    def _readline(
        self, deadline: float, command: str, stop: threading.Event | None = None
    ) -> tuple[str, bool, float]:
        """The next line (its reply-CRC tag stripped when valid), whether it had a valid tag, and
        the host time its end arrived."""
        port = self._open()
        while (i := self._rx.find(b"\n")) < 0:
            if stop is not None and stop.is_set():
                raise _Stopped()
            if time.monotonic() >= deadline:
                raise _Timeout()
            try:
                chunk = port.read(max(1, port.in_waiting))
            except serial.SerialException as exc:
                raise self._lost(command, exc) from None
            if chunk:
                self._rx += chunk
                self._rx_s = time.monotonic()
                self.bytes_rx += len(chunk)
                self._wire_log(f"{self._rx_s:.6f} <- {bytes(chunk)!r}")
        raw = bytes(self._rx[:i]).rstrip(b"\r")
        del self._rx[: i + 1]
        m = _TAG.match(raw)
        tagged = m is not None and zlib.crc32(m.group(1)) == int(m.group(2), 16)
        line = (m.group(1) if m is not None and tagged else raw).decode("ascii", errors="replace")
        self.transcript.append(line)
        return line, tagged, self._rx_s

    def _last_line(self) -> str:
        return self.transcript[-1] if self.transcript else "(none)"

    def _lost(self, command: str, exc: Exception) -> DutProtocolError:
        """The connection broke: drop the port (the next command reopens it) and say so."""
        self._event(f"connection lost: {exc}")
        if self._port is not None:
            self._port.close()
            self._port = None
        return self._fail(
            DutProtocolError,
            _short(command),
            f"connection lost ({exc}); last line seen: {self._last_line()!r}",
        )

    def _fail(self, cls: type[_Error], command: str, seen: str) -> _Error:
        exc = cls(self.board, command, seen, log=str(self.log_path))
        exc.transcript = list(self.transcript)
        self._event(f"error: {command}: {seen}")
        return exc

    def _settle(self, command: str) -> None:
        """Discard whatever the DUT prints until the line is quiet (after a reset, or to re-align)."""
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            try:
                self._readline(min(deadline, time.monotonic() + 0.2), command)
            except _Timeout:
                break
        self._rx.clear()

    # -- expected durations -----------------------------------------------------------------------

    @property
    def inference_s(self) -> float | None:
        """The DUT's time per inference: given, or the longest run's mean; None while unknown."""
        if self._given_inference_s is not None or self._longest is None:
            return self._given_inference_s
        return self._longest[0] / self._longest[1]

    def _per_inference_bounds(self) -> tuple[float, float] | None:
        """(least, most) seconds per inference, or None while unknown."""
        if self._given_inference_s is not None or self._longest is None:
            given = self._given_inference_s
            return None if given is None else (given, given)
        elapsed_s, count = self._longest
        return max(0.0, elapsed_s - TIMER_SLACK_S) / count, (elapsed_s + TIMER_SLACK_S) / count

    def expected_s(self, count: int, warmup: int) -> float | None:
        """How long `infer count warmup` should take at most, or None while the time per inference is
        unknown."""
        bounds = self._per_inference_bounds()
        if bounds is None:
            return None
        outputs = self.output_count or UNKNOWN_OUTPUTS
        reply = len(f"infer {count} {warmup}%") + REPLY_BYTES + VALUE_BYTES * outputs
        return (count + warmup) * bounds[1] + reply * self.char_time_s

    def _timeout(self, cmd: _Command) -> tuple[float, str]:
        """The command's time limit, and what it is (for the message)."""
        if cmd.timeout_s is not None:
            return cmd.timeout_s, ""
        expected = self.expected_s(cmd.count, cmd.warmup) if cmd.count is not None else None
        if expected is None:
            return self.infer_timeout_s, ""
        return max(2 * expected, expected + EXPECTED_SLACK_S), f" (it should take {expected:.3g} s)"

    # -- the pipeline -----------------------------------------------------------------------------

    def _transact(
        self, commands: list[_Command], stop: threading.Event | None = None
    ) -> Generator[_Command, None, None]:
        """Send `commands` pipelined; yield each answered one in order (those setting the reply CRC
        excepted). Errors are raised once the commands in flight have answered, so the link stays
        in step; a `stop` ends the wait at once (the replies still to come are collected later)."""
        port = self._open()
        self._collect_owed()
        if stop is not None and stop.is_set():
            raise self._fail(
                RunAborted, _short(commands[0].text) if commands else "-", "stopped before it was sent"
            )
        if self._crc_announced and not self._crc:
            commands = [self._crc_command(True)] + commands
        queue, inflight = deque(commands), deque[_Command]()
        inflight_bytes = 0
        failure: HardwareError | None = None
        since = 0.0  # when the head of `inflight` became the head
        try:
            while queue or inflight:
                while (
                    queue
                    and failure is None
                    and (
                        not inflight
                        or (
                            not queue[0].alone
                            and inflight_bytes + len(queue[0].text) + 1 <= self.max_inflight_bytes
                        )
                    )
                ):
                    cmd = queue.popleft()
                    cmd.wire = cmd.text.encode("ascii") + b"%"
                    cmd.sent_s = time.monotonic()
                    try:
                        port.write(cmd.wire)
                    except serial.SerialException as exc:
                        raise self._lost(cmd.text, exc) from None
                    self._wire_log(f"{cmd.sent_s:.6f} -> {cmd.wire!r}")
                    self.bytes_tx += len(cmd.wire)
                    if not inflight:
                        since = cmd.sent_s
                    inflight.append(cmd)
                    inflight_bytes += len(cmd.wire)
                if not inflight:
                    break
                head = inflight[0]
                limit, basis = self._timeout(head)
                try:
                    line, tagged, t = self._readline(since + limit, head.text, stop)
                except _Timeout:
                    error = failure or head.error  # a broken reply can take its m-ready with it
                    if error is not None:
                        raise error from None
                    pending = bytes(self._rx).decode("ascii", errors="replace")
                    seen = f"no reply within {limit:g} s{basis}; last line seen: {self._last_line()!r}"
                    raise self._fail(
                        DutTimeout,
                        _short(head.text),
                        seen + (f", then {pending!r} without a line end" if pending else ""),
                    ) from None
                except _Stopped:
                    self._owed = list(inflight)
                    raise self._fail(
                        RunAborted,
                        _short(head.text),
                        f"stopped from outside after {time.monotonic() - since:.3g} s of this command; "
                        f"last line seen: {self._last_line()!r}",
                    ) from None
                if line.startswith(RESET_MARKERS):
                    inflight.clear()
                    self._settle(head.text)
                    self._crc = False
                    self._forget()
                    raise self._fail(
                        DutResetError,
                        _short(head.text),
                        f"the DUT reset: boot banner line {line!r} in the reply",
                    )
                if (self._crc if head.crc is None else head.crc) and not tagged and head.error is None:
                    head.error = self._fail(
                        DutProtocolError,
                        _short(head.text),
                        f"expected a line ending ' *' and its CRC-32, got {self.transcript[-1]!r}",
                    )
                if line == "m-ready":
                    inflight.popleft()
                    inflight_bytes -= len(head.wire)
                    if inflight:
                        since = max(t, inflight[0].sent_s)
                    got = [text for text, _ in head.lines]
                    if head.expect is not None and head.error is None and tuple(got) != head.expect:
                        head.error = self._fail(
                            DutProtocolError,
                            _short(head.text),
                            f"expected {list(head.expect)!r}, got {got!r}",
                        )
                    if head.error is not None:
                        failure = failure or head.error
                    elif head.crc is not None:
                        self._crc = head.crc
                    elif failure is None:
                        yield head
                elif line.startswith("e-["):
                    head.error = head.error or self._fail(DutReplyError, _short(head.text), line)
                elif line.startswith("m-") or not line:
                    head.lines.append((line, t))
                else:  # garbled, or a message without a prefix (e.g. "Supplied buffer size ... exceeds ...")
                    head.error = head.error or self._fail(
                        DutProtocolError, _short(head.text), f"unexpected line {line!r}"
                    )
            if failure is not None:
                raise failure
        except GeneratorExit:  # the caller stopped early (a bad reply): collect the replies in flight
            self._drain(list(inflight))
            raise

    def _drain(self, commands: list[_Command]) -> None:
        """Read and drop the replies of `commands` (each within its own time limit)."""
        for cmd in commands:
            deadline = time.monotonic() + self._timeout(cmd)[0]
            try:
                while (line := self._readline(deadline, cmd.text)[0]) != "m-ready":
                    if line.startswith(RESET_MARKERS):
                        return
            except (_Timeout, DutProtocolError):
                return

    def _collect_owed(self) -> None:
        """The replies of commands a stop left unanswered, read and dropped."""
        owed, self._owed = self._owed, []
        self._drain(owed)

    def _one(self, cmd: _Command, stop: threading.Event | None = None) -> _Command:
        with closing(self._transact([cmd], stop)) as replies:
            return next(replies)

    def _run(self, cmds: list[_Command]) -> None:
        """Send `cmds`, whose replies need nothing beyond the pipeline's own checks."""
        with closing(self._transact(cmds)) as replies:
            for _ in replies:
                pass

    def _crc_command(self, on: bool) -> _Command:
        word = "on" if on else "off"
        return _Command(f"crc32 {word}", self.timeout_s, expect=(f"m-crc32-[{word}]",), crc=on)

    def _upload_commands(self, data: bytes) -> list[_Command]:
        if not data:
            raise ValueError(f"{self.board}: nothing to upload (0 bytes)")
        cmds = [
            _Command(f"db load {len(data)}", self.timeout_s, expect=(f"m-[Expecting {len(data)} bytes]",))
        ]
        cmds += [
            _Command("db " + data[i : i + CHUNK_BYTES].hex(), self.timeout_s, expect=())
            for i in range(0, len(data), CHUNK_BYTES)
        ]
        cmds[-1].expect = ("m-load-done",)
        return cmds

    @staticmethod
    def _infer_command(count: int, warmup: int) -> _Command:
        return _Command(f"infer {count} {warmup}", count=count, warmup=warmup)

    # -- checks -----------------------------------------------------------------------------------

    def _stamp(self, command: str, line: str) -> int:
        m = _STAMP.match(line)
        if m is None or int(m.group(1)) >= TIMER_WRAP:
            raise self._fail(
                DutProtocolError, command, f"expected m-lap-us-N (N < 2^32, no leading zeros), got {line!r}"
            )
        return int(m.group(1))

    def _follows(self, stamps: _Stamps, command: _Command, stamp: int, arrived_s: float) -> None:
        """Check `stamp` (its line arrived at `arrived_s`) against the stamp before it, then make it the
        last."""
        if stamps.last is not None:
            before, before_sent_s = stamps.last
            step_s = ((stamp - before) % TIMER_WRAP) / 1e6
            host_s = arrived_s - before_sent_s
            if step_s > host_s * (1 + self.clock_tolerance) + TIMER_SLACK_S:
                raise self._fail(
                    DutProtocolError,
                    command.text,
                    f"stamp {stamp} comes {step_s:.6g} s after the stamp before it ({before}), but only "
                    f"{host_s:.6g} s passed on the host (tolerance {self.clock_tolerance * 1e6:g} ppm + "
                    f"{TIMER_SLACK_S:g} s): a stamp is wrong or went backwards",
                )
        stamps.last = (stamp, command.sent_s)

    def _infer_run(self, reply: _Command, stamps: _Stamps) -> InferRun:
        """The run an infer reply reports, once every check of the module docstring has passed."""
        count, warmup, command = reply.count, reply.warmup, reply.text
        if count is None:
            raise ValueError(f"{command!r} is not an infer command")
        got = [line for line, _ in reply.lines]
        shape = [
            f"m-warmup-start-{warmup}",
            "m-warmup-done",
            f"m-infer-start-{count}",
            "m-lap-us-T0",
            "m-lap-us-T1",
            "m-infer-done",
            "m-results-[...]",
        ]
        if len(got) != len(shape):
            raise self._fail(DutProtocolError, command, f"expected the lines {shape!r}, got {got!r}")
        for i in (0, 1, 2, 5):
            if got[i] != shape[i]:
                raise self._fail(
                    DutProtocolError,
                    command,
                    f"expected {shape[i]!r} (line {i + 1} of the reply), got {got[i]!r}",
                )
        t0, t1 = self._stamp(command, got[3]), self._stamp(command, got[4])
        outputs = self._results(command, got[6])
        (_, arrived0), (_, arrived1) = reply.lines[3], reply.lines[4]
        self._follows(stamps, reply, t0, arrived0)
        self._follows(stamps, reply, t1, arrived1)
        elapsed_s = ((t1 - t0) % TIMER_WRAP) / 1e6
        seen_s = arrived1 - arrived0
        if elapsed_s < seen_s * (1 - self.clock_tolerance) - self.link_latency_s:
            raise self._fail(
                DutProtocolError,
                command,
                f"the stamps {t0} and {t1} span {elapsed_s:.6g} s, but their lines arrived {seen_s:.6g} s "
                f"apart (link latency allowed: {self.link_latency_s:g} s): a stamp is wrong",
            )
        bounds = self._per_inference_bounds()
        if bounds is not None and elapsed_s < WINDOW_MIN_FRACTION * count * bounds[0] - TIMER_SLACK_S:
            raise self._fail(
                DutProtocolError,
                command,
                f"{count} inferences took {elapsed_s:.6g} s by the stamps {t0} and {t1}; at the "
                f"{bounds[0] * 1e3:.6g} ms or more per inference known before, they take at least "
                f"{WINDOW_MIN_FRACTION * count * bounds[0]:.6g} s",
            )
        if self._longest is None or elapsed_s > self._longest[0]:
            self._longest = (elapsed_s, count)
        return InferRun(count, warmup, t0, t1, outputs)

    def _results(self, command: str, line: str) -> np.ndarray:
        m = _RESULTS.match(line)
        values = m.group(1).split(",") if m else []
        if len(values) > 1 and values[-1] == "" and self.reported_model in MLPERF_TINY:
            values.pop()  # the reference VWW firmware ends its results with a comma (nresults = 3 for 2)
        bad = next((v for v in values if not _VALUE.match(v)), None)
        if m is None or bad is not None:
            why = f": {bad!r} is not a number as the firmware prints one" if bad is not None else ""
            raise self._fail(DutProtocolError, command, f"malformed results line {line!r}{why}")
        with np.errstate(over="ignore"):  # a value beyond float32 becomes inf, refused below
            outputs = np.array([float(v) for v in values], dtype=np.float32)
        if not np.isfinite(outputs).all():
            raise self._fail(DutProtocolError, command, f"a result is not finite in float32: {line!r}")
        if self.output_count is None:
            self.output_count = len(outputs)
        elif len(outputs) != self.output_count:
            raise self._fail(
                DutProtocolError,
                command,
                f"expected {self.output_count} result values (the model's outputs), "
                f"got {len(outputs)}: {line!r}",
            )
        return outputs

    def _clock(self, reply: _Command) -> ClockSync:
        if len(reply.lines) != 1:
            raise self._fail(
                DutProtocolError,
                reply.text,
                f"expected one m-lap-us-N stamp (is the firmware in energy mode?), got "
                f"{[text for text, _ in reply.lines]!r}",
            )
        line, received = reply.lines[0]
        stamp = self._stamp(reply.text, line)
        earliest = reply.sent_s + len(b"timestamp%") * self.char_time_s
        latest = max(earliest, received - (len(line) + 2) * self.char_time_s)
        return ClockSync(stamp, (earliest + latest) / 2, (latest - earliest) / 2)

    # -- commands ---------------------------------------------------------------------------------

    def identify(self) -> DutIdentity:
        """`name%` and `profile%` (after flushing stale input), then `crc32 on%` if the profile
        offers it. A board that refused its model answers profile with e-[...] (the sizes):
        DutReplyError.

        This is where a session starts, so it re-aligns with the DUT: `name` is retried up to
        NAME_ATTEMPTS times, the line let go quiet between tries, when its reply is an error, garbled
        or has no m-name line (MLCommons' runner retries too). An earlier session's broken exchange
        can leave a partial command in the DUT's buffer (it swallows the next one) or a reply still
        to come. A DUT that stays silent is not retried. Retries are recorded in
        `extra["name_retries"]`. Lines are taken with or without a valid CRC tag until the
        extension is turned on (an earlier session may have left it on). The reported model sets
        the input format of later runs; the cold start of the last `reset` is added to `extra`.
        """
        self._collect_owed()
        self._flush_input()
        self._crc = self._crc_announced = False
        self._forget()
        self.reported_model = None
        for retries in range(NAME_ATTEMPTS):
            try:
                # one at a time: a broken reply is pinned on its command
                name_reply = self._one(_Command("name", self.timeout_s))
                names = [m for line, _ in name_reply.lines if (m := _NAME.match(line))]
                if len(names) == 1:
                    break
                raise self._fail(
                    DutProtocolError,
                    "name",
                    f"no m-name-...-[...] line: {[text for text, _ in name_reply.lines]!r}",
                )
            except DutTimeout:
                raise
            except DutProtocolError:
                if retries == NAME_ATTEMPTS - 1:
                    raise
                self._settle("name")
        profile_reply = self._one(_Command("profile", self.timeout_s))
        fields = self._fields(profile_reply)
        if "model" not in fields or "profile" not in fields:
            raise self._fail(
                DutProtocolError,
                "profile",
                f"no m-profile-[...] and m-model-[...] lines: {[text for text, _ in profile_reply.lines]!r}",
            )
        extra = {
            key.replace("-", "_"): _number(value)
            for key, value in fields.items()
            if key not in ("profile", "model", "model-sha256", "ext")
        }
        if any(line == "m-ext-[crc32]" for line, _ in profile_reply.lines):
            self._run([self._crc_command(True)])
            self._crc_announced = True  # from now on, turned on again after a reset
            extra["reply_crc32"] = True
        if retries:
            extra["name_retries"] = retries
        self.reported_model = fields["model"]
        extra.update(self.cold_start)
        return DutIdentity(
            name=names[0].group(2),
            model=fields["model"],
            model_sha256=fields.get("model-sha256"),
            firmware=fields["profile"],
            extra=extra,
        )

    @staticmethod
    def _fields(reply: _Command) -> dict[str, str]:
        found: dict[str, str] = {}
        for line, _ in reply.lines:
            m = _FIELD.match(line)
            if m:
                found.setdefault(m.group(1), m.group(2))
        return found

    def sync_clock(self) -> ClockSync:
        """Map the DUT's microsecond counter onto the host monotonic clock (one `timestamp%`)."""
        return self._clock(self._one(_Command("timestamp", self.timeout_s, alone=True)))

    def upload(self, data: bytes) -> None:
        """`db load N` and the `db HEX` chunks, pipelined; the last must answer m-load-done."""
        self._run(self._upload_commands(data))

    def infer(self, count: int = 1, warmup: int = 0, *, stop: threading.Event | None = None) -> InferRun:
        """`infer count warmup` on the input loaded last (checked as in the module docstring, without
        a clock sync to start the stamps' chain)."""
        return self._infer_run(self._one(self._infer_command(count, warmup), stop), _Stamps())

    def results(self) -> np.ndarray:
        """`results%`: the outputs of the last inference."""
        reply = self._one(_Command("results", self.timeout_s))
        if len(reply.lines) != 1:
            raise self._fail(
                DutProtocolError,
                "results",
                f"expected one m-results line, got {[text for text, _ in reply.lines]!r}",
            )
        return self._results("results", reply.lines[0][0])

    def resync(self) -> DutIdentity:
        """Bring the link back in step without a reset (a board whose port cannot reset it): reopen the
        port, end whatever command the DUT may hold half-received with a bare `%`, drop every line
        until the line is quiet, and check the DUT answers `name%` and `profile%` again."""
        self.close()
        port = self._open()
        self._owed = []
        self._crc = False
        self._event("resync: reopened the port, sent '%', waiting for quiet")
        try:
            port.write(b"%")
        except serial.SerialException as exc:
            raise self._lost("resync", exc) from None
        self._settle("resync")
        return self.identify()

    def reset(self, timeout_s: float | None = None) -> list[str]:
        """Pulse reset (RTS asserted with DTR deasserted: EN low on the ESP32 auto-reset circuit), wait
        for the boot banner up to its m-ready and measure the cold start (`cold_start`, module
        docstring); returns the banner's lines."""
        timeout_s = timeout_s or self.timeout_s
        port = self._open()
        self._flush_input()
        self._owed = []
        self._crc = False
        self._forget()
        self.cold_start = {}
        self._event("reset: RTS asserted, DTR deasserted for 50 ms")
        port.dtr, port.rts = False, True
        time.sleep(0.05)
        before = time.monotonic()
        port.rts = False
        edge = (before, time.monotonic())
        self._event(f"reset released between {edge[0]:.6f} and {edge[1]:.6f}")
        deadline = edge[1] + timeout_s
        banner: list[str] = []
        arrived: list[float] = []  # the latest host time each line's end arrived
        try:
            while not (banner[-1:] == ["m-ready"] and "m-init-done" in banner):
                line, _, t = self._readline(deadline, "reset")
                banner.append(line)
                arrived.append(t - len(self._rx) * self.char_time_s)  # the bytes after it came later
        except _Timeout:
            raise self._fail(
                DutTimeout,
                "reset",
                f"no boot banner within {timeout_s:g} s "
                f"(does this port reach the reset line?); seen {banner!r}",
            ) from None
        cold = self._cold_start(banner, arrived, edge)
        basis = "host_and_dut" if "cold_start_boot_ms" in cold else "host_clock"
        self.cold_start = {**cold, "cold_start_basis": basis}
        return banner

    def _cold_start(
        self, banner: list[str], arrived: list[float], edge: tuple[float, float]
    ) -> dict[str, float]:
        """The cold start of the module docstring, from the banner and the reset edge's bounds."""
        i = banner.index("m-init-done")
        sent = arrived[i] - (len(banner[i]) + 2) * self.char_time_s  # latest: the link may have delayed it
        stamp = next((self._stamp("reset", line) for line in banner if line.startswith("m-lap-us-")), None)
        if stamp is None:
            edge_mid, edge_half = (edge[0] + edge[1]) / 2, (edge[1] - edge[0]) / 2
            return {"cold_start_ms": (sent - edge_mid) * 1e3, "cold_start_uncertainty_ms": edge_half * 1e3}
        sync = self.sync_clock()
        latency = 2 * sync.uncertainty_s  # the exchange's round trip less its wire times
        if self.url.startswith("rfc2217://"):  # the line change is sent at once; only the ack is polled
            edge = (edge[0], min(edge[1], edge[0] + latency))
        edge_mid, edge_half = (edge[0] + edge[1]) / 2, (edge[1] - edge[0]) / 2
        banner_s = sync.host_s - ((sync.dut_us - stamp) % TIMER_WRAP) / 1e6
        earliest = sent - latency
        if i > 0 and sent - arrived[i - 1] < latency:  # right behind the line before: maybe queued
            earliest = min(sent, banner_s - sync.uncertainty_s)
        done, done_half = (earliest + sent) / 2, (sent - earliest) / 2
        result = {
            "cold_start_ms": (done - edge_mid) * 1e3,
            "cold_start_uncertainty_ms": (done_half + edge_half) * 1e3,
            "cold_start_boot_ms": (banner_s - edge_mid) * 1e3,
            "cold_start_init_ms": (done - banner_s) * 1e3,
        }
        if stamp / 1e6 <= banner_s - edge[0] + sync.uncertainty_s + TIMER_SLACK_S:
            result["cold_start_dut_ms"] = stamp / 1e3 + result["cold_start_init_ms"]
        self._event("cold start: " + ", ".join(f"{k} {v:.3f}" for k, v in result.items()))
        return result

    def boot_cold_start(self, reset_window: tuple[float, float] | None = None) -> dict[str, float | str]:
        """The cold start of the DUT's last boot from its `boot%` report, for boards whose port cannot
        reset them (module docstring: Cold start without a reset line). `reset_window`: host
        monotonic instants before and after the reset that started that boot (the install step
        that flashed the board), for the "host_and_dut" figures; without it the DUT's clock alone.
        Sets and returns `cold_start` ({} when the firmware has no boot extension); `identify`
        then reports it. Starts the session with `identify`."""
        self.cold_start = {}
        self.identify()
        profile = self._one(_Command("profile", self.timeout_s))
        if not any(line == "m-ext-[boot]" for line, _ in profile.lines):
            self._event("cold start: the firmware does not offer `boot`")
            return {}
        reply = self._one(_Command("boot", self.timeout_s))
        m = _BOOT.match(reply.lines[0][0]) if len(reply.lines) == 1 else None
        if m is None or max(int(m.group(1)), int(m.group(2))) >= TIMER_WRAP:
            raise self._fail(
                DutProtocolError,
                "boot",
                f"expected one m-boot-us-[B,D] line (B, D < 2^32, no leading zeros), got "
                f"{[text for text, _ in reply.lines]!r}",
            )
        banner_us, done_us = int(m.group(1)), int(m.group(2))
        result: dict[str, float | str] = {
            "cold_start_dut_ms": done_us / 1e3,
            "cold_start_init_ms": ((done_us - banner_us) % TIMER_WRAP) / 1e3,
            "cold_start_dut_uncertainty_ms": TIMER_SLACK_S * 1e3,
            "cold_start_basis": "dut_clock",
        }
        if reset_window is not None:
            host = self._host_cold_start(reset_window, banner_us, done_us)
            if host is not None and not host.pop("restarted"):
                del result["cold_start_dut_ms"], result["cold_start_dut_uncertainty_ms"]
            result.update(host or {})
        self._event("cold start: " + ", ".join(f"{k} {v}" for k, v in result.items()))
        self.cold_start = result
        return result

    def _host_cold_start(
        self, window: tuple[float, float], banner_us: int, done_us: int
    ) -> dict[str, Any] | None:
        """The "host_and_dut" figures of `boot_cold_start` (module docstring), with "restarted": whether
        the counter started inside the window; None when m-init-done lies outside it."""
        before, after = window
        sync = self.sync_clock()
        u = sync.uncertainty_s + TIMER_SLACK_S + self.clock_tolerance * max(0.0, sync.host_s - before)
        init_done = sync.host_s - ((sync.dut_us - done_us) % TIMER_WRAP) / 1e6
        banner = init_done - ((done_us - banner_us) % TIMER_WRAP) / 1e6
        if not before - u <= init_done <= after + u:
            self._event(
                f"cold start: m-init-done at {init_done:.6f} lies outside the reset window "
                f"{before:.6f}..{after:.6f}: the DUT's clock alone"
            )
            return None
        counter_zero = sync.host_s - sync.dut_us / 1e6
        restarted = counter_zero >= before - u
        latest = min(after, counter_zero + u) if restarted else after  # the reset, at the latest
        low, high = max(0.0, init_done - latest - u), init_done - before + u
        if restarted:  # the DUT's own count from the application's start is a lower bound by itself
            low = max(low, done_us / 1e6 - TIMER_SLACK_S)
        boot_low, boot_high = max(0.0, banner - latest - u), banner - before + u
        return {
            "cold_start_ms": (low + high) / 2 * 1e3,
            "cold_start_uncertainty_ms": (high - low) / 2 * 1e3,
            "cold_start_boot_ms": (boot_low + boot_high) / 2 * 1e3,
            "cold_start_basis": "host_and_dut",
            "restarted": restarted,
        }

    # -- InferenceTarget --------------------------------------------------------------------------

    def input_bytes(self, sample: np.ndarray) -> bytes:
        """The `db` bytes of `sample` for this DUT (module docstring: Inputs)."""
        mlperf = MLPERF_TINY.get(self.reported_model or "")
        return mlperf.encode(sample) if mlperf else tensor_bytes(sample)

    def run_timed(
        self,
        sample: np.ndarray,
        count: int,
        warmup: int,
        *,
        per_inference: bool = False,
        stop: threading.Event | None = None,
    ) -> TimedRun:
        """Upload `sample`, sync the clocks, then time `count` inferences after `warmup` (see module doc).
        On a failure, the inferences timed so far are attached to the exception as `.partial`."""
        if count < 1 or warmup < 0:
            raise ValueError(f"{self.board}: need count >= 1 and warmup >= 0, got {count}, {warmup}")
        data = self.input_bytes(sample)
        t0, tx0, rx0 = time.monotonic(), self.bytes_tx, self.bytes_rx
        infers = (
            [self._infer_command(1, warmup)] + [self._infer_command(1, 0) for _ in range(count - 1)]
            if per_inference
            else [self._infer_command(count, warmup)]
        )
        cmds = self._upload_commands(data) + [_Command("timestamp", self.timeout_s, alone=True)] + infers
        runs: list[InferRun] = []
        clock: ClockSync | None = None
        stamps = _Stamps()
        try:
            with closing(self._transact(cmds, stop)) as replies:
                for reply in replies:
                    if reply.text == "timestamp":
                        clock = self._clock(reply)
                        stamps.last = (clock.dut_us, reply.sent_s)
                    elif reply.count is not None:
                        runs.append(self._infer_run(reply, stamps))
        except HardwareError as exc:
            # the timestamp reply comes before every infer reply: once there are runs, there is a clock
            exc.partial = (
                self._timed(runs, clock, t0, tx0, rx0, per_inference) if runs and clock is not None else None
            )
            raise
        assert clock is not None  # the timestamp reply came before the infer replies
        return self._timed(runs, clock, t0, tx0, rx0, per_inference)

    def _timed(
        self, runs: list[InferRun], clock: ClockSync, t0: float, tx0: int, rx0: int, per_inference: bool
    ) -> TimedRun:
        if per_inference:
            latencies = tuple(float(r.elapsed_us) for r in runs)
        else:
            latencies = (runs[0].elapsed_us / runs[0].count,) * runs[0].count
        return TimedRun(
            latencies_us=latencies,
            host_start=clock.host_time(runs[0].start_us),
            host_end=clock.host_time(runs[-1].end_us),
            outputs=runs[-1].outputs,
            extra={
                "latency_basis": "per_inference" if per_inference else "window_mean",
                "warmup": runs[0].warmup,
                "busy_us": float(sum(r.elapsed_us for r in runs)),
                "clock_uncertainty_s": clock.uncertainty_s,
                "wall_s": time.monotonic() - t0,
                "bytes_to_dut": self.bytes_tx - tx0,
                "bytes_from_dut": self.bytes_rx - rx0,
                "reply_crc32": self._crc,
            },
        )

    def classify(self, samples: np.ndarray, *, stop: threading.Event | None = None) -> np.ndarray:
        """Outputs for each sample (upload + `infer 1 0`, all pipelined); exactly one row per sample.
        On a failure the rows so far are attached to the exception as `.partial` (a 2-D array)."""
        rows: list[np.ndarray] = []
        cmds: list[_Command] = []
        for sample in samples:
            cmds += self._upload_commands(self.input_bytes(sample)) + [self._infer_command(1, 0)]
        stamps = _Stamps()
        try:
            with closing(self._transact(cmds, stop)) as replies:
                for reply in replies:
                    if reply.count is not None:
                        rows.append(self._infer_run(reply, stamps).outputs)
            if len(rows) != len(samples):
                raise self._fail(
                    DutProtocolError,
                    "classify",
                    f"{len(samples)} samples sent, {len(rows)} result rows received",
                )
        except HardwareError as exc:
            exc.partial = self._rows(rows)
            raise
        return self._rows(rows)

    def _rows(self, rows: list[np.ndarray]) -> np.ndarray:
        """Rows checked against `output_count`, so all of one length."""
        return np.stack(rows) if rows else np.empty((0, self.output_count or 0), np.float32)

    # -- HiTarget (module docstring: Hierarchical inference) -----------------------------------------

    def hi_configure(
        self, decision: dict[str, str | float], server: tuple[str, int], *, settle_s: float = 0.0
    ) -> None:
        """Send the decision module and the edge server's address (an IPv4 literal the DUT can reach) and
        check the DUT's echoes; each pass then waits `settle_s` after its upload, the board idle."""
        if not (math.isfinite(settle_s) and settle_s >= 0):
            raise ValueError(f"{self.board}: settle_s must be a time >= 0, not {settle_s}")
        self._hi_settle_s = settle_s
        kind, values = _hi_decision(decision)
        host, port = server
        try:
            address = ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"{self.board}: the DUT needs an IPv4 address, not {host!r}") from None
        if not 1 <= port <= 65535:
            raise ValueError(f"{self.board}: port {port} is outside 1..65535")
        cfg = _Command(" ".join(["hi-cfg", kind, *map(_float32_text, values)]), self.timeout_s)
        srv = _Command(f"hi-srv {address} {port}", self.timeout_s, expect=(f"m-hi-srv-[{address}:{port}]",))
        with closing(self._transact([cfg, srv])) as replies:
            for reply in replies:
                if reply is cfg:
                    self._check_hi_cfg(reply, kind, values)
        self._hi = (kind, values, f"{address}:{port}")
        self._event(f"hi: decision {kind} {values}, edge server {address}:{port}")

    def _check_hi_cfg(self, reply: _Command, kind: str, values: tuple[np.float32, ...]) -> None:
        got = [text for text, _ in reply.lines]
        m = _HI_CFG.match(got[0]) if len(got) == 1 else None
        echoed = m.group(2).split(",")[1:] if m else []
        if (
            m is None
            or m.group(1) != kind
            or len(echoed) != len(values)
            or not all(
                _VALUE.match(v) and np.float32(v) == sent for v, sent in zip(echoed, values, strict=False)
            )
        ):
            raise self._fail(
                DutProtocolError,
                reply.text,
                f"expected the echo m-hi-cfg-[{','.join([kind, *map(_float32_text, values)])}] "
                f"(values equal in float32), got {got!r}",
            )

    def hi_run(self, samples: np.ndarray, *, stop: threading.Event | None = None) -> HiRun:
        """Hierarchical inference over `samples` with the configured decision and server, in passes of
        as many samples as the DUT's `db` holds. On a failure the passes done are attached as
        `.partial` (a HiRun, or None)."""
        if self._hi is None:
            raise ValueError(f"{self.board}: hi_run needs hi_configure first")
        data = [self.input_bytes(sample) for sample in samples]
        if not data or len({len(d) for d in data}) != 1:
            raise ValueError(f"{self.board}: hi_run needs samples of one size, got {len(data)} samples")
        per_pass = min(HI_MAX_SAMPLES, DB_CAPACITY_BYTES // len(data[0]))
        if per_pass == 0:
            raise ValueError(
                f"{self.board}: a {len(data[0])}-byte sample exceeds the {DB_CAPACITY_BYTES}-byte db"
            )
        t0 = time.monotonic()
        passes: list[tuple[list[tuple[Any, ...]], tuple[float, float, int], float]] = []
        try:
            for first in range(0, len(data), per_pass):
                passes.append(self._hi_pass(data[first : first + per_pass], first, stop))
        except HardwareError as exc:
            exc.partial = self._hi_record(passes, t0) if passes else None
            raise
        return self._hi_record(passes, t0)

    def _hi_pass(
        self, data: list[bytes], first: int, stop: threading.Event | None
    ) -> tuple[list[tuple[Any, ...]], tuple[float, float, int], float]:
        """One `hi k` pass: its samples' fields, its window on the host clock and the clock's uncertainty."""
        k = len(data)
        bound = self._per_inference_bounds()
        limit = (
            k * ((bound[1] if bound else 1.0) + HI_SAMPLE_ALLOWANCE_S)
            + HI_OFFLOAD_FAILURE_S
            + EXPECTED_SLACK_S
            + k * 80 * self.char_time_s
        )
        hi = _Command(f"hi {k}", limit)
        with closing(self._transact(self._upload_commands(b"".join(data)), stop)) as uploaded:
            for _ in uploaded:
                pass
        if self._hi_settle_s:
            time.sleep(self._hi_settle_s)  # the board idles before the pass: a power meter's guard
        cmds = [_Command("timestamp", self.timeout_s, alone=True), hi]
        clock: ClockSync | None = None
        stamps = _Stamps()
        try:
            with closing(self._transact(cmds, stop)) as replies:
                for reply in replies:
                    if reply.text == "timestamp":
                        clock = self._clock(reply)
                        stamps.last = (clock.dut_us, reply.sent_s)
        except DutReplyError as exc:
            raise self._offload_failure(exc, first) from None
        assert clock is not None  # its reply comes before the hi command's
        rows, start_us, end_us = self._hi_lines(hi, k, stamps)
        return rows, (clock.host_time(start_us), clock.host_time(end_us), k), clock.uncertainty_s

    def _offload_failure(self, exc: DutReplyError, first: int) -> HardwareError:
        """An `e-[hi: sample i: offload to ... failed: ...]` as an EdgeError; other refusals unchanged."""
        m = _HI_FAILED.match(exc.seen)
        if m is None or self._hi is None:
            return exc
        server = self._hi[2]
        error = EdgeError(
            self.board,
            f"hi: offload of sample {first + int(m.group(1))} to edge server {server}",
            f"the DUT reports: {m.group(3)}" + ("" if m.group(2) == server else f" (it names {m.group(2)})"),
            log=str(self.log_path),
        )
        error.transcript = list(self.transcript)
        self._event(f"error: {error}")
        return error

    def _hi_lines(self, reply: _Command, k: int, stamps: _Stamps) -> tuple[list[tuple[Any, ...]], int, int]:
        """The k sample lines and the done line of a `hi k` reply, checked (module docstring)."""
        lines = [text for text, _ in reply.lines]
        done = _HI_DONE.match(lines[-1]) if len(lines) == k + 1 else None
        if done is None or int(done.group(1)) != k:
            raise self._fail(
                DutProtocolError,
                reply.text,
                f"expected {k} m-hi-[...] lines and m-hi-done-[{k},start,end], got {len(lines)} lines "
                f"ending {lines[-1:]!r}",
            )
        start_us, end_us = int(done.group(2)), int(done.group(3))
        if max(start_us, end_us) >= TIMER_WRAP:
            raise self._fail(DutProtocolError, reply.text, f"a stamp is 2^32 or more: {lines[-1]!r}")
        arrived = reply.lines[-1][1]
        self._follows(stamps, reply, start_us, arrived)
        self._follows(stamps, reply, end_us, arrived)
        rows = [self._hi_line(reply.text, i, line) for i, line in enumerate(lines[:-1])]
        busy = sum(row[5] + row[6] + row[7] for row in rows)
        window = (end_us - start_us) % TIMER_WRAP
        if busy > window + k:  # each of a sample's three times may round up by 1 µs... once per sample
            raise self._fail(
                DutProtocolError,
                reply.text,
                f"the samples' times add up to {busy} µs, more than the pass's window of {window} µs",
            )
        return rows, start_us, end_us

    def _hi_line(self, command: str, i: int, line: str) -> tuple[Any, ...]:
        """One m-hi line's (p1, p2, accepted, local, final, t_inf_us, t_dec_us, t_off_us), checked."""
        m = _HI_LINE.match(line)
        fields = m.group(1).split(",") if m else []
        ints = [fields[0], *fields[3:]] if len(fields) == 9 else []
        local = ints[2].removeprefix("-") if ints else ""
        if (
            len(fields) != 9
            or not all(_VALUE.match(v) for v in fields[1:3])
            or not all(_COUNT.match(v) for v in ints[:2] + [local] + ints[3:])
        ):
            raise self._fail(DutProtocolError, command, f"malformed line {line!r} (sample {i})")
        index, accepted, local_class, final_class, *times = (int(v) for v in ints)
        p1, p2 = np.float32(fields[1]), np.float32(fields[2])
        problem = self._hi_problem(i, index, p1, p2, accepted, local_class, final_class, times)
        if problem:
            raise self._fail(DutProtocolError, command, f"{problem}: {line!r}")
        return float(p1), float(p2), bool(accepted), local_class, final_class, *times

    def _hi_problem(
        self,
        i: int,
        index: int,
        p1: np.float32,
        p2: np.float32,
        accepted: int,
        local: int,
        final: int,
        times: list[int],
    ) -> str | None:
        """What is wrong with sample `i`'s fields, or None."""
        assert self._hi is not None
        kind, values, _ = self._hi
        outputs = self.output_count
        if index != i:
            return f"sample {index} where sample {i} was due"
        if max(times) >= TIMER_WRAP or accepted > 1:
            return "a time of 2^32 µs or more, or a verdict other than 0 and 1"
        if (times[2] == 0) != bool(accepted):
            return "an offload time must be 0 exactly where the sample was accepted"
        if kind == "remote":
            if (float(p1), float(p2), accepted, local, times[0], times[1]) != (0, 0, 0, -1, 0, 0):
                return "in remote mode p1, p2, the verdict, t_inf and t_dec are 0 and the local class -1"
        elif not 0 <= p2 <= p1 <= 1:
            return "p1 and p2 must be probabilities with p1 >= p2"
        elif local < 0 or (outputs is not None and local >= outputs):
            return f"local class {local} outside the model's outputs"
        elif not _hi_verdict_ok(kind, values, p1, p2, accepted):
            return f"the verdict {accepted} is not the decision's on p1 {p1} and p2 {p2}"
        if final < 0 or (outputs is not None and final >= outputs) or (accepted and final != local):
            return f"final class {final} (local {local}, accepted {accepted}) is impossible"
        return None

    def _hi_record(
        self, passes: list[tuple[list[tuple[Any, ...]], tuple[float, float, int], float]], t0: float
    ) -> HiRun:
        assert self._hi is not None
        rows = [row for pass_rows, _, _ in passes for row in pass_rows]
        columns = list(zip(*rows, strict=True))
        kind, values, server = self._hi
        return HiRun(
            p1=np.array(columns[0], np.float64),
            p2=np.array(columns[1], np.float64),
            accepted=np.array(columns[2], bool),
            local_class=np.array(columns[3], np.int64),
            final_class=np.array(columns[4], np.int64),
            t_inf_us=np.array(columns[5], np.float64),
            t_dec_us=np.array(columns[6], np.float64),
            t_off_us=np.array(columns[7], np.float64),
            windows=tuple(window for _, window, _ in passes),
            extra={
                "runtime": "dut_serial",
                "decision": " ".join([kind, *map(_float32_text, values)]),
                "server": server,
                "clock_uncertainty_s": max(u for _, _, u in passes),
                "wall_s": time.monotonic() - t0,
                "reply_crc32": self._crc,
            },
        )


def _hi_decision(decision: dict[str, str | float]) -> tuple[str, tuple[np.float32, ...]]:
    """The `hi-cfg` kind and float32 values of a decision's device form (labbench.strategies.decision)."""
    kind = decision.get("kind")
    if kind not in _HI_KINDS:
        raise ValueError(f"unknown decision kind {kind!r}: known are {', '.join(map(repr, _HI_KINDS))}")
    word, names = _HI_KINDS[str(kind)]
    if set(decision) != {"kind", *names}:
        raise ValueError(f"a {kind} decision has exactly the keys kind, {', '.join(names)}: got {decision}")
    values = tuple(decision[name] for name in names)
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{kind} decision coefficients must be numbers: got {decision}")
    with np.errstate(over="ignore"):
        as_float32 = tuple(np.float32(v) for v in values)
    if not all(np.isfinite(v) for v in as_float32):
        raise ValueError(f"{kind} decision coefficients must be finite in float32: got {decision}")
    return word, as_float32


def _hi_verdict_ok(
    kind: str, values: tuple[np.float32, ...], p1: np.float32, p2: np.float32, accepted: int
) -> bool:
    """Whether `accepted` is the decision's verdict on (p1, p2): a threshold's exactly (the DUT compares
    in float32 too); a logistic score within HI_SCORE_TOLERANCE of 0 may go either way (the DUT's
    float32 rounding)."""
    if kind == "th":
        return bool(accepted) == bool(p1 >= values[0])
    w1, w2, b = (float(v) for v in values)
    score = w1 * float(p1) + w2 * float(p2) + b
    return abs(score) <= HI_SCORE_TOLERANCE * (abs(w1) + abs(w2) + abs(b)) or bool(accepted) == (score >= 0)


def _float32_text(value: np.float32) -> str:
    """A float32 as the firmware's decimal grammar takes it: shortest round-trip digits, scientific."""
    return np.format_float_scientific(value, unique=True, trim="-")


def _short(command: str) -> str:
    return command if len(command) <= 24 else command[:20] + "...%"


def _number(value: str) -> Any:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value
