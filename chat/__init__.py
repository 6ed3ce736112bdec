"""The chat tier: a websocket message server for team chat.

::

    client ─ws─> server.py ─> protocol.py ─> handlers/ ─> journal.py ─> storage/ (PG | SQLite)
       ^            │ auth ─> connect.py (identity.py, snapshot, replay)  │ commit, then publish
       └──── fanout.py (Hub: frame once, write to each) <── bus/ (local | Redis)

- ``wire.py``: every frame (pydantic); ``errors.py``: error and close codes.
- ``protocol.py``: per-session protocol state machine (ClientProtocol), no I/O.
- ``connect.py``: the connect and resume sequence, no I/O; ``identity.py``: who a client is
  (token, or password with login limits).
- ``handlers/``: what each request means, and who may do it (``access.py``).
- ``journal.py``: per-workspace ordered, batched transactions; numbers events (``seq``).
- ``bus/``: carries numbered events to every node (``local.py`` in-process, ``redis.py``
  Redis Streams); ``replay.py``: what a resuming client missed; ``fanout.py``: local delivery.
- ``presence.py``: presence and typing (ephemeral).
- ``retention.py``: prunes the event log and dead sessions.
- ``server.py``: websockets I/O, HTTP probes, graceful shutdown; ``transport.py``: the
  websockets internals that raw frame writes rely on; ``__main__.py``: the CLI.
"""

__version__ = "0.1.0"
