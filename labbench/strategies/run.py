"""The seed paper's strategy study on one board and dataset (seed 004 §3-4), measured on the bench.

For a board, a local model (the small one HI uses), optionally a larger one, an edge server and a
dataset, `run_study` measures every strategy as it runs in the field, each under power capture:

1. on-device, small model: the bench's measurement of the model (latency on the device clock, energy
   per inference over checked windows) and its top-1 on the evaluation samples. These are also the
   modular t_dev_inf and e_dev_inf;
2. the decision module: a logistic regression on the device's own outputs for the calibration
   samples (never the evaluation ones), or a threshold (`decision="threshold"`, offloading the
   calibration samples' least confident share `offload_budget`);
3. HI: the device configured with the decision module and the server (through its link), run over
   the evaluation samples in passes, each pass an energy window between idle guards. LPI is the
   passes' time on the device clock per sample, EPI their energy per sample (the whole device, as
   the paper);
4. remote inference: the same with every sample offloaded. Its time and energy per sample are the
   modular t_off and e_edge_off;
5. on-device, large model, where it fits the board.

HI's figures are also predicted with Eq. 1-4 from the modular measurements (t_LR from the HI pass's
decision times, e_LR = t_LR x the small model's active power) and the measured and predicted LPI
and EPI compared. Every strategy becomes a journal record (`StrategyResult` in `extra["strategy"]`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from labbench.capabilities import HiRun, HiTarget, TimedRun
from labbench.errors import InstrumentError, UsageError
from labbench.measure.record import Measurement, Provenance
from labbench.measure.run import EnergyRun, RangedMeter, idle_baseline, judge_window, prescan
from labbench.steps import step
from labbench.strategies.decision import (
    CalibrationError,
    LogisticDecision,
    ThresholdDecision,
    local_correct,
    score,
)
from labbench.strategies.predict import (
    HiOutcomes,
    ModularMeasurements,
    Quantity,
    StrategyFigures,
    accuracy_eq1,
    hi_terms,
    predict_hi,
    proportion,
)
from labbench.strategies.qos import StrategyKind
from labbench.strategies.record import KEY, Figures, Modular, StrategyResult

if TYPE_CHECKING:
    from labbench.bench import Bench, StepRunner
    from labbench.board import Board
    from labbench.measure.run import Outcome, RunSettings
    from labbench.payloads import Payload
    from labbench.powertrace import WindowEnergy

REMOTE: dict[str, str | float] = {"kind": "remote"}
PROBE_SAMPLES = 20  # a first, uncaptured pass that times a strategy's samples
MAX_REPEATS = 50
SPREAD_K = 3.0  # a mean's bound: this many standard errors (99.7 % for a normal mean)


@dataclass(frozen=True)
class Split:
    """A dataset for the study: calibration samples (the decision module's) and evaluation samples
    (every strategy's), as the local model's input tensors. Synthetic inputs have no labels (-1)."""

    dataset: str
    x_cal: np.ndarray
    y_cal: np.ndarray
    x_eval: np.ndarray
    y_eval: np.ndarray
    synthetic: bool = False


def split_test(payload: Payload, eval_samples: int | None = None, seed: int = 0) -> Split:
    """The payload's test split cut in two, stratified by class: half calibrates, half evaluates.
    The models never saw either (they were trained on the train split)."""
    from sklearn.model_selection import train_test_split

    x, y = payload.test_inputs()
    x_cal, x_eval, y_cal, y_eval = train_test_split(x, y, test_size=0.5, stratify=y, random_state=seed)
    name = payload.dataset.stem if payload.dataset is not None else payload.name
    return Split(name, x_cal, y_cal, x_eval[:eval_samples], y_eval[:eval_samples])


def synthetic_split(payload: Payload, samples: int, dataset: str, seed: int = 0) -> Split:
    """Seeded random inputs of the payload's input tensor: for latency and energy only (no labels)."""
    t = payload.info.inputs[0]
    rng = np.random.default_rng(seed)
    shape = (samples, *t.shape[1:])
    if np.issubdtype(np.dtype(t.dtype), np.integer):
        lim = np.iinfo(t.dtype)
        x = rng.integers(lim.min, lim.max + 1, size=shape, dtype=t.dtype)
    else:
        x = rng.standard_normal(shape).astype(t.dtype)
    none = np.full(samples, -1, dtype=np.int64)
    return Split(dataset, x, none, x, none, synthetic=True)


@dataclass(frozen=True)
class Study:
    board: Board
    local: Payload
    server: str  # lab.yaml's `servers:` name
    split: Split
    large: Payload | None = None
    decision: Literal["logistic", "threshold"] = "logistic"
    offload_budget: float = 0.15  # the threshold decision's share offloaded on the calibration samples
    server_model: str | None = None  # its name, for the records (default: the lab's server model's stem)


@dataclass
class Pass:
    """One strategy under capture: what the device returned (the samples `repeats` times over) and
    each window's energy."""

    repeats: int = 1
    runs: list[HiRun] = field(default_factory=list)
    energies: list[WindowEnergy] = field(default_factory=list)
    guarded: list[bool] = field(default_factory=list)  # each window's edges apportioned with idle guards
    energy_run: EnergyRun = field(default_factory=EnergyRun)

    def joined(self, name: str) -> np.ndarray:
        return np.concatenate([getattr(r, name) for r in self.runs])

    def first(self, name: str) -> np.ndarray:
        """The first repeat's values: one per sample, for the counts (accuracy, shares)."""
        values = self.joined(name)
        return values[: len(values) // self.repeats]

    @property
    def samples(self) -> int:
        return sum(w[2] for r in self.runs for w in r.windows)

    def lpi_ms(self) -> Quantity:
        """Time per sample over the passes on the device clock, bounded by the spread of the samples'
        own times (SPREAD_K standard errors) and the clocks' microsecond."""
        span_s = sum(w[1] - w[0] for r in self.runs for w in r.windows)
        per_sample_us = self.joined("t_inf_us") + self.joined("t_dec_us") + self.joined("t_off_us")
        n = self.samples
        return Quantity(span_s * 1e3 / n, _sem_ms(per_sample_us) + 2e-3 / n)

    def epi_mj(self) -> Quantity:
        energy = sum(e.energy_j for e in self.energies)
        bound = sum(e.uncertainty_j for e in self.energies)
        return Quantity(energy * 1e3 / self.samples, bound * 1e3 / self.samples)


def _sem_ms(values_us: np.ndarray) -> float:
    if len(values_us) < 2:
        return float(values_us.mean() / 1e3) if len(values_us) else 0.0
    return float(SPREAD_K * values_us.std(ddof=1) / math.sqrt(len(values_us)) / 1e3)


def offload_address(board: Board, server: str) -> tuple[str, int]:
    """Where `board` sends its offloads to `server`: a simulated board's link emulator (the simulated
    lab's), else the server's own address from lab.yaml."""
    entry = board.lab.server(server)
    if not board.simulated:
        return entry.address
    from labbench.sim.control import SimControl
    from labbench.sim.lab import state_dir

    host, port = SimControl(state_dir(board.lab)).call("link_address", board=board.name, server=server)
    return str(host), int(port)


def hi_target(board: Board) -> HiTarget:
    target = board.target
    if not isinstance(target, HiTarget):
        raise UsageError(
            f"{board.name}: its driver {type(target).__name__} cannot run hierarchical inference"
        )
    return target


def captured_passes(
    board: Board,
    settings: RunSettings,
    decision: dict[str, str | float],
    server: tuple[str, int],
    x: np.ndarray,
    label: str,
) -> Pass:
    """`x` run with `decision` under a power capture, repeated until the passes' windows add up to
    `settings.window_s` (a probe of a few samples first sizes that): an idle baseline, then each pass
    between idle guards (the device settles before it), its energy checked as the bench checks a
    window."""
    target, meter = hi_target(board), board.power_meter
    lag = float(getattr(meter, "result_latency_s", 0.0))
    settle_s = 2 * meter.update_period_s + lag
    target.hi_configure(decision, server)
    probe_x = x[:PROBE_SAMPLES]
    ranges: str | None
    if isinstance(meter, RangedMeter) and not meter.ranges_from_lab:  # the probe is the pre-scan too
        ranges, probe = prescan(
            meter,
            lambda scan: target.hi_run(probe_x),
            lambda **kw: meter.capture(board.power_channel, **kw),
            board.name,
            f"{label} over {len(probe_x)} samples",
            lambda _: None,
        )
    else:
        ranges = getattr(meter, "range_note", None)
        with step(board.name, f"{label} probe", f"{len(probe_x)} samples"):
            probe = target.hi_run(probe_x)
    per_sample_s = sum(w1 - w0 for w0, w1, _ in probe.windows) / probe.count
    reps = max(1, min(MAX_REPEATS, math.ceil(settings.window_s / (per_sample_s * len(x)))))
    target.hi_configure(decision, server, settle_s=settle_s)
    got = Pass(repeats=reps)
    got.energy_run.ranges = ranges
    with meter.capture(board.power_channel) as cap:
        idle, span = idle_baseline(cap, meter, settings, got.energy_run, _sleep, lambda _: None)
        cap.wait_for_updates_after(span[1] + lag, 2)
        with step(board.name, label, f"{len(x)} samples x {reps}"):
            run = target.hi_run(np.concatenate([x] * reps))
        got.runs.append(run)
        cap.wait_for_updates_after(run.windows[-1][1] + lag, 2)
        trace = cap.trace
        for i, (w0, w1, n) in enumerate(run.windows):
            cap.mark(f"{label}-{i}-start", w0)
            cap.mark(f"{label}-{i}-end", w1)
            guard_from = max(span[1], w0 - settle_s + lag)  # the device's settled stretch
            result, problems = judge_window(trace, TimedRun((0.0,) * n, w0, w1), idle, guard_from, True)
            if result is None:
                raise InstrumentError(meter.identity(), f"{label} window {i + 1}", "; ".join(problems))
            got.energies.append(result.power)
            got.guarded.append(result.guarded)
    return got


def _sleep(seconds: float) -> None:
    import time

    time.sleep(seconds)


def run_study(bench: Bench, study: Study, run: StepRunner | None = None) -> list[Measurement]:
    """Every strategy of `study` measured on its board; one journal record per strategy (see the module
    docstring). `run` runs each board step (the pytest plugin's recovery); default plainly."""
    from labbench.bench import plainly

    run = run or plainly
    b, s, split = study.board, bench.settings, study.split
    say = bench.say
    small = bench.measure(b, study.local, run)
    hi_target(b)  # a board that cannot offload fails here, before the calibration
    say(f"  {b.name} / {study.split.dataset}: calibration on {len(split.y_cal)} samples")
    outputs_cal = run(b, "classify calibration samples", lambda: b.target.classify(split.x_cal))
    outputs_eval = run(b, "classify evaluation samples", lambda: b.target.classify(split.x_eval))
    decision, basis = _decision(study, outputs_cal, split)
    address = offload_address(b, study.server)
    say(f"  {b.name} / {split.dataset}: HI over {len(split.y_eval)} samples via {address[0]}:{address[1]}")
    hi = run(b, "HI", lambda: captured_passes(b, s, decision.to_dict(), address, split.x_eval, "HI"))
    say(f"  {b.name} / {split.dataset}: remote inference over {len(split.y_eval)} samples")
    remote = run(b, "remote", lambda: captured_passes(b, s, REMOTE, address, split.x_eval, "remote"))
    records = _records(study, small, outputs_eval, decision, basis, hi, remote, address)
    if study.large is not None:
        from labbench.bench import NotDeployable

        try:
            large = bench.measure(b, study.large, run)
        except NotDeployable as exc:
            say(f"  {b.name}: {exc}")
        else:
            out = run(b, "classify evaluation samples (large)", lambda: b.target.classify(split.x_eval))
            records.append(_on_device(study, study.large, large, out, StrategyKind.ON_DEVICE_LARGE))
    return records


Decision = LogisticDecision | ThresholdDecision


def _decision(study: Study, outputs_cal: np.ndarray, split: Split) -> tuple[Decision, str]:
    """The decision module and how it was chosen: the paper's logistic regression fitted on the
    calibration samples, else (asked for, synthetic inputs without labels, or too few local errors
    among the calibration samples to fit one) a threshold offloading `offload_budget` of them."""
    n = len(outputs_cal)
    threshold = (
        f"threshold offloading the least confident {study.offload_budget:.0%} of {n} calibration samples"
    )
    if study.decision == "threshold":
        return ThresholdDecision.for_offload_budget(outputs_cal, study.offload_budget), threshold
    if split.synthetic:
        return ThresholdDecision.for_offload_budget(outputs_cal, study.offload_budget), (
            f"{threshold} (synthetic inputs: no labels to fit a logistic regression on)"
        )
    try:
        fitted = LogisticDecision.fit(outputs_cal, split.y_cal)
    except CalibrationError as exc:
        return ThresholdDecision.for_offload_budget(outputs_cal, study.offload_budget), f"{threshold} ({exc})"
    return (
        fitted,
        f"logistic regression on (p1, p2) fitted on the device's outputs for {n} calibration samples",
    )


def _outcomes(p: Pass, truth: np.ndarray) -> HiOutcomes:
    return HiOutcomes.of(p.first("accepted"), p.first("local_class"), p.first("final_class"), truth)


def _modular(small: Outcome, hi: Pass, remote: Pass) -> tuple[ModularMeasurements, dict[str, str]]:
    m = small.measurement
    assert m is not None and m.latency is not None and m.energy is not None  # a whole measurement
    samples = np.asarray(m.latency.samples_ms)
    t_inf = Quantity(float(samples.mean()), _sem_ms(samples * 1e3))
    e_inf = Quantity(m.energy.per_inference_mj, m.energy.uncertainty_mj)
    t_dec_us = hi.joined("t_dec_us")
    t_lr = Quantity(float(t_dec_us.mean()) / 1e3, _sem_ms(t_dec_us) + 1e-3)
    active_w = m.energy.active_power_w
    e_lr = Quantity(t_lr.value * active_w, t_lr.uncertainty * active_w + t_lr.value * active_w * 0.05)
    t_off_us = remote.joined("t_off_us")
    t_off = Quantity(float(t_off_us.mean()) / 1e3, _sem_ms(t_off_us))
    methods = {
        "t_dev_inf_ms": f"mean of {len(samples)} inferences timed on the device clock (on-device run)",
        "e_dev_inf_mj": f"energy per inference of the on-device run ({m.energy.method})",
        "t_lr_ms": f"mean of the HI passes' {len(t_dec_us)} decision times on the device clock",
        "e_lr_mj": f"t_LR x the on-device run's active power {active_w:.4g} W (+-5 %): too short to capture",
        "t_off_ms": f"mean of the remote passes' {len(t_off_us)} offload times on the device clock",
        "e_edge_off_mj": "the remote passes' captured energy per sample",
    }
    return ModularMeasurements(t_inf, t_lr, t_off, e_inf, e_lr, remote.epi_mj()), methods


def _records(
    study: Study,
    small: Outcome,
    outputs_eval: np.ndarray,
    decision: Decision,
    basis: str,
    hi: Pass,
    remote: Pass,
    address: tuple[str, int],
) -> list[Measurement]:
    split = study.split
    modular, methods = _modular(small, hi, remote)
    outcomes = _outcomes(hi, split.y_eval)
    terms = hi_terms(outcomes)
    measured = StrategyFigures(
        accuracy=accuracy_eq1(outcomes),
        lpi_ms=hi.lpi_ms(),
        epi_mj=hi.epi_mj(),
        offloaded_fraction=terms.eta_off,
        false_negatives=terms.eta_fn,
        accepted_errors=terms.accepted_errors,
        source="measured",
    )
    predicted = predict_hi(outcomes, modular)
    server_at = f"{address[0]}:{address[1]}"
    link = _link(study)
    decision_f1 = None if split.synthetic else score(decision, outputs_eval, split.y_eval).f1
    hi_result = StrategyResult(
        strategy=StrategyKind.HI,
        dataset=split.dataset,
        synthetic=split.synthetic,
        samples=terms.samples,
        local_model=study.local.name,
        server_model=_server_model(study),
        server=server_at,
        link=link,
        decision=decision.to_dict(),
        decision_f1=decision_f1,
        decision_basis=basis,
        measured=Figures.of(measured, synthetic=split.synthetic),
        predicted=Figures.of(predicted, synthetic=split.synthetic),
        modular=Modular.of(modular, methods),
        difference_pct={
            "lpi_ms": _pct(measured.lpi_ms, predicted.lpi_ms),
            "epi_mj": _pct(measured.epi_mj, predicted.epi_mj),
        },
    )
    final, truth = remote.first("final_class"), split.y_eval
    remote_result = StrategyResult(
        strategy=StrategyKind.REMOTE,
        dataset=split.dataset,
        synthetic=split.synthetic,
        samples=len(final),
        local_model=None,
        server_model=_server_model(study),
        server=server_at,
        link=link,
        measured=Figures.of(
            StrategyFigures(
                accuracy=proportion(int((final == truth).sum()), len(final)),
                lpi_ms=remote.lpi_ms(),
                epi_mj=remote.epi_mj(),
                offloaded_fraction=Quantity(1.0),
                false_negatives=None,
                accepted_errors=None,
                source="measured",
            ),
            synthetic=split.synthetic,
        ),
    )
    return [
        _on_device(study, study.local, small, outputs_eval, StrategyKind.ON_DEVICE_SMALL),
        _measurement(study, hi_result, study.local, small),
        _measurement(study, remote_result, study.local, small),
    ]


def _on_device(
    study: Study, payload: Payload, outcome: Outcome, outputs: np.ndarray, kind: StrategyKind
) -> Measurement:
    split = study.split
    m = outcome.measurement
    assert m is not None and m.latency is not None and m.energy is not None  # a whole measurement
    samples = np.asarray(m.latency.samples_ms)
    correct = local_correct(outputs, split.y_eval) if not split.synthetic else np.zeros(len(outputs), bool)
    result = StrategyResult(
        strategy=kind,
        dataset=split.dataset,
        synthetic=split.synthetic,
        samples=len(outputs),
        local_model=payload.name,
        server_model=None,
        measured=Figures.of(
            StrategyFigures(
                accuracy=proportion(int(correct.sum()), len(correct)),
                lpi_ms=Quantity(float(samples.mean()), _sem_ms(samples * 1e3)),
                epi_mj=Quantity(m.energy.per_inference_mj, m.energy.uncertainty_mj),
                offloaded_fraction=Quantity(0.0),
                false_negatives=None,
                accepted_errors=None,
                source="measured",
            ),
            synthetic=split.synthetic,
        ),
    )
    return _measurement(study, result, payload, outcome)


def _measurement(study: Study, result: StrategyResult, payload: Payload, outcome: Outcome) -> Measurement:
    """The journal record of one strategy: provenance of the board's run of `payload`."""
    base = outcome.measurement
    assert base is not None  # a whole measurement
    accuracy = result.measured.accuracy
    model = result.local_model or result.server_model or payload.name
    extra: dict[str, Any] = {KEY: result.model_dump(mode="json")}
    if result.strategy is StrategyKind.REMOTE:
        extra["server_model_sha256"] = _server_sha256(study)
    return Measurement(
        board=study.board.name,
        model=f"{result.strategy.value}:{model}",
        config=result.strategy.value,
        accuracy=accuracy.value if accuracy is not None else None,
        accuracy_n=result.samples if accuracy is not None else None,
        runtime=base.runtime,
        provenance=Provenance.model_validate(
            base.provenance.model_dump() | {"model_sha256": payload.info.sha256}
        ),
        extra=extra,
    )


def _pct(measured: Quantity, predicted: Quantity) -> float:
    return (measured.value - predicted.value) / predicted.value * 100 if predicted.value else math.inf


def _link(study: Study) -> dict[str, Any] | None:
    entry = study.board.entry.link
    if entry is None:
        return None
    figures = study.board.family.link(entry.kind, study.board.entry.power_mode)
    return {"kind": entry.kind, **figures.model_copy(update=entry.overrides()).model_dump()}


def _server_model(study: Study) -> str:
    return study.server_model or study.board.lab.server(study.server).model.stem


def _server_sha256(study: Study) -> str | None:
    import hashlib

    path = study.board.lab.server(study.server).model
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def checked(results: Sequence[Measurement], say: Callable[[str], None]) -> None:
    """Print each strategy's headline figures."""
    for m in results:
        r = StrategyResult.model_validate(m.extra[KEY])
        acc = f"{r.measured.accuracy.value:.3f}" if r.measured.accuracy else "n/a"
        say(
            f"  {m.board} / {r.dataset} / {r.label()}: accuracy {acc}, LPI {r.measured.lpi_ms.value:.3f} ms, "
            f"EPI {r.measured.epi_mj.value:.4g} mJ"
        )
