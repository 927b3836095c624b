"""Hierarchical inference on simulated Linux boards (real OpenSSH sshd on loopback, the board's own
python3) offloading to a real edge server behind the link emulator, checked against the host."""

from __future__ import annotations

import re
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter
from hypothesis import given, settings
from hypothesis import strategies as st
from netproxy import free_port

from labbench.capabilities import HiRun, HiTarget
from labbench.catalog import load_family
from labbench.drivers.ssh import RemoteStreamError, SshBoard
from labbench.edge.link import Link
from labbench.edge.server import EdgeServer
from labbench.errors import EdgeError, UsageError
from labbench.modelinfo import ModelInfo, dequantize_output, quantize_input
from labbench.sim.linux import SimLinuxBoard
from labbench.sim.powerbus import PowerBus
from labbench.strategies.decision import LogisticDecision, top2

ROOT = Path(__file__).resolve().parents[1]
LOCAL_MODEL = ROOT / "fixtures" / "models" / "mnist5k_mlp_int8_aggressive.tflite"
# The server takes what the board sends: the local model's input tensor (int8, same quantization).
SERVER_MODEL = ROOT / "fixtures" / "models" / "mnist5k_mlp_int8.tflite"
DATASET = ROOT / "fixtures" / "datasets" / "mnist5k.npz"
BOARDS = {"rpi4": ("rpi4b", None), "jetson": ("jetson_orin_nano", "15W")}
REMOTE_DIR = "labbench/hi"
MIXED = {"kind": "logistic", "w1": 10.0, "w2": -10.0, "b": -9.5}  # accepts when p1 - p2 >= 0.95


@pytest.fixture(scope="module")
def sims(tmp_path_factory):
    """A simulated Raspberry Pi and Jetson, each its own sshd, sharing one client key and known_hosts."""
    root = tmp_path_factory.mktemp("hi-lab")
    bus = PowerBus()
    started = {}
    try:
        for name, (family, mode) in BOARDS.items():
            sim = SimLinuxBoard(
                name,
                "127.0.0.1",
                free_port(),
                load_family(family),
                bus.channel(f"pm_{name}:1"),
                key=root / "keys" / "id_ed25519",
                known_hosts=root / "known_hosts",
                power_mode=mode,
                state_dir=root / name,
            )
            sim.start()
            started[name] = sim
        yield started
    finally:
        for sim in started.values():
            sim.stop()


def board_for(sim: SimLinuxBoard, log: Path, python: str = "python3") -> SshBoard:
    return SshBoard(
        sim.name,
        sim.host,
        sim.port,
        sim.user,
        sim.key,
        sim.known_hosts,
        remote_dir=REMOTE_DIR,
        python=python,
        ssh_config=None,
        log_path=log,
    )


@pytest.fixture(scope="module")
def boards(sims, tmp_path_factory):
    logs = tmp_path_factory.mktemp("hi-logs")
    built = {name: board_for(sim, logs / f"{name}-ssh.log") for name, sim in sims.items()}
    for b in built.values():
        b.deploy(LOCAL_MODEL, DATASET)
    yield built
    for b in built.values():
        b.close()


@pytest.fixture(scope="module")
def edge():
    """The edge server behind a Wi-Fi link: the board is given the link's address."""
    with EdgeServer(SERVER_MODEL) as server, Link(server.address, "wifi") as link:
        yield server, link


@pytest.fixture(scope="module")
def mnist():
    with np.load(DATASET) as d:
        return d["x_test"]


def host_outputs(x: np.ndarray) -> np.ndarray:
    """The local model on LiteRT on the host: dequantized scores, one row per sample."""
    info = ModelInfo.from_file(LOCAL_MODEL)
    it = Interpreter(model_path=str(LOCAL_MODEL))
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    rows = []
    for sample in x:
        it.set_tensor(inp["index"], quantize_input(info, sample.reshape(inp["shape"])))
        it.invoke()
        rows.append(dequantize_output(info, it.get_tensor(out["index"])).reshape(-1))
    return np.asarray(rows)


def server_classes(server: EdgeServer, x: np.ndarray) -> np.ndarray:
    """The server's model on the bytes the board sends: the local model's quantized input tensor."""
    info = ModelInfo.from_file(LOCAL_MODEL)
    return np.asarray([server.model.classify(quantize_input(info, s.reshape(1, -1)).tobytes())[0] for s in x])


def run(board: SshBoard, decision: dict, to: Link | EdgeServer, x: np.ndarray, **kw) -> HiRun:
    """Hierarchical inference of `x` on `board`, offloading to `to`'s address."""
    board.hi_configure(decision, to.address, **kw)
    return board.hi_run(x)


@pytest.mark.parametrize("name", BOARDS)
def test_every_sample_matches_the_host_local_model_decision_and_server(boards, edge, mnist, name):
    server, link = edge
    x = mnist[:40]
    before = time.monotonic()
    result = run(boards[name], MIXED, link, x)
    after = time.monotonic()
    assert isinstance(boards[name], HiTarget) and result.count == 40
    outputs = host_outputs(x)
    assert np.array_equal(result.local_class, outputs.argmax(1))
    assert np.allclose(np.stack([result.p1, result.p2], 1), top2(outputs), rtol=0, atol=1e-12)
    decision = LogisticDecision(MIXED["w1"], MIXED["w2"], MIXED["b"])
    assert np.array_equal(result.accepted, decision.accept(outputs))
    assert 5 <= (~result.accepted).sum() <= 35  # both paths taken
    expected = np.where(result.accepted, outputs.argmax(1), server_classes(server, x))
    assert np.array_equal(result.final_class, expected)
    assert (result.t_inf_us > 0).all() and (result.t_dec_us > 0).all()
    assert np.array_equal(result.t_off_us > 0, ~result.accepted)
    assert np.array_equal(result.extra["server_us"] > 0, ~result.accepted)
    ((start, end, samples),) = result.windows
    assert before < start < end < after and samples == 40
    busy_s = (result.t_inf_us + result.t_dec_us + result.t_off_us).sum() / 1e6
    assert busy_s <= end - start < busy_s + 0.1  # only the per-sample preparation lies between them
    assert result.extra["server"] == f"127.0.0.1:{link.port}" and result.extra["board"] == name


def test_remote_mode_offloads_every_sample_over_one_connection_in_the_links_time(boards, edge, mnist):
    server, link = edge
    x = mnist[40:100]
    opened = len(link.connections())
    result = run(boards["rpi4"], {"kind": "remote"}, link, x)
    assert not result.accepted.any() and (result.local_class == -1).all()
    assert (result.p1 == 0).all() and (result.t_inf_us == 0).all() and (result.t_dec_us == 0).all()
    assert np.array_equal(result.final_class, server_classes(server, x))
    (connection,) = link.connections()[opened:]  # one connection kept open for every request
    assert connection.up.delivered_bytes == 60 * (16 + 784) and connection.down.delivered_bytes == 60 * 27
    up, down = link.shape("up"), link.shape("down")
    modelled_us = 1e6 * (
        up.latency_s + up.serialisation_s(16 + 784) + down.latency_s + down.serialisation_s(27)
    )
    network_us = result.t_off_us - result.extra["server_us"]
    # 2.42 ms on average: the emulator aims its deliveries early by its own wake-up lateness
    # (labbench.edge.timing), so single ones may be early by that much, the mean is the model's
    assert (network_us >= modelled_us - 500).all(), network_us.min()
    assert modelled_us - 100 < np.mean(network_us) < modelled_us + 1500, np.mean(network_us)  # TCP, Python


def test_threshold_zero_accepts_every_sample_and_never_offloads(boards, edge, mnist):
    _, link = edge
    x = mnist[:30]
    opened = len(link.connections())
    result = run(boards["jetson"], {"kind": "threshold", "theta": 0}, link, x)
    assert result.accepted.all() and np.array_equal(result.final_class, host_outputs(x).argmax(1))
    assert (result.t_off_us == 0).all() and (result.extra["server_us"] == 0).all()
    (connection,) = link.connections()[opened:]  # opened before the first sample, never used
    assert connection.up.delivered_bytes == connection.down.delivered_bytes == 0


@settings(max_examples=4, deadline=None)
@given(
    w1=st.floats(-20, 20, allow_subnormal=False),
    w2=st.floats(-20, 20, allow_subnormal=False),
    b=st.floats(-20, 20, allow_subnormal=False),
)
def test_any_logistic_decision_on_the_board_is_the_hosts(boards, edge, mnist, w1, w2, b):
    server, link = edge
    x = mnist[100:112]
    result = run(boards["rpi4"], {"kind": "logistic", "w1": w1, "w2": w2, "b": b}, link, x)
    outputs = host_outputs(x)
    accepted = LogisticDecision(w1, w2, b).accept(outputs)
    assert np.array_equal(result.accepted, accepted)
    expected = np.where(accepted, outputs.argmax(1), server_classes(server, x))
    assert np.array_equal(result.final_class, expected)


def test_a_server_killed_mid_run_is_an_edge_error_naming_it_within_seconds(boards, mnist):
    board = boards["rpi4"]
    with EdgeServer(SERVER_MODEL) as server, Link(server.address, "wifi") as link:
        stopped: list[float] = []

        def kill_after_some_requests() -> None:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if sum(c.up.delivered_bytes for c in link.connections()) >= 20 * 800:
                    server.stop()
                    stopped.append(time.monotonic())
                    return
                time.sleep(0.005)

        killer = threading.Thread(target=kill_after_some_requests)
        killer.start()
        with pytest.raises(EdgeError) as err:
            run(board, {"kind": "remote"}, link, mnist[:1000])
        raised = time.monotonic()
        killer.join()
    e = err.value
    assert stopped and raised - stopped[0] < 3.0, raised - stopped[0]
    done = e.partial.count
    assert 20 <= done < 1000 and e.target == "rpi4"
    assert e.action == f"offload sample {done} to edge server 127.0.0.1:{link.port}"
    assert re.search(r"request \d+ \(784-byte payload\): connection (closed|dropped)", e.seen), e.seen
    assert "reconnect" in e.seen and e.seen.endswith(f"(after {done} of 1000 samples)")
    assert str(e).startswith("rpi4: offload sample") and e.log == str(board.log_path)


def test_a_server_that_stops_answering_is_an_edge_error_after_the_timeout(boards, mnist):
    board = boards["jetson"]
    with EdgeServer(SERVER_MODEL) as server, Link(server.address, "wifi") as link:
        link.set(latency_s=30.0)  # the reply never comes in time
        t0 = time.monotonic()
        with pytest.raises(EdgeError) as err:
            run(board, {"kind": "remote"}, link, mnist[:5], timeout_s=1.0)
        took = time.monotonic() - t0
    assert took < 5.0, took
    assert err.value.action == f"offload sample 0 to edge server 127.0.0.1:{link.port}"
    assert "no reply within 1 s" in err.value.seen and err.value.partial.count == 0


def test_a_server_taking_other_inputs_refuses_them_by_name(boards, mnist):
    """The board sends its own model's input tensor (int8, 784 bytes); a float32 server says so."""
    fp32 = ROOT / "fixtures" / "models" / "mnist5k_mlp_fp32.tflite"
    with EdgeServer(fp32) as server, pytest.raises(EdgeError) as err:
        run(boards["rpi4"], {"kind": "remote"}, server, mnist[:3])
    assert err.value.action == f"offload sample 0 to edge server 127.0.0.1:{server.port}"
    assert (
        "refused (bad length): payload of 784 bytes, the model's input is float32[1, 784]" in err.value.seen
    )


MANGLER = """#!{python}
import json, subprocess, sys, zlib


def edit(line, **changes):
    record = json.loads(line.rstrip(b"\\n").rsplit(b" *", 1)[0])
    record.update(changes)
    text = json.dumps(record, separators=(",", ":")).encode()
    return b"%s *%08X\\n" % (text, zlib.crc32(text))


runner = subprocess.Popen([sys.executable, *sys.argv[1:]], stdout=subprocess.PIPE)
for n, line in enumerate(runner.stdout):
    sys.stdout.buffer.write({rule} if n == 3 else line)
    sys.stdout.buffer.flush()
sys.exit(runner.wait())
"""

# the board's record for sample 2 changed; what the driver says
TAMPERED = {
    "verdict flipped": (
        "edit(line, accept=False)",
        r"sample 2: accept True \(the decision on its p1 and p2\)",
    ),
    "p2 above p1": ("edit(line, p2=1.0)", r"sample 2: p1 >= p2"),
    "other class kept": ("edit(line, final=(json.loads(line[:-11])['local'] + 1) % 10)", "final = local"),
    "probability out of range": ("edit(line, p1=1.5)", r"sample 2: p1 a number in \[0, 1\], saw 1\.5"),
}


@pytest.mark.parametrize("case", TAMPERED)
def test_a_sample_record_at_odds_with_itself_is_a_stream_error(sims, boards, edge, mnist, tmp_path, case):
    rule, says = TAMPERED[case]
    wrapper = tmp_path / "mangle"
    wrapper.write_text(MANGLER.format(python=sys.executable, rule=rule))
    wrapper.chmod(0o755)
    board = board_for(sims["rpi4"], tmp_path / "rpi4-ssh.log", python=str(wrapper))
    with pytest.raises(RemoteStreamError) as err:
        run(board, {"kind": "threshold", "theta": 0}, edge[1], mnist[:5])
    assert re.search(says, err.value.seen), err.value.seen
    assert err.value.completed == 2 and err.value.partial.count == 2
    board.close()


@pytest.mark.parametrize(
    ("decision", "server", "says"),
    [
        ({"kind": "logistic", "w1": 1.0, "w2": 2.0}, ("127.0.0.1", 5050), "a decision is"),
        ({"kind": "threshold", "theta": float("nan")}, ("127.0.0.1", 5050), "finite numbers"),
        ({"kind": "remote", "theta": 0.5}, ("127.0.0.1", 5050), "a decision is"),
        ({"kind": "threshold", "theta": 0.5}, ("127.0.0.1", 0), "port must be in 1..65535"),
        ({"kind": "threshold", "theta": 0.5}, ("", 5050), "host must be"),
    ],
)
def test_configure_refuses_what_is_not_a_decision_or_a_server(tmp_path, decision, server, says):
    board = SshBoard("rpi4", "127.0.0.1", free_port(), ssh_config=None, log_path=tmp_path / "log")
    with pytest.raises(ValueError, match=says):
        board.hi_configure(decision, server)
    with pytest.raises(UsageError, match="hi_run before hi_configure"):
        board.hi_run(np.zeros((1, 784), np.float32))


def test_a_pass_longer_than_a_second_holds_its_records_and_says_it_is_alive(boards, edge, mnist, tmp_path):
    """The samples' records come after the pass (its time is the strategy's, not the reporting's);
    meanwhile progress records, at most a second apart, keep the host from taking it for a hang."""
    server, _ = edge
    with Link(server.address, "ble") as slow:  # 60 ms of latency per offload: 30 samples take ~2 s
        result = run(boards["rpi4"], {"kind": "remote"}, slow, mnist[:30])
    assert result.count == 30 and (result.t_off_us > 60_000).all()
    ((w0, w1, n),) = result.windows
    assert n == 30 and w1 - w0 == pytest.approx(result.t_off_us.sum() / 1e6, rel=0.02)
    log = boards["rpi4"].log_path.read_text()
    assert '"type":"progress"' in log
