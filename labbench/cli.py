"""The `labbench` command line: lab inspection, the simulated lab, and (from their modules) the rest."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from labbench import firmware_image, gate_cli, inventory
from labbench.errors import LabbenchError, LabConfigError, UsageError

out = Console(width=None if sys.stdout.isatty() else 160)


def _lab_arg(parser: argparse.ArgumentParser, positional: bool = False) -> None:
    if positional:
        parser.add_argument("lab", nargs="?", default="lab.yaml", type=Path, help="lab file (default lab.yaml)")
    else:
        parser.add_argument("--lab", default="lab.yaml", type=Path, help="lab file (default lab.yaml)")


def _connection(board: inventory.BoardEntry) -> str:
    if board.serial:
        return f"{board.serial.url} @ {board.serial.baud}"
    return f"ssh {board.ssh.user}@{board.ssh.host}:{board.ssh.port}"


def cmd_lab_check(args: argparse.Namespace) -> int:
    lab = inventory.load(args.lab)
    boards = Table(title=f"{lab.name}: {len(lab.boards)} boards ({lab.path})")
    for col in ("board", "family", "connection", "flash", "power", "sim"):
        boards.add_column(col)
    for b in lab.boards.values():
        power = f"{b.power.instrument} ch{b.power.channel}" if b.power else "-"
        mode = f" [{b.power_mode}]" if b.power_mode else ""
        boards.add_row(b.name, b.family + mode, _connection(b), b.flash.tool if b.flash else "ssh deploy",
                       power, "sim" if b.simulated else "hw")
    instruments = Table(title=f"{len(lab.instruments)} instruments")
    for col in ("instrument", "kind", "resource", "sim"):
        instruments.add_column(col)
    for i in lab.instruments.values():
        instruments.add_row(i.name, i.kind, i.resource, "sim" if i.simulated else "hw")
    out.print(boards, instruments)
    budgets = sum(len(m) for m in lab.budgets.values())
    out.print(f"[green]valid[/green]: {lab.path.name} (sha256 {lab.sha256[:12]}), {budgets} budgets")
    return 0


def cmd_lab_list(args: argparse.Namespace) -> int:
    lab = inventory.load(args.lab)
    for b in lab.boards.values():
        print(f"{b.name}\t{b.family}\t{_connection(b)}")
    return 0


def cmd_sim(args: argparse.Namespace) -> int:
    from labbench.sim import lab as simlab

    lab = inventory.load(args.lab)
    if args.action == "up":
        state = simlab.up(lab)
        out.print(f"simulated lab up (pid {state['pid']}): {len(state['boards'])} boards, "
                  f"{len(state['instruments'])} instruments; state in {state['state_dir']}")
    elif args.action == "down":
        out.print("simulated lab stopped" if simlab.down(lab) else "simulated lab was not up")
    else:
        state = simlab.status(lab)
        if args.json:
            print(json.dumps(state or {"instruments": {}, "boards": {}}, indent=2))
        else:
            out.print("down" if state is None else json.dumps(state, indent=2))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from labbench.report import dashboard

    journals = args.journals or sorted(Path("reports").glob("*.jsonl"))
    if not journals:
        raise UsageError("no journals given and none in reports/")
    out.print(f"dashboard: {dashboard.build(journals, args.out).resolve()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="labbench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    lab = sub.add_parser("lab", help="inspect a lab inventory").add_subparsers(dest="lab_command", required=True)
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
    firmware_image.add_parser(sub)

    report = sub.add_parser("report", help="build the results dashboard from journals")
    report.add_argument("journals", nargs="*", type=Path, help="journals (default: reports/*.jsonl)")
    report.add_argument("--out", type=Path, default=Path("reports/index.html"))
    report.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (LabConfigError, UsageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except LabbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
