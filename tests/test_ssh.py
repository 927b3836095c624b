"""The SSH driver against simulated Linux boards (real OpenSSH sshd on loopback, real paramiko)."""

from __future__ import annotations

import ast
import hashlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from labbench.capabilities import Deployer, InferenceTarget
from labbench.catalog import load_family
from labbench.drivers.ssh import RUNNER, RemoteRunError, SshBoard
from labbench.errors import RemoteError
from labbench.inventory import BoardEntry, SshConn
from labbench.modelinfo import ModelInfo, dequantize_output, quantize_input
from labbench.sim.linux import SimLinuxBoard, cpu_times_s
from labbench.sim.powerbus import PowerBus

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "fixtures" / "models" / "digits_mlp_int8.tflite"
DATASET = ROOT / "fixtures" / "datasets" / "digits.npz"
BOARDS = {"rpi4": ("rpi4b", None), "jetson": ("jetson_orin_nano", "15W")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A simulated Raspberry Pi and Jetson, each its own sshd, sharing one client key and known_hosts."""
    root = tmp_path_factory.mktemp("ssh-lab")
    bus = PowerBus()
    sims = {}
    try:
        for name, (family, mode) in BOARDS.items():
            sim = SimLinuxBoard(name, "127.0.0.1", free_port(), load_family(family),
                                bus.channel(f"pm_{name}:1"), key=root / "keys" / "id_ed25519",
                                known_hosts=root / "known_hosts", power_mode=mode, state_dir=root / name)
            sim.start()
            sims[name] = sim
        yield sims
    finally:
        for sim in sims.values():
            sim.stop()


def board_for(sim: SimLinuxBoard, **overrides) -> SshBoard:
    """The driver as a lab builds it: from a lab.yaml entry."""
    entry = BoardEntry(name=sim.name, family=sim.family.name, power_mode=sim.power_mode,
                       ssh=SshConn(host=sim.host, port=sim.port, user=sim.user, key=sim.key,
                                   known_hosts=sim.known_hosts, **overrides))
    return SshBoard.from_lab(entry, sim.family, lab="test lab")


@pytest.fixture(scope="module")
def deployed(lab):
    boards = {name: board_for(sim) for name, sim in lab.items()}
    records = {name: b.deploy(MODEL, DATASET) for name, b in boards.items()}
    yield boards, records
    for b in boards.values():
        b.close()


@pytest.fixture(scope="module")
def digits():
    with np.load(DATASET) as d:
        return d["x_test"], d["y_test"]


def host_scores(x: np.ndarray) -> np.ndarray:
    """The same model and data on LiteRT on the host: dequantized scores, one row per sample."""
    info = ModelInfo.from_file(MODEL)
    it = Interpreter(model_path=str(MODEL))
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    rows = []
    for sample in x:
        it.set_tensor(inp["index"], quantize_input(info, sample.reshape(inp["shape"])))
        it.invoke()
        rows.append(dequantize_output(info, it.get_tensor(out["index"])).reshape(-1))
    return np.asarray(rows)


def test_board_has_the_deploy_and_inference_capabilities(deployed):
    boards, _ = deployed
    assert isinstance(boards["rpi4"], Deployer) and isinstance(boards["rpi4"], InferenceTarget)


def test_deploy_puts_files_in_the_per_lab_directory_and_skips_on_hash(lab, deployed):
    boards, first = deployed
    board, sim = boards["rpi4"], lab["rpi4"]
    lab_dir = sim.home / "labbench" / "test lab"
    assert first["rpi4"]["dir"] == str(lab_dir)
    for role, local in (("runner", Path(str(RUNNER))), ("model", MODEL), ("dataset", DATASET)):
        record = first["rpi4"]["files"][role]
        on_board = Path(record["remote"])
        assert on_board.parent.parent == lab_dir or on_board.parent == lab_dir
        assert hashlib.sha256(on_board.read_bytes()).hexdigest() == record["sha256"] == \
            hashlib.sha256(local.read_bytes()).hexdigest()
    again = board.deploy(MODEL, DATASET)
    assert again["skipped"] and all(f["skipped"] for f in again["files"].values())
    assert '"skipped": true' in (lab_dir / "deployment.json").read_text()

    (lab_dir / "models" / MODEL.name).write_bytes(b"stale")  # a changed file is sent again
    third = board.deploy(MODEL, DATASET)
    assert not third["files"]["model"]["skipped"] and third["files"]["runner"]["skipped"]
    assert (lab_dir / "models" / MODEL.name).read_bytes() == MODEL.read_bytes()


@pytest.mark.parametrize("name", BOARDS)
def test_accuracy_on_the_board_equals_the_hosts(deployed, digits, name):
    boards, _ = deployed
    x, y = digits
    on_board = boards[name].classify(x)
    on_host = host_scores(x)
    assert on_board.shape == (len(x), 10)
    assert np.array_equal(on_board, on_host)
    accuracy = float(np.mean(on_board.argmax(1) == y))
    assert accuracy == float(np.mean(on_host.argmax(1) == y)) > 0.9
    subset = boards[name].classify(x[:7])  # samples the board does not hold go over stdin
    assert np.array_equal(subset, on_host[:7])


@pytest.mark.parametrize("name", BOARDS)
def test_timed_run_brings_back_per_inference_latencies_and_extras(deployed, digits, name):
    boards, _ = deployed
    x, y = digits
    before = time.monotonic()
    run = boards[name].run_timed(x[3], count=300, warmup=20)
    assert run.count == 300 and all(lat > 0 for lat in run.latencies_us)
    assert before < run.host_start < run.host_end < time.monotonic()
    assert int(run.outputs.argmax()) == y[3]
    extra = run.extra
    assert extra["cold_start_ms"] > extra["load_ms"] > 0 and extra["peak_rss_kib"] > 1000
    assert (extra["runtime"], extra["runtime_version"]) == ("ai-edge-litert", "2.3.0")
    assert extra["power_mode"] == BOARDS[name][1] and extra["warmup"] == 20
    assert extra["model_sha256"] == hashlib.sha256(MODEL.read_bytes()).hexdigest()


def test_identify_reports_host_model_and_runtime(deployed):
    boards, _ = deployed
    ident = boards["jetson"].identify()
    assert ident.name == socket.gethostname()
    assert ident.model == MODEL.stem and ident.model_sha256 == hashlib.sha256(MODEL.read_bytes()).hexdigest()
    assert ident.extra["runtime"] == "ai-edge-litert" and ident.extra["power_mode"] == "15W"


def test_unknown_host_key_is_refused_with_its_fingerprint_and_the_command_to_trust_it(lab, tmp_path):
    sim = lab["rpi4"]
    known_hosts = tmp_path / "known_hosts"
    host_key = sim.state_dir / "etc" / "ssh_host_ed25519_key.pub"
    fingerprint = subprocess.run(["ssh-keygen", "-lf", str(host_key)], capture_output=True, text=True,
                                 check=True).stdout.split()[1]
    board = SshBoard("rpi4", sim.host, sim.port, sim.user, sim.key, known_hosts, ssh_config=None)
    with pytest.raises(RemoteError) as err:
        board.execute(["true"])
    message = str(err.value)
    assert message.startswith("rpi4: verify host key") and fingerprint in message
    assert not known_hosts.exists()
    command = message.split("trust it with: ")[1].split(" (or set")[0]
    subprocess.run(command, shell=True, check=True, capture_output=True)  # the command it gives works
    assert board.execute(["echo", "ok"]).stdout == b"ok\n"


def test_trust_on_first_use_appends_to_known_hosts_and_then_verifies(lab, tmp_path):
    sim = lab["rpi4"]
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("# kept\n")
    tofu = SshBoard("rpi4", sim.host, sim.port, sim.user, sim.key, known_hosts, trust_on_first_use=True,
                    ssh_config=None)
    assert tofu.execute(["true"]).exit_status == 0
    lines = known_hosts.read_text().splitlines()
    assert lines[0] == "# kept" and lines[1].startswith(f"[{sim.host}]:{sim.port} ssh-ed25519 ")
    strict = SshBoard("rpi4", sim.host, sim.port, sim.user, sim.key, known_hosts, ssh_config=None)
    assert strict.execute(["true"]).exit_status == 0


def test_a_changed_host_key_is_refused_even_with_trust_on_first_use(lab, tmp_path):
    sim = lab["rpi4"]
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    kind, b64 = other.with_suffix(".pub").read_text().split()[:2]
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[{sim.host}]:{sim.port} {kind} {b64}\n")
    board = SshBoard("rpi4", sim.host, sim.port, sim.user, sim.key, known_hosts, trust_on_first_use=True,
                     ssh_config=None)
    with pytest.raises(RemoteError, match="HOST KEY CHANGED") as err:
        board.execute(["true"])
    assert "ssh-keygen -f" in str(err.value) and " -R " in str(err.value)


def test_connection_killed_mid_run_reports_how_many_inferences_completed(lab, deployed, digits):
    boards, _ = deployed
    board, sim = boards["rpi4"], lab["rpi4"]
    count = 50_000_000

    def kill_the_session_once_the_runner_streams():
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            _, tree = cpu_times_s(sim.pids()[0])
            if any(Path(f"/proc/{p}/cmdline").read_bytes().count(b"timed") for p in tree if _exists(p)):
                break
            time.sleep(0.05)
        time.sleep(1.0)
        for pid in sim.session_pids():
            os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_the_session_once_the_runner_streams)
    killer.start()
    try:
        with pytest.raises(RemoteRunError) as err:
            board.run_timed(digits[0][0], count=count, warmup=0)
    finally:
        killer.join()
    e = err.value
    assert 0 < e.completed < count and e.expected == count
    assert f"broke off after {e.completed} of {count} inferences completed: connection lost" in str(e)
    assert str(e).startswith("rpi4: ")
    assert e.partial.count == e.completed and e.partial.extra["cold_start_ms"] > 0
    assert board.execute(["true"]).exit_status == 0  # the next call reconnects


def _exists(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def test_runner_exit_is_an_error_not_a_shorter_run(deployed):
    boards, _ = deployed
    broke_off = r"broke off after 0 of 5 inferences completed: exit status 1"
    with pytest.raises(RemoteRunError, match=broke_off) as err:
        boards["rpi4"].run_timed(np.zeros(3, np.float32), count=5, warmup=0)  # wrong input size
    assert "reshape" in str(err.value) and err.value.partial.count == 0


def test_shell_metacharacters_in_names_are_harmless(lab, tmp_path, digits):
    sim = lab["jetson"]
    evil = "digits \"mlp\"; touch PWNED1; $(touch PWNED2) `touch PWNED3` 'q' & x.tflite"
    model = tmp_path / evil
    shutil.copy(MODEL, model)
    entry = BoardEntry(name="jetson; touch PWNED4", family=sim.family.name, power_mode="15W",
                       ssh=SshConn(host=sim.host, port=sim.port, user=sim.user, key=sim.key,
                                   known_hosts=sim.known_hosts))
    board = SshBoard.from_lab(entry, sim.family, lab="lab $(touch PWNED5); 'x' \"y\"")
    record = board.deploy(model)
    assert Path(record["files"]["model"]["remote"]).read_bytes() == MODEL.read_bytes()
    assert board.classify(digits[0][:3]).shape == (3, 10)
    assert board.run_timed(digits[0][0], count=3, warmup=1).count == 3
    assert board.execute(["echo", "a;b", "$(id)", "'\""]).stdout == b"a;b $(id) '\"\n"
    board.close()
    planted = [p for base in (sim.home, Path.cwd(), tmp_path) for p in base.rglob("PWNED*")]
    assert planted == []


def test_connect_timeout_is_bounded(tmp_path):
    with socket.socket() as silent:  # accepts TCP connections but never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        board = SshBoard("mute", "127.0.0.1", silent.getsockname()[1], "pi", known_hosts=tmp_path / "kh",
                         connect_timeout_s=0.5, ssh_config=None)
        t0 = time.monotonic()
        with pytest.raises(RemoteError, match=r"^mute: connect to pi@127.0.0.1:\d+: "):
            board.execute(["true"])
        assert time.monotonic() - t0 < 5


def test_command_timeout_is_bounded(lab):
    sim = lab["rpi4"]
    board = SshBoard("rpi4", sim.host, sim.port, sim.user, sim.key, sim.known_hosts, command_timeout_s=0.5,
                     ssh_config=None)
    t0 = time.monotonic()
    with pytest.raises(RemoteError, match="no output for 0.5 s"):
        board.execute(["sleep", "10"])
    assert time.monotonic() - t0 < 5
    board.close()


def test_user_defaults_to_the_local_account_as_ssh_does(tmp_path, monkeypatch):
    monkeypatch.setenv("USER", "someone-else")
    config = tmp_path / "config"
    config.write_text("Host withuser\n  User pi\n")
    assert SshBoard("rpi4", "127.0.0.1", ssh_config=config).user == pwd.getpwuid(os.getuid()).pw_name
    assert SshBoard("rpi4", "withuser", ssh_config=config).user == "pi"
    assert SshBoard("rpi4", "withuser", user="bench", ssh_config=config).user == "bench"


def test_ssh_config_and_agent_are_honoured(lab, tmp_path, monkeypatch):
    sim = lab["rpi4"]
    config = tmp_path / "config"
    config.write_text(f"Host simpi\n  HostName {sim.host}\n  Port {sim.port}\n  User {sim.user}\n"
                      f"  UserKnownHostsFile {sim.known_hosts}\n")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ssh/id_* to fall back on
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    board = SshBoard("rpi4", "simpi", ssh_config=config)
    assert (board.host, board.port, board.user) == (sim.host, sim.port, sim.user)
    with pytest.raises(RemoteError, match=r"No authentication methods.*none in lab.yaml.*no agent"):
        board.execute(["true"])  # no key anywhere yet

    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if sock.exists():
                break
            time.sleep(0.02)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        subprocess.run(["ssh-add", "-q", str(sim.key)], check=True, capture_output=True)
        assert board.execute(["echo", "via agent"]).stdout == b"via agent\n"
    finally:
        board.close()
        agent.terminate()
        agent.wait()

    with_key = tmp_path / "config2"
    with_key.write_text(config.read_text() + f"  IdentityFile {sim.key}\n")
    assert SshBoard("rpi4", "simpi", ssh_config=with_key).execute(["true"]).exit_status == 0


def test_runner_needs_only_stdlib_numpy_and_a_runtime():
    allowed = set(sys.stdlib_module_names) | {"numpy", "ai_edge_litert", "tflite_runtime", "onnxruntime"}
    tree = ast.parse(Path(str(RUNNER)).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    assert imported <= allowed, imported - allowed


def test_a_runner_that_does_not_speak_the_protocol_is_an_error(lab, deployed):
    sim = lab["rpi4"]
    board = SshBoard("rpi4", sim.host, sim.port, sim.user, sim.key, sim.known_hosts, python="echo",
                     remote_dir="labbench/test lab", ssh_config=None)  # "echo" prints the runner's argv back
    broke_off = r"broke off after 0 of 4 inferences completed: runner printed b'/"
    with pytest.raises(RemoteRunError, match=broke_off):
        board.run_timed(np.zeros(64, np.float32), count=4, warmup=0)
    board.close()


def test_runner_keeps_stdout_for_records_whatever_a_runtime_prints(tmp_path):
    noisy = ("import os, sys\nsys.path.insert(0, sys.argv[1])\nimport runner\nload = runner.load\n"
             "def noisy(path):\n    print('python noise')\n    os.write(1, b'C noise\\n')\n"
             "    return load(path)\n"
             "runner.load = noisy\nrunner.main(['info', sys.argv[2]])\n")
    out = subprocess.run([sys.executable, "-c", noisy, str(Path(str(RUNNER)).parent), str(MODEL)],
                         capture_output=True, text=True, check=True)
    assert out.stdout.startswith('{"type":"info"') and out.stdout.count("\n") == 1
    assert "python noise" in out.stderr and "C noise" in out.stderr
