"""Command line: ``chat serve`` runs a node; ``chat admin ...`` administers the store.

Settings come from ``CHAT_*`` environment variables (see :mod:`chat.config`); flags override
the listen address. Admin commands print JSON on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from chat import logs, loop
from chat.admin import Admin
from chat.config import Settings
from chat.errors import ChatError
from chat.storage import migrate, open_database


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chat", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run a chat node")
    serve.add_argument("--host", help="listen address (overrides CHAT_HOST)")
    serve.add_argument("--port", type=int, help="listen port (overrides CHAT_PORT)")
    serve.add_argument(
        "--demo",
        action="store_true",
        help='seed a workspace "demo" (unless it exists) with people, channels and messages, '
        "and print how to sign in",
    )

    admin = sub.add_parser(
        "admin",
        help="administer workspaces, users, channels, tokens",
        description="Administer the store named by the CHAT_* settings; each command prints "
        "its result as one JSON object (errors go to stderr, exit status 1).",
    )
    a = admin.add_subparsers(dest="action", required=True, metavar="COMMAND")
    a.add_parser("migrate", help="apply pending schema migrations (start-up does it too)")
    ws = a.add_parser("create-workspace", help="create a workspace; prints its id")
    ws.add_argument("name", help="the workspace's name, used by `login`")
    u = a.add_parser(
        "create-user", help="create a user in a workspace; prints the user and a token"
    )
    u.add_argument("--workspace", required=True, help="the workspace's name")
    u.add_argument("--handle", required=True, help="unique in the workspace")
    u.add_argument("--display-name", help="defaults to the handle")
    u.add_argument("--real-name", default="")
    u.add_argument("--role", choices=["owner", "admin", "member", "guest"], default="member")
    u.add_argument("--password", help="enables login with this password (argon2id-hashed)")
    c = a.add_parser("create-channel", help="create a channel with its members; prints the channel")
    c.add_argument("--workspace", required=True, help="the workspace's name")
    c.add_argument("--name", required=True, help="1-80 of a-z, 0-9, '-', '_'")
    c.add_argument("--creator", required=True, help="creator's handle")
    c.add_argument("--members", default="", help="comma-separated handles")
    c.add_argument("--private", action="store_true", help="a private channel (default public)")
    t = a.add_parser("token", help="issue a token (a new session) for an active user")
    t.add_argument("--workspace", required=True, help="the workspace's name")
    t.add_argument("--handle", required=True, help="the user's handle")
    s = a.add_parser(
        "seed",
        help="create a synthetic workspace (users, channels) for demos and load tests; prints "
        "the users with their tokens",
    )
    s.add_argument("--workspace", required=True, help="name of the workspace to create")
    s.add_argument("--users", type=int, default=100, help="how many users (default 100)")
    s.add_argument("--channels", type=int, default=5, help="how many channels (default 5)")
    s.add_argument("--seed", type=int, default=1, help="random seed: same seed, same workspace")
    s.add_argument("--no-tokens", action="store_true", help="do not issue tokens (faster)")

    cluster = sub.add_parser("cluster", help="run the whole cluster locally (chat.cluster)")
    cl = cluster.add_subparsers(dest="action", required=True, metavar="COMMAND")
    up = cl.add_parser(
        "up",
        help="start PostgreSQL, Redis, chat and Flannel nodes and HAProxy as local processes "
        "on free loopback ports; Ctrl-C stops them all",
    )
    up.add_argument("--chat", type=int, default=2, help="chat nodes (default 2)")
    up.add_argument("--flannel", type=int, default=2, help="Flannel nodes (default 2)")
    up.add_argument(
        "--dir",
        type=Path,
        help="keep the database, secrets and logs here; the next run with this --dir "
        "continues with them (default: a temp dir, deleted)",
    )
    up.add_argument("--seed", action="store_true", help="create a workspace; print tokens")
    sub.add_parser(
        "loadtest",
        help="load tests over the local cluster: chatter, hot, storm, monday (chat.cluster."
        "loadtest; chat loadtest --help)",
        add_help=False,
    )
    return p


async def _admin(settings: Settings, args: argparse.Namespace) -> Any:
    if args.action == "migrate":
        db = await open_database(settings.database_url, settings.sqlite_path)
        try:
            return {"applied": await migrate(db)}
        finally:
            await db.close()
    admin = await Admin.open(settings)
    try:
        action: Callable[[], Awaitable[Any]] = {
            "create-workspace": lambda: _create_workspace(admin, args),
            "create-user": lambda: _create_user(admin, args),
            "create-channel": lambda: _create_channel(admin, args),
            "token": lambda: _token(admin, args),
            "seed": lambda: admin.seed(
                args.workspace, args.users, args.channels, seed=args.seed, tokens=not args.no_tokens
            ),
        }[args.action]
        return await action()
    finally:
        await admin.close()


async def _create_workspace(admin: Admin, args: argparse.Namespace) -> Any:
    return {"workspace_id": await admin.create_workspace(args.name), "name": args.name}


async def _user_id(admin: Admin, wid: int, handle: str) -> int:
    from chat.storage import queries

    async with admin.db.connection() as conn:
        ids = await queries.user_ids_by_handles(conn, wid, [handle])
    if handle not in ids:
        raise SystemExit(f"no active user {handle!r}")
    return ids[handle]


async def _create_user(admin: Admin, args: argparse.Namespace) -> Any:
    wid = await admin.workspace_id(args.workspace)
    spec = {
        "handle": args.handle,
        "display_name": args.display_name or args.handle,
        "real_name": args.real_name,
        "role": args.role,
        "password": args.password,
    }
    (user,) = await admin.create_users(wid, [spec])
    return {"user": user.model_dump(), "token": await admin.issue_token(user.id)}


async def _create_channel(admin: Admin, args: argparse.Namespace) -> Any:
    wid = await admin.workspace_id(args.workspace)
    creator = await _user_id(admin, wid, args.creator)
    members = [await _user_id(admin, wid, h) for h in args.members.split(",") if h]
    channel = await admin.create_channel(wid, args.name, creator, members, args.private)
    return {"channel": channel.model_dump()}


async def _token(admin: Admin, args: argparse.Namespace) -> Any:
    wid = await admin.workspace_id(args.workspace)
    return {"token": await admin.issue_token(await _user_id(admin, wid, args.handle))}


def main(argv: list[str] | None = None) -> int:
    rest = sys.argv[1:] if argv is None else argv
    if rest[:1] == ["loadtest"]:  # its own parser
        from chat.cluster.loadtest import main as loadtest

        return loadtest(rest[1:])
    args = _parser().parse_args(argv)
    if args.command == "cluster":
        from chat.cluster.launcher import up
        from chat.cluster.topology import Topology

        topology = Topology(n_chat=args.chat, n_flannel=args.flannel)
        return asyncio.run(up(topology, args.dir, args.seed))
    overrides = {
        k: v
        for k, v in (("host", getattr(args, "host", None)), ("port", getattr(args, "port", None)))
        if v is not None
    }
    settings = Settings(**overrides)
    logs.setup(settings.log_level, settings.log_format)
    if args.command == "serve":
        from chat.server import run

        return loop.serve(run(settings, demo=args.demo), "chat")
    try:
        result = asyncio.run(_admin(settings, args))
    except ChatError as exc:
        print(json.dumps({"error": exc.code.value, "message": exc.message}), file=sys.stderr)
        return 1
    json.dump(result, sys.stdout, default=str)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
