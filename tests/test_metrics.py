"""One metric specification: budgets, verdicts, the gate and the dashboard all follow labbench.metrics."""

from __future__ import annotations

import pandas as pd
import pytest
from test_results import measurement

from labbench.budgets import Verdict, judge_value, worst
from labbench.inventory import Ceiling, Floor, ModelBudget
from labbench.measure.record import Measurement
from labbench.metrics import METRICS
from labbench.report.dashboard import with_metrics


def record() -> Measurement:
    """A measurement of 2 KiB of model and 2256 B of arena, 0.5 +- 0.01 mJ per inference."""
    return measurement(p50=2.0, accuracy=0.9, energy_mj=0.5, flash=2048)


def test_every_metric_is_a_budget_field_with_its_direction():
    fields = ModelBudget.model_fields
    assert set(fields) == set(METRICS)
    for name, m in METRICS.items():
        kind = Floor if m.direction == "min" else Ceiling
        assert fields[name].annotation == kind | None, name
        assert ModelBudget.model_validate({name: 1}).limits()[name] == kind(**{m.direction: 1})


def test_values_and_intervals_come_from_the_record_in_the_metrics_unit():
    m = record()
    values = {name: spec.value(m) for name, spec in METRICS.items()}
    assert (
        values["latency_p50_ms"] == m.latency.p50_ms
        and values["energy_mj"] == 0.5
        and values["accuracy"] == 0.9
    )
    assert values["flash_kib"] == 2.0 and values["arena_kib"] == 2256 / 1024
    assert values["peak_rss_mib"] is None and values["cold_start_ms"] is None
    assert METRICS["energy_mj"].interval_of(m) == pytest.approx((0.49, 0.51))
    lo, hi = METRICS["latency_p50_ms"].interval_of(m)
    assert lo <= m.latency.p50_ms <= hi and METRICS["accuracy"].interval_of(m) is None


@pytest.mark.parametrize(
    "limit,measured,verdict",
    [
        (Ceiling(max=2.0, marginal_pct=10), 1.7, Verdict.PASS),
        (Ceiling(max=2.0, marginal_pct=10), 1.9, Verdict.MARGINAL),  # inside the limit, within its guard band
        (Ceiling(max=2.0, marginal_pct=10), 2.0, Verdict.MARGINAL),
        (Ceiling(max=2.0, marginal_pct=10), 2.01, Verdict.FAIL),  # past the limit: never marginal
        (Ceiling(max=2.0), 2.0, Verdict.PASS),
        (Floor(min=0.95, marginal_pct=1), 0.97, Verdict.PASS),
        (Floor(min=0.95, marginal_pct=1), 0.955, Verdict.MARGINAL),
        (Floor(min=0.95, marginal_pct=1), 0.949, Verdict.FAIL),
        (Ceiling(max=2.0), None, Verdict.MISSING),
    ],
)
def test_the_guard_band_lies_inside_the_limit(limit, measured, verdict):
    got = judge_value("latency_p50_ms" if limit.max else "accuracy", measured, limit)
    assert got.verdict is verdict and got.verdict.passes == (verdict in (Verdict.PASS, Verdict.MARGINAL))


def test_one_verdict_order_for_budgets_and_the_gate():
    assert worst([Verdict.PASS, Verdict.MARGINAL, Verdict.IMPROVED]) is Verdict.MARGINAL
    assert worst([Verdict.MISSING, Verdict.REGRESSION]) is Verdict.REGRESSION
    assert worst([Verdict.REGRESSION, Verdict.FAIL]) is Verdict.FAIL and worst([]) is Verdict.PASS


def test_the_dashboard_shows_each_measured_metric_under_its_heading():
    df = pd.json_normalize([record().model_dump()])
    df, columns = with_metrics(df)
    assert columns["energy_mj"] == "energy per inference (mJ)" and columns["flash_kib"] == "model size (KiB)"
    assert df["flash_kib"].iloc[0] == 2.0 and "peak_rss_mib" in columns  # a column, empty: not measured
