"""Offloading in the simulated lab: edge servers and link emulators started from lab.yaml, a board's
radio power drawn while an exchange is in flight, and the link and the server changed at run time.

The lab is served in this process (the objects `labbench sim up` runs) with a simulated Raspberry Pi
4B (a real sshd) on Wi-Fi. The power bus is the ground truth. The Pi's Wi-Fi offload of a CIFAR-10
image is checked against the seed paper's Table 3 (9.68 ms, 27.67 mJ); that needs a server model
taking a 32x32x3 input, MLPerf Tiny's ResNet-8 beside the project (skipped without ../shared).
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import numpy as np
import pytest

from labbench import catalog, inventory
from labbench.edge.client import EdgeClient
from labbench.errors import EdgeError, UsageError
from labbench.sim import lab as simlab

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "fixtures" / "models"
RESNET8 = REPO.parent / "shared" / "workloads" / "mlperf_tiny" / "pretrainedResnet_quant.tflite"
TABLE3_PI_WIFI = {"latency_ms": 9.68, "energy_mj": 27.67}  # seed 004 Table 3, CIFAR-10, Raspberry Pi


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pi_lab(tmp_path_factory):
    d = tmp_path_factory.mktemp("offload-lab")
    cifar = f"""
  edge_cifar10:
    host: 127.0.0.1
    port: {_free_port()}
    model: {RESNET8}
    sim: {{service_ms: 6.95}}"""
    (d / "lab.yaml").write_text(f"""lab: {{name: offload-lab}}
instruments:
  meter:
    kind: pm1000
    resource: TCPIP::127.0.0.1::{_free_port()}::SOCKET
    sim: {{}}
boards:
  rpi4:
    family: rpi4b
    ssh: {{host: 127.0.0.1, port: {_free_port()}, key: keys/id, known_hosts: known_hosts}}
    power: {{instrument: meter}}
    link: wifi
    sim: {{}}
servers:
  edge_digits:
    host: 127.0.0.1
    port: {_free_port()}
    model: {MODELS / "digits_server_fp32.tflite"}
    sim: {{service_ms: 6.95}}{cifar if RESNET8.is_file() else ""}
""")
    lab = inventory.load(d / "lab.yaml")
    state = simlab.state_dir(lab)
    state.mkdir(parents=True)
    sim = simlab.SimLab(lab, state)
    sim.start()
    yield lab, sim
    sim.stop()


def _input(client_model: Path) -> bytes:
    from labbench.modelinfo import ModelInfo

    t = ModelInfo.from_file(client_model).inputs[0]
    rng = np.random.default_rng(0)
    dtype = np.dtype(t.dtype)
    if np.issubdtype(dtype, np.integer):
        return rng.integers(np.iinfo(dtype).min, np.iinfo(dtype).max + 1, t.shape, dtype=dtype).tobytes()
    return rng.random(t.shape, dtype=np.float32).astype(dtype).tobytes()


def _sample_period_s(sim) -> float:
    """How far the simulated Pi's draw lags its load (its power sampler's period)."""
    return sim.components["boards.rpi4"].board.sample_period_s


def _offloads(sim, server: str, model: Path, count: int) -> tuple[float, float, float]:
    """`count` offloads back to back through the Pi's link: (t0, t1, mean round trip in ms)."""
    host, port = sim.link_address("rpi4", server)
    payload = _input(model)
    with EdgeClient(host, port) as client:
        client.infer(payload)  # the connection is kept open, as a device's offload keeps it
        time.sleep(0.3)  # a whole power sample of the board at idle before the measured span
        t0 = time.monotonic()
        rtts = [client.infer(payload).rtt_s for _ in range(count)]
        t1 = time.monotonic()
    return t0, t1, float(np.mean(rtts)) * 1e3


def test_a_board_draws_its_links_power_while_an_offload_is_in_flight(pi_lab):
    _, sim = pi_lab
    link = catalog.load_family("rpi4b").link("wifi")
    radio = sim.radios["rpi4"]
    t0, t1, _ = _offloads(sim, "edge_digits", MODELS / "digits_server_fp32.tflite", 100)
    time.sleep(0.3)  # the board's power sampler posts the period that held the last offload
    in_flight = radio.in_flight_s(t0, t1)
    assert 0.9 < in_flight / (t1 - t0) <= 1.0  # back to back: the radio is on nearly all the span
    channel = sim.bus.channel(simlab.bus_channel("meter"))
    idle_w = catalog.load_family("rpi4b").power.idle_w
    # the sampler posts each period's draw at its end: the span's draw lies one period later
    lag = _sample_period_s(sim)
    drawn = channel.energy_j(t0 + lag, t1 + lag)
    expected = link.power_w * in_flight + idle_w * (t1 - t0 - in_flight)
    assert drawn == pytest.approx(expected, rel=0.05)


@pytest.mark.skipif(
    not RESNET8.is_file(), reason="MLPerf Tiny ResNet-8 is not beside the project (../shared)"
)
def test_the_pis_wifi_offload_of_a_cifar10_image_reproduces_table3(pi_lab):
    _, sim = pi_lab
    t0, t1, rtt_ms = _offloads(sim, "edge_cifar10", RESNET8, 200)
    time.sleep(0.3)
    lag = _sample_period_s(sim)
    per_offload_mj = sim.bus.channel(simlab.bus_channel("meter")).energy_j(t0 + lag, t1 + lag) * 1e3 / 200
    assert rtt_ms == pytest.approx(TABLE3_PI_WIFI["latency_ms"], rel=0.10)
    assert per_offload_mj == pytest.approx(TABLE3_PI_WIFI["energy_mj"], rel=0.10)


def test_ble_is_far_slower_and_costs_far_more_energy_per_image_than_wifi():
    """The paper's ordering (§4.2.1), from the Pi's catalog figures the simulated links use."""
    pi = catalog.load_family("rpi4b")
    wifi, ble = pi.link("wifi"), pi.link("ble")
    request, reply = 3072 + 16, 27  # a CIFAR-10 image and the protocol's frames
    t_wifi, t_ble = wifi.offload_ms(request, reply), ble.offload_ms(request, reply)
    assert t_ble > 50 * t_wifi
    assert ble.power_w * t_ble > 40 * wifi.power_w * t_wifi


def test_a_slower_link_set_at_run_time_slows_the_offload(pi_lab):
    _, sim = pi_lab
    model = MODELS / "digits_server_fp32.tflite"
    *_, before = _offloads(sim, "edge_digits", model, 5)
    profile = sim.link_set("rpi4", {"latency_s": 0.02})
    try:
        *_, after = _offloads(sim, "edge_digits", model, 5)
    finally:
        sim.link_set("rpi4", {"latency_s": catalog.load_family("rpi4b").link("wifi").latency_ms / 1e3})
    assert profile["up"]["latency_s"] == 0.02
    assert after - before == pytest.approx(2 * (20 - 1.15), abs=3.0)


def test_a_stopped_server_fails_the_offload_with_an_error_naming_it(pi_lab):
    _, sim = pi_lab
    host, port = sim.link_address("rpi4", "edge_digits")
    sim.server_stop("edge_digits")
    try:
        with EdgeClient(host, port, timeout_s=2) as client, pytest.raises(EdgeError) as exc:
            client.infer(_input(MODELS / "digits_server_fp32.tflite"))
        assert f"{host}:{port}" in str(exc.value)
    finally:
        sim.server_start("edge_digits")


def test_an_unknown_board_or_server_is_a_usage_error(pi_lab):
    _, sim = pi_lab
    with pytest.raises(UsageError, match="no simulated offload link"):
        sim.link_address("esp32", "edge_digits")
    with pytest.raises(UsageError, match='unknown edge server "edge_mnist"'):
        sim.link_address("rpi4", "edge_mnist")
