"""`labbench edge-server`: the edge server (labbench.edge.server) in the foreground until Ctrl-C."""

from __future__ import annotations

import argparse
from pathlib import Path

from labbench.errors import UsageError


def cmd_edge_server(args: argparse.Namespace) -> int:
    from labbench.edge.server import EdgeServer

    if args.service_ms < 0:
        raise UsageError(f"--service-ms {args.service_ms}: a time is >= 0")
    if not args.model.is_file():
        raise UsageError(f"{args.model}: no such model file")
    try:
        server = EdgeServer(args.model, host=args.host, port=args.port, service_s=args.service_ms / 1e3)
    except OSError as exc:
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    host, port = server.address
    print(
        f"edge server on {host}:{port}: {args.model.name}, input {server.model.describe_input()} "
        "(Ctrl-C stops it)",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "edge-server", help="serve remote inference over TCP with a .tflite model (until Ctrl-C)"
    )
    p.add_argument("--model", required=True, type=Path, help="the server's model (.tflite ending in SOFTMAX)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="port to listen on (default 0: a free one)")
    p.add_argument(
        "--service-ms",
        type=float,
        default=0.0,
        help="least time per request, to stand in for a slower server (the seed paper's: 6.95)",
    )
    p.set_defaults(func=cmd_edge_server)
