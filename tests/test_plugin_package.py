"""A package extends labbench through entry points alone: tests/plugins/labbench_acme (docs/extending.md)
adds a board family (its YAML, a command-line flasher, a DUT driver of its own protocol, a simulator) and
a high-rate power sampler with its simulator. Installed, `labbench lab check` takes a lab of its parts
and `pytest tests_hil --board acme` flashes, measures and journals on them, and labbench/ holds nothing
of it.

The package is installed into a throwaway virtualenv that sees the project's (a .pth line adds its
site-packages), so the project's own virtualenv stays as it was; it is built from a copy, so the
checkout gets no build files. Building it needs its build backend (setuptools) from a package index,
as any install does: without one the test is skipped.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from labbench import results
from labbench.sim import bus_channel
from labbench.sim.control import SimControl

REPO = Path(__file__).resolve().parents[1]
PLUGIN = REPO / "tests" / "plugins" / "labbench_acme"
PLUGIN_NAMES = re.compile(r"acme|ps1k", re.IGNORECASE)  # its package, family, drivers and instrument kind
# the default lab's ports, and the end-to-end tests' copies of it
TAKEN_PORTS = (range(14001, 15030), range(24001, 25030), range(34001, 35030))
# pip's words when it cannot fetch the build backend (setuptools) for the package's isolated build
OFFLINE = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "ProxyError",
    "No matching distribution found for setuptools",
)
QUICK = ["--window-s", "1", "--windows", "1", "--idle-s", "1", "--latency-samples", "20"]
QUICK += ["--accuracy-samples", "30", "-p", "no:cacheprovider"]
# the install, the power profile and the inference budget of the default payload
SELECT = ["-k", "identify or power or digits_mlp_int8 and not aggressive", "-rA"]
LAB = """\
lab:
  name: acme-lab
instruments:
  sampler:
    kind: ps1k
    resource: TCPIP::127.0.0.1::{sampler_port}::SOCKET
    sim: {{}}
boards:
  acme:
    family: acme_m0
    serial: {{url: "socket://127.0.0.1:{board_port}"}}
    flash: {{tool: acmeflash}}
    power: {{instrument: sampler}}
    sim: {{}}
"""

SIMULATORS = """
from pydantic import BaseModel
from labbench.inventory import SIM_GROUP, registered
for name, entry_point in sorted(registered(SIM_GROUP).items()):
    simulator = entry_point.load()
    assert issubclass(simulator.settings, BaseModel) and callable(simulator.build), name
    print(name)
"""


def free_ports(count: int) -> list[int]:
    """`count` free TCP ports on loopback, outside TAKEN_PORTS."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            s = socket.create_server(("127.0.0.1", 0))
            held.append(s)
            port = s.getsockname()[1]
            if not any(port in taken for taken in TAKEN_PORTS):
                ports.append(port)
    finally:
        for s in held:
            s.close()
    return ports


def run(venv: Path, *args: object, cwd: Path, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    """`python ARGS...` of the virtualenv."""
    return subprocess.run(
        [venv / "bin" / "python", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtualenv on top of the project's, with the example package installed (not editable)."""
    root = tmp_path_factory.mktemp("plugin")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=60)
    site_packages = next((venv / "lib").glob("python*/site-packages"))
    project = sysconfig.get_path("purelib")
    (site_packages / "project.pth").write_text(f"import site; site.addsitedir({project!r})\n")
    source = shutil.copytree(PLUGIN, root / "labbench_acme")
    done = run(venv, "-m", "pip", "install", "-q", "--no-deps", source, cwd=root, timeout_s=300)
    if done.returncode and any(s in done.stderr for s in OFFLINE):
        pytest.skip(
            f"pip cannot reach a package index for the build backend: {done.stderr.strip().splitlines()[-1]}"
        )
    assert done.returncode == 0, done.stdout + done.stderr
    return venv


def test_labbench_holds_nothing_of_the_plugin() -> None:
    """No file of the bench (labbench/, its catalog, its pyproject.toml) names the plugin's parts: the
    plugin works without a line of labbench written for it."""
    files = [REPO / "pyproject.toml", *(REPO / "labbench").rglob("*"), *(REPO / "devices").rglob("*")]
    named = [
        str(f.relative_to(REPO))
        for f in files
        if f.is_file() and "__pycache__" not in f.parts and PLUGIN_NAMES.search(f.read_text(errors="replace"))
    ]
    assert not named


@pytest.mark.slow
def test_the_plugins_entry_points_conform(venv: Path, tmp_path: Path) -> None:
    """labbench's own conformance test passes where the plugin is installed (its flasher, DUT driver and
    sampler implement their capabilities with the Protocols' signatures), and every simulator, the
    bench's and the plugin's, has its settings model and build()."""
    conformance = REPO / "tests" / "test_capabilities.py"
    done = run(
        venv, "-m", "pytest", "-q", "-p", "no:cacheprovider", conformance, "-k", "registered", cwd=tmp_path
    )
    assert done.returncode == 0, done.stdout[-3000:]
    done = run(venv, "-c", SIMULATORS, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["acme_m0", "linux", "mcu", "pm1000", "ps1k"]


@pytest.mark.slow
def test_a_hil_run_on_the_plugins_board_and_sampler(venv: Path, tmp_path: Path) -> None:
    """`labbench lab check` lists the plugin's board and sampler; the HIL suites flash the board with
    acmeflash, identify it, measure it with the sampler and journal a valid measurement whose energy per
    inference lies within its stated uncertainty of what the power bus's ledger says the board drew."""
    sampler_port, board_port = free_ports(2)
    lab = tmp_path / "lab.yaml"
    lab.write_text(LAB.format(sampler_port=sampler_port, board_port=board_port))
    check = run(venv, "-m", "labbench.cli", "lab", "check", lab, cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "acme_m0" in check.stdout and "acmeflash" in check.stdout and "ps1k" in check.stdout

    up = run(venv, "-m", "labbench.cli", "sim", "up", "--lab", lab, cwd=tmp_path)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        journal = tmp_path / "journal.jsonl"
        suites = [REPO / "tests_hil", "--lab", lab, "--board", "acme", "--journal", journal, *QUICK, *SELECT]
        hil = run(venv, "-m", "pytest", *suites, cwd=tmp_path, timeout_s=600)
        assert hil.returncode == 0, hil.stdout[-4000:] + hil.stderr[-2000:]
        assert re.search(r"\b3 passed\b", hil.stdout), hil.stdout[-2000:]
        status = run(venv, "-m", "labbench.cli", "sim", "status", "--json", "--lab", lab, cwd=tmp_path)
        state_dir = Path(json.loads(status.stdout)["state_dir"])
        row = results.load(journal).iloc[-1]
        assert (row["board"], row["model"], row["status"]) == ("acme", "digits_mlp_int8", "valid")
        assert (row["provenance.family"], row["provenance.source"]) == ("acme_m0", "sim")
        assert row["provenance.instrument"] == "ACME,PS1K,SIM-sampler,1.0"
        assert row["accuracy"] > 0.9 and row["latency.p50_ms"] > 0
        t0, t1 = row["energy.window_host_s"]
        ledger = SimControl(state_dir).ledger(bus_channel("sampler"), t0, t1)
        drawn = ledger["energy_j"] * 1000 / row["energy.inferences"]
        journaled, stated = row["energy.per_inference_mj"], row["energy.uncertainty_mj"]
        assert abs(journaled - drawn) <= stated, f"{journaled} +- {stated} mJ, but {drawn} mJ drawn"
    finally:
        run(venv, "-m", "labbench.cli", "sim", "down", "--lab", lab, cwd=tmp_path)
