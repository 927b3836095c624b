"""lab.yaml written wrong, or written to hurt, through both front doors: `labbench lab check` and
`pytest tests_hil --lab`.

Each malformed file in tests/data/bad_labs/ starts with `# expect: LINE: key.path: message`, the first
error line it must give (`{here}` is that directory, `{devices}` the package's catalog; a trailing `...`
leaves the rest of the line open, where it lists what a driver accepts). The files that cannot be
committed as text (not UTF-8, huge, deeply nested) are written by GENERATED. Every one is refused with
exit 2 (pytest: a usage error, exit 4) and that line, in under 2 s, without a traceback: all of them
through `labbench lab check`, `labbench gate` and an in-process pytest, the cases the issue names also
through a `pytest` process and `labbench lab list`.
The labs in tests/data/good_labs/ are valid but unusual, and both front doors accept them.
"""

from __future__ import annotations

import codecs
import inspect
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from labbench import catalog, cli, inventory
from labbench.errors import HardwareError
from labbench.sim.linux import SimLinuxBoard

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parents[1]
BAD = REPO / "tests" / "data" / "bad_labs"
GOOD = REPO / "tests" / "data" / "good_labs"
LIMIT_S = 2.0
TIMEOUT_S = 20
#: variables the corpus expects unset (or uses with a default)
UNSET = (
    "LABBENCH_HOSTILE_UNSET",
    "RPI4_HOST",
    "LAB_HOST",
    "POWER_MODE",
    "LABBENCH_GOOD_RPI4_HOST",
    "LABBENCH_GOOD_RPI4_PORT",
    "LABBENCH_GOOD_USER",
    "LABBENCH_GOOD_HOST",
)

_LAB = "lab:\n  name: hostile\nboards:\n  esp32:\n    family: esp32_devkitc\n"
_SERIAL = '    serial: {url: "rfc2217://127.0.0.1:14001", baud: 115200}\n'

_NESTED = "".join("  " * (i + 1) + f"k{i}:\n" for i in range(100)) + "  " * 101 + "x\n"

#: name -> (file content, expected first error line without the file name)
GENERATED: dict[str, tuple[bytes, str]] = {
    "latin1": (
        (_LAB + _SERIAL).replace("hostile", "h\u00f4tel").encode("latin-1"),
        "2: not UTF-8: byte 0xf4 at column 10 (Latin-1 or Windows-1252? Save the file as UTF-8)",
    ),
    "utf16": (
        codecs.BOM_UTF16_LE + (_LAB + _SERIAL).encode("utf-16-le"),
        "1: not UTF-8: byte 0xff at column 1 (it looks like UTF-16. Save the file as UTF-8)",
    ),
    "nul_byte": (
        (_LAB + _SERIAL).replace("hostile", "host\0ile").encode(),
        "2: not valid YAML: character U+0000 is not allowed",
    ),
    "nested_lists": (
        (_LAB + _SERIAL + "    power_mode: " + "[" * 5000 + "]" * 5000 + "\n").encode(),
        "7: boards.esp32.power_mode: nested more than 32 levels deep",
    ),
    "nested_mappings": (
        (_LAB + _SERIAL + "budgets:\n" + _NESTED).encode(),
        "38: budgets.k0.k1: nested more than 32 levels deep",
    ),
    "nested_keys": (
        (_LAB + _SERIAL + "budgets:\n  " + "? " * 3000 + "x\n").encode(),
        "8: budgets: nested more than 32 levels deep",
    ),
    "many_values": (
        (_LAB + _SERIAL + "budgets:\n  esp32: [" + "1," * 12000 + "]\n").encode(),
        "8: budgets.esp32.9979: more than 10000 values",
    ),
    "long_key": (
        (_LAB + _SERIAL + "  " + "b" * 50000 + ": {}\n").encode(),
        "7: not valid YAML: could not find expected ':'",
    ),
}
#: 1 GiB (sparse): refused after reading 64 KiB
HUGE = ("huge", "1: larger than 64 KiB, the most a file here may be")

#: the cases the issue names, also run through a `pytest` process
ISSUE_CASES = [
    "top_level_list",
    "latin1",
    "merge_key_value",
    "nested_lists",
    "alias_bomb",
    "markup_board_name",
    "visa_host_port",
    "url_port_out_of_range",
    "negative_latency",
    "marginal_over_100",
    "accuracy_percent",
    "shared_instrument_channel",
    "shell_board_name",
    "shell_ssh_user",
    "sim_model_traversal",
    "python_tag",
    "missing_ssh_key",
    "unset_variable",
    "unterminated_substitution",
]
#: also run with --board (the lab is loaded the same way; these check that it is)
BOARD_CASES = ["top_level_list", "alias_bomb", "shell_ssh_user", "missing_ssh_key"]


def _env(home: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    if home is not None:
        env["HOME"] = str(home)
    return env


def _expected(path: Path) -> str:
    """The first error line a corpus file must give, from its `# expect:` line."""
    first_line = path.read_text().split("\n", 1)[0]
    assert first_line.startswith("# expect: "), f"{path.name}: no `# expect:` line"
    rest = first_line.removeprefix("# expect: ")
    return f"{path.name}:" + rest.replace("{here}", str(path.parent)).replace(
        "{devices}", str(catalog.default_devices_dir())
    )


def _first_line_is(lines: list[str], expected: str) -> bool:
    first = lines[0] if lines else ""
    return first.startswith(expected.removesuffix("...")) if expected.endswith("...") else first == expected


def _corpus() -> list[str]:
    return sorted(p.stem for p in BAD.glob("*.yaml")) + list(GENERATED) + [HUGE[0]]


@pytest.fixture
def bad_lab(request, tmp_path) -> tuple[Path, str]:
    """(a malformed lab file, the first error line it must give)."""
    name = request.param
    if name in GENERATED:
        content, expected = GENERATED[name]
        path = tmp_path / f"{name}.yaml"
        path.write_bytes(content)
        return path, f"{path.name}:{expected}"
    if name == HUGE[0]:
        path = tmp_path / f"{name}.yaml"
        with path.open("wb") as f:
            f.write((_LAB + _SERIAL).encode())
            f.truncate(1 << 30)
        return path, f"{path.name}:{HUGE[1]}"
    path = BAD / f"{name}.yaml"
    return path, _expected(path)


@pytest.fixture
def home(tmp_path) -> Path:
    """A HOME holding the key environment.yaml names as ${HOME}/.ssh/labbench_ed25519."""
    ssh = tmp_path / "home" / ".ssh"
    ssh.mkdir(parents=True)
    (ssh / "labbench_ed25519").write_text("placeholder\n")
    return ssh.parent


def _run(cmd: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=REPO, check=False
    )
    return done, time.perf_counter() - t0


def lab_check(path: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    return _run([sys.executable, "-m", "labbench.cli", "lab", "check", str(path)], env)


def pytest_door(path: Path, *options: str) -> tuple[subprocess.CompletedProcess, float]:
    return _run(
        [
            sys.executable,
            "-m",
            "pytest",
            str(REPO / "tests_hil"),
            "--lab",
            str(path),
            *options,
            "-p",
            "no:cacheprovider",
        ],
        _env(),
    )


def test_the_corpus_is_large_enough():
    assert len(_corpus()) >= 40
    assert set(ISSUE_CASES) | set(BOARD_CASES) <= set(_corpus())


@pytest.mark.parametrize("bad_lab", _corpus(), indirect=True)
def test_lab_check_refuses(bad_lab):
    path, expected = bad_lab
    done, elapsed = lab_check(path, _env())
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert _first_line_is(done.stderr.splitlines(), f"error: {expected}"), done.stderr
    assert elapsed < LIMIT_S, f"{elapsed:.2f} s"


@pytest.mark.parametrize(
    "bad_lab, option",
    [(name, "--list-boards") for name in ISSUE_CASES] + [(name, "--board=all") for name in BOARD_CASES],
    indirect=["bad_lab"],
)
def test_pytest_refuses_with_a_usage_error(bad_lab, option):
    path, expected = bad_lab
    done, elapsed = pytest_door(path, option)
    output = done.stdout + done.stderr
    assert done.returncode == 4, output
    assert "INTERNALERROR" not in output and "Traceback" not in output
    assert _first_line_is(done.stderr.splitlines(), f"ERROR: {expected}"), done.stderr
    assert elapsed < LIMIT_S, f"{elapsed:.2f} s"


@pytest.mark.parametrize("bad_lab", _corpus(), indirect=True)
def test_pytest_in_process_refuses_with_a_usage_error(bad_lab, pytester, monkeypatch):
    path, expected = bad_lab
    for name in UNSET:
        monkeypatch.delenv(name, raising=False)
    t0 = time.perf_counter()
    result = pytester.runpytest_inprocess(
        str(REPO / "tests_hil"), "--lab", str(path), "--list-boards", "-p", "no:cacheprovider"
    )
    elapsed = time.perf_counter() - t0
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.outlines + result.errlines
    output = "\n".join(result.outlines + result.errlines)
    assert "INTERNALERROR" not in output and "Traceback" not in output
    assert _first_line_is(result.errlines, f"ERROR: {expected}"), result.errlines
    assert elapsed < LIMIT_S, f"{elapsed:.2f} s"


@pytest.mark.parametrize("bad_lab", _corpus(), indirect=True)
def test_gate_refuses_as_lab_check_does(bad_lab, tmp_path, monkeypatch, capsys):
    path, expected = bad_lab
    for name in UNSET:
        monkeypatch.delenv(name, raising=False)
    journal = tmp_path / "journal.jsonl"
    journal.touch()
    t0 = time.perf_counter()
    code = cli.main(["gate", str(journal), "--lab", str(path)])
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert code == 2, err
    assert _first_line_is(err.splitlines(), f"error: {expected}"), err
    assert elapsed < LIMIT_S, f"{elapsed:.2f} s"


@pytest.mark.parametrize("bad_lab", ISSUE_CASES, indirect=True)
def test_lab_list_refuses_as_lab_check_does(bad_lab, monkeypatch, capsys):
    path, expected = bad_lab
    for name in UNSET:
        monkeypatch.delenv(name, raising=False)
    assert cli.main(["lab", "list", str(path)]) == 2
    assert _first_line_is(capsys.readouterr().err.splitlines(), f"error: {expected}")


def test_the_gate_plugin_checks_the_default_lab_as_lab_check_does(pytester):
    """Without --lab, the labbench plugin leaves lab.yaml alone, and the gate plugin loads it itself."""
    pytester.makefile(".yaml", lab=(BAD / "missing_ssh_key.yaml").read_text())
    result = pytester.runpytest_inprocess("--labbench-gate", "release", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    output = "\n".join(result.outlines + result.errlines)
    assert "INTERNALERROR" not in output and "Traceback" not in output
    assert result.errlines[0] == (
        f"ERROR: lab.yaml:10: boards.pi.ssh.key: {pytester.path}/keys/no_such_key "
        "does not exist or is not a file"
    )


def test_pytest_checks_a_lab_named_without_a_board():
    path = BAD / "top_level_list.yaml"
    done, _ = pytest_door(path)
    assert done.returncode == 4, done.stdout + done.stderr
    assert _first_line_is(done.stderr.splitlines(), f"ERROR: {_expected(path)}")


@pytest.mark.parametrize("name", sorted(p.name for p in GOOD.glob("*.yaml")))
def test_unusual_labs_are_accepted(name, home):
    env = _env(home)
    done, elapsed = lab_check(GOOD / name, env)
    assert done.returncode == 0, done.stderr
    assert f"valid: {name}" in done.stdout
    assert elapsed < LIMIT_S, f"{elapsed:.2f} s"
    listed, _ = _run(
        [
            sys.executable,
            "-m",
            "pytest",
            str(REPO / "tests_hil"),
            "--lab",
            str(GOOD / name),
            "--list-boards",
            "-p",
            "no:cacheprovider",
        ],
        env,
    )
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert f"boards in {GOOD / name}:" in listed.stdout


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "lab.yaml"
    path.write_bytes(codecs.BOM_UTF8 + (GOOD / "one_board.yaml").read_bytes())
    done, _ = lab_check(path, _env())
    assert done.returncode == 0, done.stderr


def test_lab_check_prints_markup_as_text(tmp_path):
    lab_dir = tmp_path / "a[" / "x]"
    lab_dir.mkdir(parents=True)
    (lab_dir / "lab.yaml").write_bytes((GOOD / "one_board.yaml").read_bytes())
    done, _ = lab_check(lab_dir / "lab.yaml", _env())
    assert done.returncode == 0, done.stderr
    assert "a[/x]" in done.stdout.replace("\n", "")


def test_simulated_linux_board_refuses_a_user_name_it_would_write_unquoted(tmp_path):
    family = catalog.load_family("rpi4b")
    with pytest.raises(HardwareError, match=r"'root\$\(touch /tmp/x\)' is not a valid user name"):
        SimLinuxBoard("pi", "127.0.0.1", 12201, family, None, user="root$(touch /tmp/x)", state_dir=tmp_path)


def _lab_keywords(cls: type, *not_from_lab: str) -> set[str]:
    params = inspect.signature(cls.__init__).parameters.values()
    named = {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return named - {"self", *not_from_lab}


def test_sim_schemas_take_what_the_simulators_take():
    from labbench.sim import settings
    from labbench.sim.mcu import SimMcuBoard
    from labbench.sim.pm1000 import Pm1000Model, Pm1000Sim

    def schema(model: type) -> set[str]:
        return set(model.model_fields) - {"faults"}

    wired = ("name", "host", "port", "family", "bus_channel", "clock", "radio")  # what the sim lab passes
    mcu = _lab_keywords(SimMcuBoard, *wired, "model_path", "firmware", "boot_rom", "devices_dir")
    assert schema(settings.McuSim) == mcu | {"model"}
    linux = _lab_keywords(SimLinuxBoard, *wired, "user", "key", "known_hosts", "power_mode", "state_dir")
    assert schema(settings.LinuxSim) == linux
    pm1000 = _lab_keywords(Pm1000Sim, *wired, "channel") | _lab_keywords(Pm1000Model, "channel", "clock")
    assert schema(settings.Pm1000Sim) == pm1000


def test_sim_settings_arrive_validated(tmp_path, monkeypatch):
    monkeypatch.delenv("LABBENCH_HOSTILE_UNSET", raising=False)
    path = tmp_path / "lab.yaml"
    path.write_text(
        (GOOD / "simulated.yaml")
        .read_text()
        .replace("speed_factor: 1.5", 'speed_factor: "${LABBENCH_HOSTILE_UNSET:-2.5}"')
    )
    lab = inventory.load(path)
    assert lab.boards["esp32"].sim.settings == {"speed_factor": 2.5, "vendor": "ESP32 DevKitC"}
    assert lab.boards["esp32"].sim.faults[0].rate == 0.001
    assert lab.instruments["meter"].sim.settings["voltage_ranges_v"] == (7.5, 15.0)
