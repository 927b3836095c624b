"""The release gate on synthetic journals: regressions found, false alarms rare, missing data is exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest

from labbench import gate_cli
from labbench.budgets import Verdict
from labbench.gate import (
    Check,
    Tolerance,
    compare_latency,
    energy_uncertainties,
    gate,
    load_baseline,
    save_baseline,
)
from labbench.measure.record import Energy, Latency, Measurement, Memory, Provenance, Uncertainty
from labbench.results import Journal
from labbench.sim.pm1000 import Pm1000Model, power_bound
from labbench.sim.powerbus import PowerBus

REPO = Path(__file__).resolve().parents[1]
BOARD, MODEL = "esp32", "digits_mlp_int8"
FAMILIES = {"esp32": "esp32_devkitc", "nano33": "nano33_ble_sense"}


def latency_ms(seed: int, n: int = 200, scale: float = 1.0, jitter: float = 0.05) -> np.ndarray:
    """Device-like latencies: 1.5 ms, lognormal jitter and 3% of runs hit by an interrupt (+20..60%)."""
    rng = np.random.default_rng(seed)
    samples = 1.5 * rng.lognormal(0.0, jitter, n)
    hit = rng.random(n) < 0.03
    samples[hit] *= 1 + rng.uniform(0.2, 0.6, hit.sum())
    return samples * scale


def measurement(
    board: str = BOARD,
    model: str = MODEL,
    samples=None,
    energy_mj: float | None = 0.30,
    uncertainty_mj: float = 0.01,
    accuracy: float | None = 0.97,
    accuracy_n: int | None = 1000,
    arena_bytes: int | None = 6 * 1024,
    time_utc: str | None = None,
    budget: Uncertainty | None = None,
    instrument: str | None = None,
    ranges: tuple[float | None, float | None] = (None, None),
    active_power_w: float = 0.2,
) -> Measurement:
    """A synthetic measurement; with a `budget`, its energy's uncertainty is that budget's total."""
    s = np.asarray(latency_ms(0) if samples is None else samples, float)
    p50, p90, p99 = (float(v) for v in np.percentile(s, [50, 90, 99]))
    latency = Latency(
        samples_ms=s.tolist(),
        p50_ms=p50,
        p90_ms=p90,
        p99_ms=p99,
        mean_ms=float(s.mean()),
        p50_ci95_ms=(p50, p50),
        p99_ci95_ms=(p99, p99),
        method="synthetic",
    )
    energy = (
        None
        if energy_mj is None
        else Energy(
            per_inference_mj=energy_mj,
            power_x_latency_mj=energy_mj,
            integrated_mj=energy_mj,
            uncertainty_mj=budget.total if budget else uncertainty_mj,
            uncertainties={"per_inference_mj": budget} if budget else {},
            active_power_w=active_power_w,
            idle_power_w=0.05,
            dynamic_mj=energy_mj * 0.7,
            window_s=10.0,
            inferences=6000,
            windows=5,
            voltage_range_v=ranges[0],
            current_range_a=ranges[1],
            method="synthetic",
        )
    )
    extra = {"time_utc": time_utc} if time_utc else {}
    return Measurement(
        board=board,
        model=model,
        latency=latency,
        energy=energy,
        accuracy=accuracy,
        accuracy_n=accuracy_n,
        memory=Memory(arena_bytes=arena_bytes),
        provenance=Provenance(
            board=board,
            family=FAMILIES[board],
            source="sim",
            instrument=instrument,
            model_sha256="0" * 64,
            lab_sha256="1" * 64,
        ),
        **extra,
    )


def journal(path: Path, *measurements: Measurement) -> Path:
    j = Journal(path)
    for m in measurements:
        j.append(m)
    return path


def baseline_of(tmp_path: Path, *measurements: Measurement, name: str = "base"):
    path = journal(tmp_path / f"{name}.jsonl", *measurements)
    return load_baseline(save_baseline([path], name, tmp_path / "bl"))


def verdicts(result) -> dict[tuple[str, str], Verdict]:
    return {(c.board, c.metric): c.verdict for c in result.checks}


@pytest.fixture
def lab_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "lab.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        lab: {{name: t, devices: {REPO / "devices"}}}
        boards:
          esp32:
            family: esp32_devkitc
            serial: {{url: "rfc2217://127.0.0.1:14001"}}
          nano33:
            family: nano33_ble_sense
            serial: {{url: "rfc2217://127.0.0.1:14002"}}
        budgets:
          esp32:
            {MODEL}:
              latency_p99_ms: {{max: 2.4, marginal_pct: 10}}
              energy_mj: 0.5
              accuracy: 0.95
              arena_kib: 8
        """)
    )
    return path


def test_a_5pct_latency_regression_with_200_samples_a_side_is_detected(tmp_path):
    base = baseline_of(tmp_path, measurement(samples=latency_ms(1)))
    now = journal(tmp_path / "now.jsonl", measurement(samples=latency_ms(2, scale=1.05)))
    result = gate([now], baseline=base)
    assert verdicts(result) == {
        (BOARD, "latency_p50_ms"): Verdict.REGRESSION,
        (BOARD, "energy_mj"): Verdict.PASS,
        (BOARD, "accuracy"): Verdict.PASS,
        (BOARD, "arena_kib"): Verdict.PASS,
    }
    assert result.exit_code == 1
    fast = journal(tmp_path / "fast.jsonl", measurement(samples=latency_ms(3, scale=0.95)))
    faster = gate([fast], baseline=base)
    assert verdicts(faster)[(BOARD, "latency_p50_ms")] is Verdict.IMPROVED and faster.exit_code == 0


@pytest.mark.parametrize("jitter", [0.02, 0.15])  # an MCU's timer-measured jitter; a Linux board's
def test_identical_distributions_rarely_alarm_and_5pct_shifts_are_found(jitter):
    alarms = sum(
        compare_latency(latency_ms(2 * s, jitter=jitter), latency_ms(2 * s + 1, jitter=jitter))[0]
        is not Verdict.PASS
        for s in range(100)
    )
    print(f"jitter {jitter:.0%}: false alarms {alarms}/100 on identical distributions", end="")
    assert alarms <= 2
    if jitter < 0.1:
        found = sum(
            compare_latency(
                latency_ms(2 * s, jitter=jitter), latency_ms(2 * s + 1, scale=1.05, jitter=jitter)
            )[0]
            is Verdict.REGRESSION
            for s in range(100)
        )
        print(f"; 5% regressions found {found}/100", end="")
        assert found >= 95
    print()


def test_a_significant_but_small_latency_shift_is_not_a_regression():
    """Runs of one firmware differ a little; with many samples that is significant, yet no regression."""
    base, now = latency_ms(1, n=2000, jitter=0.02), latency_ms(2, n=2000, jitter=0.02, scale=1.01)
    assert compare_latency(base, now)[0] is Verdict.PASS
    assert compare_latency(base, now, Tolerance(latency_pct=0.5))[0] is Verdict.REGRESSION


def test_an_energy_regression_beyond_the_tolerance_is_detected(tmp_path):
    base = baseline_of(tmp_path, measurement(energy_mj=0.30, uncertainty_mj=0.01))
    # allowance: 0.01 + 0.01 uncertainty + 5% of 0.30 = 0.035 mJ
    within = gate([journal(tmp_path / "a.jsonl", measurement(energy_mj=0.33))], baseline=base)
    beyond = gate([journal(tmp_path / "b.jsonl", measurement(energy_mj=0.34))], baseline=base)
    assert verdicts(within)[(BOARD, "energy_mj")] is Verdict.PASS and within.exit_code == 0
    assert verdicts(beyond)[(BOARD, "energy_mj")] is Verdict.REGRESSION and beyond.exit_code == 1
    looser = gate([tmp_path / "b.jsonl"], baseline=base, tolerance=Tolerance(energy_pct=10))
    assert looser.exit_code == 0


UNIT, OTHER_UNIT = "Voltech,PM1000+,SN-0001,1.00", "Voltech,PM1000+,SN-0002,1.00"
RANGES = (10.0, 0.4)  # V, A


def steady(energy_mj: float, instrument: str = UNIT, ranges: tuple[float, float] = RANGES) -> Measurement:
    """A measurement whose energy uncertainty is mostly the instrument's accuracy, as a steady load's is."""
    budget = Uncertainty(total=0.01, accuracy=0.009, rounding=0.0002, edges=0.0006, spread=0.0002)
    return measurement(energy_mj=energy_mj, budget=budget, instrument=instrument, ranges=ranges)


def test_on_one_instrument_and_ranges_energy_is_compared_by_the_random_uncertainties(tmp_path):
    """The calibration error both measurements share cancels: a shift beyond the random parts of the
    budgets but within their totals is a regression on the same instrument and ranges only."""
    base = baseline_of(tmp_path, steady(0.30))

    def judged(now: Measurement, name: str) -> Check:
        result = gate([journal(tmp_path / f"{name}.jsonl", now)], baseline=base)
        return next(c for c in result.checks if c.metric == "energy_mj")

    # totals: 0.01 + 0.01 + 5% of 0.30 = 0.035 mJ. Random: 0.001 + 0.001, + 0.009 x (0.025 + 0.025) / 0.30
    # of the calibration error that does not cancel (energy and time per inference both 8.3 % up), + 5%
    # of 0.30 = 0.0185 mJ
    same = judged(steady(0.325), "same")
    assert same.verdict is Verdict.REGRESSION and "random uncertainties (same instrument" in same.detail
    assert judged(steady(0.275), "lower").verdict is Verdict.IMPROVED
    assert judged(steady(0.315), "within").verdict is Verdict.PASS  # 0.015 < 0.0179 mJ
    assert judged(steady(0.325, instrument=OTHER_UNIT), "other").verdict is Verdict.PASS
    assert judged(steady(0.325, ranges=(10.0, 1.6)), "ranges").verdict is Verdict.PASS
    unbudgeted = judged(measurement(energy_mj=0.325, instrument=UNIT, ranges=RANGES), "old")
    assert unbudgeted.verdict is Verdict.PASS and "uncertainties 0.01 + 0.01 mJ" in unbudgeted.detail


def test_what_is_left_of_a_shared_calibration_error_bounds_the_simulated_pm1000s():
    """200 simulated PM1000+ units, each measuring a steady load and that load with its power and time
    per inference changed by up to 20 % on the same ranges: the error of the measured change stays
    within what the gate keeps of the calibration error. Were the second measurement another unit's
    (the same *IDN? claimed), it would mostly not: hence the totals across instruments."""
    channel, rng, volts = PowerBus().channel("bench:1"), np.random.default_rng(0), 5.0

    def measured(meter: Pm1000Model, watts: float, seconds: float, accuracy_mj: float = 0.0) -> Measurement:
        """Energy per inference of `watts` for `seconds`, as `meter` shows it on RANGES (ranges 1 and 2)."""
        shown_w = meter.calibration["V"][0](volts) * meter.calibration["A"][1](watts / volts)
        budget = Uncertainty(total=accuracy_mj, accuracy=accuracy_mj, rounding=0.0, edges=0.0)
        return measurement(
            energy_mj=shown_w * seconds * 1000,
            budget=budget,
            instrument=UNIT,
            ranges=RANGES,
            active_power_w=shown_w,
        )

    uncovered = 0
    for seed in range(200):
        unit, other = Pm1000Model(channel, seed=seed), Pm1000Model(channel, seed=seed + 1000)
        watts, seconds = rng.uniform(0.2, 1.5), 1e-3
        new_watts, new_seconds = watts * rng.uniform(0.8, 1.2), seconds * rng.uniform(0.8, 1.2)
        base = measured(unit, watts, seconds, power_bound(volts, watts / volts, *RANGES) * seconds * 1000)
        change_mj = (new_watts * new_seconds - watts * seconds) * 1000
        for meter in (unit, other):
            now = measured(meter, new_watts, new_seconds)
            error = now.energy.per_inference_mj - base.energy.per_inference_mj - change_mj
            kept = sum(energy_uncertainties(base, now)[:2])
            assert meter is other or abs(error) <= kept, (seed, error, kept)
            uncovered += meter is other and abs(error) > kept
    print(f"another unit's calibration beyond what one unit's leaves: {uncovered}/200")
    assert uncovered > 100


def test_an_accuracy_drop_is_a_regression_when_significant(tmp_path):
    base = baseline_of(tmp_path, measurement(accuracy=0.97, accuracy_n=1000))
    drop = gate([journal(tmp_path / "a.jsonl", measurement(accuracy=0.94, accuracy_n=1000))], baseline=base)
    noise = gate([journal(tmp_path / "b.jsonl", measurement(accuracy=0.96, accuracy_n=1000))], baseline=base)
    assert verdicts(drop)[(BOARD, "accuracy")] is Verdict.REGRESSION
    assert verdicts(noise)[(BOARD, "accuracy")] is Verdict.PASS  # 10 of 1000 is within chance at p<0.01


def test_a_board_in_the_baseline_that_was_not_measured_gives_exit_2(tmp_path):
    base = baseline_of(tmp_path, measurement(), measurement(board="nano33"))
    result = gate([journal(tmp_path / "now.jsonl", measurement())], baseline=base)
    assert verdicts(result)[("nano33", "measurement")] is Verdict.MISSING
    assert result.exit_code == 2
    assert gate([tmp_path / "now.jsonl"], baseline=base, boards=["esp32"]).exit_code == 0


def test_budget_failures_give_exit_1_and_a_marginal_value_passes(tmp_path, lab_yaml):
    fail = gate([journal(tmp_path / "a.jsonl", measurement(arena_bytes=10 * 1024))], lab=lab_yaml)
    assert verdicts(fail)[(BOARD, "arena_kib")] is Verdict.FAIL and fail.exit_code == 1
    unit_p99 = latency_ms(0) / np.percentile(latency_ms(0), 99)
    ok = gate([journal(tmp_path / "b.jsonl", measurement(samples=unit_p99 * 2.1))], lab=lab_yaml)
    assert set(verdicts(ok).values()) == {Verdict.PASS} and ok.exit_code == 0
    # p99 2.3 ms: inside the 2.4 ms limit's 10% guard band (2.16..2.4 ms): a warning, not a failure
    marginal = gate([journal(tmp_path / "c.jsonl", measurement(samples=unit_p99 * 2.3))], lab=lab_yaml)
    assert verdicts(marginal)[(BOARD, "latency_p99_ms")] is Verdict.MARGINAL and marginal.exit_code == 0
    # p99 2.5 ms: past the limit, whatever the band
    over = gate([journal(tmp_path / "e.jsonl", measurement(samples=unit_p99 * 2.5))], lab=lab_yaml)
    assert verdicts(over)[(BOARD, "latency_p99_ms")] is Verdict.FAIL and over.exit_code == 1
    unmeasured = gate([journal(tmp_path / "d.jsonl", measurement(energy_mj=None))], lab=lab_yaml)
    assert verdicts(unmeasured)[(BOARD, "energy_mj")] is Verdict.MISSING and unmeasured.exit_code == 2


def test_a_torn_record_makes_the_data_incomplete(tmp_path):
    path = journal(tmp_path / "now.jsonl", measurement())
    with path.open("a") as f:
        f.write(measurement(board="nano33").model_dump_json()[:100])  # a run killed mid-write
    result = gate([path])
    assert len(result.incomplete) == 1 and "incomplete last record" in result.incomplete[0]
    assert result.exit_code == 2
    assert gate([tmp_path / "absent.jsonl"]).exit_code == 2


def test_the_latest_of_several_measurements_is_used_and_said(tmp_path):
    base = baseline_of(tmp_path, measurement(samples=latency_ms(1)))
    slow = measurement(samples=latency_ms(2, scale=1.1), time_utc="2030-01-01T00:00:00+00:00")
    fine = measurement(samples=latency_ms(3), time_utc="2030-01-02T00:00:00+00:00")
    result = gate([journal(tmp_path / "now.jsonl", fine, slow)], baseline=base)
    assert result.exit_code == 0
    assert any("2 measurements" in n and "using the latest (2030-01-02" in n for n in result.notes)


def test_the_markdown_summary_has_a_table_per_board(tmp_path, lab_yaml):
    base = baseline_of(tmp_path, measurement(samples=latency_ms(1)), measurement(board="nano33"))
    now = journal(tmp_path / "now.jsonl", measurement(samples=latency_ms(2, scale=1.05)))
    lines = gate([now], lab=lab_yaml, baseline=base).markdown().splitlines()
    assert lines[0] == "## labbench gate: FAIL (exit 1)"
    header = "| model | metric | budget | baseline | now | change | verdict | why |"
    assert lines[lines.index("### esp32") + 2] == lines[lines.index("### nano33") + 2] == header
    esp32 = [row.split(" | ") for row in lines[lines.index("### esp32") + 4 : lines.index("### nano33") - 1]]
    assert [(r[1], r[2], r[6]) for r in esp32] == [
        ("latency_p50_ms", "", "**REGRESSION**"),
        ("latency_p99_ms", "max 2.4 ms (guard band 10%)", "PASS"),
        ("energy_mj", "max 0.5 mJ", "PASS"),
        ("accuracy", "min 0.95", "PASS"),
        ("arena_kib", "max 8 KiB", "PASS"),
    ]
    p50_ms = [np.median(latency_ms(seed, scale=k)) for seed, k in ((1, 1.0), (2, 1.05))]
    change = f"{(p50_ms[1] / p50_ms[0] - 1) * 100:+.1f}%"
    assert esp32[0][3:6] == [f"{p50_ms[0]:.4g} ms", f"{p50_ms[1]:.4g} ms", change]
    assert esp32[0][7].startswith("Mann-Whitney U p=")
    assert esp32[3][3:6] == ["0.97", "0.97", "+0.00 pts"]
    nano = lines[lines.index("### nano33") + 4]
    assert nano.startswith("| digits_mlp_int8 | measurement |  | - | - | - | **MISSING** |")


def test_cli_exit_codes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    journal(tmp_path / "base.jsonl", measurement(samples=latency_ms(1)), measurement(board="nano33"))
    journal(tmp_path / "good.jsonl", measurement(samples=latency_ms(2)), measurement(board="nano33"))
    slow = measurement(samples=latency_ms(2, scale=1.05))
    journal(tmp_path / "slow.jsonl", slow, measurement(board="nano33"))
    journal(tmp_path / "part.jsonl", measurement(samples=latency_ms(2)))
    assert gate_cli.main(["baseline", "save", "base.jsonl", "--name", "v1"]) == 0
    assert load_baseline("v1").entries().keys() == {("esp32", MODEL), ("nano33", MODEL)}
    assert gate_cli.main(["gate", "slow.jsonl", "--baseline", "v1"]) == 1
    assert gate_cli.main(["gate", "slow.jsonl", "--baseline", "v1", "--tolerance", "latency_pct=10"]) == 0
    assert gate_cli.main(["gate", "part.jsonl", "--baseline", "v1"]) == 2
    assert gate_cli.main(["gate", "part.jsonl", "--baseline", "v1", "--board", "esp32"]) == 0
    capsys.readouterr()
    assert gate_cli.main(["gate", "good.jsonl", "--baseline", "nope"]) == 2
    assert "baselines in reports/baselines: v1" in capsys.readouterr().err
    (tmp_path / "reports/baselines/bad.json").write_text("{}")
    assert gate_cli.main(["gate", "good.jsonl", "--baseline", "bad"]) == 2
    assert "not a labbench baseline" in capsys.readouterr().err
    assert gate_cli.main(["gate", "good.jsonl", "--tolerance", "latency=3"]) == 2
    assert "latency: Extra inputs are not permitted" in capsys.readouterr().err


def test_python_m_gate_cli_writes_markdown_and_json(tmp_path):
    journal(tmp_path / "base.jsonl", measurement(samples=latency_ms(1)))
    save_baseline([tmp_path / "base.jsonl"], "v1", tmp_path / "reports/baselines")
    journal(tmp_path / "now.jsonl", measurement(samples=latency_ms(2, scale=1.05)))
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "labbench.gate_cli",
            "gate",
            "now.jsonl",
            "--baseline",
            "v1",
            "--json",
            "out/gate.json",
            "--markdown",
            "out/gate.md",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert json.loads((tmp_path / "out/gate.json").read_text())["checks"][0]["verdict"] == "REGRESSION"
    assert (tmp_path / "out/gate.md").read_text().startswith("## labbench gate: FAIL (exit 1)")
    assert (tmp_path / "out/gate.md").read_text() in run.stdout


PLUGIN_TEST = """\
import datetime as dt
from pathlib import Path
from labbench.measure.record import Measurement
from labbench.results import Journal

def test_measure():
    m = Measurement.model_validate_json(Path("measured.json").read_text())
    now = dt.datetime.now(dt.UTC).isoformat()
    Journal("reports/journal.jsonl").append(m.model_copy(update={"time_utc": now}))
"""


@pytest.mark.parametrize("scale, code", [(1.0, 0), (1.05, 1), (None, 2)])
def test_pytest_option_gates_the_runs_own_measurements(tmp_path, scale, code):
    """The gate at the end of a run judges that run's records only: an earlier run's record does not count."""
    save_baseline(
        [journal(tmp_path / "base.jsonl", measurement(samples=latency_ms(1)))],
        "v1",
        tmp_path / "reports/baselines",
    )
    journal(tmp_path / "reports/journal.jsonl", measurement(samples=latency_ms(3)))  # from an earlier run
    if scale is None:
        (tmp_path / "test_run.py").write_text("def test_nothing():\n    pass\n")
    else:
        measured = measurement(samples=latency_ms(2, scale=scale))
        (tmp_path / "measured.json").write_text(measured.model_dump_json())
        (tmp_path / "test_run.py").write_text(PLUGIN_TEST)
    loaded = any(ep.value == "labbench.gate_plugin" for ep in entry_points(group="pytest11"))
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "test_run.py",
            "-q",
            "-p",
            "no:cacheprovider",
            *([] if loaded else ["-p", "labbench.gate_plugin"]),
            "--labbench-gate",
            "v1",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == code, run.stdout + run.stderr
    assert f"labbench gate: {('PASS', 'FAIL', 'INCOMPLETE')[code]} (exit {code})" in run.stdout
    assert json.loads((tmp_path / "reports/gate.json").read_text())["exit_code"] == code
