"""Every frame on the wire, as pydantic models: the one contract shared by chat, flannel, clients.

Client frames form the discriminated union :data:`ClientFrame` and are parsed once at the edge
with :func:`parse_client_frame`. Server frames are the union :data:`ServerFrame`. Each request
type maps to the model of its reply's ``data`` in :data:`REPLIES`, so documentation, clients and
handlers agree on shapes. ``docs/protocol.md`` is generated from this module
(``python -m chat.docgen``) and a test fails when they drift.

Event numbering: every durable event carries ``seq``, the workspace's event position, assigned
in the database in commit order. Every node (and the edge cache) serializes an event once and
sends the same bytes to every recipient; a client resumes from the last ``seq`` it saw.
Ephemeral events (``typing``, ``presence``) carry no ``seq`` and are never replayed.

Input is strict at this edge, so nothing a client sends can surprise a handler or a store:
client frames are validated in pydantic's strict mode (``true`` is not ``1``, ``3.0`` is not
``3``, ``"yes"`` is not ``true``); every integer fits a signed 64-bit column; every string
and list has a maximum length; no string carries a C0 control character other than tab,
newline and carriage return (PostgreSQL refuses NUL, SQLite would store it: refusing it
here makes both stores behave alike); and no frame is read deeper than
:data:`MAX_JSON_DEPTH` levels, without any recursion in Python (:func:`parse_client_frame`,
:func:`frame_id`).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal, get_args
from urllib.parse import urlsplit

import pydantic_core
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    TypeAdapter,
    model_serializer,
)

MAX_TEXT_CHARS = 4000
# A hard bound on message text at the edge, whatever the frame-size setting. It is above
# any text a default 16 KiB frame can carry, so over MAX_TEXT_CHARS the answer stays the
# handler's more useful ``msg_too_long``.
MAX_TEXT_WIRE_CHARS = 65_536
MAX_GROUP_DM = 8
MAX_INT = 2**63 - 1  # the largest value of a BIGINT column, on both stores
# Frames need 3 levels (frame, resume/list, item); anything deeper is refused unread.
MAX_JSON_DEPTH = 32
MAX_URL_CHARS = 500

# C0 controls but tab, newline and carriage return.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")


def _no_controls(value: str) -> str:
    if (m := _CONTROL.search(value)) is not None:
        raise ValueError(
            f"control character U+{ord(m.group()):04X} is not allowed"
            " (only tab, newline and carriage return are)"
        )
    return value


def _http_url(value: str) -> str:
    """Empty, or an absolute http(s) URL: anything else (``javascript:``, ``data:``,
    relative) could run or leak in a client that renders it."""
    if not value:
        return value
    if any(c.isspace() for c in value):
        raise ValueError("a URL has no whitespace")
    try:
        parts = urlsplit(value)
    except ValueError as exc:  # e.g. a malformed IPv6 host
        raise ValueError(f"not a URL: {exc}") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an absolute http:// or https:// URL, or empty")
    return value


Clean = AfterValidator(_no_controls)

RequestId = Annotated[str, Field(min_length=1, max_length=64), Clean]
Id = Annotated[int, Field(ge=1, le=MAX_INT)]
Position = Annotated[int, Field(ge=0, le=MAX_INT)]  # seqs and cursors
Name = Annotated[str, Field(min_length=1, max_length=80), Clean]
About = Annotated[str, Field(max_length=250), Clean]  # topic, purpose
ClientMsgId = Annotated[str, Field(min_length=1, max_length=64), Clean]
Text = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_TEXT_WIRE_CHARS,
        description=f"Over {MAX_TEXT_CHARS} characters: ``msg_too_long``.",
    ),
    Clean,
]
Emoji = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z0-9_+\-]+$"), Clean]
Role = Literal["owner", "admin", "member", "guest"]
ChannelKind = Literal["public", "private", "dm", "group_dm"]


class Frame(BaseModel):
    """Base of every frame: unknown fields are refused, so typos fail loudly."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    examples: ClassVar[list[dict[str, Any]]] = []


class Obj(BaseModel):
    """Base of objects carried inside frames."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- objects


class User(Obj):
    id: int
    workspace_id: int
    handle: str
    display_name: str
    real_name: str = ""
    avatar_url: str = ""
    tz: str = "UTC"
    role: Role
    deactivated: bool = False


class Channel(Obj):
    id: int
    workspace_id: int
    kind: ChannelKind
    name: str
    topic: str = ""
    purpose: str = ""
    archived: bool = False
    created_by: int
    created_at: int
    last_seq: int = 0
    member_count: int = 0


class ReactionCount(Obj):
    emoji: str
    count: int
    user_ids: list[int]


class Message(Obj):
    id: int
    channel_id: int
    seq: int
    user_id: int
    client_msg_id: str
    text: str
    ts: int
    thread_root_id: int | None = None
    reply_count: int = 0
    latest_reply_ts: int | None = None
    edited_ts: int | None = None
    deleted: bool = False
    mentions: list[int] = []
    mention_channel: bool = False
    mention_here: bool = False
    reactions: list[ReactionCount] = []


class ChannelCounts(Obj):
    channel_id: int
    last_read_seq: int
    unread: int
    mentions: int


class Limits(Obj):
    max_frame_bytes: int
    max_text_chars: int
    requests_per_10s: int
    auth_timeout_ms: int


# --------------------------------------------------------------------------- client frames


class Request(Frame):
    """A client request: the server answers with ``reply`` or ``error`` naming ``id``."""

    # Strict: a client's wrong type is refused, never converted.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    id: RequestId


class Resume(Obj):
    """Where a reconnecting client left off: its session and the last ``seq`` it saw."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    session_id: Annotated[str, Field(min_length=1, max_length=64), Clean]
    seq: Position


class Auth(Request):
    """First frame on a connection: authenticate with a token (never in the URL). With
    ``resume``, the server replays every event after ``resume.seq`` that the user may see, in
    order, then sends ``resumed``; or, if it cannot, says why in the reply's ``resume_error``
    and the client must bootstrap afresh."""

    type: Literal["auth"]
    token: Annotated[str, Field(max_length=4096), Clean]
    resume: Resume | None = None
    examples = [
        {"type": "auth", "id": "1", "token": "eyJhbGciOiJIUzI1NiJ9.e30.sig"},
        {
            "type": "auth",
            "id": "1",
            "token": "eyJhbGciOiJIUzI1NiJ9.e30.sig",
            "resume": {"session_id": "s_8f2aQm1x", "seq": 480},
        },
    ]


class Login(Request):
    """Alternative first frame: handle + password; the reply carries a fresh token."""

    type: Literal["login"]
    workspace: Name
    handle: Name
    password: Annotated[str, Field(min_length=1, max_length=1024), Clean]
    examples = [
        {"type": "login", "id": "1", "workspace": "acme", "handle": "ada", "password": "pw"}
    ]


MIN_PASSWORD_CHARS = 8
HANDLE_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,79}$"

NewPassword = Annotated[
    str,
    Field(
        min_length=1,
        max_length=1024,
        description=f"At least {MIN_PASSWORD_CHARS} characters, else ``invalid_argument``.",
    ),
    Clean,
]
NewHandle = Annotated[
    str,
    Field(
        min_length=1,
        max_length=80,
        description="1-80 of a-z, 0-9, '.', '_', '-', starting with a letter or digit, "
        "else ``invalid_argument``; one in use in the workspace: ``name_taken``.",
    ),
    Clean,
]


class Setup(Request):
    """Alternative first frame, on a chat node whose database has no workspace yet (``hello``
    says ``setup_required``): create the workspace, its ``#general`` channel and its owner,
    and sign in as the owner; the reply carries a fresh token. Once any workspace exists
    (another setup won, or an operator made one): ``forbidden``. Limited like ``login``."""

    type: Literal["setup"]
    workspace: Name
    handle: NewHandle
    password: NewPassword
    display_name: Name | None = None
    examples = [
        {
            "type": "setup",
            "id": "1",
            "workspace": "acme",
            "handle": "ada",
            "password": "correct horse battery",
            "display_name": "Ada",
        }
    ]


class Signup(Request):
    """Alternative first frame: create an account with an invite code (from an invite link,
    ``<origin>/#invite=<code>``) and sign in; the reply carries a fresh token. The user gets
    the invite's role and joins ``#general`` if it exists. An unknown, expired, revoked or
    used-up code: ``invalid_invite`` (one code for all four). Limited like ``login``."""

    type: Literal["signup"]
    invite: Annotated[str, Field(min_length=1, max_length=128), Clean]
    handle: NewHandle
    password: NewPassword
    display_name: Name | None = None
    examples = [
        {
            "type": "signup",
            "id": "1",
            "invite": "q3Zp0Jc8mX2vT9kR4wY7bN1hL6sD5fGa",
            "handle": "bob",
            "password": "correct horse battery",
            "display_name": "Bob",
        }
    ]


class Ping(Request):
    type: Literal["ping"]
    examples = [{"type": "ping", "id": "7"}]


class Page(Request):
    cursor: Position = 0
    limit: Annotated[int, Field(ge=1, le=1000)] = 100


class UsersList(Page):
    type: Literal["users.list"]
    examples = [{"type": "users.list", "id": "2", "cursor": 0, "limit": 100}]


class UsersInfo(Request):
    type: Literal["users.info"]
    user_ids: Annotated[list[Id], Field(min_length=1, max_length=1000)]
    examples = [{"type": "users.info", "id": "3", "user_ids": [2, 3]}]


class UsersUpdateProfile(Request):
    type: Literal["users.update_profile"]
    display_name: Name | None = None
    real_name: Annotated[str, Field(max_length=120), Clean] | None = None
    avatar_url: (
        Annotated[
            str,
            Field(
                max_length=MAX_URL_CHARS,
                description="An absolute ``http://`` or ``https://`` URL, or empty.",
            ),
            Clean,
            AfterValidator(_http_url),
        ]
        | None
    ) = None
    tz: Annotated[str, Field(max_length=64), Clean] | None = None
    examples = [{"type": "users.update_profile", "id": "4", "display_name": "Ada L."}]


class UsersSetRole(Request):
    type: Literal["users.set_role"]
    user_id: Id
    role: Role
    examples = [{"type": "users.set_role", "id": "5", "user_id": 3, "role": "admin"}]


class UsersDeactivate(Request):
    type: Literal["users.deactivate"]
    user_id: Id
    examples = [{"type": "users.deactivate", "id": "6", "user_id": 3}]


class SessionsRevoke(Request):
    """Revoke tokens: your own current session (``all=false``) or all of a user's."""

    type: Literal["sessions.revoke"]
    user_id: Id | None = None
    all: bool = False
    examples = [{"type": "sessions.revoke", "id": "8"}]


class ChannelsCreate(Request):
    type: Literal["channels.create"]
    name: Name
    private: bool = False
    topic: About = ""
    purpose: About = ""
    examples = [{"type": "channels.create", "id": "9", "name": "general", "private": False}]


class ChannelsUpdate(Request):
    """Rename (creator or admin) and/or set topic/purpose (any member)."""

    type: Literal["channels.update"]
    channel_id: Id
    name: Name | None = None
    topic: About | None = None
    purpose: About | None = None
    examples = [{"type": "channels.update", "id": "10", "channel_id": 4, "topic": "Launch"}]


class ChannelsArchive(Request):
    type: Literal["channels.archive"]
    channel_id: Id
    examples = [{"type": "channels.archive", "id": "11", "channel_id": 4}]


class ChannelsUnarchive(Request):
    type: Literal["channels.unarchive"]
    channel_id: Id
    examples = [{"type": "channels.unarchive", "id": "12", "channel_id": 4}]


class ChannelsJoin(Request):
    type: Literal["channels.join"]
    channel_id: Id
    examples = [{"type": "channels.join", "id": "13", "channel_id": 4}]


class ChannelsLeave(Request):
    type: Literal["channels.leave"]
    channel_id: Id
    examples = [{"type": "channels.leave", "id": "14", "channel_id": 4}]


class ChannelsInvite(Request):
    type: Literal["channels.invite"]
    channel_id: Id
    user_ids: Annotated[list[Id], Field(min_length=1, max_length=1000)]
    examples = [{"type": "channels.invite", "id": "15", "channel_id": 4, "user_ids": [5, 6]}]


class ChannelsRemove(Request):
    type: Literal["channels.remove"]
    channel_id: Id
    user_id: Id
    examples = [{"type": "channels.remove", "id": "16", "channel_id": 4, "user_id": 5}]


class ChannelsList(Page):
    """Public channels plus the caller's private channels and DMs, by id."""

    type: Literal["channels.list"]
    member_only: bool = False
    examples = [{"type": "channels.list", "id": "17", "member_only": True}]


class ChannelsInfo(Request):
    type: Literal["channels.info"]
    channel_id: Id
    examples = [{"type": "channels.info", "id": "18", "channel_id": 4}]


class ChannelsMembers(Page):
    type: Literal["channels.members"]
    channel_id: Id
    examples = [{"type": "channels.members", "id": "19", "channel_id": 4, "limit": 2}]


class DmsOpen(Request):
    """Open (or find) the DM with one user, or the group DM with up to 7 others."""

    type: Literal["dms.open"]
    user_ids: Annotated[list[Id], Field(min_length=1, max_length=MAX_GROUP_DM - 1)]
    examples = [{"type": "dms.open", "id": "20", "user_ids": [3]}]


class MessagesPost(Request):
    """Post; ``client_msg_id`` makes it idempotent: a retry returns the original message."""

    type: Literal["messages.post"]
    channel_id: Id
    client_msg_id: ClientMsgId
    text: Text
    thread_root_id: Id | None = None
    examples = [
        {
            "type": "messages.post",
            "id": "21",
            "channel_id": 4,
            "client_msg_id": "9b2f0c1e",
            "text": "hello @grace",
        }
    ]


class MessagesEdit(Request):
    type: Literal["messages.edit"]
    message_id: Id
    text: Text
    examples = [{"type": "messages.edit", "id": "22", "message_id": 40, "text": "hello!"}]


class MessagesDelete(Request):
    type: Literal["messages.delete"]
    message_id: Id
    examples = [{"type": "messages.delete", "id": "23", "message_id": 40}]


class MessagesHistory(Request):
    """Top-level messages of a channel by ``seq``: the page just ``before`` a position, just
    ``after`` one, or a window ``around`` one (including it); no position: the latest page.
    Every page is in ascending ``seq`` order; ``has_more_before``/``has_more_after`` say
    whether to keep walking."""

    type: Literal["messages.history"]
    channel_id: Id
    before: Position | None = None
    after: Position | None = None
    around: Position | None = None
    limit: Annotated[int, Field(ge=1, le=200)] = 50
    examples = [{"type": "messages.history", "id": "24", "channel_id": 4, "before": 120}]


class MessagesReplies(Request):
    """Replies of a thread, oldest first, after a reply ``seq``."""

    type: Literal["messages.replies"]
    message_id: Id
    after: Position = 0
    limit: Annotated[int, Field(ge=1, le=200)] = 50
    examples = [{"type": "messages.replies", "id": "25", "message_id": 40}]


class ReactionsAdd(Request):
    type: Literal["reactions.add"]
    message_id: Id
    emoji: Emoji
    examples = [{"type": "reactions.add", "id": "26", "message_id": 40, "emoji": "tada"}]


class ReactionsRemove(Request):
    type: Literal["reactions.remove"]
    message_id: Id
    emoji: Emoji
    examples = [{"type": "reactions.remove", "id": "27", "message_id": 40, "emoji": "tada"}]


class ReadsMark(Request):
    type: Literal["reads.mark"]
    channel_id: Id
    seq: Position
    examples = [{"type": "reads.mark", "id": "28", "channel_id": 4, "seq": 118}]


class ReadsCounts(Request):
    """Unread and mention counts for every channel the caller is a member of."""

    type: Literal["reads.counts"]
    examples = [{"type": "reads.counts", "id": "29"}]


class Typing(Request):
    """Ephemeral; rate-limited per channel (extra ones are acknowledged but not relayed)."""

    type: Literal["typing"]
    channel_id: Id
    thread_root_id: Id | None = None
    examples = [{"type": "typing", "id": "30", "channel_id": 4}]


class PresenceSubscribe(Request):
    """Replace the set of users whose presence changes this connection receives. The reply
    names those of them active now (the others are away); changes follow as ``presence``
    events."""

    type: Literal["presence.subscribe"]
    user_ids: Annotated[list[Id], Field(max_length=500)]
    examples = [{"type": "presence.subscribe", "id": "31", "user_ids": [2, 3]}]


class PresenceSet(Request):
    """``away`` forces away; ``auto`` is active while any connection is open."""

    type: Literal["presence.set"]
    status: Literal["auto", "away"]
    examples = [{"type": "presence.set", "id": "32", "status": "away"}]


BootstrapPart = Literal["user", "workspace", "channels", "users"]


class Bootstrap(Request):
    """What a client needs to draw its first screen, as of the workspace position ``seq``
    (events after it apply on top): the caller (``user``), the ``workspace``, the caller's
    ``channels`` and DMs with unread and mention counts and last activity, and the ``users``
    those need (DM partners). No full user or channel list: the rest is looked up lazily.
    ``parts`` names the parts wanted (default: all); the others are null in the reply."""

    type: Literal["bootstrap"]
    parts: Annotated[list[BootstrapPart], Field(min_length=1, max_length=4)] | None = None
    examples = [
        {"type": "bootstrap", "id": "40"},
        {"type": "bootstrap", "id": "41", "parts": ["channels", "users"]},
    ]


class InvitesCreate(Request):
    """Owners and admins: a new invite code (random, 192 bits; only its hash is stored, so
    the reply is the one place it is ever shown). ``max_uses`` sign-ups before it is used
    up; it expires ``expires_in_s`` seconds from now. It speaks for its creator: once they
    are deactivated or no longer an owner or admin, it stops working, as if revoked."""

    type: Literal["invites.create"]
    role: Literal["member", "guest"] = "member"
    max_uses: Annotated[int, Field(ge=1, le=1000)] = 1
    expires_in_s: Annotated[int, Field(ge=60, le=30 * 24 * 3600)] = 7 * 24 * 3600
    examples = [{"type": "invites.create", "id": "44", "role": "member", "max_uses": 5}]


class InvitesList(Request):
    """Owners and admins: the workspace's active invites (not expired, revoked or used up),
    newest first, without their codes."""

    type: Literal["invites.list"]
    examples = [{"type": "invites.list", "id": "45"}]


class InvitesRevoke(Request):
    """Owners and admins: revoke an invite of the workspace; sign-ups with it then fail."""

    type: Literal["invites.revoke"]
    invite_id: Id
    examples = [{"type": "invites.revoke", "id": "46", "invite_id": 3}]


AutocompleteQuery = Annotated[str, Field(max_length=80), Clean]


class UsersAutocomplete(Request):
    """@-mention completion: users whose handle, display name or a word of the real name
    starts with ``query``, ignoring case and accents. Ranked: an exact handle first, then
    members of ``channel_id``, then people the caller talked to recently, then everyone.
    Deactivated users are never returned."""

    type: Literal["users.autocomplete"]
    query: AutocompleteQuery
    channel_id: Id | None = None
    limit: Annotated[int, Field(ge=1, le=50)] = 10
    examples = [
        {"type": "users.autocomplete", "id": "42", "query": "jos", "channel_id": 4, "limit": 5}
    ]


class ChannelsAutocomplete(Request):
    """#-channel completion among the channels the caller may see (public ones, and private
    ones it is a member of); archived channels after the others; DMs never."""

    type: Literal["channels.autocomplete"]
    query: AutocompleteQuery
    limit: Annotated[int, Field(ge=1, le=50)] = 10
    examples = [{"type": "channels.autocomplete", "id": "43", "query": "gen"}]


ClientFrame = Annotated[
    Auth
    | Login
    | Setup
    | Signup
    | Ping
    | UsersList
    | UsersInfo
    | UsersUpdateProfile
    | UsersSetRole
    | UsersDeactivate
    | SessionsRevoke
    | ChannelsCreate
    | ChannelsUpdate
    | ChannelsArchive
    | ChannelsUnarchive
    | ChannelsJoin
    | ChannelsLeave
    | ChannelsInvite
    | ChannelsRemove
    | ChannelsList
    | ChannelsInfo
    | ChannelsMembers
    | DmsOpen
    | MessagesPost
    | MessagesEdit
    | MessagesDelete
    | MessagesHistory
    | MessagesReplies
    | ReactionsAdd
    | ReactionsRemove
    | ReadsMark
    | ReadsCounts
    | Typing
    | PresenceSubscribe
    | PresenceSet
    | Bootstrap
    | UsersAutocomplete
    | ChannelsAutocomplete
    | InvitesCreate
    | InvitesList
    | InvitesRevoke,
    Field(discriminator="type"),
]

# The first frames: each proves (or creates) an identity and starts a session.
FirstFrame = Auth | Login | Setup | Signup
FIRST_FRAMES = (Auth, Login, Setup, Signup)

CLIENT_FRAME_ADAPTER: TypeAdapter[ClientFrame] = TypeAdapter(ClientFrame)


def frame_types(union: Any) -> dict[str, type[Frame]]:
    """``type`` string -> model, for every member of a frame union."""
    out: dict[str, type[Frame]] = {}
    for model in get_args(get_args(union)[0]):
        for literal in get_args(model.model_fields["type"].annotation):
            out[literal] = model
    return out


# --------------------------------------------------------------------------- reply data


_MESSAGE_EXAMPLE: dict[str, Any] = {
    "id": 40,
    "channel_id": 4,
    "seq": 119,
    "user_id": 2,
    "client_msg_id": "9b2f0c1e",
    "text": "hello @grace",
    "ts": 1764348000000,
    "thread_root_id": None,
    "reply_count": 0,
    "latest_reply_ts": None,
    "edited_ts": None,
    "deleted": False,
    "mentions": [3],
    "mention_channel": False,
    "mention_here": False,
    "reactions": [{"emoji": "tada", "count": 1, "user_ids": [3]}],
}


class Data(Obj):
    """Base of the ``data`` of a ``reply``."""

    examples: ClassVar[list[dict[str, Any]]] = []


class Empty(Data):
    examples = [{}]


ResumeError = Literal["session_mismatch", "too_old", "future_seq"]


class SessionInfo(Data):
    """Reply to ``auth``/``login``: who you are and where the workspace's event stream is.

    ``seq`` is the workspace position the reply reflects: without ``resume``, state fetched
    after this reply is at least this new, and events follow from here. With ``resume``:
    ``resumed`` true means the missed events follow this reply, then a ``resumed`` frame;
    false means ``resume_error`` says why (``session_mismatch``: not this token's session;
    ``too_old``: outside the replay window; ``future_seq``: a position this workspace has not
    reached), and the client must reload its state."""

    user: User
    workspace_id: int
    workspace_name: str
    session_id: str
    seq: int
    token: str | None = None
    resumed: bool = False
    resume_error: ResumeError | None = None
    examples = [
        {
            "user": {
                "id": 2,
                "workspace_id": 1,
                "handle": "ada",
                "display_name": "Ada",
                "real_name": "Ada Lovelace",
                "avatar_url": "",
                "tz": "Europe/London",
                "role": "member",
                "deactivated": False,
            },
            "workspace_id": 1,
            "workspace_name": "acme",
            "session_id": "s_8f2aQm1x",
            "seq": 500,
            "token": None,
            "resumed": False,
            "resume_error": None,
        }
    ]


class Pong(Data):
    server_time: int


class UserPage(Data):
    users: list[User]
    next_cursor: int | None


class Users(Data):
    users: list[User]


class UserData(Data):
    user: User


class Revoked(Data):
    revoked: int


class ChannelData(Data):
    channel: Channel


class ChannelPage(Data):
    channels: list[Channel]
    next_cursor: int | None


class MemberPage(Data):
    user_ids: list[int]
    next_cursor: int | None


class MessageData(Data):
    message: Message


class PostResult(Data):
    """``duplicate`` is true when ``client_msg_id`` matched an earlier message."""

    message: Message
    duplicate: bool
    examples = [{"message": _MESSAGE_EXAMPLE, "duplicate": False}]


class History(Data):
    messages: list[Message]
    has_more_before: bool
    has_more_after: bool
    examples = [{"messages": [_MESSAGE_EXAMPLE], "has_more_before": True, "has_more_after": False}]


class ReactionData(Data):
    message_id: int
    reactions: list[ReactionCount]


class Counts(Data):
    channels: list[ChannelCounts]


class ReadMarker(Data):
    channel_id: int
    last_read_seq: int


class WorkspaceInfo(Obj):
    id: int
    name: str


class BootstrapChannel(Obj):
    """One of the caller's channels or DMs, with what its row in a channel list shows.
    ``last_ts``: its latest message (null: none yet); ``dm_user_ids``: a DM's other members."""

    id: int
    kind: ChannelKind
    name: str
    topic: str = ""
    archived: bool = False
    member_count: int
    last_seq: int = 0
    last_ts: int | None = None
    last_read_seq: int = 0
    unread: int = 0
    mentions: int = 0
    dm_user_ids: list[int] = []


def _without_defaults(obj: dict[str, Any], model: type[BaseModel]) -> dict[str, Any]:
    fields = model.model_fields
    return {
        k: v
        for k, v in obj.items()
        if k not in fields or fields[k].is_required() or v != fields[k].default
    }


class BootstrapData(Data):
    """To keep the first screen small, a field of ``user``, of ``users`` and of each of
    ``channels`` that holds its default value (the objects' tables name them: an empty
    ``topic``, ``unread`` 0, ``tz`` "UTC", ...) is left out; read a missing field as its
    default."""

    seq: int
    user: User | None
    workspace: WorkspaceInfo | None
    channels: list[BootstrapChannel] | None
    users: list[User] | None
    examples = [
        {
            "seq": 512,
            "user": {
                "id": 2,
                "workspace_id": 1,
                "handle": "ada",
                "display_name": "Ada",
                "role": "member",
            },
            "workspace": {"id": 1, "name": "acme"},
            "channels": [
                {
                    "id": 4,
                    "kind": "public",
                    "name": "general",
                    "member_count": 40,
                    "last_seq": 119,
                    "last_ts": 1764348000000,
                    "last_read_seq": 117,
                    "unread": 2,
                    "mentions": 1,
                },
                {
                    "id": 9,
                    "kind": "dm",
                    "name": "dm-2-3",
                    "member_count": 2,
                    "dm_user_ids": [3],
                },
            ],
            "users": [
                {
                    "id": 3,
                    "workspace_id": 1,
                    "handle": "grace",
                    "display_name": "Grace",
                    "real_name": "Grace Hopper",
                    "role": "member",
                }
            ],
        }
    ]

    @model_serializer(mode="wrap")
    def _slim(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out: dict[str, Any] = handler(self)
        if out.get("user") is not None:
            out["user"] = _without_defaults(out["user"], User)
        if out.get("users"):
            out["users"] = [_without_defaults(u, User) for u in out["users"]]
        if out.get("channels"):
            out["channels"] = [_without_defaults(c, BootstrapChannel) for c in out["channels"]]
        return out


class ChannelList(Data):
    channels: list[Channel]


class PresenceSnapshot(Data):
    """The watched users that are active now, by id; every other one is away."""

    active: list[int]
    examples = [{"active": [2]}]


class Invite(Obj):
    """An invite to the workspace. ``code`` is shown once, in the reply to
    ``invites.create`` (null in lists); ``prefix`` is its first characters, to tell invites
    apart. Times are milliseconds since the epoch."""

    id: int
    code: str | None = None
    prefix: str
    role: Literal["member", "guest"]
    max_uses: int
    uses: int = 0
    expires_at: int
    created_by: int
    created_at: int


_INVITE = {
    "id": 3,
    "code": "q3Zp0Jc8mX2vT9kR4wY7bN1hL6sD5fGa",
    "prefix": "q3Zp0J",
    "role": "member",
    "max_uses": 5,
    "uses": 0,
    "expires_at": 1764952800000,
    "created_by": 2,
    "created_at": 1764348000000,
}


class InviteData(Data):
    invite: Invite
    examples = [{"invite": _INVITE}]


class InviteList(Data):
    invites: list[Invite]
    examples = [{"invites": [{**_INVITE, "code": None, "uses": 2}]}]


REPLIES: dict[str, type[Data]] = {
    "auth": SessionInfo,
    "login": SessionInfo,
    "setup": SessionInfo,
    "signup": SessionInfo,
    "ping": Pong,
    "users.list": UserPage,
    "users.info": Users,
    "users.update_profile": UserData,
    "users.set_role": UserData,
    "users.deactivate": UserData,
    "sessions.revoke": Revoked,
    "channels.create": ChannelData,
    "channels.update": ChannelData,
    "channels.archive": ChannelData,
    "channels.unarchive": ChannelData,
    "channels.join": ChannelData,
    "channels.leave": ChannelData,
    "channels.invite": ChannelData,
    "channels.remove": ChannelData,
    "channels.list": ChannelPage,
    "channels.info": ChannelData,
    "channels.members": MemberPage,
    "dms.open": ChannelData,
    "messages.post": PostResult,
    "messages.edit": MessageData,
    "messages.delete": MessageData,
    "messages.history": History,
    "messages.replies": History,
    "reactions.add": ReactionData,
    "reactions.remove": ReactionData,
    "reads.mark": ReadMarker,
    "reads.counts": Counts,
    "typing": Empty,
    "presence.subscribe": PresenceSnapshot,
    "presence.set": Empty,
    "bootstrap": BootstrapData,
    "users.autocomplete": Users,
    "channels.autocomplete": ChannelList,
    "invites.create": InviteData,
    "invites.list": InviteList,
    "invites.revoke": Empty,
}


# --------------------------------------------------------------------------- server frames


class Hello(Frame):
    """First server frame on every connection, before ``auth``. ``setup_required``: this
    chat node's database had no workspace when it started (or when it last looked), and the
    first person to connect may create one with ``setup``, which answers ``forbidden`` if
    someone was faster. Never true through an edge node."""

    type: Literal["hello"] = "hello"
    server_version: str
    heartbeat_interval_ms: int
    limits: Limits
    setup_required: bool = False
    examples = [
        {
            "type": "hello",
            "server_version": "0.1.0",
            "heartbeat_interval_ms": 30000,
            "limits": {
                "max_frame_bytes": 16384,
                "max_text_chars": 4000,
                "requests_per_10s": 50,
                "auth_timeout_ms": 5000,
            },
            "setup_required": False,
        }
    ]


class Reply(Frame):
    type: Literal["reply"] = "reply"
    reply_to: str
    data: dict[str, Any]
    examples = [{"type": "reply", "reply_to": "7", "data": {"server_time": 1764348000000}}]


class Error(Frame):
    """A refused request (``reply_to`` set) or a frame that could not be read (null)."""

    type: Literal["error"] = "error"
    reply_to: str | None
    code: str
    message: str
    retry_after_ms: int | None = None
    examples = [
        {
            "type": "error",
            "reply_to": "21",
            "code": "not_in_channel",
            "message": "The operation needs channel membership.",
            "retry_after_ms": None,
        }
    ]


class Goodbye(Frame):
    """Sent before the server closes a connection it would like to see back: reconnect (to
    any node) after ``reconnect_after_ms`` plus jitter, and resume. ``overloaded``: the node
    had more connects in progress than it can serve in time (the close is 1013); the same
    frame is the body of an HTTP 503 refusing the upgrade."""

    type: Literal["goodbye"] = "goodbye"
    reason: Literal["service_restart", "too_slow", "overloaded"]
    reconnect_after_ms: int = 0
    examples = [{"type": "goodbye", "reason": "service_restart", "reconnect_after_ms": 1000}]


class Resumed(Frame):
    """After a resume: every event up to ``seq`` (the reply's snapshot position) that the
    client missed has been sent, ``replayed`` of them; what follows is live."""

    type: Literal["resumed"] = "resumed"
    seq: int
    replayed: int
    examples = [{"type": "resumed", "seq": 512, "replayed": 32}]


class Event(Frame):
    """Base of server-pushed events."""

    seq: int | None
    workspace_id: int
    ts: int


class Durable(Event):
    """An event in the workspace's log: ``seq`` is its workspace position, assigned in commit
    order; a client resumes from the last one it saw."""

    seq: int


class Ephemeral(Event):
    """Typing and presence: ``seq`` is null; never stored, never replayed."""

    seq: None = None


_M = {
    "id": 40,
    "channel_id": 4,
    "seq": 119,
    "user_id": 2,
    "client_msg_id": "9b2f0c1e",
    "text": "hello @grace",
    "ts": 1764348000000,
    "mentions": [3],
}
_C = {
    "id": 4,
    "workspace_id": 1,
    "kind": "public",
    "name": "general",
    "created_by": 2,
    "created_at": 1764348000000,
}
_U = {"id": 3, "workspace_id": 1, "handle": "grace", "display_name": "Grace", "role": "member"}
_E = {"workspace_id": 1, "ts": 1764348000000}


class MessagePosted(Durable):
    type: Literal["message.posted"] = "message.posted"
    message: Message
    examples = [{"type": "message.posted", "seq": 501, **_E, "message": _M}]


class MessageEdited(Durable):
    type: Literal["message.edited"] = "message.edited"
    message: Message
    examples = [{"type": "message.edited", "seq": 502, **_E, "message": _M}]


class MessageDeleted(Durable):
    type: Literal["message.deleted"] = "message.deleted"
    channel_id: int
    message_id: int
    thread_root_id: int | None = None
    examples = [{"type": "message.deleted", "seq": 503, **_E, "channel_id": 4, "message_id": 40}]


class ThreadUpdated(Durable):
    """The root's reply count or latest reply changed (sent to the channel)."""

    type: Literal["thread.updated"] = "thread.updated"
    channel_id: int
    message_id: int
    reply_count: int
    latest_reply_ts: int | None
    examples = [
        {
            "type": "thread.updated",
            "seq": 504,
            **_E,
            "channel_id": 4,
            "message_id": 40,
            "reply_count": 3,
            "latest_reply_ts": 1764348000000,
        }
    ]


class Mention(Durable):
    """You were mentioned (``@you``, ``@channel``, or ``@here`` while active)."""

    type: Literal["mention"] = "mention"
    channel_id: int
    message_id: int
    by_user_id: int
    kind: Literal["user", "channel", "here"]
    examples = [
        {
            "type": "mention",
            "seq": 505,
            **_E,
            "channel_id": 4,
            "message_id": 40,
            "by_user_id": 2,
            "kind": "user",
        }
    ]


class ReactionChanged(Durable):
    """``reaction.added`` / ``reaction.removed`` with the emoji's new count."""

    type: Literal["reaction.added", "reaction.removed"]
    channel_id: int
    message_id: int
    user_id: int
    emoji: str
    count: int
    examples = [
        {
            "type": "reaction.added",
            "seq": 506,
            **_E,
            "channel_id": 4,
            "message_id": 40,
            "user_id": 3,
            "emoji": "tada",
            "count": 2,
        }
    ]


class ChannelChanged(Durable):
    """``channel.created``, ``channel.updated``, ``channel.archived``, ``channel.unarchived``.
    Public channels: to the whole workspace; private channels and DMs: to members."""

    type: Literal["channel.created", "channel.updated", "channel.archived", "channel.unarchived"]
    channel: Channel
    examples = [{"type": "channel.created", "seq": 507, **_E, "channel": _C}]


class MemberChanged(Durable):
    """``channel.member_joined`` / ``channel.member_left``: to the members, including the
    user who joined or left. ``by_user_id`` differs from ``user_id`` for invite/remove."""

    type: Literal["channel.member_joined", "channel.member_left"]
    channel_id: int
    user_id: int
    by_user_id: int
    examples = [
        {
            "type": "channel.member_joined",
            "seq": 508,
            **_E,
            "channel_id": 4,
            "user_id": 3,
            "by_user_id": 2,
        }
    ]


class UserChanged(Durable):
    """``user.created`` / ``user.updated`` (profile, role, deactivation): to the workspace."""

    type: Literal["user.created", "user.updated"]
    user: User
    examples = [{"type": "user.updated", "seq": 509, **_E, "user": _U}]


class ReadMarkerUpdated(Durable):
    """Your read marker moved (on any of your devices): to your own connections."""

    type: Literal["read_marker.updated"] = "read_marker.updated"
    channel_id: int
    last_read_seq: int
    examples = [
        {"type": "read_marker.updated", "seq": 510, **_E, "channel_id": 4, "last_read_seq": 118}
    ]


class SessionRevoked(Durable):
    """Your session was revoked; the connection closes right after (1008 token_revoked)."""

    type: Literal["session.revoked"] = "session.revoked"
    user_id: int
    session_id: str | None
    examples = [{"type": "session.revoked", "seq": 511, **_E, "user_id": 3, "session_id": "s_8f2a"}]


class TypingEvent(Ephemeral):
    """Ephemeral: ``user_id`` is typing in the channel (or thread)."""

    type: Literal["typing"] = "typing"
    channel_id: int
    user_id: int
    thread_root_id: int | None = None
    examples = [{"type": "typing", "seq": None, **_E, "channel_id": 4, "user_id": 3}]


class PresenceEvent(Ephemeral):
    """Ephemeral: a subscribed user's presence changed."""

    type: Literal["presence"] = "presence"
    user_id: int
    status: Literal["active", "away"]
    examples = [{"type": "presence", "seq": None, **_E, "user_id": 3, "status": "active"}]


DurableEvent = (
    MessagePosted
    | MessageEdited
    | MessageDeleted
    | ThreadUpdated
    | Mention
    | ReactionChanged
    | ChannelChanged
    | MemberChanged
    | UserChanged
    | ReadMarkerUpdated
    | SessionRevoked
)
EphemeralEvent = TypingEvent | PresenceEvent
AnyEvent = DurableEvent | EphemeralEvent

ServerFrame = Annotated[
    Hello
    | Reply
    | Error
    | Goodbye
    | Resumed
    | MessagePosted
    | MessageEdited
    | MessageDeleted
    | ThreadUpdated
    | Mention
    | ReactionChanged
    | ChannelChanged
    | MemberChanged
    | UserChanged
    | ReadMarkerUpdated
    | SessionRevoked
    | TypingEvent
    | PresenceEvent,
    Field(discriminator="type"),
]

SERVER_FRAME_ADAPTER: TypeAdapter[ServerFrame] = TypeAdapter(ServerFrame)


def parse_client_frame(data: str | bytes) -> ClientFrame:
    """Parse and validate one client frame; raises ``pydantic.ValidationError``.

    A frame nested deeper than :data:`MAX_JSON_DEPTH` fails as ``json_invalid``. The JSON
    parser (jiter) recurses in Rust with its own bound, never in Python, and no valid frame
    is more than 3 levels deep; only a frame with more brackets than the limit, which no
    ordinary frame has, pays for the exact check.
    """
    if _brackets(data) > MAX_JSON_DEPTH and _too_deep(data):
        raise pydantic_core.ValidationError.from_exception_data(
            "ClientFrame",
            [
                {
                    "type": "json_invalid",
                    "loc": (),
                    "input": "",
                    "ctx": {"error": f"nested deeper than {MAX_JSON_DEPTH} levels"},
                }
            ],
        )
    return CLIENT_FRAME_ADAPTER.validate_json(data)


def frame_id(data: str | bytes) -> str | None:
    """The ``id`` of a frame refused before or during validation, when it has a usable one:
    a string of 1-64 characters, without control characters, at the top level of a JSON
    object nested at most :data:`MAX_JSON_DEPTH` deep. Never recurses in Python."""
    if _brackets(data) > MAX_JSON_DEPTH and _too_deep(data):
        return None
    try:
        obj = pydantic_core.from_json(data, cache_strings=False)
    except ValueError:
        return None
    rid = obj.get("id") if isinstance(obj, dict) else None
    if isinstance(rid, str) and 0 < len(rid) <= 64 and _CONTROL.search(rid) is None:
        return rid
    return None


def _brackets(data: str | bytes) -> int:
    """An upper bound of the nesting depth, counted at C speed."""
    if isinstance(data, str):
        return data.count("[") + data.count("{")
    return data.count(b"[") + data.count(b"{")


def _too_deep(data: str | bytes) -> bool:
    """Whether the JSON value opens more than :data:`MAX_JSON_DEPTH` levels; an iterative
    parse (jiter, bounded in Rust), then a walk with an explicit stack. Text that is not
    JSON is not "too deep": validation reports it as it is."""
    try:
        root = pydantic_core.from_json(data, cache_strings=False)
    except ValueError as exc:
        # jiter's own bound (200 levels) is far above ours.
        return "recursion limit" in str(exc)
    stack: list[tuple[Any, int]] = [(root, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            value = list(value.values())
        elif not isinstance(value, list):
            continue
        if depth + 1 > MAX_JSON_DEPTH:
            return True
        stack.extend((v, depth + 1) for v in value if isinstance(v, dict | list))
    return False


def parse_server_frame(data: str | bytes) -> ServerFrame:
    return SERVER_FRAME_ADAPTER.validate_json(data)


def dump(frame: Frame) -> bytes:
    """Serialize a server frame once; the same bytes go to every recipient."""
    return frame.__pydantic_serializer__.to_json(frame, exclude_none=False)


# --------------------------------------------------------------------------- service frames
#
# Internal: the frames of a service connection between an edge node (Flannel) and a chat node
# (docs/flannel.md). Text frames are JSON and strict, like client frames; relayed client
# frames, relayed server frames and events travel in binary frames (below), verbatim.

Sid = Annotated[int, Field(ge=1, le=2**32 - 1)]  # a session or request number on one connection


def _no_resume(request: FirstFrame) -> FirstFrame:
    if isinstance(request, Auth) and request.resume is not None:
        raise ValueError("an attach carries no resume: the edge replays to its client itself")
    return request


class ServiceFrame(Frame):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Attach(ServiceFrame):
    """Attach a user's session: the chat node verifies the user's own ``auth`` token (or
    ``login`` password) as for a client, or creates the account of a ``signup`` or
    ``setup``; ``resume`` is the edge's business and is refused."""

    type: Literal["attach"]
    sid: Sid
    request: Annotated[
        Auth | Login | Setup | Signup, Field(discriminator="type"), AfterValidator(_no_resume)
    ]
    client_ip: (
        Annotated[
            str,
            Field(
                max_length=64,
                description="The client's address, for the login limits per address (the "
                "connection's own address is the edge's).",
            ),
            Clean,
        ]
        | None
    ) = None
    examples = [
        {
            "type": "attach",
            "sid": 7,
            "request": {"type": "auth", "id": "1", "token": "eyJhbGciOiJIUzI1NiJ9.e30.sig"},
        }
    ]


class TakeSnapshotFrame(ServiceFrame):
    """Read the attached session's connect snapshot (batched per workspace on the chat node)."""

    type: Literal["snapshot"]
    sid: Sid
    examples = [{"type": "snapshot", "sid": 7}]


class SessionLive(ServiceFrame):
    """The session went live at the edge: count its user present."""

    type: Literal["live"]
    sid: Sid
    examples = [{"type": "live", "sid": 7}]


class Detach(ServiceFrame):
    """The session's client has gone."""

    type: Literal["detach"]
    sid: Sid
    examples = [{"type": "detach", "sid": 7}]


class SubscribeWorkspace(ServiceFrame):
    """Receive every event of the workspace once, in order, after ``after`` (null: from now).
    Needs a session of the workspace attached on this connection."""

    type: Literal["subscribe"]
    rid: Sid
    workspace_id: Id
    after: Position | None = None
    examples = [{"type": "subscribe", "rid": 2, "workspace_id": 1, "after": 480}]


class UnsubscribeWorkspace(ServiceFrame):
    """No more events of the workspace (the edge's last client of it left)."""

    type: Literal["unsubscribe"]
    workspace_id: Id
    examples = [{"type": "unsubscribe", "workspace_id": 1}]


class ReplayRange(ServiceFrame):
    """The workspace's events in ``(after, up_to]``, unfiltered, as ``P`` frames."""

    type: Literal["replay"]
    rid: Sid
    workspace_id: Id
    after: Position
    up_to: Position
    examples = [{"type": "replay", "rid": 3, "workspace_id": 1, "after": 480, "up_to": 512}]


class LoadWorkspace(ServiceFrame):
    """The workspace's users, channels and memberships, for the edge's cache."""

    type: Literal["load"]
    rid: Sid
    workspace_id: Id
    examples = [{"type": "load", "rid": 4, "workspace_id": 1}]


EdgeFrame = Annotated[
    Attach
    | TakeSnapshotFrame
    | SessionLive
    | Detach
    | SubscribeWorkspace
    | UnsubscribeWorkspace
    | ReplayRange
    | LoadWorkspace,
    Field(discriminator="type"),
]
EDGE_FRAME_ADAPTER: TypeAdapter[EdgeFrame] = TypeAdapter(EdgeFrame)


class Attached(ServiceFrame):
    """``token``: after a ``login`` (or a ``signup`` or ``setup``), the session's fresh
    token (the edge's client gets it in its reply, and the edge attaches the session with it
    on another connection); null after an ``auth``, whose token the edge has."""

    type: Literal["attached"] = "attached"
    sid: int
    user_id: int
    workspace_id: int
    session_id: str
    token: str | None
    examples = [
        {
            "type": "attached",
            "sid": 7,
            "user_id": 2,
            "workspace_id": 1,
            "session_id": "s_8f2aQm1x",
            "token": None,
        }
    ]


class Detached(ServiceFrame):
    """An ``attach`` or ``snapshot`` refused. ``code`` is an ``error`` frame's code
    (``invalid_auth``, ``token_expired``, ``rate_limited``, ``unavailable``; for a ``signup``
    or ``setup``, also ``invalid_invite``, ``name_taken``, ``invalid_argument``,
    ``forbidden``; for a ``snapshot`` of a session that is not attached,
    ``not_authenticated``), which the edge answers its client's first frame with; or
    ``overloaded``: the chat node's admission control refused the attach, and the edge sends
    its client a ``goodbye`` with ``retry_after_ms`` and 1013."""

    type: Literal["detached"] = "detached"
    sid: int
    code: str
    message: str
    retry_after_ms: int | None = None
    examples = [
        {
            "type": "detached",
            "sid": 7,
            "code": "token_expired",
            "message": "The token has expired.",
            "retry_after_ms": None,
        }
    ]


class SnapshotTaken(ServiceFrame):
    """A session's connect snapshot (as a chat node reads it for a client's ``auth``).
    ``refusal`` set means the session may not be used: ``invalid_auth`` (no such session or
    user), ``token_revoked``, ``token_expired`` or ``account_inactive``; the edge refuses its
    client's ``auth`` with that code."""

    type: Literal["snapshot_taken"] = "snapshot_taken"
    sid: int
    as_of: int
    user: User | None
    workspace_name: str
    channel_ids: list[int]
    refusal: str | None = None
    examples = [
        {
            "type": "snapshot_taken",
            "sid": 7,
            "as_of": 512,
            "user": _U,
            "workspace_name": "acme",
            "channel_ids": [4, 9],
            "refusal": None,
        }
    ]


class SessionClosed(ServiceFrame):
    """The chat node ended a session (flooding, a revocation a handler noticed): close the
    client with ``code`` and ``reason``."""

    type: Literal["closed"] = "closed"
    sid: int
    code: int
    reason: str
    examples = [{"type": "closed", "sid": 7, "code": 1008, "reason": "token_revoked"}]


class Subscribed(ServiceFrame):
    """Events follow as ``E`` frames: those in ``(after, seq]`` first when ``after`` was
    given, then every later one. ``resume_error``: ``too_old``, the window no longer held
    ``after``; ``future_seq``, ``after`` is past the workspace's position. Either way events
    follow from ``seq``, and what the edge derived from before is stale."""

    type: Literal["subscribed"] = "subscribed"
    rid: int
    workspace_id: int
    seq: int
    resume_error: Literal["too_old", "future_seq"] | None = None
    examples = [
        {"type": "subscribed", "rid": 2, "workspace_id": 1, "seq": 512, "resume_error": None}
    ]


class Replayed(ServiceFrame):
    """The end of a ``replay``: ``count`` events were sent in ``P`` frames."""

    type: Literal["replayed"] = "replayed"
    rid: int
    count: int
    examples = [{"type": "replayed", "rid": 3, "count": 32}]


class Failed(ServiceFrame):
    """A ``subscribe``, ``replay`` or ``load`` that could not be served: ``not_attached`` (no
    session of the workspace is attached on this connection), ``already_subscribed``,
    ``too_old`` (the replay window no longer holds the range), ``invalid_argument``
    (``up_to`` before ``after``), ``not_found`` (no such workspace), ``unavailable`` (the
    store or the log failed; try again)."""

    type: Literal["failed"] = "failed"
    rid: int
    code: str
    message: str
    examples = [
        {"type": "failed", "rid": 3, "code": "too_old", "message": "Outside the replay window."}
    ]


class Membership(Obj):
    """A channel's members, and the time of its latest message (null: none yet)."""

    channel_id: int
    user_ids: list[int]
    last_ts: int | None = None


class Loaded(ServiceFrame):
    """The workspace as of ``seq``: every user (deactivated included), every channel (private
    ones and DMs included: the edge applies the visibility rules) and every membership."""

    type: Literal["loaded"] = "loaded"
    rid: int
    workspace_id: int
    workspace_name: str
    seq: int
    users: list[User]
    channels: list[Channel]
    members: list[Membership]
    examples = [
        {
            "type": "loaded",
            "rid": 4,
            "workspace_id": 1,
            "workspace_name": "acme",
            "seq": 512,
            "users": [_U],
            "channels": [_C],
            "members": [{"channel_id": 4, "user_ids": [2, 3], "last_ts": 1764348000000}],
        }
    ]


ChatServiceFrame = Annotated[
    Attached | Detached | SnapshotTaken | SessionClosed | Subscribed | Replayed | Failed | Loaded,
    Field(discriminator="type"),
]
CHAT_SERVICE_FRAME_ADAPTER: TypeAdapter[ChatServiceFrame] = TypeAdapter(ChatServiceFrame)

# Binary service frames: a kind byte, then big-endian fields (docs/flannel.md).
RELAY = b"R"  # u32 sid, then a client frame (to chat) or a server frame (to the edge)
EVENTS = b"E"  # u64 workspace_id, then envelopes
REPLAY_CHUNK = b"P"  # u32 rid, then envelopes
