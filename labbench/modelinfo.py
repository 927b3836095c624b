"""What a .tflite model is, read from its flatbuffer: tensors, ops, MACs, weight bytes, TFLM arena.

Pure data: reads the file with the TFLite schema module shipped in ai-edge-litert and numpy, and
imports nothing of the bench but its errors, so drivers, sims and reports can all build on it.
`min_arena_bytes` is the one function that runs the model (TFLite Micro, in child processes).

MACs are multiply-accumulates of the ops that do dense arithmetic, counted from tensor shapes
(batch included), as MLPerf Tiny and the usual model zoos count them:

- CONV_2D: out_elements x kernel_h x kernel_w x in_channels_per_group
- DEPTHWISE_CONV_2D: out_elements x kernel_h x kernel_w
- FULLY_CONNECTED: out_elements x in_features
- TRANSPOSE_CONV: in_elements x kernel_h x kernel_w x out_channels
- BATCH_MATMUL: out_elements x reduced dimension

Element-wise ops (ADD, MUL, activations), pooling, SOFTMAX, RESHAPE and (de)quantization are not
counted; their cost is small next to the above and the published MLPerf Tiny counts leave them out.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from ai_edge_litert import schema_py_generated as schema

from labbench.errors import LabbenchError

ARENA_ALIGN_BYTES = 16  # TFLM aligns arena allocations to 16 bytes; the bisection's granularity
_OP_NAMES: dict[int, str] = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
_TYPE_NAMES: dict[int, str] = {
    v: k.lower() for k, v in vars(schema.TensorType).items() if not k.startswith("_")
}


class ModelError(LabbenchError):
    """Bytes that are not a TFLite model, or a model TFLite Micro cannot run in the arena allowed."""


@dataclass(frozen=True)
class TensorInfo:
    """A graph input or output. `scale`/`zero_point` are None for a tensor that is not quantized."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name: "int8", "float32", ...
    scale: float | None = None
    zero_point: int | None = None

    @property
    def quantized(self) -> bool:
        return self.scale is not None

    def quantization(self) -> tuple[float, int]:
        """(scale, zero point) of a quantized tensor; a ValueError for one that is not."""
        if self.scale is None or self.zero_point is None:
            raise ValueError(f"tensor {self.name!r} is not quantized: it has no scale and zero point")
        return self.scale, self.zero_point

    @property
    def size_bytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class ModelInfo:
    """Facts about one .tflite model (first subgraph), read without running it.

    `name` is the file's stem (`from_file`), the name given, or "model-<first 12 hex of sha256>".
    """

    name: str
    sha256: str
    size_bytes: int
    description: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    ops: tuple[str, ...]  # builtin op names in execution order
    macs: int
    weights_bytes: int  # bytes of constant tensors (weights, biases, tables)
    macs_by_op: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> ModelInfo:
        path = Path(path)
        return cls.from_bytes(path.read_bytes(), name=path.stem)

    @classmethod
    def from_bytes(cls, model: bytes, name: str | None = None) -> ModelInfo:
        model = bytes(model)
        digest = hashlib.sha256(model).hexdigest()
        label = name or f"model-{digest[:12]}"
        if len(model) < 8 or model[4:8] != b"TFL3":
            raise ModelError(f"{label}: not a TFLite flatbuffer (no TFL3 identifier)")
        try:
            return cls._parse(model, digest, name, label)
        except (IndexError, ValueError, struct.error, UnicodeError) as e:  # offsets out of range
            raise ModelError(f"{label}: malformed TFLite flatbuffer: {e}") from e

    @classmethod
    def _parse(cls, model: bytes, digest: str, name: str | None, label: str) -> ModelInfo:
        m = schema.Model.GetRootAs(model, 0)
        if m.SubgraphsLength() < 1:
            raise ModelError(f"{label}: model has no subgraph")
        g = m.Subgraphs(0)
        codes = [_op_name(m.OperatorCodes(i)) for i in range(m.OperatorCodesLength())]
        tensors = [g.Tensors(i) for i in range(g.TensorsLength())]
        ops: list[str] = []
        macs_by_op: dict[str, int] = {}
        for i in range(g.OperatorsLength()):
            op = g.Operators(i)
            kind = codes[op.OpcodeIndex()]
            ops.append(kind)
            macs = _macs(kind, op, tensors)
            if macs:
                macs_by_op[kind] = macs_by_op.get(kind, 0) + macs
        description = (m.Description() or b"").decode(errors="replace")
        return cls(
            name=label,
            sha256=digest,
            size_bytes=len(model),
            description=description,
            inputs=tuple(_tensor_info(tensors[i]) for i in g.InputsAsNumpy()),
            outputs=tuple(_tensor_info(tensors[i]) for i in g.OutputsAsNumpy()),
            ops=tuple(ops),
            macs=sum(macs_by_op.values()),
            weights_bytes=_weights_bytes(m, tensors),
            macs_by_op=macs_by_op,
        )


def _op_name(code: schema.OperatorCode) -> str:
    # Builtin codes above 127 live only in BuiltinCode; older files only fill DeprecatedBuiltinCode.
    op = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
    if op == schema.BuiltinOperator.CUSTOM:
        return f"CUSTOM:{(code.CustomCode() or b'').decode()}"
    return _OP_NAMES.get(op, f"BUILTIN_{op}")


def _shape(t: schema.Tensor) -> tuple[int, ...]:
    return tuple(int(d) for d in t.ShapeAsNumpy()) if t.ShapeLength() else ()


def _tensor_info(t: schema.Tensor) -> TensorInfo:
    q = t.Quantization()
    scale = zero_point = None
    if q is not None and q.ScaleLength() > 0:
        scale = float(q.Scale(0))
        zero_point = int(q.ZeroPoint(0)) if q.ZeroPointLength() else 0
    return TensorInfo(
        name=(t.Name() or b"").decode(errors="replace"),
        shape=_shape(t),
        dtype=_TYPE_NAMES.get(t.Type(), f"type{t.Type()}"),
        scale=scale,
        zero_point=zero_point,
    )


_MAC_OPS = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV", "BATCH_MATMUL"}


def _macs(kind: str, op: schema.Operator, tensors: list[schema.Tensor]) -> int:
    """MACs of one operator (see the module docstring); 0 for ops that are not counted."""
    if kind not in _MAC_OPS:
        return 0

    def shape(pos: int, outputs: bool = False) -> tuple[int, ...]:
        idx = op.Outputs(pos) if outputs else op.Inputs(pos)
        return _shape(tensors[idx])

    out = int(np.prod(shape(0, outputs=True)))
    if kind == "CONV_2D":
        _, kh, kw, cin_per_group = shape(1)
        return out * kh * kw * cin_per_group
    if kind == "DEPTHWISE_CONV_2D":
        _, kh, kw, _ = shape(1)
        return out * kh * kw
    if kind == "FULLY_CONNECTED":
        return out * shape(1)[-1]
    if kind == "TRANSPOSE_CONV":
        cout, kh, kw, _ = shape(1)
        return int(np.prod(shape(2))) * kh * kw * cout
    a = shape(0)  # BATCH_MATMUL: A [..., m, k] (or [..., k, m] with adj_x) times B [..., k, n]
    opts = op.BuiltinOptions()
    adj_x = False
    if opts is not None:
        bm = schema.BatchMatMulOptions()
        bm.Init(opts.Bytes, opts.Pos)
        adj_x = bool(bm.AdjX())
    return out * (a[-2] if adj_x else a[-1])


def _weights_bytes(m: schema.Model, tensors: list[schema.Tensor]) -> int:
    buffers = {t.Buffer() for t in tensors if t.Buffer() > 0}
    total = 0
    for b in buffers:
        buf = m.Buffers(b)
        total += buf.DataLength() or int(buf.Size())  # Size(): data stored outside the flatbuffer
    return total


# ---------------------------------------------------------------- int8 I/O


def quantize_input(info: ModelInfo, x_float: npt.ArrayLike, index: int = 0) -> np.ndarray:
    """Float values -> the model's input dtype (scale/zero point, rounded, saturated); shape kept.

    A float model's input passes through as float32.
    """
    t = info.inputs[index]
    x = np.asarray(x_float, dtype=np.float32)
    if not t.quantized:
        return x.astype(t.dtype, copy=False)
    scale, zero_point = t.quantization()
    dtype = np.dtype(t.dtype)
    limits = np.iinfo(dtype)
    q = np.round(x / np.float32(scale)) + zero_point
    quantized: np.ndarray = np.clip(q, limits.min, limits.max).astype(dtype)
    return quantized


def dequantize_output(info: ModelInfo, y: npt.ArrayLike, index: int = 0) -> np.ndarray:
    """The model's output values -> float32 (scale * (y - zero_point)); float outputs pass through."""
    t = info.outputs[index]
    y = np.asarray(y)
    if not t.quantized:
        return y.astype(np.float32, copy=False)
    scale, zero_point = t.quantization()
    return (np.float32(scale) * (y.astype(np.int32) - zero_point)).astype(np.float32)


# ---------------------------------------------------------------- MLPerf Tiny reference models


@dataclass(frozen=True)
class MlperfModel:
    """An MLPerf Tiny reference model as its reference firmware (mlcommons/tiny
    benchmark/reference_submissions/*/submitter_implemented.cpp) reports it and takes its input.

    `input` is the format of the `db` bytes, which is the runner's dataset file format
    (benchmark/evaluation/datasets/README.md); docs/mlperf-interop.md lists the reference files each
    entry was checked against:
    - "uint8-128": one uint8 per element; th_load_tensor subtracts 128 (IC, VWW: u8 RGB images; the
      VWW port does `int8 -= 128` on the same bytes, the same wrap);
    - "int8": the int8 input tensor's bytes (KWS: int8 MFCC features);
    - "float32": little-endian float32 per element; th_load_tensor quantizes each with the input
      tensor's scale and zero point, round() then clamped (AD: spectrogram windows).
    `output` is what `m-results-[...]` holds: "outputs" (every output, dequantized) or "mse" (AD:
    one value, the mean squared error of the dequantized reconstruction against the float input).
    `input_scale`/`input_zero_point` are the model's input quantization (int8 -> float32 for AD).
    """

    id: str  # what `profile%` reports: m-model-[<id>]
    file: str  # the reference .tflite, from mlcommons/tiny benchmark/training/*/trained_models/
    sha256: str
    input: str
    output: str
    input_scale: float
    input_zero_point: int

    @property
    def wire_dtype(self) -> np.dtype:
        return np.dtype({"uint8-128": "u1", "int8": "i1", "float32": "<f4"}[self.input])

    def wire_bytes(self, tensor: TensorInfo) -> int:
        """Bytes of `db` input for the model's input tensor `tensor`."""
        return int(np.prod(tensor.shape)) * self.wire_dtype.itemsize

    def encode(self, sample: npt.ArrayLike) -> bytes:
        """The `db` bytes for `sample`: values in the runner's format (uint8 for IC/VWW, float32 for
        AD) pass as they are; int8 input tensor values are converted to it (+128; dequantized)."""
        x = np.asarray(sample)
        if x.dtype == self.wire_dtype:
            return np.ascontiguousarray(x).tobytes()
        if x.dtype != np.int8:
            raise TypeError(
                f"{self.id} takes {self.wire_dtype.name} values (the MLPerf Tiny runner's "
                f"format) or int8 input tensor values, got {x.dtype}"
            )
        if self.input == "uint8-128":
            return (x.view(np.uint8) ^ 0x80).tobytes()
        deq = np.float32(self.input_scale) * (x.astype(np.float32) - np.float32(self.input_zero_point))
        return deq.astype(self.wire_dtype).tobytes()

    def decode(self, data: bytes, tensor: TensorInfo) -> np.ndarray:
        """The input tensor the reference firmware's th_load_tensor makes of the `db` bytes."""
        x = np.frombuffer(data, self.wire_dtype, int(np.prod(tensor.shape)))
        if self.input == "uint8-128":
            return (x ^ 0x80).view(np.int8).reshape(tensor.shape)
        if self.input == "int8":
            return x.reshape(tensor.shape)
        return quantize_like_firmware(x, *tensor.quantization()).reshape(tensor.shape)

    def results(self, outputs: np.ndarray, data: bytes) -> np.ndarray:
        """What `m-results-[...]` reports, from the dequantized outputs and the `db` bytes."""
        if self.output == "outputs":
            return outputs
        x = np.frombuffer(data, "<f4", outputs.size).astype(np.float32)
        diff = outputs.astype(np.float32).ravel() - x
        squares = (diff * diff).astype(np.float32)
        return np.add.accumulate(squares, dtype=np.float32)[-1:] / np.float32(squares.size)  # in order, as C


def quantize_like_firmware(x: npt.ArrayLike, scale: float, zero_point: int) -> np.ndarray:
    """int8 of float32 values as the reference's QuantizeFloatToInt8 and the firmware core compute
    them: round(x / scale) (float32 division, halves away from zero) + zero point, clamped; a NaN
    quantizes to the zero point."""
    q = (np.asarray(x, np.float32) / np.float32(scale)).astype(np.float64)
    q = np.clip(np.nan_to_num(q, nan=0.0), -1e6, 1e6)
    q = np.trunc(np.where(q >= 0, q + 0.5, q - 0.5)) + zero_point
    return np.clip(q, -128, 127).astype(np.int8)


#: the four MLPerf Tiny reference models, by ID (sha256 of the files in ../shared/workloads/mlperf_tiny/)
MLPERF_TINY: dict[str, MlperfModel] = {
    m.id: m
    for m in (
        MlperfModel(
            "ic01",
            "pretrainedResnet_quant.tflite",
            "3c002613d1b2475eb51dd78dfb85a546c8ae658dee71cf6ade43b022fe205415",
            "uint8-128",
            "outputs",
            1.0,
            -128,
        ),
        MlperfModel(
            "kws01",
            "kws_ref_model.tflite",
            "aeea436800704fce17b17292e4412630ad856e9d777c044c64ef748a880bd0ae",
            "int8",
            "outputs",
            0.5847029089927673,
            83,
        ),
        MlperfModel(
            "vww01",
            "vww_96_int8.tflite",
            "597a384c8c2c8a1276f04702f25013b7838f2f814f1ca7c174d295b73e3d6b7b",
            "uint8-128",
            "outputs",
            0.003921568859368563,
            -128,
        ),
        MlperfModel(
            "ad01",
            "ad01_int8.tflite",
            "87cf24194ef93d1d9b11a591d805526b98008e351655d29883c825c9c106ba24",
            "float32",
            "mse",
            0.3910152316093445,
            89,
        ),
    )
}


def mlperf_model(sha256: str | None = None, name: str | None = None) -> MlperfModel | None:
    """The reference model with this sha256; else the one whose ID is `name` (a firmware built with
    another model that declares itself, say, ic01 takes ic01's input); else None."""
    by_sha = next((m for m in MLPERF_TINY.values() if m.sha256 == sha256), None)
    return by_sha or MLPERF_TINY.get(name or "")


# ---------------------------------------------------------------- TFLM arena

# Runs in a child process: an arena just below the minimum can SIGABRT the interpreter instead of
# raising, so each probe is announced ("try N") before it is made; a child that dies leaves its
# last "try" unanswered, which the parent records as a failure before starting a new child.
_PROBE = r"""
import sys
import numpy as np
from tflite_micro import runtime
path, lo, hi, hi_ok, n_inputs, step, cap = sys.argv[1], *map(int, sys.argv[2:])

def fits(n):
    print("try", n, flush=True)
    try:
        it = runtime.Interpreter.from_file(path, arena_size=n)
        for i in range(n_inputs):
            d = it.get_input_details(i)
            it.set_input(np.zeros(d["shape"], d["dtype"]), i)
        it.invoke()
    except Exception as e:
        print("fail", n, " ".join(str(e).split())[:300], flush=True)
        return False
    print("ok", n, flush=True)
    return True

while not hi_ok:
    if fits(hi):
        hi_ok = True
    elif hi >= cap:
        print("toolarge", flush=True)
        sys.exit(0)
    else:
        lo, hi = hi, min(2 * hi, cap)
while hi - lo > step:
    mid = (lo + hi) // 2 // step * step
    if mid <= lo:
        mid = lo + step
    if fits(mid):
        hi = mid
    else:
        lo = mid
print("done", hi, flush=True)
"""


def _cache_file() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "labbench" / "tflm_arena.json"


def _tflm_version() -> str:
    from importlib.metadata import version

    return version("tflite-micro")


def min_arena_bytes(
    model: str | os.PathLike[str] | bytes,
    cache: Path | None = None,
    cap_bytes: int = 64 << 20,
    timeout_s: float = 300.0,
) -> int:
    """The smallest TFLite Micro arena (bytes, 16-byte steps) in which the model allocates and runs.

    `model` is a .tflite path or its bytes. Bisected in child processes (see `_PROBE`) and cached
    by model sha256 and tflite-micro version in `cache` (default ~/.cache/labbench/tflm_arena.json).
    Raises ModelError when TFLite Micro cannot run the model in `cap_bytes`.
    """
    if isinstance(model, (bytes, bytearray, memoryview)):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.tflite"
            path.write_bytes(model)
            return min_arena_bytes(path, cache, cap_bytes, timeout_s)
    path = Path(model)
    info = ModelInfo.from_file(path)
    cache = cache or _cache_file()
    key = f"{info.sha256}:tflite-micro=={_tflm_version()}"
    known = _read_cache(cache).get(key)
    if isinstance(known, int):
        return known

    step = ARENA_ALIGN_BYTES
    lo, hi, hi_ok = 0, min(cap_bytes, max(4096, -(-2 * info.size_bytes // step) * step)), False
    last_error = ""
    for _ in range(32):  # one child per round; a round ends early only when a probe crashes the child
        args = [
            str(path),
            str(lo),
            str(hi),
            str(int(hi_ok)),
            str(len(info.inputs)),
            str(step),
            str(cap_bytes),
        ]
        proc = subprocess.run(
            [sys.executable, "-c", _PROBE, *args],
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        pending = None
        for line in proc.stdout.split("\n"):
            word, value, why = (line.split(" ", 2) + ["", ""])[:3]
            if word == "try":
                pending = int(value)
            elif word == "ok":
                hi, hi_ok, pending = int(value), True, None
            elif word == "fail":
                lo, pending, last_error = int(value), None, why
            elif word == "toolarge":
                raise ModelError(
                    f"{path.name}: TFLite Micro cannot run it in {cap_bytes} bytes of arena: {last_error}"
                )
            elif word == "done":
                _write_cache(cache, key, int(value))
                return int(value)
        if pending is None:  # the child died before probing anything: TFLM cannot load the model
            raise ModelError(
                f"{path.name}: TFLite Micro arena probe failed "
                f"(exit {proc.returncode}): {proc.stderr.strip()[-500:]}"
            )
        lo = pending  # the probe that crashed the child was too small
        if not hi_ok and lo >= hi:
            if hi >= cap_bytes:
                raise ModelError(
                    f"{path.name}: TFLite Micro cannot run it in {cap_bytes} bytes "
                    f"of arena: the probe crashed"
                )
            hi = min(2 * hi, cap_bytes)
    raise ModelError(f"{path.name}: TFLite Micro arena probe did not converge")


def _read_cache(cache: Path) -> dict[str, Any]:
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def _write_cache(cache: Path, key: str, arena_bytes: int) -> None:
    known = _read_cache(cache)  # re-read: another process may have added entries meanwhile
    known[key] = arena_bytes
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(known, indent=1, sort_keys=True))
    os.replace(tmp, cache)  # atomic: concurrent readers see the old or the new file, never half
