"""Budgets judged against measurements: PASS, MARGINAL (inside the marginal band past the limit) or FAIL.

A budget failure is a product verdict; an infrastructure failure (a board that did not answer) is an
error raised before any judging, never a FAIL.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from labbench.inventory import METRICS, Limit, ModelBudget
from labbench.measure.record import Measurement


class Verdict(str, Enum):
    PASS = "PASS"
    MARGINAL = "MARGINAL"
    FAIL = "FAIL"
    MISSING = "MISSING"  # the budget names a metric this run did not measure


@dataclass(frozen=True)
class Judgement:
    metric: str
    measured: float | None
    limit: Limit
    verdict: Verdict
    interval: tuple[float, float] | None = None

    @property
    def unit(self) -> str:
        return METRICS[self.metric][0]

    def __str__(self) -> str:
        bound = "max" if self.limit.max is not None else "min"
        value = self.limit.max if self.limit.max is not None else self.limit.min
        unit = f" {self.unit}" if self.unit else ""
        if self.measured is None:
            return f"{self.metric}: not measured (budget {bound} {value:g}{unit}): {self.verdict.value}"
        ci = f" (95% CI {self.interval[0]:.4g}..{self.interval[1]:.4g}{unit})" if self.interval else ""
        band = f", marginal band {self.limit.marginal_pct:g}%" if self.limit.marginal_pct else ""
        return (f"{self.metric}: measured {self.measured:.4g}{unit}{ci} vs budget {bound} "
                f"{value:g}{unit}{band}: {self.verdict.value}")


def judge_value(metric: str, measured: float | None, limit: Limit,
                interval: tuple[float, float] | None = None) -> Judgement:
    if measured is None:
        return Judgement(metric, None, limit, Verdict.MISSING)
    band = limit.marginal_pct / 100
    if limit.max is not None:
        ok, marginal = measured <= limit.max, measured <= limit.max * (1 + band)
    else:
        ok, marginal = measured >= limit.min, measured >= limit.min * (1 - band)
    verdict = Verdict.PASS if ok else Verdict.MARGINAL if marginal else Verdict.FAIL
    return Judgement(metric, measured, limit, verdict, interval)


def judge(measurement: Measurement, budget: ModelBudget) -> list[Judgement]:
    """Every metric the budget names, judged against the measurement."""
    return [judge_value(metric, measurement.metric(metric), limit, measurement.interval(metric))
            for metric, limit in budget.limits().items()]


def overall(judgements: list[Judgement]) -> Verdict:
    order = [Verdict.FAIL, Verdict.MISSING, Verdict.MARGINAL, Verdict.PASS]
    return next((v for v in order if any(j.verdict is v for j in judgements)), Verdict.PASS)
