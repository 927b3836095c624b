"""Hierarchical inference on a simulated MCU, end to end: DutSerial's HiTarget over the serial DUT
protocol's `hi` extension, the board's local model (TFLM) and decision, and its offloads over real TCP
to a real EdgeServer behind a Link on loopback. Each result is checked against the host's own
computation: LiteRT for the local model, the EdgeServer's model for the offloaded samples, the
decision module for the verdicts. The firmware core's own build for the host (host_dut: the C core,
its fake model, POSIX sockets) runs the same driver against the same server."""

from __future__ import annotations

import os
import pty
import select
import shutil
import statistics
import subprocess
import threading
import time
import tty
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tflite_micro import runtime

from labbench.capabilities import HiRun, HiTarget
from labbench.drivers.dut_serial import DutSerial
from labbench.edge.link import Link, preset
from labbench.edge.server import CRC32, REPLY_HEAD, REQUEST, EdgeModel, EdgeServer
from labbench.errors import EdgeError
from labbench.modelinfo import ModelInfo, dequantize_output, quantize_input
from labbench.sim.mcu import SimMcuBoard
from labbench.strategies.decision import LogisticDecision, ThresholdDecision, top2

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "fixtures" / "models"
LOCAL = MODELS / "mnist5k_mlp_int8_aggressive.tflite"  # the device's model: 86.9 % on the test split
SERVER = MODELS / "mnist5k_mlp_int8.tflite"  # the edge's: the same int8[1, 784] input, more accurate
BAUD = 921600
RUN = slice(500, 600)  # the samples run on the device; the decision is fitted on the 500 before


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    """The test split as the local model's input tensors (int8 [n, 784]), and its labels."""
    with np.load(REPO / "fixtures" / "datasets" / "mnist5k.npz") as npz:
        x, y = npz["x_test"], npz["y_test"]
    return quantize_input(ModelInfo.from_file(LOCAL), x.reshape(-1, 1, 784))[:, 0], y


def litert_outputs(model: Path, inputs: np.ndarray) -> np.ndarray:
    """The model's dequantized outputs, run here with LiteRT."""
    it = Interpreter(model_path=str(model))
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    info = ModelInfo.from_file(model)
    rows = []
    for x in inputs:
        it.set_tensor(inp["index"], x.reshape(inp["shape"]))
        it.invoke()
        rows.append(dequantize_output(info, it.get_tensor(out["index"])).ravel())
    return np.array(rows)


def tflm_outputs(model: Path, inputs: np.ndarray) -> np.ndarray:
    """The model's dequantized outputs with the TFLM interpreter, as the boards (real and simulated) run
    it. Its int8 softmax differs from LiteRT's by a few output steps on some inputs."""
    it = runtime.Interpreter.from_bytes(model.read_bytes())
    info = ModelInfo.from_file(model)
    rows = []
    for x in inputs:
        it.set_input(x.reshape(info.inputs[0].shape), 0)
        it.invoke()
        rows.append(dequantize_output(info, it.get_output(0)).ravel())
    return np.array(rows)


@pytest.fixture(scope="module")
def host(data: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
    """What the host computes for the run samples: the local model's outputs with TFLM (the runtime the
    boards run) and LiteRT, and the server's classes."""
    x, _ = data
    outputs = tflm_outputs(LOCAL, x[RUN])
    edge = EdgeModel(SERVER)
    return {
        "outputs": outputs,
        "litert": litert_outputs(LOCAL, x[RUN]),
        "server": np.array([edge.classify(s.tobytes())[0] for s in x[RUN]]),
    }


@pytest.fixture(scope="module")
def board() -> Iterator[SimMcuBoard]:
    b = SimMcuBoard("hi-esp32", family="esp32_devkitc", model_path=LOCAL, baud=BAUD)
    b.start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def server() -> Iterator[EdgeServer]:
    with EdgeServer(SERVER) as srv:
        yield srv


@pytest.fixture(scope="module")
def wifi(server: EdgeServer) -> Iterator[Link]:
    with Link(server.address, "wifi") as link:
        yield link


@pytest.fixture(scope="module")
def dut(board: SimMcuBoard, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DutSerial]:
    d = DutSerial(
        board.url, board=board.name, baud=BAUD, log_path=tmp_path_factory.mktemp("logs") / "hi-serial.log"
    )
    d.identify()
    yield d
    d.close()


def test_the_models_share_their_input() -> None:
    """The device offloads its input tensor's bytes: the server's model must take the same tensor."""
    assert ModelInfo.from_file(LOCAL).inputs == ModelInfo.from_file(SERVER).inputs


def test_logistic_hi_matches_the_host(
    dut: DutSerial, wifi: Link, data: tuple[np.ndarray, np.ndarray], host: dict[str, np.ndarray]
) -> None:
    x, y = data
    decision = LogisticDecision.fit(litert_outputs(LOCAL, x[:500]), y[:500])
    assert isinstance(dut, HiTarget)
    dut.hi_configure(decision.to_dict(), wifi.address)
    run = dut.hi_run(x[RUN])

    assert run.count == 100
    assert [w[2] for w in run.windows] == [35, 35, 30]  # 27648 // 784 samples per pass
    assert all(s0 < e0 <= s1 for (s0, e0, _), (s1, _, _) in zip(run.windows, run.windows[1:], strict=False))
    np.testing.assert_array_equal(np.c_[run.p1, run.p2], top2(host["outputs"]))
    np.testing.assert_array_equal(run.local_class, host["outputs"].argmax(axis=1))
    np.testing.assert_array_equal(run.local_class, host["litert"].argmax(axis=1))
    np.testing.assert_allclose(np.c_[run.p1, run.p2], top2(host["litert"]), atol=0.1)
    np.testing.assert_array_equal(run.accepted, decision.accept(host["outputs"]))
    assert 0 < (~run.accepted).sum() < run.count  # both verdicts occur
    expected_final = np.where(run.accepted, run.local_class, host["server"])
    np.testing.assert_array_equal(run.final_class, expected_final)
    np.testing.assert_array_equal(run.t_off_us == 0, run.accepted)
    # the device model's latency (306.9 µs on the ESP32, 1 % jitter) and the decision's microseconds
    assert statistics.median(run.t_inf_us) == pytest.approx(306.9, rel=0.05)
    assert set(run.t_dec_us) <= {0.0, 1.0}
    # HI is at least as accurate as the local model on these samples
    assert (run.final_class == y[RUN]).mean() >= (run.local_class == y[RUN]).mean()


def test_remote_mode_offloads_every_sample(
    dut: DutSerial, wifi: Link, data: tuple[np.ndarray, np.ndarray], host: dict[str, np.ndarray]
) -> None:
    dut.hi_configure({"kind": "remote"}, wifi.address)
    run = dut.hi_run(data[0][RUN][:40])
    assert not run.accepted.any() and (run.local_class == -1).all()
    assert (run.t_inf_us == 0).all() and (run.p1 == 0).all() and (run.t_off_us > 0).all()
    np.testing.assert_array_equal(run.final_class, host["server"][:40])


def test_threshold_zero_accepts_every_sample_and_sends_nothing(
    dut: DutSerial, wifi: Link, data: tuple[np.ndarray, np.ndarray], host: dict[str, np.ndarray]
) -> None:
    dut.hi_configure(ThresholdDecision(0.0).to_dict(), wifi.address)
    before = sum(c.up.delivered_bytes for c in wifi.connections())
    run = dut.hi_run(data[0][RUN][:40])
    assert run.accepted.all() and (run.t_off_us == 0).all()
    np.testing.assert_array_equal(run.final_class, host["outputs"][:40].argmax(axis=1))
    assert sum(c.up.delivered_bytes for c in wifi.connections()) == before


def test_offload_time_on_wifi_is_the_links_model(
    dut: DutSerial, wifi: Link, data: tuple[np.ndarray, np.ndarray]
) -> None:
    """The device's t_off is the exchange's real time: the link's two latencies and serialisations plus
    the server's own time (LiteRT on 784 bytes: well under a millisecond) and loopback."""
    dut.hi_configure({"kind": "remote"}, wifi.address)
    dut.hi_run(data[0][:1])  # the connection is open from here on, as in the paper's setup
    run = dut.hi_run(data[0][RUN][:30])
    shape = preset("wifi").up
    request, reply = REQUEST.size + 784, REPLY_HEAD.size + CRC32.size
    modelled_us = (2 * shape.latency_s + shape.serialisation_s(request) + shape.serialisation_s(reply)) * 1e6
    assert modelled_us == pytest.approx(2417, abs=1)
    assert modelled_us <= statistics.median(run.t_off_us) <= modelled_us + 1500


def stop_after(server: EdgeServer, link: Link, requests: int) -> threading.Thread:
    """A thread that stops `server` once `requests` offload requests of 800 bytes have gone up `link`."""

    def watch() -> None:
        deadline = time.monotonic() + 30
        while sum(c.up.delivered_bytes for c in link.connections()) < requests * 800:
            if time.monotonic() > deadline:
                break
            time.sleep(0.001)
        server.stop()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_a_server_stopped_mid_run_is_an_edge_error_naming_it(
    board: SimMcuBoard, dut: DutSerial, data: tuple[np.ndarray, np.ndarray]
) -> None:
    srv = EdgeServer(SERVER).start()
    link = Link(srv.address, "wifi")
    dut.hi_configure({"kind": "remote"}, link.address)
    stopper = stop_after(srv, link, 45)  # in the second pass (35 samples each)
    start = time.monotonic()
    try:
        with pytest.raises(EdgeError) as caught:
            dut.hi_run(data[0][:500])
    finally:
        stopper.join()
        link.close()
    assert time.monotonic() - start < 10
    message = str(caught.value)
    sample = int(message.removeprefix(f"{board.name}: hi: offload of sample ").split(" ")[0])
    assert 35 < sample < 500
    assert f"to edge server 127.0.0.1:{link.port}: the DUT reports: connection " in message
    partial = caught.value.partial
    assert isinstance(partial, HiRun) and partial.count == 35  # the pass before it, kept
    # the board and the driver stay in step: the next run against a live server works
    with EdgeServer(SERVER) as live:
        dut.hi_configure({"kind": "remote"}, live.address)
        assert dut.hi_run(data[0][:3]).count == 3


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    w=st.tuples(*(st.floats(-20, 20, allow_nan=False) for _ in range(3))),
    theta=st.floats(0, 1),
    logistic=st.booleans(),
)
def test_the_devices_verdicts_are_the_decisions_on_its_own_p1_p2(
    dut: DutSerial,
    server: EdgeServer,
    data: tuple[np.ndarray, np.ndarray],
    w: tuple[float, float, float],
    theta: float,
    logistic: bool,
) -> None:
    decision = LogisticDecision(*w) if logistic else ThresholdDecision(theta)
    dut.hi_configure(decision.to_dict(), server.address)
    run = dut.hi_run(data[0][RUN][:12])
    p = np.c_[run.p1, run.p2]
    p32 = p.astype(np.float32)
    if logistic:  # leave out scores whose sign float32 rounding on the device may flip
        w = tuple(float(np.float32(v)) for v in w)  # the device's coefficients (a tiny b underflows to 0)
        score = w[0] * p[:, 0] + w[1] * p[:, 1] + w[2]
        clear = np.abs(score) > 1e-5 * sum(map(abs, w))
        expected = score >= 0
    else:
        clear = np.ones(len(p), bool)
        expected = p32[:, 0] >= np.float32(theta)
    np.testing.assert_array_equal(run.accepted[clear], expected[clear])
    np.testing.assert_array_equal(run.t_off_us == 0, run.accepted)


@pytest.fixture
def host_dut(tmp_path: Path) -> Iterator[DutSerial]:
    """The firmware core built for the host on a pty: 784-byte input, 10 outputs (input bytes 0-9 as
    uint8 / 4), 200 µs per run; skipped without make and a C compiler."""
    cc = next((name for name in ("cc", "gcc", "clang") if shutil.which(name)), None)
    if shutil.which("make") is None or cc is None:
        pytest.skip("no make and C compiler on PATH")
    core = REPO / "firmware" / "core"
    build = subprocess.run(
        ["make", "-C", str(core), "host-dut", f"BUILD={tmp_path}", f"CC={cc}"], capture_output=True, text=True
    )
    assert build.returncode == 0, build.stdout + build.stderr
    master, slave = pty.openpty()
    tty.setraw(slave)
    process = subprocess.Popen(
        [str(tmp_path / "host_dut"), "784", "200"],
        stdin=master,
        stdout=master,
        env={**os.environ, "HOST_DUT_OUTPUTS": "10"},
    )
    os.close(master)
    dut = DutSerial(os.ttyname(slave), board="host-dut", log_path=tmp_path / "host-dut-serial.log")
    try:
        banner, deadline = b"", time.monotonic() + 10  # off the line first: mid-reply it means a reset
        while b"m-ready\r\n" not in banner and select.select([slave], [], [], deadline - time.monotonic())[0]:
            banner += os.read(slave, 4096)
        assert banner.startswith(b"m-timestamp-mode-performance\r\n") and banner.endswith(b"m-ready\r\n")
        dut.identify()
        yield dut
    finally:
        dut.close()
        process.kill()
        process.wait()
        os.close(slave)


def test_the_c_core_runs_hi_against_the_edge_server(host_dut: DutSerial, server: EdgeServer) -> None:
    samples = np.random.default_rng(4).integers(-128, 128, (40, 784), dtype=np.int8)
    outputs = samples[:, :10].view(np.uint8).astype(np.float64) / 4
    expected = top2(outputs)
    theta = float(np.median(expected[:, 0]))
    edge = EdgeModel(SERVER)
    server_classes = np.array([edge.classify(s.tobytes())[0] for s in samples])

    host_dut.hi_configure(ThresholdDecision(theta).to_dict(), server.address)
    run = host_dut.hi_run(samples)
    np.testing.assert_allclose(np.c_[run.p1, run.p2], expected, rtol=1e-6)
    np.testing.assert_array_equal(run.local_class, outputs.argmax(axis=1))
    np.testing.assert_array_equal(run.accepted, run.p1 >= np.float32(theta))
    assert 0 < run.accepted.sum() < 40
    np.testing.assert_array_equal(run.final_class, np.where(run.accepted, run.local_class, server_classes))
    assert (run.t_inf_us >= 200).all() and (run.t_off_us[~run.accepted] > 0).all()
    assert [w[2] for w in run.windows] == [35, 5]

    host_dut.hi_configure({"kind": "remote"}, server.address)
    np.testing.assert_array_equal(host_dut.hi_run(samples[:5]).final_class, server_classes[:5])
