"""The accuracy / latency / memory frontier across the digits model configurations (seed 000):
FP32 baseline, pruned FP32, INT8 and aggressive INT8; INT8 must be on the Pareto frontier of
accuracy, latency and memory (model bytes + arena). On a Linux board LiteRT may run the tiny float
model faster than the int8 one; INT8 then stays on the frontier by its size, as it does in seed 000."""

import numpy as np
import pytest

from labbench.report import plots
from labbench.report.extras import png_html

CONFIGS = ["digits_mlp_fp32", "digits_mlp_fp32_pruned", "digits_mlp_int8", "digits_mlp_int8_aggressive"]


def whole_split_accuracy(node, board, bench, payload, m) -> float:
    """The configurations differ by a few test samples, so a subset (--accuracy-samples) cannot
    order them: score the whole test split when the measurement used less."""
    x, y = payload.test_inputs()
    if m.accuracy_n == len(y):
        return m.accuracy
    bench.install(node, board, payload)
    outputs = bench.recovery.run(node, board, f"accuracy {payload.name}", lambda: board.target.classify(x))
    return float(np.mean(np.argmax(outputs.reshape(len(y), -1), axis=1) == y))


@pytest.fixture
def configs(board, bench, request):
    """Each configuration measured, with its accuracy over the whole test split, in setup."""
    from labbench.payloads import fixtures

    payloads = fixtures()
    outcomes = [bench.measure(request.node, board, payloads[name]).measurement for name in CONFIGS]
    return outcomes, [
        whole_split_accuracy(request.node, board, bench, payloads[name], m)
        for name, m in zip(CONFIGS, outcomes, strict=True)
    ]


@pytest.mark.requires("inference")
def test_int8_on_the_frontier(board, configs, request):
    outcomes, acc = configs
    lat = [m.latency.p50_ms for m in outcomes]
    mem = [(m.memory.flash_bytes + (m.memory.arena_bytes or 0)) / 1024 for m in outcomes]
    on = plots.pareto_mask(acc, lat, mem)
    png = plots.frontier([m.config for m in outcomes], acc, lat, mem, f"{board.name}: digits frontier")
    from labbench.pytest_plugin import add_report_html

    add_report_html(request.node, png_html(png, "frontier"))
    rows = ", ".join(
        f"{m.config}: acc {a:.4f} p50 {p50:.4g} ms {k:.1f} KiB"
        for m, a, p50, k in zip(outcomes, acc, lat, mem, strict=True)
    )
    assert on[CONFIGS.index("digits_mlp_int8")], f"{board.name}: INT8 is dominated: {rows}"
