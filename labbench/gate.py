"""Release gating: results journals vs budgets and a committed baseline -> per-metric verdicts, an exit code.

Every (board, model) measured is judged against its lab.yaml budget and, given a baseline saved
from an earlier run (`save_baseline`, committed under reports/baselines/), compared with it:

- latency: a two-sided Mann-Whitney U test of all per-inference samples, now vs baseline, and the
  shift of the median. A change counts when p < `alpha` (0.01) AND the median moved by at least
  `latency_pct` (3%). The rank test needs no normality (latency distributions are skewed and
  heavy-tailed: interrupts, caches, the Linux scheduler) and uses every sample, so at 200 samples a
  side a 5% shift is found nearly always. The minimum effect is the guard against what a
  within-run test cannot see: two runs of the same firmware differ a little (thermal state, clock
  trim, boot layout) and, with thousands of samples, that difference is "significant" but not a
  regression. The test compares locations; a change confined to the last percent of the tail is
  caught by a p99 budget, not here.
- energy: per-inference energy +- its stated uncertainty, now vs baseline; a change counts when
  the intervals, widened by `energy_pct` of the baseline, do not overlap (|diff| > u_now + u_base +
  energy_pct x baseline). The uncertainties are bounds, not standard errors, so they add linearly.
  Measured by one instrument (the same *IDN? reply) on the same ranges, both energies carry the
  same calibration error: then u is the random part of each budget (rounding, edges, spread) and
  what of the instrument's accuracy does not cancel (`energy_uncertainties`); otherwise the totals.
- accuracy: Fisher's exact test on the correct/incorrect counts (accuracy x accuracy_n) at
  `alpha`, with a minimum change of `accuracy_pts` percentage points. Both runs see the same test
  set, so this unpaired test is conservative. Without accuracy_n the values are compared alone.
- memory (flash, arena, peak RSS): a change beyond `memory_pct`.

A metric's verdict is the worst of its budget verdict and its comparison: FAIL > REGRESSION >
MISSING > MARGINAL > IMPROVED > PASS (MARGINAL is inside a budget's guard band: a warning). Which
metrics are compared with the baseline, and how, is `labbench.metrics` (`Metric.compare`).
Exit code: 1 on any FAIL or REGRESSION; else 2 when data is missing or incomplete (a budgeted
metric not measured, a baseline board+model not measured, an unreadable or torn journal record);
else 0. A definite red outranks an unknown, so a pipeline may retry a 2 (a board was offline) but
not a 1. Where journals hold several measurements of one board+model, the latest is used and the
notes say so.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from labbench import inventory, results
from labbench.budgets import Verdict, judge_value, limit_text, worst
from labbench.errors import LabbenchError, UsageError
from labbench.inventory import Lab, ModelBudget
from labbench.measure.record import Energy, Measurement, git_revision
from labbench.metrics import METRICS
from labbench.metrics import Comparison as ComparisonKind

BASELINE_DIR = Path("reports/baselines")
Key = tuple[str, str]  # (board, model)


class IncompleteData(LabbenchError):
    """Journals are missing, empty or hold an unreadable record, so no baseline can be taken from them."""


class Tolerance(BaseModel):
    """How much change counts: significance level and minimum effects."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    alpha: float = Field(0.01, gt=0, lt=1)  # latency and accuracy tests (two-sided)
    latency_pct: float = Field(3.0, ge=0)  # minimum shift of the median latency
    energy_pct: float = Field(5.0, ge=0)  # allowance beyond the two energy uncertainties
    accuracy_pts: float = Field(0.5, ge=0)  # minimum accuracy change in percentage points
    memory_pct: float = Field(5.0, ge=0)


DEFAULT_TOLERANCE = Tolerance()


class Baseline(BaseModel):
    """What a release is compared with: one whole measurement per (board, model) (samples, uncertainty, n)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    created_utc: str
    bench_git_rev: str
    journals: list[str]
    notes: list[str] = []
    measurements: list[Measurement]

    def entries(self) -> dict[Key, Measurement]:
        return {(m.board, m.model): m for m in self.measurements}


@dataclass(frozen=True)
class Check:
    """One metric of one (board, model): its budget, the baseline and current values, and the verdict."""

    board: str
    model: str
    metric: str
    verdict: Verdict
    now: float | None = None
    baseline: float | None = None
    budget: str | None = None
    detail: str = ""

    @property
    def unit(self) -> str:
        return METRICS[self.metric].unit if self.metric in METRICS else ""

    @property
    def change_pct(self) -> float | None:
        if self.now is None or self.baseline is None or self.baseline == 0:
            return None
        return (self.now / self.baseline - 1) * 100


@dataclass(frozen=True)
class GateResult:
    checks: list[Check]
    notes: list[str] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)  # journal problems: each makes the data incomplete
    baseline: str | None = None
    lab: str | None = None

    @property
    def exit_code(self) -> int:
        verdicts = {c.verdict for c in self.checks}
        if verdicts & {Verdict.FAIL, Verdict.REGRESSION}:
            return 1
        return 2 if Verdict.MISSING in verdicts or self.incomplete or not self.checks else 0

    @property
    def status(self) -> str:
        return {0: "PASS", 1: "FAIL", 2: "INCOMPLETE"}[self.exit_code]

    def as_dict(self) -> dict[str, Any]:
        checks = [
            {**asdict(c), "verdict": c.verdict.value, "unit": c.unit, "change_pct": c.change_pct}
            for c in self.checks
        ]
        return {
            "status": self.status,
            "exit_code": self.exit_code,
            "baseline": self.baseline,
            "lab": self.lab,
            "notes": self.notes,
            "incomplete": self.incomplete,
            "checks": checks,
        }

    def markdown(self) -> str:
        """A CI job summary: status, a table per board (metric, budget, baseline, now, change, verdict)."""
        counts = ", ".join(
            f"{n} {v.value}" for v in reversed(Verdict) if (n := sum(c.verdict is v for c in self.checks))
        )
        sources = (
            f"Baseline: {f'`{self.baseline}`' if self.baseline else 'none'}. "
            f"Budgets: {f'`{self.lab}`' if self.lab else 'none'}. {counts or 'nothing measured'}."
        )
        lines = [f"## labbench gate: {self.status} (exit {self.exit_code})", "", sources, ""]
        for board in dict.fromkeys(c.board for c in self.checks):
            lines += [f"### {board}", "", _HEADER, "| --- " * 8 + "|"]
            for c in (c for c in self.checks if c.board == board):
                verdict = c.verdict.value if c.verdict in _OK else f"**{c.verdict.value}**"
                lines.append(
                    f"| {c.model} | {c.metric} | {c.budget or ''} | {_value(c.baseline, c.unit)} | "
                    f"{_value(c.now, c.unit)} | {_change(c)} | {verdict} | {c.detail} |"
                )
            lines.append("")
        problems = [f"- incomplete: {p}" for p in self.incomplete] + [f"- {n}" for n in self.notes]
        return "\n".join(lines + (["Notes:", "", *problems, ""] if problems else []))

    def write(self, markdown: Path | None = None, json_path: Path | None = None) -> None:
        texts = ((markdown, self.markdown()), (json_path, json.dumps(self.as_dict(), indent=2) + "\n"))
        for path, text in texts:
            if path is not None:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                Path(path).write_text(text)


_OK = {Verdict.PASS, Verdict.IMPROVED}
_HEADER = "| model | metric | budget | baseline | now | change | verdict | why |"


def _value(v: float | None, unit: str) -> str:
    return "-" if v is None else f"{v:.4g}{f' {unit}' if unit else ''}"


def _change(c: Check) -> str:
    if c.now is None or c.baseline is None:
        return "-"
    if c.metric == "accuracy":
        return f"{(c.now - c.baseline) * 100:+.2f} pts"
    return "-" if c.change_pct is None else f"{c.change_pct:+.1f}%"


# --- reading journals ---------------------------------------------------------------------------


def collect(
    journals: Iterable[str | Path], since: dt.datetime | None = None
) -> tuple[dict[Key, Measurement], list[str], list[str]]:
    """The latest measurement per (board, model), notes, and problems making the data incomplete.

    A skipped line (torn or invalid: `file:line: skipped: why`) and a journal that is missing or
    unreadable are problems; the other records are kept. `since` keeps only measurements taken at or
    after it. Partial records are left out, with a note each.
    """
    found: list[Measurement] = []
    problems: list[str] = []
    for path in map(Path, journals):
        if not path.is_file():
            problems.append(f"{path}: no such journal")
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", results.JournalWarning)
            try:
                found.extend(results.read(path))
            except OSError as exc:
                problems.append(f"{path}: unreadable: {exc.strerror or exc}")
        problems += [str(w.message) for w in caught if issubclass(w.category, results.JournalWarning)]
    if since is not None:
        found = [m for m in found if _time(m) >= since]
    notes = [
        f"{m.board}/{m.model}: partial record {m.id[:12]} ({m.time_utc}) not judged: {m.error}"
        for m in found
        if m.status == "partial"
    ]
    by_key: dict[Key, list[Measurement]] = {}
    for m in found:
        if m.status == "valid":  # a partial record (cut short by an infrastructure error) is never judged
            by_key.setdefault((m.board, m.model), []).append(m)
    for (board, model), ms in by_key.items():
        ms.sort(key=_time)  # stable: equal times keep journal order
        if len(ms) > 1:
            notes.append(
                f"{board}/{model}: {len(ms)} measurements in the journals; using the latest "
                f"({ms[-1].time_utc}, id {ms[-1].id[:12]})"
            )
    return {k: ms[-1] for k, ms in by_key.items()}, notes, problems


def _time(m: Measurement) -> dt.datetime:
    t = dt.datetime.fromisoformat(m.time_utc)
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


# --- baselines ----------------------------------------------------------------------------------

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def save_baseline(journals: Iterable[str | Path], name: str, out_dir: Path = BASELINE_DIR) -> Path:
    """Write <out_dir>/<name>.json from the latest measurement of each (board, model) in the journals.

    The measurements are kept whole (every latency sample, energy with its uncertainty, accuracy with
    its n, memory, provenance). Refuses incomplete journals: a committed baseline must be whole.
    """
    if not _NAME.match(name):
        raise UsageError(f"baseline name {name!r}: use letters, digits, '.', '_' and '-'")
    paths = [str(p) for p in journals]
    latest, notes, problems = collect(paths)
    if problems or not latest:
        why = "; ".join(problems) or f"no measurements in {', '.join(paths)}"
        raise IncompleteData(f"baseline {name}: {why}")
    baseline = Baseline(
        name=name,
        created_utc=dt.datetime.now(dt.UTC).isoformat(),
        bench_git_rev=git_revision(),
        journals=paths,
        notes=notes,
        measurements=[latest[k] for k in sorted(latest)],
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(baseline.model_dump_json(indent=1) + "\n")
    return path


def load_baseline(ref: str | Path, directory: Path = BASELINE_DIR) -> Baseline:
    """A baseline by file path, or by name from `directory`."""
    path = Path(ref)
    if not path.is_file():
        path = directory / f"{ref}.json"
    if not path.is_file():
        known = sorted(p.stem for p in directory.glob("*.json")) if directory.is_dir() else []
        raise UsageError(
            f"baseline {ref}: no such file, nor {path} (baselines in {directory}: "
            f"{', '.join(known) or 'none'})"
        )
    try:
        return Baseline.model_validate_json(path.read_text())
    except ValidationError as exc:
        raise UsageError(f"{path}: not a labbench baseline ({str(exc).splitlines()[0]})") from None


# --- comparisons --------------------------------------------------------------------------------

Comparison = tuple[Verdict, str]


def _direction(worse: bool, better: bool) -> Verdict:
    return Verdict.REGRESSION if worse else Verdict.IMPROVED if better else Verdict.PASS


def compare_latency(
    baseline_ms: Iterable[float], now_ms: Iterable[float], tol: Tolerance = DEFAULT_TOLERANCE
) -> Comparison:
    """Mann-Whitney U (two-sided) on the samples and the relative shift of the median (see module doc)."""
    import numpy as np
    from scipy import stats

    base, now = np.asarray(list(baseline_ms), float), np.asarray(list(now_ms), float)
    if base.size < 2 or now.size < 2:
        return Verdict.MISSING, f"too few latency samples ({base.size} baseline, {now.size} now)"
    p = float(stats.mannwhitneyu(now, base, alternative="two-sided").pvalue)
    shift_pct = (np.median(now) / np.median(base) - 1) * 100
    real = p < tol.alpha and abs(shift_pct) >= tol.latency_pct
    return (
        _direction(real and shift_pct > 0, real and shift_pct < 0),
        (
            f"Mann-Whitney U p={p:.2g} over {base.size}+{now.size} samples, median {shift_pct:+.1f}% "
            f"(a change is p<{tol.alpha:g} and >={tol.latency_pct:g}%)"
        ),
    )


def _energy(m: Measurement) -> Energy:
    """The energy of `m`, which the caller compares: it has one."""
    if m.energy is None:
        raise ValueError(f"{m.board} / {m.model}: no energy measured")
    return m.energy


def _accuracy(m: Measurement) -> float:
    """The accuracy of `m`, which the caller compares: it has one."""
    if m.accuracy is None:
        raise ValueError(f"{m.board} / {m.model}: no accuracy measured")
    return m.accuracy


def _latency_ms(m: Measurement) -> list[float]:
    """The latency samples of `m`, which the caller compares: it has them."""
    if m.latency is None:
        raise ValueError(f"{m.board} / {m.model}: no latency measured")
    return m.latency.samples_ms


def _measured(metric: str, m: Measurement) -> float:
    """`metric` on `m`, which the caller compares: it was measured."""
    value = METRICS[metric].value(m)
    if value is None:
        raise ValueError(f"{m.board} / {m.model}: {metric} not measured")
    return value


def same_calibration(base: Measurement, now: Measurement) -> bool:
    """Whether both energies were measured by one instrument (its *IDN? reply) holding the same ranges,
    with their uncertainty budgets journaled: then they share the instrument's calibration error (as
    far as the records tell: a recalibration in between is not in them)."""
    b, n = _energy(base), _energy(now)
    ranges = (b.voltage_range_v, b.current_range_a)
    return (
        base.provenance.instrument is not None
        and base.provenance.instrument == now.provenance.instrument
        and None not in ranges
        and ranges == (n.voltage_range_v, n.current_range_a)
        and "per_inference_mj" in b.uncertainties
        and "per_inference_mj" in n.uncertainties
        and min(b.per_inference_mj, b.active_power_w, n.active_power_w) > 0
    )


def energy_uncertainties(base: Measurement, now: Measurement) -> tuple[float, float, str]:
    """The uncertainties (mJ) the energy comparison allows for, baseline's and now's, and what they are.

    Across instruments or ranges: the totals. With a shared calibration: the random parts (rounding,
    edges, spread), and on the baseline's side what the calibration error does not cancel. That error
    is gain x energy + offset power x time per inference (energy / power), at most the baseline's
    accuracy bound, so it changes between the two by at most that bound times the relative changes
    of energy and of time per inference."""
    b, n = _energy(base), _energy(now)
    if not same_calibration(base, now):
        return b.uncertainty_mj, n.uncertainty_mj, "uncertainties"
    ub, un = b.uncertainties["per_inference_mj"], n.uncertainties["per_inference_mj"]
    time_change = (n.per_inference_mj / n.active_power_w) / (b.per_inference_mj / b.active_power_w) - 1
    residual = ub.accuracy * (abs(n.per_inference_mj / b.per_inference_mj - 1) + abs(time_change))
    return (
        ub.rounding + ub.edges + ub.spread + residual,
        un.rounding + un.edges + un.spread,
        "random uncertainties (same instrument and ranges)",
    )


def compare_energy(base: Measurement, now: Measurement, tol: Tolerance = DEFAULT_TOLERANCE) -> Comparison:
    """Non-overlap of the energy intervals (value +- uncertainty) widened by energy_pct of the baseline."""
    b, n = _energy(base), _energy(now)
    diff = n.per_inference_mj - b.per_inference_mj
    u_base, u_now, which = energy_uncertainties(base, now)
    allowance = u_base + u_now + tol.energy_pct / 100 * b.per_inference_mj
    return (
        _direction(diff > allowance, -diff > allowance),
        (
            f"{diff:+.3g} mJ vs allowance {allowance:.3g} mJ ({which} {u_base:.2g} + {u_now:.2g} mJ, "
            f"tolerance {tol.energy_pct:g}%)"
        ),
    )


def compare_accuracy(base: Measurement, now: Measurement, tol: Tolerance = DEFAULT_TOLERANCE) -> Comparison:
    """Fisher's exact test on correct/incorrect counts at alpha, with a minimum change of accuracy_pts."""
    import numpy as np
    from scipy import stats

    base_accuracy, now_accuracy = _accuracy(base), _accuracy(now)
    change_pts = (now_accuracy - base_accuracy) * 100
    big = abs(change_pts) >= tol.accuracy_pts
    if not (base.accuracy_n and now.accuracy_n):
        return (
            _direction(big and change_pts < 0, big and change_pts > 0),
            f"{change_pts:+.2f} pts (no sample count: by value, tolerance {tol.accuracy_pts:g} pts)",
        )
    kb, kn = round(base_accuracy * base.accuracy_n), round(now_accuracy * now.accuracy_n)
    table = np.array([[kb, base.accuracy_n - kb], [kn, now.accuracy_n - kn]])
    p = float(stats.fisher_exact(table, alternative="two-sided").pvalue)
    real = big and p < tol.alpha
    return (
        _direction(real and change_pts < 0, real and change_pts > 0),
        (
            f"Fisher exact p={p:.2g} ({kb}/{base.accuracy_n} vs {kn}/{now.accuracy_n}), "
            f"{change_pts:+.2f} pts (a change is p<{tol.alpha:g} and >={tol.accuracy_pts:g} pts)"
        ),
    )


def compare_memory(base_value: float, now_value: float, tol: Tolerance = DEFAULT_TOLERANCE) -> Comparison:
    change_pct = (now_value / base_value - 1) * 100 if base_value else (math.inf if now_value else 0.0)
    return (
        _direction(change_pct > tol.memory_pct, change_pct < -tol.memory_pct),
        f"tolerance {tol.memory_pct:g}%",
    )


_COMPARERS: dict[ComparisonKind, Callable[[str, Measurement, Measurement, Tolerance], Comparison]] = {
    "samples": lambda metric, base, now, tol: compare_latency(_latency_ms(base), _latency_ms(now), tol),
    "uncertainty": lambda metric, base, now, tol: compare_energy(base, now, tol),
    "proportion": lambda metric, base, now, tol: compare_accuracy(base, now, tol),
    "relative": lambda metric, base, now, tol: compare_memory(
        _measured(metric, base), _measured(metric, now), tol
    ),
}


def check_measurement(
    board: str,
    model: str,
    now: Measurement | None,
    base: Measurement | None,
    budget: ModelBudget | None,
    tol: Tolerance = DEFAULT_TOLERANCE,
) -> list[Check]:
    """The checks of one (board, model): every budgeted metric and every metric the baseline compares."""
    if now is None:
        return [
            Check(
                board,
                model,
                "measurement",
                Verdict.MISSING,
                detail="in the baseline but not measured: not a pass",
            )
        ]
    limits = budget.limits() if budget else {}
    compared = {name: m for name, m in METRICS.items() if m.compare is not None}
    metrics = [
        name
        for name, m in METRICS.items()
        if name in limits
        or (
            name in compared
            and (m.value(now) is not None or (base is not None and m.value(base) is not None))
        )
    ]
    checks = []
    for metric in metrics:
        spec = METRICS[metric]
        value, details, verdicts = spec.value(now), [], [Verdict.PASS]
        before = spec.value(base) if base is not None else None
        if metric in limits:
            j = judge_value(metric, value, limits[metric], spec.interval_of(now))
            verdicts.append(j.verdict)
            if j.verdict not in (Verdict.PASS, Verdict.MISSING):
                details.append(f"budget {j.verdict.value}")
        if value is None:
            verdicts.append(Verdict.MISSING)
            details.append("not measured")
        elif spec.compare is not None and before is not None and base is not None:
            verdict, detail = _COMPARERS[spec.compare](metric, base, now, tol)
            verdicts.append(verdict)
            details.append(detail)
        checks.append(
            Check(
                board,
                model,
                metric,
                worst(verdicts),
                value,
                before,
                limit_text(limits[metric], spec.unit) if metric in limits else None,
                "; ".join(d for d in details if d),
            )
        )
    return checks


def _provenance_notes(key: Key, base: Measurement, now: Measurement) -> list[str]:
    b, n = base.provenance, now.provenance
    return [
        f"{key[0]}/{key[1]}: baseline {what} {x} but now {y}: the comparison may not be like for like"
        for what, x, y in (
            ("source", b.source, n.source),
            ("family", b.family, n.family),
            ("power mode", b.power_mode, n.power_mode),
        )
        if x != y
    ]


def _budget(lab: Lab | None, board: str, model: str) -> ModelBudget | None:
    if lab is None:
        return None
    if board in lab.boards:
        return lab.budget(board, model)
    return lab.budgets.get(board, {}).get(model)


def gate(
    journals: Iterable[str | Path],
    lab: Lab | str | Path | None = None,
    baseline: Baseline | str | Path | None = None,
    tolerance: Tolerance = DEFAULT_TOLERANCE,
    boards: Iterable[str] | None = None,
    since: dt.datetime | None = None,
) -> GateResult:
    """Judge the latest measurement of every (board, model) in the journals; see the module doc.

    `lab` (a Lab or a lab.yaml path) supplies budgets; `baseline` (a Baseline, a path, or a name
    under reports/baselines/) the comparison. `boards` limits the gate to those boards (a runner
    attached to one board); `since` ignores measurements older than it (earlier runs in the journal).
    """
    if isinstance(lab, (str, Path)):
        lab = inventory.load(lab)
    if isinstance(baseline, (str, Path)):
        baseline = load_baseline(baseline)
    latest, notes, problems = collect(journals, since)
    before = baseline.entries() if baseline else {}
    if baseline:
        notes.insert(
            0,
            f"baseline {baseline.name}: saved {baseline.created_utc} by bench "
            f"{baseline.bench_git_rev} from {', '.join(baseline.journals)}",
        )
    if boards is not None:
        keep = set(boards)
        latest = {k: m for k, m in latest.items() if k[0] in keep}
        before = {k: m for k, m in before.items() if k[0] in keep}
    checks = []
    for key in sorted(latest.keys() | before.keys()):
        now, base = latest.get(key), before.get(key)
        checks += check_measurement(*key, now, base, _budget(lab, *key), tolerance)
        if now is not None and base is not None:
            notes += _provenance_notes(key, base, now)
        if now is not None and baseline is not None and base is None:
            notes.append(f"{key[0]}/{key[1]}: not in baseline {baseline.name}: judged by budget only")
        if now is not None and lab is not None and _budget(lab, *key) is None:
            notes.append(f"{key[0]}/{key[1]}: no budget in {lab.path.name}")
    return GateResult(
        checks,
        notes,
        problems,
        baseline.name if baseline else None,
        f"{lab.path} (sha256 {lab.sha256[:12]})" if lab else None,
    )
