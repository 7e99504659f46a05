"""Webhook events: which audit records are events, and what they are called.

An event is derived from exactly one audit record (or, for ``checkpoint.signed``, from a stored
checkpoint), so it exists if and only if its record does: the commit that appends the record
also queues it for delivery (:mod:`layerlock.license_server.store.commit`), and the delivery
worker (:mod:`layerlock.license_server.webhooks`) turns it into one JSON delivery per endpoint
subscribed.  An event's id is ``evt_<audit record id>.<type>``: stable across retries, replays
and a worker that crashed halfway, so receivers drop duplicates by id.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: Every event type, with what triggers it.
TYPES: dict[str, str] = {
    "license.issued": "a license was issued",
    "license.extended": "a license's expiry was moved later",
    "license.revoked": "a license was revoked",
    "activation.granted": "a machine got a token (online or air-gapped)",
    "activation.denied": "a machine that proved its key was refused a token (audited denials only)",
    "seats.exhausted": "a machine was refused because every seat of its pool license is taken",
    "seat.released": "ops released a machine's seat",
    "lease.culled": "a floating lease was not renewed within its window and was released",
    "checkpoint.signed": "the server kept a new signed audit checkpoint",
}
#: Subscribing to ``*`` means every type.
ALL = "*"


def of_record(rec: Mapping[str, Any]) -> list[str]:
    """The event types an audit record stands for (most records stand for none)."""
    kind = rec.get("type")
    if kind == "license_issued":
        return ["license.issued"]
    if kind == "license_extended":
        return ["license.extended"]
    if kind == "license_revoked":
        return ["license.revoked"]
    if kind == "seat_released":
        return ["seat.released"]
    if kind == "lease_culled":
        return ["lease.culled"]
    if kind == "activation":
        if rec.get("outcome") == "granted":
            return ["activation.granted"]
        if rec.get("reason") == "seats_exhausted":
            return ["activation.denied", "seats.exhausted"]
        return ["activation.denied"]
    return []


def event_id(record_id: str, type_: str) -> str:
    return f"evt_{record_id}.{type_}"
