"""The seed paper's strategy study on each board (seed 004 §3-4): on-device with the small and the
large model, hierarchical inference (HI: the small model, a decision module, offload to the edge
server over the board's link) and remote inference, each measured under power capture and journaled
for `labbench strategies`. HI's measured latency and energy per inference are checked against the
paper's Eq. 3-4 predicted from the modular measurements.

Runs only when selected: `pytest tests_hil --board rpi4 -m strategies`. Budgets apply to each
strategy's record, named `<strategy>:<model>` (e.g. `HI:mnist5k_mlp_int8_aggressive`).
"""

from __future__ import annotations

import pytest

from labbench.strategies.qos import StrategyKind
from labbench.strategies.record import KEY, StrategyResult
from labbench.strategies.run import Study, split_test, synthetic_split

pytestmark = [pytest.mark.strategies, pytest.mark.requires("hi", "power")]

AGREEMENT_PCT = 5.0  # measured HI LPI and EPI against Eq. 3-4's prediction

#: dataset -> (small local model, larger on-device model, lab.yaml edge server)
STUDIES = {
    "mnist5k": ("mnist5k_mlp_int8_aggressive", "mnist5k_mlp_int8", "edge_mnist5k"),
    "digits": ("digits_mlp_int8_aggressive", "digits_mlp_int8", "edge_digits"),
    # CIFAR-10 is not available offline: ResNet-8 on synthetic inputs, latency and energy only
    "cifar10": ("ic01_resnet8", None, "edge_cifar10"),
}


@pytest.fixture(params=list(STUDIES))
def study(request, board, run_settings, found_payloads):
    local_name, large_name, server = STUDIES[request.param]
    found = found_payloads
    if local_name not in found:
        pytest.skip(f"{local_name} is not available (the MLPerf Tiny models live in ../shared)")
    local = found[local_name]
    if request.param == "cifar10":
        split = synthetic_split(local, min(run_settings.strategy_samples, 60), "cifar10 (synthetic)")
    else:
        split = split_test(local, run_settings.strategy_samples)
    return Study(board, local, server, split, large=found.get(large_name) if large_name else None)


def test_strategies(study, bench, recorder, request):
    records = bench.study(request.node, study)
    results = {}
    for m in records:
        recorder.record(m)
        r = StrategyResult.model_validate(m.extra[KEY])
        results[r.strategy] = r
    assert {StrategyKind.ON_DEVICE_SMALL, StrategyKind.HI, StrategyKind.REMOTE} <= set(results)
    hi = results[StrategyKind.HI]
    assert hi.predicted is not None
    for figure in ("lpi_ms", "epi_mj"):
        measured, predicted = getattr(hi.measured, figure), getattr(hi.predicted, figure)
        assert abs(hi.difference_pct[figure]) <= AGREEMENT_PCT, (
            f"{study.board.name} / {study.split.dataset}: HI {figure} measured {measured.value:.4g} "
            f"+- {measured.uncertainty:.2g}, Eq. 3-4 predict {predicted.value:.4g} +- {predicted.uncertainty:.2g} "
            f"({hi.difference_pct[figure]:+.1f} %, allowed {AGREEMENT_PCT} %)"
        )
