"""Installed as a package: `pip install` of the checkout (not editable) into a fresh virtualenv gives a
working `labbench` command and pytest plugin that read nothing from the checkout but the lab they are
given. The install is constrained by constraints.txt as `make` installs, and uses the pip cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from labbench import inventory

REPO = Path(__file__).resolve().parents[1]
LAB = REPO / "lab.yaml"
INSTALL_TIMEOUT_S = 900
RUN_TIMEOUT_S = 120
OFFLINE = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "ProxyError",
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh virtualenv with the checkout installed into it."""
    venv = tmp_path_factory.mktemp("pkg") / "v"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=RUN_TIMEOUT_S)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    try:
        proc = subprocess.run(
            [venv / "bin" / "pip", "install", "-q", "-c", REPO / "constraints.txt", REPO],
            check=False,
            cwd=venv.parent,
            env=env,
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"pip install of {REPO} took over {INSTALL_TIMEOUT_S} s")
    if proc.returncode and any(s in proc.stderr for s in OFFLINE):
        pytest.skip(f"pip cannot reach a package index: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr
    return venv


@pytest.fixture
def run(venv, tmp_path):
    """Run a command of the virtualenv in a directory outside the checkout, with only PATH and HOME set."""

    def run(command: str, *args: object) -> subprocess.CompletedProcess:
        return subprocess.run(
            [venv / "bin" / command, *map(str, args)],
            check=False,
            cwd=tmp_path,
            env={"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", str(tmp_path))},
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
        )

    return run


def test_the_package_and_its_board_catalog_come_from_the_virtualenv(venv, run):
    proc = run(
        "python", "-c", "import labbench.catalog as c; print(c.__file__); print(c.default_devices_dir())"
    )
    assert proc.returncode == 0, proc.stderr
    module, devices = map(Path, proc.stdout.split())
    package = module.parent
    assert package.is_relative_to(venv) and devices == package / "devices"
    yaml = sorted(p.name for p in (REPO / "devices").glob("*.yaml"))
    assert sorted(p.name for p in devices.glob("*.yaml")) == yaml
    modules = {p.relative_to(REPO / "labbench") for p in (REPO / "labbench").rglob("*.py")}
    missing = modules - {p.relative_to(package) for p in package.rglob("*.py")}
    assert not missing, (
        f"not in the package (list its package in pyproject.toml): {sorted(map(str, missing))}"
    )


def test_lab_check_of_a_lab_in_another_directory(run):
    proc = run("labbench", "lab", "check", LAB)
    assert proc.returncode == 0, proc.stderr
    assert "valid" in proc.stdout
    for name in inventory.load(LAB).boards:
        assert name in proc.stdout


def test_pytest_plugin_lists_the_lab_boards(run):
    proc = run("pytest", "-p", "no:cacheprovider", "--lab", LAB, "--list-boards")
    assert proc.returncode == 0, proc.stderr
    assert f"boards in {LAB}" in proc.stdout
    for name in inventory.load(LAB).boards:
        assert f"  {name} " in proc.stdout


def test_firmware_pack(run, tmp_path):
    model = REPO / "fixtures" / "models" / "digits_mlp_int8.tflite"
    proc = run("labbench", "firmware", "pack", model, "--board", "esp32", "--out", tmp_path / "fw")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "fw" / "flasher_args.json").is_file()
