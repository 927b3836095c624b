"""`labbench baseline save` and `labbench gate`: the release gate's command line (see labbench.gate).

`labbench gate` prints the Markdown summary and exits with the gate's code: 0 pass, 1 budget failure
or regression, 2 data missing or incomplete (also for an unknown baseline or a bad lab.yaml).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from labbench import inventory
from labbench.errors import LabConfigError, UsageError
from labbench.gate import BASELINE_DIR, IncompleteData, Tolerance, gate, save_baseline

_PERCENTS = ("latency_pct", "energy_pct", "memory_pct")


def parse_tolerance(items: list[str]) -> Tolerance:
    """`5` sets every percentage tolerance (latency, energy, memory); `KEY=VALUE` sets one Tolerance field."""
    values: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            if sep:
                values[key.strip()] = float(value)
            else:
                values.update(dict.fromkeys(_PERCENTS, float(item.rstrip("%"))))
        except ValueError:
            raise UsageError(
                f"--tolerance {item}: expected a percentage or KEY=VALUE "
                f"({', '.join(Tolerance.model_fields)})"
            ) from None
    try:
        return Tolerance(**values)
    except ValidationError as exc:
        problems = "; ".join(f"{e['loc'][0]}: {e['msg']}" for e in exc.errors())
        raise UsageError(f"--tolerance: {problems} (fields: {', '.join(Tolerance.model_fields)})") from None


def cmd_baseline_save(args: argparse.Namespace) -> int:
    try:
        path = save_baseline(args.journals, args.name, args.dir)
    except (IncompleteData, UsageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"baseline {args.name} written to {path}")
    return 0


def cmd_gate(args: argparse.Namespace) -> int:
    path = args.lab if args.lab is not None else (Path("lab.yaml") if Path("lab.yaml").is_file() else None)
    try:
        lab = inventory.load(path, check_files=True) if path is not None else None  # as `lab check` does
        result = gate(
            args.journals,
            lab=lab,
            baseline=args.baseline,
            tolerance=parse_tolerance(args.tolerance),
            boards=args.board,
        )
    except (UsageError, LabConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result.markdown())
    result.write(args.markdown, args.json)
    return result.exit_code


def add_parsers(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `baseline save` and `gate` to the `labbench` command's subparsers."""
    baseline = subparsers.add_parser("baseline", help="release baselines").add_subparsers(
        dest="baseline_command", required=True
    )
    save = baseline.add_parser("save", help="save the latest measurement of each board and model")
    save.add_argument("journals", nargs="+", type=Path, metavar="JOURNAL")
    save.add_argument("--name", required=True, help="baseline name: writes DIR/NAME.json")
    save.add_argument("--dir", type=Path, default=BASELINE_DIR, help=f"folder (default {BASELINE_DIR})")
    save.set_defaults(func=cmd_baseline_save)

    check = subparsers.add_parser("gate", help="judge journals against budgets and a baseline (exit 0/1/2)")
    check.add_argument("journals", nargs="+", type=Path, metavar="JOURNAL")
    check.add_argument("--baseline", metavar="NAME|PATH", help=f"a baseline file or a name in {BASELINE_DIR}")
    check.add_argument(
        "--tolerance",
        action="append",
        default=[],
        metavar="PCT|KEY=VALUE",
        help="5 sets latency, energy and memory to 5%%; or one of "
        f"{', '.join(Tolerance.model_fields)} (repeatable)",
    )
    check.add_argument("--lab", type=Path, help="lab.yaml with the budgets (default: ./lab.yaml if present)")
    check.add_argument("--board", action="append", metavar="NAME", help="gate only this board (repeatable)")
    check.add_argument("--markdown", type=Path, metavar="PATH", help="write the Markdown summary here too")
    check.add_argument("--json", type=Path, metavar="PATH", help="write the result as JSON here")
    check.set_defaults(func=cmd_gate)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="labbench", description=__doc__)
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    command: Callable[[argparse.Namespace], int] = args.func
    return command(args)


if __name__ == "__main__":
    sys.exit(main())
