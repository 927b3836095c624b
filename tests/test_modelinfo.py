"""labbench.modelinfo against the real runtimes (LiteRT, TFLite Micro) and published MAC counts."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter
from tflite_micro import runtime

from labbench.modelinfo import (
    ModelError,
    ModelInfo,
    dequantize_output,
    min_arena_bytes,
    quantize_input,
)

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "fixtures" / "models"
DIGITS_INT8 = MODELS / "digits_mlp_int8.tflite"
MLPERF = REPO.parent / "shared" / "workloads" / "mlperf_tiny"

# MAC counts published for these exact MLPerf Tiny reference model files by Silicon Labs' MLTK
# (`mltk summarize --tflite`, in the docstrings of mltk/models/tinyml/image_classification.py,
# keyword_spotting.py, visual_wake_words.py and anomaly_detection.py): "Total MACs: 12.502 M",
# "2.657 M", "7.490 M" and "264.192 k". ResNet-8's is the 12.5 M usually quoted for MLPerf Tiny.
PUBLISHED_MACS = {
    "pretrainedResnet_quant.tflite": 12.502e6,
    "kws_ref_model.tflite": 2.657e6,
    "vww_96_int8.tflite": 7.490e6,
    "ad01_int8.tflite": 264.192e3,
}


def mlperf(name: str) -> Path:
    path = MLPERF / name
    if not path.is_file():
        pytest.skip("../shared/workloads/mlperf_tiny is absent")
    return path


def test_digits_int8_facts_come_from_the_graph():
    info = ModelInfo.from_file(DIGITS_INT8)
    blob = DIGITS_INT8.read_bytes()
    assert info.name == "digits_mlp_int8"
    assert info.sha256 == hashlib.sha256(blob).hexdigest()
    assert info.size_bytes == len(blob)
    assert info.ops == ("FULLY_CONNECTED", "FULLY_CONNECTED", "SOFTMAX")
    assert info.macs == 64 * 32 + 32 * 10
    assert info.macs_by_op == {"FULLY_CONNECTED": 64 * 32 + 32 * 10}
    # int8 weights and int32 biases of both layers
    assert info.weights_bytes == (64 * 32 + 32 * 4) + (32 * 10 + 10 * 4)
    (inp,), (out,) = info.inputs, info.outputs
    assert (inp.shape, inp.dtype, inp.zero_point) == ((1, 64), "int8", -128)
    assert inp.scale == pytest.approx(1 / 255)
    assert (out.shape, out.dtype, out.scale, out.zero_point) == ((1, 10), "int8", 1 / 256, -128)
    assert inp.size_bytes == 64 and out.size_bytes == 10


def test_float_model_has_unquantized_io():
    info = ModelInfo.from_file(MODELS / "digits_mlp_fp32.tflite")
    (inp,), (out,) = info.inputs, info.outputs
    assert (inp.dtype, inp.quantized, out.dtype, out.quantized) == ("float32", False, "float32", False)
    assert info.weights_bytes == 4 * (64 * 32 + 32 + 32 * 10 + 10)


def _models() -> list[Path]:
    return sorted(MODELS.glob("*.tflite")) + [MLPERF / name for name in PUBLISHED_MACS]


@pytest.mark.parametrize("path", _models(), ids=lambda p: p.stem)
def test_io_details_agree_with_litert(path):
    if not path.is_file():
        pytest.skip("../shared/workloads/mlperf_tiny is absent")
    info = ModelInfo.from_file(path)
    it = Interpreter(model_path=str(path))
    for mine, theirs in [
        *zip(info.inputs, it.get_input_details(), strict=True),
        *zip(info.outputs, it.get_output_details(), strict=True),
    ]:
        assert mine.shape == tuple(theirs["shape"])
        assert np.dtype(mine.dtype) == theirs["dtype"]
        scale, zero_point = theirs["quantization"]
        assert (mine.scale or 0.0) == pytest.approx(scale)
        assert (mine.zero_point or 0) == zero_point
    assert len(info.inputs) == len(it.get_input_details())
    assert len(info.outputs) == len(it.get_output_details())


@pytest.mark.parametrize("name", PUBLISHED_MACS)
def test_mlperf_tiny_macs_match_the_published_counts(name):
    info = ModelInfo.from_file(mlperf(name))
    assert abs(info.macs - PUBLISHED_MACS[name]) / PUBLISHED_MACS[name] < 0.01
    assert info.macs == sum(info.macs_by_op.values())


def test_kws_counts_depthwise_and_pointwise_but_not_pooling():
    info = ModelInfo.from_file(mlperf("kws_ref_model.tflite"))
    assert set(info.macs_by_op) == {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"}
    assert "AVERAGE_POOL_2D" in info.ops
    # first conv: 25x5x64 outputs, 10x4 kernel on 1 channel; four depthwise 3x3 over 25x5x64
    assert info.macs_by_op["DEPTHWISE_CONV_2D"] == 4 * 25 * 5 * 64 * 9
    assert info.macs_by_op["FULLY_CONNECTED"] == 64 * 12


@pytest.mark.parametrize(
    "blob",
    [b"", b"TFL3", b"\x00" * 64, b"\x18\x00\x00\x00TFL3" + b"\x00" * 8],
    ids=["empty", "short", "zeros", "no-subgraph"],
)
def test_not_a_model_raises_model_error(blob):
    with pytest.raises(ModelError):
        ModelInfo.from_bytes(blob, name="junk")


def test_quantize_dequantize_round_trip():
    info = ModelInfo.from_file(DIGITS_INT8)
    inp = info.inputs[0]
    x = np.random.default_rng(0).random((50, 64), dtype=np.float32)
    q = quantize_input(info, x)
    assert q.dtype == np.int8 and q.shape == x.shape
    back = inp.scale * (q.astype(np.float32) - inp.zero_point)
    assert np.max(np.abs(back - x)) <= inp.scale / 2 + 1e-7
    assert quantize_input(info, [[-1.0, 0.0, 1.0, 5.0]]).tolist() == [[-128, -128, 127, 127]]


def test_dequantized_softmax_output_is_a_distribution():
    info = ModelInfo.from_file(DIGITS_INT8)
    with np.load(REPO / "fixtures" / "datasets" / "digits.npz") as d:
        x = d["x_test"][:20]
    it = runtime.Interpreter.from_file(str(DIGITS_INT8))
    for sample in quantize_input(info, x):
        it.set_input(sample[None], 0)
        it.invoke()
        p = dequantize_output(info, it.get_output(0))
        assert p.dtype == np.float32
        assert p.min() >= 0 and abs(p.sum() - 1) <= 10 / 256


def test_float_models_pass_through():
    info = ModelInfo.from_file(MODELS / "digits_mlp_fp32.tflite")
    x = np.linspace(-1, 2, 64, dtype=np.float64).reshape(1, 64)
    q = quantize_input(info, x)
    assert q.dtype == np.float32 and np.array_equal(q, x.astype(np.float32))
    assert np.array_equal(dequantize_output(info, q), q)


def _tflm_runs(path: Path, arena_bytes: int) -> bool:
    """Whether TFLM allocates and invokes the model in `arena_bytes`; in a child, since too small
    an arena can abort the process instead of raising."""
    code = (
        "import sys; from tflite_micro import runtime; "
        "runtime.Interpreter.from_file(sys.argv[1], arena_size=int(sys.argv[2])).invoke()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(path), str(arena_bytes)], capture_output=True, timeout=60
    )
    return proc.returncode == 0


def test_min_arena_is_the_smallest_that_runs_and_is_cached(tmp_path):
    cache = tmp_path / "arena.json"
    arena = min_arena_bytes(DIGITS_INT8, cache=cache)
    assert arena % 16 == 0
    assert _tflm_runs(DIGITS_INT8, arena)
    # For this model the size 16 bytes below aborts TFLM (SIGABRT), so this also checks that the
    # bisection survives a probe that kills its child.
    assert not _tflm_runs(DIGITS_INT8, arena - 16)
    manifest = json.loads((REPO / "fixtures" / "manifest.json").read_text())
    assert arena == manifest["models"]["digits_mlp_int8"]["arena_bytes"]
    (key,) = json.loads(cache.read_text())
    assert key.startswith(ModelInfo.from_file(DIGITS_INT8).sha256)
    assert min_arena_bytes(DIGITS_INT8.read_bytes(), cache=cache) == arena


def test_min_arena_on_mlperf_model(tmp_path):
    path = mlperf("kws_ref_model.tflite")
    arena = min_arena_bytes(path, cache=tmp_path / "arena.json")
    assert _tflm_runs(path, arena) and not _tflm_runs(path, arena - 16)


def test_min_arena_above_the_cap_raises(tmp_path):
    with pytest.raises(ModelError, match="1024 bytes"):
        min_arena_bytes(DIGITS_INT8, cache=tmp_path / "arena.json", cap_bytes=1024)
    assert not (tmp_path / "arena.json").exists()


def _one_op_model(
    code: int, options_type: int, options, shapes: list, n_inputs: int, consts: dict[int, np.ndarray]
) -> bytes:
    """A float model with one operator: tensors of `shapes`, the first `n_inputs` feed the op, the
    last is its output; tensors listed in `consts` hold constant data."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    buffers, tensors = [schema.BufferT()], []
    for i, shape in enumerate(shapes):
        t = schema.TensorT()
        t.shape, t.type, t.buffer, t.name = list(shape), schema.TensorType.FLOAT32, 0, f"t{i}".encode()
        if i in consts:
            b = schema.BufferT()
            b.data = np.frombuffer(consts[i].tobytes(), np.uint8)
            buffers.append(b)
            t.buffer = len(buffers) - 1
            t.type = schema.TensorType.INT32 if consts[i].dtype == np.int32 else t.type
        tensors.append(t)
    op = schema.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, list(range(n_inputs)), [len(shapes) - 1]
    op.builtinOptionsType, op.builtinOptions = options_type, options
    oc = schema.OperatorCodeT()
    oc.builtinCode, oc.deprecatedBuiltinCode, oc.version = code, min(code, 127), 1
    sg = schema.SubGraphT()
    sg.tensors, sg.operators = tensors, [op]
    sg.inputs = [i for i in range(n_inputs) if i not in consts]
    sg.outputs = [len(shapes) - 1]
    model = schema.ModelT()
    model.version, model.subgraphs, model.buffers, model.operatorCodes = 3, [sg], buffers, [oc]
    fb = flatbuffers.Builder(1024)
    fb.Finish(model.Pack(fb), file_identifier=b"TFL3")
    return bytes(fb.Output())


def _runs_on_litert(blob: bytes) -> None:
    it = Interpreter(model_content=blob)
    it.allocate_tensors()
    it.invoke()


@pytest.mark.parametrize("adj_x", [False, True])
def test_batch_matmul_macs(adj_x):
    from ai_edge_litert import schema_py_generated as schema

    opts = schema.BatchMatMulOptionsT()
    opts.adjX = adj_x
    a = (2, 7, 5) if adj_x else (2, 5, 7)  # m=5, k=7
    blob = _one_op_model(
        schema.BuiltinOperator.BATCH_MATMUL,
        schema.BuiltinOptions.BatchMatMulOptions,
        opts,
        [a, (2, 7, 3), (2, 5, 3)],
        2,
        {},
    )
    _runs_on_litert(blob)
    assert ModelInfo.from_bytes(blob).macs == 2 * 5 * 3 * 7


def test_transpose_conv_macs():
    from ai_edge_litert import schema_py_generated as schema

    opts = schema.TransposeConvOptionsT()
    opts.padding, opts.strideH, opts.strideW = schema.Padding.SAME, 2, 2
    out_shape = np.array([1, 8, 8, 6], np.int32)
    weights = np.zeros((6, 3, 3, 4), np.float32)  # [out_c, kh, kw, in_c]
    blob = _one_op_model(
        schema.BuiltinOperator.TRANSPOSE_CONV,
        schema.BuiltinOptions.TransposeConvOptions,
        opts,
        [(4,), (6, 3, 3, 4), (1, 4, 4, 4), (1, 8, 8, 6)],
        3,
        {0: out_shape, 1: weights},
    )
    _runs_on_litert(blob)
    info = ModelInfo.from_bytes(blob)
    assert info.macs == (4 * 4 * 4) * 3 * 3 * 6
    assert info.weights_bytes == out_shape.nbytes + weights.nbytes
    assert info.name == f"model-{info.sha256[:12]}"
