"""The results journal: append-only JSONL, one record per line, flushed and fsync'd as written.

Records are `Measurement`s (whole, or partial: what was measured before an infrastructure error)
and `Event`s (a failed attempt at a board step and its recovery, a board quarantined). A run killed
mid-way leaves every completed record on disk; `load()` skips a torn last line and turns journals
into a pandas DataFrame of measurements (nested fields flattened to `latency.p99_ms` etc.).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from labbench.measure.record import EVENT_KINDS, Event, Measurement

if TYPE_CHECKING:
    import pandas as pd


class Journal:
    """Appends records to a JSONL file; safe for several processes appending at once (O_APPEND)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, record: Measurement | Event) -> None:
        from labbench.redact import redact_env

        data = redact_env(json.loads(record.model_dump_json()))  # no credential reaches the journal
        line = (json.dumps(data, separators=(",", ":"), ensure_ascii=False) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one write per record: lines from concurrent writers never interleave
            os.fsync(fd)
        finally:
            os.close(fd)


def records(paths: str | Path | Iterable[str | Path]) -> Iterator[Measurement | Event]:
    """Every record of one or more journals, in file order; a torn final line is skipped with a warning."""
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        lines = Path(path).read_text().splitlines()
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                yield (Event if data.get("kind") in EVENT_KINDS else Measurement).model_validate(data)
            except ValueError:
                if n == len(lines):
                    warnings.warn(f"{path}:{n}: incomplete last record skipped (run interrupted?)")
                    continue
                raise


def read(paths: str | Path | Iterable[str | Path]) -> Iterator[Measurement]:
    """The measurements of the journals (partial ones included: see `Measurement.status`), in file order."""
    return (r for r in records(paths) if isinstance(r, Measurement))


def events(paths: str | Path | Iterable[str | Path]) -> list[Event]:
    """The attempt and quarantine records of the journals, in file order."""
    return [r for r in records(paths) if isinstance(r, Event)]


def load(paths: str | Path | Iterable[str | Path], include_partial: bool = False) -> pd.DataFrame:
    """Journals -> a DataFrame, one row per measurement, nested fields as dotted columns.

    Partial records (cut short by an infrastructure error) are left out unless `include_partial`;
    the `status` and `error` columns tell them apart."""
    import pandas as pd

    rows = [json.loads(m.model_dump_json()) for m in read(paths) if include_partial or m.status == "valid"]
    return pd.json_normalize(rows) if rows else pd.DataFrame()
