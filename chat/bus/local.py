"""In-process bus: a single node delivers its own events synchronously, in publish order."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence

from chat.bus.base import Envelope, Subscriber

log = logging.getLogger(__name__)


class LocalBus:
    def __init__(self) -> None:
        self._subscribers: defaultdict[int, list[Subscriber]] = defaultdict(list)

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        by_workspace: defaultdict[int, list[Envelope]] = defaultdict(list)
        for env in envelopes:
            by_workspace[env.workspace_id].append(env)
        for workspace_id, batch in by_workspace.items():
            for subscriber in list(self._subscribers.get(workspace_id, ())):
                try:
                    subscriber(batch)
                except Exception:
                    # One broken subscriber must not keep the event from the others.
                    log.exception("subscriber failed")

    async def subscribe(self, workspace_id: int, subscriber: Subscriber) -> None:
        self._subscribers[workspace_id].append(subscriber)

    def unsubscribe(self, workspace_id: int, subscriber: Subscriber) -> None:
        subs = self._subscribers.get(workspace_id)
        if subs and subscriber in subs:
            subs.remove(subscriber)
            if not subs:
                del self._subscribers[workspace_id]

    async def close(self) -> None:
        self._subscribers.clear()
