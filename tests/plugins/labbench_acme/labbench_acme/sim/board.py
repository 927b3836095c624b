"""A simulated ACME M0 running the DUT firmware labbench_acme.dut drives, on a TCP port (its serial URL
is socket://host:port), served through labbench's LineServer.

The flashed model runs in the real TFLite Micro interpreter (its outputs are genuine); an inference
takes the family's device model's time (a deadline on the host clock, which the board's microsecond
counter follows); its power, the family's idle and active levels, exactly, goes to the power bus
channel it is wired to at the instants the states begin.
"""

from __future__ import annotations

import hashlib
import threading
import time
import zlib
from pathlib import Path

import numpy as np

from labbench.catalog import BoardFamily
from labbench.modelinfo import ModelInfo, dequantize_output, min_arena_bytes
from labbench.sim.lineserver import LineServer
from labbench.sim.powerbus import PowerChannel
from labbench_acme.wire import sealed

FIRMWARE = "1.0"


class Refused(Exception):
    """A command the firmware refuses; the message is its `err` reply."""


class _Model:
    """A booted model: the interpreter, its facts and its time per inference on the board."""

    def __init__(self, name: str, data: bytes, family: BoardFamily, speed_factor: float):
        from tflite_micro import runtime

        self.name, self.sha256 = name, hashlib.sha256(data).hexdigest()
        self.info = ModelInfo.from_bytes(data, name)
        self.arena_bytes = min_arena_bytes(data)
        if problem := family.fits(len(data), self.arena_bytes):
            raise Refused(f"model {name} does not fit: {problem}")
        device, _ = family.profile()
        self.latency_s = device.inference_us(self.info.macs, self.info.inputs[0].dtype) * speed_factor / 1e6
        self.input_bytes = sum(t.size_bytes for t in self.info.inputs)
        self.interpreter = runtime.Interpreter.from_bytes(data, arena_size=2 * self.arena_bytes + 4096)

    def infer(self, data: bytes) -> np.ndarray:
        """The dequantized outputs for the raw input bytes `data`."""
        pos = 0
        for i, t in enumerate(self.info.inputs):
            self.interpreter.set_input(
                np.frombuffer(data, t.dtype, int(np.prod(t.shape)), pos).reshape(t.shape), i
            )
            pos += t.size_bytes
        self.interpreter.invoke()
        outputs = range(len(self.info.outputs))
        return np.concatenate(
            [dequantize_output(self.info, self.interpreter.get_output(i), i).ravel() for i in outputs]
        )


class AcmeBoardSim:
    """A simulated ACME M0 at host:port (its serial URL is socket://host:port); see the module docstring."""

    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        family: BoardFamily,
        channel: PowerChannel,
        *,
        model: Path | None = None,
        speed_factor: float = 1.0,
        boot_ms: float = 20.0,
    ):
        self.name, self.family, self.channel = name, family, channel
        self.speed_factor, self.boot_s = speed_factor, boot_ms / 1000
        self.server = LineServer(name, self._handle, host=host, port=port, use_pty=False, ack_tcp=False)
        self._image = (model.stem, model.read_bytes()) if model else None
        self._chip = threading.Lock()  # one core: one command at a time
        self._booted_s = 0.0
        self._model: _Model | None = None
        self._refused: str | None = None
        self._input: bytes | None = None
        self._outputs: np.ndarray | None = None

    def __repr__(self) -> str:
        return f"AcmeBoardSim({self.name!r} at {self.server.host}:{self.server.port})"

    def start(self) -> None:
        self._boot()
        self.server.start()

    def stop(self) -> None:
        self.server.stop()
        self.channel.set_power(0.0)

    def _boot(self) -> None:
        """Reset: the firmware boots the model in flash (refusing one that does not fit) and idles."""
        self.channel.set_power(self.family.power.idle_w)
        time.sleep(self.boot_s)
        self._booted_s = time.monotonic()
        self._model, self._refused, self._input, self._outputs = None, None, None, None
        if self._image is not None:
            try:
                self._model = _Model(*self._image, self.family, self.speed_factor)
            except Refused as exc:
                self._refused = str(exc)

    def _us(self, t_s: float) -> int:
        return round((t_s - self._booted_s) * 1e6)

    def _handle(self, line: str) -> str:
        command, *args = line.split()
        handlers = {
            "id": self._id,
            "clock": self._clock,
            "load": self._load,
            "run": self._run,
            "out": self._out,
            "flash": self._flash,
            "reset": self._reset,
        }
        with self._chip:
            try:
                if command not in handlers:
                    raise Refused(f"unknown command {command}")
                return sealed(handlers[command](*args))
            except Refused as exc:
                return sealed(f"err {exc}")
            except (TypeError, ValueError) as exc:
                return sealed(f"err bad arguments to {command}: {exc}")

    def _loaded_model(self) -> _Model:
        if self._model is None:
            raise Refused(self._refused or "no model in flash")
        return self._model

    def _id(self) -> str:
        if self._refused:
            raise Refused(self._refused)
        m = self._model
        if m is None:
            return f"id acme-m0 fw={FIRMWARE} model=- sha256=- arena=0 in=0 out=0"
        return (
            f"id acme-m0 fw={FIRMWARE} model={m.name} sha256={m.sha256} arena={m.arena_bytes} "
            f"in={m.input_bytes} out={sum(int(np.prod(t.shape)) for t in m.info.outputs)}"
        )

    def _clock(self) -> str:
        return f"clock {self._us(time.monotonic())}"

    def _load(self, hex_data: str) -> str:
        data, model = bytes.fromhex(hex_data), self._loaded_model()
        if len(data) != model.input_bytes:
            raise Refused(f"{len(data)} bytes; the model's input takes {model.input_bytes}")
        self._input, self._outputs = data, None
        return f"loaded {len(data)} {zlib.crc32(data):08x}"

    def _run(self, count: str, warmup: str) -> str:
        n, w, model = int(count), int(warmup), self._loaded_model()
        if n < 1 or w < 0 or self._input is None:
            raise Refused("run needs count >= 1, warmup >= 0 and a loaded input")
        if self._outputs is None:
            self._outputs = model.infer(self._input)
        begin = time.monotonic()
        start, end = begin + w * model.latency_s, begin + (w + n) * model.latency_s
        self.channel.set_power(self.family.power.active_w, begin)
        self.channel.set_power(self.family.power.idle_w, end)
        time.sleep(max(0.0, end - time.monotonic()))
        return f"ran {n} {self._us(start)} {self._us(end)}"

    def _out(self) -> str:
        if self._outputs is None:
            raise Refused("no inference since the input was loaded")
        return f"out {len(self._outputs)} " + ",".join(
            repr(float(v)) for v in self._outputs.astype(np.float32)
        )

    def _flash(self, name: str, sha256: str, hex_data: str) -> str:
        data = bytes.fromhex(hex_data)
        if hashlib.sha256(data).hexdigest() != sha256:
            raise Refused(f"the image's sha256 is {hashlib.sha256(data).hexdigest()}, not {sha256}")
        if self.family.flash_kib is not None and len(data) > self.family.flash_kib * 1024:
            raise Refused(f"{len(data)} bytes exceed the flash ({self.family.flash_kib} KiB)")
        self._image = (name, data)
        self._boot()
        return f"flashed {len(data)} {sha256}"

    def _reset(self) -> str:
        self._boot()
        return "reset"
