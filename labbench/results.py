"""The results journal: append-only JSONL, one `Measurement` per line, flushed and fsync'd as written.

A run killed mid-way leaves every completed measurement on disk; `load()` skips a torn last line
and turns journals into a pandas DataFrame (nested fields flattened to `latency.p99_ms` etc.).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import pandas as pd

from labbench.measure.record import Measurement


class Journal:
    """Appends measurements to a JSONL file; safe for several processes appending at once (O_APPEND)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, measurement: Measurement) -> None:
        line = (measurement.model_dump_json() + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one write per record: lines from concurrent writers never interleave
            os.fsync(fd)
        finally:
            os.close(fd)


def read(paths: str | Path | Iterable[str | Path]) -> Iterator[Measurement]:
    """Measurements from one or more journals, in file order; a torn final line is skipped with a warning."""
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        lines = Path(path).read_text().splitlines()
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                yield Measurement.model_validate_json(line)
            except ValueError:
                if n == len(lines):
                    warnings.warn(f"{path}:{n}: incomplete last record skipped (run interrupted?)")
                    continue
                raise


def load(paths: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """Journals -> a DataFrame, one row per measurement, nested fields as dotted columns."""
    records = [json.loads(m.model_dump_json()) for m in read(paths)]
    return pd.json_normalize(records) if records else pd.DataFrame()
