"""The webhook outbox: audit record ids waiting to be fanned out to subscribed endpoints.

The commit that appends an audit record pushes its stream id here in the same Lua script
(:mod:`layerlock.license_server.store.commit`) when the record stands for an event somebody
subscribed to, so an event is queued if and only if its record exists, and costs nothing when
nobody listens (one ``SCARD`` of an absent key).  The delivery worker pops ids oldest first
(:mod:`layerlock.license_server.webhooks`).  Inline events that have no audit record
(``checkpoint.signed``) are pushed as JSON objects.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from layerlock.license_server import events
from layerlock.license_server.store import P

OUTBOX = P + "wh:outbox"


def subscribers(event: str) -> str:
    """Set of webhook ids subscribed to ``event`` (``*``: to every event)."""
    return f"{P}wh:on:{event}"


def keys_for(rec: Mapping[str, Any]) -> list[str]:
    """The subscription sets whose non-emptiness makes the commit queue ``rec`` (none: not an event)."""
    types = events.of_record(rec)
    return [subscribers(t) for t in types] + [subscribers(events.ALL)] if types else []
