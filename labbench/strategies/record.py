"""How a strategy's result is journaled: `Measurement.extra["strategy"]` holds a `StrategyResult`.

One journal record per board, dataset and strategy. The measured figures come from a captured window
of the strategy running as it would in the field; for HI, the figures predicted by Eq. 1-4 from the
modular measurements sit beside them, with those measurements. The record's own `accuracy` is the
measured accuracy (None on synthetic inputs), its `model` the local model (the server's for remote
inference) and its `config` the strategy's kind.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from labbench.strategies.predict import ModularMeasurements, Quantity, Source, StrategyFigures
from labbench.strategies.qos import StrategyKind

KEY = "strategy"  # Measurement.extra[KEY]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Figure(_Frozen):
    """A value and the bound on its error (`Quantity`)."""

    value: float
    uncertainty: float

    @classmethod
    def of(cls, q: Quantity) -> Figure:
        return cls(value=q.value, uncertainty=q.uncertainty)

    def quantity(self) -> Quantity:
        return Quantity(self.value, self.uncertainty)


class Figures(_Frozen):
    """`StrategyFigures` as journaled; accuracy is None when the inputs were synthetic."""

    accuracy: Figure | None
    lpi_ms: Figure
    epi_mj: Figure
    offloaded_fraction: Figure
    false_negatives: Figure | None = None
    accepted_errors: Figure | None = None
    source: Source

    @classmethod
    def of(cls, f: StrategyFigures, *, synthetic: bool = False) -> Figures:
        def opt(q: Quantity | None) -> Figure | None:
            return None if q is None or synthetic else Figure.of(q)

        return cls(
            accuracy=opt(f.accuracy),
            lpi_ms=Figure.of(f.lpi_ms),
            epi_mj=Figure.of(f.epi_mj),
            offloaded_fraction=Figure.of(f.offloaded_fraction),
            false_negatives=opt(f.false_negatives),
            accepted_errors=opt(f.accepted_errors),
            source=f.source,
        )

    def figures(self) -> StrategyFigures:
        """Back to `StrategyFigures` for `qos.select`; a missing accuracy reads as 0 +- 0."""
        return StrategyFigures(
            accuracy=self.accuracy.quantity() if self.accuracy else Quantity(0.0),
            lpi_ms=self.lpi_ms.quantity(),
            epi_mj=self.epi_mj.quantity(),
            offloaded_fraction=self.offloaded_fraction.quantity(),
            false_negatives=self.false_negatives.quantity() if self.false_negatives else None,
            accepted_errors=self.accepted_errors.quantity() if self.accepted_errors else None,
            source=self.source,
        )


class Modular(_Frozen):
    """`ModularMeasurements` as journaled, with how each was obtained."""

    t_dev_inf_ms: Figure
    t_lr_ms: Figure
    t_off_ms: Figure
    e_dev_inf_mj: Figure
    e_lr_mj: Figure
    e_edge_off_mj: Figure
    methods: dict[str, str] = {}  # field -> how it was measured or computed

    @classmethod
    def of(cls, m: ModularMeasurements, methods: dict[str, str]) -> Modular:
        return cls(
            **{k: Figure.of(getattr(m, k)) for k in ModularMeasurements.__dataclass_fields__}, methods=methods
        )

    def measurements(self) -> ModularMeasurements:
        return ModularMeasurements(
            **{k: getattr(self, k).quantity() for k in ModularMeasurements.__dataclass_fields__}
        )


class StrategyResult(_Frozen):
    """One strategy on one board and dataset."""

    strategy: StrategyKind
    dataset: str
    synthetic: bool = False  # synthetic inputs: latency and energy only, no accuracy
    samples: int
    local_model: str | None  # None for remote inference
    server_model: str | None  # None on device
    server: str | None = None  # host:port the device offloaded to
    link: dict[str, Any] | None = None  # the board's link: its name and shape
    decision: dict[str, str | float] | None = None  # what the device was configured with
    decision_f1: float | None = None  # of the decision module on the evaluation samples (accept = positive)
    decision_basis: str | None = None  # how the decision module was chosen and fitted
    measured: Figures
    predicted: Figures | None = None  # HI: Eq. 1-4 from `modular`
    modular: Modular | None = None
    #: measured vs predicted, in percent of the predicted value: {"lpi_ms": ..., "epi_mj": ...}
    difference_pct: dict[str, float] = {}

    def label(self) -> str:
        from labbench.strategies.qos import Strategy

        return Strategy(self.strategy, self.local_model or self.server_model or "?").label
