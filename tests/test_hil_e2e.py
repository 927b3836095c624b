"""The main job end to end: `pytest tests_hil --board ...` on a simulated lab, as a user runs it.

The lab is a copy of the default lab.yaml on other ports (so a lab the developer has up is not
disturbed), brought up once with `labbench sim up` and taken down at the end. The HIL runs use
short windows: this checks the plumbing (install, measure, journal, report, budgets), not the
numbers, which the benchmarks and the component tests check.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from labbench import inventory, results
from labbench.sim import lab as simlab

REPO = Path(__file__).resolve().parents[1]
PORT_OFFSET = 10000
QUICK = ["--window-s", "1", "--windows", "1", "--idle-s", "1", "--latency-samples", "20",
         "--accuracy-samples", "60", "-p", "no:cacheprovider"]

pytestmark = pytest.mark.slow


def shifted_lab(text: str, budget: str = "") -> str:
    text = re.sub(r"(127\.0\.0\.1(?:::|:))(\d{5})", lambda m: f"{m.group(1)}{int(m.group(2)) + PORT_OFFSET}", text)
    text = re.sub(r"^(\s+port: )(\d{5})$", lambda m: f"{m.group(1)}{int(m.group(2)) + PORT_OFFSET}", text, flags=re.M)
    text = text.replace("model: fixtures/", f"model: {REPO}/fixtures/")
    return text.split("\nbudgets:")[0] + "\n" + budget


@pytest.fixture(scope="module")
def sim_lab(tmp_path_factory):
    os.environ.setdefault("USER", "root")
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
    cmd = [sys.executable, "-m", "pytest", str(REPO / "tests_hil"), "--lab", str(lab_dir / "lab.yaml"),
           "--board", board, "--journal", str(lab_dir / f"{board}.jsonl"), *QUICK, *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("hil_board", ["esp32", "rpi4"])
def test_hil_run_journals_reports_and_gates_on_budgets(sim_lab, hil_board):
    board = hil_board
    html = sim_lab / f"{board}.html"
    done = run_hil(sim_lab, board, "-k", "identify or digits_mlp_int8 and not aggressive", "--html", str(html))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    df = results.load(sim_lab / f"{board}.jsonl")
    row = df[df["model"] == "digits_mlp_int8"].iloc[-1]
    assert row["provenance.source"] == "sim" and row["provenance.board"] == board
    assert row["accuracy"] > 0.9 and row["latency.p50_ms"] > 0 and row["energy.per_inference_mj"] > 0
    report = html.read_text()
    assert "energy per inference" in report and "data:image/png;base64" in report

    # tighten the budget below what was measured: exactly that test turns red, naming number, unit and budget
    p99 = float(row["latency.p99_ms"])
    tight = f"budgets:\n  {board}:\n    digits_mlp_int8:\n      latency_p99_ms: {p99 / 4:.6f}\n"
    red = run_hil(sim_lab, board, "-k", "identify or digits_mlp_int8 and not aggressive", "-rf", budget=tight)
    assert red.returncode == 1, red.stdout[-3000:]
    failed = [line for line in red.stdout.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and f"test_inference_budget[digits_mlp_int8-{board}]" in failed[0], red.stdout[-3000:]
    assert re.search(rf"latency_p99_ms: measured [\d.]+ ms \(95% CI .*\) vs budget max {p99 / 4:.4g} ms: FAIL",
                     red.stdout), red.stdout[-3000:]


def test_killed_run_leaves_a_loadable_journal(sim_lab):
    journal = sim_lab / "killed.jsonl"
    cmd = [sys.executable, "-m", "pytest", str(REPO / "tests_hil"), "--lab", str(sim_lab / "lab.yaml"),
           "--board", "rpi4", "--journal", str(journal), *QUICK, "-k", "inference"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (journal.exists() and journal.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    df = results.load(journal)
    assert len(df) >= 2 and set(df["board"]) == {"rpi4"}
    assert all(json.loads(line)["provenance"]["source"] == "sim" for line in journal.read_text().splitlines()
               if line.endswith("}"))
