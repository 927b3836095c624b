"""QoS requirements (seed 004, §3.3) and the preferred strategy per requirement (the paper's Table 5).

The paper fixes one requirement at a time and prefers, among the strategies meeting it, the one
with the largest gains in the other two metrics (§3.3). Table 5 reads that as:

- accuracy >= min_accuracy fixed: the lowest latency and energy. The preferred strategy dominates
  the others meeting it in both; if none does, the lowest LPI/max_lpi_ms + EPI/max_epi_mj wins
  (the first of equals, in the candidates' order) and the strategies it does not dominate are ties.
- LPI <= max_lpi_ms (or EPI <= max_epi_mj) fixed: the highest accuracy (§3.3: relaxed enough to
  allow offloading, remote inference is best "as it achieves higher accuracy"). Accuracies whose
  uncertainty intervals overlap the best one's are ties, settled by the lower EPI (or LPI).
- No strategy meets the fixed requirement: the one closest to it (highest accuracy, lowest LPI or
  lowest EPI), marked `met=False`. Remote inference never meets a limit of half an offload, and
  Table 5 still names it for ImageNet-1K on Coral Micro and Raspberry Pi: the fastest and most
  frugal strategy there (§4.4).

Requirements are inclusive (Table 5's ">=" and "<="), judged on nominal values.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from labbench.strategies.predict import StrategyFigures


class StrategyKind(enum.StrEnum):
    """The strategies of §4.4 and §5."""

    ON_DEVICE_SMALL = "on-device small"  # the local model HI uses, alone
    ON_DEVICE_LARGE = "on-device large"  # a larger model that fits the device
    HI = "HI"
    EE_HI = "EE-HI"
    REMOTE = "remote"


class Requirement(enum.StrEnum):
    """The QoS requirement held fixed: a column of Table 5."""

    ACCURACY = "accuracy"
    LATENCY = "latency"
    ENERGY = "energy"


@dataclass(frozen=True)
class Strategy:
    kind: StrategyKind
    model: str  # the local model; for remote inference, the server's

    @property
    def label(self) -> str:
        """Named as in Table 5: "ResNet-8 + HI", "On Device (ResNet-56)", "Remote Inference"."""
        if self.kind in (StrategyKind.HI, StrategyKind.EE_HI):
            return f"{self.model} + {self.kind}"
        if self.kind is StrategyKind.REMOTE:
            return "Remote Inference"
        return f"On Device ({self.model})"


@dataclass(frozen=True)
class QoS:
    min_accuracy: float  # share of correct inferences, 0..1
    max_lpi_ms: float
    max_epi_mj: float

    def __post_init__(self) -> None:
        if not (0 <= self.min_accuracy <= 1 and self.max_lpi_ms > 0 and self.max_epi_mj > 0):
            raise ValueError(f"QoS needs an accuracy in [0, 1] and positive latency, energy limits: {self}")

    @classmethod
    def relative_to(
        cls,
        sota_accuracy: float,
        offload_lpi_ms: float,
        offload_epi_mj: float,
        accuracy_margin: float = 0.10,
        offload_share: float = 0.5,
    ) -> QoS:
        """§3.3: accuracy `accuracy_margin` below the state of the art (the paper rounds 99.5 % - 10 to
        90 %); latency and energy at most `offload_share` of one offload's."""
        return cls(
            sota_accuracy - accuracy_margin, offload_share * offload_lpi_ms, offload_share * offload_epi_mj
        )

    def meets(self, f: StrategyFigures, requirement: Requirement) -> bool:
        match requirement:
            case Requirement.ACCURACY:
                return f.accuracy.value >= self.min_accuracy
            case Requirement.LATENCY:
                return f.lpi_ms.value <= self.max_lpi_ms
            case Requirement.ENERGY:
                return f.epi_mj.value <= self.max_epi_mj


@dataclass(frozen=True)
class Selection:
    """The preferred strategy with one requirement fixed; `ties` could be preferred as well."""

    requirement: Requirement
    preferred: Strategy
    met: bool
    meeting: tuple[Strategy, ...]
    ties: tuple[Strategy, ...]


def select(candidates: Mapping[Strategy, StrategyFigures], qos: QoS, requirement: Requirement) -> Selection:
    """The preferred strategy with `requirement` fixed (see the module docstring)."""
    if not candidates:
        raise ValueError("no strategies to choose from")
    meeting = tuple(s for s, f in candidates.items() if qos.meets(f, requirement))
    if not meeting:
        closest = _closest(candidates, requirement)
        return Selection(requirement, closest, met=False, meeting=(), ties=())
    pool = {s: candidates[s] for s in meeting}
    if requirement is Requirement.ACCURACY:
        preferred, ties = _cheapest(pool, qos)
    else:
        preferred, ties = _most_accurate(pool, requirement)
    return Selection(requirement, preferred, met=True, meeting=meeting, ties=ties)


def table5_row(candidates: Mapping[Strategy, StrategyFigures], qos: QoS) -> dict[Requirement, Selection]:
    """One row of Table 5: the selection for each requirement, in the table's column order."""
    return {r: select(candidates, qos, r) for r in Requirement}


def _closest(candidates: Mapping[Strategy, StrategyFigures], requirement: Requirement) -> Strategy:
    match requirement:
        case Requirement.ACCURACY:
            return max(candidates, key=lambda s: candidates[s].accuracy.value)
        case Requirement.LATENCY:
            return min(candidates, key=lambda s: candidates[s].lpi_ms.value)
        case Requirement.ENERGY:
            return min(candidates, key=lambda s: candidates[s].epi_mj.value)


def _cheapest(pool: Mapping[Strategy, StrategyFigures], qos: QoS) -> tuple[Strategy, tuple[Strategy, ...]]:
    def cost(s: Strategy) -> float:
        return pool[s].lpi_ms.value / qos.max_lpi_ms + pool[s].epi_mj.value / qos.max_epi_mj

    best = min(pool, key=cost)
    return best, tuple(s for s in pool if s != best and not _dominates(pool[best], pool[s]))


def _dominates(a: StrategyFigures, b: StrategyFigures) -> bool:
    """a is no slower and no hungrier than b, and better in one of the two."""
    no_worse = a.lpi_ms.value <= b.lpi_ms.value and a.epi_mj.value <= b.epi_mj.value
    return no_worse and (a.lpi_ms.value < b.lpi_ms.value or a.epi_mj.value < b.epi_mj.value)


def _most_accurate(
    pool: Mapping[Strategy, StrategyFigures], requirement: Requirement
) -> tuple[Strategy, tuple[Strategy, ...]]:
    top = max(pool, key=lambda s: pool[s].accuracy.value)
    a = pool[top].accuracy
    tied = [
        s for s, f in pool.items() if f.accuracy.value + f.accuracy.uncertainty >= a.value - a.uncertainty
    ]

    def other(s: Strategy) -> float:
        return pool[s].epi_mj.value if requirement is Requirement.LATENCY else pool[s].lpi_ms.value

    best = min(tied, key=lambda s: (other(s), -pool[s].accuracy.value))
    return best, tuple(s for s in tied if s != best)
