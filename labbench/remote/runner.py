"""Runs a model on a Linux board and streams what happened, one record per line.

Shipped to the board by the SSH driver and run there with the board's own python3; it needs only
the standard library, numpy and one inference runtime (ai-edge-litert or tflite-runtime for .tflite,
onnxruntime for .onnx), and it never imports labbench.

    python3 runner.py info MODEL
    python3 runner.py timed MODEL --count N --warmup W  < sample.npy
    python3 runner.py classify MODEL [--dataset FILE.npz --key x_test]  (else samples.npy on stdin)
    python3 runner.py hi MODEL --server HOST:PORT --decision JSON [--timeout S]
                         [--dataset FILE.npz --key x_test]  (else samples.npy on stdin)

Output (stdout, written straight to the file descriptor record by record, so a broken connection
loses only what was in flight). Every line is `<JSON> *XXXXXXXX`: XXXXXXXX is the CRC-32
(zlib.crc32) of the JSON text, in upper-case hex, as in the MCU firmware's reply CRC. Stamps (`*_ns`)
are the board's time.perf_counter_ns() (CLOCK_MONOTONIC):

    {"type":"start","protocol":3,"t0_ns":...,"t_ns":...,"count":N,"warmup":W,"outputs":K,
     "model_sha256":...,"input_sha256":...,"runtime":...,"runtime_version":...,
     "load_ms":...,"cold_start_ms":...,"first_latency_ns":...}
    {"type":"inference","i":0,"t_ns":...,"latency_ns":5120}           (timed)
    {"type":"inference","i":0,"t_ns":...,"latency_ns":5120,"output":[K values]}   (classify)
    {"type":"hi","i":0,"p1":...,"p2":...,"accept":true,"local":3,"final":3,
     "t_inf_ns":...,"t_dec_ns":...,"t_off_ns":0,"server_us":0,"t_ns":...}              (hi)
    {"type":"progress","i":N,"t_ns":...}                          (hi: N samples done; once a second)
    {"type":"error","i":7,"server":"HOST:PORT","what":...}                            (hi: offload failed)
    {"type":"end","count":N,"t_ns":...,"peak_rss_kib":...,"output":[K values]}   (output: timed only)

`t0_ns` is the runner's first stamp, `t_ns` of the start record when the model was loaded (before its
first inference), of an inference when it ended, of the end record when it was written. `count` is
the inferences asked for (timed) or the samples received (classify); `input_sha256` is the sha256 of
the input array's dtype string, shape and bytes (`f"{dtype.str}{shape}"` + C-order bytes);
`outputs` the length of the model's output. classify's inference 0 is the cold start's inference.
`info` prints one `{"type":"info",...}` record, tagged the same way.

hi (hierarchical inference, seed 004 §2): the start record also echoes `decision` (the JSON given) and
`server` ("HOST:PORT"). For each sample: the local inference (`t_inf_ns`, the model's invoke), then
the decision (`t_dec_ns`: probabilities, the two highest p1 >= p2, the rule), then, for a sample not
accepted, its offload (`t_off_ns`: request sent to reply checked) over one TCP connection to the edge
server, opened before the first sample and re-opened once if it dropped. The request is
labbench.edge.server's LBQ1 frame (request id counting from 1, CRC-32) carrying the model's input
tensor as the model takes it (quantized as below, C order, little-endian); the LBR1 reply must echo the
id, pass its CRC, say ok and name a class of the model's. `server_us` is the reply's own server time.
Outputs become probabilities as labbench.strategies.decision.to_probabilities does for a row: as they
are if they are one (each in [0, 1], summing to 1 within 0.05), else their softmax. Decisions:
`{"kind":"logistic","w1":..,"w2":..,"b":..}` accepts when w1*p1 + w2*p2 + b >= 0,
`{"kind":"threshold","theta":..}` when p1 >= theta, `{"kind":"remote"}` never: no local inference, so
p1 = p2 = 0, local = -1 and t_inf_ns = t_dec_ns = 0. `final` is `local` when accepted, else the server's
class. The stamps are contiguous: a sample began at t_ns - t_inf_ns - t_dec_ns - t_off_ns. An offload
that fails (refused, garbled, no reply within `--timeout` seconds for both attempts together) is an
error record naming the sample, and the runner exits with status 3.
A hi pass runs as it would in the field: the inputs are prepared before the first sample and the
samples' records are held until the last sample is done (or an offload failed), so that the pass's
time and energy are the strategy's, not the reporting's; a `progress` record once a second (at most)
tells the host the pass is alive. `--settle S` idles S seconds before the first sample and after the
last (still saying so each second): a power meter's guards beside the pass, which are otherwise the
runner's start-up and reporting.

Float inputs are quantized with the model's own input scale and zero point; outputs are
dequantized with its output scale and zero point, so every runtime returns float32 scores.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import platform
import resource
import socket
import struct
import sys
import time
import zlib
from importlib import metadata
from pathlib import Path
from typing import NoReturn

import numpy as np

T0_NS = time.perf_counter_ns()  # the runner's first stamp
PROTOCOL = 3  # bumped when the command line or the line format changes
_out = sys.stdout.fileno()  # main() gives records their own copy of stdout
OFFLOAD_FAILED = 3  # hi's exit status after an error record
HEARTBEAT_NS = 1_000_000_000  # hi: a progress record at least this often while the pass runs
PROBABILITY_SUM_TOLERANCE = 0.05  # labbench.strategies.decision's
DECISION_FIELDS = {"logistic": ("w1", "w2", "b"), "threshold": ("theta",), "remote": ()}
REQUEST = struct.Struct(">4sIII")  # labbench.edge.server's frames
REPLY_HEAD = struct.Struct(">4sIBifIH")
REPLY_CRC = struct.Struct(">I")
REFUSALS = {1: "bad magic", 2: "bad length", 3: "bad CRC", 4: "inference failed"}


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


def cold_start(
    path: str, inputs: np.ndarray, first: np.ndarray, count: int, warmup: int, extra: dict | None = None
):
    """Load the model and run its first inference (on `first`); the start record (with `extra`) says how
    long each took. Returns the model, when that inference ended and how long it took."""
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
        | (extra or {})
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


def probabilities(y: list[float]) -> np.ndarray:
    """One output row -> probabilities: as it is if it is one, else its softmax."""
    p = np.asarray(y, dtype=np.float64)
    if ((p >= 0) & (p <= 1)).all() and abs(p.sum() - 1) <= PROBABILITY_SUM_TOLERANCE:
        return p
    e = np.exp(p - p.max())
    return e / e.sum()


def accepts(decision: dict, p1: float, p2: float) -> bool:
    """Whether the decision keeps the local top-1 (never in remote mode)."""
    if decision["kind"] == "logistic":
        return decision["w1"] * p1 + decision["w2"] * p2 + decision["b"] >= 0
    return decision["kind"] == "threshold" and p1 >= decision["theta"]


class OffloadError(Exception):
    """An offload that failed; the text says what was seen."""


class Dropped(OffloadError):
    """The connection broke: worth one new connection."""


class EdgeConnection:
    """One kept-open TCP connection to the edge server, one request at a time."""

    def __init__(self, host: str, port: int, timeout_s: float, classes: int):
        self.host, self.port, self.timeout_s, self.classes = host, port, timeout_s, classes
        self.next_id = 1
        self.sock: socket.socket | None = None

    def connect(self, deadline: float) -> None:
        self.close()
        self.sock = socket.create_connection((self.host, self.port), timeout=_left(deadline))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def classify(self, payload: bytes) -> tuple[int, int]:
        """The server's class for one input tensor and the server's time (µs); a dropped connection is
        re-opened once, all within the timeout."""
        request_id, self.next_id = self.next_id, (self.next_id + 1) & 0xFFFFFFFF
        request = REQUEST.pack(b"LBQ1", request_id, len(payload), zlib.crc32(payload)) + payload
        try:
            return self._attempts(request, request_id, time.monotonic() + self.timeout_s)
        except OffloadError as exc:
            raise OffloadError(f"request {request_id} ({len(payload)}-byte payload): {exc}") from None

    def _attempts(self, request: bytes, request_id: int, deadline: float) -> tuple[int, int]:
        try:
            return self._exchange(request, request_id, deadline)
        except Dropped as first:
            try:
                self.connect(deadline)
            except OSError as exc:
                raise OffloadError(f"{first}; reconnecting: {_seen(exc)}") from None
            try:
                return self._exchange(request, request_id, deadline)
            except OffloadError as again:
                raise OffloadError(f"{first}; after reconnecting: {again}") from None

    def _exchange(self, request: bytes, request_id: int, deadline: float) -> tuple[int, int]:
        sock = self.sock
        if sock is None:
            raise Dropped("no connection")
        try:
            sock.settimeout(_left(deadline))
            sock.sendall(request)
            head = _read(sock, REPLY_HEAD.size + REPLY_CRC.size, deadline)
            magic, echoed, status, class_index, _, server_us, length = REPLY_HEAD.unpack_from(head)
            if magic != b"LBR1":
                raise OffloadError(f"reply magic {magic!r}, expected b'LBR1'")
            message = _read(sock, length, deadline)
        except TimeoutError:
            raise OffloadError(f"no reply within {self.timeout_s:g} s") from None
        except ConnectionError as exc:
            raise Dropped(f"connection dropped ({_seen(exc)})") from None
        except OSError as exc:
            raise OffloadError(_seen(exc)) from None
        (crc,) = REPLY_CRC.unpack_from(head, REPLY_HEAD.size)
        if (seen := zlib.crc32(head[: REPLY_HEAD.size] + message)) != crc:
            raise OffloadError(f"reply CRC-32 {seen:08X}, its header says {crc:08X}")
        if echoed != request_id:
            raise OffloadError(f"a reply to request {echoed}, expected {request_id}")
        if status:
            why = REFUSALS.get(status, f"unknown status {status}")
            raise OffloadError(f"refused ({why}): {message.decode(errors='replace')}")
        if not 0 <= class_index < self.classes:
            raise OffloadError(f"class {class_index}, expected 0 to {self.classes - 1}")
        return class_index, server_us


def _read(sock: socket.socket, size: int, deadline: float) -> bytes:
    """Exactly `size` bytes, before the deadline."""
    data = bytearray()
    while len(data) < size:
        sock.settimeout(_left(deadline))
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise Dropped(f"connection closed after {len(data)} of {size} reply bytes")
        data += chunk
    return bytes(data)


def _left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 1e-3)


def _seen(exc: OSError) -> str:
    return f"{type(exc).__name__}: {exc.strerror or exc}"


def local_step(model, x: np.ndarray, decision: dict) -> tuple[float, float, int, bool, int, int]:
    """Local inference and decision on one input tensor: p1, p2, local class, accepted, and the board's
    stamps after each."""
    model.invoke(x)
    t1 = time.perf_counter_ns()
    y = scores(model, model.output())
    top = np.sort(probabilities(y))[::-1]
    p1, p2 = float(top[0]), float(top[1])
    accept = accepts(decision, p1, p2)
    return p1, p2, int(np.argmax(y)), accept, t1, time.perf_counter_ns()


def settle(seconds: float, done: int) -> int:
    """Idle `seconds` (a power meter's guard beside the pass), saying so once a second; the stamp after."""
    end = time.perf_counter_ns() + int(seconds * 1e9)
    while (left := end - time.perf_counter_ns()) > 0:
        time.sleep(min(left, HEARTBEAT_NS) / 1e9)
        emit({"type": "progress", "i": done, "t_ns": time.perf_counter_ns()})
    return time.perf_counter_ns()


def hi(
    path: str, samples: np.ndarray, decision: dict, server: tuple[str, int], timeout_s: float, settle_s: float
) -> None:
    """Hierarchical inference of `samples`, offloading to `server` what `decision` does not accept,
    idle `settle_s` before the first sample and after the last."""
    host, port = server
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    model, _, _ = cold_start(
        path, samples, samples[0], len(samples), 0, {"decision": decision, "server": where}
    )
    edge = EdgeConnection(*server, timeout_s, len(scores(model, model.output())))
    try:
        edge.connect(time.monotonic() + timeout_s)
    except OSError as exc:
        offload_failed(0, where, f"connect: {_seen(exc)}")
    inputs = [prepare(model, sample) for sample in samples]
    payloads = [np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("<")).tobytes() for x in inputs]
    held: list[dict] = []
    beat_ns = settle(settle_s, 0)
    for i, (x, payload) in enumerate(zip(inputs, payloads, strict=True)):
        t0 = time.perf_counter_ns()
        if t0 - beat_ns >= HEARTBEAT_NS:
            emit({"type": "progress", "i": i, "t_ns": t0})
            beat_ns = t0 = time.perf_counter_ns()
        if decision["kind"] == "remote":
            p1, p2, local, accept, t1, t2 = 0.0, 0.0, -1, False, t0, t0
        else:
            p1, p2, local, accept, t1, t2 = local_step(model, x, decision)
        final, server_us, t3 = local, 0, t2
        if not accept:
            try:
                final, server_us = edge.classify(payload)
            except OffloadError as exc:
                for record in held:
                    emit(record)
                offload_failed(i, where, str(exc))
            t3 = time.perf_counter_ns()
        held.append(
            {
                "type": "hi",
                "i": i,
                "p1": p1,
                "p2": p2,
                "accept": accept,
                "local": local,
                "final": final,
                "t_inf_ns": t1 - t0,
                "t_dec_ns": t2 - t1,
                "t_off_ns": t3 - t2,
                "server_us": server_us,
                "t_ns": t3,
            }
        )
    edge.close()
    settle(settle_s, len(samples))
    for record in held:
        emit(record)
    emit(
        {"type": "end", "count": len(samples), "t_ns": time.perf_counter_ns(), "peak_rss_kib": peak_rss_kib()}
    )


def offload_failed(i: int, server: str, what: str) -> NoReturn:
    """The error record for sample `i`, then the exit."""
    emit({"type": "error", "i": i, "server": server, "what": what})
    sys.exit(OFFLOAD_FAILED)


def decision_json(text: str) -> dict:
    """--decision: a decision's device form, each coefficient a finite number."""
    d = json.loads(text)
    fields = DECISION_FIELDS.get(str(d.get("kind"))) if isinstance(d, dict) else None
    if fields is None or set(d) != {"kind", *fields}:
        raise ValueError(text)
    if not all(type(d[f]) in (int, float) and math.isfinite(d[f]) for f in fields):
        raise ValueError(text)
    return d


def host_port(text: str) -> tuple[str, int]:
    """--server HOST:PORT (an IPv6 host in brackets)."""
    host, _, port = text.rpartition(":")
    if not host or not 0 < int(port) < 65536:
        raise ValueError(text)
    return host.strip("[]"), int(port)


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
    p = sub.add_parser("hi")
    p.add_argument("model")
    p.add_argument("--server", type=host_port, required=True, help="the edge server, HOST:PORT")
    p.add_argument("--decision", type=decision_json, required=True, help="the decision's JSON form")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds an offload may take, retry included")
    p.add_argument(
        "--settle", type=float, default=0.0, help="seconds idle before the first sample and after the last"
    )
    p.add_argument("--dataset", help=".npz file; without it, a .npy array is read from stdin")
    p.add_argument("--key", default="x_test")
    args = parser.parse_args(argv)
    own_stdout()
    if args.command == "info":
        info(args.model)
    elif args.command == "timed":
        timed(args.model, stdin_array(), args.count, args.warmup)
    elif args.command == "classify":
        classify(args.model, npz_array(args.dataset, args.key) if args.dataset else stdin_array())
    else:
        samples = npz_array(args.dataset, args.key) if args.dataset else stdin_array()
        hi(args.model, samples, args.decision, args.server, args.timeout, args.settle)


if __name__ == "__main__":
    main()
