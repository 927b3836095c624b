"""Latency statistics: the latency record of per-inference samples, with bootstrap confidence intervals."""

from __future__ import annotations

import numpy as np

from labbench.measure.record import Latency

BOOTSTRAP_RESAMPLES = 2000


def bootstrap_ci(
    samples: np.ndarray, q: float, level: float = 0.95, seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES
) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the `q`-th percentile (seeded, so reports are reproducible)."""
    samples = np.asarray(samples, dtype=float)
    if samples.size < 2:
        v = float(samples[0]) if samples.size else float("nan")
        return v, v
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, samples.size, size=(resamples, samples.size))
    stats = np.percentile(samples[idx], q, axis=1)
    alpha = (1 - level) / 2 * 100
    lo, hi = np.percentile(stats, [alpha, 100 - alpha])
    return float(lo), float(hi)


def latency_record(
    samples_ms: list[float], *, method: str, throughput_windows_ms: list[float] | None = None
) -> Latency:
    """The latency record of per-inference samples: p50/p90/p99/mean, 95% bootstrap intervals for p50
    and p99, and the back-to-back windows' time per inference with their median, if any."""
    s = np.asarray(samples_ms, dtype=float)
    if s.size == 0:
        raise ValueError("no latency samples")
    p50, p90, p99 = np.percentile(s, [50, 90, 99])
    windows = list(throughput_windows_ms or [])
    return Latency(
        samples_ms=[float(v) for v in s],
        p50_ms=float(p50),
        p90_ms=float(p90),
        p99_ms=float(p99),
        mean_ms=float(s.mean()),
        p50_ci95_ms=bootstrap_ci(s, 50),
        p99_ci95_ms=bootstrap_ci(s, 99),
        throughput_windows_ms=windows,
        median_window_ms=float(np.median(windows)) if windows else None,
        method=method,
    )
