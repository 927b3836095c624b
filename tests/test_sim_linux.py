"""Simulated Linux boards: a real sshd that plain OpenSSH clients use, and power that follows CPU time."""

from __future__ import annotations

import os
import pwd
import re
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from labbench.catalog import load_family
from labbench.drivers.ssh import SshBoard
from labbench.sim.linux import SimBoardError, SimLinuxBoard, sshd_quote
from labbench.sim.powerbus import POWER_NOISE_PCT, PowerBus

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "fixtures" / "models" / "digits_mlp_int8.tflite"
DATASET = ROOT / "fixtures" / "datasets" / "digits.npz"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_board(
    tmp_path: Path,
    bus: PowerBus,
    name: str = "rpi4",
    family: str = "rpi4b",
    power_mode: str | None = None,
    power_noise_pct: float = 0.0,
) -> SimLinuxBoard:
    """A board posting exact power levels unless given `power_noise_pct` (tests/test_sim_jitter.py covers
    the noise)."""
    sim = SimLinuxBoard(
        name,
        "127.0.0.1",
        free_port(),
        load_family(family),
        bus.channel(f"pm_{name}:1"),
        key=tmp_path / "keys" / "id_ed25519",
        known_hosts=tmp_path / "known_hosts",
        power_mode=power_mode,
        state_dir=tmp_path / "state" / name,
        power_noise_pct=power_noise_pct,
    )
    sim.start()
    return sim


@pytest.fixture
def rpi(tmp_path):
    bus = PowerBus()
    sim = start_board(tmp_path, bus)
    yield sim, bus.channel("pm_rpi4:1")
    sim.stop()


@pytest.fixture
def noisy_rpi(tmp_path):
    """With the default power noise on its levels."""
    bus = PowerBus()
    sim = start_board(tmp_path, bus, power_noise_pct=POWER_NOISE_PCT)
    yield sim, bus.channel("pm_rpi4:1")
    sim.stop()


def openssh(sim: SimLinuxBoard, *args: str, tool: str = "ssh") -> subprocess.CompletedProcess:
    port = ["-p", str(sim.port)] if tool == "ssh" else ["-P", str(sim.port)]
    return subprocess.run(
        [
            tool,
            *port,
            "-i",
            str(sim.key),
            "-o",
            f"UserKnownHostsFile={sim.known_hosts}",
            "-o",
            "BatchMode=yes",
            *args,
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_plain_ssh_and_scp_work_with_the_lab_key_and_strict_host_keys(rpi, tmp_path):
    sim, _ = rpi
    target = f"{sim.user}@127.0.0.1"
    assert openssh(sim, target, "true").returncode == 0
    assert sim.user == pwd.getpwuid(os.getuid()).pw_name  # no user given: the account ssh defaults to
    assert openssh(sim, "-F", "none", "127.0.0.1", "true").returncode == 0
    where = openssh(sim, target, 'pwd; echo "$HOME"; command -v python3')
    assert where.stdout.split() == [str(sim.home), str(sim.home), str(sim.state_dir / "bin" / "python3")]

    sent = tmp_path / "hello.txt"
    sent.write_text("hello board\n")
    assert openssh(sim, str(sent), f"{target}:hello.txt", tool="scp").returncode == 0  # SFTP protocol
    assert (sim.home / "hello.txt").read_text() == "hello board\n"
    assert openssh(sim, "-O", str(sent), f"{target}:legacy.txt", tool="scp").returncode == 0  # scp protocol
    assert (sim.home / "legacy.txt").read_text() == "hello board\n"
    back = tmp_path / "back.txt"
    assert openssh(sim, f"{target}:hello.txt", str(back), tool="scp").returncode == 0
    assert back.read_text() == "hello board\n"


def test_the_host_key_is_in_known_hosts_and_the_client_key_was_generated(rpi):
    sim, _ = rpi
    public = (sim.state_dir / "etc" / "ssh_host_ed25519_key.pub").read_text().split()[:2]
    assert f"[127.0.0.1]:{sim.port} {public[0]} {public[1]}" in sim.known_hosts.read_text().splitlines()
    assert sim.key.exists() and (sim.key.parent / "id_ed25519.pub").exists()
    assert oct(sim.key.parent.stat().st_mode & 0o777) == "0o700"


def test_a_state_directory_with_spaces_quotes_and_percent_signs_works(tmp_path):
    """Its path reaches sshd_config, passwd and the python3 wrapper quoted: nothing in it is run."""
    bus = PowerBus()
    odd = tmp_path / "lab #1 %h 'q' \"dq\" $(touch pwned) \\ end"
    sim = SimLinuxBoard(
        "rpi4",
        "127.0.0.1",
        free_port(),
        load_family("rpi4b"),
        bus.channel("pm:1"),
        key=tmp_path / "keys" / "id_ed25519",
        known_hosts=tmp_path / "known_hosts",
        state_dir=odd / "state",
        power_noise_pct=0.0,
    )
    sim.start()
    try:
        where = openssh(sim, f"{sim.user}@127.0.0.1", 'pwd; command -v python3; python3 -c "print(6 * 7)"')
        assert where.returncode == 0, where.stderr
        assert where.stdout.splitlines() == [str(sim.home), str(sim.state_dir / "bin" / "python3"), "42"]
    finally:
        sim.stop()
    assert not list(tmp_path.rglob("pwned")) and not Path("pwned").exists()


@pytest.mark.parametrize(
    ("options", "refused"),
    [
        ({"name": "esp32; touch /tmp/x"}, "not a board name"),
        ({"host": "127.0.0.1\nListenAddress 0.0.0.0"}, "is not a host name or address"),
        ({"user": "pi\nAllowUsers root"}, "is not a valid user name"),
        ({"user": "root$(touch /tmp/x)"}, "is not a valid user name"),
        ({"state_dir": "lab:v2/state"}, "has a ':' or a control character"),
        ({"state_dir": "lab\nHostKey /x/state"}, "has a ':' or a control character"),
    ],
)
def test_values_that_cannot_be_written_safely_are_refused_before_anything_is_created(
    tmp_path, monkeypatch, options, refused
):
    monkeypatch.chdir(tmp_path)
    given = {"name": "rpi4", "host": "127.0.0.1", "state_dir": tmp_path / "state", **options}
    with pytest.raises(SimBoardError, match=re.escape(refused)):
        SimLinuxBoard(
            port=free_port(),
            family=load_family("rpi4b"),
            bus_channel=PowerBus().channel("pm:1"),
            key=tmp_path / "id_ed25519",
            **given,
        )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("value", "quoted"),
    [
        ("/tmp/a b", '"/tmp/a b"'),
        ('say "hi"', r'"say \"hi\""'),
        ("back\\slash", r'"back\\slash"'),
        ("PATH=/x:/y", '"PATH=/x:/y"'),
    ],
)
def test_sshd_quote(value, quoted):
    assert sshd_quote(value) == quoted


def test_sshd_quote_refuses_a_line_break():
    with pytest.raises(ValueError, match="control character"):
        sshd_quote("/tmp/x\nPermitRootLogin yes")


def test_stop_removes_what_start_created(tmp_path):
    bus = PowerBus()
    sim = start_board(tmp_path, bus)
    other = start_board(tmp_path, bus, name="jetson", family="jetson_orin_nano", power_mode="7W")
    try:
        (pid,) = sim.pids()
        assert openssh(sim, f"{sim.user}@127.0.0.1", "true").returncode == 0
        sim.stop()
        assert not sim.state_dir.exists() and not Path(f"/proc/{pid}").exists()
        assert f"[127.0.0.1]:{sim.port} " not in sim.known_hosts.read_text()
        assert f"[127.0.0.1]:{other.port} " in other.known_hosts.read_text()  # the other board's line stays
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", sim.port)) != 0
        assert sim.key.exists()  # the lab's client key outlives a board
    finally:
        other.stop()


def test_a_port_in_use_is_an_error_with_sshds_own_words(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        sim = SimLinuxBoard(
            "rpi4",
            "127.0.0.1",
            port,
            load_family("rpi4b"),
            PowerBus().channel("pm:1"),
            key=tmp_path / "id_ed25519",
            known_hosts=tmp_path / "known_hosts",
            state_dir=tmp_path / "state",
        )
        in_use = rf"^rpi4: start sshd on 127.0.0.1:{port}: .*Address already in use"
        with pytest.raises(SimBoardError, match=in_use):
            sim.start()
    assert sim.pids() == [] and f":{port} " not in sim.known_hosts.read_text()
    assert (sim.state_dir / "sshd.log").exists()  # kept for diagnosis until the next start or stop
    sim.stop()
    assert not sim.state_dir.exists()


def test_power_is_idle_plus_active_share_of_the_cpu_time_of_the_sshd_tree(rpi):
    sim, channel = rpi
    idle_w, active_w = sim.power.idle_w, sim.power.active_w
    time.sleep(0.5)
    t0 = time.monotonic()
    time.sleep(0.6)
    assert channel.mean_power_w(t0, time.monotonic()) == pytest.approx(idle_w, abs=0.02 * (active_w - idle_w))

    busy = (
        "import os,time\nt=time.monotonic()\nwhile time.monotonic()-t<1.2: pass\nprint(sum(os.times()[:4]))"
    )
    t0 = time.monotonic()
    out = openssh(sim, f"{sim.user}@127.0.0.1", "python3", "-c", f"'{busy}'")
    deadline = time.monotonic() + 10
    while channel.power_w() != idle_w and time.monotonic() < deadline:  # the sampler has posted it all
        time.sleep(sim.sample_period_s / 4)
    t1 = time.monotonic()
    board_cpu_s = float(out.stdout)  # the busy process's own CPU time, as its kernel counted it
    drawn_above_idle_j = channel.energy_j(t0, t1) - idle_w * (t1 - t0)
    attributed_cpu_s = drawn_above_idle_j / (active_w - idle_w)
    # what the ledger attributes is the busy process's CPU time plus sshd's own work
    assert board_cpu_s <= attributed_cpu_s < board_cpu_s + 0.25, (board_cpu_s, attributed_cpu_s)
    assert idle_w < channel.stats(t0, t1).peak_power_w <= active_w


def test_jetson_power_follows_its_power_mode(tmp_path):
    bus = PowerBus()
    sims = [
        start_board(tmp_path / mode, bus, name=f"jetson{mode}", family="jetson_orin_nano", power_mode=mode)
        for mode in ("7W", "15W")
    ]
    try:
        time.sleep(0.3)
        now = time.monotonic()
        levels = [bus.channel(f"pm_jetson{mode}:1").power_w(now) for mode in ("7W", "15W")]
        assert levels == [s.power.idle_w for s in sims] and levels[0] < levels[1]
    finally:
        for sim in sims:
            sim.stop()


def test_pm1000_measures_the_energy_the_ledger_says_the_simulated_pi_drew(noisy_rpi):
    pm1000_sim = pytest.importorskip("labbench.sim.pm1000", reason="no PM1000+ simulator yet")
    pm1000 = pytest.importorskip("labbench.instruments.pm1000", reason="no PM1000+ driver yet")
    sim, channel = noisy_rpi
    board = SshBoard(sim.name, sim.host, sim.port, sim.user, sim.key, sim.known_hosts, ssh_config=None)
    board.deploy(MODEL)
    with np.load(DATASET) as d:
        sample = d["x_test"][0]
    probe = board.run_timed(sample, count=50_000, warmup=100)
    count = int(6 * probe.count / (probe.host_end - probe.host_start))  # about 6 s of inferences
    with pm1000_sim.Pm1000Sim("pm_rpi4", channel=channel, use_pty=False) as instrument:
        meter = pm1000.Pm1000(instrument.resource, name="pm_rpi4")
        with meter, meter.capture() as capture:
            run = board.run_timed(sample, count=count, warmup=100)
    board.close()
    # whole instrument updates inside the run, one period in from each end: no update mixes in the
    # cold start before the run or the idle board after it, and none is split at a window edge
    period_s = meter.update_period_s
    ends = [t for t in capture.trace.t_s if run.host_start + 2 * period_s <= t <= run.host_end - period_s]
    t0, t1 = ends[0], ends[-1]
    assert t1 - t0 >= 4 * period_s
    truth_j = channel.energy_j(t0, t1)
    for method in ("trace", "integrator"):
        measured = capture.trace.energy(t0, t1, method=method)
        assert measured.energy_j == pytest.approx(truth_j, rel=0.02), (method, measured, truth_j)
    assert truth_j / (t1 - t0) > sim.power.idle_w + 0.1 * (sim.power.active_w - sim.power.idle_w)  # it ran
