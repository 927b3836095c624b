"""`labbench strategies`: journals of strategy results -> the seed paper's Table 5 analogue (the
preferred strategy per QoS requirement, per dataset and board) as HTML, Markdown and JSON, with the
analogues of its Fig. 3 (accuracy per strategy) and Figs. 4-5 (latency and energy per strategy and
board).

Records are the journal's valid measurements whose `extra["strategy"]` is a `StrategyResult`. Of
several records of one (board, dataset, strategy, local model), the newest (`time_utc`) wins. The
QoS of a (dataset, board) follows §3.3 (`QoS.relative_to`) from that board's measured remote
strategy on that dataset unless given. Selections use the measured figures; synthetic-input records
have no accuracy and take no part in the accuracy requirement.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import html
import io
import json
import math
import os
import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
from pydantic import ValidationError

from labbench import results
from labbench.errors import UsageError
from labbench.measure.record import Measurement
from labbench.redact import redact_env, redact_html, redact_text
from labbench.strategies.qos import QoS, Requirement, Selection, Strategy, StrategyKind, select
from labbench.strategies.record import KEY, Figure, StrategyResult

#: --qos keys -> QoS fields
QOS_KEYS = {"accuracy": "min_accuracy", "lpi_ms": "max_lpi_ms", "epi_mj": "max_epi_mj"}
SYNTHETIC = "n/a (synthetic inputs)"
HEADINGS = {
    Requirement.ACCURACY: "Accuracy ≥ min",
    Requirement.LATENCY: "Latency ≤ max",
    Requirement.ENERGY: "Energy ≤ max",
}


class StrategiesReportError(UsageError):
    """Journals a strategies report cannot be built from, or a QoS that cannot be applied."""


@dataclass(frozen=True)
class QosPolicy:
    """How each (dataset, board)'s QoS is set: §3.3 relative to the remote strategy, or given."""

    sota_accuracy: Mapping[str, float] = field(default_factory=dict)  # per dataset
    default_sota: float = 1.0
    margin: float = 0.10
    offload_share: float = 0.5
    given: Mapping[str, float] = field(default_factory=dict)  # --qos: a key of QOS_KEYS -> value


def parse_qos(text: str) -> dict[str, float]:
    """`accuracy=0.9,lpi_ms=5,epi_mj=2` (any of the three) -> {key: value}, checked."""
    given: dict[str, float] = {}
    for item in text.split(","):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or key not in QOS_KEYS or key in given:
            raise StrategiesReportError(
                f"bad --qos {text!r}: want each of {', '.join(QOS_KEYS)} at most once, as key=value"
            )
        given[key] = parse_number(value, f"--qos {key}", low=0.0, high=1.0 if key == "accuracy" else None)
    return given


def parse_sota(text: str) -> tuple[float | None, dict[str, float]]:
    """`--sota-accuracy`: `0.995` (every dataset) and/or `dataset=value` items, comma-separated ->
    (the value for every dataset or None, {dataset: value})."""
    default: float | None = None
    per_dataset: dict[str, float] = {}
    for item in text.split(","):
        dataset, sep, value = (part.strip() for part in item.rpartition("="))
        number = parse_number(value, "--sota-accuracy", low=0.0, high=1.0)
        if sep and dataset:
            per_dataset[dataset] = number
        elif not sep:
            default = number
        else:
            raise StrategiesReportError(f"bad --sota-accuracy {text!r}: want dataset=value or a value")
    return default, per_dataset


def parse_number(text: str, option: str, low: float, high: float | None = None) -> float:
    """`text` as a finite number in [low, high] (no upper bound when None)."""
    try:
        value = float(text)
    except ValueError:
        raise StrategiesReportError(f"bad {option} {text!r}: not a number") from None
    if not (low <= value <= (math.inf if high is None else high)) or not math.isfinite(value):
        bound = f"[{low:g}, {high:g}]" if high is not None else f">= {low:g}"
        raise StrategiesReportError(f"bad {option} {text!r}: want a number {bound}")
    return value


@dataclass(frozen=True)
class Entry:
    """One journaled strategy result and where it came from."""

    record: Measurement
    result: StrategyResult
    journal: Path

    @property
    def strategy(self) -> Strategy:
        return Strategy(self.result.strategy, self.result.local_model or self.result.server_model or "?")

    @property
    def key(self) -> tuple[str, str, StrategyKind, str | None]:
        return (self.record.board, self.result.dataset, self.result.strategy, self.result.local_model)


@dataclass(frozen=True)
class Journals:
    """The strategy records kept (newest per key), those superseded (id -> newer id), lines skipped."""

    paths: tuple[Path, ...]
    entries: tuple[Entry, ...]
    superseded: tuple[tuple[Entry, str], ...]
    skipped: tuple[str, ...]


@dataclass(frozen=True)
class Row:
    """One row of the Table 5 analogue; a selection is None without candidates (synthetic only)."""

    dataset: str
    board: str
    entries: tuple[Entry, ...]
    qos: QoS | None
    qos_origin: str  # how the QoS was set, or why there is none
    selections: dict[Requirement, Selection | None]


def load(paths: Sequence[Path]) -> Journals:
    """The strategy records of the journals, newest per (board, dataset, strategy, local model)."""
    found: list[Entry] = []
    skipped: list[str] = []
    for path in paths:
        measurements, problems = _read(path)
        skipped += problems
        for entry in (_entry(path, m) for m in measurements if KEY in m.extra):
            if isinstance(entry, Entry):
                found.append(entry)
            else:
                skipped.append(entry)
    for problem in skipped:
        warnings.warn(problem, results.JournalWarning, stacklevel=2)
    if not found:
        raise StrategiesReportError(f"no strategy records (extra.{KEY}) in {', '.join(map(str, paths))}")
    newest: dict[tuple[str, str, StrategyKind, str | None], Entry] = {}
    superseded: list[tuple[Entry, str]] = []
    # ISO 8601 UTC times sort as text (as the dashboard's); of equal times, the later in file order wins
    for e in sorted(found, key=lambda e: e.record.time_utc):
        if (old := newest.get(e.key)) is not None:
            superseded.append((old, e.record.id))
        newest[e.key] = e
    return Journals(tuple(paths), tuple(newest.values()), tuple(superseded), tuple(skipped))


def _read(path: Path) -> tuple[list[Measurement], list[str]]:
    if not path.is_file():
        raise StrategiesReportError(f"{path}: no such journal")
    try:
        lines = list(results.scan(path))
    except OSError as exc:
        raise StrategiesReportError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if not lines:
        raise StrategiesReportError(f"{path}: empty journal")
    if all(line.record is None for line in lines):
        raise StrategiesReportError(
            f"{path}: damaged: none of its {len(lines)} lines is a record (`labbench journal check {path}`)"
        )
    problems = [f"{path}:{line.number}: skipped: {line.problem}" for line in lines if line.problem]
    return [line.record for line in lines if isinstance(line.record, Measurement)], problems


def _entry(path: Path, m: Measurement) -> Entry | str:
    """A record's strategy result, or why it is left out."""
    if m.status != "valid":
        return f"{path}: record {m.id}: partial ({m.error}), left out"
    try:
        return Entry(m, StrategyResult.model_validate(m.extra[KEY]), path)
    except ValidationError as exc:
        return f"{path}: record {m.id}: extra.{KEY} is not a strategy result: {_first(exc)}"


def _first(exc: ValidationError) -> str:
    error = exc.errors()[0]
    return f"{'.'.join(map(str, error['loc'])) or 'record'}: {error['msg']}"


def rows(journals: Journals, policy: QosPolicy) -> list[Row]:
    """The Table 5 analogue, a row per (dataset, board), strategies in `StrategyKind` order."""
    order = list(StrategyKind)
    groups: dict[tuple[str, str], list[Entry]] = {}
    for e in journals.entries:
        groups.setdefault((e.result.dataset, e.record.board), []).append(e)
    out = []
    for (dataset, board), group in sorted(groups.items()):
        entries = tuple(sorted(group, key=lambda e: (order.index(e.result.strategy), e.strategy.model)))
        qos, origin = qos_for(dataset, entries, policy)
        selections = selections_for(entries, qos) if qos else dict.fromkeys(Requirement)
        out.append(Row(dataset, board, entries, qos, origin, selections))
    return out


def qos_for(dataset: str, entries: Sequence[Entry], policy: QosPolicy) -> tuple[QoS | None, str]:
    """§3.3 from the remote strategy's measured LPI and EPI (`QoS.relative_to`), `policy.given` in
    place of the derived values; None (and why) when a limit can be neither derived nor taken."""
    sota = policy.sota_accuracy.get(dataset, policy.default_sota)
    remote = next((e for e in entries if e.result.strategy is StrategyKind.REMOTE), None)
    given = {QOS_KEYS[k]: v for k, v in policy.given.items()}
    origin = f"accuracy: SOTA {sota:g} - {policy.margin:g}"
    try:
        if remote is not None:
            m = remote.result.measured
            qos = QoS.relative_to(sota, m.lpi_ms.value, m.epi_mj.value, policy.margin, policy.offload_share)
            origin += f"; LPI, EPI: {policy.offload_share:g} x remote (record {remote.record.id})"
        elif {"max_lpi_ms", "max_epi_mj"} <= given.keys():
            qos = QoS(sota - policy.margin, given["max_lpi_ms"], given["max_epi_mj"])
        else:
            return None, "no remote strategy measured here: give --qos lpi_ms=...,epi_mj=..."
        qos = dataclasses.replace(qos, **given)
    except ValueError as exc:
        raise StrategiesReportError(f"{dataset} on {entries[0].record.board}: QoS: {exc}") from None
    return qos, origin + (f"; given: {', '.join(policy.given)} (--qos)" if given else "")


def selections_for(entries: Sequence[Entry], qos: QoS) -> dict[Requirement, Selection | None]:
    """`qos.table5_row` on the measured figures, synthetic-input strategies left out of the accuracy
    requirement (their accuracy reads as 0 in the others, see `record.Figures.figures`)."""
    every = {e.strategy: e.result.measured.figures() for e in entries}
    real = {e.strategy: every[e.strategy] for e in entries if not e.result.synthetic}
    pools = {r: real if r is Requirement.ACCURACY else every for r in Requirement}
    return {r: select(pool, qos, r) if pool else None for r, pool in pools.items()}


# --- tables ---------------------------------------------------------------------------------------


def cell(selection: Selection | None) -> str:
    """A Table 5 cell: the preferred strategy, whether it meets the requirement, its ties."""
    if selection is None:
        return SYNTHETIC
    text = selection.preferred.label + ("" if selection.met else " (not met: the closest)")
    return text + (f" (ties: {', '.join(s.label for s in selection.ties)})" if selection.ties else "")


def _pm(f: Figure | None, scale: float = 1.0) -> str:
    return "-" if f is None else f"{f.value * scale:.4g} ± {f.uncertainty * scale:.2g}"


def _qos_text(qos: QoS | None) -> str:
    if qos is None:
        return "-"
    return f"accuracy ≥ {qos.min_accuracy:.1%}, LPI ≤ {qos.max_lpi_ms:.4g} ms, EPI ≤ {qos.max_epi_mj:.4g} mJ"


def table5(rs: Sequence[Row]) -> pd.DataFrame:
    """The Table 5 analogue: a row per (dataset, board), a column per requirement, and the QoS used."""
    return pd.DataFrame(
        [
            {
                "Dataset": r.dataset,
                "Board": r.board,
                **{HEADINGS[q]: cell(s) if r.qos else "-" for q, s in r.selections.items()},
                "QoS": _qos_text(r.qos),
                "QoS from": r.qos_origin,
            }
            for r in rs
        ]
    )


def strategy_table(row: Row) -> pd.DataFrame:
    """Every strategy of a (dataset, board): measured figures and, for HI, Eq. 1-4's beside them."""

    def line(e: Entry) -> dict[str, str]:
        r, m, p = e.result, e.result.measured, e.result.predicted
        diff = r.difference_pct
        return {
            "strategy": e.strategy.label,
            "record": e.record.id,
            "accuracy (%)": SYNTHETIC if r.synthetic else _pm(m.accuracy, 100),
            "LPI (ms)": _pm(m.lpi_ms),
            "EPI (mJ)": _pm(m.epi_mj),
            "offloaded (%)": _pm(m.offloaded_fraction, 100),
            "decision F1": "-" if r.decision_f1 is None else f"{r.decision_f1:.3g}",
            "false negatives (%)": _pm(m.false_negatives, 100),
            "LPI Eq. 3 (ms)": _pm(p.lpi_ms) if p else "-",
            "LPI diff (%)": f"{diff['lpi_ms']:+.3g}" if "lpi_ms" in diff else "-",
            "EPI Eq. 4 (mJ)": _pm(p.epi_mj) if p else "-",
            "EPI diff (%)": f"{diff['epi_mj']:+.3g}" if "epi_mj" in diff else "-",
        }

    return pd.DataFrame([line(e) for e in row.entries])


def records_table(journals: Journals) -> pd.DataFrame:
    """Every strategy record read, used or superseded, with its provenance."""
    kept = [(e, "used") for e in journals.entries]
    old = [(e, f"superseded by {newer}") for e, newer in journals.superseded]
    return pd.DataFrame(
        [
            {
                "record": e.record.id,
                "board": e.record.board,
                "dataset": e.result.dataset,
                "strategy": e.strategy.label,
                "source": e.record.provenance.source,
                "model sha256": e.record.provenance.model_sha256,
                "time (UTC)": e.record.time_utc,
                "test": e.record.test or "-",
                "journal": str(e.journal),
                "status": status,
            }
            for e, status in sorted(kept + old, key=lambda pair: (pair[0].key[:2], pair[0].record.time_utc))
        ]
    )


def markdown(df: pd.DataFrame) -> str:
    """A DataFrame as a Markdown table (text cells, `|` escaped)."""
    cells = [[str(v).replace("|", "\\|") for v in row] for row in [list(df.columns), *df.to_numpy().tolist()]]
    lines = ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join([lines[0], "| " + " | ".join("---" for _ in df.columns) + " |", *lines[1:]])


# --- figures --------------------------------------------------------------------------------------


def figure_frame(rs: Sequence[Row]) -> pd.DataFrame:
    """The measured figures of every strategy kept, one row each, for the plots."""
    data = []
    for r in rs:
        for e in r.entries:
            m = e.result.measured
            acc = None if e.result.synthetic else m.accuracy
            data.append(
                {
                    "dataset": r.dataset,
                    "board": r.board,
                    "strategy": e.strategy.label,
                    "accuracy": acc.value * 100 if acc else float("nan"),
                    "accuracy_u": acc.uncertainty * 100 if acc else float("nan"),
                    "lpi": m.lpi_ms.value,
                    "lpi_u": m.lpi_ms.uncertainty,
                    "epi": m.epi_mj.value,
                    "epi_u": m.epi_mj.uncertainty,
                }
            )
    return pd.DataFrame(data)


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _bars(ax: Any, df: pd.DataFrame, index: str, columns: str, value: str, log: bool) -> None:
    rows, cols = list(df[index].unique()), list(df[columns].unique())  # in the tables' order
    values = df.pivot(index=index, columns=columns, values=value).reindex(index=rows, columns=cols)
    errors = df.pivot(index=index, columns=columns, values=f"{value}_u").reindex(index=rows, columns=cols)
    values.plot.bar(ax=ax, yerr=errors, capsize=3, logy=log, rot=20, width=0.8)
    ax.legend(fontsize=7)


def accuracy_figure(df: pd.DataFrame) -> bytes | None:
    """Fig. 3 analogue: accuracy per strategy, a panel per dataset, a bar per board; None when no
    strategy has a measured accuracy."""
    df = df.dropna(subset=["accuracy"])
    if df.empty:
        return None
    datasets = sorted(df["dataset"].unique())
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        _bars(ax, df[df["dataset"] == dataset], "strategy", "board", "accuracy", log=False)
        ax.set_title(f"accuracy: {dataset}")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_xlabel("")
    return _png(fig)


def cost_figure(df: pd.DataFrame, dataset: str) -> bytes:
    """Figs. 4-5 analogue for one dataset: latency and energy per board, a bar per strategy, log scale."""
    group = df[df["dataset"] == dataset]
    fig, (lpi, epi) = plt.subplots(1, 2, figsize=(12, 4))
    _bars(lpi, group, "board", "strategy", "lpi", log=True)
    _bars(epi, group, "board", "strategy", "epi", log=True)
    lpi.set(title=f"latency per inference: {dataset}", ylabel="LPI (ms)", xlabel="")
    epi.set(title=f"energy per inference: {dataset}", ylabel="EPI (mJ)", xlabel="")
    return _png(fig)


# --- output ---------------------------------------------------------------------------------------


def notes(journals: Journals, policy: QosPolicy) -> list[str]:
    """What the reader needs to know to read the tables."""
    given = ", ".join(f"{k}={v:g}" for k, v in policy.given.items())
    return [
        f"{len(journals.entries)} strategy records from {', '.join(map(str, journals.paths))}. Of several "
        "records of one board, dataset, strategy and local model the newest wins: "
        f"{len(journals.superseded)} superseded (listed under Records).",
        "Selections use the measured figures (Table 5's rules, labbench.strategies.qos). QoS per dataset and "
        f"board (§3.3): accuracy ≥ SOTA - {policy.margin:g}, LPI and EPI ≤ {policy.offload_share:g} x the "
        "board's measured remote strategy" + (f"; given: {given}." if given else "."),
        f"Strategies measured on synthetic inputs have no accuracy (shown as {SYNTHETIC!r}): they are left "
        "out of the accuracy requirement, and their accuracy reads as 0 in the latency and energy ones.",
        "Partial records (cut short by an infrastructure error) are left out.",
    ]


def to_json(journals: Journals, rs: Sequence[Row], policy: QosPolicy) -> dict[str, Any]:
    """The report as JSON-ready data: rows, their QoS and selections, strategies and records."""

    def selection(s: Selection | None) -> dict[str, Any] | None:
        if s is None:
            return None
        labels = [x.label for x in s.meeting]
        return {
            "preferred": s.preferred.label,
            "met": s.met,
            "meeting": labels,
            "ties": [x.label for x in s.ties],
        }

    def strategy(e: Entry) -> dict[str, Any]:
        r = e.result
        return {
            "record": e.record.id,
            "label": e.strategy.label,
            **r.model_dump(
                mode="json",
                include={
                    "strategy",
                    "synthetic",
                    "local_model",
                    "server_model",
                    "decision_f1",
                    "difference_pct",
                },
            ),
            "measured": r.measured.model_dump(mode="json"),
            "predicted": r.predicted.model_dump(mode="json") if r.predicted else None,
        }

    return {
        "generated_utc": dt.datetime.now(dt.UTC).isoformat(),
        "notes": notes(journals, policy),
        "rows": [
            {
                "dataset": r.dataset,
                "board": r.board,
                "qos": dataclasses.asdict(r.qos) if r.qos else None,
                "qos_from": r.qos_origin,
                "selections": {q.value: selection(s) for q, s in r.selections.items()} if r.qos else None,
                "strategies": [strategy(e) for e in r.entries],
            }
            for r in rs
        ],
        "records": records_table(journals).to_dict(orient="records"),
        "skipped": list(journals.skipped),
    }


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


STYLE = (
    "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
    "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#eee}"
    ".skipped{color:#c33}</style>"
)


def to_html(journals: Journals, rs: Sequence[Row], policy: QosPolicy) -> str:
    """The report page: notes, the Table 5 analogue, per (dataset, board) every strategy, the
    figures (embedded PNG) and the records."""
    title = "Preferred strategy per QoS requirement"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>{STYLE}</head><body>"]
    parts += [f"<h1>{title} (seed 004, Table 5 analogue)</h1>"]
    parts += [f"<p>{html.escape(n)}</p>" for n in notes(journals, policy)]
    if journals.skipped:
        items = "".join(f"<li>{html.escape(s)}</li>" for s in journals.skipped)
        parts.append(f"<p class='skipped'>Skipped:</p><ul class='skipped'>{items}</ul>")
    parts += ["<h2>Preferred strategy</h2>", table5(rs).to_html(index=False)]
    for r in rs:
        parts += [
            f"<h2>{html.escape(r.dataset)} on {html.escape(r.board)}</h2>",
            strategy_table(r).to_html(index=False),
        ]
    figures = figure_frame(rs)
    parts.append("<h2>Accuracy per strategy (Fig. 3 analogue)</h2>")
    acc = accuracy_figure(figures)
    parts.append(_img(acc, "accuracy per strategy") if acc else f"<p>No measured accuracy ({SYNTHETIC}).</p>")
    for dataset in sorted(figures["dataset"].unique()):
        parts += [
            f"<h2>Latency and energy: {html.escape(dataset)} (Figs. 4-5 analogue)</h2>",
            _img(cost_figure(figures, dataset), f"latency and energy per strategy: {dataset}"),
        ]
    parts += ["<h2>Records</h2>", records_table(journals).to_html(index=False), "</body></html>"]
    return redact_html("\n".join(parts))


def to_markdown(journals: Journals, rs: Sequence[Row], policy: QosPolicy) -> str:
    """The report's tables as Markdown (the figures are in the HTML)."""
    parts = [
        "# Preferred strategy per QoS requirement (seed 004, Table 5 analogue)",
        *notes(journals, policy),
    ]
    parts += [f"Skipped: {s}" for s in journals.skipped]
    parts += ["## Preferred strategy", markdown(table5(rs))]
    for r in rs:
        parts += [f"## {r.dataset} on {r.board}", markdown(strategy_table(r))]
    parts += ["## Records", markdown(records_table(journals)), "Figures: in the HTML report."]
    return redact_text("\n\n".join(parts) + "\n")


def build(journals: Iterable[Path], out: Path, policy: QosPolicy | None = None) -> tuple[Path, Path, Path]:
    """Write the report as `out` (HTML) and beside it `.md` and `.json`; returns the three paths."""
    policy = policy or QosPolicy()
    read = load(list(journals))
    rs = rows(read, policy)
    paths = (out.with_suffix(".html"), out.with_suffix(".md"), out.with_suffix(".json"))
    texts = (
        to_html(read, rs, policy),
        to_markdown(read, rs, policy),
        json.dumps(redact_env(to_json(read, rs, policy)), indent=2, ensure_ascii=False) + "\n",
    )
    for path, text in zip(paths, texts, strict=True):
        write_atomic(path, text)
    return paths


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path` and rename it over `path`."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:
        raise StrategiesReportError(f"{path}: cannot write: {exc.strerror or exc}") from None
