"""lab.yaml validation: every malformed case gives its exact message and line."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from labbench import inventory
from labbench.errors import LabConfigError, UsageError

REPO = Path(__file__).resolve().parents[1]
ME = pwd.getpwuid(os.getuid()).pw_name

# Line numbers below refer to this document (line 1 is "lab:").
BASE = textwrap.dedent("""\
    lab:
      name: t
    instruments:
      meter:
        kind: pm1000
        resource: TCPIP::127.0.0.1::15025::SOCKET
        settings: {timeout_s: 2}
    boards:
      esp32:
        family: esp32_devkitc
        serial: {url: "rfc2217://127.0.0.1:14001", baud: 115200}
        flash: {tool: esptool, baud: 460800}
        power: {instrument: meter}
        sim: {model: m.tflite}
      pi:
        family: rpi4b
        ssh:
          host: 127.0.0.1
          port: 12201
          user: ${LABBENCH_TEST_USER}
          key: keys/id
      jetson:
        family: jetson_orin_nano
        power_mode: 15W
        ssh: {host: 10.0.0.5, user: lab}
    budgets:
      esp32:
        digits_mlp_int8:
          latency_p99_ms: {max: 2.0, marginal_pct: 10}
          accuracy: 0.95
    """)


@pytest.fixture(autouse=True)
def _user(monkeypatch):
    monkeypatch.setenv("LABBENCH_TEST_USER", "tester")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "lab.yaml"
    path.write_text(text)
    return path


def test_base_lab_is_valid(tmp_path):
    lab = inventory.load(write(tmp_path, BASE))
    assert list(lab.boards) == ["esp32", "pi", "jetson"]
    assert lab.boards["esp32"].serial.baud == 115200 and lab.boards["esp32"].simulated
    assert lab.boards["pi"].ssh.user == "tester"
    assert lab.boards["pi"].ssh.key == tmp_path / "keys/id"
    assert lab.boards["jetson"].ssh.port == 22 and not lab.boards["jetson"].simulated
    budget = lab.budget("esp32", "digits_mlp_int8")
    assert budget.accuracy.min == 0.95 and budget.latency_p99_ms.max == 2.0
    assert lab.budget("pi", "digits_mlp_int8") is None
    assert len(lab.sha256) == 64


def test_family_budget_applies_to_its_boards(tmp_path):
    lab = inventory.load(
        write(tmp_path, BASE.replace("  esp32:\n    digits", "  esp32_devkitc:\n    digits"))
    )
    assert lab.budget("esp32", "digits_mlp_int8").accuracy.min == 0.95


def test_default_lab_is_valid_without_user_in_the_environment(monkeypatch):
    monkeypatch.delenv("USER", raising=False)
    monkeypatch.delenv("LOGNAME", raising=False)
    lab = inventory.load(REPO / "lab.yaml")
    assert len(lab.boards) == 5 and all(i.kind == "pm1000" for i in lab.instruments.values())
    assert lab.simulated
    assert {b.ssh.user for b in lab.boards.values() if b.ssh} == {ME}


def test_default_lab_checks_with_an_empty_environment():
    done = subprocess.run(
        [sys.executable, "-m", "labbench.cli", "lab", "check"],
        cwd=REPO,
        env={},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert f"ssh {ME}@127.0.0.1:12201" in done.stdout


def test_ssh_user_defaults_to_the_local_account_not_user_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("USER", "someone-else")
    lab = inventory.load(write(tmp_path, _sub("ssh: {host: 10.0.0.5, user: lab}", "ssh: {host: 10.0.0.5}")))
    assert lab.boards["jetson"].ssh.user == ME


def test_ssh_user_without_an_account_name_is_an_error(tmp_path, monkeypatch):
    def no_account(uid):
        raise KeyError(uid)

    monkeypatch.setattr(pwd, "getpwuid", no_account)
    with pytest.raises(LabConfigError) as exc:
        inventory.load(write(tmp_path, _sub("ssh: {host: 10.0.0.5, user: lab}", "ssh: {host: 10.0.0.5}")))
    message = f"lab.yaml:25: boards.jetson.ssh: no user: given and uid {os.getuid()} has no account name"
    assert str(exc.value) == message


@pytest.mark.parametrize(
    "expr, env, user",
    [
        ("${LABBENCH_TEST_USER:-pi}", {}, "pi"),
        ("${LABBENCH_TEST_USER:-pi}", {"LABBENCH_TEST_USER": ""}, "pi"),
        ("${LABBENCH_TEST_USER:-pi}", {"LABBENCH_TEST_USER": "bench"}, "bench"),
        ("${LABBENCH_TEST_USER-pi}", {}, "pi"),
        ("${LABBENCH_TEST_USER-pi}", {"LABBENCH_TEST_USER": ""}, ""),
        ("${LABBENCH_TEST_USER-pi}", {"LABBENCH_TEST_USER": "bench"}, "bench"),
        ("${LABBENCH_TEST_USER}", {"LABBENCH_TEST_USER": ""}, ""),
        ("${LABBENCH_TEST_USER:-}", {}, ""),
        ('"a-${LABBENCH_TEST_USER:-b c}-${LABBENCH_TEST_USER:-d}"', {}, "a-b c-d"),
        ("pi$$1$${LABBENCH_TEST_USER}$x", {"LABBENCH_TEST_USER": "bench"}, "pi$1${LABBENCH_TEST_USER}$x"),
    ],
    ids=[
        "default-unset",
        "default-empty",
        "default-set",
        "unset-only-unset",
        "unset-only-empty",
        "unset-only-set",
        "plain-empty",
        "empty-default",
        "two-in-one",
        "dollar-escapes",
    ],
)
def test_substitution(tmp_path, monkeypatch, expr, env, user):
    monkeypatch.delenv("LABBENCH_TEST_USER")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # carried in a key path: a user name must be a valid account name, an arbitrary string is not
    text = _sub("user: ${LABBENCH_TEST_USER}", "user: tester").replace("key: keys/id", f"key: {expr}")
    lab = inventory.load(write(tmp_path, text))
    assert lab.boards["pi"].ssh.key == tmp_path / user


def test_unknown_board_is_a_usage_error_listing_boards(tmp_path):
    lab = inventory.load(write(tmp_path, BASE))
    with pytest.raises(
        UsageError, match=r'unknown board "esp33"; did you mean "esp32"\? \(known: esp32, jetson, pi\)'
    ):
        lab.board("esp33")


#: the end of the message for a malformed `${...}`
FORMS = "expected ${VAR}, ${VAR:-default} or ${VAR-default} ($$ for a literal $)"


def _sub(old: str, new: str, count: int = 1) -> str:
    assert old in BASE, old
    return BASE.replace(old, new, count)


MALFORMED = [
    # wrong types
    (
        "baud-not-int",
        _sub("baud: 460800", 'baud: "921k"'),
        'lab.yaml:12: boards.esp32.flash.baud: expected an integer, got "921k"',
    ),
    (
        "serial-baud-float",
        _sub("baud: 115200", "baud: 1.5"),
        "lab.yaml:11: boards.esp32.serial.baud: expected an integer, got 1.5",
    ),
    (
        "port-not-int",
        _sub("port: 12201", "port: ssh"),
        'lab.yaml:19: boards.pi.ssh.port: expected an integer, got "ssh"',
    ),
    (
        "port-out-of-range",
        _sub("port: 12201", "port: 70000"),
        "lab.yaml:19: boards.pi.ssh.port: input should be less than 65536, got 70000",
    ),
    (
        "negative-channel",
        _sub("power: {instrument: meter}", "power: {instrument: meter, channel: 0}"),
        "lab.yaml:13: boards.esp32.power.channel: input should be greater than or equal to 1, got 0",
    ),
    (
        "tofu-not-bool",
        _sub("key: keys/id", "key: keys/id\n      trust_on_first_use: maybe"),
        'lab.yaml:22: boards.pi.ssh.trust_on_first_use: expected true or false, got "maybe"',
    ),
    (
        "budget-not-number",
        _sub("accuracy: 0.95", "accuracy: high"),
        'lab.yaml:30: budgets.esp32.digits_mlp_int8.accuracy: expected a mapping, got "high"',
    ),
    (
        "boards-not-mapping",
        BASE.split("boards:")[0] + "boards: [esp32]\n",
        "lab.yaml:8: boards: expected a mapping, got a list",
    ),
    (
        "settings-not-mapping",
        _sub("settings: {timeout_s: 2}", "settings: 2"),
        "lab.yaml:7: instruments.meter.settings: expected a mapping, got 2",
    ),
    (
        "flash-command-not-list",
        _sub("flash: {tool: esptool, baud: 460800}", "flash: {tool: esptool, command: bossac}"),
        'lab.yaml:12: boards.esp32.flash.command: expected a list, got "bossac"',
    ),
    # unknown and missing keys
    (
        "misspelt-board-key",
        _sub("flash: {tool", "flsh: {tool"),
        'lab.yaml:12: boards.esp32.flsh: unknown key; did you mean "flash"? '
        "(allowed: family, flash, link, power, power_mode, serial, sim, ssh)",
    ),
    (
        "misspelt-serial-key",
        _sub("baud: 115200", "bauds: 115200"),
        'lab.yaml:11: boards.esp32.serial.bauds: unknown key; did you mean "baud"? (allowed: baud, reset, timeout_s, url)',
    ),
    (
        "misspelt-top-level",
        _sub("budgets:", "budget:"),
        'lab.yaml:26: budget: unknown key; did you mean "budgets"? (allowed: boards, budgets, instruments, lab, servers)',
    ),
    (
        "misspelt-metric",
        _sub("latency_p99_ms:", "latency_p99:"),
        'lab.yaml:29: budgets.esp32.digits_mlp_int8.latency_p99: unknown key; did you mean "latency_p99_ms"? '
        "(allowed: accuracy, arena_kib, cold_start_ms, energy_mj, flash_kib, latency_mean_ms, "
        "latency_p50_ms, latency_p90_ms, latency_p99_ms, offloaded_fraction, peak_rss_mib, strategy_epi_mj, strategy_lpi_ms)",
    ),
    (
        "misspelt-instrument-key",
        _sub("resource: TCPIP", "resorce: TCPIP"),
        'lab.yaml:6: instruments.meter.resorce: unknown key; did you mean "resource"? '
        "(allowed: kind, resource, settings, sim)",
    ),
    (
        "missing-family",
        _sub("    family: esp32_devkitc\n", ""),
        "lab.yaml:9: boards.esp32.family: required key is missing",
    ),
    (
        "missing-lab-name",
        _sub("  name: t\n", "  devices: devices\n"),
        "lab.yaml:1: lab.name: required key is missing",
    ),
    (
        "misspelt-required-key",
        _sub("    family: esp32_devkitc\n", "    famly: esp32_devkitc\n"),
        'lab.yaml:10: boards.esp32.famly: unknown key; did you mean "family"? '
        "(allowed: family, flash, link, power, power_mode, serial, sim, ssh)",
    ),
    (
        "missing-resource",
        _sub("    resource: TCPIP::127.0.0.1::15025::SOCKET\n", ""),
        "lab.yaml:4: instruments.meter.resource: required key is missing",
    ),
    (
        "no-link",
        _sub('    serial: {url: "rfc2217://127.0.0.1:14001", baud: 115200}\n', ""),
        "lab.yaml:9: boards.esp32: a board needs exactly one of serial: or ssh:",
    ),
    (
        "limit-without-bound",
        _sub("{max: 2.0, marginal_pct: 10}", "{marginal_pct: 10}"),
        "lab.yaml:29: budgets.esp32.digits_mlp_int8.latency_p99_ms: a limit needs exactly one of max: or min:",
    ),
    (
        "bad-serial-url",
        _sub('"rfc2217://127.0.0.1:14001"', '"tcp:14001"'),
        "lab.yaml:11: boards.esp32.serial.url: expected a serial device or pyserial URL "
        '(rfc2217://host:port, socket://host:port), got "tcp:14001"',
    ),
    # dangling references
    (
        "unknown-instrument",
        _sub("power: {instrument: meter}", "power: {instrument: metre}"),
        'lab.yaml:13: boards.esp32.power.instrument: unknown instrument "metre"; did you mean "meter"? (known: meter)',
    ),
    (
        "unknown-family",
        _sub("family: rpi4b", "family: rpi4"),
        'lab.yaml:16: boards.pi.family: unknown family "rpi4"; did you mean "rpi4b"? (known: '
        "coral_dev_board_micro, esp32_devkitc, jetson_orin_nano, nano33_ble_sense, rpi4b) in {devices}",
    ),
    (
        "unknown-flash-tool",
        _sub("tool: esptool", "tool: esptol"),
        'lab.yaml:12: boards.esp32.flash.tool: unknown flash tool "esptol"; did you mean "esptool"? '
        "(known: bossac, dut_serial, esptool, flashtool, ssh)",
    ),
    (
        "unknown-instrument-kind",
        _sub("kind: pm1000", "kind: pm100"),
        'lab.yaml:5: instruments.meter.kind: unknown instrument kind "pm100"; did you mean "pm1000"? (known: pm1000)',
    ),
    (
        "two-boards-one-port",
        _sub("port: 12201", "port: 14001").replace(
            "host: 127.0.0.1\n      port", "host: 127.0.0.1\n      port"
        ),
        "lab.yaml:19: boards.pi.ssh.port: 127.0.0.1:14001 is already used by boards.esp32",
    ),
    (
        "board-on-instrument-port",
        _sub('"rfc2217://127.0.0.1:14001"', '"rfc2217://127.0.0.1:15025"'),
        "lab.yaml:11: boards.esp32.serial.url: 127.0.0.1:15025 is already used by instruments.meter",
    ),
    (
        "unknown-power-mode",
        _sub("power_mode: 15W", "power_mode: 25W"),
        'lab.yaml:24: boards.jetson.power_mode: unknown power mode of jetson_orin_nano "25W"; '
        'did you mean "15W"? (known: 15W, 7W)',
    ),
    (
        "budget-for-unknown-board",
        _sub("budgets:\n  esp32:", "budgets:\n  esp23:"),
        'lab.yaml:27: budgets.esp23: unknown board or family "esp23"; did you mean "esp32"? '
        "(known: esp32, esp32_devkitc, jetson, jetson_orin_nano, pi, rpi4b)",
    ),
    # environment and syntax
    (
        "unset-variable",
        _sub("${LABBENCH_TEST_USER}", "${LABBENCH_NO_SUCH_VAR}"),
        "lab.yaml:20: boards.pi.ssh.user: environment variable LABBENCH_NO_SUCH_VAR is not set",
    ),
    (
        "unterminated-substitution",
        _sub("host: 127.0.0.1", "host: ${RPI4_HOST:-127.0.0.1"),
        'lab.yaml:18: boards.pi.ssh.host: bad substitution "${RPI4_HOST:-127.0.0.1": no closing }',
    ),
    (
        "substitution-bad-name",
        _sub("${LABBENCH_TEST_USER}", "${1BAD}"),
        'lab.yaml:20: boards.pi.ssh.user: bad substitution "${1BAD}": ' + FORMS,
    ),
    (
        "substitution-empty",
        _sub("resource: TCPIP::127.0.0.1::15025::SOCKET", "resource: TCPIP::${}::SOCKET"),
        'lab.yaml:6: instruments.meter.resource: bad substitution "${}": ' + FORMS,
    ),
    (
        "substitution-nested",
        _sub("${LABBENCH_TEST_USER}", "${NO_SUCH_VAR:-${LABBENCH_TEST_USER}}"),
        'lab.yaml:20: boards.pi.ssh.user: bad substitution "${NO_SUCH_VAR:-${LABBENCH_TEST_USER}": ' + FORMS,
    ),
    (
        "substitution-bad-operator",
        _sub("${LABBENCH_TEST_USER}", "${LABBENCH_TEST_USER:=pi}"),
        'lab.yaml:20: boards.pi.ssh.user: bad substitution "${LABBENCH_TEST_USER:=pi}": ' + FORMS,
    ),
    (
        "substitution-in-list",
        _sub("flash: {tool: esptool, baud: 460800}", "flash: {tool: esptool, command: [esptool, '${PORT']}"),
        'lab.yaml:12: boards.esp32.flash.command.1: bad substitution "${PORT": no closing }',
    ),
    # offload links and edge servers
    (
        "link-the-family-lacks",
        _sub("power: {instrument: meter}", "power: {instrument: meter}\n    link: ble"),
        "lab.yaml:14: boards.esp32.link: esp32_devkitc boards offload over wifi "
        "(devices/esp32_devkitc.yaml links:), not ble",
    ),
    (
        "link-unknown-kind",
        _sub("power: {instrument: meter}", "power: {instrument: meter}\n    link: lte"),
        "lab.yaml:14: boards.esp32.link: expected 'wifi', 'ble' or 'ethernet', got \"lte\"",
    ),
    (
        "link-negative-latency",
        _sub(
            "power: {instrument: meter}", "power: {instrument: meter}\n    link: {kind: wifi, latency_ms: -1}"
        ),
        "lab.yaml:14: boards.esp32.link.latency_ms: input should be greater than or equal to 0, got -1",
    ),
    (
        "server-on-a-taken-port",
        _sub("budgets:", "servers:\n  edge: {host: 127.0.0.1, port: 15025, model: m.tflite}\nbudgets:"),
        "lab.yaml:27: servers.edge.port: 127.0.0.1:15025 is already used by instruments.meter",
    ),
    (
        "server-without-model",
        _sub("budgets:", "servers:\n  edge: {host: 127.0.0.1, port: 15100}\nbudgets:"),
        "lab.yaml:27: servers.edge.model: required key is missing",
    ),
    (
        "bad-yaml",
        _sub("settings: {timeout_s: 2}", "settings: {timeout_s: 2"),
        "lab.yaml:8: not valid YAML: expected ',' or '}', but got ':'",
    ),
]


@pytest.mark.parametrize("text, message", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_lab(tmp_path, text, message):
    from labbench.catalog import default_devices_dir

    with pytest.raises(LabConfigError) as exc:
        inventory.load(write(tmp_path, text))
    assert str(exc.value) == message.replace("{devices}", str(default_devices_dir()))


def test_at_least_25_malformed_cases():
    assert len(MALFORMED) >= 25


def test_every_problem_is_reported(tmp_path):
    text = _sub("baud: 460800", 'baud: "921k"').replace("port: 12201", "port: ssh")
    with pytest.raises(LabConfigError) as exc:
        inventory.load(write(tmp_path, text))
    assert str(exc.value).splitlines() == [
        'lab.yaml:12: boards.esp32.flash.baud: expected an integer, got "921k"',
        'lab.yaml:19: boards.pi.ssh.port: expected an integer, got "ssh"',
    ]


def test_endpoint_notations():
    assert inventory.endpoint("rfc2217://127.0.0.1:14001") == ("127.0.0.1", 14001)
    assert inventory.endpoint("socket://lab-pc:7000") == ("lab-pc", 7000)
    assert inventory.endpoint("TCPIP0::10.0.0.9::5025::SOCKET") == ("10.0.0.9", 5025)
    assert inventory.endpoint("/dev/ttyUSB0") is None


def test_real_lab_example_differs_from_the_default_only_in_addresses():
    sim, real = inventory.load(REPO / "lab.yaml"), inventory.load(REPO / "examples/lab.real.yaml")
    assert not real.simulated and sim.simulated
    assert {n: b.family for n, b in real.boards.items()} == {n: b.family for n, b in sim.boards.items()}
    assert {n: b.power for n, b in real.boards.items()} == {n: b.power for n, b in sim.boards.items()}
    assert {n: i.kind for n, i in real.instruments.items()} == {n: i.kind for n, i in sim.instruments.items()}
