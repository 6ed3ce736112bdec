"""``python -m flannel serve [--host H] [--port P]``: run a Flannel node (FLANNEL_* settings)."""

from __future__ import annotations

import argparse
import sys

from chat import logs, loop
from flannel.config import FlannelSettings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flannel", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve clients, backed by the chat tier")
    serve.add_argument("--host", help="listen address (FLANNEL_HOST)")
    serve.add_argument("--port", type=int, help="listen port (FLANNEL_PORT)")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    settings = FlannelSettings(**overrides)
    logs.setup(settings.log_level, settings.log_format)
    from flannel.server import run

    return loop.serve(run(settings), "flannel")


if __name__ == "__main__":
    sys.exit(main())
