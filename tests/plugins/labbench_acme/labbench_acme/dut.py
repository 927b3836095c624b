"""The ACME M0's DUT firmware, driven over its serial link (any pyserial URL; the simulated board is a
`socket://` one): labbench's InferenceTarget.

The protocol is a line per command and a sealed line per reply (labbench_acme.wire), `err <text>` for
a refusal:

    id                    -> id acme-m0 fw=<version> model=<name> sha256=<hex> arena=<bytes> in=<bytes> out=<n>
    clock                 -> clock <µs>                     the DUT's microsecond counter
    load <hex>            -> loaded <bytes> <crc32>         the input tensor(s), raw
    run <count> <warmup>  -> ran <count> <start µs> <end µs>   the timed inferences, back to back
    out                   -> out <n> <v0,v1,...>            the last inference's outputs, dequantized
    flash <name> <sha256> <hex> -> flashed <bytes> <sha256>  (acmeflash's; the board reboots into it)
    reset                 -> reset                          after the reboot

Every reply is checked before it becomes a number: its seal, its echoed counts and checksums, and its
clock: the stamps of a run, mapped onto the host clock by a `clock` exchange just before it, must lie
within the host's own bracket of the command. The exchange is logged, with host times, to
`<log_dir>/<board>-serial.log`, which every error names.
"""

from __future__ import annotations

import re
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np
import serial

from labbench.capabilities import DutIdentity, TimedRun
from labbench.errors import DutProtocolError
from labbench_acme.wire import opened

RUNTIME = "tflite-micro"
_ID = re.compile(r"id acme-m0 fw=(\S+) model=(\S+) sha256=([0-9a-f]{64}|-) arena=(\d+) in=(\d+) out=(\d+)")
_RAN = re.compile(r"ran (\d+) (\d+) (\d+)")
_OUT = re.compile(r"out (\d+) (\S+)")


@dataclass(frozen=True)
class ClockSync:
    """The DUT's counter `dut_us` read at `host_s` (the middle of the exchange), to within `uncertainty_s`."""

    dut_us: int
    host_s: float
    uncertainty_s: float

    def host_time(self, dut_us: int) -> float:
        return self.host_s + (dut_us - self.dut_us) / 1e6


class AcmeDut:
    """An ACME M0 running its DUT firmware at `url` (see the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        board: str,
        baud: int = 115200,
        timeout_s: float = 5.0,
        log_dir: str | Path = "reports/logs",
    ):
        self.url, self.board, self.baud, self.timeout_s = url, board, baud, timeout_s
        self.log_path = Path(log_dir) / f"{board}-serial.log"
        self._port: serial.SerialBase | None = None
        self._log: Any = None
        self._latency_s = 0.0  # the longest inference seen: it sizes the timeout of a run
        self._outputs: int | None = None

    @classmethod
    def from_lab(cls, entry: Any, family: Any = None) -> AcmeDut:
        link = entry.serial
        return cls(link.url, board=entry.name, baud=link.baud, timeout_s=link.timeout_s)

    def __repr__(self) -> str:
        return f"AcmeDut({self.board!r}, {self.url!r})"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        port, self._port = self._port, None
        if port is not None:
            port.close()
        if self._log is not None:
            self._log.close()
            self._log = None

    # -- InferenceTarget ----------------------------------------------------------------------------

    def identify(self) -> DutIdentity:
        match = self._reply("id", _ID)
        firmware, model, sha256, arena, _, outputs = match.groups()
        self._outputs = int(outputs)
        return DutIdentity(
            name="acme-m0",
            model=model,
            model_sha256=None if sha256 == "-" else sha256,
            firmware=firmware,
            extra={"arena_bytes": int(arena), "runtime": RUNTIME},
        )

    def run_timed(
        self, sample: np.ndarray, count: int, warmup: int, *, per_inference: bool = False
    ) -> TimedRun:
        if count < 1 or warmup < 0:
            raise ValueError(f"{self.board}: need count >= 1 and warmup >= 0, got {count}, {warmup}")
        self._load(sample)
        sync = self._sync()
        batches = [(1, warmup)] + [(1, 0)] * (count - 1) if per_inference else [(count, warmup)]
        runs = [self._run(n, w, sync) for n, w in batches]
        if per_inference:
            latencies = tuple(float(end - start) for start, end in runs)
        else:
            latencies = ((runs[0][1] - runs[0][0]) / count,) * count
        return TimedRun(
            latencies_us=latencies,
            host_start=sync.host_time(runs[0][0]),
            host_end=sync.host_time(runs[-1][1]),
            outputs=self._output(),
            extra={
                "latency_basis": "per_inference" if per_inference else "window_mean",
                "warmup": warmup,
                "clock_uncertainty_s": sync.uncertainty_s,
            },
        )

    def classify(self, samples: np.ndarray) -> np.ndarray:
        rows = []
        for sample in samples:
            self._load(sample)
            self._run(1, 0, None)
            rows.append(self._output())
        return np.stack(rows) if rows else np.empty((0, self._outputs or 0), np.float32)

    def reset(self) -> None:
        """Restart the firmware (the board replies once it has booted again)."""
        self._reply("reset", re.compile("reset"))

    # -- the commands --------------------------------------------------------------------------------

    def _load(self, sample: np.ndarray) -> None:
        data = np.ascontiguousarray(sample).tobytes()
        loaded = self._reply(f"load {data.hex()}", re.compile(r"loaded (\d+) ([0-9a-f]{8})"))
        if (int(loaded.group(1)), loaded.group(2)) != (len(data), f"{zlib.crc32(data):08x}"):
            raise self._error(
                "load",
                f"sent {len(data)} bytes (crc32 {zlib.crc32(data):08x}), "
                f"the DUT holds {loaded.group(1)} (crc32 {loaded.group(2)})",
            )

    def _sync(self) -> ClockSync:
        sent = time.monotonic()
        dut_us = int(self._reply("clock", re.compile(r"clock (\d+)")).group(1))
        received = time.monotonic()
        return ClockSync(dut_us, (sent + received) / 2, (received - sent) / 2)

    def _run(self, count: int, warmup: int, sync: ClockSync | None) -> tuple[int, int]:
        """(start, end) of `count` inferences after `warmup` on the DUT's clock, checked against the host's."""
        timeout_s = self.timeout_s + 2 * (count + warmup) * self._latency_s
        sent = time.monotonic()
        ran = self._reply(f"run {count} {warmup}", _RAN, timeout_s)
        received = time.monotonic()
        done, start, end = map(int, ran.groups())
        if done != count or end < start:
            raise self._error(
                "run", f"asked for {count} inferences, the DUT reports {done} from {start} to {end} µs"
            )
        if sync is not None:
            slack = sync.uncertainty_s + 1e-3  # the stamps' own rounding and scheduling on the host
            if sync.host_time(start) < sent - slack or sync.host_time(end) > received + slack:
                raise self._error(
                    "run",
                    f"the DUT's stamps {start}..{end} µs fall outside the command's "
                    f"{received - sent:.6f} s on the host clock",
                )
        self._latency_s = max(self._latency_s, (end - start) / count / 1e6)
        return start, end

    def _output(self) -> np.ndarray:
        out = self._reply("out", _OUT)
        values = np.array(out.group(2).split(","), dtype=np.float32)
        if len(values) != int(out.group(1)) or (self._outputs is not None and len(values) != self._outputs):
            raise self._error(
                "out",
                f"{len(values)} values for {out.group(1)} announced, the model has {self._outputs} outputs",
            )
        return values

    # -- the line ------------------------------------------------------------------------------------

    def _reply(self, command: str, pattern: re.Pattern[str], timeout_s: float | None = None) -> re.Match[str]:
        """Send `command`; its reply, sealed and matching `pattern` as a whole."""
        port = self._open()
        port.timeout = timeout_s or self.timeout_s
        name = command.split(" ", 1)[0]
        self._note(">", command)
        try:
            port.write(command.encode("ascii") + b"\n")
            line = port.readline().decode("ascii", "replace")
        except serial.SerialException as exc:
            raise self._error(name, f"{self.url}: {exc}") from None
        self._note("<", line.rstrip("\n"))
        if not line.endswith("\n"):
            raise self._error(name, f"no reply within {port.timeout:g} s (got {line!r})")
        text = opened(line)
        if text is None:
            raise self._error(name, f"reply without a valid seal: {line.strip()!r}")
        if text.startswith("err "):
            raise self._error(name, f"the DUT refused it: {text[4:]}")
        match = pattern.fullmatch(text)
        if match is None:
            raise self._error(name, f"unexpected reply {text!r}")
        return match

    def _open(self) -> serial.SerialBase:
        if self._log is None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "a", buffering=1)  # noqa: SIM115 (kept open until close())
        if self._port is None:
            try:
                self._port = serial.serial_for_url(self.url, baudrate=self.baud, timeout=self.timeout_s)
            except (serial.SerialException, ValueError) as exc:
                raise self._error("open", f"{self.url}: {exc}") from None
            self._note("#", f"opened {self.url}")
        return self._port

    def _note(self, direction: str, text: str) -> None:
        shown = text if len(text) <= 160 else f"{text[:150]}... ({len(text)} characters)"
        self._log.write(f"{time.monotonic():.6f} {direction} {shown}\n")

    def _error(self, action: str, seen: str) -> DutProtocolError:
        return DutProtocolError(self.board, action, seen, log=str(self.log_path))
