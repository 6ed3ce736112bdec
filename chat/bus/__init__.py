"""Moving events between the journal and the nodes that deliver them.

``base.py`` defines the :class:`Envelope` (an event serialized once, with its audience) and the
:class:`Bus` interface; ``local.py`` is the in-process bus of a single node (the embedded
default). A Redis bus, for several nodes, implements the same interface.
"""

from chat.bus.base import Audience, Bus, Envelope, Subscriber
from chat.bus.local import LocalBus

__all__ = ["Audience", "Bus", "Envelope", "LocalBus", "Subscriber"]
