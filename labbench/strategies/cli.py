"""`labbench strategies`: journals -> the preferred strategy per QoS requirement (the seed paper's
Table 5 analogue) with its figures, as HTML, Markdown and JSON (labbench.strategies.report)."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_strategies(args: argparse.Namespace) -> int:
    from labbench.strategies import report

    default_sota, per_dataset = report.parse_sota(args.sota_accuracy) if args.sota_accuracy else (None, {})
    policy = report.QosPolicy(
        sota_accuracy=per_dataset,
        default_sota=1.0 if default_sota is None else default_sota,
        margin=report.parse_number(args.margin, "--margin", low=0.0, high=1.0),
        offload_share=report.parse_number(args.offload_share, "--offload-share", low=0.0),
        given=report.parse_qos(args.qos) if args.qos else {},
    )
    html, md, data = report.build(args.journals, args.out, policy)
    print(f"strategies report: {html.resolve()} (and {md.name}, {data.name} beside it)")
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "strategies",
        help="the preferred strategy per QoS requirement (seed 004 Table 5) from journals, as HTML, .md, .json",
    )
    p.add_argument("journals", nargs="+", type=Path, metavar="JOURNAL")
    p.add_argument(
        "--qos",
        metavar="accuracy=A,lpi_ms=L,epi_mj=E",
        help="fixed requirements in place of §3.3's (any of the three; accuracy a share 0..1)",
    )
    p.add_argument(
        "--sota-accuracy",
        metavar="[DATASET=]X,...",
        help="state-of-the-art accuracy, per dataset or for all (default 1.0: a 90 %% requirement)",
    )
    p.add_argument("--margin", default="0.10", help="accuracy requirement below SOTA (default 0.10)")
    p.add_argument(
        "--offload-share", default="0.5", help="LPI and EPI limits as a share of one offload's (default 0.5)"
    )
    p.add_argument("--out", type=Path, default=Path("reports/strategies.html"), help="the HTML report")
    p.set_defaults(func=cmd_strategies)
