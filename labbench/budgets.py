"""Budgets judged against measurements, and the one verdict type of the bench.

A limit may have a guard band inside it (`marginal_pct`, OpenHTF's marginal): a value past the
limit FAILs; a value inside the band passes as MARGINAL, a warning shown in the terminal summary and
the reports. A budget failure is a product verdict; an infrastructure failure (a board that did not
answer) is an error raised before any judging, never a FAIL.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from labbench.inventory import Limit, ModelBudget
from labbench.measure.record import Measurement
from labbench.metrics import METRICS


class Verdict(StrEnum):
    """From least to most severe. PASS, IMPROVED and MARGINAL pass; the gate adds IMPROVED and
    REGRESSION (against a baseline) to what a budget gives."""

    PASS = "PASS"
    IMPROVED = "IMPROVED"
    MARGINAL = "MARGINAL"
    MISSING = "MISSING"  # the budget (or the baseline) names a metric this run did not measure
    REGRESSION = "REGRESSION"
    FAIL = "FAIL"

    @property
    def passes(self) -> bool:
        return self in (Verdict.PASS, Verdict.IMPROVED, Verdict.MARGINAL)


def worst(verdicts: list[Verdict]) -> Verdict:
    """The most severe of `verdicts` (PASS for none)."""
    order = list(Verdict)
    return max(verdicts, key=order.index, default=Verdict.PASS)


@dataclass(frozen=True)
class Judgement:
    metric: str
    measured: float | None
    limit: Limit
    verdict: Verdict
    interval: tuple[float, float] | None = None

    @property
    def unit(self) -> str:
        return METRICS[self.metric].unit

    def __str__(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        budget = limit_text(self.limit, self.unit)
        if self.measured is None:
            return f"{self.metric}: not measured (budget {budget}): {self.verdict.value}"
        ci = f" (95% CI {self.interval[0]:.4g}..{self.interval[1]:.4g}{unit})" if self.interval else ""
        return (
            f"{self.metric}: measured {self.measured:.4g}{unit}{ci} vs budget {budget}: {self.verdict.value}"
        )


def limit_text(limit: Limit, unit: str) -> str:
    """`max 2 ms (guard band 10%)`."""
    bound, value = ("max", limit.max) if limit.max is not None else ("min", limit.min)
    band = f" (guard band {limit.marginal_pct:g}%)" if limit.marginal_pct else ""
    return f"{bound} {value:g}{f' {unit}' if unit else ''}{band}"


def judge_value(
    metric: str, measured: float | None, limit: Limit, interval: tuple[float, float] | None = None
) -> Judgement:
    if measured is None:
        return Judgement(metric, None, limit, Verdict.MISSING)
    band = limit.marginal_pct / 100
    if limit.max is not None:
        ok, clear = measured <= limit.max, measured < limit.max * (1 - band)
    else:
        assert limit.min is not None
        ok, clear = measured >= limit.min, measured > limit.min * (1 + band)
    verdict = Verdict.FAIL if not ok else Verdict.PASS if clear or not band else Verdict.MARGINAL
    return Judgement(metric, measured, limit, verdict, interval)


def judge(measurement: Measurement, budget: ModelBudget) -> list[Judgement]:
    """Every metric the budget names, judged against the measurement."""
    return [
        judge_value(
            metric, METRICS[metric].value(measurement), limit, METRICS[metric].interval_of(measurement)
        )
        for metric, limit in budget.limits().items()
    ]
