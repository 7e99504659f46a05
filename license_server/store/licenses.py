"""Licenses: which machine may unlock which model, when, and whether it was revoked.

Issue, revoke and extend commit with their audit record in one step (``AuditLog.commit``).
Revoke and extend are applied only if the license hash is still exactly as read, and an
activation commits its grant only if the fields its token was built from are unchanged, so
concurrent operators and racing activations always end in one of the serial orders.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from layerlock.license_server.redis_conn import Client
from layerlock.license_server.store import P, new_id, now_ms
from layerlock.license_server.store.audit import AuditLog, Change
from layerlock.shared.errors import NotFound

ALL = P + "licenses"
#: Bumped by every activation; a revoke or extend does not depend on them (no retry storm).
COUNTERS = frozenset({"activations", "last_activation"})


def key(license_id: str) -> str:
    return f"{P}license:{license_id}"


def pair_key(machine: str, model: str) -> str:
    return f"{P}lic:{machine}:{model}"


def record(machine: str, model: str, customer: str, not_before: int, expires_at: int, token_ttl: int,
           offline_grace: int, notes: str = "", license_id: str | None = None,
           issued: int | None = None) -> dict[str, str]:
    return {"license_id": license_id or new_id("lic"), "machine": machine, "model": model,
            "customer": customer, "issued_at": str(issued or now_ms()), "not_before": str(not_before),
            "expires_at": str(expires_at), "token_ttl": str(token_ttl), "offline_grace": str(offline_grace),
            "notes": notes, "status": "active", "activations": "0"}


def create(audit: AuditLog, rec: dict[str, str], *, guards: Change | None = None, actor: str,
           **event: Any) -> None:
    """Store the license with its ``license_issued`` record, atomically (under ``guards``)."""
    change = (guards or Change()).hset(key(rec["license_id"]), rec)
    change.write("ZADD", ALL, rec["issued_at"], rec["license_id"])
    change.write("SADD", pair_key(rec["machine"], rec["model"]), rec["license_id"])
    audit.commit("license_issued", change, actor=actor, **event)


def get(r: Client, license_id: str) -> dict[str, str]:
    rec = r.hgetall(key(license_id))
    if not rec:
        raise NotFound(f"license {license_id} does not exist")
    return rec


def state(rec: dict[str, str], now: float | None = None) -> str:
    """active | revoked | expired | pending (not_before in the future)."""
    t = time.time() if now is None else now
    if rec.get("status") == "revoked":
        return "revoked"
    if t >= int(rec["expires_at"]):
        return "expired"
    if t < int(rec["not_before"]):
        return "pending"
    return "active"


def mutate(audit: AuditLog, license_id: str, change: Callable[[dict[str, str]], dict[str, str]],
           event: Callable[[dict[str, str], dict[str, str]], tuple[str, dict[str, Any]]], *,
           actor: str) -> tuple[dict[str, str], dict[str, str]]:
    """Read, ``change(before) -> fields``, and commit the fields with the audit record
    ``event(before, after) -> (type, fields)`` only if the license is still as read (bar the
    activation counters), else again; returns (before, after)."""
    k = key(license_id)

    def as_read_but_counters(txn: Change, before: dict[str, str]) -> Change:
        for f, v in before.items():  # the counters every activation bumps do not matter here
            if f not in COUNTERS:
                txn.guard("eq", k, f, v)
        return txn

    return audit.update_hash(k, change, event, guard=as_read_but_counters, actor=actor,
                             missing=f"license {license_id} does not exist", what="license")


def public_view(rec: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {k: rec.get(k, "") for k in ("license_id", "machine", "model", "customer", "notes")}
    for k in ("not_before", "expires_at", "token_ttl", "offline_grace", "activations"):
        out[k] = int(rec.get(k, 0))
    out["issued_at"] = int(rec["issued_at"]) // 1000
    out["status"] = state(rec)
    if rec.get("status") == "revoked":
        out["revoked_at"] = int(rec.get("revoked_at", 0))
        out["revoke_reason"] = rec.get("revoke_reason", "")
    return out
