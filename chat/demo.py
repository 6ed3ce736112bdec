"""``chat serve --demo``: a living workspace in one command, and the lines that invite people in.

:func:`prepare` (before the node starts) creates the workspace ``demo`` with a few people who
can sign in, and its channels, through :class:`chat.admin.Admin`; :func:`converse` (once the
node listens) has them talk over the protocol itself, like any client: messages with
mentions, a thread, reactions, a DM. A database that has the workspace already is left as it
is. :func:`banner` is what ``chat serve`` prints: the URL, and the demo's sign-in details.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from chat.admin import Admin
from chat.client import Client
from chat.config import Settings

WORKSPACE = "demo"


@dataclass(frozen=True, slots=True)
class Person:
    handle: str
    name: str
    role: str

    @property
    def password(self) -> str:
        return f"{self.handle}-demo-pw"  # printed for all to see: a demo, not a secret


PEOPLE = [
    Person("ada", "Ada Lovelace", "owner"),
    Person("grace", "Grace Hopper", "admin"),
    Person("alan", "Alan Turing", "member"),
    Person("barbara", "Barbara Liskov", "member"),
    Person("linus", "Linus Torvalds", "member"),
    Person("margaret", "Margaret Hamilton", "guest"),
]
_EVERYONE = [p.handle for p in PEOPLE]
# name -> (private, members)
CHANNELS: dict[str, tuple[bool, list[str]]] = {
    "general": (False, _EVERYONE),
    "random": (False, ["ada", "grace", "alan", "barbara", "linus"]),
    "engineering": (False, ["ada", "grace", "alan", "linus"]),
    "design-review": (True, ["ada", "grace", "barbara"]),
}


async def prepare(settings: Settings) -> dict[str, str] | None:
    """Create the demo workspace; tokens of its people (to talk with), or None when the
    database has the workspace already."""
    admin = await Admin.open(settings)
    try:
        if await _exists(admin):
            return None
        wid = await admin.create_workspace(WORKSPACE)
        specs = [
            {
                "handle": p.handle,
                "display_name": p.name.split()[0],
                "real_name": p.name,
                "role": p.role,
                "password": p.password,
            }
            for p in PEOPLE
        ]
        ids = {u.handle: u.id for u in await admin.create_users(wid, specs)}
        for name, (private, members) in CHANNELS.items():
            await admin.create_channel(
                wid, name, ids["ada"], [ids[h] for h in members], private=private
            )
        return {h: await admin.issue_token(i) for h, i in ids.items()}
    finally:
        await admin.close()


async def _exists(admin: Admin) -> bool:
    from chat.errors import ChatError

    try:
        await admin.workspace_id(WORKSPACE)
    except ChatError:
        return False
    return True


async def converse(url: str, tokens: dict[str, str]) -> None:
    """A morning in the demo workspace, through the protocol."""
    async with _people(url, tokens) as c:
        channels = {
            ch["name"]: ch["id"]
            for ch in (await c["ada"].request("channels.list", member_only=True))["channels"]
        }
        general, random, eng = channels["general"], channels["random"], channels["engineering"]
        design = channels["design-review"]
        await c["ada"].post(general, "Welcome to the demo workspace, everyone!")
        await c["grace"].post(general, "Morning! Coffee is on me today.")
        hello = await c["alan"].post(general, "Has anyone seen the new build? @linus")
        await c["linus"].post(general, "It compiles. Ship it.")
        await c["barbara"].post(general, "@here design review at 3pm in #design-review")
        await c["margaret"].post(general, "Thanks for having me as a guest :)")
        root = await c["grace"].post(
            eng, "Proposal: we move the nightly job to 02:00 UTC. Thoughts in the thread?"
        )
        root_id = root["message"]["id"]
        await c["alan"].post(eng, "Fine by me.", thread_root_id=root_id)
        await c["linus"].post(
            eng, "As long as it is not during my backups.", thread_root_id=root_id
        )
        await c["grace"].post(eng, "Done: 02:00 it is.", thread_root_id=root_id)
        await c["ada"].post(eng, "Release notes are drafted; @grace please review.")
        await c["alan"].post(random, "Fun fact: the first computer bug was an actual moth.")
        await c["grace"].post(random, "I can confirm. I taped it into the logbook.")
        await c["barbara"].post(design, "Mockups for the new sidebar are up.")
        for who, emoji in [("ada", "tada"), ("grace", "+1"), ("barbara", "+1")]:
            await c[who].request("reactions.add", message_id=hello["message"]["id"], emoji=emoji)
        await c["linus"].request("reactions.add", message_id=root_id, emoji="eyes")
        dm = await c["ada"].request("dms.open", user_ids=[_user_id(c["grace"])])
        dm_id = dm["channel"]["id"]
        await c["ada"].post(dm_id, "Grace, can you take the 3pm review if I run late?")
        await c["grace"].post(dm_id, "Sure thing.")
        await c["grace"].post(dm_id, "Also: the release notes look good, two small comments.")
        await c["alan"].post(general, "Lunch at noon? The usual place.")
        await c["grace"].post(general, "Count me in.")


def _user_id(client: Client) -> int:
    return int(client.session["user"]["id"])


@contextlib.asynccontextmanager
async def _people(url: str, tokens: dict[str, str]) -> AsyncIterator[dict[str, Client]]:
    async with contextlib.AsyncExitStack() as stack:
        clients = {
            h: await stack.enter_async_context(Client.connect(url, t)) for h, t in tokens.items()
        }
        yield clients


def banner(url: str, *, setup_required: bool, demo: bool) -> str:
    """What ``chat serve`` prints once it listens."""
    if setup_required:
        return f"chat: open {url} to create your workspace"
    lines = [f"chat: open {url}"]
    if demo:
        lines.append(f'chat: sign in to workspace "{WORKSPACE}" as any of (handle, password):')
        width = max(len(p.handle) for p in PEOPLE)
        pw_width = max(len(p.password) for p in PEOPLE)
        for p in PEOPLE:
            lines.append(f"  {p.handle:<{width}}  {p.password:<{pw_width}}  {p.role}")
    return "\n".join(lines)
