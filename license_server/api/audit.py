"""``/v1/audit``: filtered, cursor-paginated audit records (newest first), chain verification, the
raw oldest-first export and signed checkpoints (so auditors can verify the chain themselves)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import redis
from cryptography.hazmat.primitives.asymmetric import ed25519
from flask import Blueprint, request

from layerlock.license_server import checkpoints
from layerlock.license_server.api.common import integer, machine_code, require
from layerlock.license_server.app import services
from layerlock.license_server.roles import AUDITORS
from layerlock.license_server.webhooks import queue_inline
from layerlock.shared.errors import InvalidInput

bp = Blueprint("audit", __name__, url_prefix="/v1/audit")


#: Bounds of ``since``/``until`` (Unix seconds) and of both parts of a ``cursor`` (``MS-SEQ``):
#: well inside a stream id's 64-bit parts even as milliseconds, and exact as a float.
MAX_TIME = MAX_ID_PART = 2**53
_NUMBER = re.compile(r"[0-9]{1,20}(?:\.[0-9]{0,20})?(?:[eE][+-]?[0-9]{1,3})?")  # ASCII; no inf/nan/'1_0'
_RECORD_ID = re.compile(r"([0-9]{1,20})(?:-([0-9]{1,20}))?")


def _time(name: str) -> float | None:
    raw = request.args.get(name)
    if raw is None:
        return None
    value = float(raw) if _NUMBER.fullmatch(raw) else math.nan
    if not 0 <= value <= MAX_TIME:  # also false for nan
        raise InvalidInput(f"{name} must be Unix seconds: a decimal number between 0 and {MAX_TIME}")
    return value


def _cursor() -> str | None:
    """``MS`` or ``MS-SEQ`` as in a ``next_cursor``, normalised; 0-0 is below every record id."""
    raw = request.args.get("cursor") or None
    if raw is None:
        return None
    m = _RECORD_ID.fullmatch(raw)
    parts = [int(p) for p in m.groups() if p is not None] if m else []
    if not parts or not all(p <= MAX_ID_PART for p in parts) or parts == [0, 0]:
        raise InvalidInput(f"cursor must be an audit record id: MS-SEQ, each part an integer between 0 and "
                           f"{MAX_ID_PART}, not 0-0")
    return "-".join(map(str, parts))


@bp.get("")
@require(*AUDITORS)
def list_records() -> dict[str, Any]:
    limit = integer(request.args.get("limit", "100"), "limit", lo=1, hi=1000)
    cursor = _cursor()
    filters = {k: request.args[k] for k in ("type", "machine", "license", "model", "outcome", "reason")
               if k in request.args}
    if "machine" in filters:
        filters["machine"] = machine_code(filters["machine"])
    items, nxt = services().audit.records(cursor=cursor, limit=limit, filters=filters,
                                       since=_time("since"), until=_time("until"))
    return {"items": items, "next_cursor": nxt}


@bp.get("/verify")
@require(*AUDITORS)
def verify() -> dict[str, Any]:
    """The chain from genesis, and every stored checkpoint that verifies under our key."""
    svc = services()
    sk = _checkpoint_key()
    good, _, bad = checkpoints.stored(svc.redis, sk.public_key())
    doc = svc.audit.verify(anchors=good)
    if doc["ok"] and bad:
        return {"ok": False, "checked": doc["checked"], "break_at": "checkpoints",
                "reason": f"{bad} stored checkpoint(s) do not verify under the checkpoint key "
                          "(written to Redis by someone without it)"}
    return {**doc, "checkpoints": len(good)} if doc["ok"] and good else doc


# --- raw export and signed checkpoints (see layerlock.license_server.checkpoints) -------------
_KEYS: dict[Path, ed25519.Ed25519PrivateKey] = {}


def _checkpoint_key() -> ed25519.Ed25519PrivateKey:
    """The checkpoint key from the key dir; created on first use for key dirs from older installs."""
    key_dir = services().config.key_dir
    if key_dir not in _KEYS:
        _KEYS[key_dir] = checkpoints.create_key(key_dir)
    return _KEYS[key_dir]


@bp.get("/raw")
@require(*AUDITORS)
def raw() -> dict[str, Any]:
    """Oldest first, each record's exact canonical string and hash: for verifying the chain locally."""
    limit = integer(request.args.get("limit", "1000"), "limit", lo=1, hi=5000)
    cursor = _cursor()
    try:
        items, nxt = services().audit.raw(cursor=cursor, limit=limit)
    except redis.ResponseError:  # digits, but not a stream id Redis accepts (too large)
        raise InvalidInput("cursor must be an audit record id") from None
    return {"items": items, "next_cursor": nxt}


@bp.get("/checkpoint")
@require(*AUDITORS)
def checkpoint() -> dict[str, Any]:
    """A fresh signed checkpoint of the chain; kept in Redis too when one is due."""
    svc = services()
    sk = _checkpoint_key()
    size, head = checkpoints.snapshot(svc.redis)
    doc = checkpoints.sign(sk, size, head)
    good, _, _ = checkpoints.stored(svc.redis, sk.public_key())
    if checkpoints.maybe_store(svc.redis, doc, max(good, key=lambda c: (c.size, c.ts), default=None)):
        cp = doc["checkpoint"]  # kept: worth a webhook event (at most one a minute)
        queue_inline(svc.redis, "checkpoint.signed", {"size": cp["size"], "head": cp["head"], "ts": cp["ts"],
                                                      "kid": cp["kid"]}, f"cp{cp['size']}-{cp['ts']}")
    svc.commits.confirm()  # what it covers is on the replicas before an auditor keeps it (store/commit.py)
    return doc


@bp.get("/checkpoints")
@require(*AUDITORS)
def stored_checkpoints() -> dict[str, Any]:
    """The checkpoints the server kept (newest first) that verify under its key."""
    _, docs, bad = checkpoints.stored(services().redis, _checkpoint_key().public_key())
    return {"items": docs, "unverifiable": bad}


@bp.get("/checkpoint-key")
def checkpoint_key() -> dict[str, Any]:
    """Public: the key auditors pin (also ``keys/checkpoint.pub`` on the server)."""
    return checkpoints.public_jwk(_checkpoint_key().public_key())


@bp.get("/rejections")
@require(*AUDITORS)
def rejections_summary() -> dict[str, Any]:
    """Requests refused before any principal was identified: counted per hour and reason,
    never audited one by one (see :mod:`layerlock.license_server.store.rejections`)."""
    from layerlock.license_server.store import rejections

    hours = integer(request.args.get("hours", "24"), "hours", lo=1, hi=rejections.KEEP_HOURS)
    return rejections.summary(services().redis, hours)
