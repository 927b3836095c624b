"""Inference budgets for every model the board can hold: latency, energy, accuracy, memory.

Models that do not fit the board (the catalog's flash and SRAM against the model and its real
TFLite Micro arena) are skipped as not deployable, with the sizes.
"""

import json
import math

import pytest

from labbench.payloads import FIXTURES
from labbench.report import plots
from labbench.report.extras import png_html

MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())["models"]


@pytest.mark.requires("inference")
def test_inference_budget(board, payload, outcome, recorder):
    m = outcome.measurement
    parts = []
    if outcome.trace is not None and len(outcome.trace):
        t = outcome.trace
        parts.append(
            png_html(
                plots.power_trace(
                    t.t_s,
                    t.power_w,
                    outcome.windows,
                    f"{board.name}: {payload.name}",
                    idle_w=m.energy.idle_power_w if m.energy else None,
                ),
                "power trace",
            )
        )
    lat = m.latency
    parts.append(
        png_html(
            plots.latency_histogram(
                lat.samples_ms, f"{board.name}: {payload.name}", {"p50": lat.p50_ms, "p99": lat.p99_ms}
            ),
            "latency",
        )
    )
    recorder.record(m, parts)
    if m.accuracy is not None and payload.name in MANIFEST:
        # the board must compute what the model computes: the host's TFLM accuracy on the test split,
        # within what sampling `accuracy_n` of its samples allows (3 standard errors, and one sample)
        expected = MANIFEST[payload.name]["accuracy_tflm"]
        allowed = 3 * math.sqrt(expected * (1 - expected) / m.accuracy_n) + 1 / m.accuracy_n
        assert abs(m.accuracy - expected) <= allowed, (
            f"{board.name}: accuracy {m.accuracy:.4f} on {m.accuracy_n} samples; host TFLM {expected:.4f} "
            f"on the whole split (allowed difference {allowed:.4f})"
        )
