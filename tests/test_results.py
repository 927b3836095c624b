"""Journal, latency statistics, budget verdicts and the dashboard, on records built in the test;
partial records (cut short by an infrastructure error) load but are never judged nor a baseline."""

from __future__ import annotations

import json

import numpy as np
import pytest

from labbench import results
from labbench.budgets import Verdict, judge, worst
from labbench.gate import collect, gate, load_baseline, save_baseline
from labbench.inventory import ModelBudget
from labbench.measure.record import Energy, Event, Measurement, Memory, Provenance
from labbench.measure.stats import latency_record
from labbench.report import dashboard
from labbench.report.plots import pareto_mask


def measurement(
    model="digits_mlp_int8", config="int8", p50=1.0, accuracy=0.97, board="esp32", energy_mj=0.2, flash=5000
) -> Measurement:
    samples = list(np.random.default_rng(0).normal(p50, p50 * 0.02, 200))
    return Measurement(
        board=board,
        model=model,
        config=config,
        accuracy=accuracy,
        accuracy_n=359,
        latency=latency_record(samples, method="test"),
        energy=Energy(
            per_inference_mj=energy_mj,
            power_x_latency_mj=energy_mj,
            integrated_mj=energy_mj,
            uncertainty_mj=0.01,
            active_power_w=0.3,
            idle_power_w=0.1,
            dynamic_mj=0.1,
            window_s=10,
            inferences=100,
            windows=5,
            method="test",
        ),
        memory=Memory(flash_bytes=flash, arena_bytes=2256),
        provenance=Provenance(
            board=board, family="esp32_devkitc", source="sim", model_sha256="ab" * 32, lab_sha256="cd" * 32
        ),
    )


def test_journal_round_trip_and_torn_line(tmp_path):
    journal = results.Journal(tmp_path / "j.jsonl")
    journal.append(measurement())
    journal.append(measurement(model="digits_mlp_fp32", config="fp32", p50=2.0))
    with open(journal.path, "a") as f:  # a run killed mid-write leaves half a record
        f.write('{"schema_version": 1, "board": "esp')
    with pytest.warns(results.JournalWarning, match=rf"^{journal.path}:3: skipped: incomplete last record"):
        df = results.load(journal.path)
    assert list(df["model"]) == ["digits_mlp_int8", "digits_mlp_fp32"]
    assert df["latency.p50_ms"].iloc[1] == pytest.approx(2.0, rel=0.02)
    assert df["provenance.source"].tolist() == ["sim", "sim"]


def test_latency_summary_percentiles():
    s = latency_record(list(range(1, 101)), method="test")
    assert s.p50_ms == pytest.approx(50.5) and s.p99_ms == pytest.approx(99.01)
    assert s.p50_ci95_ms[0] < 50.5 < s.p50_ci95_ms[1]


def test_budget_verdicts_name_number_unit_and_budget():
    m = measurement(p50=1.0, accuracy=0.97)
    budget = ModelBudget.model_validate(
        {
            "latency_p50_ms": {"max": 1.02, "marginal_pct": 5},
            "accuracy": 0.99,
            "energy_mj": 1.0,
            "arena_kib": 1,
        }
    )
    got = {j.metric: j for j in judge(m, budget)}
    assert got["latency_p50_ms"].verdict is Verdict.MARGINAL
    assert got["accuracy"].verdict is Verdict.FAIL and got["energy_mj"].verdict is Verdict.PASS
    assert got["arena_kib"].verdict is Verdict.FAIL
    assert str(got["arena_kib"]) == "arena_kib: measured 2.203 KiB vs budget max 1 KiB: FAIL"
    assert "95% CI" in str(got["latency_p50_ms"]) and " ms" in str(got["latency_p50_ms"])
    assert worst([j.verdict for j in got.values()]) is Verdict.FAIL


def test_pareto_mask():
    assert pareto_mask([0.9, 0.95, 0.8, 0.96], [1.0, 2.0, 3.0, 2.5]).tolist() == [True, True, False, True]
    # slower but smaller and as accurate: on the accuracy/latency/memory frontier
    assert pareto_mask([0.97, 0.97], [0.2, 0.1], [5.0, 10.0]).tolist() == [True, True]
    assert pareto_mask([0.97, 0.97], [0.2, 0.1], [10.0, 10.0]).tolist() == [False, True]


def test_dashboard_has_tables_and_frontier(tmp_path):
    journal = results.Journal(tmp_path / "j.jsonl")
    for model, config, p50, acc in [
        ("digits_mlp_fp32", "fp32", 3.0, 0.966),
        ("digits_mlp_fp32_pruned", "pruned fp32", 2.5, 0.95),
        ("digits_mlp_int8", "int8", 1.0, 0.969),
        ("digits_mlp_int8_aggressive", "aggressive int8", 0.8, 0.93),
    ]:
        journal.append(measurement(model=model, config=config, p50=p50, accuracy=acc))
    out = dashboard.build([journal.path], tmp_path / "index.html")
    text = out.read_text()
    assert "<h2>esp32</h2>" in text and "esp32: digits frontier" in text
    assert text.count("digits_mlp_") == 4 and "data:image/png;base64," in text


def test_measurement_json_is_traceable():
    data = json.loads(measurement().model_dump_json())
    assert {"board", "family", "source", "model_sha256", "lab_sha256", "bench_git_rev"} <= set(
        data["provenance"]
    )


def test_partial_records_and_events_load_and_old_records_stay_valid(tmp_path):
    journal = results.Journal(tmp_path / "j.jsonl")
    old = json.loads(measurement().model_dump_json())
    del old["status"], old["error"]  # a record written before partial records existed
    with open(journal.path, "a") as f:
        f.write(json.dumps(old) + "\n")
    journal.append(measurement(p50=5.0).model_copy(update={"status": "partial", "error": "esp32: pm: gone"}))
    journal.append(
        Event(
            kind="attempt",
            board="esp32",
            step="measure",
            error="InstrumentError: pm: gone",
            attempt=1,
            attempts=2,
            recovery="power meter reconnected, reset",
        )
    )
    journal.append(Event(kind="quarantine", board="esp32", step="measure", error="InstrumentError: pm: gone"))
    assert [m.status for m in results.read(journal.path)] == ["valid", "partial"]
    assert [e.kind for e in results.events(journal.path)] == ["attempt", "quarantine"]
    assert results.load(journal.path)["status"].tolist() == ["valid"]  # partial records only when asked for
    df = results.load(journal.path, include_partial=True)
    assert df["status"].tolist() == ["valid", "partial"] and df["error"].iloc[1] == "esp32: pm: gone"
    assert df["latency.p50_ms"].iloc[1] == pytest.approx(5.0, rel=0.05)


def test_partial_records_are_never_judged_nor_a_baseline(tmp_path):
    journal = results.Journal(tmp_path / "j.jsonl")
    journal.append(measurement(p50=1.0))
    # later, a run cut short: slower, and no energy; it must not stand for the board
    journal.append(
        measurement(p50=9.0).model_copy(
            update={"status": "partial", "error": "esp32: infer: lost", "energy": None}
        )
    )
    latest, notes, problems = collect([journal.path])
    assert (
        latest[("esp32", "digits_mlp_int8")].latency.p50_ms == pytest.approx(1.0, rel=0.05) and not problems
    )
    assert any("partial record" in n and "esp32: infer: lost" in n for n in notes)
    saved = load_baseline(save_baseline([journal.path], "b", tmp_path))
    assert [m.status for m in saved.measurements] == ["valid"]
    assert saved.measurements[0].latency.p50_ms == pytest.approx(1.0, rel=0.05)

    only_partial = results.Journal(tmp_path / "p.jsonl")
    only_partial.append(measurement().model_copy(update={"status": "partial", "error": "cut"}))
    result = gate([only_partial.path], baseline=saved)
    assert result.exit_code == 2  # the baseline's board+model was not measured: missing, not judged
    assert {c.verdict for c in result.checks} == {Verdict.MISSING}


def test_dashboard_marks_partial_records_and_lists_faults(tmp_path):
    journal = results.Journal(tmp_path / "j.jsonl")
    journal.append(measurement())
    journal.append(
        measurement(board="nano33").model_copy(update={"status": "partial", "error": "nano33: infer: lost"})
    )
    journal.append(
        Event(
            kind="quarantine",
            board="nano33",
            step="measure digits_mlp_int8",
            error="DutProtocolError: nano33: infer: lost",
            test="t.py::test_x[nano33]",
        )
    )
    text = dashboard.build([journal.path], tmp_path / "index.html").read_text()
    assert "1 measurements (latest per board and model), 1 partial records, 1 quarantines" in text
    nano = text.split("<h2>nano33</h2>")[1]
    assert "partial records: cut short by an infrastructure error, never judged" in nano
    assert "nano33: infer: lost" in nano and "QUARANTINED" in nano and "t.py::test_x[nano33]" in nano
    assert "partial records" not in text.split("<h2>esp32</h2>")[1].split("<h2>")[0]


def test_recorder_refuses_to_judge_a_partial_record():
    from labbench.errors import UsageError
    from labbench.pytest_plugin import Recorder

    partial = measurement().model_copy(update={"status": "partial", "error": "cut"})
    with pytest.raises(UsageError, match=r"a partial record .* is never judged"):
        Recorder(request=None, journal=None).record(partial)
