"""HI accuracy, latency and energy from modular measurements: seed 004's Eq. 1-4 (§3.4.2).

    Eq. 1  Acc_HI  = (1/N) sum_i [LR_i = 1][dev_i = gt_i] + [LR_i = 0][ser_i = gt_i]
    Eq. 2  Acc_HI  = (Acc_OD - eta_FN) + Acc_S * eta_off
    Eq. 3  Time_HI = t_dev_inf + t_LR + eta_off * t_off
    Eq. 4  Energy_HI = e_dev_inf + e_LR + eta_off * e_edge_off

Eq. 2 equals Eq. 1 exactly, sample set by sample set, with these definitions over the same N samples:
Acc_OD the share of local top-1 correct; eta_off the share offloaded (LR = 0); eta_FN the share
offloaded although the local top-1 was correct (the LR's false negatives, label 1 = accept, as
§3.4.2 labels it); Acc_S the server's accuracy on the offloaded samples (not on the whole set).
The paper's §6 calls the accepted-but-wrong samples "false negatives" instead; that share is
`HiTerms.accepted_errors`, and Eq. 2 holds with it only as Acc_HI = (1 - eta_off - accepted_errors)
+ Acc_S * eta_off. EE-HI (§3.4.3) uses the same equations with t_dev_inf, e_dev_inf averaged over
the samples' exits.

Every number is a `Quantity`: a value and a bound on its error. Bounds propagate as intervals
(worst case: sums add their bounds, a product x*y gets |x| dy + |y| dx + dx dy), which is exact for
these equations because each input appears once. A share counted from n samples gets the larger
half-width of its 95 % Clopper-Pearson interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import binomtest

CONFIDENCE = 0.95
Source = Literal["measured", "predicted (Eq. 1-4)"]


@dataclass(frozen=True)
class Quantity:
    """A value and the half-width of an interval bounding its error (a bound, not a deviation)."""

    value: float
    uncertainty: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.value) and math.isfinite(self.uncertainty) and self.uncertainty >= 0):
            raise ValueError(f"a quantity needs a finite value and a finite bound >= 0: {self}")

    def __add__(self, other: Quantity) -> Quantity:
        return Quantity(self.value + other.value, self.uncertainty + other.uncertainty)

    def __sub__(self, other: Quantity) -> Quantity:
        return Quantity(self.value - other.value, self.uncertainty + other.uncertainty)

    def __mul__(self, other: Quantity) -> Quantity:
        du, dv = self.uncertainty, other.uncertainty
        return Quantity(self.value * other.value, abs(self.value) * dv + abs(other.value) * du + du * dv)


def proportion(successes: int, trials: int) -> Quantity:
    """successes/trials, bounded by the 95 % Clopper-Pearson interval; no trials: anywhere in [0, 1]."""
    if trials == 0:
        return Quantity(0.5, 0.5)
    ci = binomtest(successes, trials).proportion_ci(confidence_level=CONFIDENCE, method="exact")
    p = successes / trials
    return Quantity(p, max(p - ci.low, ci.high - p))


@dataclass(frozen=True)
class ModularMeasurements:
    """The paper's modular measurements of one device, local model, decision module and link."""

    t_dev_inf_ms: Quantity  # local inference
    t_lr_ms: Quantity  # decision module
    t_off_ms: Quantity  # send the input, remote inference, reply received
    e_dev_inf_mj: Quantity
    e_lr_mj: Quantity
    e_edge_off_mj: Quantity  # device energy while offloading one sample


@dataclass(frozen=True)
class StrategyFigures:
    """What a strategy achieves: the metrics of §3.3 plus, for HI, its decision module's shares.

    `offloaded_fraction` is 0 on device and 1 for remote inference. `false_negatives` is Eq. 2's
    eta_FN (local top-1 correct, offloaded) and `accepted_errors` the share accepted though wrong;
    both are None for a strategy without a decision module.
    """

    accuracy: Quantity
    lpi_ms: Quantity
    epi_mj: Quantity
    offloaded_fraction: Quantity
    false_negatives: Quantity | None
    accepted_errors: Quantity | None
    source: Source


@dataclass(frozen=True, eq=False)
class HiOutcomes:
    """One HI pass over N samples: per sample the decision, the two predictions and the truth.
    `server_class` is read for offloaded samples only."""

    accepted: NDArray[np.bool_]
    device_class: NDArray[np.int64]
    server_class: NDArray[np.int64]
    true_class: NDArray[np.int64]

    @classmethod
    def of(cls, accepted: ArrayLike, device: ArrayLike, server: ArrayLike, truth: ArrayLike) -> HiOutcomes:
        classes = [np.asarray(a, dtype=np.int64) for a in (device, server, truth)]
        arrays = [np.asarray(accepted, dtype=bool), *classes]
        if len({a.shape for a in arrays}) != 1 or arrays[0].ndim != 1:
            raise ValueError(f"per-sample arrays of one length needed: shapes {[a.shape for a in arrays]}")
        return cls(*arrays)


@dataclass(frozen=True)
class HiTerms:
    """The terms of Eq. 2, counted from `HiOutcomes` with the definitions in the module docstring."""

    samples: int
    acc_od: Quantity
    eta_fn: Quantity
    acc_s: Quantity
    eta_off: Quantity
    accepted_errors: Quantity


def accuracy_eq1(o: HiOutcomes) -> Quantity:
    """Eq. 1: the share of samples whose final class (local if accepted, else server's) is right."""
    final = np.where(o.accepted, o.device_class, o.server_class)
    return proportion(int((final == o.true_class).sum()), len(final))


def hi_terms(o: HiOutcomes) -> HiTerms:
    n = len(o.accepted)
    dev_ok = o.device_class == o.true_class
    off = ~o.accepted
    return HiTerms(
        samples=n,
        acc_od=proportion(int(dev_ok.sum()), n),
        eta_fn=proportion(int((off & dev_ok).sum()), n),
        acc_s=proportion(int((off & (o.server_class == o.true_class)).sum()), int(off.sum())),
        eta_off=proportion(int(off.sum()), n),
        accepted_errors=proportion(int((o.accepted & ~dev_ok).sum()), n),
    )


def accuracy_eq2(acc_od: Quantity, eta_fn: Quantity, acc_s: Quantity, eta_off: Quantity) -> Quantity:
    """Eq. 2: (Acc_OD - eta_FN) + Acc_S * eta_off."""
    return (acc_od - eta_fn) + acc_s * eta_off


def latency_eq3_ms(m: ModularMeasurements, eta_off: Quantity) -> Quantity:
    """Eq. 3: t_dev_inf + t_LR + eta_off * t_off."""
    return m.t_dev_inf_ms + m.t_lr_ms + eta_off * m.t_off_ms


def energy_eq4_mj(m: ModularMeasurements, eta_off: Quantity) -> Quantity:
    """Eq. 4: e_dev_inf + e_LR + eta_off * e_edge_off (device energy only, as the paper)."""
    return m.e_dev_inf_mj + m.e_lr_mj + eta_off * m.e_edge_off_mj


def predict_hi(o: HiOutcomes, m: ModularMeasurements) -> StrategyFigures:
    """HI's figures from one pass's per-sample outcomes (Eq. 1) and the modular measurements (Eq. 3-4)."""
    t = hi_terms(o)
    return StrategyFigures(
        accuracy=accuracy_eq1(o),
        lpi_ms=latency_eq3_ms(m, t.eta_off),
        epi_mj=energy_eq4_mj(m, t.eta_off),
        offloaded_fraction=t.eta_off,
        false_negatives=t.eta_fn,
        accepted_errors=t.accepted_errors,
        source="predicted (Eq. 1-4)",
    )


def max_offloaded_fraction(m: ModularMeasurements, max_lpi_ms: float, max_epi_mj: float) -> float:
    """The largest eta_off with Eq. 3 <= max_lpi_ms and Eq. 4 <= max_epi_mj at nominal values: an
    offload budget for `ThresholdDecision.for_offload_budget`. Below 0, HI misses a limit even
    without offloading; 1 or more, every sample may be offloaded."""
    return min(
        (max_lpi_ms - m.t_dev_inf_ms.value - m.t_lr_ms.value) / m.t_off_ms.value,
        (max_epi_mj - m.e_dev_inf_mj.value - m.e_lr_mj.value) / m.e_edge_off_mj.value,
    )
