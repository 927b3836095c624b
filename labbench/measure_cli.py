"""`labbench measure MODEL --board esp32 [--board rpi4 ...]`: how a model does on the lab's boards,
without pytest.

It runs the HIL suites' orchestration (`labbench.bench`: install once, then latency, energy under a
power capture, accuracy when a dataset is given), journals each measurement (a partial record when a
board fails part way) and prints one table. Pre-flight checks the journal and the boards first; a
simulated lab is brought up when a selected board is simulated and it is not up, and taken down after.
A board that fails is reported (its typed error, naming the log) and the next board is measured; the
exit code is 0 when every board was measured, 1 otherwise, 2 for a usage or lab problem.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table
from rich.text import Text

from labbench import inventory
from labbench.errors import BoardBusy, HardwareError, UsageError

if TYPE_CHECKING:
    from labbench.bench import Bench
    from labbench.board import Board
    from labbench.measure.record import Measurement
    from labbench.payloads import Payload
    from labbench.results import Journal


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from labbench.measure.run import RunSettings

    p = sub.add_parser(
        "measure", help="measure a model on the lab's boards (latency, energy, accuracy, memory)"
    )
    p.add_argument(
        "model", help="a .tflite file, or the name of a payload of the HIL suites (e.g. digits_mlp_int8)"
    )
    p.add_argument(
        "--dataset", type=Path, help="an .npz with x_test and y_test, for accuracy (a payload brings its own)"
    )
    p.add_argument(
        "--board",
        action="append",
        required=True,
        metavar="NAME",
        help="board to measure on (repeatable); 'all' selects every board of the lab",
    )
    p.add_argument("--lab", default="lab.yaml", type=Path, help="lab file (default lab.yaml)")
    p.add_argument(
        "--journal",
        type=Path,
        default=Path("reports/journal.jsonl"),
        help="results journal to append the measurements to (default reports/journal.jsonl)",
    )
    group = p.add_argument_group("measurement settings")
    for option, name, kind, default, text in RunSettings.options():
        group.add_argument(option, dest=name, type=kind, default=default, help=text)
    p.set_defaults(func=cmd_measure)


def payload_of(model: str, dataset: Path | None) -> Payload:
    """A payload by its suite name, or a model file (with `dataset`, if given)."""
    from labbench.payloads import Payload, all_payloads

    path = Path(model)
    if not path.suffix:
        known = all_payloads()
        if model not in known:
            raise UsageError(f"{model}: neither a model file nor a payload ({', '.join(known)})")
        found = known[model]
        return found if dataset is None else Payload(found.name, found.path, found.config, dataset)
    if not path.is_file():
        raise UsageError(f"{model}: no such model file")
    if dataset is not None and not dataset.is_file():
        raise UsageError(f"--dataset {dataset}: no such file")
    return Payload(path.stem, path.resolve(), dataset=dataset.resolve() if dataset else None)


def cmd_measure(args: argparse.Namespace) -> int:
    from labbench import preflight
    from labbench.bench import Bench
    from labbench.board import Board
    from labbench.measure.run import RunSettings
    from labbench.results import Journal

    settings = RunSettings.from_options(lambda name: getattr(args, name))
    lab = inventory.load(args.lab, check_files=True)
    selected = list(lab.boards) if "all" in args.board else list(dict.fromkeys(args.board))
    if missing := [n for n in selected if n not in lab.boards]:
        raise UsageError(
            f"--board {missing[0]}: no such board in {lab.path} (boards: {', '.join(lab.boards)})"
        )
    payload = payload_of(args.model, args.dataset)
    out = Console(stderr=True)
    journal = Journal(args.journal)
    bench = Bench(settings, say=lambda line: out.print(Text(line), style="cyan"))
    rows: list[tuple[str, Measurement | None, str]] = []
    with _sim_lab(lab, selected):
        checked = preflight.check([("journal", args.journal)], lab, selected)
        if checked.problems:
            raise UsageError(
                "pre-flight found problems before any board was touched:\n"
                + "\n".join(f"  {p}" for p in checked.problems)
            )
        for name in selected:
            rows.append(_measure_one(bench, Board(lab, name), payload, journal))
    Console(width=None if sys.stdout.isatty() else 160).print(_table(payload, rows))
    print(f"results journal: {args.journal.resolve()}")
    return 0 if all(status == "measured" for _, _, status in rows) else 1


def _measure_one(
    bench: Bench, board: Board, payload: Payload, journal: Journal
) -> tuple[str, Measurement | None, str]:
    """(board, its measurement or partial record, what happened), the record journalled."""
    from labbench.bench import NotDeployable
    from labbench.measure.record import Measurement

    try:
        with board:
            outcome = bench.measure(board, payload)
    except NotDeployable as exc:
        return board.name, None, f"skipped: {exc}"
    except (HardwareError, BoardBusy) as exc:
        partial = getattr(exc, "partial", None)
        partial = partial if isinstance(partial, Measurement) else None
        if partial is not None:
            journal.append(partial)
        return board.name, partial, f"ERROR {type(exc).__name__}: {exc}"
    assert outcome.measurement is not None
    journal.append(outcome.measurement)
    return board.name, outcome.measurement, "measured"


class _sim_lab:
    """The simulated lab up for the selected boards, if it is not already (and down after, if so)."""

    def __init__(self, lab: inventory.Lab, selected: list[str]):
        self.lab, self.wanted, self.started = lab, any(lab.boards[n].simulated for n in selected), False

    def __enter__(self) -> None:
        if self.wanted:
            from labbench.sim import lab as simlab

            self.started = simlab.status(self.lab) is None
            if self.started:
                simlab.up(self.lab)

    def __exit__(self, *exc: object) -> None:
        if self.started:
            from labbench.sim import lab as simlab

            simlab.down(self.lab)


def _table(payload: Payload, rows: list[tuple[str, Measurement | None, str]]) -> Table:
    table = Table(title=Text(f"{payload.name} ({payload.info.sha256[:12]})"))
    for column in (
        "board",
        "p50 ms",
        "p99 ms",
        "energy mJ/inf",
        "accuracy",
        "arena KiB",
        "cold start ms",
        "status",
    ):
        table.add_column(column, justify="left" if column in ("board", "status") else "right")
    for name, m, status in rows:
        lat, e = (m.latency, m.energy) if m else (None, None)
        table.add_row(
            Text(name),
            f"{lat.p50_ms:.4g}" if lat else "-",
            f"{lat.p99_ms:.4g}" if lat else "-",
            f"{e.per_inference_mj:.4g} ± {e.uncertainty_mj:.2g}" if e else "-",
            f"{m.accuracy:.4f} (n={m.accuracy_n})" if m and m.accuracy is not None else "-",
            f"{m.memory.arena_bytes / 1024:.1f}" if m and m.memory.arena_bytes is not None else "-",
            f"{m.cold_start_ms:.1f}" if m and m.cold_start_ms is not None else "-",
            Text(status if m is None or m.status == "valid" else f"{status} (partial record journalled)"),
        )
    return table
