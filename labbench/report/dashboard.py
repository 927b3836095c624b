"""`labbench report`: journals -> reports/index.html with per-board tables, partial records and
infrastructure faults, and the frontier plots."""

from __future__ import annotations

import base64
import html
import warnings
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from labbench import results
from labbench.measure.record import Event, Measurement
from labbench.metrics import METRICS
from labbench.redact import redact_html
from labbench.report import plots

#: the table of a board: what was measured, every metric of labbench.metrics, then where it came from
IDENTITY = {"model": "model", "config": "config"}
PROVENANCE = {
    "energy.uncertainty_mj": "energy ± (mJ)",
    "provenance.source": "source",
    "provenance.model_sha256": "model sha256",
    "time_utc": "measured (UTC)",
}


def with_metrics(df: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, str]]:
    """`df` with a column per metric of labbench.metrics (in its unit), and the table's columns."""
    found = {name: m for name, m in METRICS.items() if m.path in df.columns}
    df = df.assign(**{name: df[m.path] * m.scale for name, m in found.items()})
    return df, {**IDENTITY, **{name: m.heading for name, m in found.items()}, **PROVENANCE}


def latest(df: pd.DataFrame) -> pd.DataFrame:
    """The last measurement of each (board, model): a journal accumulates runs."""
    return df.sort_values("time_utc").groupby(["board", "model"], as_index=False).tail(1)


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def frontier_sections(df: pd.DataFrame) -> list[str]:
    """One frontier plot per (board, dataset) that has at least two configurations measured."""
    out = []
    df = df.dropna(subset=["accuracy", "latency.p50_ms"])
    df = df.assign(dataset=df["model"].str.split("_").str[0])
    for (board, dataset), group in df.groupby(["board", "dataset"]):
        if len(group) < 2:
            continue
        memory_kib = (group["memory.flash_bytes"].fillna(0) + group["memory.arena_bytes"].fillna(0)) / 1024
        png = plots.frontier(
            list(group["config"].fillna(group["model"])),
            list(group["accuracy"]),
            list(group["latency.p50_ms"]),
            list(memory_kib),
            f"{board}: {dataset}",
        )
        out.append(
            f"<h3>{html.escape(str(board))}: {html.escape(str(dataset))} frontier</h3>{_img(png, 'frontier')}"
        )
    return out


PARTIAL_COLUMNS = {
    "model": "model",
    "error": "error",
    "extra.partial.failed_phase": "failed in",
    "latency.p50_ms": "p50 (ms)",
    "energy.per_inference_mj": "energy (mJ/inf)",
    "accuracy": "top-1",
    "time_utc": "measured (UTC)",
}


def _table(df: pd.DataFrame, columns: dict[str, str]) -> str:
    cols = [c for c in columns if c in df.columns]
    return (
        df[cols].rename(columns=columns).to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-")
    )


def _faults(events: list[Event]) -> str:
    """A board's quarantines and failed or retried attempts, from the journal's events."""
    rows = []
    for e in events:
        what = "QUARANTINED" if e.kind == "quarantine" else f"attempt {e.attempt} of {e.attempts}"
        rows.append(
            f"<tr><td>{html.escape(e.time_utc)}</td><td>{html.escape(e.test or '-')}</td>"
            f"<td>{html.escape(e.step)}</td><td>{what}</td><td>{html.escape(e.error or 'passed')}</td>"
            f"<td>{html.escape(e.recovery or '-')}</td></tr>"
        )
    return (
        "<table><tr><th>time (UTC)</th><th>test</th><th>step</th><th>event</th><th>error</th>"
        f"<th>recovery</th></tr>{''.join(rows)}</table>"
    )


def build(journals: Iterable[str | Path], out: str | Path = "reports/index.html") -> Path:
    """The HTML report: per board, the latest valid measurement of each model, then its partial
    records (marked, never judged) and its infrastructure faults (attempts, quarantines). Damaged
    journal lines are skipped with a warning each, and listed at the top. Credentials are masked
    (labbench.redact), also those of journals written before the bench masked them."""
    journals = list(journals)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", results.JournalWarning)
        records = list(results.records(journals))
    for w in caught:  # shown to the caller as well as in the report
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    skipped = [str(w.message) for w in caught if issubclass(w.category, results.JournalWarning)]
    df = results.frame(r for r in records if isinstance(r, Measurement))
    events = [r for r in records if isinstance(r, Event)]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>labbench results</title>",
        (
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
            "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#eee}"
            ".partial{color:#c33}</style>"
        ),
        "</head><body><h1>labbench results</h1>",
    ]
    if skipped:
        parts.append(
            f"<p class='partial'>{len(skipped)} damaged journal lines skipped "
            "(<code>labbench journal check</code> lists them, <code>labbench journal repair</code> "
            "removes them):</p><ul class='partial'>"
            + "".join(f"<li>{html.escape(s)}</li>" for s in skipped)
            + "</ul>"
        )
    if df.empty and not events:
        parts.append("<p>No measurements in the journals.</p>")
    else:
        valid = latest(df[df["status"] == "valid"]) if not df.empty else df
        partial = df[df["status"] == "partial"] if not df.empty else df
        parts.append(
            f"<p>{len(valid)} measurements (latest per board and model), {len(partial)} partial "
            f"records, {sum(e.kind == 'quarantine' for e in events)} quarantines.</p>"
        )
        for board in sorted(set(df["board"] if not df.empty else []) | {e.board for e in events}):
            parts.append(f"<h2>{html.escape(board)}</h2>")
            if not (group := valid[valid["board"] == board] if not valid.empty else valid).empty:
                parts.append(_table(*with_metrics(group)))
            if not (group := partial[partial["board"] == board] if not partial.empty else partial).empty:
                parts.append(
                    "<h3 class='partial'>partial records: cut short by an infrastructure error, "
                    f"never judged</h3>{_table(group, PARTIAL_COLUMNS)}"
                )
            if faults := [e for e in events if e.board == board]:
                parts.append(f"<h3 class='partial'>infrastructure faults</h3>{_faults(faults)}")
        if not valid.empty:
            parts += frontier_sections(valid)
    parts.append("</body></html>")
    out.write_text(redact_html("\n".join(parts)))
    return out
