"""The report's plots as PNG bytes: a power trace with inference windows shaded, a latency histogram,
and the accuracy / latency / memory frontier."""

from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import numpy.typing as npt
from matplotlib.figure import Figure


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def power_trace(
    t_s: Sequence[float],
    power_w: Sequence[float],
    windows: Sequence[tuple[float, float]],
    title: str,
    idle_w: float | None = None,
) -> bytes:
    """Each instrument update as a step over the period it averages; measurement windows shaded."""
    fig, ax = plt.subplots(figsize=(8, 3))
    t = np.asarray(t_s, dtype=float)
    origin = t[0] if t.size else 0.0
    if t.size:
        ax.step(t - origin, power_w, where="pre", color="tab:blue", label="power (per update)")
    for i, (a, b) in enumerate(windows):
        ax.axvspan(
            a - origin,
            b - origin,
            color="tab:orange",
            alpha=0.2,
            label="inference window" if i == 0 else None,
        )
    if idle_w is not None:
        ax.axhline(idle_w, color="grey", linestyle="--", linewidth=1, label=f"idle {idle_w:.3g} W")
    ax.set_xlabel("time (s, host monotonic clock)")
    ax.set_ylabel("power (W)")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    return _png(fig)


def latency_histogram(samples_ms: Sequence[float], title: str, marks: dict[str, float]) -> bytes:
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.hist(samples_ms, bins=min(50, max(5, len(samples_ms) // 5)), color="tab:green", alpha=0.8)
    for i, (label, value) in enumerate(marks.items()):
        ax.axvline(value, color=f"C{i + 3}", linestyle="--", label=f"{label} {value:.4g} ms")
    ax.set_xlabel("latency per inference (ms, device clock)")
    ax.set_ylabel("count")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _png(fig)


def pareto_mask(
    accuracy: npt.ArrayLike, latency_ms: npt.ArrayLike, memory_kib: npt.ArrayLike | None = None
) -> np.ndarray:
    """True for points no other point beats: at least as accurate, as fast (and, given memory, as
    small) and strictly better in one. Seed 000's frontier is accuracy / latency / memory."""
    acc, lat = np.asarray(accuracy, float), np.asarray(latency_ms, float)
    mem = np.zeros(acc.size) if memory_kib is None else np.asarray(memory_kib, float)
    mask = np.ones(acc.size, bool)
    for i in range(acc.size):
        no_worse = (acc >= acc[i]) & (lat <= lat[i]) & (mem <= mem[i])
        better = (acc > acc[i]) | (lat < lat[i]) | (mem < mem[i])
        mask[i] = not (no_worse & better).any()
    return mask


def frontier(
    labels: Sequence[str],
    accuracy: Sequence[float],
    latency_ms: Sequence[float],
    memory_kib: Sequence[float],
    title: str,
) -> bytes:
    """Accuracy vs latency, point size by memory, the accuracy/latency/memory frontier highlighted."""
    acc, lat, mem = (np.asarray(v, float) for v in (accuracy, latency_ms, memory_kib))
    on = pareto_mask(acc, lat, mem)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    sizes = 40 + 400 * mem / max(mem.max(), 1e-9)
    ax.scatter(lat[~on], acc[~on], s=sizes[~on], color="tab:grey", alpha=0.6, label="dominated")
    ax.scatter(lat[on], acc[on], s=sizes[on], color="tab:red", alpha=0.8, label="Pareto frontier")
    order = np.argsort(lat[on])
    ax.plot(lat[on][order], acc[on][order], color="tab:red", linewidth=1)
    for label, x, y, m in zip(labels, lat, acc, mem, strict=True):
        ax.annotate(f"{label}\n{m:.1f} KiB", (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("latency p50 (ms)")
    ax.set_ylabel("top-1 accuracy")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    return _png(fig)
