"""The SSH driver against simulated Linux boards (real OpenSSH sshd on loopback, real paramiko)."""

from __future__ import annotations

import ast
import hashlib
import inspect
import os
import pwd
import re
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
from netproxy import Filter, TcpProxy, free_port, passthrough

from labbench.capabilities import Deployer, InferenceTarget
from labbench.catalog import load_family
from labbench.drivers.ssh import RUNNER, RemoteRunError, RemoteStreamError, RemoteTimeout, SshBoard
from labbench.errors import RemoteError, RunAborted
from labbench.inventory import BoardEntry, SshConn
from labbench.modelinfo import ModelInfo, dequantize_output, quantize_input
from labbench.sim.faults import Fault, FaultProxy
from labbench.sim.linux import SimLinuxBoard, cpu_times_s
from labbench.sim.powerbus import PowerBus

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "fixtures" / "models" / "digits_mlp_int8.tflite"
DATASET = ROOT / "fixtures" / "datasets" / "digits.npz"
BOARDS = {"rpi4": ("rpi4b", None), "jetson": ("jetson_orin_nano", "15W")}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A simulated Raspberry Pi and Jetson, each its own sshd, sharing one client key and known_hosts."""
    root = tmp_path_factory.mktemp("ssh-lab")
    bus = PowerBus()
    sims = {}
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
            sims[name] = sim
        yield sims
    finally:
        for sim in sims.values():
            sim.stop()


def board_for(sim: SimLinuxBoard, log_dir: Path, **overrides) -> SshBoard:
    """The driver as a lab builds it: from a lab.yaml entry."""
    entry = BoardEntry(
        name=sim.name,
        family=sim.family.name,
        power_mode=sim.power_mode,
        ssh=SshConn(
            host=sim.host, port=sim.port, user=sim.user, key=sim.key, known_hosts=sim.known_hosts, **overrides
        ),
    )
    return SshBoard.from_lab(entry, sim.family, lab="test lab", log_dir=log_dir)


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    return tmp_path_factory.mktemp("ssh-logs")


@pytest.fixture(scope="module")
def deployed(lab, logs):
    boards = {name: board_for(sim, logs) for name, sim in lab.items()}
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
    assert first["rpi4"].detail["dir"] == str(lab_dir) and first["rpi4"].detail["outputs"] == 10
    for role, local in (("runner", Path(str(RUNNER))), ("model", MODEL), ("dataset", DATASET)):
        record = first["rpi4"].detail["files"][role]
        on_board = Path(record["remote"])
        assert on_board.parent.parent == lab_dir or on_board.parent == lab_dir
        assert (
            hashlib.sha256(on_board.read_bytes()).hexdigest()
            == record["sha256"]
            == hashlib.sha256(local.read_bytes()).hexdigest()
        )
    again = board.deploy(MODEL, DATASET)
    assert again.skipped and all(f["skipped"] for f in again.detail["files"].values())
    assert '"skipped": true' in (lab_dir / "deployment.json").read_text()

    (lab_dir / "models" / MODEL.name).write_bytes(b"stale")  # a changed file is sent again
    third = board.deploy(MODEL, DATASET)
    assert not third.detail["files"]["model"]["skipped"] and third.detail["files"]["runner"]["skipped"]
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
    fingerprint = subprocess.run(
        ["ssh-keygen", "-lf", str(host_key)], capture_output=True, text=True, check=True
    ).stdout.split()[1]
    board = SshBoard(
        "rpi4",
        sim.host,
        sim.port,
        sim.user,
        sim.key,
        known_hosts,
        ssh_config=None,
        log_path=tmp_path / "rpi4-ssh.log",
    )
    with pytest.raises(RemoteError) as err:
        board.execute(["true"])
    message = str(err.value)
    assert message.startswith("rpi4: verify host key") and fingerprint in message
    assert (
        err.value.log == str(tmp_path / "rpi4-ssh.log")
        and "error: verify host key" in Path(err.value.log).read_text()
    )
    assert not known_hosts.exists()
    command = message.split("trust it with: ")[1].split(" (or set")[0]
    subprocess.run(command, shell=True, check=True, capture_output=True)  # the command it gives works
    assert board.execute(["echo", "ok"]).stdout == b"ok\n"


def test_trust_on_first_use_appends_to_known_hosts_and_then_verifies(lab, tmp_path):
    sim = lab["rpi4"]
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("# kept\n")
    tofu = SshBoard(
        "rpi4",
        sim.host,
        sim.port,
        sim.user,
        sim.key,
        known_hosts,
        trust_on_first_use=True,
        ssh_config=None,
        log_path=tmp_path / "rpi4-ssh.log",
    )
    assert tofu.execute(["true"]).exit_status == 0
    lines = known_hosts.read_text().splitlines()
    assert lines[0] == "# kept" and lines[1].startswith(f"[{sim.host}]:{sim.port} ssh-ed25519 ")
    strict = SshBoard(
        "rpi4",
        sim.host,
        sim.port,
        sim.user,
        sim.key,
        known_hosts,
        ssh_config=None,
        log_path=tmp_path / "rpi4-ssh.log",
    )
    assert strict.execute(["true"]).exit_status == 0


def test_a_changed_host_key_is_refused_even_with_trust_on_first_use(lab, tmp_path):
    sim = lab["rpi4"]
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    kind, b64 = other.with_suffix(".pub").read_text().split()[:2]
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[{sim.host}]:{sim.port} {kind} {b64}\n")
    board = SshBoard(
        "rpi4",
        sim.host,
        sim.port,
        sim.user,
        sim.key,
        known_hosts,
        trust_on_first_use=True,
        ssh_config=None,
        log_path=tmp_path / "rpi4-ssh.log",
    )
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


def test_shell_metacharacters_in_names_are_harmless(lab, tmp_path, digits, monkeypatch):
    sim = lab["jetson"]
    evil = "digits \"mlp\"; touch PWNED1; $(touch PWNED2) `touch PWNED3` 'q' & x.tflite"
    model = tmp_path / evil
    shutil.copy(MODEL, model)
    entry = BoardEntry(
        name="jetson; touch PWNED4",
        family=sim.family.name,
        power_mode="15W",
        ssh=SshConn(host=sim.host, port=sim.port, user=sim.user, key=sim.key, known_hosts=sim.known_hosts),
    )
    monkeypatch.chdir(tmp_path)  # the log goes to reports/logs/<board>-ssh.log under the working directory
    board = SshBoard.from_lab(entry, sim.family, lab="lab $(touch PWNED5); 'x' \"y\"")
    assert board.log_path == tmp_path / "reports" / "logs" / "jetson; touch PWNED4-ssh.log"
    record = board.deploy(model)
    assert Path(record.detail["files"]["model"]["remote"]).read_bytes() == MODEL.read_bytes()
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
        board = SshBoard(
            "mute",
            "127.0.0.1",
            silent.getsockname()[1],
            "pi",
            known_hosts=tmp_path / "kh",
            connect_timeout_s=0.5,
            ssh_config=None,
            log_path=tmp_path / "mute-ssh.log",
        )
        t0 = time.monotonic()
        with pytest.raises(RemoteError, match=r"^mute: connect to pi@127.0.0.1:\d+: "):
            board.execute(["true"])
        assert time.monotonic() - t0 < 5


def test_command_timeout_is_bounded(lab, tmp_path):
    sim = lab["rpi4"]
    board = SshBoard(
        "rpi4",
        sim.host,
        sim.port,
        sim.user,
        sim.key,
        sim.known_hosts,
        command_timeout_s=0.5,
        ssh_config=None,
        log_path=tmp_path / "rpi4-ssh.log",
    )
    t0 = time.monotonic()
    with pytest.raises(RemoteError, match=r"no output for 0\.5 s"):
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
    assert (
        SshBoard("rpi4", "withuser", ssh_config=config).log_path
        == Path.cwd() / "reports" / "logs" / "rpi4-ssh.log"
    )


def test_ssh_config_and_agent_are_honoured(lab, tmp_path, monkeypatch):
    sim = lab["rpi4"]
    config = tmp_path / "config"
    config.write_text(
        f"Host simpi\n  HostName {sim.host}\n  Port {sim.port}\n  User {sim.user}\n"
        f"  UserKnownHostsFile {sim.known_hosts}\n"
    )
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ssh/id_* to fall back on
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    monkeypatch.chdir(tmp_path)
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
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0
    }
    assert imported <= allowed, imported - allowed


def test_a_runner_that_does_not_speak_the_protocol_is_an_error(lab, deployed, tmp_path):
    sim = lab["rpi4"]
    board = SshBoard(
        "rpi4",
        sim.host,
        sim.port,
        sim.user,
        sim.key,
        sim.known_hosts,
        python="echo",
        remote_dir="labbench/test lab",
        ssh_config=None,
        log_path=tmp_path / "rpi4-ssh.log",
    )  # "echo" prints the runner's argv back
    broke_off = (
        r"broke off after 0 of 4 inferences completed: line 1: expected a record ending in its "
        r"CRC-32 tag ` \*XXXXXXXX`, saw b'/"
    )
    with pytest.raises(RemoteStreamError, match=broke_off):
        board.run_timed(np.zeros(64, np.float32), count=4, warmup=0)
    board.close()


def test_runner_keeps_stdout_for_records_whatever_a_runtime_prints(tmp_path):
    noisy = (
        "import os, sys\nsys.path.insert(0, sys.argv[1])\nimport runner\nload = runner.load\n"
        "def noisy(path):\n    print('python noise')\n    os.write(1, b'C noise\\n')\n"
        "    return load(path)\n"
        "runner.load = noisy\nrunner.main(['info', sys.argv[2]])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", noisy, str(Path(str(RUNNER)).parent), str(MODEL)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.startswith('{"type":"info"') and out.stdout.count("\n") == 1
    assert "python noise" in out.stderr and "C noise" in out.stderr


# -- checks, bounds and stops ---------------------------------------------------------------------

MANGLER = """#!{python}
import json, subprocess, sys, time, zlib


def body(line):
    return line.rstrip(b"\\n").rsplit(b" *", 1)[0]


def tag(text):
    return b"%s *%08X\\n" % (text, zlib.crc32(text))


def edit(line, **changes):
    record = json.loads(body(line))
    for key, change in changes.items():
        record[key] = change(record[key]) if callable(change) else change
    return tag(json.dumps(record, separators=(",", ":")).encode())


def mangle(n, line):
    return {rule}


runner = subprocess.Popen([sys.executable, *sys.argv[1:]], stdout=subprocess.PIPE)
for n, line in enumerate(runner.stdout):
    sys.stdout.buffer.write(mangle(n, line))
    sys.stdout.buffer.flush()
sys.exit(runner.wait())
"""

# (mode, mangle(n, line) for stdout line n, inferences completed, what the error says). A timed run of
# 20: line 0 the start record, 1-20 inferences 0-19, 21 the end record; classify of 5: 0, 1-5, 6.
BROKEN_STREAMS = {
    "changed digit": (
        "timed",
        "line.replace(b'\"latency_ns\":', b'\"latency_ns\":9') if n == 3 else line",
        2,
        (
            r"line 4: expected a record ending in its CRC-32 tag ` \*XXXXXXXX`, saw "
            r"b'\{\"type\":\"inference\",\"i\":2,"
        ),
    ),
    "untagged": (
        "timed",
        "body(line) + b'\\n' if n == 3 else line",
        2,
        r"line 4: expected a record ending in",
    ),
    "gap": (
        "timed",
        "b'' if n == 3 else line",
        2,
        r"line 4: expected inference 2, saw inference 3 \(a gap\)",
    ),
    "repeat": (
        "timed",
        "line * 2 if n == 3 else line",
        3,
        r"line 5: expected inference 3, saw inference 2 \(a repeat\)",
    ),
    "zero latency": (
        "timed",
        "edit(line, latency_ns=0) if n == 3 else line",
        2,
        r"line 4: expected inference 2: latency_ns > 0, saw 0",
    ),
    "stamp backwards": (
        "timed",
        "edit(line, t_ns=lambda t: t - 10**9) if n == 3 else line",
        2,
        (
            r"line 4: expected inference 2 to start at or after the stamp before it \(\d+ ns\), "
            r"saw t_ns \d+ - latency_ns \d+ = \d+"
        ),
    ),
    "board ahead of the host": (
        "timed",
        "edit(line, t_ns=lambda t: t + 10**10) if n == 3 else line",
        2,
        (
            r"line 4: expected inference 2 at most [\d.]+ s after the runner's first "
            r"stamp .*, saw 10\.\d+ s on the board's clock"
        ),
    ),
    "count": (
        "timed",
        "edit(line, count=19) if n == 21 else line",
        20,
        r"line 22: expected the end record: count 20, saw 19",
    ),
    "short output": (
        "timed",
        "edit(line, output=lambda v: v[:-1]) if n == 21 else line",
        20,
        (
            r"line 22: expected the end record: 10 output values \(the model's output length\), "
            r"saw 9 values"
        ),
    ),
    "no end": (
        "timed",
        "b'' if n == 21 else line",
        20,
        r"expected the end record, saw the end of the output \(line 21\)",
    ),
    "after the end": (
        "timed",
        "line * 2 if n == 21 else line",
        20,
        r"line 23: expected nothing after the end record, saw b'\{\"type\":\"end\"",
    ),
    "protocol": (
        "timed",
        "edit(line, protocol=1) if n == 0 else line",
        0,
        r"line 1: expected the start record: protocol 3, saw 1",
    ),
    "other model": (
        "timed",
        "edit(line, model_sha256='0' * 64) if n == 0 else line",
        0,
        r"line 1: expected the start record: model_sha256 '[0-9a-f]{64}', saw '0{64}'",
    ),
    "host took longer": (
        "timed",
        "(time.sleep(1.5), line)[1] if n == 21 else line",
        20,
        (
            r"line 22: expected the command to take at most [\d.]+ s of host time \(the "
            r"board's [\d.]+ s \+ the link's overhead for \d+ bytes\), saw [\d.]+ s"
        ),
    ),
    "not finite": (
        "classify",
        "edit(line, output=lambda v: v[:1] + [float('nan')] + v[2:]) if n == 2 else line",
        1,
        r"line 3: expected inference 1: output 1 a finite number, saw nan",
    ),
    "a row short": (
        "classify",
        "b'' if n == 5 else line",
        4,
        r"line 6: expected inference 4, saw a 'end' record: b'\{\"type\":\"end\",\"count\":5,",
    ),
    "a row too many": (
        "classify",
        "line + edit(line, i=5) if n == 5 else line",
        5,
        r"line 7: expected the end record, saw a 'inference' record",
    ),
    "other samples": (
        "classify",
        "edit(line, input_sha256='0' * 64) if n == 0 else line",
        0,
        r"line 1: expected the start record: input_sha256 '[0-9a-f]{64}', saw '0{64}'",
    ),
}


@pytest.mark.parametrize("case", BROKEN_STREAMS)
def test_a_record_that_fails_a_check_is_an_error_keeping_the_records_before_it(
    lab, deployed, digits, tmp_path, case
):
    """The real runner behind a filter on the board that breaks its stream the way a faulty board,
    runtime or runner would (SSH's MAC keeps the link itself from changing a byte)."""
    mode, rule, completed, says = BROKEN_STREAMS[case]
    wrapper = tmp_path / "mangle"
    wrapper.write_text(MANGLER.format(python=sys.executable, rule=rule))
    wrapper.chmod(0o755)
    sim, log = lab["rpi4"], tmp_path / "rpi4-ssh.log"
    board = SshBoard(
        "rpi4",
        sim.host,
        sim.port,
        sim.user,
        sim.key,
        sim.known_hosts,
        python=str(wrapper),
        remote_dir="labbench/test lab",
        ssh_config=None,
        log_path=log,
        link_overhead_s=0.5 if case == "host took longer" else 10.0,
    )
    x = digits[0]
    with pytest.raises(RemoteStreamError) as err:
        board.run_timed(x[3], 20, 2) if mode == "timed" else board.classify(x[:5])
    e, count = err.value, 20 if mode == "timed" else 5
    action = "run 20 timed inferences" if mode == "timed" else "classify 5 samples"
    assert str(e).startswith(f"rpi4: {action}: broke off after {completed} of {count} inferences completed: ")
    assert re.search(says, str(e)), str(e)
    assert str(e).endswith(f" (full log: {log})") and e.log == str(log)
    assert e.completed == completed and e.expected == count
    if mode == "timed":
        assert e.partial.count == completed and all(lat > 0 for lat in e.partial.latencies_us)
    else:
        assert len(e.partial) == completed
        assert not completed or np.array_equal(e.partial, host_scores(x[:completed]))
    text = log.read_text()
    assert f"-> {wrapper} " in text and f"-- error: {action}: broke off after" in text
    board.close()


def runner_pids(sim: SimLinuxBoard, command: bytes) -> list[int]:
    """The board's runner processes running `command` (b"timed", b"classify")."""
    found = []
    for pid in cpu_times_s(sim.pids()[0])[1]:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"/runner.py") for a in argv) and command in argv:
            found.append(pid)
    return found


def wait_for(what, timeout_s: float = 20.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := what():
            return value
        time.sleep(0.02)
    raise AssertionError(f"not within {timeout_s} s: {what}")


def test_a_runner_that_stops_mid_run_is_detected_within_its_bound(lab, deployed, digits):
    boards, _ = deployed
    board, sim = boards["rpi4"], lab["rpi4"]
    frozen: dict[str, float] = {}

    def freeze_the_runner_once_it_streams():
        [pid] = wait_for(lambda: runner_pids(sim, b"timed"))
        time.sleep(0.5)
        os.kill(pid, signal.SIGSTOP)
        frozen.update(pid=pid, t=time.monotonic())

    freezer = threading.Thread(target=freeze_the_runner_once_it_streams)
    freezer.start()
    try:
        with pytest.raises(RemoteTimeout) as err:
            board.run_timed(digits[0][0], count=50_000_000, warmup=0)
        detected_s = time.monotonic() - frozen["t"]
    finally:
        freezer.join()
        if "pid" in frozen:
            os.kill(int(frozen["pid"]), signal.SIGKILL)
    e = err.value
    print(f"silent runner detected {detected_s:.2f} s after SIGSTOP")
    assert re.search(
        r"inferences completed: no record for 5 s \(the next was due [\d.e-]+ s after the last; "
        r"bound max\(2 x due, due \+ 5 s\)\)",
        str(e),
    ), str(e)
    assert 4.5 < detected_s < 5 + 1.5  # the time per inference is microseconds: the bound is 5 s
    assert 0 < e.completed == e.partial.count and e.partial.host_end < frozen["t"] + 0.1
    assert board.execute(["true"]).exit_status == 0


def test_a_runner_silent_before_its_start_record_ends_at_the_command_timeout(lab, deployed, tmp_path):
    sim = lab["rpi4"]
    mute = tmp_path / "mute"
    mute.write_text("#!/bin/sh\nexec sleep 10\n")
    mute.chmod(0o755)
    board = SshBoard(
        "rpi4",
        sim.host,
        sim.port,
        sim.user,
        sim.key,
        sim.known_hosts,
        python=str(mute),
        remote_dir="labbench/test lab",
        ssh_config=None,
        command_timeout_s=1,
        log_path=tmp_path / "rpi4-ssh.log",
    )
    t0 = time.monotonic()
    with pytest.raises(
        RemoteTimeout,
        match=r"broke off after 0 of 5 inferences completed: no start record "
        r"within 1 s \(command timeout\)",
    ):
        board.run_timed(np.zeros(64, np.float32), 5, 0)
    assert 1 <= time.monotonic() - t0 < 2.5
    board.close()


def test_stop_aborts_a_run_at_once_and_keeps_what_was_measured(lab, deployed, digits):
    boards, _ = deployed
    board, sim = boards["rpi4"], lab["rpi4"]
    assert "stop" in inspect.signature(board.run_timed).parameters  # what labbench.measure.run looks for
    stop, set_at = threading.Event(), {}

    def fail_the_capture_once_the_runner_streams():
        wait_for(lambda: runner_pids(sim, b"timed"))
        time.sleep(1.0)
        set_at["t"] = time.monotonic()
        stop.set()

    failer = threading.Thread(target=fail_the_capture_once_the_runner_streams)
    failer.start()
    try:
        with pytest.raises(
            RunAborted,
            match=r"^rpi4: run 50000000 timed inferences: stopped from outside after "
            r"\d+ of 50000000 inferences",
        ) as err:
            board.run_timed(digits[0][0], count=50_000_000, warmup=0, stop=stop)
        took_s = time.monotonic() - set_at["t"]
    finally:
        failer.join()
    print(f"stop honoured {took_s * 1000:.0f} ms after it was set")
    assert took_s < 0.3
    assert err.value.partial.count > 0 and err.value.log == str(board.log_path)
    wait_for(lambda: not runner_pids(sim, b"timed"), 5)  # the runner ends at its next write
    with pytest.raises(RunAborted, match="stopped before it was sent"):
        board.classify(digits[0][:3], stop=stop)
    assert board.classify(digits[0][:3]).shape == (3, 10)


@pytest.fixture
def proxied(lab, tmp_path):
    """rpi4 reached through a fault proxy (labbench.sim.faults), with the proxy's address in known_hosts."""
    sim = lab["rpi4"]
    proxy = FaultProxy("rpi4", "127.0.0.1", 0, (sim.host, sim.port))
    proxy.start()
    kind, key = (sim.state_dir / "etc" / "ssh_host_ed25519_key.pub").read_text().split()[:2]
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{proxy.port} {kind} {key}\n")
    board = SshBoard(
        "rpi4",
        "127.0.0.1",
        proxy.port,
        sim.user,
        sim.key,
        known_hosts,
        ssh_config=None,
        remote_dir="labbench/test lab",
        log_path=tmp_path / "rpi4-ssh.log",
    )
    yield board, proxy
    board.close()
    proxy.stop()


def test_a_link_that_stalls_mid_run_is_detected_within_the_bound(proxied, deployed, digits):
    board, proxy = proxied
    board.connect()
    fid = proxy.add(Fault(kind="stall", direction="to_host", after_bytes=200_000))
    with pytest.raises(RemoteTimeout, match=r"no record for 5 s") as err:
        board.run_timed(digits[0][0], count=50_000_000, warmup=0)
    [stalled] = [e for e in proxy.report()["log"] if e["fault"] == fid]
    detected_s = time.monotonic() - stalled["t"]
    print(f"stalled link detected {detected_s:.2f} s after the stall began")
    assert 5 <= detected_s < 5 + 1.5
    assert 0 < err.value.completed == err.value.partial.count


def test_a_transfer_that_outlasts_its_bound_is_an_error(proxied):
    board, proxy = proxied
    board.remote_dir, board.transfer_timeout_s = "labbench/slow", 1.0
    board.connect()
    proxy.add(Fault(kind="throttle", direction="to_device", bytes_per_s=20_000))
    t0 = time.monotonic()
    with pytest.raises(
        RemoteError,
        match=r"^rpi4: deploy: upload of \S+ to \S+: not done within 1 s "
        r"\(\d+ of \d+ bytes sent\)",
    ):
        board.deploy(ROOT / "fixtures" / "models" / "mnist5k_mlp_int8.tflite")
    assert time.monotonic() - t0 < 2.5


class BitFlipProxy(TcpProxy):
    """A TCP proxy that flips the low bit of byte `at` from the board (of each connection)."""

    def __init__(self, upstream: tuple[str, int], at: int):
        self.at = at
        super().__init__(upstream)

    def filters(self) -> tuple[Filter, Filter]:
        passed = 0

        def flip(data: bytes) -> bytes:
            nonlocal passed
            if passed <= self.at < passed + len(data):
                i = self.at - passed
                data = data[:i] + bytes([data[i] ^ 1]) + data[i + 1 :]
            passed += len(data)
            return data

        return passthrough, flip


def test_a_byte_changed_on_the_link_is_a_lost_connection_never_a_number(lab, deployed, digits, tmp_path):
    sim = lab["rpi4"]
    kind, key = (sim.state_dir / "etc" / "ssh_host_ed25519_key.pub").read_text().split()[:2]
    with BitFlipProxy((sim.host, sim.port), at=300_000) as proxy:
        known_hosts = tmp_path / "known_hosts"
        known_hosts.write_text(f"[127.0.0.1]:{proxy.port} {kind} {key}\n")
        board = SshBoard(
            "rpi4",
            "127.0.0.1",
            proxy.port,
            sim.user,
            sim.key,
            known_hosts,
            ssh_config=None,
            remote_dir="labbench/test lab",
            log_path=tmp_path / "rpi4-ssh.log",
        )
        with pytest.raises(RemoteRunError) as err:
            board.run_timed(digits[0][0], count=5_000_000, warmup=0)
        board.close()
    assert type(err.value) is RemoteRunError and "inferences completed: connection lost" in str(err.value)
    assert 0 < err.value.completed == err.value.partial.count < 5_000_000
    assert all(lat > 0 for lat in err.value.partial.latencies_us)
