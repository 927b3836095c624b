"""The main job end to end: `pytest tests_hil --board ...` on a simulated lab, as a user runs it.

The lab is a copy of the default lab.yaml on other ports (so a lab the developer has up is not
disturbed), brought up once with `labbench sim up` and taken down at the end. The HIL runs use
short windows: this checks the plumbing (install, measure, journal, report, budgets), not the
numbers, which the benchmarks and the component tests check; except that a journaled energy per
inference must lie within its stated uncertainty of what the simulated lab's power bus drew.
"""

from __future__ import annotations

import hashlib
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from labbench import inventory, results
from labbench.sim import lab as simlab
from labbench.sim.control import SimControl

REPO = Path(__file__).resolve().parents[1]
PORT_OFFSET = 10000
# short windows: the plumbing, not MLPerf-length numbers (the same options for pytest and labbench measure)
SETTINGS = [
    "--window-s",
    "1",
    "--windows",
    "1",
    "--idle-s",
    "1",
    "--latency-samples",
    "20",
    "--accuracy-samples",
    "60",
]
QUICK = [*SETTINGS, "-p", "no:cacheprovider"]

pytestmark = pytest.mark.slow


def shifted_lab(text: str, budget: str = "") -> str:
    text = re.sub(
        r"(127\.0\.0\.1(?:::|:))(\d{5})", lambda m: f"{m.group(1)}{int(m.group(2)) + PORT_OFFSET}", text
    )
    text = re.sub(
        r"^(\s+port: )(\d{5})$", lambda m: f"{m.group(1)}{int(m.group(2)) + PORT_OFFSET}", text, flags=re.M
    )
    text = text.replace("model: fixtures/", f"model: {REPO}/fixtures/")
    return text.split("\nbudgets:")[0] + "\n" + budget


@pytest.fixture(scope="module")
def sim_lab(tmp_path_factory):
    d = tmp_path_factory.mktemp("lab")
    path = d / "lab.yaml"
    path.write_text(shifted_lab((REPO / "lab.yaml").read_text()))
    lab = inventory.load(path)
    simlab.up(lab)
    yield d
    simlab.down(lab)


def run_hil(lab_dir: Path, board: str, *args: str, budget: str = "") -> subprocess.CompletedProcess:
    if budget:
        (lab_dir / "lab.yaml").write_text(shifted_lab((REPO / "lab.yaml").read_text(), budget))
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(REPO / "tests_hil"),
        "--lab",
        str(lab_dir / "lab.yaml"),
        "--board",
        board,
        "--journal",
        str(lab_dir / f"{board}.jsonl"),
        *QUICK,
        *args,
    ]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def ledger_mj(lab_dir: Path, board: str, row: pd.Series) -> float:
    """What `board` drew per inference over a journaled record's energy window, by the power bus's ledger."""
    lab = inventory.load(lab_dir / "lab.yaml")
    power = lab.boards[board].power
    t0, t1 = row["energy.window_host_s"]
    ledger = SimControl(simlab.state_dir(lab)).ledger
    drawn = ledger(simlab.bus_channel(power.instrument, power.channel), t0, t1)
    return drawn["energy_j"] * 1000 / row["energy.inferences"]


@pytest.mark.parametrize("hil_board", ["esp32", "rpi4"])
def test_hil_run_journals_reports_and_gates_on_budgets(sim_lab, hil_board):
    """One board's run journals, reports and gates on budgets, and its journaled energy per inference
    lies within its stated uncertainty of what the power bus's ledger says the board drew over the
    same window, for a steady load and a bursty one. The ESP32 runs the window as one `infer N 0`:
    the bus holds the active level throughout (level noise aside), as every simulated MCU does. The
    Raspberry Pi's runner streams a record per inference over SSH, and the bus follows the CPU time
    of the board's processes in 100 ms steps: the draw jumps between steps (runner start-up, sshd,
    the host's scheduling) and stays up for a few steps after the window, so the edges beside it are
    not idle and count at their worst case. The check adds no run: it is one query of the ledger."""
    board = hil_board
    html = sim_lab / f"{board}.html"
    done = run_hil(
        sim_lab, board, "-k", "identify or digits_mlp_int8 and not aggressive", "--html", str(html)
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    df = results.load(sim_lab / f"{board}.jsonl")
    row = df[df["model"] == "digits_mlp_int8"].iloc[-1]
    assert row["provenance.source"] == "sim" and row["provenance.board"] == board
    assert re.fullmatch(r"[0-9a-f]{64}", row["provenance.firmware_sha256"])  # the image, or the SSH runner
    assert row["accuracy"] > 0.9 and row["latency.p50_ms"] > 0
    journaled, stated = row["energy.per_inference_mj"], row["energy.uncertainty_mj"]
    drawn = ledger_mj(sim_lab, board, row)
    print(
        f"{board}: {journaled:.6g} mJ per inference, ledger {drawn:.6g} mJ: {journaled / drawn - 1:+.3%}, "
        f"{abs(journaled - drawn) / stated:.2f} of the stated +-{stated:.3g} mJ"
    )
    assert abs(journaled - drawn) <= stated, f"{board}: {journaled} +- {stated} mJ, but {drawn} mJ drawn"
    if board == "esp32":  # reset through RTS (lab.yaml `reset: rts`): the cold start, on both clocks
        assert row["cold_start_ms"] > row["cold_start_breakdown_ms.cold_start_init_ms"] > 0
        assert row["cold_start_breakdown_ms.cold_start_uncertainty_ms"] > 0
        assert row["extra.cold_start_basis"] == "host_and_dut"  # the reset's edge and the DUT's clock
    report = html.read_text()
    assert "energy per inference" in report and "data:image/png;base64" in report
    assert "labbench-timeline" in report and "energy window 1/1" in report  # each test's steps
    assert (REPO / "reports" / "logs" / f"{board}-steps.log").exists()

    # tighten the budget below what was measured: exactly that test turns red, naming number, unit and budget
    p99 = float(row["latency.p99_ms"])
    tight = f"budgets:\n  {board}:\n    digits_mlp_int8:\n      latency_p99_ms: {p99 / 4:.6f}\n"
    red = run_hil(sim_lab, board, "-k", "identify or digits_mlp_int8 and not aggressive", "-rf", budget=tight)
    assert red.returncode == 1, red.stdout[-3000:]
    failed = [line for line in red.stdout.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and f"test_inference_budget[digits_mlp_int8-{board}]" in failed[0], red.stdout[
        -3000:
    ]
    assert re.search(
        rf"latency_p99_ms: measured [\d.]+ ms \(95% CI .*\) vs budget max {float(f'{p99 / 4:.6f}'):g} ms: FAIL",
        red.stdout,
    ), red.stdout[-3000:]


def test_labbench_measure_runs_a_model_file_on_a_board_without_pytest(sim_lab):
    """`labbench measure MODEL --board`: the suites' orchestration (here the Nano's flash through the
    stand-in command of lab.yaml), a journaled record and a table; a wrong board is a usage error."""
    journal = sim_lab / "measure.jsonl"
    model = REPO / "fixtures" / "models" / "digits_mlp_int8.tflite"
    cmd = [
        sys.executable,
        "-m",
        "labbench.cli",
        "measure",
        str(model),
        "--dataset",
        str(REPO / "fixtures" / "datasets" / "digits.npz"),
        "--board",
        "nano33",
        "--lab",
        str(sim_lab / "lab.yaml"),
        "--journal",
        str(journal),
        *SETTINGS,
    ]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    row = results.load(journal).iloc[-1]
    assert (row["board"], row["model"], row["status"]) == ("nano33", "digits_mlp_int8", "valid")
    assert row["provenance.model_sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert row["accuracy_n"] == 60 and row["energy.per_inference_mj"] > 0
    assert re.search(r"nano33 .* measured", done.stdout), done.stdout
    wrong = subprocess.run(
        [*cmd[: cmd.index("nano33")], "nano", *cmd[cmd.index("nano33") + 1 :]],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        wrong.returncode == 2
        and "--board nano: no such board" in wrong.stderr
        and "Traceback" not in wrong.stderr
    )


def test_killed_run_leaves_a_loadable_journal(sim_lab):
    journal = sim_lab / "killed.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(REPO / "tests_hil"),
        "--lab",
        str(sim_lab / "lab.yaml"),
        "--board",
        "rpi4",
        "--journal",
        str(journal),
        *QUICK,
        "-k",
        "inference",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (journal.exists() and journal.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    df = results.load(journal)
    assert len(df) >= 2 and set(df["board"]) == {"rpi4"}
    assert all(
        json.loads(line)["provenance"]["source"] == "sim"
        for line in journal.read_text().splitlines()
        if line.endswith("}")
    )


def test_slower_device_model_gates_red_for_that_board_only(tmp_path):
    """Baseline from one run; a second run where lab.yaml's simulator makes the Nano 30 % slower:
    `labbench gate` fails that board's latency and energy, and nothing on the ESP32."""
    lab_path = tmp_path / "lab.yaml"
    text = shifted_lab((REPO / "lab.yaml").read_text())  # then one range up again: apart from sim_lab's
    text = re.sub(r"(127\.0\.0\.1(?:::|:))2(\d{4})", r"\g<1>3\2", text)
    text = re.sub(r"^(\s+port: )2(\d{4})$", r"\g<1>3\2", text, flags=re.M)
    slow = re.sub(
        r"(^  nano33:\n(?:.*\n)*?    sim: \{model: [^,]+, baud: 921600)\}",
        r"\1, speed_factor: 1.3}",
        text,
        flags=re.M,
    )
    assert slow != text
    journals = []
    for name, content in (("base", text), ("slow", slow)):
        lab_path.write_text(content)
        lab = inventory.load(lab_path)
        simlab.up(lab)
        try:
            journal = tmp_path / f"{name}.jsonl"
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pytest",
                    str(REPO / "tests_hil"),
                    "--lab",
                    str(lab_path),
                    "--board",
                    "esp32",
                    "--board",
                    "nano33",
                    "--journal",
                    str(journal),
                    *QUICK,
                    "--latency-samples",
                    "60",
                    "-k",
                    "inference and digits_mlp_int8 and not aggressive",
                ],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert done.returncode == 0, done.stdout[-3000:]
        finally:
            simlab.down(lab)
        journals.append(journal)
    cli = [sys.executable, "-m", "labbench.cli"]
    saved = subprocess.run(
        [*cli, "baseline", "save", str(journals[0]), "--name", "e2e", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert saved.returncode == 0, saved.stderr
    verdict = subprocess.run(
        [
            *cli,
            "gate",
            str(journals[1]),
            "--baseline",
            str(tmp_path / "e2e.json"),
            "--lab",
            str(lab_path),
            "--json",
            str(tmp_path / "gate.json"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert verdict.returncode == 1, verdict.stdout + verdict.stderr
    checks = json.loads((tmp_path / "gate.json").read_text())["checks"]
    red = {(c["board"], c["metric"]) for c in checks if c["verdict"] in ("REGRESSION", "FAIL")}
    assert ("nano33", "latency_p50_ms") in red and all(board == "nano33" for board, _ in red), red


def test_a_lossy_serial_line_gives_pass_or_error_never_a_wrong_number(sim_lab):
    """1 byte in 1000 dropped each way on the ESP32's line: every test passes (after recorded retries)
    or errors, and every valid number journaled equals a clean run's within its normal spread."""
    from labbench.sim.control import SimControl

    lab = inventory.load(sim_lab / "lab.yaml")
    control = SimControl(simlab.state_dir(lab))
    select = ["-k", "inference and digits_mlp_int8 and not aggressive", "-rA", "--retries", "2"]
    clean = run_hil(sim_lab, "esp32", *select, "--journal", str(sim_lab / "clean.jsonl"))
    assert clean.returncode == 0, clean.stdout[-3000:]
    faults = [
        control.fault_set("esp32", {"kind": "drop", "rate": 0.001, "seed": 7, "direction": direction})
        for direction in ("to_host", "to_device")
    ]
    try:
        lossy = run_hil(sim_lab, "esp32", *select, "--journal", str(sim_lab / "lossy.jsonl"))
        dropped = control.faults("esp32")["log"]
    finally:
        for fid in faults:
            control.fault_clear("esp32", fid)
    assert dropped, "the fault dropped nothing: the test proves nothing"
    assert "FAILED" not in lossy.stdout, lossy.stdout[-4000:]  # an ERROR or a PASS, never a budget FAIL
    assert not re.search(r"^(INTERNALERROR|Traceback)", lossy.stdout, flags=re.M), lossy.stdout[-4000:]
    base = results.load(sim_lab / "clean.jsonl").set_index("model")
    valid = results.load(sim_lab / "lossy.jsonl")
    for _, row in valid.iterrows():
        ref = base.loc[row["model"]]
        assert row["accuracy"] == ref["accuracy"]  # the same samples through the same model
        assert row["latency.p50_ms"] == pytest.approx(ref["latency.p50_ms"], rel=0.2)
        both = row["energy.uncertainty_mj"] + ref["energy.uncertainty_mj"]
        assert abs(row["energy.per_inference_mj"] - ref["energy.per_inference_mj"]) <= both
    attempts = [e for e in results.events(sim_lab / "lossy.jsonl") if e.kind == "attempt"]
    if re.search(r"^ERROR ", lossy.stdout, flags=re.M) or len(valid) < len(base):
        assert attempts, "a step that failed without an attempt record"
    for attempt in attempts:  # every failed attempt names a typed error, the board and the log
        assert attempt.error is None or re.match(r"\w+: esp32: .*\(full log: .+\)$", attempt.error), attempt
