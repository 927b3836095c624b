"""MLPerf Tiny interoperability, both directions: MLCommons' runner against the simulated MCUs and the
firmware core, and labbench's own client against DUTs that report an MLPerf Tiny ID. The same inputs
must give the reference firmware's answers (TFLite Micro on the tensor its th_load_tensor makes)
through both paths, and the runner's accuracy summary must print what it prints for the reference
firmware's own `m-results` lines.

The official runner (mlcommons/tiny benchmark/runner) cannot be installed here, so `Runner` below
re-implements the behaviour read in its source (stored copies of mlcommons/tiny; the commit of each
file read is given; the index holds several versions of some files and does not say which is HEAD,
so where versions differ the newest-looking one is followed and the other noted). Checked against:

- serial_device.py @20d7b7b3: `SerialDevice` opens the port with timeout 0.1 and, once entered,
  reads it in a thread one byte at a time, dropping CR and NUL and queueing a line at each LF (empty
  lines too); `send_command` writes the command, then the delimiter ('%' for a DUT), and collects
  the non-empty lines until one *contains* `m-ready`, each within 5 s (else `RuntimeError("No
  response to command ...")`); one line comes back as a string, several as a list. The older
  @69cdda4e read in the caller's thread without a per-line timeout.
- device_under_test.py @1af53ffc: `DUT` on `SerialDevice(port, baud, "m-ready", '%')`; `name` and
  `profile` each retried up to 3 times (`_retry`) until a line matches `^m-(name)-dut-\\[([^]]+)]$`
  resp. `^m-(model|profile)-\\[([^]]+)]$`, one `profile` serving both get_model and get_profile;
  `load` sends `db load N` then `db <hex>` chunks of 31 bytes (26 with a power manager) as
  `{d:02x}` (lower case) and never checks `m-load-done`; `infer N W` always names W ("must include
  warmups, even if 0, because default warmups=10"). The older @4984e1ff sent `infer N` when W was
  0, which the firmware runs with 10 warmups.
- main.py @6b4e30ae: `init_dut` enters the DUT, sleeps 2 s, then name, model, profile; the test
  script is `tests_<mode>.yaml[dut.get_model()]` and the dataset `<dataset_path>/<script model>`;
  `summarize_result` normalises a multi-value result to sum 1, averages a file's results, takes
  top-1 by argmax (a single value: the best of 100 thresholds' (precision + recall) / 2), the AUC
  with sklearn's roc_auc_score (2 values: column 1; else multi_class='ovr'), and prints
  `Top 1% = {:2.1f}` and `AUC = {:.3f}`; in performance mode the median throughput, or
  `ERROR 1`/`ERROR 2` when the loop is not 5 windows or lasted under 10 s (script.py).
- script.py @09f3bf8a: `download` without an index takes the dataset's next file; for ad01 it cuts
  the file into `bytes_to_send` windows every `stride` bytes, all of them in accuracy mode, the
  first only in performance and energy mode, and the loop count is multiplied by the number of
  windows; `infer` parses `^m-results-\\[([^]]+)\\]$` (values split on ',' with empty ones
  skipped) and the first and second `^m-lap-us-([0-9]+)$` as start and end, elapsed = end - start
  (no wrap), throughput = N / elapsed.
- datasets.py @a054d3b4: `y_labels.csv` rows file,classes,class[,bytes_to_send,stride]; a file
  read as bytes. tests_accuracy.yaml @23e62416: every model `loop` (all files) of `download`,
  `infer 1 0` (ad01 also `reset 20`, a host-side watchdog). tests_performance.yaml @22b2dc07:
  `loop 5` of `download`, `infer 20 5` (ic01, vww01), `infer 70 10` (kws01), `infer 1500 10` (ad01).
- devices_kws_ic_vww.yaml, devices_ad.yaml @22272851: the DUT's baud by mode, 115200 (921600 for
  ad01) in performance and accuracy mode, 9600 in energy mode; runner_utils.py @144234fa picks it.
  device_manager.py @22272851 only considers ports with a USB vid/pid (a pty or RFC 2217 port is
  never found) and, with `check_name`, sends a raw `name%` first.

And the reference firmware: benchmark/api/internally_implemented.cpp/.h @18d632fe (parser, `db`,
`infer` defaults 1 and 10, replies), reference_submissions/*/submitter_implemented.cpp
(image_classification @bbc1df99 and @fdfa9d32, keyword_spotting @19d14c28, person_detection and
anomaly_detection @154f3bd3): th_load_tensor subtracts 128 from the uint8 images (ic01, vww01),
copies kws01's int8 features, quantizes ad01's float32 with the input's scale and zero point;
th_results prints `%0.3f` (ic01; vww01 with a trailing comma: nresults 3 for 2 values; ad01 the MSE)
or truncates to three decimals (kws01: "0.%d" "%d" "%d").

Adaptations: the simulated boards are RFC 2217 ports, so `serial_for_url` opens them where the
runner calls serial.Serial (a pty bridge would need patching the scan anyway); there is no
interface board or power manager (performance and accuracy modes, the DUT direct); the baud is the
simulated board's (921600, lab.yaml's, as the runner's devices yaml would say for this DUT).
The reference models come from ../shared (tests skip when it is absent); their labelled datasets
are not there, so the dataset files are synthetic, in the runner's formats.
"""

from __future__ import annotations

import csv
import hashlib
import os
import pty
import queue
import re
import select
import shutil
import subprocess
import threading
import time
import tty
from collections import defaultdict
from pathlib import Path
from typing import Any, Self

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
BAUD = 921600  # the simulated boards' rate in lab.yaml (the runner's for ad01): VWW images upload in ~1 s
needs_mlperf = pytest.mark.skipif(not MLPERF_DIR.is_dir(), reason="../shared/workloads/mlperf_tiny is absent")
# Sizes and output counts of the runner's dataset files and the reference firmware's results
# (evaluation/datasets/README.md @14602536; th_results).
DATASET_BYTES = {"ic01": 3072, "kws01": 490, "vww01": 27648, "ad01": 2560}
RESULT_COUNT = {"ic01": 10, "kws01": 12, "vww01": 2, "ad01": 1}
AD_STRIDE = 512  # ad01's y_labels.csv: windows of 2,560 bytes every 512

# The runner's test scripts (tests_accuracy.yaml, tests_performance.yaml): (loop count or None for
# every file, infer N, infer W)
SCRIPTS = {
    "a": dict.fromkeys(RESULT_COUNT, (None, 1, 0)),
    "p": {"ic01": (5, 20, 5), "kws01": (5, 70, 10), "vww01": (5, 20, 5), "ad01": (5, 1500, 10)},
}


# -- MLCommons' runner, re-implemented from its source (module docstring) --------------------------


class RunnerSerial:
    """serial_device.SerialDevice: a reader thread queues lines (CR and NUL dropped) from the moment
    the port is entered; a command's reply is its non-empty lines up to one containing `m-ready`."""

    LINE_TIMEOUT_S = 5.0

    def __init__(self, url: str, baud: int):
        self.port = serial.serial_for_url(url, baudrate=baud, timeout=0.1)
        self.lines: queue.Queue[str] = queue.Queue()
        self.sent: list[str] = []
        self._running = False
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        self._running = True
        self._thread = threading.Thread(target=self._reader, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._running = False
        self._thread.join()
        self.port.close()

    def _reader(self) -> None:
        line = ""
        while self._running:
            byte = self.port.read(1)
            if byte == b"\n":
                self.lines.put(line)
                line = ""
            elif byte and byte not in b"\r\0":
                line += byte.decode()

    def send_command(self, command: str) -> str | list[str]:
        self.sent.append(command)
        self.port.write(command.encode())
        self.port.write(b"%")
        reply: list[str] = []
        while True:
            try:
                line = self.lines.get(timeout=self.LINE_TIMEOUT_S)
            except queue.Empty:
                raise RuntimeError(f"No response to command {command}") from None
            if line:
                reply.append(line)
            if "m-ready" in line:
                return reply[0] if len(reply) == 1 else reply


class RunnerDut:
    """device_under_test.DUT: name and profile (each tried up to 3 times), load, infer."""

    RETRIES = 3

    def __init__(self, port: RunnerSerial, power_manager: bool = False):
        self.port = port
        self.chunk_bytes = 26 if power_manager else 31
        self.fields: dict[str, str] = {}

    def _ask(self, command: str, pattern: str) -> None:
        for _ in range(self.RETRIES):
            found = [m for line in self.port.send_command(command) if (m := re.match(pattern, line))]
            for m in found:
                self.fields[m.group(1)] = m.group(2)
            if found:
                return

    def name(self) -> str | None:
        if "name" not in self.fields:
            self._ask("name", r"^m-(name)-dut-\[([^]]+)]$")
        return self.fields.get("name")

    def model(self) -> str | None:
        if "model" not in self.fields:
            self._ask("profile", r"^m-(model|profile)-\[([^]]+)]$")
        return self.fields.get("model")

    def profile(self) -> str | None:
        if "profile" not in self.fields:
            self._ask("profile", r"^m-(model|profile)-\[([^]]+)]$")
        return self.fields.get("profile")

    def load(self, data: bytes) -> None:
        self.port.send_command(f"db load {len(data)}")
        for i in range(0, len(data), self.chunk_bytes):
            self.port.send_command("db " + "".join(f"{b:02x}" for b in data[i : i + self.chunk_bytes]))

    def infer(self, count: int, warmup: int) -> dict[str, Any]:
        return parse_infer(self.port.send_command(f"infer {count} {warmup}"))


def parse_infer(reply: str | list[str]) -> dict[str, Any]:
    """script._ScriptInferStep._gather_infer_results: the results line and the two stamps."""
    got: dict[str, Any] = {}
    for line in [reply] if isinstance(reply, str) else reply:
        if m := re.match(r"^m-results-\[([^]]+)\]$", line):
            got["results"] = [float(v) for v in m.group(1).split(",") if v.strip()]
        elif m := re.match(r"^m-lap-us-([0-9]+)$", line):
            got["end_time" if "start_time" in got else "start_time"] = int(m.group(1))
    if "start_time" in got and "end_time" in got:
        got["elapsed_time"] = got["end_time"] - got["start_time"]
    return got


class Dataset:
    """datasets.DataSet: y_labels.csv (file,classes,class[,bytes_to_send,stride]) and the files
    beside it; without an index, the next file each time."""

    def __init__(self, directory: Path):
        self.directory = directory
        with open(directory / "y_labels.csv", newline="") as f:
            fields = ["file", "classes", "class", "bytes_to_send", "stride"]
            self.truth = list(csv.DictReader(f, fieldnames=fields))
        self.next_index = 0

    def next_file(self) -> tuple[dict[str, str], bytes]:
        truth = dict(self.truth[self.next_index])
        self.next_index += 1
        return truth, (self.directory / truth["file"]).read_bytes()


class Runner:
    """main.run_test and script.Script for a DUT on its own port (no interface board, no power
    manager): identify, pick the script by the model the DUT reports, run it over the dataset of
    that model, and summarise as main.summarize_result does."""

    SETTLE_S = 2.0  # main.init_dut sleeps this long after opening the port

    def __init__(self, url: str, datasets: Path, mode: str = "a", baud: int = BAUD):
        self.url, self.datasets, self.mode, self.baud = url, datasets, mode, baud
        self.sent: list[str] = []
        self.identity: dict[str, str | None] = {}

    def run(self) -> list[dict[str, Any]]:
        with RunnerSerial(self.url, self.baud) as port:
            dut = RunnerDut(port)
            time.sleep(self.SETTLE_S)
            self.identity = {"name": dut.name(), "model": dut.model(), "profile": dut.profile()}
            loops, count, warmup = SCRIPTS[self.mode][self.identity["model"]]
            dataset = Dataset(self.datasets / self.identity["model"])
            try:
                return self._loop(dut, dataset, loops, count, warmup)
            finally:
                self.sent = port.sent

    def _loop(
        self, dut: RunnerDut, dataset: Dataset, loops: int | None, count: int, warmup: int
    ) -> list[dict]:
        windowed = self.identity["model"] == "ad01"
        started, rows = time.time(), []
        loops = len(dataset.truth) if loops is None else loops
        pending: list[bytes] = []
        i = 0
        while i < loops:
            if not pending:
                truth, data = dataset.next_file()
                if windowed:
                    size, stride = int(truth["bytes_to_send"]), int(truth["stride"])
                    pending = [data[s : s + size] for s in range(0, len(data) - size + 1, stride)]
                    pending = pending[:1] if self.mode in ("p", "e") else pending
                    if i == 0:
                        loops *= len(pending)
                else:
                    pending = [data]
            dut.load(pending.pop(0))
            got = dut.infer(count, warmup) | {"iterations": count}
            rows.append({"file": truth["file"], "class": int(truth["class"]), "infer": got})
            i += 1
        if self.mode == "p":
            if loops != 5:
                rows.append({"error": "error 1"})
            if time.time() - started < 10.0:
                rows.append({"error": "error 2"})
        return rows


def summarize(rows: list[dict[str, Any]], mode: str = "a") -> list[str]:
    """main.summarize_result's printed lines (without their time prefix) for `mode` "a" or "p"."""
    from sklearn.metrics import roc_auc_score

    errors = {r["error"] for r in rows if "error" in r}
    rows = [r for r in rows if "infer" in r]
    if mode == "p":
        if "error 1" in errors:
            return ["ulp-mlperf: ERROR 1 - loop_count was not exactly 5."]
        if "error 2" in errors:
            return ["ulp-mlperf: ERROR 2 - loop exited before 10 seconds elapsed."]
        rates = [r["infer"]["iterations"] / (r["infer"]["elapsed_time"] / 1e6) for r in rows]
        return [f"ulp-mlperf: Median throughput is {np.median(rates):>10.3f} inf./sec."]
    per_file: dict[str, list] = defaultdict(list)
    labels: dict[str, int] = {}
    for r in rows:
        v = r["infer"]["results"]
        per_file[r["file"]].append(v if len(v) == 1 else [x / sum(v) for x in v])
        labels[r["file"]] = r["class"]
    y_pred = np.array([np.mean(per_file[f], axis=0) for f in per_file])
    y_true = np.array([labels[f] for f in per_file])
    if y_pred.shape[1] == 1:
        span = np.amin(y_pred) + np.arange(0.0, 1.0, 0.01) * (np.amax(y_pred) - np.amin(y_pred))
        accuracy = 0.0
        for threshold in span:
            flagged = (y_pred[:, 0] > threshold).astype(int)
            tp, fp = np.sum(flagged[y_true == 1] == 1), np.sum(flagged[y_true == 0] == 1)
            fn = np.sum(flagged[y_true == 1] == 0)
            precision, recall = tp / (tp + fp + 1e-8), tp / (tp + fn + 1e-8)
            accuracy = max(accuracy, 100 * (precision + recall) / 2)
    else:
        accuracy = 100 * np.sum(np.argmax(y_pred, axis=1) == y_true) / len(y_pred)
    if y_pred.shape[1] == 2:
        auc = roc_auc_score(y_true, y_pred[:, 1])
    else:
        auc = roc_auc_score(y_true, y_pred, multi_class="ovr")
    return [f"ulp-mlperf: Top 1% = {accuracy:2.1f}", f"ulp-mlperf: AUC = {auc:.3f}"]


# -- the reference firmware's side --------------------------------------------------------------


def reference_outputs(model: Path, tensor: np.ndarray) -> np.ndarray:
    """TFLite Micro's dequantized outputs for an int8 input tensor (what the reference firmware runs)."""
    from tflite_micro import runtime

    it = runtime.Interpreter.from_file(str(model), arena_size=1 << 20)
    it.set_input(tensor.reshape(it.get_input_details(0)["shape"]), 0)
    it.invoke()
    return dequantize_output(ModelInfo.from_file(model), it.get_output(0)).ravel()


def reference_mse(x: np.ndarray) -> np.float32:
    """The reference AD firmware's result for float32 features x: quantize, run, MSE in float."""
    m, path = MLPERF_TINY["ad01"], model_path("ad01")
    out = reference_outputs(path, quantize_like_firmware(x, m.input_scale, m.input_zero_point))
    squares = np.square(out - x.ravel(), dtype=np.float32)
    return np.add.accumulate(squares, dtype=np.float32)[-1] / np.float32(squares.size)


def reference_results_line(model_id: str, values: np.ndarray) -> str:
    """The `m-results-[...]` line the reference port of `model_id` prints for these values (its
    th_results): %0.3f, vww01 with its trailing comma, kws01 truncated by its integer workaround."""
    values = np.asarray(values, np.float32)
    if model_id == "kws01":
        ten = np.float32(10)
        text = [f"0.{int(v * ten)}{int(v * ten * ten) % 10}{int(v * ten * ten * ten) % 10}" for v in values]
    else:
        text = [f"{float(v):0.3f}" for v in values]
    return "m-results-[" + ",".join(text) + ("," if model_id == "vww01" else "") + "]"


def images(shape: tuple[int, ...], n: int, seed: int) -> np.ndarray:
    """Blocky uint8 RGB images (4x4 blocks of random colour): unlike noise, they vary the IC class."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(n, 4, 4, shape[2]))
    return np.stack([np.kron(b, np.ones((shape[0] // 4, shape[1] // 4, 1))) for b in blocks]).astype(np.uint8)


def model_path(model_id: str) -> Path:
    return MLPERF_DIR / MLPERF_TINY[model_id].file


def write_dataset(root: Path, model_id: str, files: list[bytes], classes: list[int]) -> Path:
    """The runner's dataset directory: the input files and y_labels.csv (AD: its window and stride)."""
    directory = root / model_id
    directory.mkdir(parents=True, exist_ok=True)
    n_classes = 2 if model_id == "ad01" else RESULT_COUNT[model_id]
    with open(directory / "y_labels.csv", "w", newline="") as f:
        for i, (data, label) in enumerate(zip(files, classes, strict=True)):
            name = f"{model_id}_{i:03d}.bin"
            (directory / name).write_bytes(data)
            extra = [DATASET_BYTES["ad01"], AD_STRIDE] if model_id == "ad01" else []
            csv.writer(f).writerow([name, n_classes, label, *extra])
    return root


def synthetic(model_id: str) -> tuple[list[bytes], list[np.ndarray], list[int]]:
    """Dataset files in the runner's format, what the reference firmware answers for each (one row
    per window for ad01), and labels that use every class (sklearn's one-vs-rest AUC needs them)."""
    path = model_path(model_id)
    if model_id in ("ic01", "vww01"):
        shape = ModelInfo.from_file(path).inputs[0].shape[1:]
        u8 = images(shape, 10 if model_id == "ic01" else 4, seed=1)
        expected = [reference_outputs(path, (x.astype(np.int16) - 128).astype(np.int8))[None] for x in u8]
        return [x.tobytes() for x in u8], expected, [i % RESULT_COUNT[model_id] for i in range(len(u8))]
    if model_id == "kws01":
        x = np.random.default_rng(5).integers(-128, 128, size=(12, 49, 10, 1), dtype=np.int8)
        return [t.tobytes() for t in x], [reference_outputs(path, t)[None] for t in x], list(range(12))
    rng = np.random.default_rng(7)  # ad01: files of 9 spectrogram frames, five 5-frame windows each
    files = [rng.normal(-20, 8 + 4 * k, size=9 * 128).astype("<f4") for k in range(4)]
    windows = [np.stack([f[w * 128 : w * 128 + 640] for w in range(5)]) for f in files]
    expected = [np.array([[reference_mse(w)] for w in ws], np.float32) for ws in windows]
    return [f.tobytes() for f in files], expected, [0, 1, 0, 1]


# -- the simulated board ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dut():
    """A simulated Coral Dev Board Micro (its device model is fast) at 921600 baud, and a DutSerial."""
    b = SimMcuBoard(
        "interop",
        family="coral_dev_board_micro",
        baud=BAUD,
        model_path=REPO / "fixtures" / "models" / "digits_mlp_int8.tflite",
    )
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
    assert int(np.prod(info.outputs[0].shape)) == (640 if model_id == "ad01" else RESULT_COUNT[model_id])
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
    # vww01's th_load_tensor does `int8 -= 128` on the bytes: the same wrap as ic01's uint8 - 128
    u8 = np.arange(256, dtype=np.uint8)
    assert np.array_equal(
        MLPERF_TINY["vww01"].decode(u8.tobytes(), TensorInfo("in", (256,), "int8")),
        (u8.view(np.int8).astype(np.int16) - 128).astype(np.int8),
    )
    with pytest.raises(TypeError, match="ic01 takes uint8 values"):
        ic01.encode(np.zeros(4, np.float32))
    # QuantizeFloatToInt8: round() halves away from zero, then the zero point, then the clamp
    q = quantize_like_firmware(np.array([0.5, -0.5, 1.5, -2.5, 1e30, -1e30, np.nan], np.float32), 1.0, 1)
    assert q.tolist() == [2, 0, 3, -2, 127, -128, 1]


def test_the_runner_reads_the_reference_ports_results_lines():
    """What each reference port prints parses into the values the runner uses."""
    v = np.array([0.99609375, 0.00390625], np.float32)
    assert reference_results_line("vww01", v) == "m-results-[0.996,0.004,]"  # nresults 3 for 2 values
    assert parse_infer(["m-results-[0.996,0.004,]", "m-ready"])["results"] == [0.996, 0.004]
    assert reference_results_line("kws01", np.array([0.05078125, 0.6796875], np.float32)) == (
        "m-results-[0.050,0.679]"  # truncated, not rounded
    )
    assert reference_results_line("ic01", np.array([0.0, 0.5], np.float32)) == "m-results-[0.000,0.500]"


# -- the runner against the simulated MCUs, and labbench's client -----------------------------------


@needs_mlperf
@pytest.mark.parametrize("model_id", list(MLPERF_TINY))
def test_the_runners_accuracy_mode_gives_the_reference_firmwares_answers(dut, tmp_path, model_id):
    """The runner's accuracy mode on a dataset in its own format: it picks the test by the model the
    board reports, sends each file as the reference firmware takes it, and gets the reference
    firmware's outputs; its printed summary is what the reference firmware's own (rounded) result
    lines give it."""
    b, d = flashed(dut, model_id)
    files, expected, labels = synthetic(model_id)
    runner = Runner(b.url, write_dataset(tmp_path, model_id, files, labels))
    rows = runner.run()
    assert runner.identity == {
        "name": "coral_dev_board_micro",
        "model": model_id,
        "profile": "ULPMark for tinyML Firmware V0.0.1",
    }
    # the exchange: name, profile, then per file db load N, 31-byte lower-case chunks, infer 1 0
    assert runner.sent[:2] == ["name", "profile"]
    load = f"db load {DATASET_BYTES[model_id]}"
    assert runner.sent.count(load) == sum(len(e) for e in expected) == runner.sent.count("infer 1 0")
    chunks = [c for c in runner.sent if c.startswith("db ") and c != load]
    assert max(len(c) for c in chunks) == len("db ") + 62 and all(c == c.lower() for c in chunks)
    got = np.array([r["infer"]["results"] for r in rows], np.float32)
    np.testing.assert_array_equal(got, np.concatenate(expected))
    assert got.shape[1] == RESULT_COUNT[model_id]
    # the runner's summary from the board's lines and from the reference firmware's printed ones
    printed = [
        r | {"infer": parse_infer([reference_results_line(model_id, v), "m-ready"])}
        for r, v in zip(rows, np.concatenate(expected), strict=True)
    ]
    assert summarize(rows) == summarize(printed)
    if model_id == "ic01":
        assert len({int(np.argmax(e)) for e in expected}) > 1  # the images do not all land in one class

    # labbench's client, the other direction: the same board, the same answers
    ident = d.identify()
    assert ident.model == model_id and d.reported_model == model_id
    if model_id == "ad01":
        features = [np.frombuffer(f, "<f4") for f in files]
        windows = np.stack([x[w * 128 : w * 128 + 640] for x in features for w in range(5)])
        np.testing.assert_array_equal(d.classify(windows), np.concatenate(expected))
    elif model_id == "kws01":
        np.testing.assert_array_equal(
            d.classify(np.stack([np.frombuffer(f, np.int8) for f in files])), np.concatenate(expected)
        )
    else:
        u8 = np.stack([np.frombuffer(f, np.uint8) for f in files])
        tensors = (u8.astype(np.int16) - 128).astype(np.int8)  # what th_load_tensor makes of them
        np.testing.assert_array_equal(d.classify(u8), np.concatenate(expected))  # the runner's uint8
        np.testing.assert_array_equal(d.classify(tensors), np.concatenate(expected))  # int8, sent +128


@needs_mlperf
def test_int8_tensors_for_ad01_are_dequantized_for_the_dut(dut):
    _, d = flashed(dut, "ad01")
    d.identify()
    m = MLPERF_TINY["ad01"]
    x = np.random.default_rng(8).normal(-20, 8, size=(2, 640)).astype(np.float32)
    q = quantize_like_firmware(x, m.input_scale, m.input_zero_point)
    dequantized = np.frombuffer(m.encode(q), "<f4").reshape(2, 640)
    np.testing.assert_array_equal(d.classify(q), [[reference_mse(w)] for w in dequantized])


@needs_mlperf
def test_the_runners_performance_mode_times_the_device_model(dut, tmp_path):
    """tests_performance.yaml's ic01 script: five windows of `infer 20 5`, each on the next file,
    throughput from the DUT's two stamps. The simulated board is fast, so the loop ends long before
    10 s, which the runner reports as ERROR 2 instead of a median."""
    b, _ = flashed(dut, "ic01")
    files, _, labels = synthetic("ic01")
    runner = Runner(b.url, write_dataset(tmp_path, "ic01", files, labels), mode="p")
    rows = runner.run()
    assert runner.sent.count("infer 20 5") == 5 and runner.sent.count("db load 3072") == 5
    windows = [r for r in rows if "infer" in r]
    assert [r["file"] for r in windows] == [f"ic01_{i:03d}.bin" for i in range(5)]
    latency_us = b.firmware.model.latency_s * 1e6
    for r in windows:
        assert r["infer"]["elapsed_time"] == pytest.approx(20 * latency_us, rel=0.05)  # 1 % jitter, outliers
    assert summarize(rows, "p") == ["ulp-mlperf: ERROR 2 - loop exited before 10 seconds elapsed."]
    rate = np.median([20 / (r["infer"]["elapsed_time"] / 1e6) for r in windows])
    assert rate == pytest.approx(1e6 / latency_us, rel=0.05)


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
    run = subprocess.run(
        ["make", "-C", str(CORE), "host-dut", f"BUILD={build}", f"CC={cc}"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
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
        u8 = images((32, 32, 3), 10, seed=4)
        expected = np.array([(img.ravel()[:4] ^ 0x80).astype(np.float32) / 4 for img in u8])
        datasets = write_dataset(tmp_path / "datasets", "ic01", [x.tobytes() for x in u8], list(range(10)))
        runner = Runner(os.ttyname(slave), datasets, baud=115200)
        rows = runner.run()
        assert runner.identity["model"] == "ic01"
        with DutSerial(os.ttyname(slave), board="host-dut", log_path=tmp_path / "host-dut.log") as d:
            ident = d.identify()
            assert ident.model == "ic01" and ident.model_sha256 == MLPERF_TINY["ic01"].sha256
            by_labbench = d.classify((u8.astype(np.int16) - 128).astype(np.int8))
        np.testing.assert_array_equal(np.array([r["infer"]["results"] for r in rows], np.float32), expected)
        np.testing.assert_array_equal(by_labbench, expected)
    finally:
        proc.kill()
        proc.wait()
        os.close(slave)
