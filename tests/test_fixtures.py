"""The committed fixtures: files match the manifest, the manifest's numbers are what the runtimes
measure, the four configurations form seed 000's frontier, and the script rebuilds the same bytes."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter, OpResolverType
from tflite_micro import runtime

from labbench.modelinfo import ModelInfo, min_arena_bytes, quantize_input

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
MODELS = MANIFEST["models"]
DATASETS = MANIFEST["datasets"]
CONFIGS = ("fp32", "pruned fp32", "int8", "aggressive int8")
TOTALS = {"digits": 1797, "mnist5k": 5000}  # samples in sklearn's digits and mlxtend's MNIST-5k


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load(dataset: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / DATASETS[dataset]["file"]) as npz:
        return {k: npz[k] for k in npz.files}


def litert_outputs(path: Path, xq: np.ndarray) -> np.ndarray:
    it = Interpreter(model_path=str(path),
                     experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    (inp,), (out,) = it.get_input_details(), it.get_output_details()
    rows = []
    for sample in xq:
        it.set_tensor(inp["index"], sample[None])
        it.invoke()
        rows.append(it.get_tensor(out["index"])[0])
    return np.array(rows)


def tflm_outputs(path: Path, xq: np.ndarray) -> np.ndarray:
    it = runtime.Interpreter.from_file(str(path))
    rows = []
    for sample in xq:
        it.set_input(sample[None], 0)
        it.invoke()
        rows.append(it.get_output(0)[0])
    return np.array(rows)


@pytest.mark.parametrize("entry", [*MODELS.values(), *DATASETS.values()], ids=lambda e: e["file"])
def test_files_match_the_manifest(entry):
    path = FIXTURES / entry["file"]
    assert path.stat().st_size == entry["bytes"]
    assert sha256(path) == entry["sha256"]


@pytest.mark.parametrize("dataset", DATASETS)
def test_dataset_is_a_stratified_20_percent_split_in_0_1(dataset):
    d, meta = load(dataset), DATASETS[dataset]
    for key, shape in meta["shape"].items():
        assert list(d[key].shape) == shape
    assert d["x_train"].dtype == d["x_test"].dtype == np.float32
    assert 0 <= d["x_train"].min() and d["x_train"].max() <= 1 and d["x_test"].max() == 1
    assert d["x_train"].shape[1] == np.prod(d["image_shape"]) == np.prod(meta["image_shape"])
    assert len(d["y_train"]) + len(d["y_test"]) == TOTALS[dataset]
    assert len(d["y_test"]) == meta["counts"]["test"] == math.ceil(0.2 * TOTALS[dataset])  # sklearn rounds up
    per_class_test = np.bincount(d["y_test"])
    per_class_all = per_class_test + np.bincount(d["y_train"])
    assert per_class_test.tolist() == meta["counts"]["test_per_class"]
    assert np.all(np.abs(per_class_test - 0.2 * per_class_all) <= 1)


@pytest.mark.parametrize("dataset", DATASETS)
def test_each_dataset_has_the_four_configurations(dataset):
    configs = {m["config"]: name for name, m in MODELS.items() if m["dataset"] == dataset}
    assert sorted(configs) == sorted(CONFIGS)
    info = {c: ModelInfo.from_file(FIXTURES / MODELS[n]["file"]) for c, n in configs.items()}
    for config, name in configs.items():
        assert MODELS[name]["macs"] == info[config].macs
        assert MODELS[name]["weights_bytes"] == info[config].weights_bytes
        assert MODELS[name]["input_dtype"] == info[config].inputs[0].dtype
    assert info["int8"].inputs[0].dtype == info["int8"].outputs[0].dtype == "int8"
    assert info["fp32"].inputs[0].dtype == "float32"
    # pruning removes hidden units: fewer MACs and weight bytes, not just zeros
    assert info["pruned fp32"].macs < info["fp32"].macs
    assert info["pruned fp32"].weights_bytes < info["fp32"].weights_bytes
    assert info["aggressive int8"].macs < info["int8"].macs


@pytest.mark.parametrize("name", [n for n, m in MODELS.items() if m["config"].endswith("int8")])
def test_int8_weights_are_per_channel_and_use_their_bit_range(name):
    it = Interpreter(model_path=str(FIXTURES / MODELS[name]["file"]))
    qmax = 2 ** (MODELS[name]["weight_bits"] - 1) - 1
    weights = [t for t in it.get_tensor_details() if t["name"].endswith("/weights")]
    assert len(weights) == 2
    for t in weights:
        w = it.get_tensor(t["index"])
        assert w.dtype == np.int8
        assert len(t["quantization_parameters"]["scales"]) == w.shape[0]  # one scale per unit
        assert np.abs(w).max(axis=1).tolist() == [qmax] * w.shape[0]


def test_litert_and_tflm_outputs_are_equal_for_digits_int8():
    path = FIXTURES / MODELS["digits_mlp_int8"]["file"]
    xq = quantize_input(ModelInfo.from_file(path), load("digits")["x_test"])
    lit, tflm = litert_outputs(path, xq), tflm_outputs(path, xq)
    assert lit.dtype == tflm.dtype == np.int8
    assert lit.shape == (360, 10)
    assert np.array_equal(lit, tflm)


@pytest.mark.parametrize("name", MODELS)
def test_accuracies_and_agreement_match_the_manifest(name):
    meta = MODELS[name]
    path = FIXTURES / meta["file"]
    d = load(meta["dataset"])
    xq = quantize_input(ModelInfo.from_file(path), d["x_test"])
    lit, tflm = litert_outputs(path, xq), tflm_outputs(path, xq)
    assert np.mean(lit.argmax(axis=1) == d["y_test"]) == meta["accuracy_litert"]
    assert np.mean(tflm.argmax(axis=1) == d["y_test"]) == meta["accuracy_tflm"]
    assert np.mean(np.all(lit == tflm, axis=1)) == meta["outputs_equal_fraction"]
    assert meta["accuracy_tflm"] > {"digits": 0.9, "mnist5k": 0.85}[meta["dataset"]]


def _pareto(points: dict[str, tuple[float, float]]) -> set[str]:
    """Names not dominated in (cost, accuracy): no other point costs no more and scores no less,
    with one of the two strictly better."""
    return {a for a, (cost_a, acc_a) in points.items()
            if not any(cost_b <= cost_a and acc_b >= acc_a and (cost_b, acc_b) != (cost_a, acc_a)
                       for b, (cost_b, acc_b) in points.items() if b != a)}


@pytest.mark.parametrize("dataset", DATASETS)
def test_int8_is_on_the_accuracy_size_frontier(dataset):
    models = {m["config"]: m for m in MODELS.values() if m["dataset"] == dataset}
    for cost in ("bytes", "weights_bytes"):
        frontier = _pareto({c: (m[cost], m["accuracy_tflm"]) for c, m in models.items()})
        assert "int8" in frontier, (cost, frontier)
    by_size = sorted(models, key=lambda c: models[c]["bytes"])
    assert by_size == ["aggressive int8", "int8", "pruned fp32", "fp32"]  # seed 000's memory order
    assert models["aggressive int8"]["accuracy_tflm"] < models["int8"]["accuracy_tflm"]


def test_manifest_arena_is_the_bisected_minimum(tmp_path):
    for name, meta in MODELS.items():
        if meta["dataset"] == "digits":
            assert min_arena_bytes(FIXTURES / meta["file"], cache=tmp_path / "a.json") == \
                meta["arena_bytes"], name


@pytest.mark.slow
@pytest.mark.skipif(not (importlib.util.find_spec("sklearn") and importlib.util.find_spec("mlxtend")),
                    reason="needs the fixtures extra (scikit-learn, mlxtend)")
def test_the_build_script_reproduces_the_committed_bytes(tmp_path):
    subprocess.run([sys.executable, str(FIXTURES / "build.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True, timeout=300)
    assert json.loads((tmp_path / "manifest.json").read_text()) == MANIFEST
    for entry in [*MODELS.values(), *DATASETS.values()]:
        assert sha256(tmp_path / entry["file"]) == entry["sha256"], entry["file"]
