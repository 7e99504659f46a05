"""``/v1/webhooks``: signed event deliveries to ops' endpoints (admin only).

Register an endpoint (its signing secret is shown once), list and disable endpoints, query the
delivery log, replay a delivery.  Delivery itself is the background worker's job
(:mod:`layerlock.license_server.webhooks`); nothing here sends anything.
"""

from __future__ import annotations

import re
from typing import Any

from flask import Blueprint, g, request

from layerlock.license_server import events
from layerlock.license_server.api.common import body, integer, page_args, require, string
from layerlock.license_server.app import services
from layerlock.license_server.roles import ADMINS
from layerlock.license_server.store import page
from layerlock.license_server.store import webhooks as store
from layerlock.license_server.webhooks import check_url, new_secret
from layerlock.shared.errors import InvalidInput, NotFound

bp = Blueprint("webhooks", __name__, url_prefix="/v1/webhooks")
_WEBHOOK_ID = re.compile(r"wh_[0-9a-f]{16}")
_DELIVERY_ID = re.compile(r"dlv_[0-9a-f]{16}")
_LOG_ID = re.compile(r"[0-9]{1,15}-[0-9]{1,15}")
STATUSES = ("pending", "delivered", "failed", "cancelled")


def _webhook_id(text: str) -> str:
    if not _WEBHOOK_ID.fullmatch(text):
        raise NotFound(f"webhook {text[:40]!r} does not exist")
    return text


def _delivery_id(text: str) -> str:
    if not _DELIVERY_ID.fullmatch(text):
        raise NotFound(f"delivery {text[:40]!r} does not exist")
    return text


def _events(value: Any) -> list[str]:
    if value is None:
        return [events.ALL]
    known = [*events.TYPES, events.ALL]
    if not isinstance(value, list) or not 0 < len(value) <= len(known) or \
            not all(isinstance(v, str) and v in known for v in value):
        raise InvalidInput(f"events must be a non-empty list of: {', '.join(known)}")
    return sorted(set(value))


@bp.post("")
@require(*ADMINS)
def create() -> tuple[dict[str, Any], int]:
    """Register an endpoint; the answer carries its signing secret, shown this once."""
    doc = body({"url", "events", "description"}, required=("url",))
    url = check_url(doc["url"])
    subscribed = _events(doc.get("events"))
    description = string(doc, "description", "", max_len=500)
    svc = services()
    secret = new_secret()
    rec = store.record(url, subscribed, description, "", "")
    sealed, kek_id = svc.keys.seal_data_key(secret.encode(), store.secret_label(rec["webhook_id"]))
    rec.update(secret=sealed, kek_id=kek_id)
    store.create(svc.commits, rec, actor=g.actor)
    return {**store.public_view(rec), "secret": secret}, 201


@bp.get("")
@require(*ADMINS)
def list_webhooks() -> dict[str, Any]:
    cursor, limit = page_args()
    recs, nxt = page(services().redis, store.ALL, store.key, cursor, limit, lambda r: True)
    return {"items": [store.public_view(r) for r in recs], "next_cursor": nxt}


@bp.get("/<webhook_id>")
@require(*ADMINS)
def show(webhook_id: str) -> dict[str, Any]:
    return store.public_view(store.get(services().redis, _webhook_id(webhook_id)))


@bp.post("/<webhook_id>/disable")
@require(*ADMINS)
def disable(webhook_id: str) -> dict[str, Any]:
    body(())
    return store.public_view(store.disable(services().commits, _webhook_id(webhook_id), actor=g.actor))


@bp.get("/deliveries")
@require(*ADMINS)
def deliveries() -> dict[str, Any]:
    """The delivery log, newest first, filtered by webhook, status or event type."""
    limit = integer(request.args.get("limit", "50"), "limit", lo=1, hi=1000)
    cursor = request.args.get("cursor") or None
    if cursor is not None and not _LOG_ID.fullmatch(cursor):
        raise InvalidInput("cursor must be a next_cursor this endpoint returned (MS-SEQ)")
    want = {k: request.args[k] for k in ("webhook", "status", "type") if k in request.args}
    if want.get("status") not in (None, *STATUSES):
        raise InvalidInput(f"status must be one of {', '.join(STATUSES)}")
    recs, nxt = store.Deliveries(services().redis).page(
        cursor=cursor, limit=limit, keep=lambda rec: all(rec.get(k) == v for k, v in want.items()))
    return {"items": [store.delivery_view(r) for r in recs], "next_cursor": nxt}


@bp.get("/deliveries/<delivery_id>")
@require(*ADMINS)
def delivery(delivery_id: str) -> dict[str, Any]:
    """One delivery, with the exact body that was (or will be) signed and sent."""
    rec = store.Deliveries(services().redis).get(_delivery_id(delivery_id))
    return {**store.delivery_view(rec), "body": rec.get("body", "")}


@bp.post("/deliveries/<delivery_id>/replay")
@require(*ADMINS)
def replay(delivery_id: str) -> dict[str, Any]:
    """Send a delivery again (same event id), with a fresh retry window; audited."""
    body(())
    return store.delivery_view(store.replay(services().commits, _delivery_id(delivery_id), actor=g.actor))
