"""The one error vocabulary: error codes in error frames, close codes, and the exception tree.

::

    ChatError                 a refusal the client should see, as an error frame
    ├── ProtocolViolation     the connection is beyond saving: close with a close code
    └── (every other refusal: code + human message, the connection stays open)

Anything else that escapes a handler is a bug: the client gets ``internal_error`` with no
details (they may be security-sensitive) and the log gets the traceback. Exceptions become
frames or close codes in exactly one place, :mod:`chat.protocol`.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


class ErrorCode(StrEnum):
    """Stable codes in ``error`` frames. Clients switch on these; never rename one."""

    INVALID_JSON = "invalid_json"
    INVALID_FRAME = "invalid_frame"
    UNKNOWN_TYPE = "unknown_type"
    NOT_AUTHENTICATED = "not_authenticated"
    ALREADY_AUTHENTICATED = "already_authenticated"
    INVALID_AUTH = "invalid_auth"
    TOKEN_EXPIRED = "token_expired"
    TOKEN_REVOKED = "token_revoked"
    ACCOUNT_INACTIVE = "account_inactive"
    RATE_LIMITED = "rate_limited"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    CHANNEL_NOT_FOUND = "channel_not_found"
    MESSAGE_NOT_FOUND = "message_not_found"
    USER_NOT_FOUND = "user_not_found"
    NOT_IN_CHANNEL = "not_in_channel"
    ALREADY_IN_CHANNEL = "already_in_channel"
    CHANNEL_ARCHIVED = "channel_archived"
    NAME_TAKEN = "name_taken"
    INVALID_INVITE = "invalid_invite"
    INVALID_NAME = "invalid_name"
    TOO_MANY_MEMBERS = "too_many_members"
    NOT_ALLOWED_FOR_DM = "not_allowed_for_dm"
    MSG_TOO_LONG = "msg_too_long"
    INVALID_ARGUMENT = "invalid_argument"
    DUPLICATE_REQUEST_ID = "duplicate_request_id"
    DUPLICATE_CLIENT_MSG_ID = "duplicate_client_msg_id"
    UNAVAILABLE = "unavailable"
    OUTCOME_UNKNOWN = "outcome_unknown"
    INTERNAL_ERROR = "internal_error"


ERROR_DESCRIPTIONS: dict[ErrorCode, str] = {
    ErrorCode.INVALID_JSON: "The frame is not valid JSON, or not a JSON object.",
    ErrorCode.INVALID_FRAME: "A field is missing, unknown or of the wrong type.",
    ErrorCode.UNKNOWN_TYPE: "The frame's `type` is not a client frame type.",
    ErrorCode.NOT_AUTHENTICATED: "A request arrived before a successful `auth`.",
    ErrorCode.ALREADY_AUTHENTICATED: "`auth` or `login` sent on an authenticated connection.",
    ErrorCode.INVALID_AUTH: "Bad token signature, unknown user, or wrong password.",
    ErrorCode.TOKEN_EXPIRED: "The token is past its expiry; get a new one.",
    ErrorCode.TOKEN_REVOKED: "The token was revoked (logout, deactivation or an admin).",
    ErrorCode.ACCOUNT_INACTIVE: "The user is deactivated.",
    ErrorCode.RATE_LIMITED: "Too many requests; retry after `retry_after_ms`.",
    ErrorCode.FORBIDDEN: "The user's role does not allow this operation.",
    ErrorCode.NOT_FOUND: "No such object visible to this user.",
    ErrorCode.CHANNEL_NOT_FOUND: "No such channel, or a private channel the user is not in.",
    ErrorCode.MESSAGE_NOT_FOUND: "No such message visible to this user.",
    ErrorCode.USER_NOT_FOUND: "No such user in this workspace.",
    ErrorCode.NOT_IN_CHANNEL: "The operation needs channel membership.",
    ErrorCode.ALREADY_IN_CHANNEL: "The user is already a member.",
    ErrorCode.CHANNEL_ARCHIVED: "The channel is archived: read-only.",
    ErrorCode.NAME_TAKEN: (
        "Another channel in the workspace has this name (or, at `signup`/`setup`, another "
        "user this handle)."
    ),
    ErrorCode.INVALID_INVITE: (
        "`signup`: the invite code is unknown, expired, revoked or used up (one code for all "
        "four: ask for a new link)."
    ),
    ErrorCode.INVALID_NAME: "Channel names: 1-80 of a-z, 0-9, '-', '_'.",
    ErrorCode.TOO_MANY_MEMBERS: "Group DMs hold at most 8 people.",
    ErrorCode.NOT_ALLOWED_FOR_DM: "DMs cannot be renamed, archived, joined, left or invited to.",
    ErrorCode.MSG_TOO_LONG: "Message text is over the limit (4,000 characters).",
    ErrorCode.INVALID_ARGUMENT: "A value is well-typed but not acceptable (see message).",
    ErrorCode.DUPLICATE_REQUEST_ID: "A request with this `id` is still in flight.",
    ErrorCode.DUPLICATE_CLIENT_MSG_ID: (
        "This `client_msg_id` was already used in this channel for a message with other "
        "content (text or thread): use a new `client_msg_id` for a new message."
    ),
    ErrorCode.UNAVAILABLE: (
        "The database is unreachable for now; nothing was done. Retry after "
        "`retry_after_ms` (with the same `client_msg_id` for a post)."
    ),
    ErrorCode.OUTCOME_UNKNOWN: (
        "The database connection failed while the change was being committed: it may or may "
        "not have been stored. Retry with the same `client_msg_id`: a stored post comes back "
        "with `duplicate: true`."
    ),
    ErrorCode.INTERNAL_ERROR: "A bug; the request may be retried.",
}


class CloseCode(IntEnum):
    """Websocket close codes the server uses. See ``CLOSE_DESCRIPTIONS`` for what to do."""

    NORMAL_CLOSURE = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013
    # Application codes: reconnect, then resume.
    HEARTBEAT_TIMEOUT = 4000
    SLOW_CONSUMER = 4001


# code -> (when, reconnect?). Resume (auth with ``resume``) is always worth trying on
# reconnect; the server says if it cannot.
CLOSE_DESCRIPTIONS: dict[CloseCode, tuple[str, bool]] = {
    CloseCode.NORMAL_CLOSURE: ("The client asked to close.", False),
    CloseCode.GOING_AWAY: ("The peer is going away.", True),
    CloseCode.PROTOCOL_ERROR: ("Websocket protocol error (bad framing).", True),
    CloseCode.INVALID_DATA: ("A text frame was not valid UTF-8.", True),
    CloseCode.POLICY_VIOLATION: (
        "No `auth` within the auth timeout (reason `auth_timeout`), a failed `auth` "
        "(`invalid_auth`, `token_expired`, `token_revoked`, `account_inactive`), a revoked "
        "session (`token_revoked`), a bad first frame, or too many refused requests "
        "(`rate_limited`); every reason is listed under Close reasons. Reconnect only with "
        "a valid token, and after backoff.",
        True,
    ),
    CloseCode.MESSAGE_TOO_BIG: ("A frame exceeded the maximum frame size.", True),
    CloseCode.INTERNAL_ERROR: ("An unexpected server error; no details are given.", True),
    CloseCode.SERVICE_RESTART: (
        "The node is draining (deploy, restart); a `goodbye` came first. Reconnect after its "
        "`reconnect_after_ms` plus jitter, to any node, and resume.",
        True,
    ),
    CloseCode.TRY_AGAIN_LATER: ("The server is overloaded; back off, then resume.", True),
    CloseCode.HEARTBEAT_TIMEOUT: (
        "No frame from the client for two heartbeat intervals; reconnect and resume.",
        True,
    ),
    CloseCode.SLOW_CONSUMER: (
        "The client did not read fast enough and its send queue filled; reconnect and resume.",
        True,
    ),
}


class ChatError(Exception):
    """A refusal with a stable code; becomes an ``error`` frame naming the request."""

    def __init__(
        self, code: ErrorCode, message: str = "", *, retry_after_ms: int | None = None
    ) -> None:
        super().__init__(message or ERROR_DESCRIPTIONS[code])
        self.code = code
        self.message = message or ERROR_DESCRIPTIONS[code]
        self.retry_after_ms = retry_after_ms


class ProtocolViolation(ChatError):
    """A refusal after which the connection is closed with ``close_code``."""

    def __init__(self, code: ErrorCode, close_code: CloseCode, message: str = "") -> None:
        super().__init__(code, message)
        self.close_code = close_code
