"""Simulated MCU boards (ESP32 DevKitC, Nano 33 BLE, Coral Dev Board Micro) running MLPerf Tiny DUT firmware.

A `SimMcuBoard` is a serial port on an RFC 2217 address (`uart.SimUart`: bytes move at the line
rate) behind which a simulated chip boots the model in its flash and answers the MLPerf Tiny DUT
protocol (../shared/reference/mlperf-tiny-dut-protocol.md) as the reference firmware does: the
same commands, replies, error texts and 80-character command buffer. Inferences run the real
TensorFlow Lite Micro interpreter, so outputs are genuine; how long they take comes from the
family's device model (catalog), with jitter (below), and the DUT's `m-lap-us-` timestamps follow
that time (a deadline loop on the host clock). Power states (idle, upload, inference) go to the
board's power bus channel at the instants they begin, with level noise (below).

MLPerf Tiny reference models (labbench.modelinfo.MLPERF_TINY, recognised by sha256, or by an installed
name that is one of their IDs) run as their reference firmware runs them: `profile` reports the ID
(`m-model-[ic01]`), the `db` bytes are the runner's format (uint8 images, 128 subtracted, for
ic01/vww01; int8 for kws01; float32 quantized with the input's scale and zero point for ad01) and
ad01's result is the reconstruction's mean squared error. So MLCommons' runner, in accuracy mode,
gets the reference firmware's answers. Other models keep their own name and take the raw bytes of
their input tensor(s). docs/mlperf-interop.md lists what was checked against the runner's and the
reference firmware's sources, and what differs.

Where the firmware differs from the reference, on purpose:
- `m-results-[...]` prints the dequantized outputs with float32 round-trip precision, so the bench
  can compare outputs exactly. The reference ports print `%0.3f` (ic01, vww01 with a trailing comma,
  ad01) or truncate to three decimals (kws01's integer workaround); at the 1/256 steps of the MLPerf
  int8 outputs either keeps every value distinct and in order, so the runner's top-1 is the same;
  its AUC, taken on normalised values, can differ where the reference's rounding ties two of them;
- `profile` adds `m-model-sha256-[hex]`, `m-model-bytes-[N]`, `m-arena-bytes-[N]` (the model's
  minimum TFLM arena) and `m-latency-us-[...]` lines, which MLPerf's runner ignores;
- `db` data beyond the loaded size and `infer` without a full input are answered with e-[...]
  instead of corrupting memory or running on stale bytes;
- the reply-integrity extension of the project's firmware core (firmware/core/src/lb_dut.h):
  `profile` announces it with `m-ext-[crc32]`; after `crc32 on%` every reply line ends
  ` *XXXXXXXX` (zlib.crc32 of the line before it, upper-case hex) until `crc32 off%` or a reset.
  `reply_crc=False` makes a board without it, as MLPerf's reference firmware is;
- the boot extension of the firmware core (lb_dut.h): `profile` announces it with `m-ext-[boot]`;
  `boot%` answers `m-boot-us-[B,D]`, the µs counter in the banner's stamp and as m-init-done was
  printed, kept until the next reset: the cold start on the DUT's clock for boards whose port
  cannot reset them. `boot_report=False` makes a board without it;
- the hierarchical-inference extension of the firmware core (lb_dut.h, firmware/README.md):
  `profile` announces it with `m-ext-[hi]`; `hi-cfg lr W1 W2 B` / `hi-cfg th THETA` /
  `hi-cfg remote`, `hi-srv A.B.C.D PORT` and `hi N` answer as the core does (below: Hierarchical
  inference). `hi=False` makes a board without it (default: with it when the board has the core's
  other extensions);
- the banner has no line of its own between the stamp and m-init-done (the reference ad01 port
  prints `Initialized` there), and an empty command answers `e-[Unknown command: ]` (the
  reference passes a NULL token to strncmp).

Constructor (plain arguments; the sim lab passes lab.yaml's `sim:` block through)::

    SimMcuBoard(name, host="127.0.0.1", port=0, family="esp32_devkitc", bus_channel=None,
                model_path=None, firmware=None, *, speed_factor=1.0, vendor=None, baud=None,
                boot_rom=None, rx_fifo_bytes=256, tx_buffer_bytes=256, timer_start_us=0,
                strap_delay_s=0.15, devices_dir=None, reply_crc=True, boot_report=True, hi=None,
                boot_ms=BOOT_MS,
                model_init_ms=MODEL_INIT_MS, seed=None, jitter_pct=JITTER_PCT,
                outlier_rate=OUTLIER_RATE, outlier_pct=OUTLIER_PCT, power_noise_pct=POWER_NOISE_PCT)

`speed_factor` scales the device model's latency (> 1: a slower device, for regression tests);
`baud` is the chip's UART rate (default: the family's `serial_baud`); `rx_fifo_bytes` and
`tx_buffer_bytes` size its UART buffers; `timer_start_us` is the µs counter's value as the
application starts (the counter runs from there, as mbed's us_ticker and ESP-IDF's esp_timer, which
start with the application, after any boot ROM or bootloader).

Boot (cold start). The chip leaves reset after the strap delay, runs its boot ROM if it has one (the
ESP32's: its and the bootloader's lines at 115200 take real time), then the application spends
`boot_ms` before the harness prints `m-timestamp-mode-performance` and `m-lap-us-N`
(th_timestamp_initialize), and `model_init_ms` initialising the model (th_final_initialize) before
`m-init-done` and `m-ready`. No family in devices/ gives a boot figure: BOOT_MS = 0 assumes the
application's own start-up (C runtime, clocks, UART) is small next to those; MODEL_INIT_MS is seed
000's "Model Load (cold): 15ms" (its INT8 latency breakdown), for every model and family (the
firmware core's SHA-256 of the model at boot is not modelled). `last_boot` holds the host times of
the last boot (`BootTimes`), the ground truth for the bench's cold-start measurement; `boot%`
reports the same boot on the DUT's counter. A reset from the simulator's side (a flasher's, as the
Nano's and the Coral's stand-in tools do) starts the chip at once: no strap delay.

Jitter and noise, so that statistics, budgets and gates see data that looks like hardware. Each
inference (warm-ups included) takes the device model's latency x speed_factor x a factor: lognormal
with mean 1 and a coefficient of variation of `jitter_pct` %, plus `outlier_pct` % on the
`outlier_rate` fraction of inferences an interrupt-like delay hits. No family in devices/ gives a
spread: the defaults (JITTER_PCT 1 %, OUTLIER_RATE 0.5 %, OUTLIER_PCT 10 %) are assumptions, within
seed004's "negligible standard deviation" of its latency measurements (3.4.1) and reflecting seed
001's note that interrupt handling affects real MCU timing. `jitter_pct: 0` turns it all off (the
device model's exact timing, outliers included). The draws come from `seed` (default: the board's
name), one stream per board, so a board seeded alike answers the same commands with the same
timings. Power levels carry powerbus.LevelNoise of `power_noise_pct` % (POWER_NOISE_PCT; 0: exact
levels). The active interval posted is the jittered one, so the bus ledger stays the truth.

Reset, boot and flash (the hooks a boot-ROM personality such as the ESP32's builds on):
- Reset circuit, ESP32 DevKitC style, wired on every family: EN is low while RTS is asserted and
  DTR is not; IO0 is low while DTR is asserted and RTS is not. The chip leaves reset
  `strap_delay_s` after EN rises (the EN pin's RC delay, sized for RFC 2217: pyserial spaces line
  changes ~50 ms apart, 100 ms with `?ign_set_control`, so esptool's classic reset holds IO0 low
  from 0.1 to 0.2 s after EN rises in both modes) and samples IO0 then: low means download boot.
  The strap delay is part of a cold start seen from the reset edge (a DevKitC's RC takes ~ms).
  `reset(download=False, wait=False)` resets from the simulator's side (the EN button; a flasher).
- `boot_rom`: an object with `run(board, download: bool)`, called in the chip's thread on every
  boot before the application (default: `esp32_rom.Esp32BootRom` for families flashed with
  esptool, none otherwise, and then the IO0 strap is ignored). It owns the serial stream meanwhile
  (`board.uart`: `read`, `read_until`, `write`, settable `device_baud`; its waits raise
  `ChipReset` on reset, which it lets propagate) and may write `board.flash`; returning boots the
  application from flash. A true `boot_loop` attribute says it loops finding nothing bootable
  (waits for a boot then end there, as they do when it waits for the host).
- `flash` (`FlashStore`): the application reads its model from it at every boot. Families flashed
  with esptool use the ESP-IDF layout of `labbench.firmware_image` (partition table at 0x8000, the
  app image in the boot partition); the others hold a raw .tflite at offset 0, named as it was
  installed (`model_path`'s stem, `load_firmware`'s `name`) while the flash still holds it.
- `load_firmware(image, name=None)`: writes an image (an ESP32 app image, or a raw .tflite, which
  the ESP32 layout packs) as a flasher would, resets into it, waits for the boot and returns what
  booted; an image larger than the flash is refused there (SimBoardError with the sizes).

Hierarchical inference (`hi N`). The N inputs stored back to back in `db` run one after the other:
the model as `infer` runs it (the device model's jittered latency, "active_w"), then the decision on
the two highest probabilities of output 0 (labbench.strategies.decision.top2's rule) for
`decision_s` (DECISION_CYCLES_* at the family's clock: microseconds), then, for an input not
accepted, a real offload: the input's bytes in an LBQ1 request (labbench.edge.server) over a TCP
connection to the `hi-srv` address, kept open across inputs and passes (opened once more when a kept
one failed before any reply byte), its LBR1 reply checked as the core checks it. The device's clock
advances by the exchange's real wall time, during which the board draws its link's power (the
`radio` the lab gives it: the whole board while an offload is in flight, devices/<family>.yaml
links:), or "idle_w" without one. The results are printed after the pass, so
its window holds no serial output. A host that never sends `hi-cfg` sees the reference's `db`
limit (the model's input size); from `hi-cfg` on until the next reset the limit is the core's
27,648 bytes (MAX_DB_INPUT_SIZE), so that `db` can hold a pass's inputs.

A model that does not fit the family's memories (catalog `fits`, with the model's measured TFLM
arena) is refused at boot: the banner and `profile` carry `e-[...]` with the sizes, and `infer`
answers `e-[No model: ...]`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import socket
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from labbench import firmware_image as fw
from labbench.catalog import BoardFamily, load_family
from labbench.edge.server import CRC32, REPLY_HEAD, REPLY_MAGIC, Status, request_bytes
from labbench.errors import CatalogError, LabbenchError, LabConfigError
from labbench.modelinfo import ModelInfo, dequantize_output, min_arena_bytes, mlperf_model
from labbench.sim.powerbus import POWER_NOISE_PCT, LevelNoise, derive_seed
from labbench.sim.uart import ChipReset, ResetLine, SimUart

if TYPE_CHECKING:
    from labbench.sim.radio import Radio

EE_CMD_SIZE = 80
EE_FW_VERSION = "ULPMark for tinyML Firmware V0.0.1"
MAX_DB_INPUT_SIZE = 96 * 96 * 3  # the reference default, used while no model is loaded
TIMER_WRAP = 1 << 32  # %lu of a 32-bit microsecond counter
SIZE_T_WRAP = 1 << 32  # the reference's size_t on the 32-bit MCUs
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
BOOT_TIMEOUT_S = 60.0
BOOT_MS = 0.0  # assumed: the application's start-up before the harness's banner; no family gives a figure
MODEL_INIT_MS = 15.0  # seed 000's latency breakdown: "Model Load (cold): 15ms"
JITTER_PCT = 1.0  # assumed (module docstring: Jitter and noise)
OUTLIER_RATE = 0.005  # assumed
OUTLIER_PCT = 10.0  # assumed
# The hi extension (firmware/core/src/lb_dut.h).
HI_MAX_SAMPLES = 256  # LB_HI_MAX_SAMPLES: the results of a pass are kept until it ends
OFFLOAD_TIMEOUT_S = 5.0  # connect, and each reply read, as on the ESP32 firmware
HI_MESSAGE_MAX = 80  # the most of a server's refusal message the core keeps
# Decision time, in CPU cycles at the family's clock_mhz. The core's decision reads the N outputs
# once (load, dequantize: int-to-float and a multiply, two compares for the top two: ~10 cycles
# each), then applies the LR (2 multiply-adds, a compare, the call: ~40 cycles) or the threshold
# (fewer; counted alike). Outputs that are logits are softmaxed first: one exp each, ~150 cycles
# for newlib's on a single-precision FPU. 10 probabilities: 140 cycles, 2.2 µs on the Nano's
# 64 MHz, 0.6 µs at the ESP32's 240 MHz.
DECISION_CYCLES_BASE = 40
DECISION_CYCLES_PER_OUTPUT = 10
DECISION_CYCLES_PER_EXP = 150
_DECIMAL = re.compile(r"-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?")
_COUNT = re.compile(r"[0-9]{1,10}")
_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = re.compile(rf"{_OCTET}(\.{_OCTET}){{3}}")
_DRAW_CHUNK = 1 << 16  # latency factors drawn at a time: an `infer N` of any N takes bounded memory

_HELP = (
    f"{EE_FW_VERSION}",
    "help         : Print this information",
    "name         : Print the name of the device",
    "timestamp    : Generate a timetsamp",
    "db SUBCMD    : Manipulate a generic byte buffer",
    "  load N     : Allocate N bytes and set load counter",
    "  db HH[HH]* : Load 8-bit hex byte(s) until N bytes",
    "  print      : Print the loaded bytes as hex",
    "infer N [W=10]: Load input, execute N inferences after W warm-up loops",
    "results      : Return the result fp32 vector",
)


class SimBoardError(LabbenchError):
    """The simulated board was misconfigured or did not boot."""


class BootRom(Protocol):
    def run(self, board: SimMcuBoard, download: bool) -> None: ...


@dataclass(frozen=True)
class BootTimes:
    """One boot of the application, on the host monotonic clock (seconds)."""

    reset_s: float  # the reset edge: EN released (before the strap delay), the simulator's reset, power-on
    app_s: float  # the application started (after any boot ROM): the µs counter's zero
    banner_s: float  # the harness's banner (its m-lap-us- stamp)
    init_done_s: float  # m-init-done was written

    @property
    def cold_start_ms(self) -> float:
        return (self.init_done_s - self.reset_s) * 1e3


class FlashStore:
    """A board's flash: erased bytes read 0xFF; only the span up to the last written byte is stored."""

    def __init__(self, size_bytes: int):
        self.size_bytes = size_bytes
        self._data = bytearray()
        self._lock = threading.Lock()

    @property
    def extent(self) -> int:
        """End of the written span (bytes after it read as erased)."""
        return len(self._data)

    def write(self, offset: int, data: bytes) -> None:
        self._check(offset, len(data))
        with self._lock:
            if offset > len(self._data):
                self._data += b"\xff" * (offset - len(self._data))
            self._data[offset : offset + len(data)] = data

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        with self._lock:
            chunk = bytes(self._data[offset : offset + length])
        return chunk + b"\xff" * (length - len(chunk))

    def erase(self, offset: int = 0, length: int | None = None) -> None:
        length = self.size_bytes - offset if length is None else length
        self._check(offset, length)
        with self._lock:
            if offset + length >= len(self._data):
                del self._data[offset:]
            else:
                self._data[offset : offset + length] = b"\xff" * length

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size_bytes:
            raise ValueError(f"flash range {offset:#x}+{length:#x} outside {self.size_bytes:#x} bytes")


class _Model:
    """A booted model: the TFLM interpreter, its facts, and its device latency."""

    def __init__(self, model: bytes, name: str | None, board: SimMcuBoard):
        from tflite_micro import runtime

        self.info = ModelInfo.from_bytes(model, name)
        self.mlperf = mlperf_model(self.info.sha256, name)
        self.name = self.mlperf.id if self.mlperf else name or self.info.name
        self.bytes = model
        self.arena_bytes = min_arena_bytes(model)  # bisected in child processes, cached by sha256
        problem = board.family.fits(len(model), self.arena_bytes)
        if problem:
            raise _Refused(f"model {self.name} does not fit {board.family.name}: {problem}")
        dtype = self.info.inputs[0].dtype
        try:
            us = board.family.device_model.inference_us(self.info.macs, dtype)
        except CatalogError as exc:
            raise _Refused(f"model {self.name} ({dtype}) cannot run on {board.family.name}: {exc}") from None
        self.latency_s = us * board.speed_factor / 1e6
        if self.mlperf is not None:
            inputs, outputs = self.info.inputs, self.info.outputs
            mse = self.mlperf.output == "mse"
            if len(inputs) != 1 or inputs[0].dtype != "int8" or (mse and outputs[0].shape != inputs[0].shape):
                raise _Refused(f"model {self.name} does not have the {self.mlperf.id} reference model's I/O")
        # The host interpreter gets headroom; the arena the board reports is the bisected minimum.
        self.interpreter = runtime.Interpreter.from_bytes(model, arena_size=2 * self.arena_bytes + 4096)
        self.input_bytes = (  # what `db load N` must announce
            self.mlperf.wire_bytes(self.info.inputs[0])
            if self.mlperf
            else sum(t.size_bytes for t in self.info.inputs)
        )
        self._last_input: bytes | None = None
        self.outputs = [np.zeros(t.shape, t.dtype) for t in self.info.outputs]

    def run(self, data: bytes) -> None:
        """Set the inputs from the `db` bytes (th_load_tensor) and invoke, unless they are the inputs of
        the last run."""
        if data == self._last_input:
            return  # same input, same interpreter: the outputs are those already computed
        if self.mlperf is not None:
            self.interpreter.set_input(self.mlperf.decode(data, self.info.inputs[0]), 0)
        else:
            pos = 0
            for i, t in enumerate(self.info.inputs):
                value = np.frombuffer(data, t.dtype, int(np.prod(t.shape)), pos).reshape(t.shape)
                self.interpreter.set_input(value, i)
                pos += t.size_bytes
        self.interpreter.invoke()
        self.outputs = [self.interpreter.get_output(i) for i in range(len(self.info.outputs))]
        self._last_input = data

    def results_line(self) -> str:
        values = np.concatenate(
            [dequantize_output(self.info, y, i).ravel() for i, y in enumerate(self.outputs)]
        )
        if self.mlperf is not None:
            values = self.mlperf.results(values, self._last_input or bytes(self.input_bytes))
        return (
            "m-results-["
            + ",".join(
                np.format_float_positional(v, unique=True, trim="-") for v in values.astype(np.float32)
            )
            + "]"
        )


class _Refused(Exception):
    """The firmware will not run the model in flash; the message is what it reports."""


class _OffloadFailed(Exception):
    """An offload failed; the message is the core's reason."""


class _OffloadLink:
    """The board's TCP connection to the edge server, kept open across offloads (hi extension)."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._address: tuple[str, int] | None = None
        self._request_id = 0  # the last request's: a running count since boot

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def offload(self, address: tuple[str, int], payload: bytes, outputs: int) -> int:
        """The server's class for `payload`, its reply checked as the core checks it; a failure
        closes the connection."""
        self._request_id = (self._request_id + 1) & 0xFFFFFFFF
        try:
            return self._checked(self._exchange(address, request_bytes(self._request_id, payload)), outputs)
        except _OffloadFailed:
            self.close()
            raise

    def _exchange(self, address: tuple[str, int], request: bytes) -> tuple[bytes, bytes]:
        """Send `request`, return the reply's header and message; a kept connection that fails before
        any reply byte is opened once more."""
        for attempt in range(2):
            was_open = self._sock is not None and self._address == address
            got = bytearray()
            try:
                sock = self._connection(address)
                self._send(sock, request)
                head = self._receive(sock, REPLY_HEAD.size + CRC32.size, got)
                return head, self._receive(sock, REPLY_HEAD.unpack_from(head)[6], got)
            except _OffloadFailed as exc:
                self.close()
                if not was_open or got or attempt:
                    reason = str(exc)
                    raise _OffloadFailed(
                        f"{reason} after {len(got)} reply bytes" if got else reason
                    ) from None
        raise AssertionError("unreachable")

    def _connection(self, address: tuple[str, int]) -> socket.socket:
        if self._sock is not None and self._address == address:
            return self._sock
        self.close()
        try:
            sock = socket.create_connection(address, timeout=OFFLOAD_TIMEOUT_S)
        except ConnectionRefusedError:
            raise _OffloadFailed("connection refused") from None
        except OSError:
            raise _OffloadFailed("connect failed") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock, self._address = sock, address
        return sock

    @staticmethod
    def _send(sock: socket.socket, data: bytes) -> None:
        try:
            sock.sendall(data)
        except OSError:
            raise _OffloadFailed("send failed") from None

    @staticmethod
    def _receive(sock: socket.socket, size: int, got: bytearray) -> bytes:
        """Exactly `size` more bytes, appended to `got` too."""
        start = len(got)
        while len(got) - start < size:
            try:
                chunk = sock.recv(size - (len(got) - start))
            except TimeoutError:
                raise _OffloadFailed(f"no reply within {OFFLOAD_TIMEOUT_S:g} s") from None
            except ConnectionResetError:
                raise _OffloadFailed("connection reset by the server") from None
            except OSError:
                raise _OffloadFailed("receive failed") from None
            if not chunk:
                raise _OffloadFailed("connection closed by the server")
            got += chunk
        return bytes(got[start:])

    def _checked(self, reply: tuple[bytes, bytes], outputs: int) -> int:
        head, message = reply
        magic, echoed, status, class_index, _, _, _ = REPLY_HEAD.unpack_from(head)
        (stated,) = CRC32.unpack_from(head, REPLY_HEAD.size)
        crc = zlib.crc32(head[: REPLY_HEAD.size] + message)
        text = "".join(c if " " <= c <= "~" else "?" for c in message[:HI_MESSAGE_MAX].decode("latin-1"))
        if magic != REPLY_MAGIC:
            raise _OffloadFailed(f"reply magic {int.from_bytes(magic, 'big'):08x}, expected LBR1")
        if crc != stated:
            raise _OffloadFailed(f"reply CRC-32 {crc:08x}, its header says {stated:08x}")
        if echoed != self._request_id:
            raise _OffloadFailed(f"a reply to request {echoed}, expected {self._request_id}")
        if status != Status.OK or message:
            raise _OffloadFailed(f"refused with status {status}: {text}")
        if not 0 <= class_index < outputs:
            raise _OffloadFailed(f"class {class_index} outside the model's {outputs} outputs")
        return int(class_index)


@dataclass(frozen=True)
class _HiResult:
    """One input of a `hi` pass, as its m-hi line reports it."""

    p1: float = 0.0
    p2: float = 0.0
    accepted: bool = False
    local_class: int = -1
    final_class: int = -1
    t_inf_us: int = 0
    t_dec_us: int = 0
    t_off_us: int = 0


def _float_text(value: float) -> str:
    return np.format_float_positional(np.float32(value), unique=True, trim="-")


def _atoi(text: str) -> int:
    """C atoi: optional sign and leading digits; anything else counts as 0."""
    text = text.lstrip()
    sign = -1 if text[:1] == "-" else 1
    digits = text[1:] if text[:1] in "+-" else text
    n = len(digits) - len(digits.lstrip("0123456789"))
    return sign * int(digits[:n]) if n else 0


class MlperfDut:
    """The DUT firmware: the reference harness's parser and commands (internally_implemented.cpp)."""

    def __init__(self, board: SimMcuBoard):
        self.board = board
        self.uart = board.uart
        self.start_t = time.monotonic()  # the application starts: the µs counter's zero
        self.model: _Model | None = None
        self.refusal: str | None = None
        self.buffer = bytearray()
        self.buff_size = self.buff_pos = 0
        self.crc = False  # the crc32 extension: off at every boot
        self.boot_us = (0, 0)  # the boot extension: the µs counter in the banner and at m-init-done
        # the hi extension: the decision ("lr", w1, w2, b) / ("th", theta) / ("remote",), the server
        self.hi_decision: tuple[Any, ...] | None = None
        self.hi_server: tuple[str, int] | None = None
        self.hi_link = _OffloadLink()

    # -- output and clock ---------------------------------------------------------------------

    def say(self, line: str) -> None:
        data = line.encode("latin-1")
        if self.crc:
            data += b" *%08X" % zlib.crc32(data)
        self.uart.write(data + b"\r\n")

    def timer_us(self, t: float) -> int:
        return (self.board.timer_start_us + int((t - self.start_t) * 1e6)) % TIMER_WRAP

    def lap(self, t: float) -> None:
        self.say(f"m-lap-us-{self.timer_us(t)}")

    # -- boot and main loop -------------------------------------------------------------------

    def run(self) -> None:
        """Boot (the module docstring's timeline), then the parser's loop."""
        board = self.board
        board.post_power("idle_w", self.start_t)
        banner = self.start_t + board.boot_ms / 1e3
        board.reset_line.sleep_until(banner)
        self.say("m-timestamp-mode-performance")  # th_timestamp_initialize
        self.lap(banner)
        self._load_model()  # th_final_initialize, in host time; the device's time is model_init_ms
        done = banner + board.model_init_ms / 1e3
        board.reset_line.sleep_until(done)
        if self.refusal:
            self.say(f"e-[{self.refusal}]")
        self.boot_us = (self.timer_us(banner), self.timer_us(max(done, time.monotonic())))
        self.say("m-init-done")
        board.last_boot = BootTimes(board.reset_t, self.start_t, banner, max(done, time.monotonic()))
        self.say("m-ready")
        board.booted()
        try:
            while True:
                data = self.uart.read_until(b"%")
                self.command(data[:-1])
        finally:  # a reset (or a fault) ends the firmware and its connection
            self.hi_link.close()

    def _load_model(self) -> None:
        try:
            model, name = self.board.read_app()
            self.model = _Model(model, name, self.board)
        except _Refused as exc:
            self.refusal = str(exc)
        except (LabbenchError, ValueError, RuntimeError) as exc:  # no image, not TFLite, TFLM refuses
            self.refusal = f"no runnable model in flash: {exc}"
        if self.refusal:
            self.board.log.warning("%s", self.refusal)

    def command(self, raw: bytes) -> None:
        """One %-terminated command: the reference keeps its first 80 characters (EE_CMD_SIZE)."""
        tokens = raw[:EE_CMD_SIZE].decode("latin-1").split(" ")
        tokens = [t for t in tokens if t]  # strtok skips empty tokens
        handler = {
            "name": self._name,
            "timestamp": self._timestamp,
            "profile": self._profile,
            "help": self._help,
            "db": self._db,
            "infer": self._infer,
            "results": self._results,
            **({"crc32": self._crc32} if self.board.reply_crc else {}),
            **({"boot": self._boot} if self.board.boot_report else {}),
            **({"hi-cfg": self._hi_cfg, "hi-srv": self._hi_srv, "hi": self._hi} if self.board.hi else {}),
        }
        if tokens and tokens[0] in handler:
            handler[tokens[0]](tokens[1:])
        else:
            self.say(f"e-[Unknown command: {tokens[0] if tokens else ''}]")
        self.say("m-ready")

    # -- commands ------------------------------------------------------------------------------

    def _name(self, _: list[str]) -> None:
        self.say(f"m-name-dut-[{self.board.vendor}]")

    def _timestamp(self, _: list[str]) -> None:
        self.lap(time.monotonic())

    def _help(self, _: list[str]) -> None:
        for line in _HELP:
            self.say(line)
        if self.board.reply_crc:
            self.say("crc32 on|off : Append a CRC-32 to every reply line, or stop")
        if self.board.boot_report:
            self.say("boot         : Print the clock at the boot banner and at m-init-done")
        if self.board.hi:
            self.say("hi-cfg lr W1 W2 B | th T | remote: Set the HI decision module")
            self.say("hi-srv A.B.C.D P: Set the edge server HI offloads to")
            self.say("hi N         : Run HI over the N inputs in db")

    def _profile(self, _: list[str]) -> None:
        self.say(f"m-profile-[{EE_FW_VERSION}]")
        self.say(f"m-model-[{self.model.name if self.model else 'none'}]")
        if self.board.reply_crc:
            self.say("m-ext-[crc32]")
        if self.board.boot_report:
            self.say("m-ext-[boot]")
        if self.board.hi:
            self.say("m-ext-[hi]")
        if self.model is None:
            self.say(f"e-[{self.refusal}]")
            return
        m = self.model
        self.say(f"m-model-sha256-[{m.info.sha256}]")
        self.say(f"m-model-bytes-[{len(m.bytes)}]")
        self.say(f"m-arena-bytes-[{m.arena_bytes}]")
        self.say(f"m-latency-us-[{m.latency_s * 1e6:.3f}]")

    def _db(self, args: list[str]) -> None:
        if not args:
            self.say("e-[Command 'db' requires a subcommand]")
        elif args[0] == "load":
            self._db_load(args[1:])
        elif args[0] == "print":
            for row in range(0, self.buff_pos, 8):
                self.say(
                    "m-buffer-" + "-".join(f"{b:02x}" for b in self.buffer[row : min(row + 8, self.buff_pos)])
                )
        else:
            self._db_data(args[0])

    def _db_load(self, args: list[str]) -> None:
        if not args:
            self.say("e-[Command 'db load' requires the # of bytes]")
            return
        n = _atoi(args[0])
        self.buff_size = n % SIZE_T_WRAP  # a size_t: the reference takes "-5" as 2^32 - 5
        if self.buff_size == 0:
            self.say("e-[Command 'db load' must be >0 bytes]")
            return
        self.buff_pos = 0
        limit = self.model.input_bytes if self.model and self.hi_decision is None else MAX_DB_INPUT_SIZE
        self.buffer = bytearray(min(self.buff_size, limit))
        if self.buff_size > limit:  # printed with %d, so "-5" shows as -5
            self.uart.write(f"Supplied buffer size {n} exceeds maximum of {limit}\n".encode())
        else:
            self.say(f"m-[Expecting {self.buff_size} bytes]")
            self.board.post_power("upload_w")

    def _db_data(self, digits: str) -> None:
        if len(digits) % 2:
            self.say("e-[Insufficent number of hex digits]")
            return
        for i in range(0, len(digits), 2):
            pair = digits[i : i + 2]
            if not _HEX_DIGITS.issuperset(pair):  # ee_hexdec: no sign, no "0x", no spaces
                self.say(f"e-[Invalid hex digit '{pair}']")
                return
            value = int(pair, 16)
            if self.buff_pos >= len(self.buffer):
                self.say(f"e-[db data beyond the {len(self.buffer)} bytes loaded; send 'db load N' first]")
                return
            self.buffer[self.buff_pos] = value
            self.buff_pos += 1
            if self.buff_pos == self.buff_size:
                self.say("m-load-done")
                self.board.post_power("idle_w")
                return

    def _infer(self, args: list[str]) -> None:
        n, warmup = 1, 10
        if args:
            n = _atoi(args[0])
            if n <= 0:
                self.say("e-[Inference iterations must be >0]")
                return
            if len(args) > 1:
                warmup = _atoi(args[1])
                if warmup < 0:
                    self.say("e-[Inference warmup must be >=0]")
                    return
        m = self.model
        if m is None:
            self.say(f"e-[No model: {self.refusal}]")
            return
        if self.buff_pos != m.input_bytes:
            self.say(f"e-[Input needs {m.input_bytes} bytes; {self.buff_pos} loaded]")
            return
        m.run(bytes(self.buffer[: m.input_bytes]))  # th_load_tensor (untimed, as in the reference)
        self.say(f"m-warmup-start-{warmup}")
        # The device's timeline is computed from the device model: the warmups end and the timed loop
        # begins at one instant (the lines between are buffered output), and the loop ends at its
        # deadline; the host only sleeps to keep up with it (within microseconds).
        start = time.monotonic()
        self.board.post_power("active_w", start)
        if warmup:
            start += self.board.busy_s(warmup, m.latency_s)
            self.board.reset_line.sleep_until(start)
        self.say("m-warmup-done")
        self.say(f"m-infer-start-{n}")
        self.lap(start)
        end = start + self.board.busy_s(n, m.latency_s)
        self.board.reset_line.sleep_until(end)
        self.board.post_power("idle_w", end)
        self.lap(end)
        self.say("m-infer-done")
        self.say(m.results_line())

    def _crc32(self, args: list[str]) -> None:
        """The reply-integrity extension; the new setting applies to this command's own reply."""
        if args[:1] in (["on"], ["off"]):
            self.crc = args[0] == "on"
            self.say(f"m-crc32-[{args[0]}]")
        else:
            self.say("e-[Command 'crc32' takes on or off]")

    def _boot(self, _: list[str]) -> None:
        """The boot extension (firmware/core/src/lb_dut.h): the counter in the banner's stamp and at
        m-init-done, kept until the next reset."""
        self.say(f"m-boot-us-[{self.boot_us[0]},{self.boot_us[1]}]")

    # -- the hi extension (firmware/core/src/lb_dut.h) -----------------------------------------------

    def _hi_cfg(self, args: list[str]) -> None:
        kind, values = (args[0], args[1:]) if args else ("", [])
        want = {"lr": 3, "th": 1, "remote": 0}.get(kind)
        if want is None:
            self.say("e-[Command 'hi-cfg' takes lr W1 W2 B, th THETA or remote]")
            return
        parsed: list[float] = []
        for text in values[:want]:
            value = float(text) if _DECIMAL.fullmatch(text) else math.inf
            if not abs(value) <= np.finfo(np.float32).max:
                self.say(f"e-[Invalid number '{text}': a finite decimal is needed]")
                return
            parsed.append(float(np.float32(value)))
        if len(values) != want:
            self.say(f"e-[Command 'hi-cfg {kind}' takes {want} numbers]")
            return
        self.hi_decision = (kind, *parsed)
        self.say(f"m-hi-cfg-[{','.join([kind, *map(_float_text, parsed)])}]")

    def _hi_srv(self, args: list[str]) -> None:
        ok = len(args) == 2 and _IPV4.fullmatch(args[0]) and _COUNT.fullmatch(args[1])
        if not ok or not 1 <= int(args[1]) <= 65535:
            self.say("e-[Command 'hi-srv' takes an IPv4 address A.B.C.D and a port 1..65535]")
            return
        self.hi_link.close()
        self.hi_server = (args[0], int(args[1]))
        self.say(f"m-hi-srv-[{args[0]}:{int(args[1])}]")

    def _hi_refusal(self, n: int) -> str | None:
        """Why `hi n` cannot run (the core's texts), or None."""
        m = self.model
        if m is None:
            return f"No model: {self.refusal}"
        need = n * m.input_bytes
        if m.mlperf is not None and m.mlperf.input != "int8":
            return f"hi: {m.mlperf.id}'s db input is not its input tensor: hi offloads tensor bytes"
        if self.hi_decision is None:
            return "hi: no decision module: send hi-cfg first"
        if self.hi_server is None:
            return "hi: no edge server: send hi-srv first"
        if (outputs := math.prod(m.info.outputs[0].shape)) < 2:
            return f"hi: the model has {outputs} outputs; the decision needs at least 2"
        if self.buff_size != need:
            return f"hi: db holds {self.buff_size} bytes; {n} inputs of {m.input_bytes} bytes are {need}"
        if self.buff_pos != self.buff_size:
            return f"Input incomplete: {self.buff_pos} of {self.buff_size} bytes loaded"
        return None

    def _hi(self, args: list[str]) -> None:
        n = int(args[0]) if len(args) == 1 and _COUNT.fullmatch(args[0]) else 0
        if not 1 <= n <= HI_MAX_SAMPLES:
            self.say(f"e-[Command 'hi' takes a sample count of 1 to {HI_MAX_SAMPLES}]")
            return
        if (refusal := self._hi_refusal(n)) is not None:
            self.say(f"e-[{refusal}]")
            return
        from labbench.strategies.decision import top2  # scikit-learn: loaded when HI first runs

        outputs = self._hi_outputs(n)
        results: list[_HiResult] = []
        failure: str | None = None
        start = t = time.monotonic()
        try:
            for i in range(n):
                result, t = self._hi_sample(i, t, outputs[i], top2)
                results.append(result)
        except _OffloadFailed as exc:
            assert self.hi_server is not None
            ip, port = self.hi_server
            failure = f"hi: sample {len(results)}: offload to {ip}:{port} failed: {exc}"
        self.board.post_power("idle_w", t)
        for i, r in enumerate(results):
            self.say(
                f"m-hi-[{i},{_float_text(r.p1)},{_float_text(r.p2)},{int(r.accepted)},{r.local_class},"
                f"{r.final_class},{r.t_inf_us},{r.t_dec_us},{r.t_off_us}]"
            )
        if failure is not None:
            self.say(f"e-[{failure}]")
        else:
            self.say(f"m-hi-done-[{n},{self.timer_us(start)},{self.timer_us(t)}]")

    def _hi_outputs(self, n: int) -> list[np.ndarray | None]:
        """The model's outputs for the pass's n inputs, computed before its timeline starts, so that
        the interpreter's own time never stretches the device's (None each in remote mode)."""
        m, decision = self.model, self.hi_decision
        assert m is not None and decision is not None
        if decision[0] == "remote":
            return [None] * n
        found: list[np.ndarray | None] = []
        for i in range(n):
            m.run(bytes(self.buffer[i * m.input_bytes : (i + 1) * m.input_bytes]))
            found.append(dequantize_output(m.info, m.outputs[0], 0).ravel())
        return found

    def _hi_sample(
        self, i: int, t: float, outputs: np.ndarray | None, top2: Callable[[np.ndarray], np.ndarray]
    ) -> tuple[_HiResult, float]:
        """Input `i` of a pass (its model `outputs`, None in remote mode), starting at device time `t`
        (host monotonic); its result and the time it ended. The model and the decision follow the
        device's timeline; an offload takes real time, from when it starts."""
        m, board, decision = self.model, self.board, self.hi_decision
        assert m is not None and decision is not None and self.hi_server is not None
        sample = bytes(self.buffer[i * m.input_bytes : (i + 1) * m.input_bytes])
        result = _HiResult()
        if outputs is not None:
            board.post_power("active_w", t)
            inferred = t + board.busy_s(1, m.latency_s)
            decided = inferred + self.decision_s(outputs)
            board.reset_line.sleep_until(decided)
            p1, p2 = (np.float32(p) for p in top2(outputs[np.newaxis])[0])
            accepted = bool(
                np.float32(decision[1]) * p1 + np.float32(decision[2]) * p2 + np.float32(decision[3]) >= 0
                if decision[0] == "lr"
                else p1 >= np.float32(decision[1])
            )
            local = int(np.argmax(outputs))
            result = _HiResult(
                float(p1), float(p2), accepted, local, local,
                self._us_between(t, inferred), self._us_between(inferred, decided),
            )  # fmt: skip
            t = decided
        if result.accepted:
            return result, t
        board.post_offload(t)
        t = max(t, time.monotonic())
        server_class = self.hi_link.offload(self.hi_server, sample, math.prod(m.info.outputs[0].shape))
        done = time.monotonic()
        return _HiResult(
            result.p1, result.p2, False, result.local_class, server_class,
            result.t_inf_us, result.t_dec_us, self._us_between(t, done),
        ), done  # fmt: skip

    def decision_s(self, outputs: np.ndarray) -> float:
        """The decision's time on this board for these outputs (DECISION_CYCLES_*)."""
        from labbench.strategies.decision import PROBABILITY_SUM_TOLERANCE

        n = len(outputs)
        probabilities = bool(((outputs >= 0) & (outputs <= 1)).all()) and (
            abs(float(outputs.sum()) - 1) <= PROBABILITY_SUM_TOLERANCE
        )
        cycles = DECISION_CYCLES_BASE + n * (
            DECISION_CYCLES_PER_OUTPUT + (0 if probabilities else DECISION_CYCLES_PER_EXP)
        )
        return cycles / (self.board.family.clock_mhz * 1e6)

    def _us_between(self, a: float, b: float) -> int:
        """Microseconds from host time `a` to `b` as the device's counter counts them."""
        return (self.timer_us(b) - self.timer_us(a)) % TIMER_WRAP

    def _results(self, _: list[str]) -> None:
        if self.model is None:
            self.say(f"e-[No model: {self.refusal}]")
        else:
            self.say(self.model.results_line())


class SimMcuBoard:
    """A simulated MCU board on an RFC 2217 port; see the module docstring for its hooks."""

    def __init__(
        self,
        name: str,
        host: str = "127.0.0.1",
        port: int = 0,
        family: str | BoardFamily = "esp32_devkitc",
        bus_channel: Any = None,
        model_path: str | Path | None = None,
        firmware: bytes | None = None,
        *,
        speed_factor: float = 1.0,
        vendor: str | None = None,
        baud: int | None = None,
        boot_rom: BootRom | None = None,
        rx_fifo_bytes: int = 256,
        tx_buffer_bytes: int = 256,
        timer_start_us: int = 0,
        strap_delay_s: float = 0.15,
        devices_dir: str | Path | None = None,
        reply_crc: bool = True,
        boot_report: bool = True,
        hi: bool | None = None,
        boot_ms: float = BOOT_MS,
        model_init_ms: float = MODEL_INIT_MS,
        seed: int | str | None = None,
        jitter_pct: float = JITTER_PCT,
        outlier_rate: float = OUTLIER_RATE,
        outlier_pct: float = OUTLIER_PCT,
        power_noise_pct: float = POWER_NOISE_PCT,
        radio: Radio | None = None,
    ):
        self.name = name
        self.family = family if isinstance(family, BoardFamily) else load_family(family, devices_dir)
        if self.family.kind != "mcu":
            raise LabConfigError(f"{name}: family {self.family.name} is not an MCU family")
        if speed_factor <= 0:
            raise LabConfigError(f"{name}: speed_factor must be > 0, got {speed_factor}")
        if boot_ms < 0 or model_init_ms < 0:
            raise LabConfigError(f"{name}: need boot_ms, model_init_ms >= 0: {boot_ms}, {model_init_ms}")
        self.boot_ms, self.model_init_ms = boot_ms, model_init_ms
        if min(jitter_pct, outlier_pct, power_noise_pct) < 0 or not 0 <= outlier_rate <= 1:
            raise LabConfigError(
                f"{name}: need jitter_pct, outlier_pct, power_noise_pct >= 0 and 0 <= outlier_rate <= 1: "
                f"{jitter_pct}, {outlier_pct}, {power_noise_pct}, {outlier_rate}"
            )
        self.jitter_pct, self.outlier_rate, self.outlier_pct = jitter_pct, outlier_rate, outlier_pct
        self.seed = name if seed is None else seed
        self._latency_rng = np.random.default_rng(derive_seed(self.seed, "latency"))  # chip thread only
        self.power_noise = LevelNoise(power_noise_pct, derive_seed(self.seed, "power"))
        self.radio = radio  # its offload link, when lab.yaml gives it one
        self.bus_channel = bus_channel
        self.speed_factor = speed_factor
        self.vendor = vendor or self.family.name
        self.timer_start_us = timer_start_us
        self.strap_delay_s = strap_delay_s
        self.reply_crc = reply_crc  # the firmware has the crc32 extension
        self.boot_report = boot_report  # ... and the boot extension
        self.hi = reply_crc or boot_report if hi is None else hi  # ... and the hi extension
        self.log = logging.getLogger(f"labbench.sim.mcu.{name}")
        self._esp32_layout = self.family.flasher == "esptool"
        if boot_rom is None and self._esp32_layout:
            from labbench.sim.esp32_rom import Esp32BootRom

            boot_rom = Esp32BootRom()
        self.boot_rom = boot_rom
        # the catalog requires flash_kib and serial_baud of an MCU family
        assert self.family.flash_kib is not None
        self.flash = FlashStore(self.family.flash_kib * 1024)
        self.reset_line = ResetLine()
        app_baud = baud or self.family.serial_baud
        assert app_baud is not None
        self.app_baud = app_baud  # the DUT firmware's UART rate
        self.uart = SimUart(
            name,
            host,
            port,
            device_baud=getattr(boot_rom, "rom_baud", None) or self.app_baud,  # a boot ROM has its own
            reset=self.reset_line,
            on_lines=self._on_lines,
            rx_fifo_bytes=rx_fifo_bytes,
            tx_buffer_bytes=tx_buffer_bytes,
        )
        self._raw_name: tuple[bytes, str | None] = (b"", None)  # (image sha256, name) of a raw install
        if model_path is not None:
            path = Path(model_path)
            self._install(path.read_bytes(), path.stem)
        elif firmware is not None:
            self._install(firmware, None)
        # chip state, guarded by _cv
        self._cv = threading.Condition()
        self._en_low = self._io0_low = False
        self._request: bool | None = None  # a reset asked for by the simulator side: download?
        self._halted = False  # the firmware faulted: only a reset revives it
        self._stopping = False
        self._boots = 0
        self._in_rom = False
        self.reset_t = 0.0  # host time of the last reset edge
        self.last_boot: BootTimes | None = None
        self.firmware: MlperfDut | None = None
        self._cpu: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"SimMcuBoard({self.name!r}, {self.family.name}, {self.url})"

    @property
    def url(self) -> str:
        return f"rfc2217://{self.uart.host}:{self.uart.port}"

    # -- life cycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self.uart.start()
        self._cpu = threading.Thread(target=self._run_chip, name=f"{self.name}-cpu", daemon=True)
        self._cpu.start()
        self._wait_boot(0)

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self.reset_line.assert_reset()
        if self._cpu is not None:
            self._cpu.join(10)
        self.uart.stop()

    # -- reset circuit ----------------------------------------------------------------------------

    def _on_lines(self, dtr: bool, rts: bool) -> None:
        en_low, io0_low = rts and not dtr, dtr and not rts
        with self._cv:
            self._io0_low = io0_low
            if en_low and not self._en_low:
                self._halted = False
                self._enter_reset()
            elif self._en_low and not en_low:
                self.reset_t = time.monotonic()  # EN released; the chip starts after the strap delay
            self._en_low = en_low
            self._cv.notify_all()

    def reset(self, download: bool = False, wait: bool = False) -> None:
        """Reset the chip from the simulator's side (the EN button, or a flasher), booting as asked;
        with `wait`, return once the application has booted."""
        with self._cv:
            boots = self._boots
            self._request = download
            self._halted = False
            self._enter_reset()
            self.reset_t = time.monotonic()
            self._cv.notify_all()
        if wait:
            self._wait_boot(boots)

    def _enter_reset(self) -> None:
        self.reset_line.assert_reset()
        self.post_power("idle_w")

    def _held_in_reset(self) -> bool | None:
        """Wait until the chip leaves reset; the boot mode (download?), or None when stopping."""
        with self._cv:
            while not self._stopping:
                if self._request is not None:
                    download, self._request = self._request, None
                    break
                if not self._en_low and not self._halted:
                    released = time.monotonic() + self.strap_delay_s
                    while (
                        not self._en_low
                        and not self._stopping
                        and self._request is None
                        and (left := released - time.monotonic()) > 0
                    ):
                        self._cv.wait(left)
                    if self._en_low or self._stopping or self._request is not None:
                        continue
                    download = self._io0_low
                    break
                self._cv.wait()
            else:
                return None
            self.reset_line.release()
        return download

    def _run_chip(self) -> None:
        download: bool | None = False  # power-on
        self.reset_t = time.monotonic()
        while download is not None:
            self.uart.reboot()
            self.firmware = None
            try:
                if self.boot_rom is not None:
                    self._in_rom = True
                    self.boot_rom.run(self, download)
                    self._in_rom = False
                self.uart.device_baud = self.app_baud
                self.firmware = MlperfDut(self)
                self.firmware.run()
            except ChipReset:
                self._in_rom = False
            except Exception:  # a firmware fault: the chip does nothing until the next reset
                self._in_rom = False
                self.log.exception("firmware fault; waiting for a reset")
                with self._cv:
                    self._halted = True
            download = self._held_in_reset()

    def booted(self) -> None:
        with self._cv:
            self._boots += 1
            self._cv.notify_all()

    def _wait_boot(self, boots_before: int) -> None:
        """Until the application has booted again, or the boot ROM waits for the host (or loops,
        finding nothing bootable) instead."""
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        with self._cv:
            while self._boots <= boots_before and not (
                self._in_rom and (self.uart.waiting or getattr(self.boot_rom, "boot_loop", False))
            ):
                if time.monotonic() > deadline:
                    raise SimBoardError(f"{self.name}: did not boot within {BOOT_TIMEOUT_S:.0f} s")
                self._cv.wait(0.1)

    # -- flash ------------------------------------------------------------------------------------

    def _install(self, image: bytes, name: str | None) -> None:
        """Write `image` as a full flash of this family's layout would; one too big is refused."""
        if len(image) > self.flash.size_bytes:
            raise SimBoardError(
                f"{self.name}: cannot flash a {len(image):,} B image: "
                f"it exceeds flash {self.family.flash_kib:,} KiB"
            )
        self.flash.erase()
        if not self._esp32_layout:
            self.flash.write(0, image)
            self._raw_name = (hashlib.sha256(image).digest(), name)
            return
        if image[4:8] == b"TFL3":
            image = fw.build_app_image(image, name or ModelInfo.from_bytes(image).name)
        self.flash.write(fw.PARTITION_TABLE_OFFSET, fw.partition_table_bin())
        self.flash.write(fw.APP_OFFSET, image)

    def read_app(self) -> tuple[bytes, str | None]:
        """The model the application boots (and its name, where the image records one)."""
        if not self._esp32_layout:
            model = self.flash.read(0, self.flash.extent)
            sha, name = self._raw_name
            return model, name if hashlib.sha256(model).digest() == sha else None
        table = fw.parse_partition_table(self.flash.read(fw.PARTITION_TABLE_OFFSET, fw.PARTITION_TABLE_BYTES))
        part = fw.boot_partition(table)
        app = fw.read_app_image(
            self.flash.read(part.offset, max(0, min(part.size, self.flash.extent - part.offset)))
        )
        return app.model, app.model_name

    def load_firmware(self, image: bytes, name: str | None = None) -> dict[str, Any]:
        """Flash `image`, reset into it, wait for the boot; returns what booted (JSON-friendly).
        `name` names a raw .tflite (default: the model's own name)."""
        self._install(image, name)
        self.reset(wait=True)
        return self.describe() | {
            "image_bytes": len(image),
            "image_sha256": hashlib.sha256(image).hexdigest(),
        }

    def describe(self) -> dict[str, Any]:
        dut = self.firmware
        m = dut.model if dut else None
        refused = dut.refusal if dut else None
        if self._in_rom:
            rom_said = getattr(self.boot_rom, "last_boot", "").strip()
            refused = f"the boot ROM did not start the application: {rom_said}"
        return {
            "board": self.name,
            "family": self.family.name,
            "url": self.url,
            "model": m.name if m else None,
            "model_sha256": m.info.sha256 if m else None,
            "model_bytes": len(m.bytes) if m else None,
            "arena_bytes": m.arena_bytes if m else None,
            "latency_us": m.latency_s * 1e6 if m else None,
            "refused": refused,
        }

    # -- timing and power ---------------------------------------------------------------------------

    def latency_factors(self, n: int) -> np.ndarray:
        """The next `n` inferences' durations over the device model's (module docstring: Jitter and noise)."""
        if not self.jitter_pct:
            return np.ones(n)
        sigma = math.sqrt(math.log1p((self.jitter_pct / 100) ** 2))
        factors = self._latency_rng.lognormal(-sigma * sigma / 2, sigma, n)
        factors[self._latency_rng.random(n) < self.outlier_rate] += self.outlier_pct / 100
        return factors

    def busy_s(self, n: int, latency_s: float) -> float:
        """How long the next `n` inferences of `latency_s` each (the device model's) take."""
        total = 0.0
        for done in range(0, n, _DRAW_CHUNK):
            total += float(self.latency_factors(min(_DRAW_CHUNK, n - done)).sum())
        return total * latency_s

    def post_power(self, state: str, t: float | None = None) -> None:
        """Draw the family's `state` power ("idle_w", "upload_w", "active_w") from `t` (default now)."""
        if self.bus_channel is not None:
            self.bus_channel.set_power(getattr(self.family.power, state), t, noise=self.power_noise)

    def post_offload(self, t: float) -> None:
        """Draw its link's power from `t`, an offload in flight (the CPU waits); idle without a link."""
        if self.radio is None:
            self.post_power("idle_w", t)
        elif self.bus_channel is not None:
            self.bus_channel.set_power(self.radio.power_w, t, noise=self.power_noise)
