"""What every handler gets: the services of the node and the caller's identity."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from chat.config import Settings
from chat.journal import Journal
from chat.storage import Database

if TYPE_CHECKING:
    from chat.fanout import Hub, Recipient
    from chat.handlers.cached import Caches
    from chat.presence import Presence


@dataclass(slots=True)
class Services:
    settings: Settings
    db: Database
    journal: Journal
    hub: Hub
    presence: Presence
    caches: Caches  # workspace caches for bootstrap and autocomplete


@dataclass(slots=True)
class Caller:
    """The authenticated session a request comes from."""

    user_id: int
    workspace_id: int
    session_id: str
    peer: Recipient
