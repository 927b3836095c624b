"""The one metric specification: every figure a budget can limit, the gate compares and the dashboard
shows, with its unit, its direction, where a measurement keeps it, its interval and how the gate
compares it with a baseline. Budgets (`inventory.ModelBudget`), the verdicts (`budgets`), the gate and
the dashboard all read `METRICS`; adding a metric is one entry here (and, for a new kind of baseline
comparison, one comparer in `labbench.gate`).

A metric finds its value on a measurement record by attribute path (`"latency.p99_ms"`; a mapping's
keys count as attributes, so `extra.strategy...` reaches a strategy's figures), scaled into its unit,
so this module knows nothing of the record's class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

#: how the gate compares a metric with its baseline: the latency samples (Mann-Whitney U), the stated
#: uncertainties (energy), the counts of correct answers (Fisher's exact test), a relative change
#: (sizes); None: judged by its budget only
Comparison = Literal["samples", "uncertainty", "proportion", "relative"]


@dataclass(frozen=True)
class Metric:
    name: str  # the budget key in lab.yaml, e.g. "latency_p99_ms"
    label: str  # for reports and the dashboard
    unit: str  # "" for a fraction
    direction: Literal["max", "min"]  # a ceiling (lower is better) or a floor (higher is better)
    path: str  # where a measurement keeps it
    scale: float = 1.0  # the kept value times this is the metric, in `unit`
    interval: str | None = None  # path of a (low, high) 95 % interval, in `unit`
    uncertainty: str | None = None  # or path of a +- bound around the value, in `unit`
    compare: Comparison | None = None

    def value(self, record: Any) -> float | None:
        """The metric on `record` in its unit, or None when not measured."""
        kept = _at(record, self.path)
        return None if kept is None else float(kept) * self.scale

    def interval_of(self, record: Any) -> tuple[float, float] | None:
        """Its 95 % interval on `record`, where the bench knows one."""
        if self.interval is not None and (pair := _at(record, self.interval)) is not None:
            return float(pair[0]) * self.scale, float(pair[1]) * self.scale
        value = self.value(record)
        if (
            self.uncertainty is not None
            and value is not None
            and (u := _at(record, self.uncertainty)) is not None
        ):
            return value - float(u) * self.scale, value + float(u) * self.scale
        return None

    @property
    def heading(self) -> str:
        return f"{self.label} ({self.unit})" if self.unit else self.label


def _at(record: Any, path: str) -> Any:
    for part in path.split("."):
        if record is None:
            return None
        record = record.get(part) if isinstance(record, dict) else getattr(record, part, None)
    return record


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric(
            "latency_p50_ms",
            "p50 latency",
            "ms",
            "max",
            "latency.p50_ms",
            interval="latency.p50_ci95_ms",
            compare="samples",
        ),
        Metric("latency_p90_ms", "p90 latency", "ms", "max", "latency.p90_ms"),
        Metric(
            "latency_p99_ms", "p99 latency", "ms", "max", "latency.p99_ms", interval="latency.p99_ci95_ms"
        ),
        Metric("latency_mean_ms", "mean latency", "ms", "max", "latency.mean_ms"),
        Metric("cold_start_ms", "cold start", "ms", "max", "cold_start_ms"),
        Metric(
            "energy_mj",
            "energy per inference",
            "mJ",
            "max",
            "energy.per_inference_mj",
            uncertainty="energy.uncertainty_mj",
            compare="uncertainty",
        ),
        Metric("accuracy", "top-1 accuracy", "", "min", "accuracy", compare="proportion"),
        Metric(
            "flash_kib", "model size", "KiB", "max", "memory.flash_bytes", scale=1 / 1024, compare="relative"
        ),
        Metric(
            "arena_kib",
            "tensor arena",
            "KiB",
            "max",
            "memory.arena_bytes",
            scale=1 / 1024,
            compare="relative",
        ),
        # a strategy's figures (labbench.strategies.record: a record of the strategy study)
        Metric(
            "strategy_lpi_ms",
            "strategy latency per inference",
            "ms",
            "max",
            "extra.strategy.measured.lpi_ms.value",
            uncertainty="extra.strategy.measured.lpi_ms.uncertainty",
        ),
        Metric(
            "strategy_epi_mj",
            "strategy energy per inference",
            "mJ",
            "max",
            "extra.strategy.measured.epi_mj.value",
            uncertainty="extra.strategy.measured.epi_mj.uncertainty",
        ),
        Metric(
            "offloaded_fraction",
            "offloaded share",
            "",
            "max",
            "extra.strategy.measured.offloaded_fraction.value",
        ),
        Metric(
            "peak_rss_mib",
            "peak RSS",
            "MiB",
            "max",
            "memory.peak_rss_kib",
            scale=1 / 1024,
            compare="relative",
        ),
    )
}
