"""`labbench report`: journals -> reports/index.html with per-board tables and the frontier plots."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Iterable

import pandas as pd

from labbench import results
from labbench.report import plots

COLUMNS = {
    "model": "model", "config": "config", "latency.p50_ms": "p50 (ms)", "latency.p99_ms": "p99 (ms)",
    "energy.per_inference_mj": "energy (mJ/inf)", "energy.uncertainty_mj": "± (mJ)", "accuracy": "top-1",
    "memory.flash_bytes": "model (B)", "memory.arena_bytes": "arena (B)", "memory.peak_rss_kib": "peak RSS (KiB)",
    "cold_start_ms": "cold start (ms)", "provenance.source": "source", "provenance.model_sha256": "model sha256",
    "time_utc": "measured (UTC)",
}


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
        png = plots.frontier(list(group["config"].fillna(group["model"])), list(group["accuracy"]),
                             list(group["latency.p50_ms"]), list(memory_kib), f"{board}: {dataset}")
        out.append(f"<h3>{html.escape(board)}: {html.escape(dataset)} frontier</h3>{_img(png, 'frontier')}")
    return out


def build(journals: Iterable[str | Path], out: str | Path = "reports/index.html") -> Path:
    df = results.load(list(journals))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>labbench results</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#eee}</style>",
             "</head><body><h1>labbench results</h1>"]
    if df.empty:
        parts.append("<p>No measurements in the journals.</p>")
    else:
        df = latest(df)
        parts.append(f"<p>{len(df)} measurements (latest per board and model).</p>")
        for board, group in df.groupby("board"):
            cols = [c for c in COLUMNS if c in group.columns]
            table = group[cols].rename(columns=COLUMNS).to_html(index=False, float_format=lambda v: f"{v:.4g}",
                                                                na_rep="-")
            parts.append(f"<h2>{html.escape(board)}</h2>{table}")
        parts += frontier_sections(df)
    parts.append("</body></html>")
    out.write_text("\n".join(parts))
    return out
