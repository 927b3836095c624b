"""MLPerf Tiny interoperability, both directions: the MLCommons runner's exchange against the
simulated MCUs and the firmware core, and labbench's own client against DUTs that report an MLPerf
Tiny ID. The same inputs must give the same results (and classes) through both paths, and the
reference firmware's answers: TFLite Micro on the tensor its th_load_tensor makes.

The official runner (mlcommons/tiny benchmark/runner) is not pip-installable and ../shared holds no
copy, so `Runner` emulates its byte format as ../shared/reference/mlperf-tiny-dut-protocol.md
(sections 1.5, 2 and 2.5) describes it. The reference models come from ../shared (tests skip when
it is absent); their labelled datasets are not there, so the inputs are synthetic.
"""

from __future__ import annotations

import hashlib
import os
import pty
import re
import select
import shutil
import subprocess
import time
import tty
from pathlib import Path

import numpy as np
import pytest
import serial

from labbench.drivers.dut_serial import DutSerial
from labbench.modelinfo import (
    MLPERF_TINY,
    ModelInfo,
    TensorInfo,
    dequantize_output,
    mlperf_model,
    quantize_like_firmware,
)
from labbench.payloads import mlperf_tiny
from labbench.sim.mcu import SimMcuBoard

REPO = Path(__file__).resolve().parents[1]
MLPERF_DIR = REPO.parent / "shared" / "workloads" / "mlperf_tiny"
CORE = REPO / "firmware" / "core"
BAUD = 921600  # MLPerf's anomaly-detection rate: the 27,648-byte VWW images upload in about a second
needs_mlperf = pytest.mark.skipif(not MLPERF_DIR.is_dir(), reason="../shared/workloads/mlperf_tiny is absent")
# Sizes and output counts of the runner's dataset files and the reference firmware's results
# (the protocol reference, sections 1.3 and 1.5).
DATASET_BYTES = {"ic01": 3072, "kws01": 490, "vww01": 27648, "ad01": 2560}
RESULT_COUNT = {"ic01": 10, "kws01": 12, "vww01": 2, "ad01": 1}


class Runner:
    """The MLCommons runner's side of the exchange (device_under_test.DUT over SerialDevice): each
    command is written as `<command>%` and its reply is the lines up to the one holding `m-ready`
    (CR and NUL dropped); the model comes from `^m-(model|profile)-\\[([^]]+)]$` of `profile`; an
    input goes as `db load N` and `db <hex>` chunks of 31 bytes in lower-case hex; `infer N W` always
    names W; results come from `^m-results-\\[([^]]+)\\]$`; top-1 is the argmax of the result vector
    normalised to sum 1 (main.summarize_result)."""

    CHUNK_BYTES = 31  # 26 with a power manager
    commands: list[str]

    def __init__(self, url: str, baud: int = BAUD, timeout_s: float = 10.0):
        self.port = serial.serial_for_url(url, baudrate=baud, timeout=0.1)
        self.timeout_s = timeout_s
        self.commands = []
        self._rx = b""

    def close(self) -> None:
        self.port.close()

    def send_command(self, command: str) -> list[str]:
        self.commands.append(command)
        self.port.write(f"{command}%".encode())
        lines, deadline = [], time.monotonic() + self.timeout_s
        while not lines or "m-ready" not in lines[-1]:
            while b"\n" not in self._rx:
                assert time.monotonic() < deadline, f"no response to command {command}: {lines!r}"
                self._rx += self.port.read(max(1, self.port.in_waiting))
            raw, self._rx = self._rx.split(b"\n", 1)
            lines.append(raw.decode().replace("\r", "").replace("\0", ""))
        return lines

    def profile(self) -> dict[str, str]:
        found = [re.match(r"^m-(model|profile)-\[([^]]+)]$", line) for line in self.send_command("profile")]
        return {m.group(1): m.group(2) for m in found if m}

    def load(self, data: bytes) -> None:
        self.send_command(f"db load {len(data)}")
        for i in range(0, len(data), self.CHUNK_BYTES):
            self.send_command("db " + "".join(f"{d:02x}" for d in data[i : i + self.CHUNK_BYTES]))

    def infer(self, number: int = 1, warmups: int = 0) -> list[float]:
        for line in self.send_command(f"infer {number} {warmups}"):
            m = re.match(r"^m-results-\[([^]]+)\]$", line)
            if m:
                return [float(x) for x in m.group(1).split(",") if x.strip()]
        raise AssertionError(f"no results line after infer {number} {warmups}")

    def results(self, data: bytes) -> list[float]:
        self.load(data)
        return self.infer(1, 0)

    @staticmethod
    def top1(results: list[float]) -> int:
        v = np.asarray(results)
        return int(np.argmax(v / v.sum()))


def reference_outputs(model: Path, tensor: np.ndarray) -> np.ndarray:
    """TFLite Micro's dequantized outputs for an int8 input tensor (what the reference firmware runs)."""
    from tflite_micro import runtime

    it = runtime.Interpreter.from_file(str(model), arena_size=1 << 20)
    it.set_input(tensor.reshape(it.get_input_details(0)["shape"]), 0)
    it.invoke()
    return dequantize_output(ModelInfo.from_file(model), it.get_output(0)).ravel()


def images(shape: tuple[int, ...], n: int, seed: int) -> np.ndarray:
    """Blocky uint8 RGB images (4x4 blocks of random colour): unlike noise, they vary the IC class."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(n, 4, 4, shape[2]))
    return np.stack([np.kron(b, np.ones((shape[0] // 4, shape[1] // 4, 1))) for b in blocks]).astype(np.uint8)


def model_path(model_id: str) -> Path:
    return MLPERF_DIR / MLPERF_TINY[model_id].file


@pytest.fixture(scope="module")
def dut():
    """A simulated Coral Dev Board Micro (its device model is fast) at 921600 baud, and a DutSerial."""
    b = SimMcuBoard("interop", family="coral_dev_board_micro", baud=BAUD,
                    model_path=REPO / "fixtures" / "models" / "digits_mlp_int8.tflite")
    b.start()
    d = DutSerial(b.url, board=b.name, baud=BAUD)
    yield b, d
    d.close()
    b.stop()


def flashed(dut, model_id: str) -> tuple[SimMcuBoard, DutSerial]:
    """The board running `model_id`, its port closed (it takes one client at a time; the driver
    reopens it when next used)."""
    b, d = dut
    d.close()
    path = model_path(model_id)
    b.load_firmware(path.read_bytes(), path.stem)
    return b, d


def runner_on(b: SimMcuBoard) -> Runner:
    return Runner(b.url)


# -- the table ---------------------------------------------------------------------------------------


@needs_mlperf
@pytest.mark.parametrize("model_id", list(MLPERF_TINY))
def test_the_table_is_the_reference_files(model_id):
    m = MLPERF_TINY[model_id]
    path = model_path(model_id)
    info = ModelInfo.from_file(path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == m.sha256 == info.sha256
    (tensor,) = info.inputs
    assert (tensor.dtype, tensor.scale, tensor.zero_point) == ("int8", m.input_scale, m.input_zero_point)
    assert m.wire_bytes(tensor) == DATASET_BYTES[model_id]
    assert mlperf_model(info.sha256) is m and mlperf_model(None, model_id) is m
    payload = next(p for p in mlperf_tiny().values() if p.path == path)
    assert payload.name.startswith(model_id + "_")


def test_encoding_round_trips_through_the_firmware_conversion():
    rng = np.random.default_rng(3)
    x = rng.integers(-128, 128, size=640, dtype=np.int8)
    for m in MLPERF_TINY.values():
        tensor = TensorInfo("input", (1, 640), "int8", m.input_scale, m.input_zero_point)
        assert np.array_equal(m.decode(m.encode(x), tensor).ravel(), x), m.id
    ic01 = MLPERF_TINY["ic01"]
    assert ic01.encode(np.array([-128, -1, 0, 127], np.int8)) == bytes([0, 127, 128, 255])
    assert ic01.encode(np.array([0, 127, 128, 255], np.uint8)) == bytes([0, 127, 128, 255])
    with pytest.raises(TypeError, match="ic01 takes uint8 values"):
        ic01.encode(np.zeros(4, np.float32))
    # QuantizeFloatToInt8: round() halves away from zero, then the zero point, then the clamp
    q = quantize_like_firmware(np.array([0.5, -0.5, 1.5, -2.5, 1e30, -1e30, np.nan], np.float32), 1.0, 1)
    assert q.tolist() == [2, 0, 3, -2, 127, -128, 1]


# -- the runner against the simulated MCUs, and labbench's client -----------------------------------


@needs_mlperf
@pytest.mark.parametrize("model_id, count", [("ic01", 6), ("vww01", 2)])
def test_images_give_the_reference_class_through_the_runner_and_labbench(dut, model_id, count):
    b, d = flashed(dut, model_id)
    shape = ModelInfo.from_file(model_path(model_id)).inputs[0].shape[1:]
    u8 = images(shape, count, seed=1)
    tensors = (u8.astype(np.int16) - 128).astype(np.int8)  # what th_load_tensor makes of them
    expected = np.stack([reference_outputs(model_path(model_id), t) for t in tensors])

    runner = runner_on(b)
    try:
        assert runner.profile() == {"profile": "ULPMark for tinyML Firmware V0.0.1", "model": model_id}
        by_runner = np.array([runner.results(img.tobytes()) for img in u8], np.float32)
    finally:
        runner.close()
    assert all(len(c) <= len("db ") + 62 for c in runner.commands)

    ident = d.identify()
    assert ident.model == model_id and d.reported_model == model_id
    by_tensor = d.classify(tensors)  # int8 tensors: the driver sends them as the runner would (+128)
    by_image = d.classify(u8)  # or the runner's uint8 as they are
    np.testing.assert_array_equal(by_runner, expected)
    np.testing.assert_array_equal(by_tensor, expected)
    np.testing.assert_array_equal(by_image, expected)
    assert [Runner.top1(r) for r in by_runner] == list(expected.argmax(1)) == list(by_tensor.argmax(1))
    assert by_runner.shape[1] == RESULT_COUNT[model_id]
    if model_id == "ic01":
        assert len(set(expected.argmax(1))) > 1  # the images do not all land in one class


@needs_mlperf
def test_keyword_features_are_the_same_int8_both_ways(dut):
    b, d = flashed(dut, "kws01")
    x = np.random.default_rng(5).integers(-128, 128, size=(3, 49, 10, 1), dtype=np.int8)
    expected = np.stack([reference_outputs(model_path("kws01"), t) for t in x])
    runner = runner_on(b)
    try:
        assert runner.profile()["model"] == "kws01"
        by_runner = np.array([runner.results(t.tobytes()) for t in x], np.float32)
    finally:
        runner.close()
    d.identify()
    np.testing.assert_array_equal(by_runner, expected)
    np.testing.assert_array_equal(d.classify(x), expected)
    assert by_runner.shape[1] == RESULT_COUNT["kws01"]


def reference_mse(x: np.ndarray) -> np.float32:
    """The reference AD firmware's result for float32 features x: quantize, run, MSE in float."""
    m, path = MLPERF_TINY["ad01"], model_path("ad01")
    out = reference_outputs(path, quantize_like_firmware(x, m.input_scale, m.input_zero_point))
    squares = np.square(out - x.ravel(), dtype=np.float32)
    return np.add.accumulate(squares, dtype=np.float32)[-1] / np.float32(squares.size)


@needs_mlperf
def test_anomaly_windows_give_the_reference_mse_through_the_runner_and_labbench(dut):
    b, d = flashed(dut, "ad01")
    rng = np.random.default_rng(7)
    # spectrogram windows as the runner cuts them from a file: 2,560 bytes every 512 (stride)
    features = rng.normal(-20, 8, size=5 * 128 + 4 * 128).astype("<f4")
    windows = np.stack([features[k * 128 : k * 128 + 640] for k in range(5)])
    file_bytes = features.tobytes()
    runner = runner_on(b)
    try:
        assert runner.profile()["model"] == "ad01"
        by_runner = [runner.results(file_bytes[s : s + 2560]) for s in range(0, 5 * 512, 512)]
    finally:
        runner.close()
    d.identify()
    by_labbench = d.classify(windows)  # float32: the runner's format, sent as it is
    expected = np.array([[reference_mse(w)] for w in windows], np.float32)
    np.testing.assert_array_equal(np.array(by_runner, np.float32), expected)
    np.testing.assert_array_equal(by_labbench, expected)
    # int8 tensors are dequantized for the DUT, which quantizes them back to the same tensor
    m = MLPERF_TINY["ad01"]
    q = quantize_like_firmware(windows[:2], m.input_scale, m.input_zero_point)
    dequantized = np.frombuffer(m.encode(q), "<f4").reshape(2, 640)
    np.testing.assert_array_equal(d.classify(q), [[reference_mse(w)] for w in dequantized])


@needs_mlperf
def test_timed_runs_send_the_reference_format(dut):
    _, d = flashed(dut, "ic01")
    d.identify()
    x = np.random.default_rng(9).integers(-128, 128, size=(32, 32, 3), dtype=np.int8)
    run = d.run_timed(x, 3, 1)
    np.testing.assert_array_equal(run.outputs, reference_outputs(model_path("ic01"), x))
    sent = re.findall(r"-> b'db ([0-9a-f]+)%'", d.log_path.read_text())
    assert bytes.fromhex("".join(sent[-(3072 // 38 + 1) :])) == (x.view(np.uint8) ^ 0x80).tobytes()


# -- the firmware core (host build) with a reference model's hash -----------------------------------


def _host_dut(build: Path) -> Path:
    cc = next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if shutil.which("make") is None or cc is None:
        pytest.skip("no make and C compiler on PATH")
    run = subprocess.run(["make", "-C", str(CORE), "host-dut", f"BUILD={build}", f"CC={cc}"], check=False,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    return build / "host_dut"


@needs_mlperf
def test_the_core_answers_the_runner_and_labbench_alike(tmp_path):
    """host_dut hashing the ic01 model takes uint8 images; its fake model's outputs are the first
    four bytes of the input tensor / 4, so they show what th_load_tensor made of the bytes."""
    exe = _host_dut(tmp_path)
    master, slave = pty.openpty()
    tty.setraw(slave)
    proc = subprocess.Popen([str(exe), "3072", "0", str(model_path("ic01"))], stdin=master, stdout=master)
    os.close(master)
    try:
        banner = b""
        while b"m-ready\r\n" not in banner:
            assert select.select([slave], [], [], 10)[0], banner
            banner += os.read(slave, 4096)
        u8 = images((32, 32, 3), 2, seed=4)
        expected = [(img.ravel()[:4] ^ 0x80).astype(np.float32) / 4 for img in u8]
        runner = Runner(os.ttyname(slave), baud=115200)
        try:
            assert runner.profile()["model"] == "ic01"
            by_runner = [runner.results(img.tobytes()) for img in u8]
        finally:
            runner.close()
        with DutSerial(os.ttyname(slave), board="host-dut", log_path=tmp_path / "host-dut.log") as d:
            ident = d.identify()
            assert ident.model == "ic01" and ident.model_sha256 == MLPERF_TINY["ic01"].sha256
            by_labbench = d.classify((u8.astype(np.int16) - 128).astype(np.int8))
        np.testing.assert_array_equal(np.array(by_runner, np.float32), expected)
        np.testing.assert_array_equal(by_labbench, expected)
    finally:
        proc.kill()
        proc.wait()
        os.close(slave)
