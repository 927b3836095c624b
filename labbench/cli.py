"""The `labbench` command line: lab inspection, the simulated lab, and (from their modules) the rest."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from labbench import firmware_image, gate_cli, inventory, measure_cli
from labbench.edge import cli as edge_cli
from labbench.errors import LabbenchError, LabConfigError, UsageError
from labbench.strategies import cli as strategies_cli

out = Console(width=None if sys.stdout.isatty() else 160)


def _lab_arg(parser: argparse.ArgumentParser, positional: bool = False) -> None:
    if positional:
        parser.add_argument(
            "lab", nargs="?", default="lab.yaml", type=Path, help="lab file (default lab.yaml)"
        )
    else:
        parser.add_argument("--lab", default="lab.yaml", type=Path, help="lab file (default lab.yaml)")


def _connection(board: inventory.BoardEntry) -> str:
    if board.ssh is not None:
        return f"ssh {board.ssh.user}@{board.ssh.host}:{board.ssh.port}"
    assert board.serial is not None  # lab.yaml gives a board exactly one of serial: and ssh:
    return f"{board.serial.url} @ {board.serial.baud}"


def _row(table: Table, *cells: str) -> None:
    """A row of lab.yaml values, shown as they are (never read as rich markup)."""
    table.add_row(*(Text(cell) for cell in cells))


def cmd_lab_check(args: argparse.Namespace) -> int:
    lab = inventory.load(args.lab, check_files=True)
    boards = Table(title=Text(f"{lab.name}: {len(lab.boards)} boards ({lab.path})"))
    for col in ("board", "family", "connection", "flash", "power", "link", "sim"):
        boards.add_column(col)
    for b in lab.boards.values():
        power = f"{b.power.instrument} ch{b.power.channel}" if b.power else "-"
        mode = f" [{b.power_mode}]" if b.power_mode else ""
        _row(
            boards,
            b.name,
            b.family + mode,
            _connection(b),
            b.flash.tool if b.flash else "ssh deploy",
            power,
            b.link.kind if b.link else "-",
            "sim" if b.simulated else "hw",
        )
    instruments = Table(title=f"{len(lab.instruments)} instruments")
    for col in ("instrument", "kind", "resource", "sim"):
        instruments.add_column(col)
    for i in lab.instruments.values():
        _row(instruments, i.name, i.kind, i.resource, "sim" if i.simulated else "hw")
    tables = [boards, instruments]
    if lab.servers:
        servers = Table(title=f"{len(lab.servers)} edge servers")
        for col in ("server", "address", "model", "sim"):
            servers.add_column(col)
        for e in lab.servers.values():
            model = e.model.name + ("" if e.model.is_file() or not e.simulated else " (missing: not started)")
            _row(servers, e.name, f"{e.host}:{e.port}", model, "sim" if e.simulated else "hw")
        tables.append(servers)
    out.print(*tables)
    budgets = sum(len(m) for m in lab.budgets.values())
    out.print(f"[green]valid[/green]: {escape(lab.path.name)} (sha256 {lab.sha256[:12]}), {budgets} budgets")
    return 0


def cmd_lab_list(args: argparse.Namespace) -> int:
    lab = inventory.load(args.lab, check_files=True)
    for b in lab.boards.values():
        print(f"{b.name}\t{b.family}\t{_connection(b)}")
    return 0


def cmd_sim(args: argparse.Namespace) -> int:
    from labbench.sim import lab as simlab

    lab = inventory.load(args.lab, check_files=args.action == "up")  # down and status, whatever is missing
    if args.action == "up":
        started = simlab.up(lab)
        out.print(
            f"simulated lab up (pid {started['pid']}): {len(started['boards'])} boards, "
            f"{len(started['instruments'])} instruments; state in {started['state_dir']}",
            markup=False,
        )
    elif args.action == "down":
        out.print("simulated lab stopped" if simlab.down(lab) else "simulated lab was not up")
    else:
        state = simlab.status(lab)
        if args.json:
            print(json.dumps(state or {"instruments": {}, "boards": {}}, indent=2))
        else:
            out.print("down" if state is None else json.dumps(state, indent=2), markup=False)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from labbench.report import dashboard

    journals = args.journals or sorted(Path("reports").glob("*.jsonl"))
    if not journals:
        raise UsageError("no journals given and none in reports/")
    out.print(f"dashboard: {dashboard.build(journals, args.out).resolve()}")
    return 0


def cmd_journal_check(args: argparse.Namespace) -> int:
    from labbench import results

    damaged = False
    for path in args.journals:
        health = results.check(_journal(path))
        print(health.summary())
        for number, why in health.damaged:
            print(f"  {path}:{number}: {why}")
        if not health.healthy:
            damaged = True
            print(f"  `labbench journal repair {path}` rewrites it without them (keeping a backup)")
    return 1 if damaged else 0


def cmd_journal_repair(args: argparse.Namespace) -> int:
    from labbench import results

    for path in args.journals:
        health, backup = results.repair(_journal(path))
        if backup is None:
            print(f"{path}: healthy, nothing to repair")
            continue
        lines = ", ".join(str(n) for n, _ in health.damaged)
        print(
            f"{path}: repaired: kept {health.valid + health.partial + health.events} records, "
            f"dropped the damaged part of line(s) {lines}; the original is in {backup}"
        )
    return 0


def _journal(path: Path) -> Path:
    if not path.is_file():
        raise UsageError(f"{path}: no such journal")
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="labbench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    lab = sub.add_parser("lab", help="inspect a lab inventory").add_subparsers(
        dest="lab_command", required=True
    )
    check = lab.add_parser("check", help="validate lab.yaml and print it")
    _lab_arg(check, positional=True)
    check.set_defaults(func=cmd_lab_check)
    listing = lab.add_parser("list", help="list the lab's boards")
    _lab_arg(listing, positional=True)
    listing.set_defaults(func=cmd_lab_list)

    sim = sub.add_parser("sim", help="the simulated lab")
    sim.add_argument("action", choices=["up", "down", "status"])
    sim.add_argument("--json", action="store_true", help="status as JSON")
    _lab_arg(sim)
    sim.set_defaults(func=cmd_sim)

    gate_cli.add_parsers(sub)
    measure_cli.add_parser(sub)
    firmware_image.add_parser(sub)
    edge_cli.add_parser(sub)
    strategies_cli.add_parser(sub)

    report = sub.add_parser("report", help="build the results dashboard from journals")
    report.add_argument("journals", nargs="*", type=Path, help="journals (default: reports/*.jsonl)")
    report.add_argument("--out", type=Path, default=Path("reports/index.html"))
    report.set_defaults(func=cmd_report)

    journal = sub.add_parser("journal", help="a results journal's health").add_subparsers(
        dest="journal_command", required=True
    )
    check = journal.add_parser(
        "check", help="count a journal's records and list its damaged lines (exit 0 healthy, 1 damaged)"
    )
    check.add_argument("journals", nargs="+", type=Path, metavar="JOURNAL")
    check.set_defaults(func=cmd_journal_check)
    repair = journal.add_parser(
        "repair", help="rewrite a journal without its damaged lines, keeping a backup (JOURNAL.bak-<time>)"
    )
    repair.add_argument("journals", nargs="+", type=Path, metavar="JOURNAL")
    repair.set_defaults(func=cmd_journal_repair)
    return parser


def _warning(message: Warning | str, category: type[Warning], *_: object, **__: object) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warning  # `journal.jsonl:7: skipped: ...`, without the source line
            command: Callable[[argparse.Namespace], int] = args.func
            return command(args)
    except (LabConfigError, UsageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except LabbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
