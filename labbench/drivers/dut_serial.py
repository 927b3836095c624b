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

Inputs are the raw bytes of the model's input tensor, in C order: an int8 model gets int8 values
(quantize floats with `labbench.modelinfo.quantize_input`). The bench does no uint8 -> int8 shift;
MLPerf's reference IC/VWW ports subtract 128 themselves, so feed those uint8 arrays.

Errors name the board, the command and the last line seen: `DutReplyError` (an `e-[...]` reply),
`DutResetError` (a boot banner arrived: the DUT reset), `DutTimeout` (no complete reply in time),
`DutProtocolError` (their base; also a garbled or unexpected line, a lost connection). What was
measured before the failure is attached as `.partial`, and the recent lines as `.transcript`.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, Self

import numpy as np
import serial

from labbench.capabilities import DutIdentity, TimedRun
from labbench.errors import DutProtocolError

NAME_ATTEMPTS = 3
CHUNK_BYTES = 38  # "db " + 76 hex digits = 79 characters: the reference's EE_CMD_SIZE is 80
DEFAULT_INFLIGHT_BYTES = 160
READ_POLL_S = 0.05  # pyserial read timeout; waits loop on it up to their own deadline
TIMER_WRAP = 1 << 32
# lines only a booting board prints: the DUT harness's banner, the ESP32 ROM's first lines
RESET_MARKERS = ("m-timestamp-mode-", "m-init-done", "ets ", "rst:0x")
_FIELD = re.compile(r"^m-([a-z0-9-]+)-\[(.*)\]$")
_NAME = re.compile(r"^m-name-([^\[]+)-\[(.*)\]$")


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
    timeout_s: float
    alone: bool = False  # sent only with nothing else in flight (clock sync)
    expect: str | None = None  # a line the reply must hold (m-load-done after the last chunk)
    wire: bytes = b""
    sent_s: float = 0.0
    lines: list[tuple[str, float]] = field(default_factory=list)
    error: DutProtocolError | None = None


@dataclass(frozen=True)
class _Reply:
    command: str
    lines: tuple[tuple[str, float], ...]  # (line, host time its end arrived)
    sent_s: float


class _Timeout(Exception):
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
    """A board running MLPerf Tiny DUT firmware, reached at a pyserial URL."""

    def __init__(
        self,
        url: str,
        *,
        board: str,
        baud: int = 115200,
        timeout_s: float = 5.0,
        infer_timeout_s: float = 120.0,
        max_inflight_bytes: int = DEFAULT_INFLIGHT_BYTES,
    ):
        self.url, self.board, self.baud = url, board, baud
        self.timeout_s, self.infer_timeout_s = timeout_s, infer_timeout_s
        self.max_inflight_bytes = max_inflight_bytes
        self.bytes_tx = self.bytes_rx = 0  # bytes written to / read from the line so far
        self.transcript: deque[str] = deque(maxlen=50)
        self._port: serial.SerialBase | None = None
        self._rx = bytearray()
        self._rx_s = 0.0

    @classmethod
    def from_lab(cls, entry: Any, family: Any = None) -> DutSerial:
        """From a lab.yaml board entry (`family` is part of the common driver signature; unused)."""
        conn = entry.serial
        return cls(conn.url, board=entry.name, baud=conn.baud, timeout_s=conn.timeout_s)

    def __repr__(self) -> str:
        return f"DutSerial({self.board!r}, {self.url!r})"

    # -- connection -------------------------------------------------------------------------------

    @property
    def char_time_s(self) -> float:
        """Seconds one character takes on the line (8N1: 10 bits)."""
        return 10 / self.baud

    def _open(self) -> serial.SerialBase:
        if self._port is None:
            try:
                self._port = serial.serial_for_url(self.url, baudrate=self.baud, timeout=READ_POLL_S)
            except (serial.SerialException, ValueError, OSError) as exc:
                raise DutProtocolError(self.board, f"open {self.url}", str(exc)) from None
        return self._port

    def close(self) -> None:
        if self._port is not None:
            self._port.close()
            self._port = None

    def __enter__(self) -> Self:
        self._open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _flush_input(self) -> None:
        port = self._open()
        port.reset_input_buffer()
        self._rx.clear()

    # -- lines ------------------------------------------------------------------------------------

    def _readline(self, deadline: float, command: str) -> tuple[str, float]:
        port = self._open()
        while (i := self._rx.find(b"\n")) < 0:
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
        line = bytes(self._rx[:i]).rstrip(b"\r").decode("ascii", errors="replace")
        del self._rx[: i + 1]
        self.transcript.append(line)
        return line, self._rx_s

    def _last_line(self) -> str:
        return self.transcript[-1] if self.transcript else "(none)"

    def _lost(self, command: str, exc: Exception) -> DutProtocolError:
        """The connection broke: drop the port (the next command reopens it) and say so."""
        self.close()
        return self._fail(
            DutProtocolError,
            _short(command),
            f"connection lost ({exc}); last line seen: {self._last_line()!r}",
        )

    def _fail(self, cls: type[DutProtocolError], command: str, seen: str) -> DutProtocolError:
        exc = cls(self.board, command, seen)
        exc.transcript = list(self.transcript)
        exc.partial = None
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

    # -- the pipeline -----------------------------------------------------------------------------

    def _transact(self, commands: list[_Command]) -> Iterator[_Reply]:
        """Send `commands` pipelined; yield each reply in order. Errors are raised once the
        commands in flight have answered, so the link stays in step."""
        port = self._open()
        queue, inflight = deque(commands), deque()
        inflight_bytes = 0
        failure: DutProtocolError | None = None
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
                    self.bytes_tx += len(cmd.wire)
                    inflight.append(cmd)
                    inflight_bytes += len(cmd.wire)
                if not inflight:
                    break
                head = inflight[0]
                try:
                    line, t = self._readline(time.monotonic() + head.timeout_s, head.text)
                except _Timeout:
                    pending = bytes(self._rx).decode("ascii", errors="replace")
                    seen = f"no reply within {head.timeout_s:g} s; last line seen: {self._last_line()!r}"
                    raise self._fail(
                        DutTimeout,
                        _short(head.text),
                        seen + (f", then {pending!r} without a line end" if pending else ""),
                    ) from None
                if line == "m-ready":
                    inflight.popleft()
                    inflight_bytes -= len(head.wire)
                    if head.expect and head.error is None and all(l != head.expect for l, _ in head.lines):
                        head.error = self._fail(
                            DutProtocolError,
                            _short(head.text),
                            f"no {head.expect} in the reply: {[l for l, _ in head.lines]!r}",
                        )
                    if head.error is not None:
                        failure = failure or head.error
                    elif failure is None:
                        yield _Reply(head.text, tuple(head.lines), head.sent_s)
                elif line.startswith(RESET_MARKERS):
                    inflight.clear()
                    self._settle(head.text)
                    raise self._fail(
                        DutResetError,
                        _short(head.text),
                        f"the DUT reset: boot banner line {line!r} in the reply",
                    )
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
            for cmd in inflight:
                try:
                    while self._readline(time.monotonic() + cmd.timeout_s, cmd.text)[0] != "m-ready":
                        pass
                except (_Timeout, DutProtocolError):
                    break
            raise

    def _one(self, text: str, timeout_s: float | None = None, alone: bool = False) -> _Reply:
        with closing(self._transact([_Command(text, timeout_s or self.timeout_s, alone)])) as replies:
            return next(replies)

    def _upload_commands(self, data: bytes) -> list[_Command]:
        if not data:
            raise ValueError(f"{self.board}: nothing to upload (0 bytes)")
        cmds = [_Command(f"db load {len(data)}", self.timeout_s)]
        cmds += [
            _Command("db " + data[i : i + CHUNK_BYTES].hex(), self.timeout_s)
            for i in range(0, len(data), CHUNK_BYTES)
        ]
        cmds[-1].expect = "m-load-done"
        return cmds

    def _infer_command(self, count: int, warmup: int) -> _Command:
        return _Command(f"infer {count} {warmup}", self.infer_timeout_s)

    # -- parsing ----------------------------------------------------------------------------------

    def _fields(self, reply: _Reply) -> dict[str, str]:
        found = {}
        for line, _ in reply.lines:
            m = _FIELD.match(line)
            if m:
                found.setdefault(m.group(1), m.group(2))
        return found

    def _infer_run(self, reply: _Reply, count: int, warmup: int) -> InferRun:
        laps = [line[len("m-lap-us-") :] for line, _ in reply.lines if line.startswith("m-lap-us-")]
        results = [line for line, _ in reply.lines if line.startswith("m-results-")]
        if len(laps) != 2 or not all(x.isdigit() for x in laps) or len(results) != 1:
            raise self._fail(
                DutProtocolError,
                reply.command,
                f"expected two m-lap-us-N stamps and one m-results line, got {[l for l, _ in reply.lines]!r}",
            )
        return InferRun(count, warmup, int(laps[0]), int(laps[1]), self._results(reply.command, results[0]))

    def _results(self, command: str, line: str) -> np.ndarray:
        m = _FIELD.match(line)
        try:
            if m is None or m.group(1) != "results":
                raise ValueError
            return np.array([float(v) for v in m.group(2).split(",") if v.strip()], dtype=np.float32)
        except ValueError:
            raise self._fail(DutProtocolError, command, f"malformed results line {line!r}") from None

    def _clock(self, reply: _Reply) -> ClockSync:
        stamps = [(line, t) for line, t in reply.lines if line.startswith("m-lap-us-")]
        if len(stamps) != 1 or not stamps[0][0][len("m-lap-us-") :].isdigit():
            raise self._fail(
                DutProtocolError,
                reply.command,
                f"expected one m-lap-us-N stamp (is the firmware in energy mode?), got "
                f"{[l for l, _ in reply.lines]!r}",
            )
        line, received = stamps[0]
        earliest = reply.sent_s + len(b"timestamp%") * self.char_time_s
        latest = max(earliest, received - (len(line) + 2) * self.char_time_s)
        return ClockSync(int(line[len("m-lap-us-") :]), (earliest + latest) / 2, (latest - earliest) / 2)

    # -- commands ---------------------------------------------------------------------------------

    def identify(self) -> DutIdentity:
        """`name%` and `profile%` (after flushing stale input). A board that refused its model
        answers profile with e-[...] (the sizes): DutReplyError.

        This is where a session starts, so it re-aligns with the DUT: `name` is retried up to
        NAME_ATTEMPTS times, the line let go quiet between tries, when its reply is an error, garbled
        or has no m-name line (MLCommons' runner retries too). An earlier session's broken exchange
        can leave a partial command in the DUT's buffer (it swallows the next one) or a reply still
        to come. A DUT that stays silent is not retried. Retries are recorded in
        `extra["name_retries"]`.
        """
        self._flush_input()
        for retries in range(NAME_ATTEMPTS):
            try:
                name_reply = self._one("name")  # one at a time: a broken reply is pinned on its command
                names = [m for line, _ in name_reply.lines if (m := _NAME.match(line))]
                if len(names) == 1:
                    break
                raise self._fail(
                    DutProtocolError,
                    "name",
                    f"no m-name-...-[...] line: {[l for l, _ in name_reply.lines]!r}",
                )
            except DutTimeout:
                raise
            except DutProtocolError:
                if retries == NAME_ATTEMPTS - 1:
                    raise
                self._settle("name")
        profile_reply = self._one("profile")
        fields = self._fields(profile_reply)
        if "model" not in fields or "profile" not in fields:
            raise self._fail(
                DutProtocolError,
                "profile",
                f"no m-profile-[...] and m-model-[...] lines: {[l for l, _ in profile_reply.lines]!r}",
            )
        extra = {
            key.replace("-", "_"): _number(value)
            for key, value in fields.items()
            if key not in ("profile", "model", "model-sha256")
        }
        if retries:
            extra["name_retries"] = retries
        return DutIdentity(
            name=names[0].group(2),
            model=fields["model"],
            model_sha256=fields.get("model-sha256"),
            firmware=fields["profile"],
            extra=extra,
        )

    def sync_clock(self) -> ClockSync:
        """Map the DUT's microsecond counter onto the host monotonic clock (one `timestamp%`)."""
        return self._clock(self._one("timestamp", alone=True))

    def upload(self, data: bytes) -> None:
        """`db load N` and the `db HEX` chunks, pipelined; the last must answer m-load-done."""
        with closing(self._transact(self._upload_commands(data))) as replies:
            for _ in replies:
                pass

    def infer(self, count: int = 1, warmup: int = 0) -> InferRun:
        """`infer count warmup` on the input loaded last."""
        return self._infer_run(self._one(f"infer {count} {warmup}", self.infer_timeout_s), count, warmup)

    def results(self) -> np.ndarray:
        """`results%`: the outputs of the last inference."""
        reply = self._one("results")
        lines = [line for line, _ in reply.lines if line.startswith("m-results-")]
        if len(lines) != 1:
            raise self._fail(
                DutProtocolError, "results", f"no m-results line: {[l for l, _ in reply.lines]!r}"
            )
        return self._results("results", lines[0])

    def reset(self, timeout_s: float | None = None) -> list[str]:
        """Pulse reset (RTS asserted with DTR deasserted: EN low on the ESP32 auto-reset circuit) and
        wait for the boot banner up to its m-ready; returns the banner's lines."""
        timeout_s = timeout_s or self.timeout_s
        port = self._open()
        self._flush_input()
        port.dtr, port.rts = False, True
        time.sleep(0.05)
        port.rts = False
        deadline = time.monotonic() + timeout_s
        banner: list[str] = []
        try:
            while not (banner[-1:] == ["m-ready"] and "m-init-done" in banner):
                banner.append(self._readline(deadline, "reset")[0])
        except _Timeout:
            raise self._fail(
                DutTimeout,
                "reset",
                f"no boot banner within {timeout_s:g} s "
                f"(does this port reach the reset line?); seen {banner!r}",
            ) from None
        return banner

    # -- InferenceTarget --------------------------------------------------------------------------

    def run_timed(
        self, sample: np.ndarray, count: int, warmup: int, *, per_inference: bool = False
    ) -> TimedRun:
        """Upload `sample`, sync the clocks, then time `count` inferences after `warmup` (see module doc)."""
        if count < 1 or warmup < 0:
            raise ValueError(f"{self.board}: need count >= 1 and warmup >= 0, got {count}, {warmup}")
        data = tensor_bytes(sample)
        t0, tx0, rx0 = time.monotonic(), self.bytes_tx, self.bytes_rx
        infers = (
            [self._infer_command(1, warmup)] + [self._infer_command(1, 0) for _ in range(count - 1)]
            if per_inference
            else [self._infer_command(count, warmup)]
        )
        cmds = self._upload_commands(data) + [_Command("timestamp", self.timeout_s, alone=True)] + infers
        runs: list[InferRun] = []
        clock: ClockSync | None = None
        try:
            with closing(self._transact(cmds)) as replies:
                for reply in replies:
                    if reply.command == "timestamp":
                        clock = self._clock(reply)
                    elif reply.command.startswith("infer"):
                        n, w = (int(x) for x in reply.command.split()[1:])
                        runs.append(self._infer_run(reply, n, w))
        except DutProtocolError as exc:
            exc.partial = self._timed(runs, clock, t0, tx0, rx0, per_inference) if runs else None
            raise
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
            },
        )

    def classify(self, samples: np.ndarray) -> np.ndarray:
        """Outputs for each sample (upload + `infer 1 0`, all pipelined); one row per sample.
        On a failure the rows so far are attached to the exception as `.partial`."""
        rows: list[np.ndarray] = []
        cmds: list[_Command] = []
        for sample in samples:
            cmds += self._upload_commands(tensor_bytes(sample)) + [self._infer_command(1, 0)]
        try:
            with closing(self._transact(cmds)) as replies:
                for reply in replies:
                    if reply.command.startswith("infer"):
                        rows.append(self._infer_run(reply, 1, 0).outputs)
        except DutProtocolError as exc:
            exc.partial = np.stack(rows) if rows else np.empty((0, 0), np.float32)
            raise
        return np.stack(rows)


def _short(command: str) -> str:
    return command if len(command) <= 24 else command[:20] + "...%"


def _number(value: str) -> Any:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value
