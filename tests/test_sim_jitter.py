"""Latency jitter and power noise of the simulated boards, seen as the bench sees them: through the real
RFC 2217 port with DutSerial, and on the power bus's ground-truth ledger."""

from __future__ import annotations

import math
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from labbench import inventory
from labbench.catalog import load_family
from labbench.drivers.dut_serial import DutSerial, tensor_bytes
from labbench.errors import LabConfigError
from labbench.modelinfo import ModelInfo
from labbench.sim.lab import SimLab
from labbench.sim.linux import SimLinuxBoard
from labbench.sim.mcu import JITTER_PCT, OUTLIER_PCT, OUTLIER_RATE, SimMcuBoard
from labbench.sim.powerbus import POWER_NOISE_PCT, PowerBus

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "fixtures" / "models" / "digits_mlp_int8.tflite"
FAMILY = "coral_dev_board_micro"  # no boot ROM to wait for, ~1 ms per inference, active_w != idle_w
BAUD = 921600
SAMPLE = tensor_bytes(np.zeros(64, np.int8))
N = 300  # per-inference samples: the spread is estimated within sqrt(1 / 2N) = 4 % of itself


def nominal_us(board: SimMcuBoard) -> float:
    return (
        board.family.device_model.inference_us(ModelInfo.from_file(DIGITS).macs, "int8") * board.speed_factor
    )


class Bench:
    """A simulated board on its own bus channel, the bench's driver connected."""

    def __init__(self, name: str, **settings):
        self.channel = PowerBus().channel(f"{name}:1")
        self.board = SimMcuBoard(
            name, family=FAMILY, model_path=DIGITS, baud=BAUD, bus_channel=self.channel, **settings
        )
        self.board.start()
        self.dut = DutSerial(self.board.url, board=name, baud=BAUD)

    def latencies_us(self, n: int = N) -> np.ndarray:
        self.dut.upload(SAMPLE)
        run = self.dut.run_timed(np.zeros(64, np.int8), n, 0, per_inference=True)
        return np.array(run.latencies_us)

    def close(self) -> None:
        self.dut.close()
        self.board.stop()


@pytest.fixture
def bench():
    made: list[Bench] = []

    def make(name: str, **settings) -> Bench:
        made.append(Bench(name, **settings))
        return made[-1]

    yield make
    for b in made:
        b.close()


@pytest.mark.parametrize("jitter_pct", [0.5, 2.0])
def test_per_inference_latencies_spread_as_configured_around_the_device_model(bench, jitter_pct):
    b = bench(f"jitter{jitter_pct}", jitter_pct=jitter_pct, outlier_rate=0)
    lat = b.latencies_us()
    nominal, cv = nominal_us(b.board), jitter_pct / 100
    assert len(set(lat)) > 10  # not one number to the microsecond
    assert lat.mean() == pytest.approx(nominal, rel=4 * cv / math.sqrt(N))
    assert lat.std(ddof=1) / lat.mean() == pytest.approx(cv, rel=4 / math.sqrt(2 * N))


def test_outliers_hit_the_configured_share_by_the_configured_amount(bench):
    b = bench("outliers", jitter_pct=1.0, outlier_rate=0.05, outlier_pct=20)
    factor = b.latencies_us() / nominal_us(b.board)
    hit = factor[factor > 1.1]  # 10 standard deviations of the jitter: outliers only
    assert len(hit) / N == pytest.approx(0.05, abs=4 * math.sqrt(0.05 * 0.95 / N))
    assert np.median(hit) == pytest.approx(1.2, abs=0.01)
    assert np.median(factor) == pytest.approx(1.0, abs=0.005)


def test_default_timing_is_jittered_with_a_mean_on_the_device_model(bench):
    b = bench("defaults")
    assert (b.board.jitter_pct, b.board.outlier_rate, b.board.outlier_pct) == (
        JITTER_PCT,
        OUTLIER_RATE,
        OUTLIER_PCT,
    )
    lat = b.latencies_us(100)
    assert len(set(lat)) > 10
    assert lat.mean() == pytest.approx(nominal_us(b.board) * (1 + OUTLIER_RATE * OUTLIER_PCT / 100), rel=0.01)


def test_jitter_pct_0_gives_the_device_models_exact_timing(bench):
    b = bench("exact", jitter_pct=0)
    nominal = nominal_us(b.board)
    assert np.all(np.abs(b.latencies_us(50) - nominal) <= 1)
    assert abs(b.dut.infer(100, 5).elapsed_us - 100 * nominal) <= 1


def test_seeded_boards_answer_alike_and_other_seeds_differently(bench):
    first, second = bench("one", seed=7).latencies_us(100), bench("two", seed=7).latencies_us(100)
    other = bench("three", seed=8).latencies_us(100)
    assert np.all(np.abs(first - second) <= 1)  # the stamps' whole microseconds: within one
    assert np.mean(np.abs(first - other) > 1) > 0.5


def test_the_bus_draws_active_power_for_exactly_the_jittered_durations(bench):
    b = bench("ledger", outlier_rate=0.2, power_noise_pct=0)  # jittered, outliers often; exact levels
    active_w = b.board.family.power.active_w
    b.dut.upload(SAMPLE)
    for _ in range(20):
        t0 = time.monotonic()
        run = b.dut.infer(1, 0)
        t1 = time.monotonic()
        active_s = b.channel.levels(t0, t1).get(active_w, 0.0)
        assert abs(active_s - run.elapsed_us / 1e6) <= 1e-6  # the DUT's stamps are whole microseconds


def test_noisy_power_over_a_jittered_window_matches_the_dut_time_and_keeps_the_bus_small(bench):
    b = bench("window")
    power = b.board.family.power
    b.dut.upload(SAMPLE)
    entries = len(b.channel._segments)
    run = b.dut.run_timed(np.zeros(64, np.int8), int(0.4e6 / nominal_us(b.board)), 5)
    assert (
        len(b.channel._segments) - entries <= 6
    )  # upload, idle, active, idle: not one per inference or cell
    busy_s = run.extra["busy_us"] / 1e6
    slack = 2 * run.extra["clock_uncertainty_s"] + 1e-4
    noise = (
        POWER_NOISE_PCT / 100 / math.sqrt(busy_s / b.board.power_noise.period_s)
    )  # of a mean over the cells
    truth = b.channel.energy_j(run.host_start, run.host_end)
    allowed = 4 * noise * power.active_w * busy_s + 2 * slack * 1.2 * power.active_w
    assert abs(truth - power.active_w * busy_s) <= allowed
    inside = b.channel.levels(run.host_start + slack, run.host_end - slack)
    watts = np.array(list(inside))
    assert len(watts) > 20 and np.all(np.abs(watts / power.active_w - 1) < 6 * POWER_NOISE_PCT / 100)


def test_idle_power_varies_by_the_configured_noise(bench):
    b = bench("idle", power_noise_pct=3.0)
    idle_w = b.board.family.power.idle_w
    t = time.monotonic()
    levels = b.channel.levels(t, t + 4.0)  # the idle level posted last holds until the next command
    share = np.array(list(levels.values())) / 4.0
    rel = np.array(list(levels)) / idle_w - 1
    cells = 4.0 / b.board.power_noise.period_s
    assert len(levels) >= cells - 1
    assert float(share @ rel) == pytest.approx(0.0, abs=4 * 0.03 / math.sqrt(cells))
    assert math.sqrt(float(share @ rel**2)) == pytest.approx(0.03, rel=4 / math.sqrt(2 * cells))


def test_power_noise_0_posts_the_profile_levels_exactly(bench):
    b = bench("flat", power_noise_pct=0)
    assert b.channel.power_w() == b.board.family.power.idle_w


def test_settings_are_checked():
    for bad in ({"jitter_pct": -1}, {"outlier_rate": 1.5}, {"outlier_pct": -5}, {"power_noise_pct": -0.1}):
        with pytest.raises(LabConfigError, match="need jitter_pct"):
            SimMcuBoard("bad", family=FAMILY, **bad)


def test_the_sim_block_configures_jitter_and_noise(tmp_path):
    lab_yaml = tmp_path / "lab.yaml"
    lab_yaml.write_text("""\
lab: {name: jitter}
boards:
  coral:
    family: coral_dev_board_micro
    serial: {url: "rfc2217://127.0.0.1:14191"}
    sim: {seed: 3, jitter_pct: 0.5, outlier_rate: 0.01, outlier_pct: 15, power_noise_pct: 1}
  pi:
    family: rpi4b
    ssh: {host: 127.0.0.1, port: 12391, key: keys/id}
    sim: {seed: pi-a, power_noise_pct: 4}
""")
    lab = inventory.load(lab_yaml)
    sim = SimLab(lab, tmp_path)
    coral, _ = sim._board(lab.boards["coral"])
    assert (coral.seed, coral.jitter_pct, coral.outlier_rate, coral.outlier_pct, coral.power_noise.pct) == (
        3,
        0.5,
        0.01,
        15,
        1,
    )
    pi, _ = sim._board(lab.boards["pi"])
    assert pi.board.power_noise.pct == 4
    lab_yaml.write_text(lab_yaml.read_text().replace("jitter_pct: 0.5", "jitter_pct: 50"))
    with pytest.raises(LabConfigError, match=r"boards\.coral\.sim\.jitter_pct"):
        inventory.load(lab_yaml)


def test_a_linux_board_posts_noisy_levels(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    channel = PowerBus().channel("pm_pi:1")
    sim = SimLinuxBoard(
        "pi",
        "127.0.0.1",
        port,
        load_family("rpi4b"),
        channel,
        key=tmp_path / "id_ed25519",
        known_hosts=tmp_path / "known_hosts",
        state_dir=tmp_path / "state",
    )
    sim.start()
    try:
        time.sleep(1.3)
        t1 = time.monotonic() - 0.1
        levels = channel.levels(t1 - 1.0, t1)  # the idle board: sshd uses no CPU
    finally:
        sim.stop()
    rel = np.array(list(levels)) / sim.power.idle_w - 1
    share = np.array(list(levels.values())) / 1.0
    cells = 1.0 / sim.power_noise.period_s
    assert sim.power_noise.pct == POWER_NOISE_PCT and len(levels) >= cells - 1
    assert float(share @ rel) == pytest.approx(0.0, abs=4 * POWER_NOISE_PCT / 100 / math.sqrt(cells))
    assert math.sqrt(float(share @ rel**2)) == pytest.approx(
        POWER_NOISE_PCT / 100, rel=4 / math.sqrt(2 * cells)
    )
