"""The HI decision module (seed 004, §2 and §3.4.2): accept the local inference or offload the sample.

Both decisions act on the local model's output row of one sample (softmax probabilities; logits are
passed through a softmax first, see `to_probabilities`) and reduce to a few numbers a device applies:

- `LogisticDecision`: the paper's binary logistic regression on the two highest softmax values
  p1 >= p2. Label 1 means "the local top-1 is correct": the paper accepts the local inference when
  the LR outputs 1, so a device accepts when w1*p1 + w2*p2 + b >= 0 (LR probability >= 1/2).
- `ThresholdDecision`: accept when p1 >= theta, theta set on calibration outputs for an offload
  budget (the largest share of samples the latency and energy limits allow to offload, see
  `labbench.strategies.predict.max_offloaded_fraction`).

Both are fitted on a calibration split, never on the split they are scored on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.special import softmax
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import precision_recall_fscore_support

from labbench.errors import LabbenchError

ACCEPT, OFFLOAD = 1, 0
# Rows of probabilities sum to 1 within this: an int8 softmax output (scale 1/256) is off by up to
# n_classes/512 (0.02 for 10 classes; the fixture models: 0.988 to 1.012).
PROBABILITY_SUM_TOLERANCE = 0.05
# Logistic regression wants about 10 samples of the rarer class per feature (Peduzzi et al., J Clin
# Epidemiol 49(12), 1996); with two features, 20 local errors (or 20 correct inferences) at least.
MIN_EVENTS_PER_FEATURE = 10
FEATURES = 2

ClassWeight = Literal["balanced"] | None


class CalibrationError(LabbenchError):
    """Calibration data a decision module cannot be fitted on: too few correct or wrong local inferences."""


def to_probabilities(outputs: ArrayLike) -> NDArray[np.float64]:
    """Model outputs (n_samples, n_classes) -> probabilities: as they are if every row is a
    probability vector, softmax of every row if none is (logits); a mix is refused."""
    y = np.asarray(outputs, dtype=np.float64)
    if y.ndim != 2 or y.shape[1] < 2 or not np.isfinite(y).all():
        raise ValueError(f"outputs must be finite, (samples, classes >= 2): got shape {y.shape}")
    is_prob = ((y >= 0) & (y <= 1)).all(axis=1) & (np.abs(y.sum(axis=1) - 1) <= PROBABILITY_SUM_TOLERANCE)
    if is_prob.all():
        return y
    if not is_prob.any():
        return np.asarray(softmax(y, axis=1), dtype=np.float64)
    raise ValueError(f"{int(is_prob.sum())} of {len(y)} rows are probabilities and the rest are not")


def top2(outputs: ArrayLike) -> NDArray[np.float64]:
    """The two highest probabilities of each row, (n_samples, 2): p1 >= p2."""
    return np.sort(to_probabilities(outputs), axis=1)[:, :-3:-1]


def local_correct(outputs: ArrayLike, labels: ArrayLike) -> NDArray[np.bool_]:
    """Whether the local top-1 class is the true label, per sample."""
    y = np.asarray(outputs)
    truth = np.asarray(labels)
    if y.ndim != 2 or truth.shape != (len(y),):
        raise ValueError(f"outputs {y.shape} and labels {truth.shape} do not pair up sample by sample")
    if truth.dtype.kind not in "iu" or truth.min(initial=0) < 0 or truth.max(initial=0) >= y.shape[1]:
        raise ValueError(f"labels must be class indices in [0, {y.shape[1]})")
    return np.asarray(y.argmax(axis=1) == truth)


@dataclass(frozen=True)
class LogisticDecision:
    """Accept when w1*p1 + w2*p2 + b >= 0, p1 and p2 the two highest softmax values."""

    w1: float
    w2: float
    b: float

    @classmethod
    def fit(
        cls, outputs: ArrayLike, labels: ArrayLike, class_weight: ClassWeight = "balanced"
    ) -> LogisticDecision:
        """Fit on calibration outputs and their true labels (scikit-learn's L2 LR, C = 1).

        `class_weight="balanced"` weighs each class inversely to its frequency: a local model's errors
        are a small minority, and an unweighted fit at the 1/2 cut-off accepts nearly every sample.
        """
        correct = local_correct(outputs, labels)
        counts = {"correct": int(correct.sum()), "wrong": int((~correct).sum())}
        if min(counts.values()) < MIN_EVENTS_PER_FEATURE * FEATURES:
            raise CalibrationError(
                f"calibration split has {counts['correct']} correct and {counts['wrong']} wrong local "
                f"inferences: at least {MIN_EVENTS_PER_FEATURE * FEATURES} of each are needed"
            )
        lr = LogisticRegression(class_weight=class_weight).fit(top2(outputs), correct.astype(int))
        (w1, w2), (b,) = lr.coef_[0], lr.intercept_
        return cls(float(w1), float(w2), float(b))

    def accept(self, outputs: ArrayLike) -> NDArray[np.bool_]:
        p = top2(outputs)
        return np.asarray(self.w1 * p[:, 0] + self.w2 * p[:, 1] + self.b >= 0)

    def to_dict(self) -> dict[str, str | float]:
        return {"kind": "logistic", "w1": self.w1, "w2": self.w2, "b": self.b}

    @classmethod
    def from_dict(cls, d: dict[str, str | float]) -> LogisticDecision:
        w1, w2, b = _fields(d, "logistic", ("w1", "w2", "b"))
        return cls(w1, w2, b)


@dataclass(frozen=True)
class ThresholdDecision:
    """Accept when the highest softmax value p1 >= theta."""

    theta: float

    @classmethod
    def for_offload_budget(cls, outputs: ArrayLike, budget: float) -> ThresholdDecision:
        """The theta that offloads as many calibration samples as it can, at most `budget` of them.

        Labels are not needed: the least confident samples go first. Equal p1 values are never split,
        so the share offloaded can fall short of the budget.
        """
        if not 0 <= budget < 1:
            raise ValueError(f"offload budget {budget} is outside [0, 1): offloading all is remote inference")
        p1 = np.sort(top2(outputs)[:, 0])
        return cls(float(p1[math.floor(budget * len(p1))]))

    def accept(self, outputs: ArrayLike) -> NDArray[np.bool_]:
        return np.asarray(top2(outputs)[:, 0] >= self.theta)

    def to_dict(self) -> dict[str, str | float]:
        return {"kind": "threshold", "theta": self.theta}

    @classmethod
    def from_dict(cls, d: dict[str, str | float]) -> ThresholdDecision:
        (theta,) = _fields(d, "threshold", ("theta",))
        return cls(theta)


Decision = LogisticDecision | ThresholdDecision


def decision_from_dict(d: dict[str, str | float]) -> Decision:
    """A decision module from its `to_dict()`, by its "kind"."""
    match d.get("kind"):
        case "logistic":
            return LogisticDecision.from_dict(d)
        case "threshold":
            return ThresholdDecision.from_dict(d)
    raise ValueError(f"unknown decision kind {d.get('kind')!r}: known are 'logistic', 'threshold'")


def _fields(d: dict[str, str | float], kind: str, names: tuple[str, ...]) -> tuple[float, ...]:
    if d.get("kind") != kind or set(d) != {"kind", *names}:
        raise ValueError(f"a {kind} decision has exactly the keys kind={kind!r}, {', '.join(names)}: got {d}")
    values = tuple(d[n] for n in names)
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise ValueError(f"{kind} decision coefficients must be finite numbers: got {d}")
    return tuple(float(v) for v in values)


@dataclass(frozen=True)
class DecisionScore:
    """A decision module scored on labelled outputs. Precision, recall and F1 take "accept" (label 1,
    the local top-1 is correct) as the positive class; `f1_offload` takes "offload" as positive.
    A score with nothing to count (say, no sample offloaded) is NaN."""

    samples: int
    offloaded_fraction: float
    precision: float
    recall: float
    f1: float
    f1_offload: float


def score(decision: Decision, outputs: ArrayLike, labels: ArrayLike) -> DecisionScore:
    """Score `decision` against the truth "the local top-1 is correct", sample by sample."""
    truth = local_correct(outputs, labels).astype(int)
    accepted = decision.accept(outputs).astype(int)
    p, r, f, _ = precision_recall_fscore_support(
        truth, accepted, labels=[ACCEPT, OFFLOAD], zero_division=np.nan
    )
    return DecisionScore(
        samples=len(truth),
        offloaded_fraction=float(1 - accepted.mean()),
        precision=float(p[0]),
        recall=float(r[0]),
        f1=float(f[0]),
        f1_offload=float(f[1]),
    )
