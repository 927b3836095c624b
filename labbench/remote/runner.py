"""Runs a model on a Linux board and streams what happened, one record per line.

Shipped to the board by the SSH driver and run there with the board's own python3; it needs only
the standard library, numpy and one inference runtime (ai-edge-litert or tflite-runtime for .tflite,
onnxruntime for .onnx), and it never imports labbench.

    python3 runner.py info MODEL
    python3 runner.py timed MODEL --count N --warmup W  < sample.npy
    python3 runner.py classify MODEL [--dataset FILE.npz --key x_test]  (else samples.npy on stdin)

Output (stdout, written straight to the file descriptor record by record, so a broken connection
loses only what was in flight). Every line is `<JSON> *XXXXXXXX`: XXXXXXXX is the CRC-32
(zlib.crc32) of the JSON text, in upper-case hex, as in the MCU firmware's reply CRC. Stamps (`*_ns`)
are the board's time.perf_counter_ns() (CLOCK_MONOTONIC):

    {"type":"start","protocol":2,"t0_ns":...,"t_ns":...,"count":N,"warmup":W,"outputs":K,
     "model_sha256":...,"input_sha256":...,"runtime":...,"runtime_version":...,
     "load_ms":...,"cold_start_ms":...,"first_latency_ns":...}
    {"type":"inference","i":0,"t_ns":...,"latency_ns":5120}           (timed)
    {"type":"inference","i":0,"t_ns":...,"latency_ns":5120,"output":[K values]}   (classify)
    {"type":"end","count":N,"t_ns":...,"peak_rss_kib":...,"output":[K values]}   (output: timed only)

`t0_ns` is the runner's first stamp, `t_ns` of the start record when the model was loaded (before its
first inference), of an inference when it ended, of the end record when it was written. `count` is
the inferences asked for (timed) or the samples received (classify); `input_sha256` is the sha256 of
the input array's dtype string, shape and bytes (`f"{dtype.str}{shape}"` + C-order bytes);
`outputs` the length of the model's output. classify's inference 0 is the cold start's inference.
`info` prints one `{"type":"info",...}` record, tagged the same way.

Float inputs are quantized with the model's own input scale and zero point; outputs are
dequantized with its output scale and zero point, so every runtime returns float32 scores.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import resource
import sys
import time
import zlib
from importlib import metadata
from pathlib import Path

import numpy as np

T0_NS = time.perf_counter_ns()  # the runner's first stamp
PROTOCOL = 2  # bumped when the command line or the line format changes
_out = sys.stdout.fileno()  # main() gives records their own copy of stdout


def emit_line(body: bytes) -> None:
    """One record and its CRC-32 tag, written straight to the file descriptor: nothing is buffered on
    the board."""
    line = b"%s *%08X\n" % (body, zlib.crc32(body))
    while line:
        line = line[os.write(_out, line) :]


def emit(record: dict) -> None:
    emit_line(json.dumps(record, separators=(",", ":")).encode())


def own_stdout() -> None:
    """Keep stdout for records: whatever a runtime prints (from Python or C) goes to stderr."""
    global _out
    sys.stdout.flush()
    _out = os.dup(sys.stdout.fileno())
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())


def _version(dist: str, module) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return str(getattr(module, "__version__", "unknown"))


class TfliteModel:
    """A .tflite model on ai-edge-litert (preferred) or tflite-runtime: same Interpreter API."""

    def __init__(self, path: str):
        try:
            from ai_edge_litert import interpreter as module

            self.runtime, dist = "ai-edge-litert", "ai-edge-litert"
        except ImportError:
            from tflite_runtime import interpreter as module

            self.runtime, dist = "tflite-runtime", "tflite-runtime"
        self.runtime_version = _version(dist, module)
        self._it = module.Interpreter(model_path=path)
        self._it.allocate_tensors()
        self._in = self._it.get_input_details()[0]
        self._out = self._it.get_output_details()[0]
        self.input_shape = tuple(int(d) for d in self._in["shape"])
        self.input_dtype = np.dtype(self._in["dtype"])
        self.input_quant = tuple(self._in["quantization"])  # (scale, zero_point); scale 0 = float
        self.output_quant = tuple(self._out["quantization"])

    def invoke(self, x: np.ndarray) -> None:
        self._it.set_tensor(self._in["index"], x)
        self._it.invoke()

    def output(self) -> np.ndarray:
        return self._it.get_tensor(self._out["index"])


ONNX_TYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
}


class OnnxModel:
    """An .onnx model on onnxruntime (CPU). ONNX graphs carry no input quantization: inputs are cast."""

    def __init__(self, path: str):
        import onnxruntime as module

        self.runtime, self.runtime_version = "onnxruntime", _version("onnxruntime", module)
        self._session = module.InferenceSession(path, providers=["CPUExecutionProvider"])
        inp = self._session.get_inputs()[0]
        self._name = inp.name
        self.input_shape = tuple(d if isinstance(d, int) else 1 for d in inp.shape)
        self.input_dtype = np.dtype(ONNX_TYPES[inp.type])
        self.input_quant = self.output_quant = (0.0, 0)
        self._y: np.ndarray | None = None

    def invoke(self, x: np.ndarray) -> None:
        self._y = self._session.run(None, {self._name: x})[0]

    def output(self) -> np.ndarray:
        if self._y is None:
            raise RuntimeError("output() before invoke()")
        return self._y


def load(path: str):
    return OnnxModel(path) if path.endswith(".onnx") else TfliteModel(path)


def prepare(model, sample: np.ndarray) -> np.ndarray:
    """One sample -> the model's input tensor: reshaped, and quantized if it is float and the input is not."""
    x = np.asarray(sample).reshape(model.input_shape)
    scale, zero_point = model.input_quant
    if scale and x.dtype.kind == "f" and model.input_dtype.kind in "iu":
        limits = np.iinfo(model.input_dtype)
        x = np.clip(np.round(x.astype(np.float32) / np.float32(scale)) + zero_point, limits.min, limits.max)
    return x.astype(model.input_dtype, copy=False)


def scores(model, y: np.ndarray) -> list[float]:
    scale, zero_point = model.output_quant
    if scale:
        y = np.float32(scale) * (y.astype(np.int32) - zero_point)
    return [float(v) for v in np.asarray(y, dtype=np.float32).reshape(-1)]


def sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def peak_rss_kib() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux


def board_model() -> str:
    for path in ("/proc/device-tree/model", "/sys/firmware/devicetree/base/model"):
        try:
            return Path(path).read_bytes().rstrip(b"\0").decode(errors="replace")
        except OSError:
            pass
    return platform.machine()


def input_sha256(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    return hashlib.sha256(f"{a.dtype.str}{a.shape}".encode() + a.tobytes()).hexdigest()


def cold_start(path: str, inputs: np.ndarray, first: np.ndarray, count: int, warmup: int):
    """Load the model and run its first inference (on `first`); the start record says how long each took.
    Returns the model, when that inference ended and how long it took."""
    t0 = time.perf_counter_ns()
    model = load(path)
    t1 = time.perf_counter_ns()
    model.invoke(prepare(model, first))
    t2 = time.perf_counter_ns()
    emit(
        {
            "type": "start",
            "protocol": PROTOCOL,
            "t0_ns": T0_NS,
            "t_ns": t1,
            "count": count,
            "warmup": warmup,
            "outputs": len(scores(model, model.output())),
            "model_sha256": sha256(path),
            "input_sha256": input_sha256(inputs),
            "runtime": model.runtime,
            "runtime_version": model.runtime_version,
            "load_ms": (t1 - t0) / 1e6,
            "cold_start_ms": (t2 - t0) / 1e6,
            "first_latency_ns": t2 - t1,
        }
    )
    return model, t2, t2 - t1


def timed(path: str, sample: np.ndarray, count: int, warmup: int) -> None:
    model, _, _ = cold_start(path, sample, sample, count, warmup)
    x = prepare(model, sample)
    for _ in range(warmup):
        model.invoke(x)
    for i in range(count):
        t0 = time.perf_counter_ns()
        model.invoke(x)
        t1 = time.perf_counter_ns()
        emit_line(
            b'{"type":"inference","i":%d,"t_ns":%d,"latency_ns":%d}' % (i, t1, t1 - t0)
        )  # json costs more
    emit(
        {
            "type": "end",
            "count": count,
            "t_ns": time.perf_counter_ns(),
            "peak_rss_kib": peak_rss_kib(),
            "output": scores(model, model.output()),
        }
    )


def classify(path: str, samples: np.ndarray) -> None:
    model, first_end_ns, first_ns = cold_start(path, samples, samples[0], len(samples), 0)
    emit(
        {
            "type": "inference",
            "i": 0,
            "t_ns": first_end_ns,
            "latency_ns": first_ns,
            "output": scores(model, model.output()),
        }
    )
    for i in range(1, len(samples)):
        x = prepare(model, samples[i])
        t0 = time.perf_counter_ns()
        model.invoke(x)
        t1 = time.perf_counter_ns()
        emit(
            {
                "type": "inference",
                "i": i,
                "t_ns": t1,
                "latency_ns": t1 - t0,
                "output": scores(model, model.output()),
            }
        )
    emit(
        {"type": "end", "count": len(samples), "t_ns": time.perf_counter_ns(), "peak_rss_kib": peak_rss_kib()}
    )


def info(path: str) -> None:
    model = load(path)
    emit(
        {
            "type": "info",
            "protocol": PROTOCOL,
            "hostname": platform.node(),
            "board_model": board_model(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "runtime": model.runtime,
            "runtime_version": model.runtime_version,
            "model_sha256": sha256(path),
        }
    )


def stdin_array() -> np.ndarray:
    return np.load(io.BytesIO(sys.stdin.buffer.read()), allow_pickle=False)


def npz_array(path: str, key: str) -> np.ndarray:
    with np.load(path, allow_pickle=False) as data:
        return data[key]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info").add_argument("model")
    p = sub.add_parser("timed")
    p.add_argument("model")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--warmup", type=int, default=0)
    p = sub.add_parser("classify")
    p.add_argument("model")
    p.add_argument("--dataset", help=".npz file; without it, a .npy array is read from stdin")
    p.add_argument("--key", default="x_test")
    args = parser.parse_args(argv)
    own_stdout()
    if args.command == "info":
        info(args.model)
    elif args.command == "timed":
        timed(args.model, stdin_array(), args.count, args.warmup)
    else:
        classify(args.model, npz_array(args.dataset, args.key) if args.dataset else stdin_array())


if __name__ == "__main__":
    main()
